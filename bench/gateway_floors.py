"""What forwarding alone costs in Python: floors to read the gateway's figures against.

    python -m bench.gateway_floors {pipe|parse|callback|asgi} UPSTREAM_PORT PORT

``bench_gateway --floors`` starts each of these on core 0 in front of the direct Room (the one
with its per-address limits raised) and measures it the way it measures the gateway. None of
them checks anything: the client's token reaches the Room as sent (wrk sends the Room's own HS256
tokens, as to the direct Room), and every request leaves from 127.0.0.1. They are not servers to
run; they bound what any design of the gateway in Python could reach on the core it shares with
the Room:

- ``pipe``: asyncio protocols on uvloop, one upstream connection per client connection, bytes
  forwarded as they arrive. Nothing that forwards in Python costs less.
- ``parse``: the same, with httptools parsing both directions (where each request and each
  answer ends): the least a forwarding path driven by the parser's callbacks costs, before it
  looks at a header.
- ``callback``: the gateway's own server protocol (uvicorn's httptools protocol with the
  runtime's head guard, ``_server.GuardedHttpToolsProtocol``, and its options) forwarding a
  bodiless request from the parser's callbacks: no ASGI cycle, no task, no future; the upstream
  head rebuilt from the parsed headers (hop-by-hop ones dropped), the answer written in one piece
  from the upstream parser's callbacks, on kept-alive upstream connections. It says what a
  second, callback-driven forwarding path inside the gateway's server could reach before doing
  any of the gateway's work. (Requests with a body, upgrades: 404 through the ASGI path.)
- ``asgi``: the gateway's own server (uvicorn with the runtime's guarded httptools protocol and
  options, ``cli.server_options``) around an ASGI app that forwards through the gateway's own
  client (``_upstream_http.UpstreamPool``): hop-by-hop headers dropped, nothing else done. The
  gateway is this plus the stack, the identity swap, a source address per user and the access log.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

MODES = ("pipe", "parse", "callback", "asgi")
_HOP = frozenset((b"connection", b"keep-alive", b"host", b"transfer-encoding"))


class _Ends:
    """httptools callbacks: only where a message ends matters here."""

    def on_message_complete(self) -> None:
        pass


class _Upstream(asyncio.Protocol):
    def __init__(self, down: _Downstream, parse: bool) -> None:
        import httptools

        self.down = down
        self.parser = httptools.HttpResponseParser(_Ends()) if parse else None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.parser is not None:
            self.parser.feed_data(data)
        down = self.down.transport
        if down is not None and not down.is_closing():  # the client may have gone (wrk's end)
            down.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.down.transport is not None:
            self.down.transport.close()


class _Downstream(asyncio.Protocol):
    def __init__(self, upstream_port: int, parse: bool) -> None:
        import httptools

        self.upstream_port = upstream_port
        self.parse = parse
        self.parser = httptools.HttpRequestParser(_Ends()) if parse else None
        self.transport: asyncio.Transport | None = None
        self.up: _Upstream | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(
            lambda: _Upstream(self, self.parse), "127.0.0.1", self.upstream_port
        )
        self.up = up
        for data in self.pending:
            up.transport.write(data)  # type: ignore[union-attr]
        self.pending = []

    def data_received(self, data: bytes) -> None:
        if self.parser is not None:
            self.parser.feed_data(data)
        if self.up is None:
            self.pending.append(data)
        elif self.up.transport is not None and not self.up.transport.is_closing():
            self.up.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()


async def _callbacks(upstream_port: int, port: int, parse: bool) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Downstream(upstream_port, parse), "127.0.0.1", port, backlog=1024
    )
    await server.serve_forever()


class _Cycle:
    """What uvicorn's protocol reads and writes on ``self.cycle`` while a request is in flight
    (``on_body``, ``on_message_complete``, ``connection_lost``, ``shutdown``)."""

    __slots__ = ("body", "disconnected", "keep_alive", "more_body", "response_complete")

    class _NoEvent:
        def set(self) -> None:
            pass

    message_event = _NoEvent()  # nothing ever waits on it: the request has no body

    def __init__(self, keep_alive: bool) -> None:
        self.response_complete = False
        self.keep_alive = keep_alive
        self.more_body = True
        self.disconnected = False
        self.body = b""


class _CallbackUp(asyncio.Protocol):
    """One kept-alive upstream connection, its answer parsed by httptools' callbacks."""

    def __init__(self, idle: list[_CallbackUp]) -> None:
        import httptools

        self.idle = idle
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.down: Any = None
        self.cycle: _Cycle | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.idle:
            self.idle.remove(self)
        if self.down is not None and not self.down.transport.is_closing():
            self.down.transport.close()

    def on_message_begin(self) -> None:
        self.headers = []
        self.body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        down, cycle = self.down, self.cycle
        self.down = self.cycle = None
        if self.parser.should_keep_alive():
            self.idle.append(self)
        elif self.transport is not None:
            self.transport.close()
        if down is not None and cycle is not None:
            down.answer(cycle, self.status, self.headers, b"".join(self.body))


def _callback(upstream_port: int, port: int) -> None:
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE

    from room_cloud_runtime._settings import load_settings
    from room_cloud_runtime.cli import server_options

    idle: list[_CallbackUp] = []
    options = server_options(load_settings({}))
    guarded = options["http"]

    class Forwarding(guarded):  # type: ignore[valid-type, misc]
        def on_headers_complete(self) -> None:
            parser = self.parser
            if parser.should_upgrade() or parser.get_method() not in (b"GET", b"HEAD"):
                super().on_headers_complete()  # the ASGI path (the app below answers 404)
                return
            # The guard's bookkeeping, as GuardedHttpToolsProtocol.on_headers_complete does it.
            self._reading_head = self._draining = False
            self._in_body = True
            self._head_bytes = 0
            self._cancel_head_timer()
            cycle = _Cycle(parser.should_keep_alive())
            existing, self.cycle = self.cycle, cycle
            out = [parser.get_method(), b" ", self.url, b" HTTP/1.1\r\n"]
            for name, value in self.headers:
                if name not in _HOP:
                    out += [name, b": ", value, b"\r\n"]
            out.append(b"host: 127.0.0.1:%d\r\n\r\n" % upstream_port)
            head = b"".join(out)
            if existing is not None and not existing.response_complete:
                self.flow.pause_reading()  # pipelined: uvicorn starts it at on_response_complete
                self.pipeline.appendleft((cycle, head))
            else:
                self._forward(cycle, head)

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            if isinstance(cycle, _Cycle):
                self._forward(cycle, app)
            else:
                super()._start_asgi_task(cycle, app)

        def _forward(self, cycle: _Cycle, head: bytes) -> None:
            if idle:
                up = idle.pop()
                up.down, up.cycle = self, cycle
                up.transport.write(head)  # type: ignore[union-attr]
            else:
                self.loop.create_task(self._connect(cycle, head))

        async def _connect(self, cycle: _Cycle, head: bytes) -> None:
            _, up = await self.loop.create_connection(
                lambda: _CallbackUp(idle), "127.0.0.1", upstream_port
            )
            up.down, up.cycle = self, cycle
            up.transport.write(head)  # type: ignore[union-attr]

        def answer(self, cycle: _Cycle, status: int, headers: list[Any], body: bytes) -> None:
            if self.transport.is_closing():
                return
            out = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                out += [name, b": ", value, b"\r\n"]
            for name, value in headers:
                if name not in _HOP and name != b"content-length":
                    out += [name, b": ", value, b"\r\n"]
            out.append(b"content-length: %d\r\n" % len(body))
            if not cycle.keep_alive:
                out.append(b"connection: close\r\n")
            out += [b"\r\n", body]
            self.transport.write(b"".join(out))
            cycle.response_complete = True
            if not cycle.keep_alive:
                self.transport.close()
            self.on_response_complete()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    options["http"] = Forwarding
    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, log_level="warning", **options)


def _asgi(upstream_port: int, port: int) -> None:
    import uvicorn

    from room_cloud_runtime._settings import load_settings
    from room_cloud_runtime._upstream_http import UpstreamPool, request_head
    from room_cloud_runtime.cli import server_options

    pool: UpstreamPool | None = None

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal pool
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if pool is None:
            pool = UpstreamPool("127.0.0.1", upstream_port)
        headers = [(n, v) for n, v in scope["headers"] if n not in _HOP]
        headers.append((b"host", b"127.0.0.1:%d" % upstream_port))
        target = scope["raw_path"] + (
            b"?" + scope["query_string"] if scope["query_string"] else b""
        )
        head = request_head(scope["method"], target.decode("latin-1"), headers)
        response = await pool.request("127.0.0.1", head)
        try:
            payload = await response.read()
            out = [(n, v) for n, v in response.headers if n not in _HOP]
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            await send({"type": "http.response.body", "body": payload})
        finally:
            response.release()

    options = server_options(load_settings({}))
    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, log_level="warning", **options)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in MODES:
        print(f"usage: python -m bench.gateway_floors {{{'|'.join(MODES)}}} UPSTREAM PORT")
        return 2
    mode, upstream_port, port = argv[0], int(argv[1]), int(argv[2])
    if mode == "asgi":
        _asgi(upstream_port, port)
        return 0
    if mode == "callback":
        _callback(upstream_port, port)
        return 0
    import uvloop

    uvloop.run(_callbacks(upstream_port, port, parse=mode == "parse"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
