"""The server the runtime ships: a bounded, timed request head and a connection cap (issue 12,
item 2). A real uvicorn with ``server_options`` (what ``serve`` and ``gateway`` run), driven over
raw sockets."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from room_cloud_runtime._settings import RuntimeSettings
from room_cloud_runtime.cli import server_options
from tests.helpers.live_server import live_server


async def hello(scope, receive, send):
    if scope["type"] != "http":
        return
    while True:
        message = await receive()
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


async def early(scope, receive, send):
    """Answers 413 at once, without reading the body (as the Room does past its limit)."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 413, "headers": []})
    await send({"type": "http.response.body", "body": b"too large"})


def _early_server(**settings: float) -> Any:
    options = {**server_options(RuntimeSettings(**settings)), "lifespan": "off"}
    return live_server(early, **options)


@pytest.fixture
def server() -> Iterator[tuple[str, int]]:
    settings = RuntimeSettings(head_timeout_seconds=1.0, max_header_bytes=8192)
    options = {**server_options(settings), "lifespan": "off"}
    with live_server(hello, **options) as base:
        host, port = base.removeprefix("http://").split(":")
        yield host, int(port)


def read_all(conn: socket.socket, wait: float = 5.0) -> bytes:
    conn.settimeout(wait)
    data = b""
    while True:
        try:
            chunk = conn.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return data
        if not chunk:
            return data
        data += chunk


def test_a_normal_request_with_a_body_in_the_same_packet_is_served(server):
    with socket.create_connection(server) as conn:
        body = b"x" * 60_000
        conn.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 60000\r\n\r\n" + body)
        conn.settimeout(5)
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")


def test_a_huge_header_is_refused_with_431_before_it_is_buffered(server):
    with socket.socket() as conn:
        # A small send buffer: otherwise the kernel's own (autotuned up to 4 MiB) absorbs what
        # the client "sent" after the server hung up, and the count says nothing about the server.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        conn.connect(server)
        conn.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ")
        sent = 0
        with pytest.raises(OSError):  # the server hangs up long before 64 MiB
            for _ in range(1024):
                conn.sendall(b"a" * 65536)
                sent += 65536
        assert sent < 4 << 20
        assert read_all(conn).startswith(b"HTTP/1.1 431")


def test_a_trickled_head_is_cut_off_with_408_at_the_deadline(server):
    with socket.create_connection(server) as conn:
        started = time.monotonic()
        answer = b""
        conn.settimeout(0.2)
        for byte in b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"a" * 100:
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                break
            try:
                answer += conn.recv(65536)
            except TimeoutError:
                continue
            if answer:
                break
        assert answer.startswith(b"HTTP/1.1 408")
        assert 0.9 < time.monotonic() - started < 3


def test_a_connection_that_sends_nothing_is_closed_at_the_deadline(server):
    with socket.create_connection(server) as conn:
        started = time.monotonic()
        assert read_all(conn, wait=5) == b""
        assert time.monotonic() - started < 3


def test_a_slow_second_head_on_a_kept_alive_connection_is_cut_off_too(server):
    with socket.create_connection(server) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        conn.settimeout(5)
        first = b""
        while not first.endswith(b"0\r\n\r\n"):  # the whole chunked answer, however split
            first += conn.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        conn.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")  # never finished
        assert read_all(conn).startswith(b"HTTP/1.1 408")


def test_a_client_still_sending_after_an_early_answer_reads_it_and_keeps_the_connection():
    # The rest of the body is not a request head: it used to count against the head bound,
    # and the client got a reset (431 and close) instead of the 413 while still sending.
    with _early_server(head_timeout_seconds=2.0, max_header_bytes=8192) as base:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as conn:
            conn.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2097152\r\n\r\n")
            for _ in range(32):
                conn.sendall(b"x" * 65536)
            conn.settimeout(5)
            answer = b""
            while b"too large" not in answer:
                answer += conn.recv(65536)
            assert answer.startswith(b"HTTP/1.1 413")
            conn.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")  # the connection lives on
            again = b""
            while b"too large" not in again:
                again += conn.recv(65536)
            assert again.startswith(b"HTTP/1.1 413")


def test_the_rest_of_a_body_after_an_early_answer_must_arrive_within_the_head_deadline():
    with _early_server(head_timeout_seconds=1.0) as base:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as conn:
            conn.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\nxx")
            started = time.monotonic()
            data = b""
            conn.settimeout(0.2)
            while time.monotonic() - started < 4:  # a byte every 0.2 s, never finishing
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    conn.sendall(b"x")
                    continue
                if not chunk:
                    break
                data += chunk
            assert data.startswith(b"HTTP/1.1 413")
            assert b"HTTP/1.1 408" in data
            assert time.monotonic() - started < 3


def test_connections_over_the_cap_get_503():
    settings = RuntimeSettings(max_connections=2)
    with live_server(hello, **{**server_options(settings), "lifespan": "off"}) as base:
        host, port = base.removeprefix("http://").split(":")
        held = [socket.create_connection((host, int(port))) for _ in range(2)]
        try:
            time.sleep(0.2)
            with socket.create_connection((host, int(port))) as conn:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                assert read_all(conn, wait=5).startswith(b"HTTP/1.1 503")
        finally:
            for conn in held:
                conn.close()


def test_bad_server_settings_are_refused():
    from room_cloud_runtime._errors import ConfigError
    from room_cloud_runtime._settings import load_settings

    with pytest.raises(ConfigError) as refused:
        load_settings({"QUOROOM_MAX_CONNECTIONS": "0"})
    assert refused.value.setting == "QUOROOM_MAX_CONNECTIONS"
    with pytest.raises(ConfigError) as refused:
        load_settings({"QUOROOM_HEAD_TIMEOUT_SECONDS": "-1"})
    assert refused.value.setting == "QUOROOM_HEAD_TIMEOUT_SECONDS"
