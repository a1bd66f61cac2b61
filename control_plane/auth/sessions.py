"""Sessions and refresh tokens: opaque 256-bit tokens, stored hashed, rotated on every use.

Reuse detection (GoTrue's model): presenting a token that was already rotated revokes the whole
session — the token was stolen or the client is broken. Except within a short grace window
(≤ 10 s) after its rotation, for browsers with several tabs refreshing at once
(supabase/auth-js#213): the late tab gets the *same* successor the first tab got. That successor
is stored encrypted under a key derived from the rotated token, so only a holder of the rotated
token can recover it and the database alone reveals no usable token.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.models import RefreshToken, User, UserSession
from control_plane.db import new_id, rowcount
from control_plane.errors import InvalidRefreshToken

#: How far along a chain of rotations a grace-window request may follow (bounded work).
MAX_GRACE_CHAIN = 8
#: Refresh tokens are ``token_urlsafe(32)``: 43 characters; anything far off is not ours.
MAX_TOKEN_LENGTH = 128


def new_token() -> str:
    """256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def token_hash(raw: str) -> bytes:
    """Lookup key of a high-entropy token (a plain hash suffices; no password stretching)."""
    return hashlib.sha256(raw.encode()).digest()


def _successor_key(raw: str) -> bytes:
    return hashlib.sha256(b"quoroom-refresh-successor\0" + raw.encode()).digest()


def _seal_successor(raw: str, row_id: str, successor: str) -> bytes:
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(_successor_key(raw)).encrypt(nonce, successor.encode(), row_id.encode())


def _open_successor(raw: str, row: RefreshToken) -> str | None:
    sealed = row.successor_ciphertext
    if not sealed or len(sealed) < 13:
        return None
    try:
        plain = AESGCM(_successor_key(raw)).decrypt(sealed[:12], sealed[12:], row.id.encode())
    except InvalidTag:
        return None
    return plain.decode()


@dataclass(frozen=True, slots=True)
class Rotation:
    """The outcome of a refresh: the session and the refresh token the client must use next."""

    session: UserSession
    user: User
    refresh_token: str


class RefreshReuse(Exception):
    """Internal: a rotated token came back outside the grace window; ``session_id`` to revoke."""

    def __init__(self, session_id: str) -> None:
        super().__init__(session_id)
        self.session_id = session_id


async def create_session(
    db: AsyncSession,
    user: User,
    *,
    method: str,
    ttl: timedelta,
    now: datetime,
    user_agent: str | None,
    ip_address: str | None,
) -> tuple[UserSession, str]:
    """A new session and its first refresh token (flushed, not committed)."""
    session = UserSession(
        id=new_id(),
        user_id=user.id,
        created_at=now,
        last_used_at=now,
        expires_at=now + ttl,
        method=method,
        user_agent=(user_agent or "")[:255] or None,
        ip_address=ip_address,
    )
    db.add(session)
    await db.flush()  # no ORM relationship orders the inserts; the session row must exist first
    raw = new_token()
    db.add(RefreshToken(session_id=session.id, token_hash=token_hash(raw), created_at=now))
    await db.flush()
    return session, raw


async def find_refresh(db: AsyncSession, raw: str) -> tuple[RefreshToken, UserSession] | None:
    if not raw or len(raw) > MAX_TOKEN_LENGTH:
        return None
    row = (
        await db.execute(
            select(RefreshToken, UserSession)
            .join(UserSession, UserSession.id == RefreshToken.session_id)
            .where(RefreshToken.token_hash == token_hash(raw))
        )
    ).first()
    return None if row is None else (row[0], row[1])


def session_is_live(session: UserSession, now: datetime) -> bool:
    return session.revoked_at is None and session.expires_at > now


async def rotate(db: AsyncSession, raw: str, *, now: datetime, grace: timedelta) -> Rotation:
    """Exchange ``raw`` for its successor. Raises :class:`InvalidRefreshToken`, or
    :class:`RefreshReuse` (the caller revokes the session and commits that)."""
    found = await find_refresh(db, raw)
    if found is None:
        raise InvalidRefreshToken()
    row, session = found
    if not session_is_live(session, now):
        raise InvalidRefreshToken()
    user = await db.get(User, session.user_id)
    if user is None:  # pragma: no cover - cascade deletes sessions with their user
        raise InvalidRefreshToken()

    if row.rotated_at is None:
        successor = new_token()
        claimed = await db.execute(
            update(RefreshToken)
            .where(RefreshToken.id == row.id, RefreshToken.rotated_at.is_(None))
            .values(rotated_at=now, successor_ciphertext=_seal_successor(raw, row.id, successor))
            .execution_options(synchronize_session=False)
        )
        if rowcount(claimed) == 1:
            db.add(
                RefreshToken(
                    session_id=session.id, token_hash=token_hash(successor), created_at=now
                )
            )
            session.last_used_at = now
            await db.flush()
            return Rotation(session, user, successor)
        # Another request rotated it between our read and our update: take the grace path.
        await db.refresh(row)

    current_raw, current = raw, row
    for _ in range(MAX_GRACE_CHAIN):
        rotated_at = current.rotated_at
        if rotated_at is None:
            return Rotation(session, user, current_raw)
        if now - rotated_at > grace:
            break
        opened = _open_successor(current_raw, current)
        if opened is None:
            break
        found = await find_refresh(db, opened)
        if found is None or found[1].id != session.id:
            break
        current_raw, current = opened, found[0]
    raise RefreshReuse(session.id)


async def revoke_session(
    db: AsyncSession, session_id: str, *, reason: str, now: datetime, user_id: str | None = None
) -> bool:
    """Revoke one session (only ``user_id``'s when given). True when it was live."""
    stmt = (
        update(UserSession)
        .where(UserSession.id == session_id, UserSession.revoked_at.is_(None))
        .values(revoked_at=now, revoke_reason=reason)
        .execution_options(synchronize_session=False)
    )
    if user_id is not None:
        stmt = stmt.where(UserSession.user_id == user_id)
    result = await db.execute(stmt)
    return bool(rowcount(result))


async def revoke_all_sessions(
    db: AsyncSession, user_id: str, *, reason: str, now: datetime, except_id: str | None = None
) -> int:
    stmt = (
        update(UserSession)
        .where(UserSession.user_id == user_id, UserSession.revoked_at.is_(None))
        .values(revoked_at=now, revoke_reason=reason)
        .execution_options(synchronize_session=False)
    )
    if except_id is not None:
        stmt = stmt.where(UserSession.id != except_id)
    result = await db.execute(stmt)
    return rowcount(result)


async def live_sessions(db: AsyncSession, user_id: str, now: datetime) -> list[UserSession]:
    rows = await db.scalars(
        select(UserSession)
        .where(
            UserSession.user_id == user_id,
            UserSession.revoked_at.is_(None),
            UserSession.expires_at > now,
        )
        .order_by(UserSession.last_used_at.desc())
    )
    return list(rows)
