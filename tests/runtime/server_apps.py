"""Plain ASGI apps for the server tests, importable by name (``quoroom-runtime serve --app``
loads its app in granian's worker process)."""

from __future__ import annotations

from typing import Any


async def hello(scope: Any, receive: Any, send: Any) -> None:
    """Reads the whole body, then answers 200 ``hello``."""
    if scope["type"] != "http":
        return
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


async def early(scope: Any, receive: Any, send: Any) -> None:
    """Answers 413 at once, without reading the body (as the Room does past its limit)."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 413, "headers": []})
    await send({"type": "http.response.body", "body": b"too large"})


async def route(scope: Any, receive: Any, send: Any) -> None:
    """``/early``: :func:`early`; anything else: :func:`hello`."""
    await (early if scope.get("path") == "/early" else hello)(scope, receive, send)
