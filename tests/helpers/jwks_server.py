"""A real JWKS endpoint for tests: uvicorn on 127.0.0.1 (free port) in a background thread.

Usage::

    with JWKSServer(factory.jwks(), max_age=300) as server:
        cache = JWKSCache(server.url)           # server.issuer is the base URL
        server.jwks = other_factory.jwks()      # publish a new set (rotation)
        server.fail_with(500)                   # answer 500 until server.recover()
        server.hang()                           # hold requests (client timeout)
        server.go_down()                        # stop listening (connection refused)
        server.come_back()                      # listen again on the same port
        server.requests                         # GET count on the JWKS path

Fixtures: this module defines ``token_factory`` and ``jwks_server`` (served from the factory's
keys, issuer = server base URL). Enable them with ``pytest_plugins = ["tests.helpers.jwks_server"]``
in the root ``tests/conftest.py``, or import them into a test module.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import pytest
import uvicorn

from tests.helpers.tokens import TokenFactory

JWKS_PATH = "/.well-known/jwks.json"
INSTANCE_ID = "inst-test-1"


class JWKSServer:
    """Serves ``GET /.well-known/jwks.json`` from a mutable dict (``.jwks``) over real HTTP.

    Switches (thread-safe enough for tests: plain attribute writes read by the server loop):
    ``max_age`` (Cache-Control; ``None`` sends no header), ``status`` / :meth:`fail_with`,
    ``body`` (raw bytes served instead of ``jwks``), ``delay`` (seconds before answering),
    :meth:`hang`, :meth:`go_down` / :meth:`come_back`.
    """

    def __init__(
        self, jwks: dict[str, Any] | None = None, *, max_age: int | None = 300, port: int = 0
    ) -> None:
        self.jwks: dict[str, Any] = jwks if jwks is not None else {"keys": []}
        self.max_age = max_age
        self.status = 200
        self.body: bytes | None = None
        self.delay = 0.0
        self.requests = 0
        self._hanging = False
        self._port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- addresses ---------------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        """Base URL (what the control plane puts in ``iss``)."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        return self.issuer + JWKS_PATH

    # -- switches ----------------------------------------------------------------------------

    def fail_with(self, status: int = 500) -> None:
        self.status = status

    def hang(self) -> None:
        """Hold every request open until :meth:`recover` or shutdown (client sees a timeout)."""
        self._hanging = True

    def recover(self) -> None:
        """Back to answering 200 immediately with ``jwks``."""
        self.status = 200
        self.body = None
        self.delay = 0.0
        self._hanging = False

    def go_down(self) -> None:
        """Stop listening: clients get connection refused."""
        self._stop()

    def come_back(self) -> None:
        """Listen again on the same port."""
        self.recover()
        self._start()

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> JWKSServer:
        self._start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    async def __aenter__(self) -> JWKSServer:
        await asyncio.to_thread(self._start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self._stop)

    def _start(self) -> None:
        if self._server is not None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port))
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            interface="asgi3",
            ws="none",
            http="h11",
            loop="asyncio",
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="jwks-server", daemon=True
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("JWKS test server did not start")
            time.sleep(0.005)

    def _stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        self._hanging = False  # release held requests so shutdown is quick
        server.should_exit = True
        thread.join(timeout=10)

    # -- the ASGI app ------------------------------------------------------------------------

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != JWKS_PATH or scope["method"] != "GET":
            await _send(send, 404, b'{"error":"not found"}', [])
            return
        self.requests += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        while self._hanging:
            await asyncio.sleep(0.02)
        headers: list[tuple[bytes, bytes]] = []
        if self.max_age is not None:
            headers.append((b"cache-control", f"public, max-age={self.max_age}".encode()))
        body = self.body if self.body is not None else json.dumps(self.jwks).encode()
        await _send(send, self.status, body, headers)


async def _send(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def jwks_server() -> Iterator[JWKSServer]:
    """A running JWKS server with no keys yet (``token_factory`` fills it)."""
    with JWKSServer() as server:
        yield server


@pytest.fixture
def token_factory(jwks_server: JWKSServer) -> TokenFactory:
    """A factory whose issuer is the server's base URL and whose keys the server publishes.

    After ``token_factory.rotate()``, publish again with ``jwks_server.jwks =
    token_factory.jwks()``.
    """
    factory = TokenFactory(issuer=jwks_server.issuer, instance_id=INSTANCE_ID)
    jwks_server.jwks = factory.jwks()
    return factory
