"""The provisioning worker: the instance lifecycle driven as a state machine in the database.

Work is data. An instance needs the worker when its status is one of :data:`WORK_STATUSES` and its
``run_after`` has come; the worker *claims* it by writing its lease (``lease_owner``,
``lease_until``) in one guarded UPDATE — the candidate row picked with ``FOR UPDATE SKIP LOCKED``
on PostgreSQL (procrastinate's pattern), and under SQLite's single writer (``BEGIN IMMEDIATE``)
with the same guard — so any number of workers, in one process or many, never take the same
instance at once. A worker that dies keeps its lease until ``lease_until``; then the instance is
claimable again.

What the worker does per status:

``provisioning``
    app → secrets → volume → machine → healthy → ``running``. A restore (``quoroom-cloud ops
    restore``, :mod:`.restore`) queues ``step`` = ``restore:<key>`` with the snapshot in
    ``snapshot_id``: app → the provider restores the volume from the snapshot (the old machine
    goes) → then machine → healthy → ``running`` as above. Each step is persisted (``step``,
    the provider id, an ``instance_events`` row) the moment it completes, so a worker killed
    mid-way resumes at the first step not done; the provider methods find what a lost reply
    created (by deterministic name or metadata), so a resumed or retried step never makes a
    second machine.
``past_due``
    when the subscription's ``grace_until`` passes: stop the machine → ``suspended``.
``suspended``
    when the subscription is active again: start the machine, wait healthy → ``running``.
``canceled``
    stop the machine, snapshot the volume (``snapshot_id``), ``destroy_after`` = now + retention
    → ``destroying``.
``destroying``
    when ``destroy_after`` passes: destroy the app and everything in it → ``destroyed``.

Failures never sleep in the worker: a retryable provider error bumps ``attempts`` and sets
``run_after`` = now + exponential backoff with jitter (stored as data, like every retry);
provisioning that runs out of attempts or passes ``deadline_at`` becomes ``failed`` with the error
(the API's retry moves it back). Wind-down states (suspend, cancel, destroy) never give up — a
resource left running is an orphan — they retry at the capped interval.

Every write after the claim is *fenced* by the lease: it only lands while ``lease_owner`` is still
this worker, so a worker that lost its lease (it stalled past ``lease_until`` and another took
over) stops at its next write instead of racing the new owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.billing.catalog import Catalog, default_catalog, load_catalog
from control_plane.billing.models import InstanceSubscription
from control_plane.db import transaction, utcnow
from control_plane.instances.access_log import REPORT_KEY_ENV, report_key
from control_plane.instances.lifecycle import IllegalTransition, record_event, transition
from control_plane.instances.lifecycle import update_fields as lifecycle_update_fields
from control_plane.instances.models import CloudInstance, InstanceEvent, InstanceStatus
from control_plane.logs import bound
from control_plane.metrics import FleetGauges, Metrics, metered_provider
from control_plane.provisioning.provider import (
    InstanceSpec,
    MachineInfo,
    Provider,
    ProviderError,
    app_name,
    credential_env,
)
from control_plane.runtime_kinds import RUNTIME_KINDS
from control_plane.settings import Settings

if TYPE_CHECKING:
    from control_plane.provisioning.reconciler import ReconcileReport

__all__ = [
    "ACTIVE_SUBSCRIPTION",
    "PROVISION_STEPS",
    "RESTORE_STEP",
    "WORK_STATUSES",
    "LeaseLost",
    "Worker",
    "backoff_delay",
    "fleet_gauges",
]

logger = logging.getLogger(__name__)

S = InstanceStatus
#: Statuses the worker acts on (when ``run_after`` has come).
WORK_STATUSES: tuple[InstanceStatus, ...] = (
    S.PROVISIONING,
    S.PAST_DUE,
    S.SUSPENDED,
    S.CANCELED,
    S.DESTROYING,
)
#: Provisioning steps, in order; ``cloud_instances.step`` holds the last one completed.
PROVISION_STEPS: tuple[str, ...] = ("app", "secrets", "volume", "machine")
#: ``step`` of a queued restore: ``restore:<key>`` (the key names what the restore creates).
RESTORE_STEP = "restore"
#: Seconds between attempts to release a lease the database refused (then it expires).
RELEASE_RETRY_DELAYS: tuple[float, ...] = (0.1, 0.3, 1.0, 2.0, 4.0)
#: Subscription statuses (Stripe's words) under which a Room may run.
ACTIVE_SUBSCRIPTION = frozenset({"active", "trialing"})

Credentials = Callable[[CloudInstance], Mapping[str, str]]


class LeaseLost(Exception):
    """This worker no longer holds the instance's lease (it expired and another claimed it)."""


def backoff_delay(
    attempts: int, *, base: float, cap: float, rng: Callable[[], float] = random.random
) -> float:
    """Exponential backoff with "equal jitter": half the delay fixed, half random.

    ``attempts`` counts failures so far (1 after the first). The jitter spreads retries of many
    instances that failed together (a provider outage) instead of retrying them in lockstep.
    """
    # The exponent is never negative, so the power is an int (typeshed types ``int ** int`` as
    # Any, since a negative exponent would make it a float).
    growth: int = 2 ** max(0, attempts - 1)
    delay = min(cap, base * growth)
    return delay / 2 + rng() * delay / 2


@dataclass
class _Job:
    """The claimed row, refreshed after each write (so ``attempts`` etc. are current)."""

    inst: CloudInstance


class Worker:
    """Claims due instances and drives each one step of its lifecycle at a time.

    ``run(stop)`` is the long-running loop (``worker_concurrency`` claim loops plus the periodic
    reconciler); ``run_once()`` / ``run_until_idle()`` are the units tests and benchmarks drive.
    ``wakeup.set()`` makes idle loops look for work at once (the billing code calls it after
    fulfilment, so provisioning starts without waiting for the next poll).
    """

    def __init__(
        self,
        settings: Settings,
        session_factory: async_sessionmaker[AsyncSession],
        provider: Provider,
        *,
        catalog: Catalog | None = None,
        clock: Callable[[], datetime] = utcnow,
        owner: str | None = None,
        credentials: Credentials | None = None,
        rng: Callable[[], float] = random.random,
        reconcile: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.factory = session_factory
        self.metrics = metrics
        self.provider = metered_provider(provider, metrics)
        self.catalog = catalog or _catalog_from(settings)
        self.clock = clock
        self.owner = owner or f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._credentials = credentials or self._decrypted_credentials
        self._rng = rng
        self.wakeup = asyncio.Event()
        self._lease = timedelta(seconds=settings.worker_lease_seconds)
        self._reconcile = reconcile
        self._handlers: dict[str, Callable[[_Job], Awaitable[None]]] = {
            S.PROVISIONING: self._provision,
            S.PAST_DUE: self._past_due,
            S.SUSPENDED: self._suspended,
            S.CANCELED: self._canceled,
            S.DESTROYING: self._destroying,
        }

    # ------------------------------------------------------------------ loop

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set: claim loops, plus the reconciler every
        ``reconcile_seconds`` (first right away: a restart heals what it finds)."""
        tasks = [
            asyncio.create_task(self._claim_loop(stop), name=f"worker-{n}")
            for n in range(self.settings.worker_concurrency)
        ]
        if self._reconcile:
            tasks.append(asyncio.create_task(self._reconcile_loop(stop), name="reconciler"))
        try:
            await stop.wait()
        finally:
            self.wakeup.set()  # idle loops notice the stop at once
            _done, pending = await asyncio.wait(tasks, timeout=10)
            for task in pending:  # a provider call still in flight: the lease is released
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                worked = await self.run_once()
            except Exception:  # the database is down, say: log, wait, try again
                logger.exception("worker: claiming work failed")
                worked = False
            if not worked and not stop.is_set():
                await self._idle(stop)

    async def _idle(self, stop: asyncio.Event) -> None:
        timeout = self.settings.worker_poll_seconds
        try:
            due = await self.next_due()
        except Exception:
            due = None
        if due is not None:
            timeout = max(0.0, min(timeout, (due - self.clock()).total_seconds()))
        if timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), timeout)
        self.wakeup.clear()

    async def _reconcile_loop(self, stop: asyncio.Event) -> None:
        from control_plane.provisioning.reconciler import Reconciler

        reconciler = Reconciler(self.settings, self.factory, self.provider, clock=self.clock)
        while not stop.is_set():
            try:
                report = await reconciler.run_once()
                if report.changed:
                    self.wakeup.set()
                self.record_reconcile(report)
            except Exception:
                logger.exception("reconciler: pass failed")
                self.record_reconcile(None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.reconcile_seconds)

    def record_reconcile(self, report: ReconcileReport | None) -> None:
        """Count a reconciler pass's actions (``None``: the pass failed)."""
        if self.metrics is not None:
            actions = None if report is None else report.counts()
            self.metrics.reconciled(actions)

    async def run_until_idle(self, *, limit: int = 1000) -> int:
        """Process due instances until none is left (or ``limit``); return how many."""
        count = 0
        while count < limit and await self.run_once():
            count += 1
        return count

    async def run_once(self) -> bool:
        """Claim one due instance and drive it one state forward; ``False`` if none was due."""
        job = await self.claim()
        if job is None:
            return False
        try:
            await self.process(job)
        finally:
            await asyncio.shield(self._release(job.inst.id))
        return True

    async def next_due(self) -> datetime | None:
        """When this worker could next claim something (for the idle wait).

        A due instance that another claim loop holds is not claimable before its lease ends:
        counting its ``run_after`` would make every idle loop wake at once and spin for as long
        as that instance is being provisioned (starving the runtime it is booting). The holder
        releases the lease itself when done; the others only need to wake if it never does.
        """
        now = self.clock()
        scheduled = (
            CloudInstance.status.in_([str(s) for s in WORK_STATUSES]),
            CloudInstance.run_after.is_not(None),
        )
        free = or_(CloudInstance.lease_until.is_(None), CloudInstance.lease_until < now)
        async with self.factory() as session:
            due_free: datetime | None = await session.scalar(
                select(func.min(CloudInstance.run_after)).where(*scheduled, free)
            )
            lease_end: datetime | None = await session.scalar(
                select(func.min(CloudInstance.lease_until)).where(*scheduled, ~free)
            )
        candidates = [t for t in (due_free, lease_end) if t is not None]
        return min(candidates) if candidates else None

    # ------------------------------------------------------------------ claim and lease

    async def claim(self) -> _Job | None:
        """Take the lease of the most overdue instance nobody holds; ``None`` if none is due."""
        now = self.clock()
        free = or_(CloudInstance.lease_until.is_(None), CloudInstance.lease_until < now)
        candidate = (
            select(CloudInstance.id)
            .where(
                CloudInstance.status.in_([str(s) for s in WORK_STATUSES]),
                CloudInstance.run_after.is_not(None),
                CloudInstance.run_after <= now,
                free,
            )
            .order_by(CloudInstance.run_after)
            .limit(1)
        )
        async with transaction(self.factory) as session:
            if session.get_bind().dialect.name == "postgresql":
                # Skip rows another worker is claiming right now instead of queueing behind it.
                candidate = candidate.with_for_update(skip_locked=True)
            row = (
                await session.execute(
                    update(CloudInstance)
                    .where(CloudInstance.id == candidate.scalar_subquery(), free)
                    .values(lease_owner=self.owner, lease_until=now + self._lease)
                    .returning(CloudInstance)
                    .execution_options(synchronize_session=False)
                )
            ).scalar_one_or_none()
        return _Job(row) if row is not None else None

    async def _fence(self, session: AsyncSession, instance_id: str, now: datetime) -> None:
        """Renew the lease, or raise :class:`LeaseLost` if it is no longer ours."""
        result = await session.execute(
            update(CloudInstance)
            .where(CloudInstance.id == instance_id, CloudInstance.lease_owner == self.owner)
            .values(lease_until=now + self._lease)
            .returning(CloudInstance.id)
            .execution_options(synchronize_session=False)
        )
        if result.scalar_one_or_none() is None:
            raise LeaseLost(instance_id)

    async def _release(self, instance_id: str) -> None:
        """Give the lease back. The database may be restarting (the write that failed the job
        may be why we are here): a few retries over ~8 s (:data:`RELEASE_RETRY_DELAYS`) before
        leaving the instance to wait out its lease (``WORKER_LEASE_SECONDS``, 15 min by
        default) — the PostgreSQL restart drill (``scripts/drill postgres-restarted``)."""
        for delay in (*RELEASE_RETRY_DELAYS, None):
            try:
                async with transaction(self.factory) as session:
                    await session.execute(
                        update(CloudInstance)
                        .where(
                            CloudInstance.id == instance_id, CloudInstance.lease_owner == self.owner
                        )
                        .values(lease_owner=None, lease_until=None)
                        .execution_options(synchronize_session=False)
                    )
                return
            except Exception:
                if delay is None:  # the lease then simply expires
                    logger.exception("worker: could not release the lease of %s", instance_id)
                    return
                logger.warning(
                    "worker: releasing the lease of %s failed; retrying in %.1fs",
                    instance_id,
                    delay,
                )
                await asyncio.sleep(delay)

    # ------------------------------------------------------------------ fenced writes

    async def _save(
        self,
        job: _Job,
        *,
        event: tuple[str, str, dict[str, Any] | None] | None = None,
        **fields: Any,
    ) -> None:
        """Persist ``fields`` (an id right after its create, the step...) while the status and
        the lease still hold, with an optional event row; refresh ``job.inst``."""
        now = self.clock()
        async with transaction(self.factory) as session:
            await self._fence(session, job.inst.id, now)
            job.inst = await lifecycle_update_fields(
                session, job.inst.id, status=S(job.inst.status), **fields
            )
            if event is not None:
                kind, message, data = event
                await record_event(session, job.inst.id, kind, message, data, now=now)

    async def _move(
        self,
        job: _Job,
        to: InstanceStatus,
        message: str,
        *,
        kind: str = "transition",
        data: dict[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        """One guarded transition (+ event), fenced by the lease; resets the retry bookkeeping."""
        now = self.clock()
        values: dict[str, Any] = {"attempts": 0, "run_after": None, **fields}
        async with transaction(self.factory) as session:
            await self._fence(session, job.inst.id, now)
            job.inst = await transition(
                session,
                job.inst.id,
                expected=[S(job.inst.status)],
                to=to,
                message=message,
                kind=kind,
                data=data,
                now=now,
                **values,
            )

    # ------------------------------------------------------------------ dispatch and retries

    async def process(self, job: _Job) -> None:
        """Drive one claimed instance; provider errors become retries or ``failed``."""
        handler = self._handlers.get(job.inst.status)
        if handler is None:  # claimed, then moved out of the work statuses: nothing to do
            return
        with bound(await self._request_id(job.inst.id)):
            await self._run(handler, job)

    async def _request_id(self, instance_id: str) -> str | None:
        """The request id stored with the instance's last event: the request that queued this
        work (or the job before it that it caused), so its lines and provider calls carry it."""
        async with self.factory() as session:
            data = (
                await session.execute(
                    select(InstanceEvent.data)
                    .where(InstanceEvent.instance_id == instance_id)
                    .order_by(InstanceEvent.id.desc())
                    .limit(1)
                )
            ).scalar_one_or_none()
        value = data.get("request_id") if isinstance(data, dict) else None
        return value if isinstance(value, str) else None

    async def _run(self, handler: Callable[[_Job], Awaitable[None]], job: _Job) -> None:
        try:
            await handler(job)
        except ProviderError as exc:
            await self._failed_attempt(job, exc)
        except (IllegalTransition, LeaseLost) as exc:
            # Canceled meanwhile, or another worker owns it now: leave it to that path.
            logger.info("worker: %s changed under us (%s)", job.inst.id, type(exc).__name__)
        except Exception as exc:
            # A bug or an unexpected reply: never spin on it, back off like a provider error.
            logger.exception("worker: unexpected error on %s", job.inst.id)
            await self._failed_attempt(
                job, ProviderError(f"internal error ({type(exc).__name__})", retryable=True)
            )

    async def _failed_attempt(self, job: _Job, exc: ProviderError) -> None:
        now = self.clock()
        inst = job.inst
        attempts = inst.attempts + 1
        step = exc.step or inst.step
        data: dict[str, Any] = {"step": step, "attempts": attempts, "retryable": exc.retryable}
        message = _short(str(exc))
        try:
            if inst.status == S.PROVISIONING:
                past_deadline = inst.deadline_at is not None and now >= inst.deadline_at
                out_of_attempts = attempts >= self.settings.worker_max_attempts
                if not exc.retryable or out_of_attempts or past_deadline:
                    why = (
                        "not retryable"
                        if not exc.retryable
                        else ("deadline passed" if past_deadline else "out of attempts")
                    )
                    if self.metrics is not None:
                        self.metrics.provisioning.labels("failed").inc()
                    await self._move(
                        job,
                        S.FAILED,
                        f"provisioning failed at {step} ({why}): {message}",
                        kind="failed",
                        data=data,
                        error=message,
                        attempts=attempts,
                        deadline_at=None,
                    )
                    return
            delay = backoff_delay(
                attempts,
                base=self.settings.worker_retry_base_seconds,
                cap=self.settings.worker_retry_max_seconds,
                rng=self._rng,
            )
            if not exc.retryable:  # wind-down states never give up; they just slow down
                delay = self.settings.worker_retry_max_seconds
            data["delay_seconds"] = round(delay, 3)
            if self.metrics is not None:
                self.metrics.worker_retries.labels(str(inst.status)).inc()
            await self._save(
                job,
                attempts=attempts,
                run_after=now + timedelta(seconds=delay),
                error=message,
                event=(
                    "retry",
                    f"{step} failed (attempt {attempts}), retry in {delay:.1f}s: {message}",
                    data,
                ),
            )
        except (IllegalTransition, LeaseLost):
            logger.info("worker: %s changed under us while recording a failure", inst.id)

    # ------------------------------------------------------------------ helpers

    def spec(self, inst: CloudInstance) -> InstanceSpec:
        try:
            tier = self.catalog.tier(inst.tier)
        except KeyError as exc:
            raise ProviderError(
                f"tier {inst.tier!r} is not in the catalog", retryable=False, step="spec"
            ) from exc
        kind = next((k for k in RUNTIME_KINDS if k == inst.runtime_kind), None)
        if kind is None:
            raise ProviderError(
                f"runtime kind {inst.runtime_kind!r} is unknown", retryable=False, step="spec"
            )
        return InstanceSpec(
            instance_id=inst.id,
            owner_id=inst.owner_id,
            region=inst.region,
            cpu_kind=tier.cpu_kind,
            cpus=tier.cpus,
            memory_mb=tier.memory_mb,
            volume_gb=tier.volume_gb,
            runtime_kind=kind,
            secrets_version=inst.secrets_version,
        )

    def _app(self, inst: CloudInstance) -> str:
        return inst.fly_app or app_name(inst.id, self.settings.app_prefix)

    def _decrypted_credentials(self, inst: CloudInstance) -> Mapping[str, str]:
        if not inst.credentials_encrypted:
            return {}
        from control_plane.errors import KeyDecryptionFailed
        from control_plane.instances.credentials import decrypt_credentials

        try:
            return decrypt_credentials(self.settings, inst)
        except KeyDecryptionFailed as exc:
            raise ProviderError(f"secrets: {exc.message}", retryable=False, step="secrets") from exc

    async def _subscription(self, instance_id: str) -> InstanceSubscription | None:
        async with self.factory() as session:
            sub: InstanceSubscription | None = await session.get(InstanceSubscription, instance_id)
            return sub

    # ------------------------------------------------------------------ provisioning

    async def _provision(self, job: _Job) -> None:
        now = self.clock()
        if job.inst.deadline_at is None:
            deadline = now + timedelta(seconds=self.settings.provision_deadline_seconds)
            await self._save(job, deadline_at=deadline)
        if (job.inst.step or "").startswith(f"{RESTORE_STEP}:"):
            await self._restore(job)
        spec = self.spec(job.inst)
        done = PROVISION_STEPS.index(job.inst.step) if job.inst.step in PROVISION_STEPS else -1

        if done < 0 or not job.inst.fly_app:
            app = await self.provider.ensure_app(spec)
            await self._step(job, "app", f"app {app} ready", {"app": app}, fly_app=app)
        app = self._app(job.inst)

        if done < 1:
            owner_secrets = credential_env(self._credentials(job.inst))
            # Plus the runtime's key for reporting its refusals to the access log (issue 15).
            secrets = {**owner_secrets, REPORT_KEY_ENV: report_key(self.settings, job.inst.id)}
            version = await self.provider.set_secrets(spec, app, secrets)
            # The event records how many of the owner's (and the version), never a name or a
            # value. The version is persisted: a restarted worker creates the machine with it.
            await self._step(
                job,
                "secrets",
                f"{len(owner_secrets)} secret(s) set",
                {"secrets_version": version} if version is not None else None,
                secrets_version=version,
            )
            spec = replace(spec, secrets_version=version)

        volume = await self.provider.ensure_volume(spec, app, job.inst.volume_id)
        if done < 2 or volume.id != job.inst.volume_id:
            await self._step(
                job,
                "volume",
                f"volume {volume.id} ready in {volume.region}",
                {"volume_id": volume.id, "region": volume.region},
                volume_id=volume.id,
            )

        machine = await self.provider.ensure_machine(spec, app, volume, job.inst.machine_id)
        if done < 3 or machine.id != job.inst.machine_id:
            await self._step(
                job,
                "machine",
                f"machine {machine.id} created in {volume.region}",
                {"machine_id": machine.id, "image": machine.image},
                machine_id=machine.id,
                image=machine.image or job.inst.image,
            )

        healthy = await self.provider.wait_healthy(spec, app, machine.id)
        await self._move(
            job,
            S.RUNNING,
            f"running at {healthy.url}",
            data={"url": healthy.url, "machine_id": machine.id},
            url=healthy.url,
            step="running",
            error=None,
            deadline_at=None,
        )
        if self.metrics is not None:
            self.metrics.provisioning.labels("running").inc()

    async def _restore(self, job: _Job) -> None:
        """The restore's own steps: the app, then the volume from the snapshot. Ends at step
        ``volume`` (secrets stay on the app), with ``snapshot_id`` cleared so the next cancel
        snapshots the restored Room's data again."""
        inst = job.inst
        key = (inst.step or "").partition(":")[2]
        snapshot_id = inst.snapshot_id
        if not snapshot_id or not key:
            raise ProviderError(
                "restore: no snapshot recorded to restore from", retryable=False, step="restore"
            )
        spec = self.spec(inst)
        app = await self.provider.ensure_app(spec)
        volume = await self.provider.restore_volume(spec, app, snapshot_id, inst.machine_id, key)
        data = {
            "step": "restore",
            "snapshot_id": snapshot_id,
            "volume_id": volume.id,
            "region": volume.region,
            "replaced_volume_id": inst.volume_id,
            "replaced_machine_id": inst.machine_id,
        }
        await self._save(
            job,
            event=("restore", f"volume {volume.id} restored from snapshot {snapshot_id}", data),
            step="volume",
            fly_app=app,
            volume_id=volume.id,
            machine_id=None,
            snapshot_id=None,
            attempts=0,
            error=None,
        )

    async def _step(
        self, job: _Job, step: str, message: str, data: dict[str, Any] | None, **fields: Any
    ) -> None:
        # Progress resets the attempt count: the deadline bounds a flapping instance.
        await self._save(
            job,
            event=("step", message, {"step": step, **(data or {})}),
            step=step,
            attempts=0,
            error=None,
            **fields,
        )

    # ------------------------------------------------------------------ billing states

    async def _past_due(self, job: _Job) -> None:
        now = self.clock()
        sub = await self._subscription(job.inst.id)
        if sub is not None and sub.status in ACTIVE_SUBSCRIPTION:
            # The payment went through but the billing side has not moved it back yet.
            await self._move(job, S.RUNNING, "subscription active again", kind="resumed")
            return
        grace = sub.grace_until if sub is not None else None
        if grace is None:
            logger.warning("worker: %s is past due without a grace deadline", job.inst.id)
            await self._save(job, run_after=None)
            return
        if now < grace:
            await self._save(job, run_after=grace)
            return
        if job.inst.machine_id:
            await self.provider.stop(self._app(job.inst), job.inst.machine_id)
        await self._move(
            job,
            S.SUSPENDED,
            "grace period over: machine stopped",
            kind="suspended",
            data={"grace_until": grace.isoformat()},
            step="stopped",
        )

    async def _suspended(self, job: _Job) -> None:
        sub = await self._subscription(job.inst.id)
        if sub is None or sub.status not in ACTIVE_SUBSCRIPTION:
            await self._save(job, run_after=None)  # nothing to do until payment
            return
        spec = self.spec(job.inst)
        app = self._app(job.inst)
        current: MachineInfo | None = None
        if job.inst.machine_id:
            current = await self.provider.machine(app, job.inst.machine_id)
        if current is None:  # gone while suspended: recreate it on the same volume
            volume = await self.provider.ensure_volume(spec, app, job.inst.volume_id)
            current = await self.provider.ensure_machine(spec, app, volume, None)
            await self._save(
                job,
                machine_id=current.id,
                volume_id=volume.id,
                event=("step", f"machine {current.id} recreated", {"machine_id": current.id}),
            )
        else:
            await self.provider.start(app, current.id)
        healthy = await self.provider.wait_healthy(spec, app, current.id)
        await self._move(
            job,
            S.RUNNING,
            "payment received: machine started",
            kind="resumed",
            url=healthy.url,
            step="running",
            error=None,
        )

    # ------------------------------------------------------------------ wind-down

    async def _canceled(self, job: _Job) -> None:
        app = self._app(job.inst)
        machine_id = job.inst.machine_id
        if machine_id is None and job.inst.fly_app:
            # A create may have landed without its id persisted (canceled mid-provisioning).
            found = await self.provider.find_machine(app, job.inst.id)
            machine_id = found.id if found else None
        if machine_id is not None and job.inst.step != "stopped":
            await self.provider.stop(app, machine_id)
            await self._save(
                job,
                step="stopped",
                machine_id=machine_id,
                event=("step", "machine stopped", {"machine_id": machine_id}),
            )
        snapshot_id = job.inst.snapshot_id
        if snapshot_id is None and job.inst.fly_app and job.inst.volume_id:
            snapshot_id = await self.provider.snapshot_volume(app, job.inst.volume_id)
            await self._save(
                job,
                snapshot_id=snapshot_id,
                event=("step", f"volume snapshot {snapshot_id}", {"snapshot_id": snapshot_id}),
            )
        now = self.clock()
        # With data to keep, the app (and with it the snapshot) stays for the retention
        # period: Fly deletes snapshots with their app (memoetapp/memoet#57).
        keep = timedelta(days=self.settings.retention_days) if snapshot_id else timedelta(0)
        destroy_after = job.inst.destroy_after or now + keep
        await self._move(
            job,
            S.DESTROYING,
            f"destroy after {destroy_after.isoformat()}",
            data={"destroy_after": destroy_after.isoformat(), "snapshot_id": snapshot_id},
            destroy_after=destroy_after,
            run_after=destroy_after,
        )

    async def _destroying(self, job: _Job) -> None:
        now = self.clock()
        destroy_after = job.inst.destroy_after or now
        if now < destroy_after:
            await self._save(job, run_after=destroy_after)
            return
        app = self._app(job.inst)
        await self.provider.destroy(app)
        await self._move(
            job,
            S.DESTROYED,
            f"app {app} and its resources destroyed",
            kind="destroyed",
            data={"app": app},
            url=None,
            step="destroyed",
            error=None,
        )


async def fleet_gauges(
    factory: async_sessionmaker[AsyncSession], now: datetime, lease_seconds: float
) -> FleetGauges:
    """Instances by status, the queue (due, unleased) and the leases, for the metrics scrape."""
    free = or_(CloudInstance.lease_until.is_(None), CloudInstance.lease_until < now)
    due = (
        CloudInstance.status.in_([str(s) for s in WORK_STATUSES]),
        CloudInstance.run_after.is_not(None),
        CloudInstance.run_after <= now,
        free,
    )
    async with factory() as session:
        rows = await session.execute(
            select(CloudInstance.status, func.count()).group_by(CloudInstance.status)
        )
        by_status = {str(s): 0 for s in InstanceStatus}
        by_status.update({str(status): int(count) for status, count in rows})
        queue = select(func.count(), func.min(CloudInstance.run_after)).where(*due)
        depth, oldest_due = (await session.execute(queue)).one()
        leases, oldest_lease = (
            await session.execute(
                select(func.count(), func.min(CloudInstance.lease_until)).where(
                    CloudInstance.lease_owner.is_not(None)
                )
            )
        ).one()
    lease_age = 0.0
    if oldest_lease is not None:  # taken or renewed at lease_until - lease
        lease_age = (now - oldest_lease).total_seconds() + lease_seconds
    return FleetGauges(
        instances_by_status=by_status,
        queue_depth=int(depth),
        oldest_due_seconds=max(0.0, (now - oldest_due).total_seconds()) if oldest_due else 0.0,
        leases_held=int(leases),
        oldest_lease_age_seconds=max(0.0, lease_age),
    )


def _catalog_from(settings: Settings) -> Catalog:
    path = getattr(settings, "catalog_path", None)
    return load_catalog(path) if path else default_catalog()


def _short(text: str, limit: int = 500) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
