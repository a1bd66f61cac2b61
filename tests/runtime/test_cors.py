"""CORSGuard: exact-origin allowlist that refuses foreign origins on the API and on WebSockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from room_cloud_runtime._cors import CORSGuard, normalise_origin
from room_cloud_runtime._errors import ConfigError

APP_ORIGIN = "https://app.quoroom.ai"

calls: list[str] = []


async def rooms(request: Request) -> Response:
    calls.append(f"{request.method} {request.url.path}")
    return JSONResponse({"rooms": []})


async def asset(request: Request) -> Response:
    calls.append(f"{request.method} {request.url.path}")
    return PlainTextResponse("body{}", media_type="text/css")


async def varied(request: Request) -> Response:
    return JSONResponse({}, headers={"vary": "Accept-Encoding"})


async def permissive(request: Request) -> Response:
    return JSONResponse({}, headers={"access-control-allow-origin": "*"})


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(await websocket.receive_text())
    await websocket.close()


def room() -> Starlette:
    return Starlette(
        routes=[
            Route("/api/rooms", rooms, methods=["GET", "POST", "DELETE", "OPTIONS"]),
            Route("/api/varied", varied),
            Route("/api/permissive", permissive),
            Route("/assets/app.css", asset, methods=["GET", "POST"]),
            WebSocketRoute("/ws", echo),
            WebSocketRoute("/other-socket", echo),
        ]
    )


def guarded(**options: Any) -> CORSGuard:
    return CORSGuard(room(), allowed_origins=[APP_ORIGIN], **options)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://room")


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


async def test_an_allowed_origin_gets_its_exact_origin_echoed_with_vary() -> None:
    async with client(guarded()) as http:
        response = await http.get("/api/rooms", headers={"origin": APP_ORIGIN})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == APP_ORIGIN
    assert response.headers["vary"] == "Origin"
    assert (
        response.headers["access-control-expose-headers"]
        == "retry-after, ratelimit, ratelimit-policy"
    )
    assert "access-control-allow-credentials" not in response.headers


@pytest.mark.parametrize(
    "origin",
    [
        "null",
        "http://app.quoroom.ai",
        "https://app.quoroom.ai.evil.com",
        "https://evilapp.quoroom.ai",
        "https://evil.com/https://app.quoroom.ai",
        "https://app.quoroom.ai:8443",
        "https://APP.quoroom.ai",
        "HTTPS://app.quoroom.ai",
        "https://app.quoroom.ai.",
        "https://app.quoroom.ai/",
        "https://app.quoroom.ai, https://evil.com",
        " https://app.quoroom.ai",
        "",
    ],
)
async def test_a_foreign_origin_on_the_api_is_refused_without_calling_the_app(origin: str) -> None:
    async with client(guarded()) as http:
        response = await http.get("/api/rooms", headers={"origin": origin})
    assert response.status_code == 403
    assert response.json() == {"error": "origin not allowed", "code": "origin_not_allowed"}
    assert "access-control-allow-origin" not in response.headers
    assert response.headers["vary"] == "Origin"
    assert calls == []


async def test_a_request_without_origin_passes_and_still_varies_on_origin() -> None:
    async with client(guarded()) as http:
        api = await http.get("/api/rooms")
        asset = await http.get("/assets/app.css")
    assert api.status_code == 200
    assert api.headers["vary"] == "Origin"
    assert "access-control-allow-origin" not in api.headers
    assert asset.status_code == 200
    # An allowed origin gets CORS headers on assets too: the answer varies (issue 12, item 5).
    assert asset.headers["vary"] == "Origin"


async def test_a_foreign_origin_may_read_static_assets_but_gets_no_cors_headers() -> None:
    async with client(guarded()) as http:
        response = await http.get("/assets/app.css", headers={"origin": "https://evil.com"})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    assert calls == ["GET /assets/app.css"]


async def test_a_foreign_origin_cannot_write_even_outside_the_api() -> None:
    async with client(guarded()) as http:
        response = await http.post("/assets/app.css", headers={"origin": "https://evil.com"})
    assert response.status_code == 403
    assert response.json()["code"] == "origin_not_allowed"
    assert calls == []


async def test_vary_is_merged_into_the_apps_vary() -> None:
    async with client(guarded()) as http:
        with_origin = await http.get("/api/varied", headers={"origin": APP_ORIGIN})
        without = await http.get("/api/varied")
    for response in (with_origin, without):
        assert response.headers.get_list("vary") == ["Accept-Encoding, Origin"]


class Rewrap:
    """A pass-through layer that wraps ``send``, so CORS cannot hand its headers outward."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def wrapped(message: Any) -> None:
            await send(message)

        await self.app(scope, receive, wrapped if scope["type"] == "http" else send)


async def app_with_headers(scope: Any, receive: Any, send: Any) -> None:
    """Answers with the response headers named in the request's ``x-answer`` header."""
    raw = dict(scope["headers"]).get(b"x-answer", b"")
    headers = [
        tuple(part.strip().encode().split(b"=", 1)) for part in raw.decode().split(";") if part
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"{}"})


@pytest.mark.parametrize("path", ["/api/rooms", "/assets/app.css"])
@pytest.mark.parametrize("origin", [None, APP_ORIGIN, "https://evil.com"])
@pytest.mark.parametrize(
    "answer",
    [
        "",
        "vary=Accept-Encoding",
        "vary=origin",
        "access-control-allow-origin=*;access-control-allow-credentials=true",
        "cache-control=public;x-frame-options=SAMEORIGIN;vary=Accept",
        "content-security-policy=default-src 'self'",
    ],
)
async def test_behind_security_headers_cors_gives_the_same_headers_as_when_alone(
    path: str, origin: str | None, answer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from room_cloud_runtime._headers import SecuredSend, SecurityHeaders

    deferred: list[bool] = []
    real_defer = SecuredSend.defer

    def spy(self: SecuredSend, *args: Any) -> bool:
        deferred.append(True)
        return real_defer(self, *args)

    monkeypatch.setattr(SecuredSend, "defer", spy)

    def build(between: bool) -> Any:
        cors = CORSGuard(app_with_headers, allowed_origins=[APP_ORIGIN], allow_credentials=True)
        return SecurityHeaders(Rewrap(cors) if between else cors)

    headers = {"x-answer": answer} if origin is None else {"x-answer": answer, "origin": origin}
    results = []
    uses = []
    for between in (False, True):
        deferred.clear()
        async with client(build(between)) as http:
            response = await http.get(path, headers=headers)
        results.append((response.status_code, sorted(response.headers.multi_items())))
        uses.append(bool(deferred))
    assert results[0] == results[1]
    assert results[0][0] in (200, 403)
    # Handed outward only when nothing sits in between.
    # Every path varies on Origin now (issue 12, item 5), so every 200 adds headers.
    adds_headers = results[0][0] == 200
    assert uses == [adds_headers, False]


async def test_the_apps_own_wildcard_is_replaced_by_the_exact_origin() -> None:
    async with client(guarded()) as http:
        response = await http.get("/api/permissive", headers={"origin": APP_ORIGIN})
    assert response.headers.get_list("access-control-allow-origin") == [APP_ORIGIN]


async def test_credentials_are_announced_only_when_enabled() -> None:
    async with client(guarded(allow_credentials=True)) as http:
        response = await http.get("/api/rooms", headers={"origin": APP_ORIGIN})
    assert response.headers["access-control-allow-credentials"] == "true"


async def test_an_allowed_preflight_is_answered_here_with_204() -> None:
    async with client(guarded()) as http:
        response = await http.options(
            "/api/rooms",
            headers={
                "origin": APP_ORIGIN,
                "access-control-request-method": "DELETE",
                "access-control-request-headers": "Authorization, content-type",
            },
        )
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == APP_ORIGIN
    assert response.headers["access-control-allow-methods"] == "GET, POST, PUT, PATCH, DELETE"
    assert response.headers["access-control-allow-headers"] == "authorization, content-type"
    assert response.headers["access-control-max-age"] == "600"
    assert "Origin" in response.headers["vary"]
    assert calls == []


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "https://evil.com", "access-control-request-method": "GET"},
        {"origin": "null", "access-control-request-method": "GET"},
        {"origin": APP_ORIGIN, "access-control-request-method": "TRACE"},
        {"origin": APP_ORIGIN, "access-control-request-method": "patch"},
        {
            "origin": APP_ORIGIN,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, x-quoroom-user",
        },
    ],
)
async def test_a_preflight_outside_the_lists_is_refused_with_403(headers: dict[str, str]) -> None:
    async with client(guarded()) as http:
        response = await http.options("/api/rooms", headers=headers)
    assert response.status_code == 403
    assert response.json()["code"] == "cors_preflight_refused"
    assert "access-control-allow-origin" not in response.headers
    assert calls == []


async def test_options_without_a_request_method_is_not_a_preflight() -> None:
    async with client(guarded()) as http:
        response = await http.options("/api/rooms", headers={"origin": APP_ORIGIN})
    assert response.status_code == 200
    assert calls == ["OPTIONS /api/rooms"]


async def test_origins_are_normalised_at_construction() -> None:
    app = CORSGuard(room(), allowed_origins=["HTTPS://App.Quoroom.AI:443", "http://localhost:5173"])
    async with client(app) as http:
        default_port = await http.get("/api/rooms", headers={"origin": APP_ORIGIN})
        dev = await http.get("/api/rooms", headers={"origin": "http://localhost:5173"})
    assert default_port.headers["access-control-allow-origin"] == APP_ORIGIN
    assert dev.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert normalise_origin("http://[::1]:8080") == "http://[::1]:8080"


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"allowed_origins": ["*"]}, "allowed_origins"),
        ({"allowed_origins": ["https://*.quoroom.ai"]}, "allowed_origins"),
        ({"allowed_origins": "https://app.quoroom.ai"}, "allowed_origins"),
        ({"allowed_origins": ["null"]}, "allowed_origins"),
        ({"allowed_origins": ["https://app.quoroom.ai/path"]}, "allowed_origins"),
        ({"allowed_origins": ["https://app.quoroom.ai/"]}, "allowed_origins"),
        ({"allowed_origins": ["https://user@app.quoroom.ai"]}, "allowed_origins"),
        ({"allowed_origins": ["ftp://app.quoroom.ai"]}, "allowed_origins"),
        ({"allowed_origins": ["https://app.quoroom.ai."]}, "allowed_origins"),
        ({"allowed_origins": ["https://app.quoroom.ai:99999"]}, "allowed_origins"),
        ({"allowed_origins": ["https://bücher.example"]}, "allowed_origins"),
        ({"allowed_origins": [APP_ORIGIN], "allow_methods": ["*"]}, "allow_methods"),
        ({"allowed_origins": [APP_ORIGIN], "allow_headers": ["bad header"]}, "allow_headers"),
        ({"allowed_origins": [APP_ORIGIN], "max_age": -1}, "max_age"),
        ({"allowed_origins": [APP_ORIGIN], "allow_credentials": "yes"}, "allow_credentials"),
        ({"allowed_origins": [APP_ORIGIN], "guarded_prefixes": ["api/"]}, "guarded_prefixes"),
        ({"allowed_origins": [APP_ORIGIN], "websocket_paths": "/ws"}, "websocket_paths"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        CORSGuard(room(), **options)
    assert caught.value.setting == setting


async def test_lifespan_passes_straight_through() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    await CORSGuard(app, allowed_origins=[])({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan"]


# --- WebSockets, through a real uvicorn server -------------------------------------------------


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[int]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task


async def test_a_websocket_from_a_foreign_origin_is_refused_before_accept() -> None:
    async with serve(guarded()) as port:
        for path in ("/ws", "/other-socket"):
            with pytest.raises(InvalidStatus) as caught:
                async with connect(f"ws://127.0.0.1:{port}{path}", origin="https://evil.com"):  # type: ignore[arg-type]
                    pass
            assert caught.value.response.status_code == 403
            assert b"origin_not_allowed" in caught.value.response.body


async def test_a_websocket_from_the_allowed_origin_or_without_origin_is_accepted() -> None:
    async with serve(guarded()) as port:
        async with connect(f"ws://127.0.0.1:{port}/ws", origin=APP_ORIGIN) as ws:  # type: ignore[arg-type]
            await ws.send("hi")
            assert await ws.recv() == "hi"
        # No Origin: a non-browser client (browsers always send one); the token still guards it.
        async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"


async def test_a_websocket_denial_without_the_http_response_extension_closes_with_1008() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws", "headers": [(b"origin", b"https://evil.com")]}
    await guarded()(scope, None, send)  # type: ignore[arg-type]
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "origin_not_allowed"}]
