"""Provisioning drills against the Fly fake: a worker process killed at each step, the Fly API
failing on each call, worker processes racing over one queue, and (item 7) throughput with 1, 2
and 4 workers at realistic (scaled) Fly latencies and one reconciler pass over 10,000 instances."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from bench.drills.common import (
    PREFIX,
    Audit,
    Factory,
    QueryCounter,
    audit,
    cp_values,
    create_instances,
    engine_and_factory,
    expire_leases,
    fly_provider,
    make_settings,
    pg_database,
    spawn_worker,
    wait_until_settled,
)
from control_plane.db import transaction, utcnow
from control_plane.instances.lifecycle import CANCELABLE, IllegalTransition, transition
from control_plane.instances.models import CloudInstance, InstanceEvent, InstanceStatus
from control_plane.provisioning.provider import app_name
from control_plane.provisioning.reconciler import Reconciler
from control_plane.provisioning.worker import Worker
from tests.fakes.fly_machines import FakeApp, FakeMachine, FakeVolume, FlyMachinesFake

S = InstanceStatus


@dataclass
class DrillResult:
    name: str
    title: str
    ok: bool
    figures: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: When it ran (UTC, set by the runner): a partial run keeps older drills' sections.
    when: str = ""


async def drive_in_process(
    worker: Worker, factory: Factory, ids: Sequence[str], *, rest: frozenset[str], timeout: float
) -> dict[str, str]:
    """Run an in-process worker (real clock, short backoffs) until ``ids`` rest."""
    deadline = time.monotonic() + timeout
    while True:
        await worker.run_until_idle()
        statuses = await wait_until_settled(factory, ids, rest=rest, timeout=0)
        if all(statuses.get(i) in rest for i in ids) or time.monotonic() > deadline:
            return statuses
        await asyncio.sleep(0.02)


async def retry_events(factory: Factory, ids: Sequence[str]) -> int:
    async with factory() as session:
        return int(
            await session.scalar(
                select(func.count())
                .select_from(InstanceEvent)
                .where(InstanceEvent.instance_id.in_(list(ids)), InstanceEvent.kind == "retry")
            )
            or 0
        )


async def cancel(factory: Factory, instance_id: str) -> bool:
    """What ``DELETE /api/cloud/instances/{id}`` does (cancel now; retention 0 in the drills)."""
    now = utcnow()
    try:
        async with transaction(factory) as session:
            await transition(
                session,
                instance_id,
                expected=CANCELABLE,
                to=S.CANCELED,
                message="canceled by the drill",
                now=now,
                run_after=now,
                destroy_after=now,
            )
    except IllegalTransition:
        return False
    return True


# -- a worker killed at each step -----------------------------------------------------------------

#: (operation, after): the worker process is SIGKILLed while this call is held by the fake —
#: *before* its action (every earlier step done and persisted; the call never gets through) or
#: *after* it (the action happened at Fly, the reply dies with the worker).
KILL_POINTS: list[tuple[str, bool]] = [
    ("Apps_create", False),
    ("Apps_create", True),
    ("App_IPAssignments_list", False),
    ("App_IPAssignments_create", True),
    ("Secrets_update", False),
    ("Secrets_update", True),
    ("Volumes_list", False),
    ("Volumes_create", True),
    ("Machines_list", False),
    ("Machines_create", False),
    ("Machines_create", True),
    ("Machines_wait", False),
    ("Machines_show", True),
]
QUICK_KILL_POINTS = [("Secrets_update", True), ("Volumes_create", True), ("Machines_create", True)]
#: The same for the wind-down of a canceled Room: stop, snapshot, then destroy.
WIND_DOWN_POINTS: list[tuple[str, bool]] = [
    ("Machines_stop", True),
    ("Volumes_list_snapshots", False),
    ("createVolumeSnapshot", True),
    ("Apps_delete", False),
    ("Apps_delete", True),
]
QUICK_WIND_DOWN_POINTS = [("createVolumeSnapshot", True)]


async def worker_killed(quick: bool, work: Path) -> DrillResult:
    points = [(op, after, False) for op, after in (QUICK_KILL_POINTS if quick else KILL_POINTS)]
    points += [
        (op, after, True) for op, after in (QUICK_WIND_DOWN_POINTS if quick else WIND_DOWN_POINTS)
    ]
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    ids: list[str] = []
    gone: list[str] = []
    with FlyMachinesFake() as fake:
        async with pg_database("kill") as url:
            values = cp_values(url, fake.url, work)
            settings = make_settings(url, fake.url, work)
            engine, factory = engine_and_factory(url)
            provider = fly_provider(fake.url)
            try:
                for n, (operation, after, wind_down) in enumerate(points):
                    [iid] = await create_instances(factory, settings, 1)
                    rest = frozenset({"destroyed"} if wind_down else {"running", "failed"})
                    (gone if wind_down else ids).append(iid)
                    if wind_down:  # running first, then canceled: the kill is in its wind-down
                        worker = Worker(settings, factory, provider, reconcile=False)
                        await drive_in_process(
                            worker, factory, [iid], rest=frozenset({"running"}), timeout=60
                        )
                        await cancel(factory, iid)
                    pause = fake.pause_next(operation, after=after)
                    proc = spawn_worker(values, work / f"kill-{n}.log", reconcile=False)
                    reached = await asyncio.to_thread(pause.reached.wait, 60)
                    proc.kill()
                    pause.release()
                    if not reached:
                        problems.append(f"{operation}: the call never came\n{proc.tail()}")
                    async with factory() as session:
                        held = await session.get(CloudInstance, iid)
                        step_at_kill = held.step if held else None
                    # Another worker takes over once the lease runs out.
                    await expire_leases(factory, [iid])
                    worker = Worker(settings, factory, provider, reconcile=False)
                    statuses = await drive_in_process(worker, factory, [iid], rest=rest, timeout=60)
                    one = await audit(
                        factory, fake, [iid], rest=rest, first_status=None, whole_fake=False
                    )
                    rows.append(
                        {
                            "killed at": f"{operation} ({'after' if after else 'before'})"
                            + (", canceled Room" if wind_down else ""),
                            "step persisted": step_at_kill or "-",
                            "ended": statuses.get(iid, "?"),
                            "machines created": one.machines_created,
                            "lost/doubled/orphans": f"{one.lost}/{one.doubled}/{one.orphans}",
                            "trail": "complete" if not one.incomplete else "INCOMPLETE",
                        }
                    )
                report = await Reconciler(settings, factory, provider).run_once()
                total = await audit(factory, fake, ids)
                total.merge(await audit(factory, fake, gone, rest=("destroyed",), whole_fake=False))
            finally:
                await provider.aclose()
                await engine.dispose()
    total.problems[:0] = problems
    total.doubled += sum(1 for r in rows if r["machines created"] > 1)
    return DrillResult(
        "worker-killed",
        "A worker process killed (SIGKILL) at each provisioning and wind-down step",
        ok=total.ok and not problems,
        figures={
            **total.figures(),
            "kill points": len(points),
            "orphans swept by the reconciler": len(report.orphans_destroyed),
        },
        rows=rows,
        notes=[
            "Each point: one instance, a fresh `python -m bench.drills.worker_proc` process, the "
            "fake holds the named call (before its action, or after it with the reply held), "
            "the process is SIGKILLed, the call released. The lease is then moved into the past "
            "(standing in for the wait of `WORKER_LEASE_SECONDS`) and another worker (in the "
            "drill's process) takes the instance over. The last rows do the same to a Room "
            "that was running and is canceled: the kill lands in its stop, snapshot or destroy, "
            "and it must end `destroyed` with nothing left at the fake.",
        ],
        problems=total.problems,
        seconds=time.monotonic() - started,
    )


# -- the Fly API failing on each call --------------------------------------------------------------

#: (operation, status or "drop", times). Every call the lifecycle makes: provisioning, then the
#: cancel (stop, snapshot) and the destroy.
FAULTS: list[tuple[str, int | str, int]] = [
    ("Apps_create", 503, 2),
    ("Apps_create", "drop", 1),
    ("App_IPAssignments_list", 503, 3),
    ("App_IPAssignments_create", 500, 1),
    ("App_IPAssignments_create", "drop", 1),
    ("Secrets_update", 502, 1),
    ("Secrets_update", "drop", 1),
    ("Volumes_list", 503, 3),
    ("Volumes_create", 503, 1),
    ("Volumes_create", "drop", 1),
    ("Machines_list", 503, 3),
    ("Machines_create", 412, 1),
    ("Machines_create", 429, 1),
    ("Machines_create", "drop", 1),
    ("Machines_wait", 503, 1),
    ("Machines_show", 500, 3),
    ("Machines_stop", 503, 1),
    ("Machines_stop", "drop", 1),
    ("Volumes_list_snapshots", 503, 3),
    ("createVolumeSnapshot", 500, 1),
    ("createVolumeSnapshot", "drop", 1),
    ("Apps_delete", 503, 1),
    ("Apps_delete", "drop", 1),
]
QUICK_FAULTS = [("Machines_create", "drop", 1), ("Volumes_create", 503, 1), ("Apps_delete", 503, 1)]


async def fly_failing(quick: bool, work: Path) -> DrillResult:
    faults = QUICK_FAULTS if quick else FAULTS
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    ids: list[str] = []
    with FlyMachinesFake() as fake:
        async with pg_database("flyfail") as url:
            settings = make_settings(url, fake.url, work)
            engine, factory = engine_and_factory(url)
            provider = fly_provider(fake.url)
            try:
                for operation, status, times in faults:
                    [iid] = await create_instances(factory, settings, 1)
                    ids.append(iid)
                    if status == "drop":
                        fake.drop_next(operation, times=times)
                    else:
                        fake.fail_next(operation, int(status), times=times)
                    worker = Worker(settings, factory, provider, reconcile=False)
                    up = await drive_in_process(
                        worker, factory, [iid], rest=frozenset({"running", "failed"}), timeout=60
                    )
                    if up.get(iid) == "running":
                        await cancel(factory, iid)
                    end = await drive_in_process(
                        worker,
                        factory,
                        [iid],
                        rest=frozenset({"destroyed", "failed"}),
                        timeout=60,
                    )
                    retries = await retry_events(factory, [iid])
                    fired = sum(
                        1
                        for c in fake.calls_to(operation)
                        if c.status is None or (c.status or 0) >= 400
                    )
                    rows.append(
                        {
                            "call": operation,
                            "fault": f"{status} ×{times}",
                            "answered with the fault": fired,
                            "reached": up.get(iid),
                            "ended": end.get(iid),
                            "retry events": retries,
                        }
                    )
                    # Faults not consumed (the call was not made) must not leak to the next.
                    fake._faults.clear()
                # An outage: every call fails for a while, instances wait it out.
                outage_ids = await create_instances(factory, settings, 3 if quick else 6)
                ids.extend(outage_ids)
                for op in fake._handlers:
                    fake.fail_next(op, 503, times=10**6)
                worker = Worker(settings, factory, provider, reconcile=False)
                stop_at = time.monotonic() + (1.0 if quick else 3.0)
                while time.monotonic() < stop_at:
                    await worker.run_until_idle()
                    await asyncio.sleep(0.05)
                fake._faults.clear()
                out = await drive_in_process(
                    worker,
                    factory,
                    outage_ids,
                    rest=frozenset({"running", "failed"}),
                    timeout=90,
                )
                retries = await retry_events(factory, outage_ids)
                for iid in outage_ids:
                    if out.get(iid) == "running":
                        await cancel(factory, iid)
                gone = await drive_in_process(
                    worker, factory, outage_ids, rest=frozenset({"destroyed", "failed"}), timeout=60
                )
                rows.append(
                    {
                        "call": f"every call (an outage), {len(outage_ids)} instances",
                        "fault": f"503 for {1.0 if quick else 3.0:g} s",
                        "answered with the fault": sum(1 for c in fake.calls if c.status == 503),
                        "reached": ", ".join(sorted(set(out.values()))),
                        "ended": ", ".join(sorted(set(gone.values()))),
                        "retry events": retries,
                    }
                )
                report = await Reconciler(settings, factory, provider).run_once()
                total = await audit(factory, fake, ids, rest=("destroyed", "failed"))
            finally:
                await provider.aclose()
                await engine.dispose()
    return DrillResult(
        "fly-failing",
        "The Fly API failing on each call (provision → running → cancel → destroyed)",
        ok=total.ok,
        figures={
            **total.figures(),
            "machines created": total.machines_created,
            "orphans swept by the reconciler": len(report.orphans_destroyed),
        },
        rows=rows,
        notes=[
            "Each row: one instance taken through its whole life by a worker while the fake "
            "answers the named call with the fault (`drop`: the action happens and the "
            "connection is cut before the reply). Read calls are retried inside the client, "
            "so they need several faults to reach the worker. Retention is 0, so the cancel "
            "stops, snapshots and destroys at once.",
        ],
        problems=total.problems,
        seconds=time.monotonic() - started,
    )


# -- worker processes racing over one queue -------------------------------------------------------


async def racing_workers(quick: bool, work: Path) -> DrillResult:
    counts = [2] if quick else [2, 3]
    per_run = 6 if quick else 24
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    total = Audit()
    for processes in counts:
        with FlyMachinesFake(start_delay=0.1, check_delay=0.1) as fake:
            for op in ("Apps_create", "Volumes_create", "Machines_create", "Secrets_update"):
                fake.set_latency(op, 0.02, 0.15)
            async with pg_database(f"race{processes}") as url:
                values = cp_values(url, fake.url, work, worker_concurrency=2)
                settings = make_settings(url, fake.url, work)
                engine, factory = engine_and_factory(url)
                procs = [
                    spawn_worker(values, work / f"race-{processes}-{n}.log")
                    for n in range(processes)
                ]
                try:
                    rng = random.Random(processes)
                    ids: list[str] = []
                    canceled: set[str] = set()
                    # Instances arrive in waves; a third are canceled at random moments
                    # (while queued, mid-provisioning, or running).
                    for _wave in range(3):
                        ids += await create_instances(factory, settings, per_run // 3)
                        await asyncio.sleep(rng.uniform(0.1, 0.6))
                        for iid in rng.sample(ids, k=max(1, per_run // 9)):
                            if iid not in canceled and await cancel(factory, iid):
                                canceled.add(iid)
                        await asyncio.sleep(rng.uniform(0.1, 0.4))
                    await wait_until_settled(
                        factory,
                        [i for i in ids if i not in canceled],
                        rest=frozenset({"running", "failed"}),
                        timeout=120,
                    )
                    # Cancel a few more that are running now.
                    for iid in rng.sample([i for i in ids if i not in canceled], k=2):
                        if await cancel(factory, iid):
                            canceled.add(iid)
                    await wait_until_settled(
                        factory, sorted(canceled), rest=frozenset({"destroyed"}), timeout=120
                    )
                    kept = [i for i in ids if i not in canceled]
                    await wait_until_settled(
                        factory, kept, rest=frozenset({"running", "failed"}), timeout=60
                    )
                finally:
                    for proc in procs:
                        proc.stop()
                    await engine.dispose()
                engine, factory = engine_and_factory(url)
                try:
                    a_kept = await audit(factory, fake, kept, whole_fake=False)
                    a_gone = await audit(factory, fake, sorted(canceled), rest=("destroyed",))
                    a_gone.orphans += a_kept.orphans  # whole-fake orphans counted once, above
                    a_kept.orphans = 0
                    creates = len(fake.calls_to("Machines_create"))
                finally:
                    await engine.dispose()
                one = Audit()
                one.merge(a_kept)
                one.merge(a_gone)
                total.merge(one)
                rows.append(
                    {
                        "worker processes": processes,
                        "instances": len(ids),
                        "canceled": len(canceled),
                        "running": a_kept.by_status.get("running", 0),
                        "destroyed": a_gone.by_status.get("destroyed", 0),
                        "machine creates": creates,
                        "lost/doubled/orphans": f"{one.lost}/{one.doubled}/{one.orphans}",
                        "incomplete trails": one.incomplete,
                    }
                )
    return DrillResult(
        "racing-workers",
        "Two and three worker processes on PostgreSQL racing over one queue",
        ok=total.ok,
        figures=total.figures(),
        rows=rows,
        notes=[
            "Each worker process runs 2 claim loops and the reconciler; instances are written "
            "in three waves and a third of them canceled at random moments (queued, "
            "mid-provisioning, running), then two running ones more. Canceled ones must end "
            "`destroyed` with nothing left at the fake, the others `running`.",
        ],
        problems=total.problems,
        seconds=time.monotonic() - started,
    )


# -- item 7: throughput with 1, 2 and 4 workers ----------------------------------------------------

#: Fly's latencies as measured from outside (seconds, low..high) — Create App ~1 s, an IP ~1 s,
#: secrets ~1 s, a volume 1-3 s, a machine 3-10 s, its start 2 s, its checks passing 3 s later —
#: scaled down by ``TIME_SCALE`` for the run (the worker's own work is not scaled).
FLY_LATENCY: dict[str, tuple[float, float]] = {
    "Apps_create": (0.5, 1.5),
    "App_IPAssignments_list": (0.1, 0.3),
    "App_IPAssignments_create": (0.5, 1.0),
    "Secrets_update": (0.5, 1.5),
    "Volumes_list": (0.1, 0.3),
    "Volumes_create": (1.0, 3.0),
    "Machines_list": (0.1, 0.3),
    "Machines_create": (3.0, 10.0),
    "Machines_show": (0.1, 0.3),
}
FLY_START_SECONDS = 2.0
FLY_CHECKS_SECONDS = 3.0
HEALTH_POLL_SECONDS = 1.0  # the provider's default
TIME_SCALE = 0.05


def realistic_fake(scale: float) -> FlyMachinesFake:
    fake = FlyMachinesFake(
        start_delay=FLY_START_SECONDS * scale, check_delay=FLY_CHECKS_SECONDS * scale
    )
    for op, (low, high) in FLY_LATENCY.items():
        fake.set_latency(op, low * scale, high * scale)
    return fake


async def throughput(quick: bool, work: Path) -> DrillResult:
    scale = TIME_SCALE
    counts = [1, 2] if quick else [1, 2, 4]
    instances = 4 if quick else 24
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    total = Audit()
    for processes in counts:
        with realistic_fake(scale) as fake:
            async with pg_database(f"tput{processes}") as url:
                values = cp_values(url, fake.url, work, worker_poll_seconds=0.1)
                settings = make_settings(url, fake.url, work)
                engine, factory = engine_and_factory(url)
                procs = [
                    spawn_worker(
                        values,
                        work / f"tput-{processes}-{n}.log",
                        poll=HEALTH_POLL_SECONDS * scale,
                        reconcile=False,
                    )
                    for n in range(processes)
                ]
                try:
                    await asyncio.sleep(3.0)  # the processes are up and idle
                    t0 = time.monotonic()
                    ids = await create_instances(factory, settings, instances)
                    statuses = await wait_until_settled(
                        factory, ids, rest=frozenset({"running", "failed"}), timeout=300
                    )
                    elapsed = time.monotonic() - t0
                    async with factory() as session:
                        rows_ = (
                            await session.execute(
                                select(CloudInstance.created_at, CloudInstance.updated_at).where(
                                    CloudInstance.id.in_(ids)
                                )
                            )
                        ).all()
                    latencies = sorted((u - c).total_seconds() for c, u in rows_)
                    one = await audit(factory, fake, ids)
                finally:
                    for proc in procs:
                        proc.stop()
                    await engine.dispose()
        total.merge(one)
        running = sum(1 for s in statuses.values() if s == "running")
        per_minute = running / elapsed * 60
        rows.append(
            {
                "worker processes": processes,
                "instances": instances,
                "running": running,
                "wall seconds": round(elapsed, 2),
                "instances/min (scaled)": round(per_minute, 1),
                "instances/min at Fly's speed": round(per_minute * scale, 2),
                "median s from due to running, queue included (Fly's speed)": round(
                    latencies[len(latencies) // 2] / scale, 1
                ),
            }
        )
    latencies = ", ".join(f"{k} {lo:g}-{hi:g} s" for k, (lo, hi) in FLY_LATENCY.items())
    return DrillResult(
        "throughput",
        "Provisioning throughput with 1, 2 and 4 worker processes (Fly latencies scaled)",
        ok=total.ok,
        figures=total.figures(),
        rows=rows,
        notes=[
            f"Fly's latencies ({latencies}, "
            f"a machine started {FLY_START_SECONDS:g} s after its create and passing its checks "
            f"{FLY_CHECKS_SECONDS:g} s later) and the provider's health poll "
            f"({HEALTH_POLL_SECONDS:g} s) are all multiplied by {scale:g}; the worker's own "
            "work (database, JSON, HTTP) is not, so it weighs 20× more than it would at Fly's "
            "speed and the scaled-back figures are a lower bound. One claim loop per process "
            "(`WORKER_CONCURRENCY=1`): N processes are N instances in flight.",
        ],
        problems=total.problems,
        seconds=time.monotonic() - started,
    )


# -- item 7: one reconciler pass over 10,000 instances ---------------------------------------------


#: A Machines API call from outside Fly's region (the reconciler's third pass).
FLY_ROUND_TRIP = 0.1


class _MemoryProvider:
    """The database side alone: answers the reconciler's provider calls from a dict."""

    name = "memory"

    def __init__(self, apps: dict[str, str], owned: list[Any], latency: float = 0.0) -> None:
        self._machines = apps  # app -> machine id
        self._owned = owned
        self._latency = latency

    async def list_owned(self) -> list[Any]:
        return list(self._owned)

    async def machine(self, app: str, machine_id: str) -> Any:
        from control_plane.provisioning.provider import MachineInfo

        if self._latency:
            await asyncio.sleep(self._latency)
        if self._machines.get(app) != machine_id:
            return None
        return MachineInfo(machine_id, "started", url=f"https://{app}.fly.dev")

    async def destroy(self, app: str) -> None:
        self._machines.pop(app, None)

    async def start(self, app: str, machine_id: str) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def reconciler_scale(quick: bool, work: Path) -> DrillResult:
    count = 1000 if quick else 10_000
    orphans = 20
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    with FlyMachinesFake() as fake:
        async with pg_database("scale") as url:
            settings = make_settings(url, fake.url, work)
            engine, factory = engine_and_factory(url)
            try:
                t = time.monotonic()
                ids = await create_instances(
                    factory, settings, count, status=S.RUNNING, credentials=False, run_after=None
                )
                seed_seconds = time.monotonic() - t
                machines: dict[str, str] = {}
                async with transaction(factory) as session:
                    for n, iid in enumerate(ids):
                        app = app_name(iid, PREFIX)
                        machine_id = f"{n:014x}"
                        machines[app] = machine_id
                        if n % 1000 == 0:
                            await session.flush()
                        await session.execute(
                            CloudInstance.__table__.update()
                            .where(CloudInstance.id == iid)
                            .values(fly_app=app, machine_id=machine_id, volume_id=f"vol_{n}")
                        )
                _populate_fake(fake, machines, orphans)
                owned = [
                    *(_owned(app) for app in machines),
                    *(_owned(f"{PREFIX}-orphan-{n}") for n in range(orphans)),
                ]
                passes = [
                    ("the Fly fake over HTTP", fly_provider(fake.url, timeout=30.0)),
                    (
                        "the database side alone (provider in memory)",
                        _MemoryProvider(dict(machines), owned),
                    ),
                    (
                        f"a provider answering in {FLY_ROUND_TRIP * 1000:.0f} ms (Fly's RTT)",
                        _MemoryProvider(dict(machines), owned, latency=FLY_ROUND_TRIP),
                    ),
                ]
                for label, provider in passes:
                    counter = QueryCounter(engine)
                    fly_calls = len(fake.calls)
                    t = time.monotonic()
                    report = await Reconciler(settings, factory, provider).run_once()  # type: ignore[arg-type]
                    seconds = time.monotonic() - t
                    counter.close()
                    rows.append(
                        {
                            "provider": label,
                            "instances": count,
                            "pass seconds": round(seconds, 2),
                            "SQL statements": counter.count,
                            "provider HTTP calls": len(fake.calls) - fly_calls
                            if "HTTP" in label
                            else "-",
                            "orphans destroyed": len(report.orphans_destroyed),
                            "errors": len(report.errors),
                        }
                    )
                    await provider.aclose()
            finally:
                await engine.dispose()
    per_instance_ms = rows[0]["pass seconds"] / count * 1000
    return DrillResult(
        "reconciler-scale",
        f"One reconciler pass over {count:,} running instances in PostgreSQL",
        ok=all(r["errors"] == 0 and r["orphans destroyed"] == orphans for r in rows[:1]),
        figures={
            "instances": count,
            "seed seconds": round(seed_seconds, 1),
            **{f"{r['provider']}: seconds": r["pass seconds"] for r in rows},
            **{f"{r['provider']}: SQL statements": r["SQL statements"] for r in rows},
            "ms per running instance (HTTP)": round(per_instance_ms, 2),
        },
        rows=rows,
        notes=[
            f"{count:,} `running` instances, each with its app and started machine at the fake "
            f"(written into its state directly), plus {orphans} orphan apps. The pass lists the "
            "apps once, then asks the provider for each running instance's machine, "
            "`CHECK_CONCURRENCY` (16) at a time (`Reconciler.check_running`). Over HTTP the "
            "loopback fake, in the drill's own process, is what limits it. With a provider "
            f"answering in {FLY_ROUND_TRIP * 1000:.0f} ms the pass takes fleet / 16 × round "
            "trip; one at a time, as it was before this drill, it took fleet × round trip: "
            f"{count * FLY_ROUND_TRIP / 60:.0f} minutes for {count:,} Rooms, longer than "
            "`RECONCILE_SECONDS` (300). The SQL statements do not grow with the fleet: one "
            "query per phase, plus a write per change.",
        ],
        seconds=time.monotonic() - started,
    )


def _owned(app: str) -> Any:
    from control_plane.provisioning.provider import OwnedApp, instance_id_from_app

    return OwnedApp(app, instance_id_from_app(app, PREFIX) or app)


def _populate_fake(fake: FlyMachinesFake, machines: dict[str, str], orphans: int) -> None:
    now = time.monotonic()
    with fake._lock:
        for n, (app, machine_id) in enumerate(machines.items()):
            iid = app[len(PREFIX) + 1 :]
            fake.apps[app] = FakeApp(id=f"app_{n}", name=app, org_slug=fake.org_slug)
            fake.volumes[f"vol_{n}"] = FakeVolume(
                id=f"vol_{n}",
                name="data",
                app=app,
                region="iad",
                zone="a1b2",
                size_gb=1,
                encrypted=True,
                compute=None,
                created_at="2026-12-06T00:00:00Z",
                attached_machine_id=machine_id,
            )
            fake.machines[machine_id] = FakeMachine(
                id=machine_id,
                name=f"room-{iid}"[:63],
                app=app,
                region="iad",
                config={
                    "image": "registry.fly.io/quoroom-runtime@sha256:" + "d" * 64,
                    "metadata": {"quoroom_instance_id": iid},
                },
                version="01JDRILL",
                created_at="2026-12-06T00:00:00Z",
                state="started",
                started_at=now - 3600,
            )
        for n in range(orphans):
            name = f"{PREFIX}-orphan-{n}"
            fake.apps[name] = FakeApp(id=f"app_o{n}", name=name, org_slug=fake.org_slug)
