"""Authentication: a control-plane runtime JWT becomes a frozen Principal in ``scope["state"]``.

Where the token comes from:

- HTTP: ``Authorization: Bearer <jwt>`` only. (A token in a URL ends up in logs and Referer
  headers; only WebSockets, which browsers cannot give headers, may use the URL.) In gateway
  mode, ``query_token_route`` names the few routes of the Room that a browser navigates to with
  ``?token=``; there the query token is taken (and removed) as on a WebSocket.
- WebSocket: a ``Sec-WebSocket-Protocol`` entry ``quoroom.bearer.<jwt>`` (offered next to
  ``quoroom``, which the stack then selects), or ``?token=<jwt>``. Either is removed from the
  scope before the Room app sees it, so the app can neither log nor echo it.

Refusals are 401 ``{"error", "code"}`` with ``WWW-Authenticate: Bearer``; a JWKS that was never
loaded or is too stale fails closed with 503 ``keys_unavailable``. An accepted WebSocket is closed
(4401 ``token_expired``) when its token expires: no proxy or server does that for us
(pomerium#1279, #1327).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._errors import KeysUnavailableError, TokenError
from ._refusal_reports import note_refusal
from ._responses import deny_websocket, send_error
from ._scope import CLIENT_ADDRESS, PRINCIPAL, Principal, state_of
from ._verify import TokenVerifier

logger = logging.getLogger("room_cloud_runtime.auth")

WS_TOKEN_PREFIX = "quoroom.bearer."  # noqa: S105 - a prefix, not a secret
WS_PROTOCOL = "quoroom"
# Application close code (4000-4999 are the application's): 4401 reads as "401 on a socket".
WS_CLOSE_TOKEN_EXPIRED = 4401

_WWW_AUTHENTICATE = (b"www-authenticate", b'Bearer realm="quoroom"')
_WWW_AUTHENTICATE_INVALID = (b"www-authenticate", b'Bearer realm="quoroom", error="invalid_token"')
_RETRY_SOON = (b"retry-after", b"5")


class Verifier(Protocol):
    """What the auth layer needs from a token verifier (see ``_verify.TokenVerifier``).

    With the runtime's own :class:`~room_cloud_runtime._verify.TokenVerifier` the layer first
    tries its synchronous ``cached`` look-up, so a warm request costs no coroutine; any other
    verifier is only ever asked through :meth:`verify`.
    """

    async def verify(self, token: str) -> Principal: ...


class Authenticate:
    """Verify the runtime token on ``/api/*`` and WebSocket paths; pass public paths through.

    ``public_paths`` are answered without a token (a token, if sent, is still verified so the
    inner layers can use it); paths outside ``protected_prefixes`` (the static UI) need none.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        verifier: Verifier,
        protected_prefixes: Iterable[str] = ("/api/",),
        websocket_paths: Iterable[str] = ("/ws",),
        public_paths: Iterable[str] = ("/api/status", "/api/auth/handshake"),
        clock: Callable[[], float] = time.time,
        query_token_route: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.app = app
        self.verifier = verifier
        # Gateway mode: the Room's routes a browser navigates to take ``?token=`` (there is no
        # way to send a header with a navigation). Everywhere else HTTP takes the header only.
        self.query_token_route = query_token_route
        self._cached: Callable[[str], Principal | None] | None = (
            verifier.cached if isinstance(verifier, TokenVerifier) else None
        )
        self.protected_prefixes = tuple(protected_prefixes)
        self.websocket_paths = frozenset(websocket_paths)
        self.public_paths = frozenset(public_paths)
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":  # HTTP inline below: one coroutine frame less per request
            if kind == "websocket":
                await self._websocket(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if not path.startswith(self.protected_prefixes) and path not in self.websocket_paths:
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        if (
            token is None
            and self.query_token_route is not None
            and self.query_token_route(scope["method"], path)
        ):
            scope, token, _ = _take_websocket_token(scope)
        if token is None:
            if path in self.public_paths:
                await self.app(scope, receive, send)
                return
            _log_refusal(scope, "missing_token")
            await send_error(
                send, 401, "authentication required", "missing_token", (_WWW_AUTHENTICATE,)
            )
            return
        cached = self._cached
        try:
            principal = cached(token) if cached is not None else None
            if principal is None:
                principal = await self.verifier.verify(token)
        except TokenError as exc:
            _log_refusal(scope, exc.code, exc)
            await send_error(send, exc.status, exc.message, exc.code, (_WWW_AUTHENTICATE_INVALID,))
            return
        except KeysUnavailableError:
            _log_refusal(scope, KeysUnavailableError.code)
            await send_error(
                send,
                503,
                "token keys are unavailable, try again shortly",
                KeysUnavailableError.code,
                (_RETRY_SOON,),
            )
            return
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state[PRINCIPAL] = principal
        await self.app(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] not in self.websocket_paths:
            await self.app(scope, receive, send)
            return
        scope, token, via_protocol = _take_websocket_token(scope)
        if token is None:
            # Non-browser clients can send a header on the upgrade (advertised in /api/status).
            token = _bearer(scope)
        if token is None:
            _log_refusal(scope, "missing_token")
            await deny_websocket(scope, send, 401, "authentication required", "missing_token")
            return
        try:
            principal = await self.verifier.verify(token)
        except TokenError as exc:
            _log_refusal(scope, exc.code, exc)
            await deny_websocket(scope, send, exc.status, exc.message, exc.code)
            return
        except KeysUnavailableError:
            _log_refusal(scope, KeysUnavailableError.code)
            await deny_websocket(
                scope, send, 503, "token keys are unavailable", KeysUnavailableError.code
            )
            return
        state_of(scope)[PRINCIPAL] = principal
        session = _ExpiringSocket(send, principal.expires_at, self.clock, via_protocol, scope)
        try:
            await self.app(scope, receive, session.send)
        finally:
            session.cancel()


class _ExpiringSocket:
    """Wraps a WebSocket's ``send``: picks the subprotocol and closes the socket at token expiry."""

    def __init__(
        self,
        send: Send,
        expires_at: float,
        clock: Callable[[], float],
        via_protocol: bool,
        scope: Scope,
    ) -> None:
        self._send = send
        self._expires_at = expires_at
        self._clock = clock
        self._via_protocol = via_protocol
        self._offered = scope.get("subprotocols") or []
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._lock = asyncio.Lock()

    async def send(self, message: Message) -> None:
        async with self._lock:
            if self._closed:
                # We closed the socket at expiry; the app's late sends have nowhere to go.
                return
            kind = message["type"]
            if kind == "websocket.accept":
                if self._via_protocol and message.get("subprotocol") is None and self._offered:
                    # Browsers fail a handshake that offered protocols and got none back.
                    message = {
                        **message,
                        "subprotocol": WS_PROTOCOL
                        if WS_PROTOCOL in self._offered
                        else self._offered[0],
                    }
                await self._send(message)
                delay = max(0.0, self._expires_at - self._clock())
                self._timer = asyncio.get_running_loop().call_later(delay, self._expire)
                return
            if kind == "websocket.close":
                self._closed = True
            await self._send(message)

    def _expire(self) -> None:
        self._task = asyncio.ensure_future(self._close_expired())

    async def _close_expired(self) -> None:
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            logger.info("websocket closed at token expiry")
            try:
                await self._send(
                    {
                        "type": "websocket.close",
                        "code": WS_CLOSE_TOKEN_EXPIRED,
                        "reason": "token_expired",
                    }
                )
            except Exception:
                logger.debug("close at expiry found the socket gone")

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _bearer(scope: Scope) -> str | None:
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip().decode("latin-1")
            return None
    return None


def _take_websocket_token(scope: Scope) -> tuple[Scope, str | None, bool]:
    """Find the token of a WebSocket upgrade and return a scope with it removed."""
    token: str | None = None
    via_protocol = False
    offered: list[str] = list(scope.get("subprotocols") or [])
    kept = [p for p in offered if not p.startswith(WS_TOKEN_PREFIX)]
    if len(kept) != len(offered):
        token = next(p for p in offered if p.startswith(WS_TOKEN_PREFIX))[len(WS_TOKEN_PREFIX) :]
        via_protocol = True
    query: bytes = scope.get("query_string", b"")
    if b"token=" in query:
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
        rest = [(k, v) for k, v in pairs if k != "token"]
        if token is None:
            token = next((v for k, v in pairs if k == "token"), None)
        query = urlencode(rest).encode("latin-1")
    headers = [(k, v) for k, v in scope["headers"] if k != b"sec-websocket-protocol"]
    if kept:
        headers.append((b"sec-websocket-protocol", ", ".join(kept).encode("latin-1")))
    new_scope: dict[str, Any] = {
        **scope,
        "subprotocols": kept,
        "query_string": query,
        "headers": headers,
    }
    return new_scope, (token or None), via_protocol


def _log_refusal(scope: Scope, code: str, exc: TokenError | None = None) -> None:
    # Counted for the owner's access log (a dict increment; off unless reports are configured).
    note_refusal(scope, "wrong_instance" if getattr(exc, "claim", None) == "instanceId" else code)
    # Never the token, the Authorization header or the query string: only what helps an operator.
    state = scope.get("state") or {}
    logger.info(
        "auth refused",
        extra={"code": code, "path": scope.get("path"), "client": state.get(CLIENT_ADDRESS)},
    )
