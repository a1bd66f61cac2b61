"""The whole stack around the reference Room, through a real uvicorn on loopback, with a real
JWKS server and real HTTP and WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest
import websockets
from websockets.asyncio.client import connect

from room_cloud_runtime import reference
from room_cloud_runtime._settings import RuntimeSettings
from room_cloud_runtime._stack import RuntimeStack
from room_cloud_runtime.cli import server_options
from tests.helpers.jwks_server import JWKSServer
from tests.helpers.live_server import live_server
from tests.helpers.tokens import TokenFactory

ORIGIN = "https://app.quoroom.test"
INSTANCE = "inst-integration"


def cloud_settings(issuer: str, **overrides) -> RuntimeSettings:
    values = {
        "mode": "cloud",
        "instance_id": INSTANCE,
        "issuer": issuer,
        "allowed_origins": (ORIGIN,),
        "jwks_min_refresh_seconds": 1,
        "jwks_unknown_kid_cooldown_seconds": 0,
        "access_log": False,
    }
    values.update(overrides)
    return RuntimeSettings(**values)


@pytest.fixture
def jwks_and_tokens():
    server = JWKSServer(max_age=1)
    with server:
        factory = TokenFactory(server.issuer, INSTANCE)
        server.jwks = factory.jwks()
        yield server, factory


@pytest.fixture
def runtime(jwks_and_tokens, tmp_path):
    server, factory = jwks_and_tokens
    stack = RuntimeStack(
        reference.create_room_app(data_dir=str(tmp_path)), cloud_settings(server.issuer)
    )
    with live_server(stack, **server_options(stack.settings)) as base:
        yield base, factory, server


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_health_is_public_and_the_api_is_not(runtime) -> None:
    base, _, _ = runtime
    with httpx.Client(base_url=base) as client:
        assert client.get("/healthz").json() == {"ok": True}
        refused = client.get("/api/rooms")
        assert refused.status_code == 401
        assert refused.json()["code"] == "missing_token"
        # Security headers on errors too.
        assert refused.headers["x-content-type-options"] == "nosniff"
        assert refused.headers["cache-control"] == "no-store"


def test_an_owner_token_reads_and_writes(runtime) -> None:
    base, factory, _ = runtime
    token = factory.mint(role="owner")
    with httpx.Client(base_url=base, headers=bearer(token)) as client:
        assert client.get("/api/rooms").status_code == 200
        created = client.post("/api/rooms", json={"name": "Launch"})
        assert created.status_code == 201
        assert "strict-transport-security" in created.headers


def test_a_member_may_vote_but_not_create_or_read_credentials(runtime) -> None:
    base, factory, _ = runtime
    token = factory.mint(role="member", sub="member-1")
    with httpx.Client(base_url=base, headers=bearer(token)) as client:
        assert client.get("/api/rooms").status_code == 200
        assert client.post("/api/decisions/d1/vote", json={"vote": "yes"}).status_code == 200
        refused = client.post("/api/rooms", json={"name": "Nope"})
        assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
        assert client.get("/api/credentials/c1").status_code == 403
        # Refused whichever layer sees it first (the Room routes case-sensitively anyway).
        assert client.get("/API/CREDENTIALS/c1").status_code in (401, 403)


def test_verify_status_and_handshake_speak_the_room_ui_contract(runtime) -> None:
    base, factory, _ = runtime
    token = factory.mint(role="member", sub="u-7", email="m@example.com", emailVerified=True)
    with httpx.Client(base_url=base) as client:
        anonymous = client.get("/api/status").json()
        assert anonymous["deploymentMode"] == "cloud"
        assert anonymous["cloud"]["keysLoaded"] is True
        assert "rooms" not in anonymous
        full = client.get("/api/status", headers=bearer(token)).json()
        assert full["deploymentMode"] == "cloud" and "rooms" in full
        verified = client.get("/api/auth/verify", headers=bearer(token)).json()
        assert verified["ok"] is True and verified["role"] == "member"
        assert verified["profile"]["id"] == "u-7"
        assert client.get("/api/auth/handshake").status_code == 403


def test_a_token_for_another_instance_or_role_is_refused(runtime) -> None:
    base, factory, _ = runtime
    with httpx.Client(base_url=base) as client:
        other = client.get("/api/rooms", headers=bearer(factory.mint(instanceId="someone-else")))
        assert other.status_code == 401 and other.json()["code"] == "invalid_claim"
        admin = client.get("/api/rooms", headers=bearer(factory.mint(role="admin")))
        assert admin.status_code == 401


def test_cors_lets_the_allowed_origin_read_and_refuses_others(runtime) -> None:
    base, factory, _ = runtime
    token = factory.mint()
    with httpx.Client(base_url=base) as client:
        ok = client.get("/api/rooms", headers={**bearer(token), "Origin": ORIGIN})
        assert ok.headers["access-control-allow-origin"] == ORIGIN
        assert "origin" in ok.headers["vary"].lower()
        evil = client.get("/api/rooms", headers={**bearer(token), "Origin": ORIGIN + ".evil.test"})
        assert evil.status_code == 403 and evil.json()["code"] == "origin_not_allowed"
        preflight = client.options(
            "/api/rooms",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code in (200, 204)
        assert preflight.headers["access-control-allow-origin"] == ORIGIN


def test_a_chunked_body_over_the_cap_is_refused(jwks_and_tokens, tmp_path) -> None:
    server, factory = jwks_and_tokens
    stack = RuntimeStack(
        reference.create_room_app(), cloud_settings(server.issuer, max_body_bytes=1024)
    )

    def chunks():
        for _ in range(64):
            yield b"x" * 256

    with (
        live_server(stack, **server_options(stack.settings)) as base,
        httpx.Client(base_url=base) as client,
    ):
        response = client.post(
            "/api/rooms",
            content=chunks(),
            headers={**bearer(factory.mint()), "Content-Type": "application/json"},
        )
    assert response.status_code == 413
    assert response.json()["code"] == "body_too_large"


def test_x_forwarded_for_does_not_buy_a_new_address_budget(jwks_and_tokens) -> None:
    server, _ = jwks_and_tokens
    stack = RuntimeStack(
        reference.create_room_app(), cloud_settings(server.issuer, address_limit="5/minute")
    )
    with (
        live_server(stack, **server_options(stack.settings)) as base,
        httpx.Client(base_url=base) as client,
    ):
        codes = [
            client.get("/api/status", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code
            for i in range(8)
        ]
        assert codes[:5] == [200] * 5
        assert codes[5:] == [429] * 3
        refused = client.get("/api/status", headers={"X-Forwarded-For": "10.9.9.9"})
        assert refused.headers["retry-after"].isdigit()
        # Fly's health checks keep passing while the address is throttled.
        assert client.get("/healthz").status_code == 200


def test_keys_rotate_without_a_restart(runtime) -> None:
    base, factory, server = runtime
    with httpx.Client(base_url=base) as client:
        assert client.get("/api/rooms", headers=bearer(factory.mint())).status_code == 200
        new_key = factory.rotate()
        server.jwks = factory.jwks()
        token = factory.mint(key=new_key)
        assert client.get("/api/rooms", headers=bearer(token)).status_code == 200


def test_last_good_keys_serve_while_the_control_plane_is_down(runtime) -> None:
    base, factory, server = runtime
    token = factory.mint(sub="fresh-user")
    server.go_down()
    try:
        time.sleep(1.2)  # past the (clamped) max-age: the refresh fails, keys are kept
        with httpx.Client(base_url=base) as client:
            assert client.get("/api/rooms", headers=bearer(token)).status_code == 200
    finally:
        server.come_back()


async def test_websocket_subscribers_get_events_and_are_closed_at_expiry(runtime) -> None:
    base, factory, _ = runtime
    ws_url = base.replace("http://", "ws://") + "/ws"
    token = factory.mint(role="member", ttl=2)
    async with connect(
        ws_url, subprotocols=["quoroom", f"quoroom.bearer.{token}"], origin=ORIGIN
    ) as ws:
        assert ws.subprotocol == "quoroom"
        await ws.send(json.dumps({"type": "subscribe", "roomId": "r1"}))
        await asyncio.wait_for(ws.recv(), 5)  # subscription acknowledged
        async with httpx.AsyncClient(base_url=base) as client:
            voted = await client.post(
                "/api/decisions/d1/vote", json={"vote": "no"}, headers=bearer(factory.mint())
            )
            assert voted.status_code == 200
        event = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert event["type"] == "vote"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


async def test_a_websocket_from_a_foreign_origin_is_refused_before_accept(runtime) -> None:
    base, factory, _ = runtime
    ws_url = base.replace("http://", "ws://") + f"/ws?token={factory.mint()}"
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with connect(ws_url, origin="https://evil.test"):
            pass
    assert refused.value.response.status_code == 403


async def test_a_websocket_without_a_token_is_refused(runtime) -> None:
    base, _, _ = runtime
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with connect(base.replace("http://", "ws://") + "/ws", origin=ORIGIN):
            pass
    assert refused.value.response.status_code == 401


def test_local_mode_keeps_the_room_handshake_and_stops_dns_rebinding(tmp_path) -> None:
    stack = RuntimeStack(reference.create_room_app(), RuntimeSettings())
    with (
        live_server(stack, **server_options(stack.settings)) as base,
        httpx.Client(base_url=base) as client,
    ):
        token = client.get("/api/auth/handshake").json()["token"]
        assert client.get("/api/rooms", headers=bearer(token)).status_code == 200
        assert client.get("/api/status").json()["deploymentMode"] == "local"
        rebound = client.get("/api/rooms", headers={**bearer(token), "Host": "evil.test:3700"})
        assert rebound.status_code == 403


def test_the_cli_refuses_to_start_in_cloud_mode_without_its_settings() -> None:
    env = {"QUOROOM_DEPLOYMENT_MODE": "cloud", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "room_cloud_runtime.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "QUOROOM_CLOUD_INSTANCE_ID" in result.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_served_runtime_never_logs_a_token(jwks_and_tokens, tmp_path) -> None:
    server, factory = jwks_and_tokens
    port = _free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "QUOROOM_DEPLOYMENT_MODE": "cloud",
        "QUOROOM_CLOUD_INSTANCE_ID": INSTANCE,
        "QUOROOM_CLOUD_ISSUER": server.issuer,
        "QUOROOM_ALLOWED_ORIGINS": ORIGIN,
        "QUOROOM_DATA_DIR": str(tmp_path),
        "QUOROOM_LOG_LEVEL": "debug",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "room_cloud_runtime.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    good, forged = factory.mint(), factory.mint()[:-4] + "AAAA"
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            for _ in range(100):
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            assert (await client.get("/api/rooms", headers=bearer(good))).status_code == 200
            assert (await client.get("/api/rooms", headers=bearer(forged))).status_code == 401
        ws = base.replace("http://", "ws://")
        async with connect(f"{ws}/ws?token={good}", origin=ORIGIN):
            pass
        with pytest.raises(websockets.InvalidStatus):
            async with connect(f"{ws}/ws?token={forged}", origin=ORIGIN):
                pass
        with pytest.raises(websockets.InvalidStatus):
            async with connect(f"{ws}/ws", subprotocols=["quoroom", f"quoroom.bearer.{forged}"]):
                pass
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert stderr.strip(), "the runtime logs as JSON lines on stderr"
    lines = [json.loads(line) for line in stderr.strip().splitlines()]
    # Access lines are written in batches: SIGTERM (granian stops its worker, the stack's
    # lifespan shutdown) writes what is pending.
    answered = [(e["path"], e["status"]) for e in lines if e["msg"] == "request"]
    assert ("/api/rooms", 200) in answered and ("/api/rooms", 401) in answered
    for secret in (good, forged, good.split(".")[2], forged.split(".")[1]):
        assert secret not in stderr
    assert "without completing handshake" not in stderr


@pytest.mark.parametrize("path", ["/API/STATUS", "/Api/Status", "/api/status/", "/API/ROOMS"])
def test_case_variants_of_api_paths_never_reach_the_room_without_a_token(runtime, path):
    base, _, _ = runtime
    response = httpx.get(base + path)
    assert response.status_code == 401
    assert "deploymentMode" not in response.text


# --- issue 12, item 5: what the peer suites found ---------------------------------------------


def test_a_head_preflight_is_answered_head_is_cors_safelisted(runtime):
    base, _, _ = runtime
    response = httpx.options(
        base + "/api/rooms", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "HEAD"}
    )
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == ORIGIN


def test_the_limits_refusals_carry_cors_headers_so_the_page_can_read_the_reason(runtime):
    base, factory, _ = runtime
    auth = {"Authorization": f"Bearer {factory.mint()}", "Origin": ORIGIN}
    too_big = httpx.post(base + "/api/rooms", headers=auth, content=b"x" * (2 << 20))
    too_deep = httpx.post(
        base + "/api/rooms",
        headers={**auth, "Content-Type": "application/json"},
        content=b"[" * 40 + b"]" * 40,
    )
    big_headers = httpx.get(base + "/api/rooms", headers={**auth, "X-Pad": "a" * 20_000})
    for response, status in ((too_big, 413), (too_deep, 400), (big_headers, 431)):
        assert response.status_code == status
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert "Origin" in response.headers["vary"]


def test_a_websocket_may_carry_its_token_in_an_authorization_header(runtime):
    base, factory, _ = runtime

    async def run() -> None:
        url = base.replace("http", "ws") + "/ws"
        headers = {"Authorization": f"Bearer {factory.mint()}"}
        async with connect(url, additional_headers=headers) as ws:
            await ws.ping()

    asyncio.run(run())


def test_owasp_headers_corp_everywhere_and_document_policies_on_pages(runtime):
    base, factory, _ = runtime
    api = httpx.get(base + "/api/rooms", headers={"Authorization": f"Bearer {factory.mint()}"})
    page = httpx.get(base + "/")
    for response in (api, page):
        assert response.headers["cross-origin-resource-policy"] == "same-origin"
    assert page.headers["x-permitted-cross-domain-policies"] == "none"
    assert "camera=()" in page.headers["permissions-policy"]
    assert "cross-origin-embedder-policy" not in page.headers  # a setting, off by default
    assert "permissions-policy" not in api.headers


def test_coep_is_a_setting():
    from room_cloud_runtime._headers import SecurityHeaders
    from room_cloud_runtime._settings import load_settings

    assert load_settings({"QUOROOM_COEP": "true"}).coep is True

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=SecurityHeaders(app, coep=True))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await http.get("/")

    assert asyncio.run(run()).headers["cross-origin-embedder-policy"] == "require-corp"
