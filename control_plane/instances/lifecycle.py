"""The instance lifecycle as a state machine in the database (DESIGN.md "Instance lifecycle").

    draft → awaiting_payment → provisioning → running
    provisioning → failed → provisioning (retry)
    running → past_due → running (paid) | suspended (grace over: machine stopped) → running
    any live state → canceled → destroying (stopped, snapshotted, retention) → destroyed

Every transition is ONE guarded ``UPDATE … WHERE id = :id AND status IN (:expected)`` plus an
``instance_events`` row, in the caller's transaction. Zero rows updated means another actor got
there first or the move is illegal: :class:`IllegalTransition` is raised and nothing is written.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db import utcnow
from control_plane.errors import InvalidInstanceState
from control_plane.instances.models import CloudInstance, InstanceEvent, InstanceStatus
from control_plane.logs import REQUEST_ID
from control_plane.services import Wakeup
from control_plane.settings import Settings

S = InstanceStatus

#: Which statuses each status may move to. Anything else is refused.
TRANSITIONS: dict[InstanceStatus, frozenset[InstanceStatus]] = {
    S.DRAFT: frozenset({S.AWAITING_PAYMENT, S.PROVISIONING, S.CANCELED}),
    S.AWAITING_PAYMENT: frozenset({S.PROVISIONING, S.CANCELED}),
    S.PROVISIONING: frozenset({S.RUNNING, S.FAILED, S.CANCELED}),
    S.FAILED: frozenset({S.PROVISIONING, S.CANCELED}),
    # running → provisioning: the reconciler found the machine gone; the worker recreates it.
    S.RUNNING: frozenset({S.PAST_DUE, S.CANCELED, S.PROVISIONING}),
    S.PAST_DUE: frozenset({S.RUNNING, S.SUSPENDED, S.CANCELED}),
    S.SUSPENDED: frozenset({S.RUNNING, S.CANCELED}),
    S.CANCELED: frozenset({S.DESTROYING}),
    S.DESTROYING: frozenset({S.DESTROYED}),
    S.DESTROYED: frozenset(),
}

#: States in which a Room may be opened (runtime tokens are issued).
OPENABLE = frozenset({S.RUNNING, S.PAST_DUE})
#: States that still hold (or may soon hold) provider resources.
LIVE = frozenset(s for s in InstanceStatus if s not in (S.DESTROYED,))
#: States a cancellation may start from.
CANCELABLE = frozenset(s for s, targets in TRANSITIONS.items() if S.CANCELED in targets)


class IllegalTransition(InvalidInstanceState):
    """The instance was not in any of the expected states (raced, or an illegal move)."""

    message = "the instance is not in a state that allows this"

    def __init__(self, instance_id: str, expected: Iterable[str], to: str) -> None:
        super().__init__()
        self.instance_id = instance_id
        self.expected = tuple(expected)
        self.to = to


def _check_legal(expected: Iterable[InstanceStatus], to: InstanceStatus) -> tuple[str, ...]:
    states = tuple(expected)
    for state in states:
        if to not in TRANSITIONS[state]:
            raise ValueError(f"{state} → {to} is not a lifecycle transition")
    return tuple(str(s) for s in states)


async def transition(
    session: AsyncSession,
    instance_id: str,
    *,
    expected: Iterable[InstanceStatus],
    to: InstanceStatus,
    message: str,
    kind: str = "transition",
    data: dict[str, Any] | None = None,
    now: datetime | None = None,
    **fields: Any,
) -> CloudInstance:
    """Move ``instance_id`` from one of ``expected`` to ``to``, setting ``fields`` too.

    One guarded UPDATE … RETURNING plus an event row, in the caller's transaction.
    """
    states = _check_legal(expected, to)
    now = now or utcnow()
    # Read the current status for the event row; the guard below is what decides.
    before = await session.scalar(
        select(CloudInstance.status).where(CloudInstance.id == instance_id)
    )
    values = {"status": str(to), "updated_at": now, **fields}
    result = await session.execute(
        update(CloudInstance)
        .where(CloudInstance.id == instance_id, CloudInstance.status.in_(states))
        .values(**values)
        .returning(CloudInstance)
        .execution_options(synchronize_session=False)
    )
    row = result.scalar_one_or_none()
    if row is None:
        raise IllegalTransition(instance_id, states, str(to))
    await session.execute(
        insert(InstanceEvent).values(
            instance_id=instance_id,
            kind=kind,
            from_status=before,
            to_status=str(to),
            message=message,
            data=with_request_id(data),
            created_at=now,
        )
    )
    return row


def with_request_id(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """An event's data with the request id of the work that wrote it (control_plane/logs.py):
    the worker takes it up from the event that queued its work."""
    request_id = REQUEST_ID.get()
    if request_id is None:
        return data
    return {**(data or {}), "request_id": request_id}


async def record_event(
    session: AsyncSession,
    instance_id: str,
    kind: str,
    message: str,
    data: dict[str, Any] | None = None,
    *,
    now: datetime | None = None,
) -> None:
    """An event without a status change (a provider step, a billing effect, a rollout)."""
    await session.execute(
        insert(InstanceEvent).values(
            instance_id=instance_id,
            kind=kind,
            message=message,
            data=with_request_id(data),
            created_at=now or utcnow(),
        )
    )


async def update_fields(
    session: AsyncSession,
    instance_id: str,
    *,
    status: InstanceStatus,
    **fields: Any,
) -> CloudInstance:
    """Set bookkeeping fields (ids, step, run_after…) only while the status is still ``status``.

    Used to persist each provider id right after its create; raises IllegalTransition if the
    instance moved meanwhile (e.g. canceled), so the caller stops.
    """
    result = await session.execute(
        update(CloudInstance)
        .where(CloudInstance.id == instance_id, CloudInstance.status == str(status))
        .values(updated_at=utcnow(), **fields)
        .returning(CloudInstance)
        .execution_options(synchronize_session=False)
    )
    row = result.scalar_one_or_none()
    if row is None:
        raise IllegalTransition(instance_id, (str(status),), str(status))
    return row


async def lock_instance(db: AsyncSession, instance_id: str) -> CloudInstance | None:
    """The instance, freshly read and locked for the rest of the transaction."""
    return await db.scalar(
        select(CloudInstance)
        .where(CloudInstance.id == instance_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )


async def cancel_now(
    db: AsyncSession, settings: Settings, instance_id: str, *, now: datetime, message: str
) -> CloudInstance:
    """``→ canceled``; the worker stops and snapshots now and destroys after the retention."""
    return await transition(
        db,
        instance_id,
        expected=CANCELABLE,
        to=S.CANCELED,
        message=message,
        now=now,
        run_after=now,
        destroy_after=now + timedelta(days=settings.retention_days),
    )


def wake(wakeup: Wakeup | None) -> None:
    """Poke the in-process worker, if one runs in this process."""
    if wakeup is not None:
        wakeup.set()
