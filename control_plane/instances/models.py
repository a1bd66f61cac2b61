"""Instance tables: instances, members (the private ACL), events. Billing's own tables
(subscriptions, Stripe events) are in ``control_plane/billing/models.py``.

The lifecycle (DESIGN.md "Instance lifecycle") lives in ``lifecycle.py``; every status change goes
through :func:`control_plane.instances.lifecycle.transition`, never a plain attribute write.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from control_plane.db import Base, UTCDateTime, new_id, utcnow
from control_plane.runtime_kinds import DEFAULT_RUNTIME_KIND

#: How someone may open an instance: its owner, or an active member (``access.py`` decides).
Role = Literal["owner", "member"]


class InstanceStatus(StrEnum):
    DRAFT = "draft"
    AWAITING_PAYMENT = "awaiting_payment"
    PROVISIONING = "provisioning"
    RUNNING = "running"
    FAILED = "failed"
    PAST_DUE = "past_due"
    SUSPENDED = "suspended"
    CANCELED = "canceled"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"


class CloudInstance(Base):
    """A hosted Room. Provider ids are persisted right after each create (never lost).

    Worker bookkeeping: ``run_after`` is when the worker should next look at it (None = nothing
    to do), ``attempts`` counts failed tries of the current state, ``deadline_at`` is when the
    current state counts as stuck, ``lease_owner``/``lease_until`` is the worker's claim.
    """

    __tablename__ = "cloud_instances"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("users.id", ondelete="RESTRICT"), nullable=False, index=True
    )
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    goal: Mapped[str | None] = mapped_column(Text, nullable=True)
    tier: Mapped[str] = mapped_column(String(32), nullable=False)
    region: Mapped[str] = mapped_column(String(16), nullable=False)
    status: Mapped[str] = mapped_column(String(24), nullable=False, default=InstanceStatus.DRAFT)
    step: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Provider resources.
    fly_app: Mapped[str | None] = mapped_column(String(63), nullable=True, unique=True)
    machine_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    volume_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    snapshot_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    url: Mapped[str | None] = mapped_column(String(255), nullable=True)
    image: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # The app secrets version the provider answered for this instance's credentials (Fly's Set
    # Secrets): machines are created with it as ``min_secrets_version``. Persisted, so a worker
    # restarted between the secrets and the machine step still passes it (issue 12).
    secrets_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # What runs (``reference`` | ``quoroom``): chosen at creation from RUNTIME_KIND, never changed
    # (the Room's data on the volume belongs to that kind).
    runtime_kind: Mapped[str] = mapped_column(
        String(16),
        nullable=False,
        default=DEFAULT_RUNTIME_KIND,
        server_default=DEFAULT_RUNTIME_KIND,
    )
    # Secrets for the runtime (provider API keys), encrypted at rest; never returned or logged.
    credentials_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # Checkout.
    checkout_session_id: Mapped[str | None] = mapped_column(String(255), nullable=True, unique=True)
    create_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Worker bookkeeping.
    run_after: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    destroy_after: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow, onupdate=utcnow
    )

    __table_args__ = (
        # A double-clicked create with the same key gives one instance.
        UniqueConstraint("owner_id", "create_key", name="uq_cloud_instances_owner_create_key"),
        Index("ix_cloud_instances_due", "status", "run_after"),
    )


class MemberStatus(StrEnum):
    PENDING = "pending"  # invited by email, no account yet: claimed at signup / verification
    ACTIVE = "active"


class CloudInstanceMember(Base):
    """Someone other than the owner who may open the Room as ``member``."""

    __tablename__ = "cloud_instance_members"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    instance_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("cloud_instances.id", ondelete="CASCADE"), nullable=False
    )
    email: Mapped[str] = mapped_column(String(254), nullable=False)
    user_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("users.id", ondelete="CASCADE"), nullable=True, index=True
    )
    role: Mapped[str] = mapped_column(String(16), nullable=False, default="member")
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=MemberStatus.PENDING)
    invited_by: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)

    __table_args__ = (
        UniqueConstraint("instance_id", "email", name="uq_cloud_instance_members_email"),
    )


class InstanceEvent(Base):
    """Audit and provisioning log: one row per transition, provider step, billing effect."""

    __tablename__ = "instance_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("cloud_instances.id", ondelete="CASCADE"), nullable=False
    )
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    from_status: Mapped[str | None] = mapped_column(String(24), nullable=True)
    to_status: Mapped[str | None] = mapped_column(String(24), nullable=True)
    message: Mapped[str] = mapped_column(Text, nullable=False, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)

    __table_args__ = (Index("ix_instance_events_instance", "instance_id", "id"),)


class AccessLogEntry(Base):
    """One line of an instance's access log (issue 15, item 4): a launch or token refresh, a
    membership change, or the refusals the runtime reported for one (minute, reason, address).

    ``user_id`` is whose entry it is (the launcher, the member concerned): a member sees only the
    entries with their id. ``network`` is the coarse location (the /24 or /48 of the address,
    never the address itself) and ``region`` the edge region of a trusted proxy, when there is
    one. Refusal rows (``kind = "refused"``) carry the runtime's ``reason`` and ``address`` (as its
    limiter keys it: IPv6 by /64) and a ``count``; they are unique per (instance, minute, reason,
    address), so a later report for the same minute adds to the count. Rows older than
    ``ACCESS_LOG_RETENTION_DAYS`` are pruned by the reconciler.
    """

    __tablename__ = "access_log_entries"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    instance_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("cloud_instances.id", ondelete="CASCADE"), nullable=False
    )
    kind: Mapped[str] = mapped_column(String(24), nullable=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    user_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    email: Mapped[str | None] = mapped_column(String(254), nullable=True)
    network: Mapped[str | None] = mapped_column(String(64), nullable=True)
    region: Mapped[str | None] = mapped_column(String(16), nullable=True)
    user_agent: Mapped[str | None] = mapped_column(String(256), nullable=True)
    reason: Mapped[str | None] = mapped_column(String(48), nullable=True)
    address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    count: Mapped[int] = mapped_column(Integer, nullable=False, default=1)

    __table_args__ = (
        # Refusals aggregate on this key (NULL reason/address on other kinds never collide).
        UniqueConstraint(
            "instance_id", "kind", "at", "reason", "address", name="uq_access_log_entries_refusal"
        ),
        Index("ix_access_log_entries_instance", "instance_id", "id"),
        Index("ix_access_log_entries_user", "instance_id", "user_id", "id"),
        Index("ix_access_log_entries_at", "at"),
    )


class AccessReportBatch(Base):
    """A refusal report the runtime sent, by its ``batchId``: each is accepted once per instance
    (a replayed batch is refused). Kept a day; batches older than that are refused anyway."""

    __tablename__ = "access_report_batches"

    instance_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("cloud_instances.id", ondelete="CASCADE"), primary_key=True
    )
    batch_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, index=True)
