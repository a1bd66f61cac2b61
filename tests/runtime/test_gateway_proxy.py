"""Gateway mode against upstreams that misbehave on purpose: real servers on loopback (an ASGI
app under uvicorn, or a raw socket server for answers no framework would give), the gateway under
a real uvicorn, real HTTP and WebSocket clients. The real Room is in test_gateway_real_room.py."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import jwt
import pytest
import websockets
from websockets.asyncio.client import connect

from room_cloud_runtime._errors import ConfigError
from room_cloud_runtime._gateway import (
    GatewaySettings,
    build_gateway,
    load_gateway_settings,
    room_environment,
)
from room_cloud_runtime._settings import RuntimeSettings
from room_cloud_runtime._upstream_identity import ANONYMOUS_SOURCE, SourceAddresses
from room_cloud_runtime.cli import main as cli_main
from room_cloud_runtime.cli import server_options
from tests.helpers.jwks_server import JWKSServer
from tests.helpers.live_server import live_server
from tests.helpers.tokens import TokenFactory

INSTANCE = "inst-gw"
ORIGIN = "https://room.quoroom.test"
SECRET = "s" * 40


class Recorder:
    """An upstream Room stand-in that records what reached it and answers by path."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.closed_early = threading.Event()
        self.ws_closes: list[int] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        path = scope["path"]
        record = {
            "method": scope["method"],
            "path": path,
            "query": scope["query_string"].decode(),
            "headers": [(k.decode(), v.decode()) for k, v in scope["headers"]],
            "client": scope["client"][0],
        }
        self.requests.append(record)
        if path == "/upload":
            digest, size = hashlib.sha256(), 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.closed_early.set()
                    return
                digest.update(message.get("body", b""))
                size += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
            body = f'{{"size":{size},"sha256":"{digest.hexdigest()}"}}'.encode()
            await _send(send, 200, body)
        elif path == "/download":
            size = int(dict(x.split("=") for x in record["query"].split("&"))["mb"]) << 20
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")],
                }
            )
            chunk = b"x" * 65536
            for _ in range(size // len(chunk)):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        elif path == "/endless":
            # uvicorn drops sends to a gone client silently: only receive() tells.
            await receive()  # the (empty) request body
            await send({"type": "http.response.start", "status": 200, "headers": []})
            gone = asyncio.ensure_future(receive())
            while not gone.done():
                await send({"type": "http.response.body", "body": b"y" * 65536, "more_body": True})
                await asyncio.sleep(0.01)
            self.closed_early.set()
        else:
            await _send(
                send,
                200,
                b'{"ok":true}',
                [
                    (b"referrer-policy", b"strict-origin-when-cross-origin"),
                    (b"access-control-allow-origin", b"*"),
                    (b"x-room", b"1"),
                ],
            )

    async def _websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.requests.append(
            {"path": scope["path"], "query": scope["query_string"].decode(), "ws": True}
        )
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self.ws_closes.append(message.get("code", 0))
                return
            text = message.get("text")
            if text == "close-me":
                await send({"type": "websocket.close", "code": 4123, "reason": "room says bye"})
                return
            if text is not None:
                await send({"type": "websocket.send", "text": "echo:" + text})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"][::-1]})


async def _send(send: Any, status: int, body: bytes, headers: list | None = None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


@contextmanager
def raw_upstream(handler: Callable[[socket.socket], None]) -> Iterator[str]:
    """A TCP server on loopback whose connections ``handler`` answers by hand (byte level)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    stop = threading.Event()

    def loop() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            threading.Thread(target=_guarded, args=(handler, conn), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(2)
        server.close()


def _guarded(handler: Callable[[socket.socket], None], conn: socket.socket) -> None:
    """Run a raw handler; the gateway hanging up on it (its point, often) is no error."""
    with conn:
        try:
            handler(conn)
        except OSError:
            pass


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def cloud_settings(issuer: str, **overrides: Any) -> RuntimeSettings:
    values: dict[str, Any] = {
        "mode": "cloud",
        "instance_id": INSTANCE,
        "issuer": issuer,
        "allowed_origins": (ORIGIN,),
        "access_log": False,
    }
    values.update(overrides)
    return RuntimeSettings(**values)


@pytest.fixture
def tokens() -> Iterator[tuple[JWKSServer, TokenFactory]]:
    with JWKSServer() as server:
        factory = TokenFactory(server.issuer, INSTANCE)
        server.jwks = factory.jwks()
        yield server, factory


@contextmanager
def gateway(
    issuer: str, upstream: str, *, read_timeout: float = 5.0, **overrides: Any
) -> Iterator[str]:
    settings = cloud_settings(issuer, **overrides)
    stack, _ = build_gateway(
        settings,
        GatewaySettings(upstream=upstream, secret=SECRET, read_timeout_seconds=read_timeout),
    )
    with live_server(stack, **server_options(settings)) as base:
        yield base


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, str]]:
    app = Recorder()
    with live_server(app) as base:
        yield app, base


@pytest.fixture
def through(tokens, recorder) -> Iterator[tuple[str, TokenFactory, Recorder]]:
    server, factory = tokens
    app, upstream = recorder
    with gateway(server.issuer, upstream, max_body_bytes=64 << 20) as base:
        yield base, factory, app


# -- identity ----------------------------------------------------------------------------------


def test_the_room_gets_its_own_hs256_token_for_the_same_principal_and_never_the_clients(through):
    base, factory, app = through
    token = factory.mint(role="member", sub="user-7", email="m@example.com", name="Mia", ttl=120)
    response = httpx.get(
        f"{base}/api/rooms?x=1&token=leak", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200
    seen = app.requests[-1]
    assert "token" not in seen["query"] and seen["query"] == "x=1"
    auth = [v for k, v in seen["headers"] if k == "authorization"]
    assert len(auth) == 1 and token not in auth[0]
    upstream_token = auth[0].removeprefix("Bearer ")
    claims = jwt.decode(upstream_token, SECRET, algorithms=["HS256"], audience="quoroom-runtime")
    original = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == "quoroom-cloud"
    assert (claims["sub"], claims["role"], claims["instanceId"]) == ("user-7", "member", INSTANCE)
    assert (claims["email"], claims["name"], claims["emailVerified"]) == (
        "m@example.com",
        "Mia",
        True,
    )
    assert claims["exp"] <= original["exp"]


def test_an_hs256_token_from_a_client_is_refused_before_the_room(through):
    base, _, app = through
    forged = jwt.encode(
        {
            "iss": "quoroom-cloud",
            "aud": "quoroom-runtime",
            "sub": "x",
            "instanceId": INSTANCE,
            "role": "owner",
            "exp": int(time.time()) + 60,
        },
        SECRET,
        algorithm="HS256",
    )
    response = httpx.get(f"{base}/api/rooms", headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401
    assert app.requests == []


def test_each_user_reaches_the_room_from_a_loopback_address_of_their_own_never_127_0_0_1(through):
    base, factory, app = through
    for sub in ("alice", "bob", "alice"):
        token = factory.mint(sub=sub)
        assert (
            httpx.get(f"{base}/api/rooms", headers={"Authorization": f"Bearer {token}"}).status_code
            == 200
        )
    httpx.get(f"{base}/index.html")
    clients = [r["client"] for r in app.requests]
    assert clients[0] == clients[2] != clients[1]
    assert clients[3] == ANONYMOUS_SOURCE
    assert all(c.startswith("127.77.") for c in clients)


def test_source_addresses_are_unique_per_user_and_bounded():
    sources = SourceAddresses(capacity=3)
    a, b, c = (sources.for_subject(s) for s in "abc")
    assert len({a, b, c, ANONYMOUS_SOURCE}) == 4
    assert sources.for_subject("a") == a  # "a" is now the most recent
    d = sources.for_subject("d")  # takes the least recently seen address, b's
    assert d == b and sources.for_subject(None) == ANONYMOUS_SOURCE


# -- headers -----------------------------------------------------------------------------------


def test_hop_by_hop_and_forwarding_headers_from_the_client_never_reach_the_room(through):
    base, factory, app = through
    token = factory.mint()
    headers = {
        "Authorization": f"Bearer {token}",
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Proto": "https",
        "Forwarded": "for=6.6.6.6",
        "X-Real-IP": "6.6.6.6",
        "X_Forwarded_Email": "boss@example.com",
        "Fly-Client-IP": "6.6.6.6",
    }
    assert httpx.get(f"{base}/api/rooms", headers=headers).status_code == 200
    seen = dict(app.requests[-1]["headers"])
    for name in (
        "x-secret-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "x-real-ip",
        "x_forwarded_email",
        "x-forwarded-email",
        "fly-client-ip",
    ):
        assert name not in seen, name
    assert "6.6.6.6" not in str(app.requests[-1]["headers"])
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["forwarded"].startswith("for=127.0.0.1;proto=http")
    assert seen["x-forwarded-host"] == seen["host"] == base.split("//")[1]


def test_the_stack_owns_cors_and_referrer_policy_on_the_rooms_answers(through):
    base, factory, _ = through
    token = factory.mint()
    response = httpx.get(
        f"{base}/api/rooms", headers={"Authorization": f"Bearer {token}", "Origin": ORIGIN}
    )
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert response.headers.get_list("access-control-allow-origin") == [ORIGIN]
    assert response.headers["x-room"] == "1"
    page = httpx.get(f"{base}/?token=launch")
    assert page.headers["referrer-policy"] == "no-referrer"


# -- bodies ------------------------------------------------------------------------------------


def test_a_large_upload_streams_through_whole(through):
    base, factory, _ = through
    token = factory.mint()
    payload = bytes(range(256)) * (40 * 4096)  # 40 MiB

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 1 << 20):
            yield payload[i : i + (1 << 20)]

    response = httpx.post(
        f"{base}/upload", headers={"Authorization": f"Bearer {token}"}, content=chunks(), timeout=60
    )
    assert response.status_code == 200
    assert response.json() == {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def test_a_large_download_streams_through_whole(through):
    base, _, _ = through
    size = 0
    with httpx.stream("GET", f"{base}/download?mb=64", timeout=60) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            size += len(chunk)
    assert size == 64 << 20


def test_an_upload_over_the_body_limit_gets_413_and_the_upstream_request_is_dropped(
    tokens, recorder
):
    server, factory = tokens
    app, upstream = recorder
    with gateway(server.issuer, upstream, max_body_bytes=1 << 20) as base:

        def chunks() -> Iterator[bytes]:
            for _ in range(8):
                yield b"z" * (512 * 1024)

        response = httpx.post(
            f"{base}/upload",
            headers={"Authorization": f"Bearer {factory.mint()}"},
            content=chunks(),
        )
        assert response.status_code == 413
        assert response.json()["code"] == "body_too_large"
        assert app.closed_early.wait(5)


def test_a_client_gone_mid_download_cancels_the_upstream_request(through):
    base, _, app = through
    with httpx.stream("GET", f"{base}/endless", timeout=10) as response:
        for i, _ in enumerate(response.iter_raw()):
            if i > 5:
                break
    assert app.closed_early.wait(5)


# -- upstream failures -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_room_down_answers_503_with_retry_after_and_healthz_says_room_down(tokens):
    server, factory = tokens
    with gateway(server.issuer, f"http://127.0.0.1:{_free_port()}") as base:
        response = httpx.get(
            f"{base}/api/rooms", headers={"Authorization": f"Bearer {factory.mint()}"}
        )
        assert response.status_code == 503
        assert response.json()["code"] == "upstream_unavailable"
        assert response.headers["retry-after"]
        health = httpx.get(f"{base}/healthz")
        assert health.status_code == 503
        assert health.json() == {
            "ok": False,
            "gateway": "up",
            "room": "down",
            "error": "the Room is not up",
            "code": "room_down",
        }


def test_healthz_is_200_when_the_room_answers(tokens, recorder):
    server, _ = tokens
    _, upstream = recorder
    with gateway(server.issuer, upstream) as base:
        assert httpx.get(f"{base}/healthz").json() == {"ok": True, "gateway": "up", "room": "up"}


def test_an_upstream_that_answers_garbage_gives_502(tokens):
    server, factory = tokens

    def garbage(conn: socket.socket) -> None:
        _read_request(conn)
        conn.sendall(b"SMTP ready, not HTTP at all\r\n\r\n")
        conn.close()

    with raw_upstream(garbage) as upstream, gateway(server.issuer, upstream) as base:
        response = httpx.get(
            f"{base}/api/rooms", headers={"Authorization": f"Bearer {factory.mint()}"}
        )
        assert response.status_code == 502
        assert response.json()["code"] == "upstream_error"


def test_an_upstream_with_oversized_headers_gives_502(tokens):
    server, factory = tokens

    def huge(conn: socket.socket) -> None:
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        conn.close()

    with raw_upstream(huge) as upstream, gateway(server.issuer, upstream) as base:
        response = httpx.get(
            f"{base}/api/rooms", headers={"Authorization": f"Bearer {factory.mint()}"}
        )
        assert response.status_code == 502


def test_a_slow_upstream_gives_504(tokens):
    server, factory = tokens

    def slow(conn: socket.socket) -> None:
        _read_request(conn)
        time.sleep(3)
        conn.close()

    with raw_upstream(slow) as upstream, gateway(server.issuer, upstream, read_timeout=0.5) as base:
        started = time.monotonic()
        response = httpx.get(
            f"{base}/api/rooms", headers={"Authorization": f"Bearer {factory.mint()}"}
        )
        assert response.status_code == 504
        assert response.json()["code"] == "upstream_timeout"
        assert time.monotonic() - started < 2.5


def test_a_body_that_never_ends_is_cut_off_and_never_looks_complete(tokens):
    server, _ = tokens

    def stalls(conn: socket.socket) -> None:
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"a" * 70000)
        time.sleep(3)
        conn.close()

    with (
        raw_upstream(stalls) as upstream,
        gateway(server.issuer, upstream, read_timeout=0.5) as base,
    ):
        with pytest.raises(httpx.RemoteProtocolError):
            with httpx.stream("GET", f"{base}/big", timeout=5) as response:
                assert response.status_code == 200
                for _ in response.iter_raw():
                    pass


# -- WebSocket ---------------------------------------------------------------------------------


def test_websocket_relays_both_ways_with_the_rooms_token_in_the_query(through):
    base, factory, app = through
    token = factory.mint(sub="ws-user", ttl=120)

    async def run() -> None:
        url = base.replace("http", "ws") + f"/ws?token={token}&room=1"
        async with connect(url, additional_headers={"Origin": ORIGIN}) as ws:
            await ws.send("hi")
            assert await ws.recv() == "echo:hi"
            await ws.send(b"\x01\x02\x03")
            assert await ws.recv() == b"\x03\x02\x01"
            await ws.close(code=4000, reason="client bye")
        await asyncio.sleep(0.3)

    asyncio.run(run())
    seen = [r for r in app.requests if r.get("ws")][-1]
    query = dict(x.split("=", 1) for x in seen["query"].split("&"))
    assert query["room"] == "1" and query["token"] != token
    claims = jwt.decode(query["token"], SECRET, algorithms=["HS256"], audience="quoroom-runtime")
    assert claims["sub"] == "ws-user"
    assert app.ws_closes[-1] == 4000


def test_the_rooms_close_code_and_reason_reach_the_client(through):
    base, factory, _ = through

    async def run() -> tuple[int | None, str | None]:
        url = base.replace("http", "ws") + f"/ws?token={factory.mint()}"
        async with connect(url) as ws:
            await ws.send("close-me")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return closed.value.rcvd.code, closed.value.rcvd.reason  # type: ignore[union-attr]

    assert asyncio.run(run()) == (4123, "room says bye")


def test_a_websocket_is_closed_with_4401_when_its_token_expires(through):
    base, factory, app = through

    async def run() -> int | None:
        url = base.replace("http", "ws") + f"/ws?token={factory.mint(ttl=1.5)}"
        async with connect(url) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            return closed.value.rcvd.code  # type: ignore[union-attr]

    assert asyncio.run(run()) == 4401
    time.sleep(0.3)
    assert app.ws_closes  # the Room's side was closed too


def test_a_websocket_without_a_token_never_reaches_the_room(through):
    base, _, app = through

    async def run() -> None:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(base.replace("http", "ws") + "/ws"):
                pass
        assert refused.value.response.status_code == 401

    asyncio.run(run())
    assert not [r for r in app.requests if r.get("ws")]


def test_a_websocket_to_a_room_that_is_down_is_refused_with_503(tokens):
    server, factory = tokens
    with gateway(server.issuer, f"http://127.0.0.1:{_free_port()}") as base:

        async def run() -> None:
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with connect(base.replace("http", "ws") + f"/ws?token={factory.mint()}"):
                    pass
            assert refused.value.response.status_code == 503

        asyncio.run(run())


# -- routes the gateway never forwards ---------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/server/restart", "/api/server/update-restart"])
@pytest.mark.parametrize("role", ["owner", "member", None])
def test_the_rooms_loopback_only_routes_are_refused_to_everyone(through, path, role):
    base, factory, app = through
    headers = {"Authorization": f"Bearer {factory.mint(role=role)}"} if role else {}
    response = httpx.post(base + path, headers=headers)
    assert response.status_code in (401, 403)
    assert app.requests == []


def test_query_token_routes_of_the_room_are_authenticated_from_the_query(through):
    base, factory, app = through
    token = factory.mint()
    assert httpx.get(f"{base}/api/rooms/1/onramp-redirect").status_code == 401
    response = httpx.get(f"{base}/api/rooms/1/onramp-redirect?token={token}&x=2")
    assert response.status_code == 200
    seen = app.requests[-1]
    assert seen["query"] == "x=2"
    assert dict(seen["headers"])["authorization"].startswith("Bearer ")
    # Elsewhere a query token is not a credential.
    assert httpx.get(f"{base}/api/rooms?token={token}").status_code == 401


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "upstream",
    [
        "https://127.0.0.1:3700",
        "http://10.0.0.1:3700",
        "http://localhost:3700",
        "http://[::1]:3700",
        "http://127.0.0.1",
        "http://127.0.0.1:3700/api",
        "http://user@127.0.0.1:3700",
        "not a url",
    ],
)
def test_an_upstream_that_is_not_plain_http_on_ipv4_loopback_is_refused(upstream):
    with pytest.raises(ConfigError) as refused:
        GatewaySettings(upstream=upstream, secret=SECRET)
    assert refused.value.setting == "--upstream"


def test_a_short_upstream_secret_is_refused_and_none_means_a_fresh_one_per_boot():
    with pytest.raises(ConfigError) as refused:
        load_gateway_settings(
            "http://127.0.0.1:3700", environ={"QUOROOM_GATEWAY_UPSTREAM_SECRET": "short"}
        )
    assert refused.value.setting == "QUOROOM_GATEWAY_UPSTREAM_SECRET"
    one = load_gateway_settings("http://127.0.0.1:3700", environ={})
    two = load_gateway_settings("http://127.0.0.1:3700", environ={})
    assert one.secret != two.secret and len(one.secret) >= 32
    assert SECRET not in repr(
        load_gateway_settings(
            "http://127.0.0.1:1", environ={"QUOROOM_GATEWAY_UPSTREAM_SECRET": SECRET}
        )
    )


def test_the_room_gets_cloud_mode_the_secret_and_loopback_but_not_the_secret_setting():
    settings = cloud_settings("https://cp.example")
    gw = GatewaySettings(upstream="http://127.0.0.1:3700", secret=SECRET)
    env = room_environment(settings, gw, {"HOME": "/h", "QUOROOM_GATEWAY_UPSTREAM_SECRET": SECRET})
    assert env["QUOROOM_DEPLOYMENT_MODE"] == "cloud"
    assert env["QUOROOM_CLOUD_JWT_SECRET"] == SECRET
    assert env["QUOROOM_CLOUD_INSTANCE_ID"] == INSTANCE
    assert env["QUOROOM_BIND_HOST"] == "127.0.0.1"
    assert env["QUOROOM_ALLOWED_ORIGINS"] == ORIGIN
    assert env["HOME"] == "/h" and "QUOROOM_GATEWAY_UPSTREAM_SECRET" not in env


def test_gateway_mode_needs_cloud_mode():
    with pytest.raises(ConfigError) as refused:
        build_gateway(
            RuntimeSettings(), GatewaySettings(upstream="http://127.0.0.1:1", secret=SECRET)
        )
    assert refused.value.setting == "QUOROOM_DEPLOYMENT_MODE"


def test_the_cli_exits_2_naming_a_bad_upstream(monkeypatch, capsys):
    monkeypatch.setenv("QUOROOM_DEPLOYMENT_MODE", "cloud")
    monkeypatch.setenv("QUOROOM_CLOUD_INSTANCE_ID", INSTANCE)
    monkeypatch.setenv("QUOROOM_CLOUD_ISSUER", "https://cp.example")
    monkeypatch.setenv("QUOROOM_ALLOWED_ORIGINS", ORIGIN)
    assert cli_main(["gateway", "--upstream", "http://10.1.2.3:80", "--", "node", "x"]) == 2
    assert "--upstream" in capsys.readouterr().err
    monkeypatch.delenv("QUOROOM_GATEWAY_UPSTREAM", raising=False)
    assert cli_main(["gateway"]) == 2
    assert cli_main(["serve", "--", "node"]) == 2


def test_a_started_stack_freezes_the_heap_only_when_its_process_is_its_own():
    """settle_heap (_server.py): the CLI's stack freezes what is alive once started, so the full
    collections under load stop walking the imports' heap; a stack built by an embedding program
    (settle_heap left off) leaves the program's collector alone."""
    settings = cloud_settings("https://cp.example")
    gw = GatewaySettings(upstream="http://127.0.0.1:9", secret=SECRET)

    async def start_and_stop(settle: bool) -> int:
        stack, _ = build_gateway(settings, gw)
        stack.settle_heap = settle
        async with stack.running():
            return gc.get_freeze_count()

    gc.unfreeze()
    try:
        assert asyncio.run(start_and_stop(False)) == 0
        assert asyncio.run(start_and_stop(True)) > 1000
    finally:
        gc.unfreeze()


def test_the_cli_builds_both_servers_stacks_to_settle_their_heap(monkeypatch):
    import uvicorn

    import room_cloud_runtime._gateway as gateway_module
    from room_cloud_runtime.cli import served_app

    built = []
    real_build = gateway_module.build_gateway

    def recording_build(*args: Any, **kwargs: Any) -> Any:
        built.append(real_build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(gateway_module, "build_gateway", recording_build)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    for name, value in {
        "QUOROOM_DEPLOYMENT_MODE": "cloud",
        "QUOROOM_CLOUD_INSTANCE_ID": INSTANCE,
        "QUOROOM_CLOUD_ISSUER": "https://cp.example",
        "QUOROOM_ALLOWED_ORIGINS": ORIGIN,
    }.items():
        monkeypatch.setenv(name, value)
    assert cli_main(["gateway", "--upstream", "http://127.0.0.1:9"]) == 0
    assert [stack.settle_heap for stack, _ in built] == [True]
    assert served_app().app.settle_heap is True  # `serve`: DrainUnreadBody(the stack)


def test_the_room_gets_one_request_id_the_callers_when_well_formed(through):
    """Issue 14, item 2: the id in the gateway's access line goes up as X-Request-Id, so the
    Room's logs can be matched to ours; a malformed one from the caller never reaches the Room."""
    base, factory, app = through
    auth = {"Authorization": f"Bearer {factory.mint()}"}
    ids = []
    for given in ("req-123.abc:9", "bad id with spaces", "x" * 65, None):
        headers = {**auth, **({"X-Request-Id": given} if given else {})}
        assert httpx.get(f"{base}/api/rooms", headers=headers).status_code == 200
        sent = [v for k, v in app.requests[-1]["headers"] if k == "x-request-id"]
        assert len(sent) == 1, sent
        ids.append(sent[0])
    assert ids[0] == "req-123.abc:9"
    assert len(set(ids)) == 4 and all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]+", i) for i in ids[1:])
    assert (
        httpx.get(f"{base}/api/rooms", headers={**auth, "Fly-Request-Id": "01FLY"}).status_code
        == 200
    )
    assert dict(app.requests[-1]["headers"])["x-request-id"] == "01FLY"
