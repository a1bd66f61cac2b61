"""The fused pipeline answers exactly as the layers composed one inside the other (issue 13).

Every case is run twice, against ``RuntimeStack(fused=True)`` (what ``wrap()`` serves) and
``RuntimeStack(fused=False)`` (the layers as a chain), each around its own copy of a small Room
app, with the same settings, keys, tokens and a frozen limiter clock. What the client would see
is recorded at the ASGI boundary — every message's type, status, raw header list (order
included), body, WebSocket close code — and must be identical. The app records what it was
handed (headers, query, subprotocols, body) and that must be identical too.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from room_cloud_runtime._fused import FusedStack
from room_cloud_runtime._jwks import JWKSCache
from room_cloud_runtime._limiter import Limiter, build_limiter
from room_cloud_runtime._logging import JsonFormatter, JsonLinesHandler
from room_cloud_runtime._settings import RuntimeSettings
from room_cloud_runtime._stack import RuntimeStack, wrap
from tests.helpers.tokens import TokenFactory

ISSUER = "https://cp.parity.test"
INSTANCE = "inst-parity"
ORIGIN = "https://app.parity.test"
DOWN_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connection refused
FROZEN = 1_000_020.0  # a whole number of minutes: every window starts at the same place


# -- the Room -------------------------------------------------------------------------------------


class Room:
    """A tiny ASGI Room that records what it was handed and answers deterministically."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        self.seen.append(
            (
                scope["type"],
                scope["path"],
                scope.get("query_string"),
                list(scope["headers"]),
                scope.get("subprotocols"),
            )
        )
        if scope["type"] == "websocket":
            await self._websocket(receive, send)
            return
        body = b""
        if scope["method"] in ("POST", "PUT", "PATCH"):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.seen.append("disconnect")
                    return
                body += message.get("body", b"")
                if not message.get("more_body", False):
                    break
        self.seen.append(body)
        path = scope["path"]
        headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
        if path == "/api/status":
            payload = b'{"rooms":3}'
        elif path == "/api/conflicts":
            # Headers the stack owns or merges: its values must win or merge the same way.
            payload = b"{}"
            headers += [
                (b"cache-control", b"max-age=60"),
                (b"vary", b"Accept-Encoding"),
                (b"access-control-allow-origin", b"*"),
                (b"content-security-policy", b"default-src 'self'"),
            ]
        elif path.startswith("/api/"):
            payload = json.dumps({"path": path, "got": len(body)}).encode()
        else:
            payload = b"<!doctype html><title>Room</title>"
            headers = [(b"content-type", b"text/html")]
        headers.append((b"content-length", str(len(payload)).encode()))
        status = 201 if scope["method"] == "POST" else 200
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _websocket(self, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self.seen.append(("ws-disconnect", message.get("code")))
                return
            await send({"type": "websocket.send", "text": "echo:" + (message.get("text") or "")})


# -- driving a stack ------------------------------------------------------------------------------


@dataclass
class Request:
    method: str = "GET"
    path: str = "/api/rooms"
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)  # chunks; more_body on all but the last
    query: bytes = b""
    websocket: bool = False
    subprotocols: list[str] = field(default_factory=list)
    ws_messages: list[str] = field(default_factory=list)
    ws_wait: float = 0.0  # keep the socket open this long after the messages (expiry close)
    http_response_extension: bool = True


def _scope(request: Request) -> dict[str, Any]:
    raw_path = request.path.encode()
    scope: dict[str, Any] = {
        "type": "websocket" if request.websocket else "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "ws" if request.websocket else "http",
        "path": request.path,
        "raw_path": raw_path,
        "query_string": request.query,
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in request.headers],
        "client": ("203.0.113.7", 50000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }
    if request.websocket:
        scope["subprotocols"] = list(request.subprotocols)
        if request.http_response_extension:
            scope["extensions"] = {"websocket.http.response": {}}
    else:
        scope["method"] = request.method
    return scope


async def drive(app: Any, request: Request) -> list[Any]:
    """Run one request through ``app``; returns every message it sent, in order."""
    sent: list[Any] = []
    closed = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        sent.append({k: (list(v) if k == "headers" else v) for k, v in message.items()})
        if message["type"] in ("websocket.close", "websocket.http.response.body"):
            closed.set()

    if request.websocket:
        queue: list[dict[str, Any]] = [{"type": "websocket.connect"}]
        queue += [{"type": "websocket.receive", "text": text} for text in request.ws_messages]

        async def receive() -> dict[str, Any]:
            if queue:
                return queue.pop(0)
            try:
                await asyncio.wait_for(closed.wait(), timeout=request.ws_wait or 0.05)
            except TimeoutError:
                pass
            return {"type": "websocket.disconnect", "code": 1000}

    else:
        chunks = list(request.body) or [b""]

        async def receive() -> dict[str, Any]:
            if chunks:
                chunk = chunks.pop(0)
                return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
            await asyncio.sleep(0)
            return {"type": "http.disconnect"}

    await asyncio.wait_for(app(_scope(request), receive, send), timeout=10)
    return sent


# -- the two stacks -------------------------------------------------------------------------------


def _jwks(factory: TokenFactory) -> JWKSCache:
    body = json.dumps(factory.jwks()).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return JWKSCache(f"{ISSUER}/.well-known/jwks.json", client=client)


def settings(**overrides: Any) -> RuntimeSettings:
    values: dict[str, Any] = {
        "mode": "cloud",
        "instance_id": INSTANCE,
        "issuer": ISSUER,
        "allowed_origins": (ORIGIN,),
        "access_log": False,
        "max_body_bytes": 1024,
        "max_header_bytes": 4096,
        "max_json_depth": 4,
    }
    values.update(overrides)
    return RuntimeSettings(**values)


def frozen_memory() -> Limiter:
    return build_limiter("memory://", clock=lambda: FROZEN)


@dataclass
class Pair:
    fused: RuntimeStack
    layered: RuntimeStack
    rooms: tuple[Room, Room]


async def build(
    factory: TokenFactory,
    limiter: Callable[[], Limiter] = frozen_memory,
    **overrides: Any,
) -> Pair:
    rooms = (Room(), Room())
    stacks = [
        RuntimeStack(
            room, settings(**overrides), jwks=_jwks(factory), limiter=limiter(), fused=fused
        )
        for room, fused in zip(rooms, (True, False), strict=True)
    ]
    for stack in stacks:
        await stack.startup()
    return Pair(stacks[0], stacks[1], rooms)


async def same(pair: Pair, *requests: Request) -> list[list[Any]]:
    """Send ``requests`` in turn to both stacks; assert identical answers and app inputs."""
    answers = []
    for request in requests:
        fused = await drive(pair.fused, request)
        layered = await drive(pair.layered, request)
        assert fused == layered, request
        answers.append(fused)
    assert pair.rooms[0].seen == pair.rooms[1].seen
    return answers


def status(answer: list[Any]) -> int | None:
    for message in answer:
        if message["type"] in ("http.response.start", "websocket.http.response.start"):
            return int(message["status"])
        if message["type"] == "websocket.accept":
            return 101
        if message["type"] == "websocket.close":
            return int(message["code"])
    return None


@pytest.fixture
def factory() -> TokenFactory:
    return TokenFactory(ISSUER, INSTANCE)


@pytest.fixture
async def pair(factory: TokenFactory) -> Any:
    built = await build(factory)
    yield built
    await built.fused.shutdown()
    await built.layered.shutdown()


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


# -- the cases ------------------------------------------------------------------------------------


def test_wrap_serves_the_fused_pipeline(pair: Pair) -> None:
    assert isinstance(wrap(Room(), settings()).app, FusedStack)
    assert isinstance(pair.fused.app, FusedStack)
    assert not isinstance(pair.layered.app, FusedStack)
    assert pair.fused.layered is not pair.fused.app  # WebSockets go through the layers


HTTP_CASES: dict[str, Callable[[TokenFactory], list[Request]]] = {
    "owner reads": lambda f: [Request(headers=[bearer(f.mint())])],
    "owner reads, allowed origin": lambda f: [
        Request(headers=[bearer(f.mint()), ("Origin", ORIGIN)])
    ],
    "the same token twice (cached)": lambda f: [
        Request(headers=[bearer(t)]) for t in [f.mint()] * 2
    ],
    "owner creates with a JSON body": lambda f: [
        Request(
            "POST",
            headers=[
                bearer(f.mint()),
                ("Content-Type", "application/json"),
                ("Content-Length", "9"),
            ],
            body=[b'{"a": [1]}'[:9]],
        )
    ],
    "chunked body": lambda f: [
        Request(
            "POST",
            headers=[bearer(f.mint()), ("Transfer-Encoding", "chunked")],
            body=[b"x" * 100, b"y" * 100],
        )
    ],
    "app headers merged with the stack's": lambda f: [
        Request(path="/api/conflicts", headers=[bearer(f.mint()), ("Origin", ORIGIN)]),
        Request(path="/api/conflicts", headers=[bearer(f.mint())]),
    ],
    "static UI, no token": lambda f: [Request(path="/"), Request(path="/assets/app.js")],
    "static UI, foreign origin reads without CORS headers": lambda f: [
        Request(path="/", headers=[("Origin", "https://evil.test")])
    ],
    "healthz": lambda f: [Request(path="/healthz")],
    "status without and with a token": lambda f: [
        Request(path="/api/status"),
        Request(path="/api/status", headers=[bearer(f.mint())]),
        Request("POST", path="/api/status", headers=[bearer(f.mint())]),
    ],
    "verify and handshake": lambda f: [
        Request(path="/api/auth/verify", headers=[bearer(f.mint(role="member", name="M"))]),
        Request(path="/api/auth/verify"),
        Request(path="/api/auth/handshake"),
    ],
    "preflight allowed and refused": lambda f: [
        Request(
            "OPTIONS",
            headers=[
                ("Origin", ORIGIN),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "authorization, content-type"),
            ],
        ),
        Request(
            "OPTIONS",
            headers=[("Origin", ORIGIN), ("Access-Control-Request-Method", "PROPFIND")],
        ),
        Request(
            "OPTIONS",
            headers=[("Origin", "https://evil.test"), ("Access-Control-Request-Method", "GET")],
        ),
    ],
    "refused: foreign origin": lambda f: [
        Request(headers=[bearer(f.mint()), ("Origin", "https://evil.test")]),
        Request("POST", path="/upload", headers=[("Origin", "https://evil.test")]),
    ],
    "refused: no token, bad scheme, garbage, forged, expired, other instance": lambda f: [
        Request(),
        Request(headers=[("Authorization", "Basic dTpw")]),
        Request(headers=[("Authorization", "Bearer not.a.jwt")]),
        Request(headers=[bearer(f.mint()[:-4] + "AAAA")]),
        Request(headers=[bearer(f.mint(now=time.time() - 2000))]),
        Request(headers=[bearer(f.mint(instanceId="someone-else"))]),
        Request(headers=[bearer(f.mint(role="admin"))]),
    ],
    "refused by the ACL": lambda f: [
        Request("POST", headers=[bearer(f.mint(role="member"))]),
        Request(path="/api/credentials/c1", headers=[bearer(f.mint(role="member"))]),
        Request(path="/api/rooms/..%2fcredentials", headers=[bearer(f.mint())]),
        Request(path="/API/STATUS"),
        Request("POST", path="/api/decisions/d1/vote", headers=[bearer(f.mint(role="member"))]),
    ],
    "oversized header": lambda f: [Request(headers=[bearer(f.mint()), ("X-Big", "x" * 5000)])],
    "oversized body: declared, counted, and a bad length": lambda f: [
        Request("POST", headers=[bearer(f.mint()), ("Content-Length", "5000")]),
        Request(
            "POST",
            headers=[bearer(f.mint()), ("Transfer-Encoding", "chunked")],
            body=[b"x" * 800, b"y" * 800],
        ),
        Request("POST", headers=[bearer(f.mint()), ("Content-Length", "+5")]),
        Request(
            "POST", headers=[bearer(f.mint()), ("Content-Length", "5"), ("Content-Length", "6")]
        ),
    ],
    "JSON too deep": lambda f: [
        Request(
            "POST",
            headers=[
                bearer(f.mint()),
                ("Content-Type", "application/json"),
                ("Content-Length", "13"),
                ("Origin", ORIGIN),
            ],
            body=[b"[[[[[[1]]]]]]"],
        )
    ],
    "identity headers stripped": lambda f: [
        Request(headers=[bearer(f.mint()), ("X-Forwarded-Email", "a@b"), ("X_Remote_User", "x")])
    ],
}


@pytest.mark.parametrize("case", list(HTTP_CASES))
async def test_http_answers_are_identical(case: str, pair: Pair, factory: TokenFactory) -> None:
    answers = await same(pair, *HTTP_CASES[case](factory))
    assert all(status(answer) is not None for answer in answers)


async def test_the_cases_cover_what_they_claim(pair: Pair, factory: TokenFactory) -> None:
    """A guard on the table above: the refusals really are refusals, of the expected kind."""
    token = factory.mint()
    expected = {
        401: Request(),
        403: Request(headers=[bearer(token), ("Origin", "https://evil.test")]),
        413: Request("POST", headers=[bearer(token), ("Content-Length", "5000")]),
        431: Request(headers=[bearer(token), ("X-Big", "x" * 5000)]),
        400: Request(
            "POST",
            headers=[bearer(token), ("Content-Type", "application/json"), ("Content-Length", "9")],
            body=[b"[" * 9],
        ),
    }
    for code, request in expected.items():
        assert status((await same(pair, request))[0]) == code


@pytest.mark.parametrize("limit", ["address_limit", "read_limit", "write_limit"])
async def test_limited_answers_are_identical(limit: str, factory: TokenFactory) -> None:
    pair = await build(factory, **{limit: "2/minute"})
    try:
        method = "POST" if limit == "write_limit" else "GET"
        request = Request(method, headers=[bearer(factory.mint())])
        answers = await same(pair, request, request, request)
        assert [status(a) for a in answers][-1] == 429
    finally:
        await pair.fused.shutdown()
        await pair.layered.shutdown()


@pytest.mark.parametrize("mode", ["local", "open", "closed"])
async def test_redis_down_answers_are_identical(mode: str, factory: TokenFactory) -> None:
    def down() -> Limiter:
        return build_limiter(DOWN_REDIS, on_storage_error=mode, clock=lambda: FROZEN)  # type: ignore[arg-type]

    pair = await build(factory, limiter=down, address_limit="2/minute")
    try:
        token = factory.mint()
        requests = [
            Request(headers=[bearer(token)]),
            Request(headers=[bearer(token)]),
            Request(headers=[bearer(token)]),
            Request(path="/healthz"),
            Request(
                websocket=True, path="/ws", subprotocols=["quoroom", f"quoroom.bearer.{token}"]
            ),
        ]
        answers = await same(pair, *requests)
        statuses = [status(a) for a in answers]
        assert statuses[3] == 200  # health checks are never limited
        if mode == "closed":
            assert statuses[0] == 503
        elif mode == "open":
            assert statuses[:3] == [200, 200, 200]
        else:
            assert statuses[:3] == [200, 200, 429]
    finally:
        await pair.fused.shutdown()
        await pair.layered.shutdown()


WS_CASES: dict[str, Callable[[TokenFactory], Request]] = {
    "accepted by subprotocol": lambda f: Request(
        websocket=True,
        path="/ws",
        subprotocols=["quoroom", f"quoroom.bearer.{f.mint(role='member')}"],
        ws_messages=["hi"],
    ),
    "accepted by query token": lambda f: Request(
        websocket=True, path="/ws", query=f"token={f.mint()}&x=1".encode(), ws_messages=["q"]
    ),
    "refused without a token": lambda f: Request(websocket=True, path="/ws"),
    "refused without a token, no HTTP-response extension": lambda f: Request(
        websocket=True, path="/ws", http_response_extension=False
    ),
    "refused: foreign origin": lambda f: Request(
        websocket=True,
        path="/ws",
        headers=[("Origin", "https://evil.test")],
        subprotocols=[f"quoroom.bearer.{f.mint()}"],
    ),
    "refused: expired token": lambda f: Request(
        websocket=True, path="/ws", query=f"token={f.mint(now=time.time() - 2000)}".encode()
    ),
    "closed at token expiry": lambda f: Request(
        websocket=True,
        path="/ws",
        # Expires in 0.3 s, inside the verifier's leeway: accepted, then closed with 4401.
        query=f"token={f.mint(ttl=300, now=time.time() - 299.7)}".encode(),
        ws_wait=3.0,
    ),
    "oversized message": lambda f: Request(
        websocket=True,
        path="/ws",
        subprotocols=[f"quoroom.bearer.{f.mint()}"],
        ws_messages=["x" * (2 * 1024 * 1024)],
    ),
}


@pytest.mark.parametrize("case", list(WS_CASES))
async def test_websocket_answers_are_identical(
    case: str, pair: Pair, factory: TokenFactory
) -> None:
    request = WS_CASES[case](factory)
    (answer,) = await same(pair, request)
    if case == "closed at token expiry":
        assert answer[-1]["type"] == "websocket.close" and answer[-1]["code"] == 4401


async def test_access_log_lines_are_identical(
    factory: TokenFactory, caplog: pytest.LogCaptureFixture
) -> None:
    pair = await build(factory, access_log=True)
    try:
        token = factory.mint(sub="logged")
        lines: list[list[tuple[Any, ...]]] = []
        for app in (pair.fused, pair.layered):
            caplog.clear()
            with caplog.at_level("INFO", logger="room_cloud_runtime.access"):
                for request in (
                    Request(headers=[bearer(token)]),
                    Request(),
                    Request(path="/"),
                    Request(websocket=True, path="/ws", subprotocols=[f"quoroom.bearer.{token}"]),
                ):
                    await drive(app, request)
            lines.append(
                [
                    (r.method, r.path, r.status, r.client, r.sub)  # type: ignore[attr-defined]
                    for r in caplog.records
                    if r.name == "room_cloud_runtime.access"
                ]
            )
        assert lines[0] == lines[1]
        assert [line[2] for line in lines[0]] == [200, 401, 200, 101]
    finally:
        await pair.fused.shutdown()
        await pair.layered.shutdown()


async def test_only_verified_tokens_enter_the_fused_token_memo(
    pair: Pair, factory: TokenFactory
) -> None:
    fused = pair.fused.app
    assert isinstance(fused, FusedStack)
    good = factory.mint()
    for value in ("Bearer " + factory.mint()[:-4] + "AAAA", "Bearer garbage", "Basic dTpw"):
        await drive(pair.fused, Request(headers=[("Authorization", value)]))
    await drive(pair.fused, Request(headers=[bearer(good)]))
    assert list(fused._tokens) == [f"Bearer {good}".encode()]


async def test_a_stacks_shutdown_writes_the_access_lines_still_pending(
    factory: TokenFactory,
) -> None:
    pair = await build(factory, access_log=True)
    stream = io.StringIO()
    handler = JsonLinesHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger(f"test.stack-access.{uuid.uuid4().hex}")
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        assert pair.fused.access_log is not None
        pair.fused.access_log.lines.logger = log
        await drive(pair.fused, Request(headers=[bearer(factory.mint(sub="late"))]))
        assert stream.getvalue() == ""  # batched: written within FLUSH_SECONDS
    finally:
        await pair.fused.shutdown()
        await pair.layered.shutdown()
    entry = json.loads(stream.getvalue())
    assert (entry["status"], entry["sub"]) == (200, "late")
