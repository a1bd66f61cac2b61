"""The metrics setting and the operator files (issue 14, item 1): a bad ``METRICS_PORT`` stops
start-up naming the setting; ``ops/prometheus/alerts.yml`` and ``ops/grafana/quoroom-cloud.json``
are well formed and reference only metric names a live control plane or a runtime exports.
``promtool check rules`` runs too when promtool is installed."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from control_plane.settings import Settings, SettingsError
from room_cloud_runtime._metrics import RequestCounts, runtime_listener
from tests.control_plane.metrics_helpers import free_port, scrape

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "quoroom-cloud.json"


def runtime_metric_names() -> set[str]:
    """What a runtime's listener serves (room_cloud_runtime/_metrics.py), read from its registry."""
    listener = runtime_listener(
        RequestCounts(),
        host="127.0.0.1",
        port=0,
        mode="cloud",
        instance="inst-1",
        jwks=_Keys(),
        room_up=lambda: True,
    )
    text = generate_latest(listener.registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


class _Keys:
    def status(self) -> dict[str, Any]:
        return {"keyCount": 1, "lastRefreshAgeSeconds": 5.0, "stale": False}


_NAME = re.compile(r"\bquoroom_[a-z0-9_]+")


@pytest.mark.parametrize("value", ["0", "65536", "abc", "-1", "80.5", True])
def test_a_bad_metrics_port_is_refused_naming_the_setting(value: Any, monkeypatch) -> None:
    with pytest.raises(ValidationError, match="QUOROOM_CP_METRICS_PORT"):
        Settings(metrics_port=value)
    if isinstance(value, str):
        monkeypatch.setenv("QUOROOM_CP_METRICS_PORT", value)
        with pytest.raises(ValidationError, match="QUOROOM_CP_METRICS_PORT"):
            Settings()


def test_the_metrics_port_is_off_unless_set(monkeypatch) -> None:
    assert Settings().metrics_port is None
    monkeypatch.setenv("QUOROOM_CP_METRICS_PORT", "9464")
    assert Settings().metrics_port == 9464


async def test_a_taken_metrics_port_stops_start_up_naming_the_setting(
    make_harness: Any, make_settings: Any
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SettingsError, match="QUOROOM_CP_METRICS_PORT"):
            async with make_harness(make_settings(metrics_port=port)):
                pass


def _exprs_of_alerts() -> list[str]:
    data = yaml.safe_load(ALERTS.read_text())
    exprs = []
    assert isinstance(data["groups"], list) and data["groups"]
    for group in data["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["alert"] and isinstance(rule["expr"], str), rule
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule
            assert rule["labels"]["severity"] in ("page", "warn"), rule
            assert rule["annotations"]["summary"], rule
            exprs.append(rule["expr"])
    alerts = {r["alert"] for g in data["groups"] for r in g["rules"]}
    for needed in ("WorkerStuck", "ProvisioningFailureRate", "StripeWebhookLag", "High5xxRate"):
        assert f"Quoroom{needed}" in alerts
    assert {"QuoroomRoomDown", "QuoroomJWKSStale"} <= alerts
    return exprs


def _exprs_of_dashboard() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    assert data["uid"] and data["title"] and isinstance(data["schemaVersion"], int)
    assert data["templating"]["list"][0]["type"] == "datasource"
    exprs = []
    ids = set()
    for panel in data["panels"]:
        assert panel["title"] and panel["type"] in ("timeseries", "stat"), panel
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}, panel
        ids.add(panel["id"])
        assert panel["targets"], panel
        for target in panel["targets"]:
            assert target["refId"] and target["expr"], target
            exprs.append(target["expr"])
    assert len(ids) == len(data["panels"]) >= 10
    return exprs


async def test_alerts_and_dashboard_reference_only_exported_metrics(
    make_harness: Any, make_settings: Any
) -> None:
    port = free_port()
    async with make_harness(make_settings(metrics_port=port)):
        exported = (await scrape(port)).names()
    referenced = {
        name for expr in _exprs_of_alerts() + _exprs_of_dashboard() for name in _NAME.findall(expr)
    }
    runtime = runtime_metric_names()
    assert {"quoroom_runtime_up", "quoroom_runtime_jwks_age_seconds"} <= runtime
    assert referenced <= exported | runtime, referenced - exported - runtime
    assert referenced & runtime and referenced - runtime, "both halves are referenced"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_alert_rules() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
