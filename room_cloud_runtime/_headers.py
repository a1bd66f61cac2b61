"""Security headers on every HTTP response, refusals from inner layers included.

The layer sits outermost (DESIGN.md "Runtime pipeline", step 1), so the 401/403/413/429 answers
of the inner layers carry the same headers as the Room app's own responses. A refused WebSocket
upgrade answered with the ASGI ``websocket.http.response`` extension gets them too.

What is added, and why:

- ``Strict-Transport-Security: max-age=…; includeSubDomains`` — the runtime is only ever reached
  over HTTPS behind Fly's proxy; browsers ignore the header on plain HTTP, so it is harmless in
  local development.
- ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY`` and
  ``Content-Security-Policy: frame-ancestors 'none'`` — no MIME sniffing, no framing
  (clickjacking). The CSP is only added when the app sent none: its own policy wins.
- ``Referrer-Policy: no-referrer`` — not ``strict-origin-when-cross-origin``: launch links may carry
  a token in the URL, and even the origin of an instance is nobody else's business.
- ``Cross-Origin-Opener-Policy: same-origin`` — no cross-origin window can script the UI's window.
- ``Cache-Control: no-store`` on ``/api/`` paths, replacing whatever the app sent: API answers
  carry tokens, profiles and room data that no shared or browser cache may keep.

A header the app already set is never duplicated (its value wins), except ``Cache-Control`` on
API paths. Everything is prebuilt at construction; per response the layer scans the app's
(usually few) header names once.
"""

from __future__ import annotations

from collections.abc import Awaitable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._errors import ConfigError

Header = tuple[bytes, bytes]

_CACHE_CONTROL = b"cache-control"
_NO_STORE: Header = (_CACHE_CONTROL, b"no-store")


class SecurityHeaders:
    """Pure ASGI middleware adding security headers to HTTP responses and WebSocket denials.

    :param app: the ASGI app to wrap.
    :param hsts_max_age: ``max-age`` of ``Strict-Transport-Security`` in seconds (0 tells browsers
        to forget the policy); ``None`` leaves the header out.
    :param api_prefix: path prefix of the JSON API, whose responses get ``Cache-Control:
        no-store``. The prefix without its trailing slash (``/api``) counts too.
    """

    __slots__ = ("_api_exact", "_api_headers", "_api_prefix", "_headers", "_names", "app")

    def __init__(
        self,
        app: ASGIApp,
        *,
        hsts_max_age: int | None = 31_536_000,
        api_prefix: str = "/api/",
    ) -> None:
        if hsts_max_age is not None and (
            not isinstance(hsts_max_age, int) or isinstance(hsts_max_age, bool) or hsts_max_age < 0
        ):
            raise ConfigError(
                "hsts_max_age", f"must be a non-negative integer, got {hsts_max_age!r}"
            )
        if not isinstance(api_prefix, str) or not api_prefix.startswith("/"):
            raise ConfigError("api_prefix", f"must be a path starting with '/', got {api_prefix!r}")
        self.app = app
        headers: list[Header] = []
        if hsts_max_age is not None:
            headers.append(
                (
                    b"strict-transport-security",
                    b"max-age=%d; includeSubDomains" % hsts_max_age,
                )
            )
        headers += [
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"content-security-policy", b"frame-ancestors 'none'"),
            (b"referrer-policy", b"no-referrer"),
            (b"cross-origin-opener-policy", b"same-origin"),
        ]
        self._headers: tuple[Header, ...] = tuple(headers)
        self._api_headers: tuple[Header, ...] = (*headers, _NO_STORE)
        self._names = frozenset(name for name, _ in self._api_headers)
        self._api_prefix = api_prefix
        self._api_exact = api_prefix.rstrip("/") or "/"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            start = "http.response.start"
        elif kind == "websocket":
            # Only a denial (HTTP answer instead of the 101) carries headers worth securing.
            start = "websocket.http.response.start"
        else:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        on_api = path.startswith(self._api_prefix) or path == self._api_exact
        extra = self._api_headers if on_api else self._headers
        names = self._names

        # A plain function handing back send's awaitable, not a coroutine: it saves a coroutine
        # frame per message on the hot path (ASGI only asks that send's result be awaitable).
        def send_secured(message: Message) -> Awaitable[None]:
            if message["type"] == start:
                headers = message.get("headers", ())
                for name, _ in headers:
                    if name in names:  # the app set one of ours (ASGI: lowercase names)
                        merged = _merge(headers, extra, names, on_api)
                        break
                else:
                    merged = [*headers, *extra]
                message = {**message, "headers": merged}
            return send(message)

        await self.app(scope, receive, send_secured)


def _merge(
    headers: list[Header] | tuple[Header, ...],
    extra: tuple[Header, ...],
    names: frozenset[bytes],
    on_api: bool,
) -> list[Header]:
    """The app's headers plus ours, ours skipped where the app set the same name.

    The common case (the app set none of our headers) is one pass over the app's header names
    and a list concatenation. Names are compared as sent: the ASGI spec requires response header
    names to be lowercase (Starlette and FastAPI comply), and this runs on every response.
    """
    present: set[bytes] | None = None
    for name, _ in headers:
        if name in names:
            if present is None:
                present = set()
            present.add(name)
    if present is None:
        return [*headers, *extra]
    if on_api and _CACHE_CONTROL in present:
        # Ours replaces the app's: a cached API answer can leak one user's data to another.
        headers = [item for item in headers if item[0] != _CACHE_CONTROL]
        present.discard(_CACHE_CONTROL)
    return [*headers, *(item for item in extra if item[0] not in present)]
