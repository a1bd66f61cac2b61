"""Instance operations behind ``/api/cloud/instances``. Routes stay thin: they parse, call one
function here and answer.

Transactions never span a call to Stripe: the instance is committed as a ``draft`` first, the
Checkout Session is created (its idempotency key derived from the instance id, so repeating the
call returns the same session), then ``draft → awaiting_payment`` is one guarded update.

Creates with an ``Idempotency-Key`` are serialised per user by a ``FOR NO KEY UPDATE`` lock on
the user's row, and the key is read again once that lock is held, so a replay never inserts (and
never waits inside the unique index on another transaction). ``NO KEY`` because the worker's
foreign-key checks on the user's instances take ``FOR KEY SHARE`` on the same row: with ``FOR
UPDATE`` the two waited on each other (issue 12: twelve parallel creates, eight 40P01 → 500).
A deadlock or serialization failure that still happens is retried (the steps are idempotent).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from sqlalchemy import or_, select
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.auth.models import User
from control_plane.db import new_id
from control_plane.errors import (
    BillingDisabled,
    ControlPlaneError,
    EmailNotVerified,
    IdempotencyConflict,
    InvalidInstanceState,
    UnknownRegion,
    UnknownTier,
)
from control_plane.instances import quotas
from control_plane.instances.credentials import decrypt_credentials, encrypt_credentials
from control_plane.instances.lifecycle import (
    CANCELABLE,
    IllegalTransition,
    cancel_now,
    record_event,
    transition,
    update_fields,
    wake,
)
from control_plane.instances.models import (
    CloudInstance,
    CloudInstanceMember,
    InstanceEvent,
    InstanceStatus,
    MemberStatus,
    Role,
)
from control_plane.instances.payments import BILLING_DISABLED_NOTE, Payments
from control_plane.instances.schemas import EventOut, InstanceCreateIn, InstanceOut, StatusOut
from control_plane.services import Wakeup
from control_plane.settings import Settings

logger = logging.getLogger("control_plane.instances")

S = InstanceStatus
_ENDED = frozenset({S.CANCELED, S.DESTROYING, S.DESTROYED})
MAX_LISTED = 200
MAX_EVENTS = 100


@dataclass(frozen=True)
class InstancesContext:
    """The long-lived collaborators of the instance operations (built once in the lifespan)."""

    settings: Settings
    #: Billing, through the port instances define (billing sits above instances).
    billing: Payments
    factory: async_sessionmaker[AsyncSession]
    clock: Callable[[], datetime]
    #: The in-process worker's wake-up (None when no worker runs in this process).
    wakeup: Wakeup | None


def to_out(instance: CloudInstance, role: Role) -> InstanceOut:
    return InstanceOut(
        id=instance.id,
        name=instance.name,
        goal=instance.goal,
        tier=instance.tier,
        region=instance.region,
        status=instance.status,
        step=instance.step,
        error=instance.error,
        url=instance.url,
        role=role,
        runtimeKind="quoroom" if instance.runtime_kind == "quoroom" else "reference",
        createdAt=instance.created_at,
        updatedAt=instance.updated_at,
    )


async def _reload(db: AsyncSession, instance_id: str) -> CloudInstance:
    instance = await db.scalar(
        select(CloudInstance)
        .where(CloudInstance.id == instance_id)
        .execution_options(populate_existing=True)
    )
    assert instance is not None
    return instance


# -- create --------------------------------------------------------------------------------------


#: PostgreSQL's deadlock_detected and serialization_failure: the transaction was rolled back and
#: may simply be run again.
_RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})
_DB_RETRIES = 4
_T = TypeVar("_T")


def _sqlstate(exc: DBAPIError) -> str | None:
    state = getattr(exc.orig, "sqlstate", None)
    return state if isinstance(state, str) else None


def _retryable(exc: DBAPIError) -> bool:
    return _sqlstate(exc) in _RETRYABLE_SQLSTATES


async def _retry_on_conflict(db: AsyncSession, step: Callable[[], Awaitable[_T]]) -> _T:
    """Run an idempotent ``step``; on a deadlock or serialization failure roll back and run it
    again (a few times, with a short random pause so the rivals do not collide again)."""
    for attempt in range(_DB_RETRIES):
        try:
            return await step()
        except DBAPIError as exc:
            if not _retryable(exc) or attempt == _DB_RETRIES - 1:
                raise
            await db.rollback()
            logger.warning("create: database conflict (%s), retrying", _sqlstate(exc))
            await asyncio.sleep((0.005 + secrets.randbelow(45) / 1000) * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def _canonical(credentials: dict[str, str] | None) -> bytes:
    return json.dumps(credentials or {}, separators=(",", ":"), sort_keys=True).encode()


def _same_request(settings: Settings, instance: CloudInstance, body: InstanceCreateIn) -> bool:
    """A replay is the same request: same fields and the same provider credentials (compared
    opened, in constant time; the sealed blobs differ by their random nonce)."""
    if (instance.name, instance.tier, instance.region, instance.goal) != (
        body.name,
        body.tier,
        body.region,
        body.goal,
    ):
        return False
    stored = decrypt_credentials(settings, instance)
    return hmac.compare_digest(_canonical(stored), _canonical(body.credentials))


async def _by_key(db: AsyncSession, owner_id: str, key: str) -> CloudInstance | None:
    return await db.scalar(
        select(CloudInstance)
        .where(CloudInstance.owner_id == owner_id, CloudInstance.create_key == key)
        .execution_options(populate_existing=True)
    )


async def create_instance(
    db: AsyncSession,
    ctx: InstancesContext,
    user: User,
    body: InstanceCreateIn,
    *,
    idempotency_key: str | None,
    before_new_checkout: Callable[[], Awaitable[None]] | None = None,
) -> tuple[CloudInstance, str | None]:
    """A new instance and its checkout URL (``None`` when billing is disabled or already paid).

    With an ``Idempotency-Key``, repeating the request (a double click, a retry after a network
    error) returns the same instance and the same Checkout Session. ``before_new_checkout``
    runs (and may refuse, e.g. the per-user checkout limit) only when a new instance, hence a
    new Checkout Session, is about to be made: never for a replay.
    """
    if not user.email_verified:
        raise EmailNotVerified("verify your email address before creating an instance")
    catalog = ctx.billing.catalog
    if not catalog.has_tier(body.tier):
        raise UnknownTier(f"unknown tier {body.tier!r}")
    if not catalog.has_region(body.region):
        raise UnknownRegion(f"unknown region {body.region!r}")
    user_id, email = user.id, user.email  # a rollback below expires the loaded user
    found = await _retry_on_conflict(
        db, lambda: _insert_draft(db, ctx, user_id, body, idempotency_key, before_new_checkout)
    )
    instance, created = found
    instance_id = instance.id
    if not created:
        if not _same_request(ctx.settings, instance, body):
            await db.rollback()
            raise IdempotencyConflict()
        await db.commit()
    keep_draft = idempotency_key is not None
    return await _retry_on_conflict(
        db, lambda: _proceed(db, ctx, user_id, email, instance_id, keep_draft=keep_draft)
    )


async def _insert_draft(
    db: AsyncSession,
    ctx: InstancesContext,
    user_id: str,
    body: InstanceCreateIn,
    idempotency_key: str | None,
    before_new_checkout: Callable[[], Awaitable[None]] | None = None,
) -> tuple[CloudInstance, bool]:
    """The committed draft, new (``True``) or the one this Idempotency-Key made (``False``)."""
    if idempotency_key is not None:
        existing = await _by_key(db, user_id, idempotency_key)
        if existing is not None:
            return existing, False
    now = ctx.clock()
    # Serialise this user's creates so two at once cannot both pass the quota (PostgreSQL row
    # lock; SQLite's BEGIN IMMEDIATE already serialises writers). NO KEY UPDATE: see the module
    # docstring (FOR UPDATE deadlocked with the worker's foreign-key checks).
    await quotas.lock_user(db, user_id)
    if idempotency_key is not None:
        # Re-read under the lock: a rival holding it may have committed this key meanwhile.
        # Without this the replay inserted, waited on the rival inside the unique index, and
        # could be refused by the quota its own first request had used up.
        existing = await _by_key(db, user_id, idempotency_key)
        if existing is not None:
            return existing, False
    await quotas.check_instance_quota(db, ctx.settings, user_id)
    # Capacity (ROOMS_PER_REGION, ROOMS_TOTAL): this draft holds a slot from its insert on, so
    # the check is here, before any Checkout Session, under the capacity lock (quotas.py).
    await quotas.check_capacity(db, ctx.settings, body.region)
    if before_new_checkout is not None and ctx.billing.enabled:
        # Under the lock, after the re-read: only a create that will open a new Checkout
        # Session counts, once. Refused → nothing was written.
        await before_new_checkout()
    instance = CloudInstance(
        owner_id=user_id,
        name=body.name,
        goal=body.goal,
        tier=body.tier,
        region=body.region,
        status=S.DRAFT,
        runtime_kind=ctx.settings.runtime_kind,
        create_key=idempotency_key,
        created_at=now,
        updated_at=now,
        attempts=0,
    )
    instance.id = new_id()
    instance.credentials_encrypted = encrypt_credentials(
        ctx.settings, instance.id, body.credentials or {}
    )
    try:
        async with db.begin_nested():
            db.add(instance)
    except IntegrityError:
        # The same Idempotency-Key raced us without the lock (cannot happen while every create
        # takes it; kept as the last line of defence). Answer as its replay.
        if idempotency_key is None:
            raise
        existing = await _by_key(db, user_id, idempotency_key)
        if existing is None:  # pragma: no cover - the conflicting row is there
            raise
        return existing, False
    if ctx.billing.enabled:
        await ctx.billing.open_subscription(db, instance_id=instance.id, owner_id=user_id, now=now)
    await record_event(db, instance.id, "created", f"{body.tier} in {body.region}", now=now)
    await db.commit()
    return instance, True


async def _proceed(
    db: AsyncSession,
    ctx: InstancesContext,
    user_id: str,
    email: str,
    instance_id: str,
    *,
    keep_draft: bool,
) -> tuple[CloudInstance, str | None]:
    """Take a committed instance as far as it goes without the customer: checkout, or (billing
    disabled) straight to provisioning. Safe to repeat."""
    instance = await _reload(db, instance_id)
    status = S(instance.status)
    if not ctx.billing.enabled:
        if status == S.DRAFT:
            now = ctx.clock()
            try:
                await transition(
                    db,
                    instance.id,
                    expected=(S.DRAFT,),
                    to=S.PROVISIONING,
                    message=f"{BILLING_DISABLED_NOTE}: provisioning without payment",
                    kind="billing",
                    now=now,
                    run_after=now,
                    attempts=0,
                )
                await db.commit()
                wake(ctx.wakeup)
            except IllegalTransition:
                await db.rollback()
        return await _reload(db, instance_id), None
    if status not in (S.DRAFT, S.AWAITING_PAYMENT):
        return instance, None
    try:
        # Commits first: no transaction (nor SQLite write lock) held across the Stripe call.
        session = await ctx.billing.start_checkout(db, instance, email=email)
    except ControlPlaneError:
        if status == S.DRAFT and not keep_draft:
            await _abandon(db, ctx, instance.id)
        raise
    now = ctx.clock()
    try:
        if status == S.DRAFT:
            await transition(
                db,
                instance.id,
                expected=(S.DRAFT,),
                to=S.AWAITING_PAYMENT,
                message="checkout started",
                kind="billing",
                now=now,
                checkout_session_id=session.id,
            )
        elif instance.checkout_session_id != session.id:
            # Stripe forgets idempotency keys after 24 h; a later retry opens a new session.
            await update_fields(
                db, instance.id, status=S.AWAITING_PAYMENT, checkout_session_id=session.id
            )
        await db.commit()
    except IllegalTransition:
        # The other click (or the payment itself) moved it first: answer with what is there.
        await db.rollback()
    instance = await _reload(db, instance_id)
    await db.commit()
    url = session.url if S(instance.status) == S.AWAITING_PAYMENT else None
    return instance, url


async def _abandon(db: AsyncSession, ctx: InstancesContext, instance_id: str) -> None:
    """A draft whose checkout could not start and that no Idempotency-Key can resume: cancel it
    so it neither lingers nor counts against the quota."""
    try:
        await cancel_now(
            db, ctx.settings, instance_id, now=ctx.clock(), message="checkout could not be started"
        )
        await db.commit()
    except IllegalTransition:
        await db.rollback()


# -- read ----------------------------------------------------------------------------------------


async def list_visible(db: AsyncSession, user: User) -> list[tuple[CloudInstance, Role]]:
    memberships = select(CloudInstanceMember.instance_id).where(
        CloudInstanceMember.user_id == user.id,
        CloudInstanceMember.status == MemberStatus.ACTIVE,
    )
    rows = await db.scalars(
        select(CloudInstance)
        .where(or_(CloudInstance.owner_id == user.id, CloudInstance.id.in_(memberships)))
        .order_by(CloudInstance.created_at.desc(), CloudInstance.id)
        .limit(MAX_LISTED)
        .execution_options(populate_existing=True)
    )
    return [(i, "owner" if i.owner_id == user.id else "member") for i in rows]


async def status_of(db: AsyncSession, instance: CloudInstance) -> StatusOut:
    events = list(
        await db.scalars(
            select(InstanceEvent)
            .where(InstanceEvent.instance_id == instance.id)
            .order_by(InstanceEvent.id.desc())
            .limit(MAX_EVENTS)
        )
    )
    return StatusOut(
        status=instance.status,
        step=instance.step,
        error=instance.error,
        url=instance.url,
        events=[
            EventOut(
                kind=e.kind, from_=e.from_status, to=e.to_status, message=e.message, at=e.created_at
            )
            for e in reversed(events)
        ],
        updatedAt=instance.updated_at,
    )


# -- confirm, retry, cancel ----------------------------------------------------------------------


async def confirm_checkout(
    db: AsyncSession,
    ctx: InstancesContext,
    instance: CloudInstance,
    *,
    session_id: str | None,
) -> CloudInstance:
    """Ask Stripe about the checkout and run the webhook's fulfil step (the success page can
    load before ``checkout.session.completed`` arrives)."""
    if not ctx.billing.enabled:
        raise BillingDisabled()
    if S(instance.status) not in (S.DRAFT, S.AWAITING_PAYMENT):
        return instance
    session_id = session_id or instance.checkout_session_id
    if session_id is None:
        raise InvalidInstanceState("no checkout was started for this instance")
    if not await ctx.billing.confirm_checkout(
        db, instance, session_id=session_id, clock=ctx.clock, wakeup=ctx.wakeup
    ):
        return await _reload(db, instance.id)
    instance = await _reload(db, instance.id)
    await db.commit()
    return instance


async def retry(db: AsyncSession, ctx: InstancesContext, instance: CloudInstance) -> CloudInstance:
    now = ctx.clock()
    await transition(
        db,
        instance.id,
        expected=(S.FAILED,),
        to=S.PROVISIONING,
        message="retry requested by the owner",
        now=now,
        run_after=now,
        attempts=0,
        error=None,
        deadline_at=None,
    )
    await db.commit()
    wake(ctx.wakeup)
    instance = await _reload(db, instance.id)
    await db.commit()
    return instance


async def cancel(db: AsyncSession, ctx: InstancesContext, instance: CloudInstance) -> CloudInstance:
    """Cancel the subscription at Stripe, then ``→ canceled`` (the worker stops, snapshots and,
    after the retention period, destroys). Repeating it is harmless."""
    if S(instance.status) in _ENDED:
        return instance
    if S(instance.status) not in CANCELABLE:  # pragma: no cover - every live state is
        raise InvalidInstanceState()
    await ctx.billing.cancel(db, instance, clock=ctx.clock)
    wake(ctx.wakeup)
    instance = await _reload(db, instance.id)
    await db.commit()
    return instance
