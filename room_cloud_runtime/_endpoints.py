"""The few routes the stack answers itself, and the mode report merged into ``/api/status``.

- ``GET /healthz`` — 200 for Fly's checks (the address limiter skips it). With ``health`` (gateway
  mode) its status and body come from there: 503 while the Room behind the gateway is down.
- ``GET /api/auth/verify`` — the Room UI's check of its token: ``{ok, role, profile}``.
- ``/api/auth/handshake`` — the Room's localhost handshake, refused in cloud mode.
- ``GET /api/status`` — without a token only the mode and the auth capabilities (no secrets);
  with one, the Room's own status with those fields merged in.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._responses import json_body, send_error, send_json
from ._scope import principal_of

STATUS_PATH = "/api/status"


class CloudEndpoints:
    """Answers healthz, verify and handshake; reports cloud mode in ``/api/status``.

    Sits right inside :class:`Authenticate`, so a principal is in scope when a token was sent.
    ``capabilities`` is called per status request so it can report live JWKS health.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        capabilities: Callable[[], dict[str, Any]],
        healthz_path: str = "/healthz",
        health: Callable[[], tuple[int, bytes]] | None = None,
    ) -> None:
        self.app = app
        self.capabilities = capabilities
        self.health = health
        self.healthz_path = healthz_path
        self._answered = frozenset(
            {healthz_path, "/api/auth/handshake", "/api/auth/verify", STATUS_PATH}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # One set look-up lets every other request through (most of them).
        if scope["type"] != "http" or scope["path"] not in self._answered:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == self.healthz_path:
            if self.health is None:
                await send_json(send, 200, b'{"ok":true}')
            else:
                await send_json(send, *self.health())
        elif path == "/api/auth/handshake":
            await send_error(
                send, 403, "the local handshake is disabled in cloud mode", "handshake_disabled"
            )
        elif path == "/api/auth/verify":
            principal = principal_of(scope)
            if principal is None:  # Authenticate refuses first; this is defence in depth
                await send_error(send, 401, "authentication required", "missing_token")
                return
            body = {"ok": True, "role": principal.role, "profile": principal.profile()}
            await send_json(send, 200, json_body(body))
        elif path == STATUS_PATH and scope["method"] in ("GET", "HEAD"):
            extra = {"deploymentMode": "cloud", "cloud": self.capabilities()}
            if principal_of(scope) is None:
                await send_json(send, 200, json_body(extra))
            else:
                await merge_status(self.app, scope, receive, send, extra)
        else:
            await self.app(scope, receive, send)


async def merge_status(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, extra: dict[str, Any]
) -> None:
    """Call ``app`` and merge ``extra`` into its JSON-object body (status is small: buffer it)."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def capture(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            assert start is not None
            body = b"".join(chunks)
            merged = _merge(body, extra) if start["status"] == 200 else None
            if merged is not None:
                headers = [
                    (k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"
                ]
                headers.append((b"content-length", str(len(merged)).encode()))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": merged})
            else:
                await send(start)
                await send({"type": "http.response.body", "body": body})
            return
        await send(message)

    await app(scope, receive, capture)


def _merge(body: bytes, extra: dict[str, Any]) -> bytes | None:
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    payload.update(extra)
    return json_body(payload)
