"""Quotas and abuse limits, in one place (issue 14, item 4).

=====================  ==============================  ==========================================
limit                  setting (``QUOROOM_CP_``)        enforced
=====================  ==============================  ==========================================
Rooms per user         ``INSTANCE_QUOTA``               create, under the user's row lock (409)
Rooms per region       ``ROOMS_PER_REGION``             create, before any checkout (409)
Rooms in all           ``ROOMS_TOTAL``                  create, before any checkout (409)
members per Room       ``MAX_MEMBERS_PER_INSTANCE``     invite, under the owner's row lock (409)
invitations per day    ``INVITATIONS_PER_DAY``          invite, under the owner's row lock (429)
runtime tokens         ``RUNTIME_TOKENS_PER_MINUTE``    grant and refresh, per session (429)
=====================  ==============================  ==========================================

The first three hold for ``ops restore`` of a canceled Room too (it takes its slot back;
:mod:`control_plane.provisioning.restore`), unless the operator says ``--over-quota``.

The counts that must hold across processes come from the database, in the transaction that
writes, behind a lock so that two requests cannot both take the last slot:

- **Capacity** counts live instances (every state but canceled, destroying and destroyed — the
  same states the per-user quota counts) in the region and in all. A draft or an instance
  awaiting payment holds its slot, so a payment is never taken for a Room that has no room: the
  check runs when the draft is inserted, before the Checkout Session is created, and a refusal
  writes nothing. Creates are serialised by :func:`lock_capacity`: a PostgreSQL transaction-level
  advisory lock (one for the whole fleet when ``ROOMS_TOTAL`` is set, else one per region),
  taken after the user's row lock (always in that order); on SQLite ``BEGIN IMMEDIATE`` already
  serialises writers. Without any capacity setting nothing is locked or counted.
- **Members** count the Room's membership rows, pending invitations included (each one may
  become a member).
- **Invitations per day** count the invitation mails (``invite`` events: new and sent again) of
  the inviting owner over the last 24 hours. Per inviter rather than per Room: the abuse is mail
  sent from our domain by one account, and a per-Room count would multiply by the Rooms an
  account may have; the bursts per Room are the throttle's (``THROTTLE_INVITE_INSTANCE``). Only
  a Room's owner invites, so the inviter is the owner of the Rooms whose events are counted.

Runtime tokens per session per minute use the throttle's storage (:class:`Throttle`: memory, or
Redis when ``REDIS_URL`` is set, shared by every process), keyed by the session id. Unlike the
account limits that limiter **fails open** when its storage is down (logged): it bounds the cost
of signing, not access to a secret, and a Redis outage must not shut every open Room's UI out
when its token expires.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timedelta

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.models import User
from control_plane.errors import (
    FleetFull,
    InvitationLimitReached,
    QuotaExceeded,
    RegionFull,
    RuntimeTokensThrottled,
    Throttled,
    ThrottleUnavailable,
)
from control_plane.instances.models import CloudInstance, InstanceEvent, InstanceStatus
from control_plane.settings import Settings
from control_plane.throttle import RUNTIME_TOKEN_POLICY, Throttle

logger = logging.getLogger("control_plane.quotas")

S = InstanceStatus
#: Statuses that hold a slot: count against the per-user quota and the capacity.
LIVE_STATUSES = tuple(str(s) for s in S if s not in (S.CANCELED, S.DESTROYING, S.DESTROYED))
#: The event each invitation mail records (new invitation or sent again); counted per day.
INVITE_EVENT = "invite"
INVITATION_WINDOW = timedelta(days=1)


def _advisory_key(name: str) -> int:
    """A signed 64-bit key for ``pg_advisory_xact_lock``, stable across processes."""
    return int.from_bytes(
        hashlib.sha256(f"quoroom-cp:{name}".encode()).digest()[:8], "big", signed=True
    )


async def lock_user(db: AsyncSession, user_id: str) -> None:
    """Serialise this user's quota-bound writes (PostgreSQL row lock ``FOR NO KEY UPDATE``:
    the worker's foreign-key checks take ``FOR KEY SHARE`` on the same row and must not wait on
    it; SQLite's ``BEGIN IMMEDIATE`` already serialises writers)."""
    await db.execute(select(User.id).where(User.id == user_id).with_for_update(key_share=True))


async def check_instance_quota(db: AsyncSession, settings: Settings, user_id: str) -> None:
    """Raise :class:`QuotaExceeded` when ``user_id`` already has ``INSTANCE_QUOTA`` live Rooms.
    Call with :func:`lock_user` held, before anything is written."""
    live = await db.scalar(
        select(func.count())
        .select_from(CloudInstance)
        .where(CloudInstance.owner_id == user_id, CloudInstance.status.in_(LIVE_STATUSES))
    )
    if (live or 0) >= settings.instance_quota:
        raise QuotaExceeded(
            f"you can have at most {settings.instance_quota} instances; delete one first"
        )


def capacity_limited(settings: Settings, region: str) -> bool:
    return settings.rooms_total is not None or settings.region_capacity(region) is not None


async def lock_capacity(db: AsyncSession, settings: Settings, region: str) -> None:
    """Hold the capacity lock for ``region`` until the transaction ends (see the module
    docstring). Take it after :func:`lock_user`, never before."""
    if db.get_bind().dialect.name != "postgresql" or not capacity_limited(settings, region):
        return
    name = "capacity" if settings.rooms_total is not None else f"capacity:{region}"
    await db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _advisory_key(name)})


async def check_capacity(db: AsyncSession, settings: Settings, region: str) -> None:
    """Raise :class:`RegionFull` or :class:`FleetFull` when another live Room in ``region`` would
    pass ``ROOMS_PER_REGION`` or ``ROOMS_TOTAL``. Call with :func:`lock_capacity` held (it is
    taken here), before anything is written."""
    per_region, total = settings.region_capacity(region), settings.rooms_total
    if per_region is None and total is None:
        return
    await lock_capacity(db, settings, region)
    live = CloudInstance.status.in_(LIVE_STATUSES)
    if per_region is not None:
        in_region = await db.scalar(
            select(func.count())
            .select_from(CloudInstance)
            .where(CloudInstance.region == region, live)
        )
        if (in_region or 0) >= per_region:
            logger.warning("capacity: region %s is full (%d Rooms)", region, per_region)
            raise RegionFull(f"region {region} is full; choose another region")
    if total is not None:
        everywhere = await db.scalar(select(func.count()).select_from(CloudInstance).where(live))
        if (everywhere or 0) >= total:
            logger.warning("capacity: the fleet is full (%d Rooms)", total)
            raise FleetFull()


async def check_invitations(
    db: AsyncSession, settings: Settings, owner_id: str, *, now: datetime
) -> None:
    """Raise :class:`InvitationLimitReached` (429, Retry-After: until the oldest counted mail is
    a day old) when ``owner_id`` has sent ``INVITATIONS_PER_DAY`` invitations in the last 24
    hours. Call with :func:`lock_user` held for the owner."""
    since = now - INVITATION_WINDOW
    count, oldest = (
        await db.execute(
            select(func.count(), func.min(InstanceEvent.created_at))
            .select_from(InstanceEvent)
            .join(CloudInstance, CloudInstance.id == InstanceEvent.instance_id)
            .where(
                CloudInstance.owner_id == owner_id,
                InstanceEvent.kind == INVITE_EVENT,
                InstanceEvent.created_at > since,
            )
        )
    ).one()
    if (count or 0) < settings.invitations_per_day:
        return
    wait = (oldest + INVITATION_WINDOW - now).total_seconds() if oldest is not None else 60
    raise InvitationLimitReached(int(wait + 0.999))


async def limit_runtime_tokens(throttle: Throttle, session_id: str) -> None:
    """Count one runtime token for the control-plane session ``session_id``; raise
    :class:`RuntimeTokensThrottled` (429 with Retry-After) past ``RUNTIME_TOKENS_PER_MINUTE``.
    Fails open when the throttle's storage is down (see the module docstring)."""
    try:
        await throttle.hit(RUNTIME_TOKEN_POLICY, f"session:{session_id}")
    except Throttled as exc:
        raise RuntimeTokensThrottled(exc.retry_after) from None
    except ThrottleUnavailable:
        logger.warning("runtime token limit not applied: the limiter's storage is down")
