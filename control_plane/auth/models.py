"""Account tables: users, OAuth identities, sessions, refresh tokens, email tokens and the second
factor (TOTP, recovery codes, pending second-factor sign-ins, passkeys and their WebAuthn
challenges)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from control_plane.db import Base, UTCDateTime, new_id, utcnow


class User(Base):
    """An account. ``email`` is stored normalised (trimmed, lower-case) and unique.

    ``password_hash`` is ``None`` for accounts that only sign in with Google.
    """

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    email: Mapped[str] = mapped_column(String(254), nullable=False, unique=True)
    email_verified: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    name: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow, onupdate=utcnow
    )
    password_changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class UserIdentity(Base):
    """An external identity (Google), keyed by the provider's stable ``sub`` — never by email."""

    __tablename__ = "user_identities"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    )
    provider: Mapped[str] = mapped_column(String(32), nullable=False)
    subject: Mapped[str] = mapped_column(String(255), nullable=False)
    email: Mapped[str | None] = mapped_column(String(254), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (UniqueConstraint("provider", "subject", name="uq_user_identities_subject"),)


class UserSession(Base):
    """A signed-in device/browser. Revoking it ends its refresh chain and its access tokens."""

    __tablename__ = "user_sessions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoke_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    method: Mapped[str] = mapped_column(String(16), nullable=False)  # password | google | passkey
    user_agent: Mapped[str | None] = mapped_column(String(255), nullable=True)
    ip_address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: When this session last proved the account's second factor (sign-in or step-up); the
    #: step-up rule asks for it within the last 10 minutes (control_plane/auth/second_factor.py).
    second_factor_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class RefreshToken(Base):
    """One link in a session's refresh chain. Only the SHA-256 of the token is stored.

    When a token is rotated, ``successor_ciphertext`` holds its successor encrypted under a key
    derived from *this* token, so a concurrent tab presenting this token within the grace window
    gets the same successor back (supabase/auth-js#213) while the database alone reveals nothing.
    """

    __tablename__ = "refresh_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    session_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("user_sessions.id", ondelete="CASCADE"), nullable=False, index=True
    )
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), nullable=False, unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    successor_ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary(128), nullable=True)


class EmailToken(Base):
    """A verification or password-reset token: hashed, single use, expiring."""

    __tablename__ = "email_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    purpose: Mapped[str] = mapped_column(String(16), nullable=False)  # verify | reset
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), nullable=False, unique=True)
    email: Mapped[str] = mapped_column(String(254), nullable=False)  # the address it was sent to
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (Index("ix_email_tokens_user_purpose", "user_id", "purpose"),)


class UserTotp(Base):
    """An account's TOTP factor (RFC 6238). ``confirmed_at`` is ``None`` while enrolment waits
    for its first code; only a confirmed factor is asked for at sign-in.

    The secret is sealed with the key-encryption keys (AES-256-GCM, bound to the user id), never
    logged, and never returned once confirmed. ``last_used_step`` is the time step of the last
    code accepted: a code of that step or an earlier one is refused (no replay in its window).
    """

    __tablename__ = "user_totp"

    user_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    secret_ciphertext: Mapped[bytes] = mapped_column(LargeBinary(128), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_used_step: Mapped[int | None] = mapped_column(Integer, nullable=True)


class RecoveryCode(Base):
    """A single-use recovery code: only its SHA-256 (with the user id) is stored."""

    __tablename__ = "user_recovery_codes"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    )
    code_hash: Mapped[bytes] = mapped_column(LargeBinary(32), nullable=False, unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class SecondFactorChallenge(Base):
    """A sign-in that passed its first factor and waits for the second: not a session.

    Its token (256 random bits, stored hashed) lives in an HttpOnly cookie of the browser that
    signed in (or in the body for ``transport: body`` clients); it is short-lived, single use and
    allows a few attempts."""

    __tablename__ = "second_factor_challenges"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    )
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), nullable=False, unique=True)
    method: Mapped[str] = mapped_column(String(16), nullable=False)  # password | google
    transport: Mapped[str] = mapped_column(String(8), nullable=False)  # cookie | body
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class UserPasskey(Base):
    """A WebAuthn credential (a passkey) registered to an account (issue 15, item 2).

    ``credential_id`` is the authenticator's id (at most 1023 bytes, WebAuthn §5.8.3), unique
    across accounts; ``public_key`` its COSE key. ``sign_count`` is the last signature counter
    seen (a 32-bit unsigned value); a later assertion must carry a higher one unless both are 0.
    ``counter_regressed_at`` records a counter that went backwards (a cloned authenticator): the
    passkey is refused from then on, until its owner removes it."""

    __tablename__ = "user_passkeys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    )
    credential_id: Mapped[bytes] = mapped_column(LargeBinary(1023), nullable=False, unique=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary(1024), nullable=False)
    sign_count: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    aaguid: Mapped[str | None] = mapped_column(String(36), nullable=True)
    transports: Mapped[str | None] = mapped_column(String(128), nullable=True)
    backed_up: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    counter_regressed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class WebAuthnChallenge(Base):
    """A WebAuthn challenge handed to a browser: single use, short-lived, and bound to who asked
    (``binding_hash``: the SHA-256 of the signed-in session's id, the pending second-factor
    sign-in's id, or the passwordless sign-in's browser token) and for what (``purpose``). The
    challenge itself is not secret (the browser signs it into ``clientDataJSON``)."""

    __tablename__ = "webauthn_challenges"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    challenge: Mapped[bytes] = mapped_column(LargeBinary(64), nullable=False, unique=True)
    purpose: Mapped[str] = mapped_column(String(16), nullable=False)
    binding_hash: Mapped[bytes] = mapped_column(LargeBinary(32), nullable=False)
    user_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=True, index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, index=True)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
