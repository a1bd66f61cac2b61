"""The reconciler: re-drives stuck instances and sweeps orphans both ways.

Run periodically by the worker (``reconcile_seconds``; once right at start-up). One pass:

1. **Re-drive.** An instance in a work status with nothing scheduled (``run_after`` is NULL) —
   a lost wake-up, a crash between a status change and its scheduling, a billing write that did
   not schedule — gets ``run_after`` again: now, or when its own deadline comes (the
   subscription's grace deadline for ``past_due``, ``destroy_after`` for ``destroying``). A
   ``provisioning`` instance past its ``deadline_at`` whose lease has expired is scheduled now, so
   the worker fails it with the deadline message.
2. **Provider → database.** Every app the provider holds under our prefix whose instance is not
   in the database, or is ``destroyed``, is destroyed (an event is recorded on the instance when
   it exists). This is what a lost "destroy" or a crash between a create and its persist leaves.
3. **Database → provider.** Every ``running`` instance whose machine is gone goes back to
   ``provisioning`` (the worker recreates the machine on the existing volume, or fails it);
   one whose machine is stopped is started again, with an event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.billing.models import InstanceSubscription
from control_plane.db import transaction, utcnow
from control_plane.instances import access_log
from control_plane.instances.lifecycle import (
    IllegalTransition,
    record_event,
    transition,
    update_fields,
)
from control_plane.instances.models import CloudInstance, InstanceStatus
from control_plane.provisioning.provider import Provider, ProviderError
from control_plane.settings import Settings

__all__ = ["ReconcileReport", "Reconciler"]

logger = logging.getLogger(__name__)
S = InstanceStatus
#: Provider calls in flight at once while checking running instances' machines.
CHECK_CONCURRENCY = 16


@dataclass
class ReconcileReport:
    redriven: list[str] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)  # unpaid checkouts canceled
    orphans_destroyed: list[str] = field(default_factory=list)  # app names
    reprovisioned: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.redriven or self.reprovisioned or self.abandoned)

    def counts(self) -> dict[str, int]:
        """How many of each action (the metrics' ``action`` label)."""
        return {name: len(items) for name, items in vars(self).items()}


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        session_factory: async_sessionmaker[AsyncSession],
        provider: Provider,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.factory = session_factory
        self.provider = provider
        self.clock = clock

    async def run_once(self) -> ReconcileReport:
        report = ReconcileReport()
        await self.expire_checkouts(report)
        await self.redrive(report)
        try:
            await self.sweep_provider(report)
        except ProviderError as exc:
            report.errors.append(str(exc))
            logger.warning("reconciler: listing the provider failed: %s", exc)
        await self.check_running(report)
        await self.prune_access_log()
        return report

    async def prune_access_log(self) -> None:
        """Access-log entries past ``ACCESS_LOG_RETENTION_DAYS`` go (issue 15). A failure is
        logged: the next pass tries again, and nothing else waits on it."""
        try:
            removed = await access_log.prune(
                self.factory,
                now=self.clock(),
                retention_days=self.settings.access_log_retention_days,
            )
        except Exception:
            logger.exception("reconciler: pruning the access log failed")
            return
        if removed:
            logger.info("reconciler: %d access-log entries past retention removed", removed)

    # ------------------------------------------------------------------ 0. abandoned checkouts

    async def expire_checkouts(self, report: ReconcileReport) -> None:
        """Cancel instances still unpaid ``CHECKOUT_ABANDON_HOURS`` after their creation.

        Their Checkout Session has expired at Stripe (24 h), so no payment can arrive; left
        alone they would count against the owner's quota forever. The guarded transition loses
        to a payment that lands first (the instance is then no longer awaiting payment).
        """
        now = self.clock()
        cutoff = now - timedelta(hours=self.settings.checkout_abandon_hours)
        unpaid = [str(S.DRAFT), str(S.AWAITING_PAYMENT)]
        async with self.factory() as session:
            ids = (
                await session.scalars(
                    select(CloudInstance.id).where(
                        CloudInstance.status.in_(unpaid), CloudInstance.created_at < cutoff
                    )
                )
            ).all()
        for instance_id in ids:
            try:
                async with transaction(self.factory) as session:
                    await transition(
                        session,
                        instance_id,
                        expected=(S.DRAFT, S.AWAITING_PAYMENT),
                        to=S.CANCELED,
                        message=(
                            f"checkout abandoned: no payment within "
                            f"{self.settings.checkout_abandon_hours} h"
                        ),
                        kind="billing",
                        now=now,
                        run_after=now,
                        destroy_after=now,
                    )
            except IllegalTransition:
                continue  # paid (or canceled) meanwhile
            report.abandoned.append(instance_id)

    # ------------------------------------------------------------------ 1. re-drive

    async def redrive(self, report: ReconcileReport) -> None:
        now = self.clock()
        unscheduled = CloudInstance.run_after.is_(None)
        stuck = and_(
            CloudInstance.status == str(S.PROVISIONING),
            CloudInstance.deadline_at.is_not(None),
            CloudInstance.deadline_at < now,
            CloudInstance.run_after > now,
            or_(CloudInstance.lease_until.is_(None), CloudInstance.lease_until < now),
        )
        async with self.factory() as session:
            rows = (
                await session.execute(
                    select(CloudInstance, InstanceSubscription)
                    .outerjoin(
                        InstanceSubscription,
                        InstanceSubscription.instance_id == CloudInstance.id,
                    )
                    .where(
                        CloudInstance.status.in_(
                            [str(s) for s in (S.PROVISIONING, S.PAST_DUE, S.SUSPENDED)]
                            + [str(S.CANCELED), str(S.DESTROYING)]
                        ),
                        or_(unscheduled, stuck),
                    )
                )
            ).all()
        for inst, sub in rows:
            when = self._due(inst, sub, now)
            if when is None:
                continue
            async with transaction(self.factory) as session:
                result = await session.execute(
                    update(CloudInstance)
                    .where(
                        CloudInstance.id == inst.id,
                        CloudInstance.status == inst.status,
                        or_(
                            CloudInstance.run_after.is_(None),
                            CloudInstance.run_after == inst.run_after,
                        ),
                    )
                    .values(run_after=when)
                    .returning(CloudInstance.id)
                    .execution_options(synchronize_session=False)
                )
                if result.scalar_one_or_none() is None:
                    continue  # someone else scheduled it meanwhile
                await record_event(
                    session,
                    inst.id,
                    "reconcile",
                    f"re-driven: {inst.status} had no work scheduled"
                    if inst.run_after is None
                    else f"re-driven: {inst.status} past its deadline",
                    {"run_after": when.isoformat()},
                    now=now,
                )
            report.redriven.append(inst.id)

    def _due(
        self, inst: CloudInstance, sub: InstanceSubscription | None, now: datetime
    ) -> datetime | None:
        status = inst.status
        if status in (S.PROVISIONING, S.CANCELED):
            return now
        if status == S.DESTROYING:
            return inst.destroy_after or now
        if status == S.PAST_DUE:
            return sub.grace_until if sub is not None and sub.grace_until else None
        if status == S.SUSPENDED:
            active = sub is not None and sub.status in ("active", "trialing")
            return now if active else None
        return None

    # ------------------------------------------------------------------ 2. provider → database

    async def sweep_provider(self, report: ReconcileReport) -> None:
        owned = await self.provider.list_owned()
        if not owned:
            return
        ids = [o.instance_id for o in owned]
        async with self.factory() as session:
            rows = (
                await session.execute(
                    select(CloudInstance.id, CloudInstance.status).where(CloudInstance.id.in_(ids))
                )
            ).all()
        status = {row.id: row.status for row in rows}
        for item in owned:
            current = status.get(item.instance_id)
            if current is not None and current != S.DESTROYED:
                continue
            try:
                await self.provider.destroy(item.app)
            except ProviderError as exc:
                report.errors.append(str(exc))
                logger.warning("reconciler: destroying orphan %s failed: %s", item.app, exc)
                continue
            report.orphans_destroyed.append(item.app)
            logger.info("reconciler: destroyed orphan app %s", item.app)
            if current is not None:
                async with transaction(self.factory) as session:
                    await record_event(
                        session,
                        item.instance_id,
                        "orphan_destroyed",
                        f"app {item.app} was still on the provider: destroyed",
                        {"app": item.app},
                        now=self.clock(),
                    )

    # ------------------------------------------------------------------ 3. database → provider

    async def check_running(self, report: ReconcileReport) -> None:
        """Ask the provider for every running instance's machine, :data:`CHECK_CONCURRENCY` at
        a time: one by one, a pass over 10,000 Rooms at Fly's ~0.1-0.3 s a call would take
        17-50 minutes, longer than ``RECONCILE_SECONDS`` (``scripts/drill reconciler-scale``)."""
        async with self.factory() as session:
            running = (
                await session.scalars(
                    select(CloudInstance).where(CloudInstance.status == str(S.RUNNING))
                )
            ).all()
        pending = iter(running)

        async def lane() -> None:
            for inst in pending:  # shared: each instance is taken by one lane
                try:
                    await self._check_one(inst, report)
                except ProviderError as exc:
                    report.errors.append(str(exc))
                    logger.warning("reconciler: checking %s failed: %s", inst.id, exc)
                except IllegalTransition:
                    continue  # it moved meanwhile (past due, canceled): not ours to fix now

        await asyncio.gather(*(lane() for _ in range(min(CHECK_CONCURRENCY, len(running)))))

    async def _check_one(self, inst: CloudInstance, report: ReconcileReport) -> None:
        machine = None
        if inst.fly_app and inst.machine_id:
            machine = await self.provider.machine(inst.fly_app, inst.machine_id)
        now = self.clock()
        if machine is None:
            async with transaction(self.factory) as session:
                await transition(
                    session,
                    inst.id,
                    expected=[S.RUNNING],
                    to=S.PROVISIONING,
                    message="the machine is gone from the provider: re-provisioning",
                    kind="reconcile",
                    data={"machine_id": inst.machine_id},
                    now=now,
                    machine_id=None,
                    step="volume" if inst.volume_id else None,
                    attempts=0,
                    run_after=now,
                    deadline_at=now + timedelta(seconds=self.settings.provision_deadline_seconds),
                )
            report.reprovisioned.append(inst.id)
            return
        if machine.state in ("stopped", "suspended") and inst.fly_app and inst.machine_id:
            await self.provider.start(inst.fly_app, inst.machine_id)
            after = await self.provider.machine(inst.fly_app, inst.machine_id)
            url = after.url if after is not None and after.url else inst.url
            async with transaction(self.factory) as session:
                await update_fields(session, inst.id, status=S.RUNNING, url=url)
                await record_event(
                    session,
                    inst.id,
                    "reconcile",
                    "the machine was stopped: started again",
                    {"machine_id": inst.machine_id},
                    now=now,
                )
            report.restarted.append(inst.id)
