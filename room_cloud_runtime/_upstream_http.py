"""The gateway's HTTP/1.1 client for its one hop to the Room: kept-alive loopback connections,
one pool per source address, responses parsed by httptools (llhttp, the parser Node and uvicorn
use). This module only writes request heads and chunk frames; it parses nothing by hand.

Why not aiohttp's client here (it still carries the WebSockets): on a Room machine the gateway
shares the Room's core, so every microsecond it spends per request is one the Room no longer
has. Profiled under load (bench/RESULTS.md "Gateway"), aiohttp's request path (request and
response objects, URL and multidict building, timers, tracing hooks, its own pool bookkeeping)
was the largest part of the gateway's CPU per request; this client does the same hop for a
fraction of it (``bench/bench_gateway_clients.py`` measures all three clients the same way).

Timeouts: ``connect_timeout`` for a new connection; ``read_timeout`` for the response head and
then for each further piece of the body (an upstream that stalls mid-body is cut off, like
aiohttp's ``sock_read``). An idle connection is never reused after ``keepalive`` seconds, before
Node's 5 s ``keepAliveTimeout`` can close one under a request we are about to send.

Both are kept by one watchdog per pool, not by a timer per request: under uvloop a
``call_later`` and its ``cancel`` cost ~3.5 µs, and a timer per wait plus one per idle spell
were ~7 µs of each proxied request on a core the Room shares. The watchdog ticks every
``min(1 s, read_timeout / 4, keepalive / 4)`` while the pool holds a connection, so a read
timeout fires up to one tick late; reuse checks the idle age exactly.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import cast

import httptools

Header = tuple[bytes, bytes]

_HIGH_WATER = 256 * 1024  # body bytes buffered before we stop reading the Room's socket
_LOW_WATER = 64 * 1024


class UpstreamError(Exception):
    """The hop to the Room failed. ``status`` is what the client should be told."""

    status = 502
    code = "upstream_error"


class UpstreamUnavailable(UpstreamError):
    """Refused, or the connection closed before a byte of the answer: the Room is not up."""

    status = 503
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamBroken(UpstreamError):
    """Not HTTP, headers too large, or the connection broke mid-answer."""


class _Connection(asyncio.Protocol):
    """One connection to the Room, one request at a time."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_header_bytes: int,
        read_timeout: float,
        live: set[_Connection],
    ) -> None:
        self.loop = loop
        self.read_timeout = read_timeout
        self.max_header_bytes = max_header_bytes
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.live = live  # the pool's open connections, which its watchdog looks after
        #: loop time by which the awaited piece of the answer must come (0: not waiting)
        self.deadline = 0.0
        #: loop time it went back to the idle list
        self.idle_since = 0.0
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._reset(head_only=False)

    def _reset(self, *, head_only: bool) -> None:
        self.head_only = head_only
        self.status = 0
        self.headers: list[Header] = []
        self.header_bytes = 0
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.received = False
        self.error: UpstreamError | None = None
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.reading_paused = False
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's transport (asyncio's and uvloop's) is always a Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._fail(
                cause if isinstance(cause, UpstreamError) else UpstreamBroken("callback failed")
            )
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBroken(f"not HTTP: {exc}"))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.live.discard(self)
        if not self.complete and self.error is None:
            # Closed before the first byte of an answer: the Room is down or restarting.
            # Closed later: the answer is broken.
            kind = UpstreamBroken if self.received else UpstreamUnavailable
            self.error = kind("the connection closed before the answer was complete")
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(UpstreamUnavailable("the connection closed while writing"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- httptools callbacks -------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > self.max_header_bytes:
            raise UpstreamBroken("the answer's headers are too large")
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.head_done = True
        if self.head_only:
            # httptools cannot be told a HEAD answer has no body: take the head, and do not
            # reuse the connection (its parser would wait for Content-Length bytes).
            self.complete = True
            self.keep_alive = False
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # -- used by the pool and the proxy --------------------------------------------------------

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self._wake()
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _timed_out(self) -> None:
        self._fail(UpstreamTimeout("the Room did not answer in time"))

    async def _wait(self) -> None:
        self._waiter = waiter = self.loop.create_future()
        self.deadline = self.loop.time() + self.read_timeout  # the pool's watchdog keeps it
        try:
            await waiter
        finally:
            self.deadline = 0.0
            self._waiter = None

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise UpstreamUnavailable("the connection closed while writing")
        if self._write_paused:
            self._drain = self.loop.create_future()
            await self._drain

    async def read_head(self) -> None:
        while not self.head_done and self.error is None:
            await self._wait()
        if self.error is not None and not self.head_done:
            raise self.error

    async def read_chunk(self) -> bytes | None:
        """The next piece of the body, or ``None`` at its end. Raises if it broke."""
        while not self.body:
            if self.error is not None:
                raise self.error
            if self.complete:
                return None
            await self._wait()
        chunk = self.body.popleft()
        self.buffered -= len(chunk)
        if self.reading_paused and self.buffered < _LOW_WATER and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        return chunk

    def take_body(self) -> bytes:
        """The whole body of a complete answer, at once (no await)."""
        body = b"".join(self.body)
        self.body.clear()
        self.buffered = 0
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        return body

    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and self.error is None
            and not self.closed
            and not self.body
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()


class UpstreamResponse:
    """The Room's answer: status and headers at once, the body as it arrives."""

    __slots__ = ("_conn", "_pool", "_source", "headers", "released", "status")

    def __init__(self, pool: UpstreamPool, source: str, conn: _Connection) -> None:
        self._pool = pool
        self._source = source
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self.released = False

    def content_length(self) -> int | None:
        for name, value in self.headers:
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    def arrived_whole(self) -> bool:
        """The whole body is already here (a small answer usually comes with its head)."""
        return self._conn.complete

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self._conn.read_chunk()
            if chunk is None:
                return
            yield chunk

    async def read(self) -> bytes:
        if self._conn.complete and self._conn.error is None:
            return self._conn.take_body()
        return b"".join([chunk async for chunk in self.chunks()])

    def release(self) -> None:
        """Give the connection back (kept alive if the answer was read whole), or close it."""
        if not self.released:
            self.released = True
            self._pool.release(self._source, self._conn)


class UpstreamPool:
    """Kept-alive connections to ``host:port``, one idle list per local source address."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        keepalive: float = 4.0,
        max_header_bytes: int = 16 * 1024,
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive = keepalive
        self.max_header_bytes = max_header_bytes
        self._idle: dict[str, list[_Connection]] = {}
        self._live: set[_Connection] = set()
        self._watchdog: asyncio.TimerHandle | None = None
        self._tick = min(1.0, read_timeout / 4, keepalive / 4)
        self._closed = False

    async def _connect(self, source: str) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self.max_header_bytes, self.read_timeout, self._live),
                    self.host,
                    self.port,
                    local_addr=(source, 0),
                )
        except TimeoutError:
            raise UpstreamTimeout("the Room did not accept a connection in time") from None
        except OSError as exc:
            raise UpstreamUnavailable(f"cannot connect: {exc.strerror or exc}") from None
        self._live.add(conn)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._tick, self._watch)
        return conn

    def _watch(self) -> None:
        """Every tick while connections are open: time out overdue reads, close stale idlers."""
        self._watchdog = None
        now = asyncio.get_running_loop().time()
        for conn in list(self._live):
            if conn.deadline and conn.deadline <= now:
                conn._timed_out()
        stale = now - self.keepalive
        for source, idle in list(self._idle.items()):
            keep = []
            for conn in idle:
                if conn.idle_since > stale and not conn.closed:
                    keep.append(conn)
                else:
                    conn.close()
            if keep:
                self._idle[source] = keep
            else:
                del self._idle[source]
        if self._live and not self._closed:
            self._watchdog = asyncio.get_running_loop().call_later(self._tick, self._watch)

    def _take_idle(self, source: str) -> _Connection | None:
        idle = self._idle.get(source)
        while idle:
            conn = idle.pop()  # the most recently used: the others are older still
            if conn.loop.time() - conn.idle_since >= self.keepalive:
                for stale in (conn, *idle):
                    stale.close()
                idle.clear()
                return None
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def release(self, source: str, conn: _Connection) -> None:
        if self._closed or not conn.reusable():
            conn.close()
            return
        conn.idle_since = conn.loop.time()
        idle = self._idle.get(source)
        if idle is None:
            self._idle[source] = [conn]
        else:
            idle.append(conn)

    async def request(
        self,
        source: str,
        head: bytes,
        body: AsyncIterator[bytes] | None = None,
        *,
        chunked: bool = False,
        head_only: bool = False,
    ) -> UpstreamResponse:
        """Send ``head`` (the whole request head, ending in a blank line) and ``body``, and
        return once the answer's head is in. The caller must ``release()`` the response.

        A kept-alive connection found closed before it answered a byte is retried once on a
        fresh one when there is no body (nothing was consumed from the client); that is the
        Room having closed an idle socket, not the Room being down.
        """
        conn = self._take_idle(source)
        reused = conn is not None
        if conn is None:
            conn = await self._connect(source)
        try:
            return await self._exchange(source, conn, head, body, chunked, head_only)
        except UpstreamUnavailable:
            if not (reused and body is None):
                raise
        conn = await self._connect(source)
        return await self._exchange(source, conn, head, None, False, head_only)

    async def _exchange(
        self,
        source: str,
        conn: _Connection,
        head: bytes,
        body: AsyncIterator[bytes] | None,
        chunked: bool,
        head_only: bool,
    ) -> UpstreamResponse:
        conn._reset(head_only=head_only)
        writer: asyncio.Task[None] | None = None
        try:
            conn.write(head)
            if body is not None:
                # Concurrently: the Room may answer (413, 401…) before it has read it all.
                writer = asyncio.ensure_future(_send_body(conn, body, chunked))
                head_task = asyncio.ensure_future(conn.read_head())
                done, _ = await asyncio.wait(
                    (writer, head_task), return_when=asyncio.FIRST_COMPLETED
                )
                failed = writer.exception() if writer in done else None
                if failed is not None:
                    head_task.cancel()
                    raise failed
                await head_task
            else:
                await conn.read_head()
        except BaseException:
            if writer is not None and not writer.done():
                writer.cancel()
            conn.close()
            raise
        if writer is not None and not writer.done():
            # The Room answered before reading the whole body: this connection ends here.
            writer.cancel()
            conn.keep_alive = False
        return UpstreamResponse(self, source, conn)

    async def aclose(self) -> None:
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


async def _send_body(conn: _Connection, body: AsyncIterator[bytes], chunked: bool) -> None:
    async for chunk in body:
        if chunked:
            conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            conn.write(chunk)
        await conn.drain()
    if chunked:
        conn.write(b"0\r\n\r\n")


def request_head(method: str, target: str, headers: list[Header]) -> bytes:
    """The request line and headers. Names and values come from a parsed request (no CR/LF
    can be in them: the server in front refused those) or from the gateway itself."""
    lines = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1")]
    for name, value in headers:
        lines.append(name + b": " + value + b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)
