"""``quoroom-cloud ops restore INSTANCE [--snapshot ID]``: bring a canceled or broken Room back
from a snapshot of its data, through the worker.

The command checks, then queues; the worker does the work, as it runs provisioning steps:

1. **Check** (nothing written yet). The instance must exist; its status must be one a restore
   makes sense from (:data:`RESTORABLE`: ``canceled`` or ``destroying`` — the app and its
   snapshots live until the retention ends —, ``failed``, or ``running`` with its machine not
   started); the snapshot (``--snapshot``, else the newest) must be one the provider lists for
   the instance. Anything else is refused with a message naming the problem, exit status 1.
   A canceled Room holds no slot; brought back it takes one again, so its restore passes the
   same quotas a create does (quotas.py): the owner's ``INSTANCE_QUOTA`` and the capacity
   (``ROOMS_PER_REGION``, ``ROOMS_TOTAL``), checked under the same locks in the transaction
   that queues. ``--over-quota`` lets an operator restore past them on purpose (the event
   records it); a failed or running Room still holds its slot and is not counted twice.
2. **Queue.** One guarded UPDATE (``WHERE status = <the status checked> AND`` no worker holds the
   lease) moves it to ``provisioning`` with ``step`` = ``restore:<key>``, ``snapshot_id`` = the
   snapshot, ``run_after`` = now and no ``destroy_after`` (the destroy is called off), plus a
   ``restore_requested`` row on the instance's event trail in the same transaction.
3. **Run** (the worker, :meth:`~control_plane.provisioning.worker.Worker._provision`): the app,
   the volume from the snapshot (event ``restore``), then machine → healthy → ``running`` as for
   any provisioning, with the same retries, deadline and ``failed`` (the owner's retry resumes the
   restore). ``--wait SECONDS`` waits for ``running`` or ``failed``.

The move out of ``canceled``/``destroying`` is the one status change made outside
:data:`control_plane.instances.lifecycle.TRANSITIONS`: that table holds what the automatic actors
(billing, the worker, the reconciler) may do, and none of them may undo a cancellation; only an
operator's explicit restore does, here, with the same guard and event row ``transition()`` writes.
Billing is not touched: a canceled Room brought back has no subscription until its owner pays.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from sqlalchemy import insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.db import transaction, utcnow
from control_plane.errors import CapacityReached, QuotaExceeded
from control_plane.instances import quotas
from control_plane.instances.models import CloudInstance, InstanceEvent, InstanceStatus
from control_plane.provisioning.provider import Provider, ProviderError, SnapshotInfo, app_name
from control_plane.provisioning.worker import RESTORE_STEP
from control_plane.settings import Settings

__all__ = ["RESTORABLE", "RestoreQueued", "RestoreRefused", "request_restore", "restore_main"]

S = InstanceStatus
T = TypeVar("T")
#: Statuses a restore may start from (``running`` only when its machine is not started).
RESTORABLE = frozenset({S.CANCELED, S.DESTROYING, S.FAILED, S.RUNNING})
_WHY_NOT: dict[InstanceStatus, str] = {
    S.DRAFT: "has never run: there is no data to restore",
    S.AWAITING_PAYMENT: "has never run: there is no data to restore",
    S.PROVISIONING: "is being provisioned now; let it finish or fail first",
    S.PAST_DUE: "is past due: it keeps running through its grace period; nothing to restore",
    S.SUSPENDED: "is suspended for payment: it starts again on its data when the owner pays",
    S.DESTROYED: "was destroyed, and its snapshots with it",
}


class RestoreRefused(Exception):
    """The restore was not queued; ``str()`` says why (shown to the operator)."""


@dataclass(frozen=True, slots=True)
class RestoreQueued:
    instance_id: str
    snapshot: SnapshotInfo
    from_status: str
    step: str


async def request_restore(
    settings: Settings,
    factory: async_sessionmaker[AsyncSession],
    provider: Provider,
    instance_id: str,
    snapshot_id: str | None = None,
    *,
    now: datetime | None = None,
    key: str | None = None,
    over_quota: bool = False,
) -> RestoreQueued:
    """Check, then queue the restore for the worker (see the module docstring).

    Raises :class:`RestoreRefused` with the reason; nothing is written then."""
    async with factory() as session:
        inst = await session.get(CloudInstance, instance_id)
    if inst is None:
        raise RestoreRefused(f"no instance {instance_id!r}")
    status = S(inst.status)
    if status == S.PROVISIONING and (inst.step or "").startswith(f"{RESTORE_STEP}:"):
        raise RestoreRefused(
            f"instance {instance_id} is being restored already (from {inst.snapshot_id})"
        )
    if status not in RESTORABLE:
        raise RestoreRefused(f"instance {instance_id} {_WHY_NOT[status]}")
    app = inst.fly_app or app_name(inst.id, settings.app_prefix)
    if status == S.RUNNING and inst.machine_id:
        machine = await _provider_call(provider.machine(app, inst.machine_id))
        if machine is not None and machine.state == "started":
            raise RestoreRefused(
                f"instance {instance_id} is running fine (machine {machine.id} started"
                f"{' at ' + machine.url if machine.url else ''}); nothing to restore — cancel "
                "it first to replace its data"
            )
    snapshots = await _provider_call(provider.list_snapshots(app))
    if snapshot_id is None:
        if not snapshots:
            raise RestoreRefused(f"instance {instance_id} has no snapshot to restore from")
        snapshot = snapshots[-1]
    else:
        found = next((s for s in snapshots if s.id == snapshot_id), None)
        if found is None:
            known = ", ".join(s.id for s in snapshots[-5:]) or "none"
            raise RestoreRefused(
                f"snapshot {snapshot_id!r} does not exist for instance {instance_id} "
                f"(its newest: {known})"
            )
        snapshot = found
    now = now or utcnow()
    step = f"{RESTORE_STEP}:{key or secrets.token_hex(6)}"
    free = or_(CloudInstance.lease_until.is_(None), CloudInstance.lease_until < now)
    takes_slot = str(status) not in quotas.LIVE_STATUSES
    async with transaction(factory) as session:
        if takes_slot and not over_quota:
            await quotas.lock_user(session, inst.owner_id)
            try:
                await quotas.check_instance_quota(session, settings, inst.owner_id)
                await quotas.check_capacity(session, settings, inst.region)
            except (QuotaExceeded, CapacityReached) as exc:
                limit = (
                    f"its owner has {settings.instance_quota} live Rooms already (INSTANCE_QUOTA)"
                    if isinstance(exc, QuotaExceeded)
                    else f"{exc.message} (ROOMS_PER_REGION / ROOMS_TOTAL)"
                )
                raise RestoreRefused(
                    f"instance {instance_id}: {limit}; --over-quota restores it anyway"
                ) from exc
        moved = (
            await session.execute(
                update(CloudInstance)
                .where(
                    CloudInstance.id == instance_id,
                    CloudInstance.status == str(status),
                    free,
                )
                .values(
                    status=str(S.PROVISIONING),
                    step=step,
                    snapshot_id=snapshot.id,
                    run_after=now,
                    attempts=0,
                    deadline_at=None,
                    destroy_after=None,
                    error=None,
                    updated_at=now,
                )
                .returning(CloudInstance.id)
                .execution_options(synchronize_session=False)
            )
        ).scalar_one_or_none()
        if moved is None:
            raise RestoreRefused(
                f"instance {instance_id} changed or is being worked on right now (it was "
                f"{status}); try again in a moment"
            )
        await session.execute(
            insert(InstanceEvent).values(
                instance_id=instance_id,
                kind="restore_requested",
                from_status=str(status),
                to_status=str(S.PROVISIONING),
                message=f"restore from snapshot {snapshot.id} requested (ops restore)",
                data={
                    "snapshot_id": snapshot.id,
                    "snapshot_created_at": snapshot.created_at,
                    "volume_id": snapshot.volume_id,
                    "step": step,
                    **({"over_quota": True} if takes_slot and over_quota else {}),
                },
                created_at=now,
            )
        )
    return RestoreQueued(instance_id, snapshot, str(status), step)


async def _provider_call(call: Awaitable[T]) -> T:
    try:
        return await call
    except ProviderError as exc:
        raise RestoreRefused(f"the provider could not be asked: {exc}") from exc


async def restore_main(
    settings: Settings,
    instance_id: str,
    snapshot_id: str | None = None,
    *,
    wait: float | None = None,
    over_quota: bool = False,
    provider: Provider | None = None,
    poll: float = 1.0,
    clock: Callable[[], datetime] = utcnow,
) -> int:
    """The command: 0 when queued (with ``wait``: when ``running``), 1 when refused, failed or
    still not running after ``wait`` seconds."""
    from control_plane.db import create_engine, create_session_factory
    from control_plane.provisioning.runner import build_provider

    engine = create_engine(settings.resolved_database_url)
    owned = provider is None
    provider = provider or build_provider(settings)
    try:
        factory = create_session_factory(engine)
        try:
            queued = await request_restore(
                settings,
                factory,
                provider,
                instance_id,
                snapshot_id,
                now=clock(),
                over_quota=over_quota,
            )
        except RestoreRefused as exc:
            print(f"not restored: {exc}", file=sys.stderr)
            return 1
        print(
            f"restore of {instance_id} ({queued.from_status}) from snapshot "
            f"{queued.snapshot.id} (taken {queued.snapshot.created_at or 'at an unknown time'}) "
            "queued; the worker runs it (its events: restore_requested, restore, running)"
        )
        if wait is None:
            return 0
        return await _wait(factory, instance_id, wait, poll)
    finally:
        if owned:
            await provider.aclose()
        await engine.dispose()


async def _wait(
    factory: async_sessionmaker[AsyncSession], instance_id: str, wait: float, poll: float
) -> int:
    deadline = time.monotonic() + wait
    while True:
        async with factory() as session:
            row = (
                await session.execute(
                    select(CloudInstance.status, CloudInstance.url, CloudInstance.error).where(
                        CloudInstance.id == instance_id
                    )
                )
            ).one()
        if row.status == S.RUNNING:
            print(f"restored: {instance_id} is running at {row.url}")
            return 0
        if row.status != S.PROVISIONING:
            print(f"restore failed: {instance_id} is {row.status}: {row.error}", file=sys.stderr)
            return 1
        if time.monotonic() >= deadline:
            print(
                f"still restoring after {wait:g}s ({instance_id} is {row.status}); the worker "
                "goes on: watch its events",
                file=sys.stderr,
            )
            return 1
        await asyncio.sleep(poll)
