"""The peer stack: the same reference Room hardened the common way, for side-by-side numbers.

What a careful team would write with the usual pieces, in the usual order (outermost first):

1. Starlette's ``CORSMiddleware`` allowing the same origin (credentials on). As shipped it only
   leaves the CORS headers out for a disallowed origin: the request still reaches the app, and
   WebSocket upgrades are not looked at (PITFALLS.md "CORS, headers, WebSockets").
2. slowapi's ``SlowAPIMiddleware`` (a ``BaseHTTPMiddleware``) with a ``Limiter`` keyed by
   ``get_remote_address`` and our address budget as its default limit. Behind a proxy the common
   setup lets uvicorn rewrite the client address from ``X-Forwarded-For`` (uvicorn trusts
   127.0.0.1 by default), which is what the load generator relies on to give each simulated user
   its own address. slowapi skips WebSockets and unmatched routes (laurentS/slowapi#281).
3. :class:`JWTAuth`, a ``BaseHTTPMiddleware`` (the common way to write an auth middleware),
   verifying every request with PyJWT's ``PyJWKClient`` (JWKS fetched over HTTP with blocking
   ``urllib``, cached for its ``lifespan``) and ``jwt.decode`` — no verified-claims cache. It
   checks the same claims as ours (issuer, audience, ``exp``/``nbf``, ``instanceId``, ``role``)
   and a minimal role rule for the two owner-only routes the load touches, so members are refused
   the same writes. ``BaseHTTPMiddleware`` passes WebSocket scopes through untouched, so the same
   class checks the upgrade's ``Sec-WebSocket-Protocol`` token itself (otherwise the Room would
   ask for its local token and every socket would fail).

The Room trusts a :class:`~room_cloud_runtime._scope.Principal` in ``scope["state"]``, exactly as
behind our stack, so both run the same handlers.
"""

from __future__ import annotations

import re
from typing import Any

import jwt
from jwt import PyJWKClient
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.middleware import SlowAPIMiddleware
from slowapi.util import get_remote_address
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from room_cloud_runtime import reference
from room_cloud_runtime._scope import PRINCIPAL, Principal, state_of
from room_cloud_runtime._settings import RuntimeSettings

WS_PREFIX = "quoroom.bearer."
# The owner-only routes (as in our DEFAULT_POLICY): creating rooms and reading credentials.
_OWNER_ONLY = (("POST", re.compile(r"^/api/rooms/?$")), ("GET", re.compile(r"^/api/credentials/")))


def _error(status: int, message: str, code: str) -> Response:
    return JSONResponse({"error": message, "code": code}, status_code=status)


class JWTAuth(BaseHTTPMiddleware):
    """Bearer JWT on every request through ``PyJWKClient`` + ``jwt.decode`` (no claims cache)."""

    def __init__(self, app: ASGIApp, *, jwks_url: str, settings: RuntimeSettings) -> None:
        super().__init__(app)
        self.jwks = PyJWKClient(jwks_url)
        self.settings = settings

    def principal(self, token: str) -> Principal:
        s = self.settings
        key = self.jwks.get_signing_key_from_jwt(token)
        claims: dict[str, Any] = jwt.decode(
            token,
            key.key,
            algorithms=list(s.algorithms),
            audience=s.audience,
            issuer=s.issuer,
            leeway=s.leeway_seconds,
            options={"require": ["exp", "iat", "nbf", "sub", "iss", "aud"]},
        )
        role = claims.get("role")
        if claims.get("instanceId") != s.instance_id or role not in ("owner", "member"):
            raise jwt.InvalidTokenError("wrong instance or role")
        return Principal(
            subject=str(claims["sub"]),
            role=role,
            instance_id=str(claims["instanceId"]),
            session_id=str(claims.get("sid", "")),
            token_id=str(claims.get("jti", "")),
            expires_at=float(claims["exp"]),
            claims=claims,
        )

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if not request.url.path.startswith("/api/") or request.url.path == "/api/status":
            return await call_next(request)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return _error(401, "bearer token required", "unauthenticated")
        try:
            principal = self.principal(token.strip())
        except (jwt.PyJWTError, KeyError, ValueError):
            return _error(401, "invalid token", "invalid_token")
        if principal.role != "owner" and any(
            request.method == method and pattern.match(request.url.path)
            for method, pattern in _OWNER_ONLY
        ):
            return _error(403, "owner role required", "forbidden")
        state_of(request.scope)[PRINCIPAL] = principal
        return await call_next(request)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await super().__call__(scope, receive, send)
            return
        token = next(
            (
                p[len(WS_PREFIX) :]
                for p in scope.get("subprotocols") or []
                if p.startswith(WS_PREFIX)
            ),
            None,
        )
        try:
            if token is None:
                raise jwt.InvalidTokenError("no token")
            state_of(scope)[PRINCIPAL] = self.principal(token)
        except (jwt.PyJWTError, KeyError, ValueError):
            await send({"type": "websocket.close", "code": 1008})
            return

        async def accept_with_protocol(message: Any) -> None:
            # Answer the application's subprotocol, as a browser requires one of those offered.
            if message["type"] == "websocket.accept" and message.get("subprotocol") is None:
                message = {**message, "subprotocol": "quoroom"}
            await send(message)

        await self.app(scope, receive, accept_with_protocol)


def peer_app(jwks_url: str, settings: RuntimeSettings) -> Starlette:
    """The reference Room with CORSMiddleware + slowapi + PyJWKClient, budgets from ``settings``."""
    room = reference.create_room_app()
    limiter = Limiter(key_func=get_remote_address, default_limits=[settings.address_limit])
    room.state.limiter = limiter
    room.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    # add_middleware puts each new one outermost: CORS → slowapi → JWT → the Room's own.
    room.add_middleware(JWTAuth, jwks_url=jwks_url, settings=settings)
    room.add_middleware(SlowAPIMiddleware)
    room.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.allowed_origins),
        allow_credentials=True,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    return room
