"""The gateway's client for the hop to the Room (``_upstream_http``), against asyncio servers on
loopback that answer byte by byte: keep-alive and its limits, framing, back-pressure, failures.
The proxy built on it is tested in test_gateway_proxy.py and against the real Room."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from room_cloud_runtime._upstream_http import (
    UpstreamBroken,
    UpstreamPool,
    UpstreamTimeout,
    UpstreamUnavailable,
    request_head,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
SOURCE = "127.77.0.9"


class Upstream:
    def __init__(self) -> None:
        self.connections = 0
        self.peers: list[str] = []
        self.closed = 0


@asynccontextmanager
async def upstream(handler: Handler) -> AsyncIterator[tuple[Upstream, int]]:
    seen = Upstream()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.connections += 1
        seen.peers.append(writer.get_extra_info("peername")[0])
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            seen.closed += 1
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield seen, server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def get(path: str = "/") -> bytes:
    return request_head("GET", path, [(b"host", b"room")])


async def test_a_kept_alive_connection_is_reused_from_the_users_own_address() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(OK)
            await writer.drain()

    async with upstream(handler) as (seen, port):
        pool = UpstreamPool("127.0.0.1", port)
        for _ in range(3):
            response = await pool.request(SOURCE, get())
            assert (response.status, await response.read()) == (200, b"ok")
            response.release()
        await pool.aclose()
    assert seen.connections == 1
    assert seen.peers == [SOURCE]


async def test_a_kept_alive_connection_closed_under_a_request_is_retried_once() -> None:
    # Node closes idle sockets after 5 s; one it closes just as our request goes out fails
    # before a byte of the answer. That is not the Room being down: send it again, once.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(OK)
        await writer.drain()
        if seen.connections == 1:
            await read_head(reader)  # the second request arrives ... and the socket closes

    async with upstream(handler) as (seen, port):
        pool = UpstreamPool("127.0.0.1", port)
        first = await pool.request(SOURCE, get())
        assert await first.read() == b"ok"
        first.release()
        second = await pool.request(SOURCE, get())
        assert (second.status, await second.read()) == (200, b"ok")
        second.release()
        await pool.aclose()
    assert seen.connections == 2


async def test_a_request_with_a_body_is_not_retried() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.close()  # closed before answering a byte

    async def body() -> AsyncIterator[bytes]:
        yield b"data"

    async with upstream(handler) as (seen, port):
        pool = UpstreamPool("127.0.0.1", port)
        head = request_head("POST", "/", [(b"content-length", b"4")])
        with pytest.raises(UpstreamUnavailable):
            await pool.request(SOURCE, head, body())
        await pool.aclose()
    assert seen.connections == 1


async def test_a_head_answer_with_a_length_does_not_wait_for_a_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async with upstream(handler) as (_, port):
        pool = UpstreamPool("127.0.0.1", port, read_timeout=2)
        async with asyncio.timeout(1):
            response = await pool.request(SOURCE, request_head("HEAD", "/", []), head_only=True)
            assert response.status == 200
            assert response.content_length() == 100
            assert await response.read() == b""
        response.release()
        await pool.aclose()


async def test_a_body_of_unknown_length_goes_up_chunked_and_arrives_whole() -> None:
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        assert b"transfer-encoding: chunked" in head
        raw = await reader.readuntil(b"0\r\n\r\n")
        body, rest = b"", raw
        while True:  # de-chunk (test side only)
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            body, rest = body + rest[:size], rest[size + 2 :]
        received.append(body)
        writer.write(OK)
        await writer.drain()

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(50):
            yield bytes([65 + i % 26]) * (1000 + i)

    async with upstream(handler) as (_, port):
        pool = UpstreamPool("127.0.0.1", port)
        head = request_head("POST", "/up", [(b"transfer-encoding", b"chunked")])
        response = await pool.request(SOURCE, head, pieces(), chunked=True)
        assert await response.read() == b"ok"
        response.release()
        await pool.aclose()
    assert received == [b"".join([bytes([65 + i % 26]) * (1000 + i) for i in range(50)])]


async def test_a_large_answer_is_not_buffered_whole_while_the_reader_waits() -> None:
    size = 16 << 20

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // 65536):
            writer.write(b"z" * 65536)
            await writer.drain()

    async with upstream(handler) as (_, port):
        pool = UpstreamPool("127.0.0.1", port)
        response = await pool.request(SOURCE, get())
        await asyncio.sleep(0.5)  # nobody reads: the client must stop reading the socket
        assert response._conn.buffered < 1 << 20
        total = 0
        async for chunk in response.chunks():
            total += len(chunk)
        assert total == size
        response.release()
        await pool.aclose()


async def test_idle_connections_are_closed_after_the_keepalive() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(OK)
        await writer.drain()
        await reader.read()  # until the client closes

    async with upstream(handler) as (seen, port):
        pool = UpstreamPool("127.0.0.1", port, keepalive=0.2)
        response = await pool.request(SOURCE, get())
        await response.read()
        response.release()
        await asyncio.sleep(0.6)
        assert seen.closed == 1
        assert pool._idle == {}
        await pool.aclose()


async def test_a_connection_idle_past_the_keepalive_is_never_reused() -> None:
    """Reuse checks the idle age itself, not the watchdog's next tick: a connection the Room
    may be closing (Node's 5 s keep-alive) never carries a request."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(OK)
            await writer.drain()

    async with upstream(handler) as (seen, port):
        pool = UpstreamPool("127.0.0.1", port, keepalive=30)
        for _ in range(2):
            response = await pool.request(SOURCE, get())
            assert await response.read() == b"ok"
            response.release()
        assert seen.connections == 1  # kept alive and reused
        (idle,) = pool._idle[SOURCE]
        idle.idle_since -= 31  # as if it had waited past the keepalive
        response = await pool.request(SOURCE, get())
        assert await response.read() == b"ok"
        response.release()
        assert seen.connections == 2
        assert idle.closed or idle.transport is None or idle.transport.is_closing()
        await pool.aclose()


async def test_the_watchdog_stops_when_the_pool_is_empty() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(OK)
        await writer.drain()
        await reader.read()

    async with upstream(handler) as (_, port):
        pool = UpstreamPool("127.0.0.1", port, keepalive=0.2)
        response = await pool.request(SOURCE, get())
        await response.read()
        response.release()
        assert pool._watchdog is not None
        await asyncio.sleep(0.6)
        assert pool._live == set()
        assert pool._watchdog is None  # no timer left running for an empty pool
        await pool.aclose()


async def test_failures_are_told_apart() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    with pytest.raises(UpstreamUnavailable):
        await UpstreamPool("127.0.0.1", dead_port).request(SOURCE, get())

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await asyncio.sleep(3)

    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        await writer.drain()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()

    for handler, error in (
        (silent, UpstreamTimeout),
        (huge, UpstreamBroken),
        (garbage, UpstreamBroken),
    ):
        async with upstream(handler) as (_, port):
            pool = UpstreamPool("127.0.0.1", port, read_timeout=0.3)
            with pytest.raises(error):
                await pool.request(SOURCE, get())
            await pool.aclose()
    async with upstream(cut) as (_, port):
        pool = UpstreamPool("127.0.0.1", port)
        response = await pool.request(SOURCE, get())
        with pytest.raises(UpstreamBroken):
            await response.read()
        response.release()
        await pool.aclose()
