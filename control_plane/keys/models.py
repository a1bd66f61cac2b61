"""The ``signing_keys`` table."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from sqlalchemy import Index, LargeBinary, String, text
from sqlalchemy.orm import Mapped, mapped_column

from control_plane.db import Base, UTCDateTime, utcnow

KeyStatus = Literal["next", "active", "retired"]


class SigningKey(Base):
    """One Ed25519 key. ``next`` is published but does not sign yet; ``active`` signs;
    ``retired`` is published until every token it signed has expired, then deleted."""

    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    algorithm: Mapped[str] = mapped_column(String(16), nullable=False, default="EdDSA")
    public_key: Mapped[bytes] = mapped_column(LargeBinary(64), nullable=False)
    # AES-256-GCM(KEK, raw private key, aad=kid); ``kek_id`` names which KEK (fingerprint).
    private_key_ciphertext: Mapped[bytes] = mapped_column(LargeBinary(128), nullable=False)
    nonce: Mapped[bytes] = mapped_column(LargeBinary(12), nullable=False)
    kek_id: Mapped[str] = mapped_column(String(32), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        # At most one active and one next key, even when two processes bootstrap at once.
        Index(
            "uq_signing_keys_one_active",
            "status",
            unique=True,
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ),
        Index(
            "uq_signing_keys_one_next",
            "status",
            unique=True,
            sqlite_where=text("status = 'next'"),
            postgresql_where=text("status = 'next'"),
        ),
    )
