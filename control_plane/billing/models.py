"""Billing tables: an instance's subscription and the processed Stripe events.

They point at ``cloud_instances`` by name (a foreign key), so this module imports nothing from
``control_plane.instances``: billing sits above instances (docs/architecture.md).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, String, false
from sqlalchemy.orm import Mapped, mapped_column

from control_plane.db import Base, UTCDateTime, utcnow


class InstanceSubscription(Base):
    """Billing state of an instance, from Stripe. ``grace_until`` is set while past due."""

    __tablename__ = "instance_subscriptions"

    instance_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("cloud_instances.id", ondelete="CASCADE"), primary_key=True
    )
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    stripe_subscription_id: Mapped[str | None] = mapped_column(
        String(255), nullable=True, unique=True
    )
    status: Mapped[str] = mapped_column(String(24), nullable=False, default="incomplete")
    grace_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Orders out-of-order events: an older event never overrides a newer one's effect.
    last_event_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Cancel at period end (issue 12, item 8), from the owner's call and from
    # ``customer.subscription.updated``; ``subscription_updated_at`` orders those snapshots.
    cancel_at_period_end: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=False, server_default=false()
    )
    current_period_end: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    subscription_updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow, onupdate=utcnow
    )


class StripeEvent(Base):
    """A processed Stripe event id: each event's effect happens once (events arrive twice)."""

    __tablename__ = "stripe_events"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(64), nullable=False)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
