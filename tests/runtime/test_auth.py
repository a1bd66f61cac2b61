"""The auth layer: where tokens are read from, what reaches the app, and WebSocket expiry."""

from __future__ import annotations

import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from room_cloud_runtime._auth import WS_CLOSE_TOKEN_EXPIRED, Authenticate, _take_websocket_token
from room_cloud_runtime._errors import KeysUnavailableError, TokenError
from room_cloud_runtime._scope import Principal, principal_of

GOOD = "good.token.sig"


class FakeVerifier:
    def __init__(self, ttl: float = 300, fail: Exception | None = None) -> None:
        self.ttl = ttl
        self.fail = fail
        self.seen: list[str] = []

    async def verify(self, token: str) -> Principal:
        self.seen.append(token)
        if self.fail is not None:
            raise self.fail
        if token != GOOD:
            raise TokenError("bad_signature", "token signature is invalid")
        return Principal(
            subject="user-1",
            role="owner",
            instance_id="inst-1",
            session_id="s1",
            token_id="j1",
            expires_at=time.time() + self.ttl,
        )


async def whoami(request: Request) -> JSONResponse:
    principal = principal_of(request.scope)
    return JSONResponse(
        {
            "sub": principal.subject if principal else None,
            "query": request.url.query,
            "protocols": request.scope.get("subprotocols"),
        }
    )


async def ws_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    principal = principal_of(websocket.scope)
    await websocket.send_json(
        {
            "sub": principal.subject if principal else None,
            "query": websocket.scope["query_string"].decode(),
            "protocols": websocket.scope.get("subprotocols"),
        }
    )
    try:
        while True:
            await websocket.receive_text()
    except WebSocketDisconnect:
        pass


def make_app(verifier: FakeVerifier) -> Authenticate:
    inner = Starlette(
        routes=[
            Route("/api/whoami", whoami),
            Route("/api/status", whoami),
            Route("/assets/app.js", whoami),
            WebSocketRoute("/ws", ws_echo),
        ]
    )
    return Authenticate(inner, verifier=verifier)


async def get(app, path: str, **kwargs) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return await c.get(path, **kwargs)


async def test_a_bearer_token_puts_the_principal_in_scope() -> None:
    response = await get(
        make_app(FakeVerifier()), "/api/whoami", headers={"Authorization": f"Bearer {GOOD}"}
    )
    assert response.status_code == 200
    assert response.json()["sub"] == "user-1"


async def test_the_bearer_scheme_is_case_insensitive() -> None:
    response = await get(
        make_app(FakeVerifier()), "/api/whoami", headers={"Authorization": f"bearer {GOOD}"}
    )
    assert response.status_code == 200


async def test_an_api_request_without_a_token_is_refused_with_401_json() -> None:
    response = await get(make_app(FakeVerifier()), "/api/whoami")
    assert response.status_code == 401
    assert response.json() == {"error": "authentication required", "code": "missing_token"}
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_a_basic_authorization_header_is_not_a_token() -> None:
    response = await get(
        make_app(FakeVerifier()), "/api/whoami", headers={"Authorization": "Basic Zm9vOmJhcg=="}
    )
    assert response.json()["code"] == "missing_token"


async def test_a_query_token_is_not_accepted_on_plain_http() -> None:
    verifier = FakeVerifier()
    response = await get(make_app(verifier), f"/api/whoami?token={GOOD}")
    assert response.status_code == 401
    assert verifier.seen == []


async def test_a_refused_token_answers_with_the_verifier_code() -> None:
    response = await get(
        make_app(FakeVerifier()), "/api/whoami", headers={"Authorization": "Bearer forged.x.y"}
    )
    assert response.status_code == 401
    assert response.json()["code"] == "bad_signature"
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


async def test_unavailable_keys_fail_closed_with_503() -> None:
    app = make_app(FakeVerifier(fail=KeysUnavailableError("no keys")))
    response = await get(app, "/api/whoami", headers={"Authorization": f"Bearer {GOOD}"})
    assert response.status_code == 503
    assert response.json()["code"] == "keys_unavailable"
    assert response.headers["retry-after"] == "5"


async def test_static_assets_and_public_status_need_no_token() -> None:
    app = make_app(FakeVerifier())
    assert (await get(app, "/assets/app.js")).status_code == 200
    status = await get(app, "/api/status")
    assert status.status_code == 200 and status.json()["sub"] is None


async def test_a_bad_token_on_a_public_path_is_still_refused() -> None:
    response = await get(
        make_app(FakeVerifier()), "/api/status", headers={"Authorization": "Bearer bad"}
    )
    assert response.status_code == 401


def test_a_websocket_token_in_the_subprotocol_is_removed_before_the_app() -> None:
    with TestClient(make_app(FakeVerifier())) as client:
        with client.websocket_connect(
            "/ws", subprotocols=["quoroom", f"quoroom.bearer.{GOOD}"]
        ) as ws:
            hello = ws.receive_json()
            assert ws.accepted_subprotocol == "quoroom"
    assert hello["sub"] == "user-1"
    assert hello["protocols"] == ["quoroom"]


def test_a_websocket_query_token_is_removed_before_the_app() -> None:
    with TestClient(make_app(FakeVerifier())) as client:
        with client.websocket_connect(f"/ws?room=r1&token={GOOD}") as ws:
            hello = ws.receive_json()
    assert hello["sub"] == "user-1"
    assert hello["query"] == "room=r1"


def test_a_websocket_without_a_token_is_refused_before_accept() -> None:
    with TestClient(make_app(FakeVerifier())) as client:
        with pytest.raises(WebSocketDenialResponse) as info:
            with client.websocket_connect("/ws"):
                pass
    assert info.value.status_code == 401
    assert info.value.json()["code"] == "missing_token"


def test_a_websocket_with_a_bad_token_is_refused_before_accept() -> None:
    with TestClient(make_app(FakeVerifier())) as client:
        with pytest.raises(WebSocketDenialResponse) as info:
            with client.websocket_connect("/ws", subprotocols=["quoroom", "quoroom.bearer.forged"]):
                pass
    assert info.value.status_code == 401
    assert info.value.json()["code"] == "bad_signature"


def test_a_websocket_is_closed_when_its_token_expires() -> None:
    with TestClient(make_app(FakeVerifier(ttl=0.3))) as client:
        with client.websocket_connect(f"/ws?token={GOOD}") as ws:
            ws.receive_json()
            started = time.monotonic()
            message = ws.receive()
            elapsed = time.monotonic() - started
    assert message["type"] == "websocket.close"
    assert message["code"] == WS_CLOSE_TOKEN_EXPIRED
    assert elapsed < 2


def test_take_websocket_token_prefers_the_subprotocol_and_strips_both() -> None:
    scope = {
        "type": "websocket",
        "path": "/ws",
        "subprotocols": ["quoroom", "quoroom.bearer.A"],
        "query_string": b"token=B&x=1",
        "headers": [(b"sec-websocket-protocol", b"quoroom, quoroom.bearer.A")],
    }
    new, token, via_protocol = _take_websocket_token(scope)
    assert token == "A" and via_protocol
    assert new["query_string"] == b"x=1"
    assert new["headers"] == [(b"sec-websocket-protocol", b"quoroom")]
    assert b"quoroom.bearer" not in repr(new).encode()


async def test_lifespan_passes_through() -> None:
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    await Authenticate(app, verifier=FakeVerifier())({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan"]
