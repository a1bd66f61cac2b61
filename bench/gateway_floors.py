"""What forwarding alone costs in Python: floors to read the gateway's figures against.

    python -m bench.gateway_floors {pipe|parse|asgi} UPSTREAM_PORT PORT

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
- ``asgi``: the gateway's own server (uvicorn with the runtime's guarded httptools protocol and
  options, ``cli.server_options``) around an ASGI app that forwards through the gateway's own
  client (``_upstream_http.UpstreamPool``): hop-by-hop headers dropped, nothing else done. The
  gateway is this plus the stack, the identity swap, a source address per user and the access log.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

MODES = ("pipe", "parse", "asgi")
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
    import uvloop

    uvloop.run(_callbacks(upstream_port, port, parse=mode == "parse"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
