"""Early answers in raw ASGI: JSON errors in the Room's shape, and refused WebSocket upgrades.

Error bodies are ``{"error": "<message>", "code": "<machine_code>"}`` as the Room's API answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from starlette.types import Scope, Send

Headers = list[tuple[bytes, bytes]]

_JSON = (b"content-type", b"application/json")


def json_body(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def error_body(message: str, code: str) -> bytes:
    return json_body({"error": message, "code": code})


async def send_json(
    send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Send a whole JSON response (``http.response.start`` + one body message)."""
    raw: Headers = [_JSON, (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def send_error(
    send: Send,
    status: int,
    message: str,
    code: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    await send_json(send, status, error_body(message, code), headers)


async def deny_websocket(
    scope: Scope,
    send: Send,
    status: int,
    message: str,
    code: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Refuse a WebSocket upgrade before it is accepted.

    With the ASGI "websocket.http.response" extension (uvicorn has it) the client gets a real
    HTTP status and the JSON error; otherwise the handshake is closed with 1008 (policy).
    """
    if "websocket.http.response" in scope.get("extensions", {}):
        body = error_body(message, code)
        raw: Headers = [_JSON, (b"content-length", str(len(body)).encode()), *headers]
        await send({"type": "websocket.http.response.start", "status": status, "headers": raw})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": code})
