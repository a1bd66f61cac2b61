"""Routes the stack answers itself, the status merge, and the local-mode guard."""

from __future__ import annotations

import time

import httpx
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from room_cloud_runtime._endpoints import CloudEndpoints
from room_cloud_runtime._local import LocalGuard
from room_cloud_runtime._scope import PRINCIPAL, Principal, state_of

PRINCIPAL_ = Principal(
    subject="u1",
    role="member",
    instance_id="i1",
    session_id="s",
    token_id="j",
    expires_at=time.time() + 60,
    email="a@example.com",
    email_verified=True,
    name="Ada",
)


async def room_status(request):
    return JSONResponse({"ok": True, "rooms": 2})


async def text_status(request):
    return PlainTextResponse("fine")


def room(status=room_status):
    return Starlette(routes=[Route("/api/status", status), Route("/api/rooms", room_status)])


def with_principal(app):
    async def layer(scope, receive, send):
        if scope["type"] == "http":
            state_of(scope)[PRINCIPAL] = PRINCIPAL_
        await app(scope, receive, send)

    return layer


def caps():
    return {"issuer": "https://cp.example", "keysLoaded": True}


async def call(app, method, path, headers=None):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost:3700") as c:
        return await c.request(method, path, headers=headers)


async def test_healthz_answers_ok_without_calling_the_app() -> None:
    response = await call(CloudEndpoints(room(), capabilities=caps), "GET", "/healthz")
    assert response.status_code == 200 and response.json() == {"ok": True}


async def test_the_local_handshake_is_refused_in_cloud_mode() -> None:
    response = await call(CloudEndpoints(room(), capabilities=caps), "GET", "/api/auth/handshake")
    assert response.status_code == 403
    assert response.json()["code"] == "handshake_disabled"


async def test_anonymous_status_reports_only_the_mode_and_capabilities() -> None:
    response = await call(CloudEndpoints(room(), capabilities=caps), "GET", "/api/status")
    assert response.json() == {"deploymentMode": "cloud", "cloud": caps()}


async def test_authenticated_status_merges_the_room_status() -> None:
    app = with_principal(CloudEndpoints(room(), capabilities=caps))
    response = await call(app, "GET", "/api/status")
    body = response.json()
    assert body["ok"] is True and body["rooms"] == 2
    assert body["deploymentMode"] == "cloud" and body["cloud"]["keysLoaded"] is True
    assert int(response.headers["content-length"]) == len(response.content)


async def test_a_non_json_status_is_passed_through_unchanged() -> None:
    app = with_principal(CloudEndpoints(room(text_status), capabilities=caps))
    response = await call(app, "GET", "/api/status")
    assert response.text == "fine"


async def test_verify_answers_role_and_profile_for_the_principal() -> None:
    app = with_principal(CloudEndpoints(room(), capabilities=caps))
    response = await call(app, "GET", "/api/auth/verify")
    assert response.json() == {
        "ok": True,
        "role": "member",
        "profile": {"id": "u1", "email": "a@example.com", "emailVerified": True, "name": "Ada"},
    }


async def test_verify_without_a_principal_is_refused() -> None:
    response = await call(CloudEndpoints(room(), capabilities=caps), "GET", "/api/auth/verify")
    assert response.status_code == 401


async def test_other_paths_reach_the_app() -> None:
    response = await call(CloudEndpoints(room(), capabilities=caps), "GET", "/api/rooms")
    assert response.json() == {"ok": True, "rooms": 2}


async def test_local_mode_reports_local_in_status() -> None:
    response = await call(LocalGuard(room()), "GET", "/api/status")
    assert response.json() == {"ok": True, "rooms": 2, "deploymentMode": "local"}


async def test_local_mode_accepts_loopback_hosts_with_any_port() -> None:
    for host in ("localhost", "localhost:3700", "127.0.0.1:9", "[::1]:3700", "[::1]", "LOCALHOST"):
        response = await call(LocalGuard(room()), "GET", "/api/rooms", headers={"Host": host})
        assert response.status_code == 200, host


async def test_local_mode_refuses_a_rebound_dns_name() -> None:
    for host in (
        "evil.example",
        "evil.example:3700",
        "localhost.evil.example",
        "127.0.0.1.nip.io",
        "[::2]",
    ):
        response = await call(LocalGuard(room()), "GET", "/api/rooms", headers={"Host": host})
        assert response.status_code == 403, host
        assert response.json()["code"] == "host_not_allowed"
