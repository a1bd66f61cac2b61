"""RequestLimits: header size, streamed body bytes, JSON depth and WebSocket message caps."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError

from room_cloud_runtime._errors import ConfigError
from room_cloud_runtime._limits import RequestLimits, json_too_deep

CAP = 64 * 1024

events: list[Any] = []


async def upload(request: Request) -> Response:
    body = await request.body()
    events.append(("body", len(body)))
    return JSONResponse({"received": len(body)})


async def parse(request: Request) -> Response:
    data = await request.json()
    events.append(("json", data))
    return JSONResponse({"ok": True})


async def ws_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect as exc:
        events.append(("ws_disconnect", exc.code))


def room() -> Starlette:
    return Starlette(
        routes=[
            Route("/api/upload", upload, methods=["POST"]),
            Route("/api/json", parse, methods=["POST"]),
            WebSocketRoute("/ws", ws_echo),
        ]
    )


def limited(app: Any = None, **options: Any) -> RequestLimits:
    options.setdefault("max_body_bytes", CAP)
    return RequestLimits(app if app is not None else room(), **options)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://room")


async def chunks(total: int, size: int = 8192) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        sent += piece
        yield b"x" * piece


@pytest.fixture(autouse=True)
def _reset_events() -> None:
    events.clear()


# --- headers -------------------------------------------------------------------------------


async def test_oversized_headers_are_refused_with_431() -> None:
    async with client(limited(max_header_bytes=1024)) as http:
        response = await http.post("/api/upload", headers={"x-big": "a" * 2000}, content=b"hi")
    assert response.status_code == 431
    assert response.json() == {"error": "request headers too large", "code": "headers_too_large"}
    assert events == []


# --- bodies --------------------------------------------------------------------------------


async def test_a_body_within_the_cap_reaches_the_app_whole() -> None:
    async with client(limited()) as http:
        fixed = await http.post("/api/upload", content=b"x" * CAP)
        streamed = await http.post("/api/upload", content=chunks(CAP))
    assert fixed.json() == streamed.json() == {"received": CAP}


async def test_a_content_length_over_the_cap_is_refused_before_reading() -> None:
    read = False

    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - never runs
        raise AssertionError("the app must not be called")

    async def receive() -> dict[str, Any]:
        nonlocal read
        read = True
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "path": "/api/upload",
        "headers": [(b"content-length", str(CAP + 1).encode())],
    }
    await limited(app)(scope, receive, send)
    assert sent[0]["status"] == 413
    assert (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["code"] == "body_too_large"
    assert read is False


async def test_a_chunked_body_over_the_cap_gets_413_from_starlettes_request_body() -> None:
    async with client(limited()) as http:
        response = await http.post("/api/upload", content=chunks(CAP * 4))
    assert response.status_code == 413
    assert response.json()["code"] == "body_too_large"
    assert events == []  # Request.body() raised ClientDisconnect; the app's 500 went nowhere


async def test_a_raw_asgi_reader_is_told_the_client_left_and_the_client_gets_413() -> None:
    seen: list[str] = []

    async def reader(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            seen.append(message["type"])
            if not message.get("more_body", False):
                break
        for _ in range(2):  # asking again keeps answering disconnect, never reads on
            seen.append((await receive())["type"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"too late"})

    async with client(limited(reader)) as http:
        response = await http.post("/api/upload", content=chunks(CAP * 4))
    assert response.status_code == 413
    assert seen[-3:] == ["http.disconnect"] * 3
    assert seen.count("http.request") <= CAP // 8192 + 1


async def test_a_lying_content_length_is_caught_by_counting() -> None:
    pieces = [b"x" * 8192] * 20

    async def receive() -> dict[str, Any]:
        body = pieces.pop() if pieces else b""
        return {"type": "http.request", "body": body, "more_body": bool(pieces)}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "path": "/api/upload",
        "headers": [(b"content-length", b"10"), (b"content-type", b"application/octet-stream")],
    }
    await limited()(scope, receive, send)
    assert sent[0]["status"] == 413
    assert len(sent) == 2  # our 413 only; the app's 500 was dropped


async def test_past_the_cap_after_the_response_started_the_app_just_sees_a_disconnect() -> None:
    seen: list[str] = []

    async def early_responder(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:
            message = await receive()
            seen.append(message["type"])
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        await send({"type": "http.response.body", "body": b"partial"})

    async with client(limited(early_responder)) as http:
        response = await http.post("/api/upload", content=chunks(CAP * 4))
    assert response.status_code == 200
    assert seen[-1] == "http.disconnect"


@pytest.mark.parametrize("value", ["abc", "-1", "+5", "1_0", " 5"])
async def test_an_invalid_content_length_is_refused_with_400(value: str) -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-length", value.encode())],
    }
    await limited(room())(scope, None, send)
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["code"] == "invalid_content_length"


async def test_conflicting_content_lengths_are_refused_with_400() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-length", b"5"), (b"content-length", b"6")],
    }
    await limited(room())(scope, None, send)
    assert sent[0]["status"] == 400


async def test_requests_without_a_body_get_the_servers_own_receive_and_send() -> None:
    captured: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        captured.extend([receive, send])

    async def receive() -> dict[str, Any]:  # pragma: no cover - identity only
        return {}

    async def send(message: Any) -> None:  # pragma: no cover - identity only
        pass

    scope = {"type": "http", "http_version": "1.1", "method": "GET", "path": "/", "headers": []}
    await limited(app)(scope, receive, send)
    assert captured == [receive, send]


# --- JSON depth ----------------------------------------------------------------------------


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


async def test_json_nested_deeper_than_the_limit_is_refused_with_400_not_500() -> None:
    async with client(limited(max_json_depth=32)) as http:
        deep = await http.post("/api/json", content=nested(30_000), headers=JSON)
        limit = await http.post("/api/json", content=nested(32), headers=JSON)
        over = await http.post("/api/json", content=nested(33), headers=JSON)
    assert deep.status_code == over.status_code == 400
    assert deep.json()["code"] == "json_too_deep"
    assert limit.status_code == 200
    assert len(events) == 1


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "application/vnd.api+json",
    ],
)
async def test_every_json_media_type_is_checked(content_type: str) -> None:
    async with client(limited(max_json_depth=4)) as http:
        response = await http.post(
            "/api/json", content=nested(5), headers={"content-type": content_type}
        )
    assert response.status_code == 400


async def test_a_chunked_json_body_is_checked_and_replayed_to_the_app() -> None:
    body = json.dumps({"a": [[1, 2], {"b": "[[[[[[["}], "s": '\\"{{{{{{'}).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 5):
            yield body[i : i + 5]

    async with client(limited(max_json_depth=3)) as http:
        response = await http.post("/api/json", content=pieces(), headers=JSON)
    assert response.status_code == 200
    assert events == [("json", json.loads(body))]


async def test_a_json_body_over_the_cap_is_refused_with_413() -> None:
    async with client(limited()) as http:
        response = await http.post("/api/json", content=chunks(CAP * 2), headers=JSON)
    assert response.status_code == 413
    assert events == []


async def test_malformed_json_is_left_to_the_app() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        await send({"type": "http.response.start", "status": 422, "headers": []})
        await send({"type": "http.response.body", "body": message["body"]})

    async with client(limited(app)) as http:
        response = await http.post("/api/json", content=b'{"a": [1, 2', headers=JSON)
    assert response.status_code == 422
    assert response.content == b'{"a": [1, 2'


def test_brackets_inside_strings_do_not_count() -> None:
    body = json.dumps({"text": "[" * 1000 + "{" * 1000, "esc": '\\"[[[[', "ok": [[[]]]}).encode()
    assert json_too_deep(body, 4) is False  # the object, then [[[ ]]]
    assert json_too_deep(body, 3) is True


def test_utf16_json_is_measured_on_its_characters() -> None:
    deep = ("[" * 40 + "]" * 40).encode("utf-16")
    shallow = json.dumps({"s": "\u225b" * 50, "a": [1]}).encode("utf-16-le")  # 0x5b bytes inside
    assert json_too_deep(deep, 32) is True
    assert json_too_deep(shallow, 32) is False


def test_the_depth_check_is_linear_on_hostile_input() -> None:
    hostile = [
        b'"\\"' * 300_000,  # quotes and escapes, never terminated
        b"[" * 1_000_000,
        b"[]" * 500_000,
        b'["' + b"\\" * 1_000_000,
    ]
    for body in hostile:
        started = time.perf_counter()
        json_too_deep(body, 32)
        assert time.perf_counter() - started < 1.0


# --- WebSockets and real servers -------------------------------------------------------------


@asynccontextmanager
async def serve(app: Any, **options: Any) -> AsyncIterator[int]:
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", **options
    )
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


async def test_a_websocket_message_over_the_cap_closes_with_1009() -> None:
    async with serve(limited(max_ws_message_bytes=1024)) as port:
        async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.send("small")
            assert await ws.recv() == "small"
            await ws.send("é" * 600)  # 600 characters, 1200 UTF-8 bytes
            with pytest.raises(ConnectionClosedError) as caught:
                await ws.recv()
        assert caught.value.rcvd is not None
        assert caught.value.rcvd.code == 1009
    assert events == [("ws_disconnect", 1009)]


@pytest.mark.parametrize("http", ["h11", "httptools"])
async def test_a_streamed_body_over_the_cap_gets_413_from_a_real_server(http: str) -> None:
    async with serve(limited(), http=http) as port:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client_:
            # Just over the cap: the whole upload fits in the socket buffers, so the client
            # (which reads only after sending) gets to read the 413 before the server closes.
            response = await client_.post("/api/upload", content=chunks(CAP + 8192))
    assert response.status_code == 413
    assert response.json()["code"] == "body_too_large"
    assert events == []


@pytest.mark.parametrize(("http", "status"), [("h11", b"413"), ("httptools", b"400")])
async def test_a_lying_content_length_over_a_raw_socket_never_gets_past_the_cap(
    http: str, status: bytes
) -> None:
    async with serve(limited(), http=http) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /api/upload HTTP/1.1\r\nHost: room\r\n"
            b"Content-Type: application/octet-stream\r\n"
            b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 8192
        try:
            for _ in range(CAP // 8192 * 4):
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass  # the server answered and closed while we were still sending
        status_line = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
    # h11 frames by Transfer-Encoding (the length lies) and our count answers 413; httptools
    # refuses the ambiguous framing itself with 400. Either way the app never sees the body.
    assert status_line.split()[1] == status
    assert events == []


async def test_lifespan_passes_straight_through() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    await limited(app)({"type": "lifespan"}, None, None)
    assert seen == ["lifespan"]


@pytest.mark.parametrize(
    "setting", ["max_body_bytes", "max_header_bytes", "max_json_depth", "max_ws_message_bytes"]
)
@pytest.mark.parametrize("value", [0, -1, True, "10", 1.5])
def test_bad_options_are_refused_naming_the_option(setting: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        RequestLimits(room(), **{setting: value})
    assert caught.value.setting == setting
