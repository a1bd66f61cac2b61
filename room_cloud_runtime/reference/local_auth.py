"""Local mode's way in: the loopback checks of the handshake and the local-token layer."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Final

from starlette.types import ASGIApp, Receive, Scope, Send

from .._responses import deny_websocket, send_error
from .._scope import principal_of

# Routes a local client may call without the local token, as in the Room.
_PUBLIC_API: Final = frozenset({"/api/status", "/api/auth/handshake"})
_LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})


def _is_loopback_ip(host: str | None) -> bool:
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def _hostname(authority: str) -> str:
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1 : authority.find("]")] if "]" in authority else ""
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def _is_loopback_origin(origin: str) -> bool:
    scheme, sep, rest = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and _hostname(rest) in _LOOPBACK_NAMES


class _LocalAuth:
    """Local mode's token check, as pure ASGI so a refusal never reaches a route.

    Skipped when an outer stack has put a principal in the scope: that stack has already
    authenticated and authorised the request.
    """

    def __init__(self, app: ASGIApp, *, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or principal_of(scope) is not None:
            await self.app(scope, receive, send)
            return
        # Lower-cased and without a trailing slash, so /API/Rooms/ is not a way around this.
        path = scope["path"].lower().rstrip("/") or "/"
        needs_token = kind == "websocket" or (
            (path == "/api" or path.startswith("/api/")) and path not in _PUBLIC_API
        )
        if not needs_token or self._presented_ok(scope):
            await self.app(scope, receive, send)
            return
        if kind == "websocket":
            await deny_websocket(scope, send, 401, "local token required", "unauthenticated")
        else:
            await send_error(
                send,
                401,
                "local token required",
                "unauthenticated",
                [(b"www-authenticate", b'Bearer realm="quoroom-room"')],
            )

    def _presented_ok(self, scope: Scope) -> bool:
        presented: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    presented = credentials.strip()
                break
        if presented is None and scope["type"] == "websocket":
            # Browsers cannot set headers on a WebSocket; the Room takes ?token= (never logged).
            for pair in scope.get("query_string", b"").split(b"&"):
                key, _, value = pair.partition(b"=")
                if key == b"token":
                    presented = value
                    break
        # compare_digest: no timing side channel on how much of the token matched.
        return presented is not None and hmac.compare_digest(presented, self._token)
