"""The runtime's Prometheus metrics (issue 14, item 1, runtime half): scraped over real HTTP from
the listener the stack starts, after real requests through a live server; and from the shipped
``quoroom-runtime serve`` (granian), whose counts live in the worker process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from room_cloud_runtime import reference
from room_cloud_runtime._errors import ConfigError
from room_cloud_runtime._settings import RuntimeSettings, load_settings
from room_cloud_runtime._stack import RuntimeStack
from room_cloud_runtime.cli import server_options
from tests.helpers.jwks_server import JWKSServer
from tests.helpers.live_server import live_server
from tests.helpers.tokens import TokenFactory
from tests.runtime.test_integration import ORIGIN, bearer, cloud_settings

INSTANCE = "inst-integration"
ROOM = (("instance_id", INSTANCE),)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on the listener, by (name, sorted labels)."""
    answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert answer.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def requests_with(samples, kind: str, code: int) -> float:
    return samples.get(
        ("quoroom_runtime_requests_total", (("code", str(code)), ("kind", kind))), 0.0
    )


@pytest.fixture
def jwks_and_tokens():
    server = JWKSServer(max_age=1)
    with server:
        factory = TokenFactory(server.issuer, INSTANCE)
        server.jwks = factory.jwks()
        yield server, factory


def test_off_unless_a_port_is_set(jwks_and_tokens, tmp_path) -> None:
    server, _ = jwks_and_tokens
    stack = RuntimeStack(
        reference.create_room_app(data_dir=str(tmp_path)), cloud_settings(server.issuer)
    )
    assert stack.metrics is None and stack.counts is None
    assert load_settings({}).metrics_port is None


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"QUOROOM_METRICS_PORT": "nine"}, "QUOROOM_METRICS_PORT"),
        ({"QUOROOM_METRICS_PORT": "70000"}, "QUOROOM_METRICS_PORT"),
        ({"QUOROOM_METRICS_PORT": "-1"}, "QUOROOM_METRICS_PORT"),
        ({"QUOROOM_METRICS_PORT": "9091", "QUOROOM_METRICS_HOST": "a b"}, "QUOROOM_METRICS_HOST"),
        ({"QUOROOM_METRICS_HOST": "http://x/"}, "QUOROOM_METRICS_HOST"),
    ],
)
def test_bad_settings_name_the_variable(env, setting) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert caught.value.setting == setting


def test_requests_durations_keys_and_up_are_scraped(jwks_and_tokens, tmp_path) -> None:
    server, factory = jwks_and_tokens
    # The access log off: the counts do not depend on it.
    stack = RuntimeStack(
        reference.create_room_app(data_dir=str(tmp_path)),
        cloud_settings(server.issuer, metrics_port=0),
    )
    with live_server(stack, **server_options(stack.settings)) as base:
        assert stack.metrics is not None
        port = stack.metrics.port
        assert port != 0
        with httpx.Client(base_url=base) as client:
            for _ in range(3):
                assert client.get("/api/rooms", headers=bearer(factory.mint())).status_code == 200
            assert client.get("/api/rooms").status_code == 401
            assert (
                client.get("/api/rooms", headers={"Origin": "https://evil.test"}).status_code == 403
            )
        samples = scrape(port)
        assert requests_with(samples, "http", 200) == 3
        assert requests_with(samples, "http", 401) == 1
        assert requests_with(samples, "http", 403) == 1
        assert samples[("quoroom_runtime_request_duration_seconds_count", ())] == 5
        assert samples[("quoroom_runtime_request_duration_seconds_bucket", (("le", "+Inf"),))] == 5
        assert 0 < samples[("quoroom_runtime_request_duration_seconds_sum", ())] < 5
        assert samples[("quoroom_runtime_up", ROOM)] == 1
        assert samples[("quoroom_runtime_jwks_keys", ROOM)] == 1
        assert samples[("quoroom_runtime_jwks_stale", ROOM)] == 0
        assert 0 <= samples[("quoroom_runtime_jwks_age_seconds", ROOM)] < 60
        assert (
            samples[("quoroom_runtime_info", (("instance_id", INSTANCE), ("mode", "cloud")))] == 1
        )
        assert samples[("process_resident_memory_bytes", ())] > 0
        # Nothing but the scrape path's text: no token, no key material.
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert "eyJ" not in text and '"kty"' not in text
    # Stopped with the stack.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_a_room_that_never_got_keys_reports_their_age_since_start(tmp_path) -> None:
    server = JWKSServer(max_age=1)
    with server:
        server.fail_with(500)
        stack = RuntimeStack(
            reference.create_room_app(data_dir=str(tmp_path)),
            cloud_settings(server.issuer, metrics_port=0),
        )
        with live_server(stack, **server_options(stack.settings)):
            assert stack.metrics is not None
            time.sleep(1.1)
            samples = scrape(stack.metrics.port)
    assert samples[("quoroom_runtime_jwks_keys", ROOM)] == 0
    assert samples[("quoroom_runtime_jwks_stale", ROOM)] == 1
    assert samples[("quoroom_runtime_jwks_age_seconds", ROOM)] >= 1


def test_a_gateway_whose_room_is_down_reports_up_0(jwks_and_tokens, tmp_path) -> None:
    server, _ = jwks_and_tokens
    health = {"status": 503}
    stack = RuntimeStack(
        reference.create_room_app(data_dir=str(tmp_path)),
        cloud_settings(server.issuer, metrics_port=0),
        health=lambda: (health["status"], b"{}"),
    )
    with live_server(stack, **server_options(stack.settings)):
        assert stack.metrics is not None
        assert scrape(stack.metrics.port)[("quoroom_runtime_up", ROOM)] == 0
        health["status"] = 200
        assert scrape(stack.metrics.port)[("quoroom_runtime_up", ROOM)] == 1


def test_a_taken_port_stops_start_up_naming_the_setting(jwks_and_tokens, tmp_path) -> None:
    server, _ = jwks_and_tokens
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        stack = RuntimeStack(
            reference.create_room_app(data_dir=str(tmp_path)),
            cloud_settings(server.issuer, metrics_port=taken.getsockname()[1]),
        )
        import asyncio

        async def start() -> None:
            try:
                await stack.startup()
            finally:
                await stack.shutdown()

        with pytest.raises(ConfigError) as caught:
            asyncio.run(start())
    assert caught.value.setting == "QUOROOM_METRICS_PORT"


def test_the_shipped_serve_exports_the_worker_counts(jwks_and_tokens, tmp_path: Path) -> None:
    """granian runs the app in a worker process: the listener must start there, with the counts."""
    server, factory = jwks_and_tokens
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    port, metrics_port = ports
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        "QUOROOM_DEPLOYMENT_MODE": "cloud",
        "QUOROOM_CLOUD_INSTANCE_ID": INSTANCE,
        "QUOROOM_CLOUD_ISSUER": server.issuer,
        "QUOROOM_ALLOWED_ORIGINS": ORIGIN,
        "QUOROOM_DATA_DIR": str(tmp_path / "data"),
        "QUOROOM_METRICS_PORT": str(metrics_port),
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "room_cloud_runtime.cli", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        token = factory.mint()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert client.get("/api/rooms", headers=bearer(token)).status_code == 200
            assert client.get("/api/rooms", headers=bearer("nonsense")).status_code == 401
        samples = scrape(metrics_port)
        assert requests_with(samples, "http", 200) >= 2  # /healthz and /api/rooms
        assert requests_with(samples, "http", 401) == 1
        assert samples[("quoroom_runtime_up", ROOM)] == 1
        assert samples[("quoroom_runtime_jwks_keys", ROOM)] == 1
    finally:
        process.terminate()
        assert process.wait(timeout=20) == 0, log.read_text()
    assert token not in log.read_text()


def test_settings_object_checks_the_port_range() -> None:
    with pytest.raises(ConfigError):
        RuntimeSettings(metrics_port=65536)
