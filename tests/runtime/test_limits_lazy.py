"""RequestLimits reads no body before the inner layers let the request through (issue 12, item 1).

The whole stack around the reference Room under a real uvicorn, driven over raw sockets so the
test controls exactly which bytes of a body are sent and when."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import pytest

from room_cloud_runtime import reference
from room_cloud_runtime._settings import RuntimeSettings
from room_cloud_runtime._stack import RuntimeStack
from room_cloud_runtime.cli import server_options
from tests.helpers.jwks_server import JWKSServer
from tests.helpers.live_server import live_server
from tests.helpers.tokens import TokenFactory

ORIGIN = "https://app.quoroom.test"
INSTANCE = "inst-lazy"


@pytest.fixture
def stack(tmp_path) -> Iterator[tuple[str, int, TokenFactory]]:
    with JWKSServer() as jwks:
        factory = TokenFactory(jwks.issuer, INSTANCE)
        jwks.jwks = factory.jwks()
        settings = RuntimeSettings(
            mode="cloud",
            instance_id=INSTANCE,
            issuer=jwks.issuer,
            allowed_origins=(ORIGIN,),
            access_log=False,
            body_timeout_seconds=1.0,
        )
        app = RuntimeStack(reference.create_room_app(data_dir=str(tmp_path)), settings)
        with live_server(app, **server_options(settings)) as base:
            host, port = base.removeprefix("http://").split(":")
            yield host, int(port), factory


def exchange(host: str, port: int, head: str, body: bytes = b"", wait: float = 3.0) -> bytes:
    """Send a request head and part of a body; return the first final answer within ``wait``
    (a ``100 Continue`` before it is kept at the front)."""
    with socket.create_connection((host, port), timeout=wait) as conn:
        conn.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            final = data.split(b"HTTP/1.1 100 Continue\r\n\r\n", 1)[-1]
            if b"\r\n\r\n" in final:
                top, rest = final.split(b"\r\n\r\n", 1)
                length = re.search(rb"content-length: (\d+)", top, re.I)
                if length and len(rest) >= int(length.group(1)):
                    break
            conn.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
        return data


def head(path: str, *, length: int, token: str | None = None, extra: str = "") -> str:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {length}",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


def test_an_unauthenticated_json_upload_is_refused_at_once_without_reading_its_body(stack):
    host, port, _ = stack
    started = time.monotonic()
    answer = exchange(host, port, head("/api/rooms", length=500_000), b'{"name": "x", "pad": "')
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert time.monotonic() - started < 2


def test_a_disallowed_origin_is_refused_at_once_without_reading_the_body(stack):
    host, port, factory = stack
    answer = exchange(
        host,
        port,
        head("/api/rooms", length=500_000, token=factory.mint(), extra="Origin: https://evil.test"),
        b"[[[[",
    )
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]


def test_expect_100_continue_gets_no_100_before_auth(stack):
    host, port, _ = stack
    answer = exchange(host, port, head("/api/rooms", length=10, extra="Expect: 100-continue"))
    assert not answer.startswith(b"HTTP/1.1 100"), answer[:200]
    assert answer.startswith(b"HTTP/1.1 401")


def test_expect_100_continue_gets_100_once_the_request_is_allowed(stack):
    host, port, factory = stack
    answer = exchange(
        host,
        port,
        head("/api/rooms", length=10, token=factory.mint(), extra="Expect: 100-continue"),
    )
    assert answer.startswith(b"HTTP/1.1 100"), answer[:200]


def test_an_allowed_body_that_trickles_past_the_deadline_gets_408(stack):
    host, port, factory = stack
    started = time.monotonic()
    answer = exchange(
        host, port, head("/api/rooms", length=1000, token=factory.mint()), b'{"name":', wait=4
    )
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"body_timeout"' in answer
    assert 0.9 < time.monotonic() - started < 3.5


def test_an_allowed_json_body_too_deep_still_gets_400(stack):
    host, port, factory = stack
    body = b"[" * 40 + b"]" * 40
    answer = exchange(host, port, head("/api/rooms", length=len(body), token=factory.mint()), body)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b'"json_too_deep"' in answer
