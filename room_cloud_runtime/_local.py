"""Local mode: the Room's own handshake/token flow untouched, plus two small guards.

- A Host allowlist (localhost, 127.0.0.1, [::1], any port): a page on an attacker's domain that
  re-binds its DNS name to 127.0.0.1 still sends its own name as Host, so it is refused here
  (DNS rebinding). A request without a Host header cannot come from a browser and passes.
- ``/api/status`` reports ``deploymentMode: "local"``.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from ._endpoints import STATUS_PATH, merge_status
from ._responses import deny_websocket, send_error

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


class LocalGuard:
    """Refuse non-loopback ``Host`` headers and report local mode in ``/api/status``."""

    def __init__(self, app: ASGIApp, *, allowed_hosts: Iterable[str] = LOOPBACK_HOSTS) -> None:
        self.app = app
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = _host(scope)
        if host is not None and host not in self.allowed_hosts:
            message, code = "this server only answers on localhost", "host_not_allowed"
            if kind == "http":
                await send_error(send, 403, message, code)
            else:
                await deny_websocket(scope, send, 403, message, code)
            return
        if kind == "http" and scope["path"] == STATUS_PATH and scope["method"] in ("GET", "HEAD"):
            await merge_status(self.app, scope, receive, send, {"deploymentMode": "local"})
            return
        await self.app(scope, receive, send)


def _host(scope: Scope) -> str | None:
    """The Host header's name part, lowercased, without port and trailing dot; None if absent."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"host":
            raw = value.decode("latin-1").strip().lower()
            if raw.startswith("["):
                end = raw.find("]")
                return raw[: end + 1] if end != -1 else raw
            return raw.rsplit(":", 1)[0].rstrip(".") if ":" in raw else raw.rstrip(".")
    return None
