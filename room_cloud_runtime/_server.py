"""The HTTP server the runtime ships (``serve`` and ``gateway``): uvicorn's httptools protocol with
a guard on the request head.

uvicorn bounds neither the size of a request head nor the time it may take to arrive when it
runs httptools (``h11_max_incomplete_event_size`` applies to h11 only): a 64 MiB header was
buffered whole, eight unfinished 24 MiB heads took 240 MiB, and a client trickling a byte at a
time kept its socket forever, because every byte cancels the keep-alive timer. Measured side by
side (bench/RESULTS.md "Servers", ``python -m bench server``): uvicorn with h11 has the size bound
but no head deadline and serves the stack at about half httptools' rate; hypercorn bounds size and
time but runs at about a third; granian bounds both and is faster still than httptools, but it
runs the app in a worker process of its own and its WebSocket-denial and early-answer behaviour is
not what this suite checks, so moving to it is issue 13's server item. So the runtime keeps
httptools and adds what it lacks:

- **head size**: bytes received while a head is still incomplete are counted; past
  ``max_head_bytes`` the client gets 431 and the connection is closed (the stack's own
  ``RequestLimits`` still checks the parsed headers against ``QUOROOM_MAX_HEADER_BYTES``);
- **head deadline**: from a new connection, and after each response, a complete head must arrive
  within ``head_timeout`` seconds (after an early answer: the rest of the body and the next head);
  otherwise 408 and close;
- **connections**: uvicorn's ``limit_concurrency`` answers 503 past the cap.
"""

from __future__ import annotations

import asyncio

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


def guarded_protocol(*, max_head_bytes: int, head_timeout: float) -> type[GuardedHttpToolsProtocol]:
    """A protocol class with these bounds (uvicorn takes a class for ``http=``)."""
    attrs: dict[str, object] = {"max_head_bytes": max_head_bytes, "head_timeout": head_timeout}
    return type("GuardedHttpTools", (GuardedHttpToolsProtocol,), attrs)
