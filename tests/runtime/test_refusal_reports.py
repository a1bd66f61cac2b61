"""Refusal reports (issue 15, item 4): what the stack refuses is counted per minute, reason and
address, and sent to the control plane in bounded batches, dropped (and counted) when it cannot
be reached. Off unless configured."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from room_cloud_runtime import _refusal_reports
from room_cloud_runtime._errors import ConfigError
from room_cloud_runtime._gateway import build_gateway, load_gateway_settings
from room_cloud_runtime._jwks import JWKSCache
from room_cloud_runtime._refusal_reports import (
    OVERFLOW_ADDRESS,
    RefusalAggregator,
    RefusalReporter,
    ReportSettings,
    load_report_settings,
    note_refusal,
)
from room_cloud_runtime._settings import RuntimeSettings, load_settings
from room_cloud_runtime._stack import RuntimeStack
from tests.helpers.tokens import TokenFactory

ISSUER = "https://cp.quoroom.test"
INSTANCE = "inst-reports"
ORIGIN = "https://app.quoroom.test"
KEY = "k" * 43


async def room(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def _jwks(factory: TokenFactory) -> JWKSCache:
    body = json.dumps(factory.jwks()).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    return JWKSCache(
        f"{ISSUER}/.well-known/jwks.json",
        client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )


class ControlPlane:
    """A fake report endpoint: records the batches, or fails as told."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []
        self.headers: list[httpx.Headers] = []
        self.down = False
        self.calls = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        self.batches.append(json.loads(request.content))
        self.headers.append(request.headers)
        return httpx.Response(202, json={"ok": True})

    def reasons(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for batch in self.batches:
            for entry in batch["entries"]:
                totals[entry["reason"]] = totals.get(entry["reason"], 0) + entry["count"]
        return totals


def settings(**overrides: Any) -> RuntimeSettings:
    values: dict[str, Any] = {
        "mode": "cloud",
        "instance_id": INSTANCE,
        "issuer": ISSUER,
        "allowed_origins": (ORIGIN,),
        "access_log": False,
        "address_limit": "5/minute",
        "reports": ReportSettings(key=KEY, interval_seconds=3600),
    }
    values.update(overrides)
    return RuntimeSettings(**values)


async def _stack(factory: TokenFactory, cp: ControlPlane, *, fused: bool = True) -> RuntimeStack:
    stack = RuntimeStack(room, settings(), jwks=_jwks(factory), fused=fused)
    assert stack.reports is not None
    stack.reports._transport = httpx.MockTransport(cp.handler)
    await stack.startup()
    return stack


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "layered"])
async def test_refusals_of_every_kind_are_reported_in_one_batch(fused: bool) -> None:
    factory = TokenFactory(ISSUER, INSTANCE)
    cp = ControlPlane()
    stack = await _stack(factory, cp, fused=fused)
    try:
        transport = httpx.ASGITransport(app=stack, client=("203.0.113.7", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://room") as client:
            good = {"authorization": f"Bearer {factory.mint(role='owner')}"}
            assert (await client.get("/api/rooms", headers=good)).status_code == 200
            assert stack.reports is not None
            assert stack.reports.aggregator.counts == {}  # nothing counted for an allowed request
            expired = factory.mint(ttl=-120, now=0)
            other = factory.mint(instanceId="inst-other")
            assert (await client.get("/api/rooms")).json()["code"] == "missing_token"
            bad = {"authorization": "Bearer not.a.token"}
            assert (await client.get("/api/rooms", headers=bad)).status_code == 401
            assert (
                await client.get("/api/rooms", headers={"authorization": f"Bearer {expired}"})
            ).json()["code"] == "token_expired"
            assert (
                await client.get("/api/rooms", headers={"authorization": f"Bearer {other}"})
            ).status_code == 401
            evil = {"origin": "https://evil.test", **good}
            assert (await client.get("/api/rooms", headers=evil)).json()[
                "code"
            ] == "origin_not_allowed"
            preflight = {"origin": "https://evil.test", "access-control-request-method": "POST"}
            assert (await client.options("/api/rooms", headers=preflight)).status_code == 403
            # The address budget is 5/minute: five requests so far counted, so this one is refused.
            statuses = [
                (await client.get("/api/rooms", headers=good)).status_code for _ in range(3)
            ]
            assert 429 in statuses
        reports = stack.reports
        assert reports is not None
        sent = await reports.flush()
    finally:
        await stack.shutdown()
    assert sent == 1
    reasons = cp.reasons()
    assert reasons["missing_token"] == 1
    assert reasons["token_malformed"] == 1
    assert reasons["token_expired"] == 1
    assert reasons["wrong_instance"] == 1
    assert reasons["origin_not_allowed"] == 1
    assert reasons["cors_preflight_refused"] == 1
    assert reasons["rate_limited"] >= 1
    batch = cp.batches[0]
    assert batch["instanceId"] == INSTANCE
    assert len(batch["batchId"]) == 32
    assert {entry["address"] for entry in batch["entries"]} == {"203.0.113.7"}
    assert all(entry["minute"] % 60 == 0 for entry in batch["entries"])
    assert cp.headers[0]["authorization"] == f"Bearer {KEY}"
    assert reports.status()["sentBatches"] == 1


async def test_same_minute_reason_and_address_is_one_entry_with_a_count() -> None:
    now = [600.0]
    aggregator = RefusalAggregator(max_pending=10, clock=lambda: now[0])
    scope = {"type": "http", "client": ("198.51.100.1", 1), "headers": []}
    for _ in range(5):
        aggregator.add(scope, "token_expired")
    now[0] = 659.0
    aggregator.add(scope, "token_expired")
    now[0] = 660.0
    aggregator.add(scope, "token_expired")
    aggregator.add({**scope, "client": ("2001:db8:1:2::9", 1)}, "token_expired")
    assert aggregator.take() == {
        (600, "token_expired", "198.51.100.1"): 6,
        (660, "token_expired", "198.51.100.1"): 1,
        (660, "token_expired", "2001:db8:1:2::/64"): 1,
    }
    assert aggregator.take() == {}


def test_memory_is_bounded_and_what_does_not_fit_is_counted() -> None:
    aggregator = RefusalAggregator(max_pending=10, clock=lambda: 60.0)
    for i in range(5000):
        scope = {"type": "http", "client": (f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 1)}
        aggregator.add(scope, "rate_limited" if i % 2 else "token_expired")
    counts = aggregator.counts
    # 10 itemised keys, then one overflow key per (minute, reason).
    assert len(counts) == 12
    assert (
        counts[(60, "rate_limited", OVERFLOW_ADDRESS)]
        + counts[(60, "token_expired", OVERFLOW_ADDRESS)]
        == 4990
    )
    # Past the overflow keys too: only a counter grows.
    for i in range(300):
        aggregator.add({"type": "http", "client": ("10.9.9.9", 1)}, f"reason_{i}")
    assert len(aggregator.counts) <= 10 + 256
    assert aggregator.dropped == 300 - 254


async def test_an_unreachable_control_plane_drops_the_batch_and_counts_it() -> None:
    cp = ControlPlane()
    cp.down = True
    reporter = RefusalReporter(
        ReportSettings(key=KEY, interval_seconds=3600, max_entries=2),
        issuer=ISSUER,
        instance_id=INSTANCE,
        transport=httpx.MockTransport(cp.handler),
    )
    await reporter.start()
    try:
        for i in range(5):
            note_refusal({"type": "http", "client": (f"192.0.2.{i}", 1)}, "token_expired")
        assert await reporter.flush() == 0
        # Dropped, not queued: nothing is held for a later try.
        assert reporter.aggregator.counts == {}
        status = reporter.status()
        assert status["failedBatches"] == 3  # 5 entries in batches of 2
        assert status["droppedRefusals"] == 5
        assert cp.calls == 1  # after the first failure the rest of the round is not tried
        cp.down = False
        note_refusal({"type": "http", "client": ("192.0.2.1", 1)}, "token_expired")
        assert await reporter.flush() == 1
        assert len(cp.batches) == 1 and cp.batches[0]["entries"][0]["count"] == 1
    finally:
        await reporter.aclose()
    assert _refusal_reports._sink is None


async def test_a_refusing_control_plane_is_a_dropped_batch_too() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(413, json={"error": "too large", "code": "report_too_large"})

    reporter = RefusalReporter(
        ReportSettings(key=KEY, interval_seconds=3600),
        issuer=ISSUER,
        instance_id=INSTANCE,
        transport=httpx.MockTransport(handler),
    )
    await reporter.start()
    try:
        note_refusal({"type": "http", "client": ("192.0.2.1", 1)}, "token_expired")
        assert await reporter.flush() == 0
        assert reporter.status()["droppedRefusals"] == 1
    finally:
        await reporter.aclose()


async def test_reports_are_posted_to_the_issuers_endpoint_by_default() -> None:
    reporter = RefusalReporter(ReportSettings(key=KEY), issuer=ISSUER + "/", instance_id=INSTANCE)
    assert reporter.url == f"{ISSUER}/api/cloud/instances/{INSTANCE}/access-reports"
    other = ReportSettings(key=KEY, url="http://127.0.0.1:9/r")
    assert other.url_for(ISSUER, INSTANCE) == "http://127.0.0.1:9/r"


def test_reporting_is_off_unless_a_key_is_configured() -> None:
    cloud = {
        "QUOROOM_DEPLOYMENT_MODE": "cloud",
        "QUOROOM_CLOUD_INSTANCE_ID": INSTANCE,
        "QUOROOM_CLOUD_ISSUER": ISSUER,
        "QUOROOM_ALLOWED_ORIGINS": ORIGIN,
    }
    assert load_settings(cloud).reports is None
    assert RuntimeStack(room, load_settings(cloud)).reports is None
    assert load_settings({}).reports is None
    assert RuntimeStack(room, load_settings({})).reports is None
    configured = load_settings({**cloud, "QUOROOM_CLOUD_REPORT_KEY": KEY})
    assert configured.reports is not None
    assert KEY not in repr(configured)
    # The note is a no-op while no reporter runs.
    note_refusal({"type": "http", "client": ("192.0.2.1", 1)}, "token_expired")
    assert _refusal_reports._sink is None


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("QUOROOM_CLOUD_REPORT_KEY", "short"),
        ("QUOROOM_CLOUD_REPORT_SECONDS", "0"),
        ("QUOROOM_CLOUD_REPORT_MAX_ENTRIES", "5000"),
        ("QUOROOM_CLOUD_REPORT_MAX_PENDING", "x"),
        ("QUOROOM_CLOUD_REPORT_URL", "ftp://x"),
    ],
)
def test_bad_report_settings_name_the_variable(setting: str, value: str) -> None:
    env = {"QUOROOM_CLOUD_REPORT_KEY": KEY, setting: value}
    with pytest.raises(ConfigError) as caught:
        load_report_settings(env, mode="cloud")
    assert caught.value.setting == setting


def test_a_report_key_in_local_mode_is_refused() -> None:
    with pytest.raises(ConfigError, match="QUOROOM_CLOUD_REPORT_KEY"):
        load_settings({"QUOROOM_CLOUD_REPORT_KEY": KEY})


def test_the_gateway_starts_the_reporter_with_its_stack() -> None:
    env = {
        "QUOROOM_DEPLOYMENT_MODE": "cloud",
        "QUOROOM_CLOUD_INSTANCE_ID": INSTANCE,
        "QUOROOM_CLOUD_ISSUER": ISSUER,
        "QUOROOM_ALLOWED_ORIGINS": ORIGIN,
        "QUOROOM_CLOUD_REPORT_KEY": KEY,
    }
    runtime = load_settings(env)
    gateway = load_gateway_settings("http://127.0.0.1:9", (), env)
    stack, _ = build_gateway(runtime, gateway, environ=env)
    assert stack.reports is not None
    assert stack.reports in stack.resources


def test_the_gateway_does_not_hand_the_report_key_to_the_room() -> None:
    from room_cloud_runtime._gateway import room_environment

    env = {
        "QUOROOM_DEPLOYMENT_MODE": "cloud",
        "QUOROOM_CLOUD_INSTANCE_ID": INSTANCE,
        "QUOROOM_CLOUD_ISSUER": ISSUER,
        "QUOROOM_ALLOWED_ORIGINS": ORIGIN,
        "QUOROOM_CLOUD_REPORT_KEY": KEY,
        "ANTHROPIC_API_KEY": "sk-ant",
    }
    gateway = load_gateway_settings("http://127.0.0.1:9", (), env)
    room_env = room_environment(load_settings(env), gateway, env)
    assert "QUOROOM_CLOUD_REPORT_KEY" not in room_env
    assert KEY not in room_env.values()
    assert room_env["ANTHROPIC_API_KEY"] == "sk-ant"  # the owner's credentials are the Room's
