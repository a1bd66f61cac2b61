"""FastAPI dependencies as ``Annotated`` aliases: ``SessionDep``, ``SettingsDep``, ``AuthDep``,
``CurrentAuth``, ``CurrentUser``, ``ClientAddress``, ``Now``.

Authentication reads the access token from ``Authorization: Bearer`` first, else the ``qr_access``
cookie; a cookie-authenticated unsafe request must also pass the CSRF checks. The session named by
the token's ``sid`` must still be live, so signing out takes effect at once on the control plane.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

import jwt
from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.cookies import cookie_names
from control_plane.auth.csrf import SAFE_METHODS
from control_plane.auth.models import User, UserSession
from control_plane.auth.service import ACCESS_AUDIENCE, AuthContext
from control_plane.errors import InvalidAccessToken, NotAuthenticated
from control_plane.services import services_of
from control_plane.settings import Settings
from control_plane.throttle import client_address

# Development names; the names in use come from control_plane.auth.cookies.cookie_names (with
# Secure cookies they carry the __Host-/__Secure- prefixes).
ACCESS_COOKIE = "qr_access"
REFRESH_COOKIE = "qr_refresh"
MAX_BEARER_LENGTH = 4096


def _settings(request: Request) -> Settings:
    return services_of(request).core.settings


async def _session(request: Request) -> AsyncIterator[AsyncSession]:
    async with services_of(request).core.session_factory() as session:
        yield session


async def _read_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with services_of(request).core.read_session_factory() as session:
        yield session


def _auth_context(request: Request) -> AuthContext:
    return services_of(request).get(AuthContext)


def _now(request: Request) -> datetime:
    return services_of(request).core.clock()


def _address(request: Request) -> str:
    return client_address(request, services_of(request).core.settings)


SettingsDep = Annotated[Settings, Depends(_settings)]
SessionDep = Annotated[AsyncSession, Depends(_session)]
#: For requests that only read: no write lock on SQLite, READ ONLY on PostgreSQL.
ReadSessionDep = Annotated[AsyncSession, Depends(_read_session)]
AuthDep = Annotated[AuthContext, Depends(_auth_context)]
Now = Annotated[datetime, Depends(_now)]
ClientAddress = Annotated[str, Depends(_address)]


@dataclass(frozen=True, slots=True)
class Authenticated:
    """Who is calling, through which session, and how the credential arrived."""

    user: User
    session_id: str
    via: Literal["bearer", "cookie"]
    claims: dict[str, object]


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidAccessToken()
    return token.strip()


async def authenticate_request(
    request: Request, db: AsyncSession, ctx: AuthContext, now: datetime
) -> Authenticated | None:
    """The caller, or ``None`` when no credential was sent. Invalid credentials raise."""
    token = bearer_token(request)
    via: Literal["bearer", "cookie"] = "bearer"
    if token is None:
        token = request.cookies.get(cookie_names(ctx.settings).access) or None
        via = "cookie"
    if token is None:
        return None
    if len(token) > MAX_BEARER_LENGTH:
        raise InvalidAccessToken()
    try:
        claims = ctx.key_ring.verify(token, audience=ACCESS_AUDIENCE)
    except jwt.InvalidTokenError as exc:
        raise InvalidAccessToken() from exc
    sid, sub = claims.get("sid"), claims.get("sub")
    if not isinstance(sid, str) or not isinstance(sub, str):
        raise InvalidAccessToken()
    row = (
        await db.execute(
            select(User)
            .join(UserSession, UserSession.user_id == User.id)
            .where(
                UserSession.id == sid,
                User.id == sub,
                UserSession.revoked_at.is_(None),
                UserSession.expires_at > now,
            )
        )
    ).first()
    if row is None:
        raise InvalidAccessToken("the session has ended; sign in again")
    if via == "cookie" and request.method not in SAFE_METHODS:
        ctx.csrf.check(request, sid)
    return Authenticated(row[0], sid, via, claims)


async def _current_auth(request: Request, db: SessionDep, ctx: AuthDep, now: Now) -> Authenticated:
    auth = await authenticate_request(request, db, ctx, now)
    if auth is None:
        raise NotAuthenticated()
    return auth


async def _current_user(auth: Annotated[Authenticated, Depends(_current_auth)]) -> User:
    return auth.user


CurrentAuth = Annotated[Authenticated, Depends(_current_auth)]
CurrentUser = Annotated[User, Depends(_current_user)]
