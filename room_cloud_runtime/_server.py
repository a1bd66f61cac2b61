"""The HTTP servers the runtime ships: granian for ``serve``, uvicorn's httptools protocol with a
guard on the request head for ``gateway``.

Why two (measured side by side: bench/RESULTS.md "Servers" and "Gateway", ``python -m bench
server``): granian parses requests in Rust and writes the stack's response headers without
re-validating them, and runs the fused stack at 91–96 % of its own bare rate (uvicorn: ~85 %, at
most ~89 % for any stack that adds those headers) and ~20 % more requests/s than uvicorn, with
bounds on the head's size and time of its own — so ``serve`` (the stack in process around a
Python Room) runs on it. It serves from one worker process forked from the command's (granian's
threaded mode needs a free-threaded Python): ~68 MB PSS for the two together. The gateway spends
most of its time in Python on the upstream socket, on the same core as the Room; under granian
each request crosses between granian's Rust thread and the Python loop four times, and the gateway
served ~2,100 requests/s against ~4,000 on uvicorn (granian's worker process and its embedded
server alike). So ``gateway`` keeps uvicorn with httptools and adds what uvicorn lacks there:

uvicorn bounds neither the size of a request head nor the time it may take to arrive when it
runs httptools (``h11_max_incomplete_event_size`` applies to h11 only): a 64 MiB header was
buffered whole, eight unfinished 24 MiB heads took 240 MiB, and a client trickling a byte at a
time kept its socket forever, because every byte cancels the keep-alive timer. uvicorn with h11
has the size bound but no head deadline and serves at about half httptools' rate; hypercorn bounds
size and time but runs at about a third. So for the gateway:

- **head size**: bytes received while a head is still incomplete are counted; past
  ``max_head_bytes`` the client gets 431 and the connection is closed (the stack's own
  ``RequestLimits`` still checks the parsed headers against ``QUOROOM_MAX_HEADER_BYTES``);
- **head deadline**: from a new connection, and after each response, a complete head must arrive
  within ``head_timeout`` seconds (after an early answer: the rest of the body and the next head);
  otherwise 408 and close;
- **connections**: uvicorn's ``limit_concurrency`` answers 503 past the cap.

Under granian (``serve``) the same settings give: a head past the budget → 431 and close; a head
not complete within the deadline, or an idle connection → closed (hyper sends no 408); requests
past ``QUOROOM_MAX_CONNECTIONS`` wait for a free slot (granian's backpressure) instead of a 503;
and :class:`DrainUnreadBody` reads and drops what is left of a body the app answered without
reading, within the head deadline, as the guard does for uvicorn — hyper would otherwise close the
connection and a client still sending gets a reset instead of the answer.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Awaitable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_CLOSE_WITH = {
    408: b"HTTP/1.1 408 Request Timeout\r\n",
    431: b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
}
_BODIES = {
    408: b'{"error":"request head not received in time","code":"head_timeout"}',
    431: b'{"error":"request headers too large","code":"headers_too_large"}',
}


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """httptools with a bounded, timed request head. Configure with :func:`guarded_protocol`."""

    max_head_bytes = 32 * 1024
    head_timeout = 10.0

    # Narrowed as uvicorn's own override is: asyncio gives a stream protocol a Transport.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._reading_head = True
        self._in_body = False  # a request's body is still arriving
        self._draining = False  # ... and its answer has already gone out
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.head_timeout, self._head_too_slow
        )

    def data_received(self, data: bytes) -> None:
        reading = self._reading_head
        super().data_received(data)
        # Count only chunks after which the head is still incomplete: a chunk that completes a
        # head may carry a body too, which is RequestLimits' business.
        if reading and self._reading_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse(431)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._in_body = True
        self._head_bytes = 0
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()
        if self._draining:  # the deadline armed at the answer now covers the next head
            self._draining = False
            self._reading_head = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            # An answer may go out before its request's body is all in (a 413, a 401): the rest
            # of that body is read and dropped, as Node does, so a client still sending reads
            # the answer rather than a reset. Those bytes are not a head; the deadline counts
            # for the rest of the body and the next head together.
            self._draining = self._in_body
            self._reading_head = not self._in_body
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if (self._reading_head or self._draining) and not self.transport.is_closing():
            if self._head_bytes or self.cycle is not None:
                self._refuse(408)
            else:  # nothing sent at all (an idle preconnect): just close
                self.transport.close()

    def _refuse(self, status: int) -> None:
        body = _BODIES[status]
        self.transport.write(
            _CLOSE_WITH[status]
            + b"content-type: application/json\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\nconnection: close\r\n\r\n"
            + body
        )
        self.transport.close()


def settle_heap() -> None:
    """Move everything alive once a server has started into the collector's permanent generation
    (``gc.freeze``), after one full collection.

    Why: CPython runs a full (generation 2) collection whenever the objects promoted since the last
    one exceed a quarter of the old generation, and it counts promotions, not survivors. Under
    load, every young collection promotes the objects of the requests then in flight, which die
    soon after by reference count; so in the gateway (32 connections, ~7,000 requests/s) a full
    collection ran about once a second, found nothing to free, and walked the whole heap the
    imports made: 24–40 ms each, every one of them a stall of every request in flight
    (``scripts/bench gateway --http-users 8``, 2026-12-07: p99 28 ms with a p90 of 6). Frozen, the
    imports' objects are never walked again; the full collections that remain walk only what
    came after (0.2–3 ms), and the gateway's p99 fell to 7 ms, its CPU per request 83 → 76 µs.
    Frozen objects are still freed by reference count; only a cycle among them would stay, and
    the collection just before the freeze has taken the cycles there were.
    """
    gc.collect()
    gc.freeze()


def guarded_protocol(*, max_head_bytes: int, head_timeout: float) -> type[GuardedHttpToolsProtocol]:
    """A protocol class with these bounds (uvicorn takes a class for ``http=``)."""
    attrs: dict[str, object] = {"max_head_bytes": max_head_bytes, "head_timeout": head_timeout}
    return type("GuardedHttpTools", (GuardedHttpToolsProtocol,), attrs)


_BODY_HEADERS = frozenset((b"content-length", b"transfer-encoding", b"expect"))


def _has_unsent_body(headers: Any) -> bool:
    """Whether a request declares a body the client may still be sending: a non-zero
    Content-Length or any Transfer-Encoding, and no ``Expect: 100-continue`` (such a client sends
    nothing until it is told to, and an answer tells it not to)."""
    body = False
    for name, value in headers:
        if name in _BODY_HEADERS:  # one set look-up per header: this runs for every request
            if name == b"content-length":
                body = value.strip() != b"0"
            elif name == b"transfer-encoding":
                body = True
            elif value.lower() == b"100-continue":
                return False
    return body


class DrainUnreadBody:
    """Under granian: read and drop the rest of a request body the app answered without reading.

    hyper closes a connection whose request body was left unread; a client still sending then
    gets a reset, often before it reads the answer (a 413, a 401). Node and the guarded httptools
    protocol read the rest and drop it; this does the same, for at most ``timeout`` seconds (the
    head deadline), after which granian closes the connection. Requests without a body (the hot
    path: GETs) cost one scan of their headers: ``__call__`` hands back the app's own awaitable
    for them, so they run without a coroutine frame of this class's.
    """

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "http" or not _has_unsent_body(scope["headers"]):
            return self.app(scope, receive, send)
        return self._draining(scope, receive, send)

    async def _draining(self, scope: Scope, receive: Receive, send: Send) -> None:
        done = False

        async def tracked() -> Message:
            nonlocal done
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                done = True
            return message

        await self.app(scope, tracked, send)
        if done:
            return
        try:
            async with asyncio.timeout(self.timeout):
                while not done:
                    await tracked()
        except TimeoutError:
            pass  # granian closes the connection: the body is not drained for ever


# What ``serve`` tells the worker process (granian imports the app there by name; with the fork
# start method the environment is the one way that holds under spawn as well).
_APP_ENV = "_QUOROOM_SERVE_APP"
_LOG_LEVEL_ENV = "_QUOROOM_SERVE_LOG_LEVEL"


def serve_granian(
    factory: str,
    *,
    app_spec: str | None,
    host: str,
    port: int,
    max_head_bytes: int,
    head_timeout: float,
    max_connections: int,
    log_level: str,
) -> int:
    """Serve ``factory`` ('module:function' returning the ASGI app, called in granian's worker
    process) on ``host:port``; the exit status granian ends with (non-zero: the worker died)."""
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.http import HTTP1Settings
    from granian.server import Server

    from ._logging import configure_logging

    os.environ[_APP_ENV] = app_spec or ""
    os.environ[_LOG_LEVEL_ENV] = log_level
    server = Server(
        factory,
        factory=True,
        address=host,
        port=port,
        interface=Interfaces.ASGI,  # with lifespan
        workers=1,  # one Room per machine: its state lives in this one process
        loop=Loops.uvloop,
        http=HTTPModes.http1,
        websockets=True,
        backpressure=max_connections,
        http1_settings=HTTP1Settings(
            header_read_timeout=max(1, int(head_timeout * 1000)), max_buffer_size=max_head_bytes
        ),
        log_level=log_level,  # type: ignore[arg-type]
        # granian's own lines go through the runtime's JSON lines handler (configure_logging
        # below, and again in the worker): its dictConfig would print them as text.
        log_dictconfig={"loggers": {}},
        log_access=False,  # query strings hold WebSocket tokens: AccessLog writes the lines
        respawn_failed_workers=False,  # a dead worker stops the machine, which Fly restarts
    )
    configure_logging(log_level.upper())
    try:
        server.serve()
    except SystemExit as exc:  # granian exits 1 when its worker died
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def served_log_level() -> str:
    """The log level ``serve`` chose, in the worker process."""
    return os.environ.get(_LOG_LEVEL_ENV, "info")


def served_app_spec() -> str | None:
    """The ``--app`` ``serve`` was given, in the worker process (None: the reference Room)."""
    return os.environ.get(_APP_ENV) or None
