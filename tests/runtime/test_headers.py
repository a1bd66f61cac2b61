"""SecurityHeaders: every response (errors and WebSocket denials included) is hardened."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from room_cloud_runtime._errors import ConfigError
from room_cloud_runtime._headers import SecurityHeaders
from room_cloud_runtime._responses import deny_websocket, send_error


async def plain(request: Request) -> Response:
    return PlainTextResponse("hello")


async def cached_api(request: Request) -> Response:
    return JSONResponse({"ok": True}, headers={"cache-control": "public, max-age=3600"})


async def own_policy(request: Request) -> Response:
    return PlainTextResponse(
        "framed by friends",
        headers={
            "content-security-policy": "default-src 'self'",
            "x-frame-options": "SAMEORIGIN",
        },
    )


def room() -> Starlette:
    return Starlette(
        routes=[
            Route("/", plain),
            Route("/api/rooms", cached_api),
            Route("/api", cached_api),
            Route("/page", own_policy),
            Route("/api/page", own_policy),
        ]
    )


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://room")


# On every response (issue 2: HSTS, nosniff, frame-ancestors, Referrer-Policy).
COMMON = {
    "strict-transport-security": "max-age=31536000; includeSubDomains",
    "x-content-type-options": "nosniff",
    "content-security-policy": "frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
}
# Documents (the UI) also get the two headers that only mean something for a rendered page.
EXPECTED = {
    **COMMON,
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
}
EXPECTED_API = {**COMMON, "cache-control": "no-store"}


async def test_every_response_gets_the_security_headers_once() -> None:
    async with client(SecurityHeaders(room())) as http:
        response = await http.get("/")
    for name, value in EXPECTED.items():
        assert response.headers.get_list(name) == [value]
    assert "cache-control" not in response.headers


async def test_api_responses_get_the_api_set_without_the_document_only_headers() -> None:
    async with client(SecurityHeaders(room())) as http:
        nested = await http.get("/api/rooms")
        bare = await http.get("/api")
    for response in (nested, bare):
        for name, value in EXPECTED_API.items():
            assert response.headers.get_list(name) == [value]
        # frame-ancestors 'none' is the framing protection here (CSP 2 supersedes
        # X-Frame-Options); the opener policy only applies to documents.
        assert "x-frame-options" not in response.headers
        assert "cross-origin-opener-policy" not in response.headers


async def test_api_responses_get_no_store_replacing_the_apps_cache_control() -> None:
    async with client(SecurityHeaders(room())) as http:
        nested = await http.get("/api/rooms")
        bare = await http.get("/api")
    for response in (nested, bare):
        assert response.headers.get_list("cache-control") == ["no-store"]


async def test_headers_the_app_set_are_kept_and_not_duplicated() -> None:
    async with client(SecurityHeaders(room())) as http:
        response = await http.get("/page")
        api = await http.get("/api/page")
    for r in (response, api):
        assert r.headers.get_list("content-security-policy") == ["default-src 'self'"]
        assert r.headers.get_list("x-frame-options") == ["SAMEORIGIN"]
        assert r.headers["x-content-type-options"] == "nosniff"
    assert api.headers.get_list("cache-control") == ["no-store"]


async def test_refusals_from_inner_layers_carry_the_headers_too() -> None:
    async def refusing(scope: Any, receive: Any, send: Any) -> None:
        await send_error(send, 401, "token required", "token_required")

    async with client(SecurityHeaders(refusing)) as http:
        response = await http.get("/api/rooms")
    assert response.status_code == 401
    assert response.json() == {"error": "token required", "code": "token_required"}
    for name, value in EXPECTED_API.items():
        assert response.headers.get_list(name) == [value]


async def test_websocket_denials_get_the_headers() -> None:
    sent: list[dict[str, Any]] = []

    async def refusing(scope: Any, receive: Any, send: Any) -> None:
        await deny_websocket(scope, send, 403, "origin not allowed", "origin_not_allowed")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/ws",
        "headers": [],
        "extensions": {"websocket.http.response": {}},
    }
    await SecurityHeaders(refusing)(scope, None, send)  # type: ignore[arg-type]
    headers = dict(sent[0]["headers"])
    assert sent[0]["type"] == "websocket.http.response.start"
    assert headers[b"x-frame-options"] == b"DENY"
    assert headers[b"referrer-policy"] == b"no-referrer"


async def test_hsts_max_age_is_configurable_and_can_be_left_out() -> None:
    async with client(SecurityHeaders(room(), hsts_max_age=600)) as http:
        short = await http.get("/")
    async with client(SecurityHeaders(room(), hsts_max_age=None)) as http:
        none = await http.get("/")
    assert short.headers["strict-transport-security"] == "max-age=600; includeSubDomains"
    assert "strict-transport-security" not in none.headers


async def test_the_app_s_header_list_is_never_mutated() -> None:
    constant = [(b"content-type", b"text/plain"), (b"content-length", b"2")]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": constant})
        await send({"type": "http.response.body", "body": b"ok"})

    async with client(SecurityHeaders(app)) as http:
        await http.get("/")
        response = await http.get("/")
    assert len(constant) == 2
    assert response.headers.get_list("x-frame-options") == ["DENY"]


async def test_lifespan_passes_straight_through() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    await SecurityHeaders(app)({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan"]


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"hsts_max_age": -1}, "hsts_max_age"),
        ({"hsts_max_age": True}, "hsts_max_age"),
        ({"hsts_max_age": "1"}, "hsts_max_age"),
        ({"api_prefix": "api/"}, "api_prefix"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SecurityHeaders(room(), **options)
    assert caught.value.setting == setting
