"""What every drill shares: private databases, the Fly fake, worker processes, instances made in
the database, and the audit that checks the targets (lost, doubled, orphans, event trails)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

from control_plane.auth.models import User
from control_plane.db import create_engine, create_session_factory, transaction, utcnow
from control_plane.instances.credentials import encrypt_credentials
from control_plane.instances.models import CloudInstance, InstanceEvent, InstanceStatus
from control_plane.provisioning.fly import FlyProvider
from control_plane.provisioning.fly_api import FlyMachinesClient
from control_plane.provisioning.provider import app_name, instance_id_from_app
from control_plane.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
#: The shared server (trust auth): drills make their own databases on it and drop them after.
ADMIN_URL = os.environ.get(
    "QUOROOM_DRILL_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
ISSUER = "https://cloud.quoroom.test"  # the machine-config builder refuses http off loopback
IMAGE = "registry.fly.io/quoroom-runtime@sha256:" + "d" * 64
FLY_TOKEN = "fake-fly-api-token"
FLY_ORG = "quoroom-test"
KEK = base64.urlsafe_b64encode(b"drill-key-encryption-key-32bytes").decode()
PREFIX = "qr"
S = InstanceStatus
Factory = async_sessionmaker[AsyncSession]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- databases ------------------------------------------------------------------------------------


async def _admin(sql: str, admin_url: str | None = None) -> None:
    engine = sa_create_async_engine(admin_url or ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(sql))
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def pg_database(tag: str, admin_url: str | None = None) -> AsyncIterator[str]:
    """A fresh database ``drill_<tag>_<hex>`` at the latest migration; dropped on exit."""
    from control_plane.migrations import upgrade

    admin_url = admin_url or ADMIN_URL
    name = f"drill_{tag}_{uuid.uuid4().hex[:8]}"
    await _admin(f'CREATE DATABASE "{name}"', admin_url)
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        engine = create_engine(url)
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()
        yield url
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', admin_url)


# -- settings -------------------------------------------------------------------------------------


def cp_values(database_url: str, fly_url: str, var_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Control-plane settings for a drill: the Fly provider on the fake, fast retries."""
    values: dict[str, Any] = {
        "env": "development",
        "public_url": ISSUER,
        "database_url": database_url,
        "var_dir": str(var_dir),
        "auto_migrate": False,
        "secret_key": "drill-" + "s" * 48,
        "key_encryption_key": KEK,
        "redis_url": None,
        "run_worker": False,
        "provider": "fly",
        "fly_api_token": FLY_TOKEN,
        "fly_org": FLY_ORG,
        "fly_api_base_url": fly_url,
        "runtime_image": IMAGE,
        "app_prefix": PREFIX,
        "worker_poll_seconds": 0.2,
        "worker_concurrency": 1,
        "worker_lease_seconds": 30,
        "worker_max_attempts": 30,
        "worker_retry_base_seconds": 0.05,
        "worker_retry_max_seconds": 0.5,
        "provision_deadline_seconds": 600,
        "reconcile_seconds": 5.0,
        "retention_days": 0,
    }
    values.update(overrides)
    return values


def make_settings(database_url: str, fly_url: str, var_dir: Path, **overrides: Any) -> Settings:
    return Settings(**cp_values(database_url, fly_url, var_dir, **overrides))  # type: ignore[arg-type]


def env_of(values: Mapping[str, Any]) -> dict[str, str]:
    """The same settings as a process environment (no inherited ``QUOROOM_CP_*``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOROOM_CP_")}
    for key, value in values.items():
        if value is None:
            continue
        env[f"QUOROOM_CP_{key.upper()}"] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    return env


def fly_provider(fly_url: str, *, poll: float = 0.02, timeout: float = 10.0) -> FlyProvider:
    """A Fly provider on the fake, as the drills' in-process workers use it."""
    client = FlyMachinesClient(
        FLY_TOKEN, org_slug=FLY_ORG, base_url=fly_url, timeout=timeout, retry_backoff=0.02
    )
    return FlyProvider(
        client,
        image=IMAGE,
        issuer=ISSUER,
        allowed_origins=[ISSUER],
        prefix=PREFIX,
        wait_timeout=30.0,
        health_timeout=30.0,
        poll_interval=poll,
    )


# -- worker processes -----------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no cleanup, no lease released."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, size: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError:
            return ""


def spawn_worker(
    values: Mapping[str, Any], log: Path, *, poll: float = 0.02, reconcile: bool = True
) -> WorkerProcess:
    """``python -m bench.drills.worker_proc``: a worker process (the real Worker and Fly
    provider) configured through ``QUOROOM_CP_*`` as ``quoroom-cloud worker`` is."""
    argv = [sys.executable, "-m", "bench.drills.worker_proc", "--poll", str(poll)]
    if not reconcile:
        argv.append("--no-reconcile")
    out = open(log, "ab")
    proc = subprocess.Popen(
        argv, env=env_of(values), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
    )
    out.close()
    return WorkerProcess(proc, log)


# -- instances ------------------------------------------------------------------------------------


async def create_instances(
    factory: Factory,
    settings: Settings,
    count: int,
    *,
    status: InstanceStatus = S.PROVISIONING,
    credentials: bool = True,
    run_after: datetime | None = None,
    batch: int = 500,
    **fields: Any,
) -> list[str]:
    """``count`` instances (each with its own owner) written straight to the database, due now."""
    ids: list[str] = []
    now = utcnow()
    for start in range(0, count, batch):
        async with transaction(factory) as session:
            users = []
            for _ in range(min(batch, count - start)):
                users.append(User(email=f"drill-{uuid.uuid4().hex[:12]}@drill.example.com"))
            session.add_all(users)
            await session.flush()
            rows = []
            for user in users:
                iid = str(uuid.uuid4())
                sealed = (
                    encrypt_credentials(settings, iid, {"anthropic": "sk-ant-drill"})
                    if credentials
                    else None
                )
                rows.append(
                    CloudInstance(
                        id=iid,
                        owner_id=user.id,
                        name="Drill Room",
                        tier="starter",
                        region="iad",
                        status=str(status),
                        run_after=run_after or now,
                        credentials_encrypted=sealed,
                        **fields,
                    )
                )
                ids.append(iid)
            session.add_all(rows)
    return ids


async def expire_leases(factory: Factory, ids: Iterable[str]) -> None:
    """Stand in for the wait until a killed worker's lease runs out (``WORKER_LEASE_SECONDS``,
    at least 30 s): the lease is moved into the past, nothing else changes."""
    async with transaction(factory) as session:
        await session.execute(
            update(CloudInstance)
            .where(CloudInstance.id.in_(list(ids)), CloudInstance.lease_owner.is_not(None))
            .values(lease_until=utcnow() - timedelta(seconds=1))
        )


async def wait_until_settled(
    factory: Factory,
    ids: Sequence[str],
    *,
    rest: frozenset[str] = frozenset({"running", "failed", "destroyed"}),
    timeout: float = 60.0,
) -> dict[str, str]:
    """Poll until every instance is in ``rest`` (or the timeout); returns the statuses."""
    deadline = time.monotonic() + timeout
    while True:
        async with factory() as session:
            rows = (
                await session.execute(
                    select(CloudInstance.id, CloudInstance.status).where(
                        CloudInstance.id.in_(list(ids))
                    )
                )
            ).all()
        statuses = {row.id: str(row.status) for row in rows}
        if all(statuses.get(i) in rest for i in ids) or time.monotonic() > deadline:
            return statuses
        await asyncio.sleep(0.1)


# -- the audit ------------------------------------------------------------------------------------

PROVISION_TRAIL = ("app", "secrets", "volume", "machine")


@dataclass
class Audit:
    """The targets, counted. ``lost``: an instance not in an expected resting status (or gone
    from the database); ``doubled``: more than one live machine or data volume for an instance,
    or a transition recorded twice; ``orphans``: an app or machine on the fake with no live
    instance, or an instance whose machine is gone; ``incomplete``: an event trail that does not
    lead, transition by transition, to the status (with every provisioning step for ``running``).
    """

    instances: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    doubled: int = 0
    orphans: int = 0
    incomplete: int = 0
    machines_created: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.doubled or self.orphans or self.incomplete)

    def merge(self, other: Audit) -> None:
        self.instances += other.instances
        for key, value in other.by_status.items():
            self.by_status[key] = self.by_status.get(key, 0) + value
        self.lost += other.lost
        self.doubled += other.doubled
        self.orphans += other.orphans
        self.incomplete += other.incomplete
        self.machines_created += other.machines_created
        self.problems.extend(other.problems)

    def figures(self) -> dict[str, Any]:
        return {
            "instances": self.instances,
            **{f"status {k}": v for k, v in sorted(self.by_status.items())},
            "lost": self.lost,
            "doubled": self.doubled,
            "orphans": self.orphans,
            "incomplete trails": self.incomplete,
        }


async def audit(
    factory: Factory,
    fake: Any,
    ids: Sequence[str],
    *,
    rest: Iterable[str] = ("running", "failed"),
    first_status: str | None = "provisioning",
    secrets_step: bool = True,
    whole_fake: bool = True,
) -> Audit:
    """Check ``ids`` against the database and the Fly fake (see :class:`Audit`)."""
    rest = set(rest)
    report = Audit(instances=len(ids))
    async with factory() as session:
        insts = {
            i.id: i
            for i in (
                await session.scalars(select(CloudInstance).where(CloudInstance.id.in_(list(ids))))
            ).all()
        }
        events: dict[str, list[InstanceEvent]] = {}
        for ev in (
            await session.scalars(
                select(InstanceEvent)
                .where(InstanceEvent.instance_id.in_(list(ids)))
                .order_by(InstanceEvent.id)
            )
        ).all():
            events.setdefault(ev.instance_id, []).append(ev)
        every_live: dict[str, str] = {}
        if whole_fake:
            every_live = {
                row.id: str(row.status)
                for row in (
                    await session.execute(select(CloudInstance.id, CloudInstance.status))
                ).all()
            }
    with fake._lock:  # a consistent view of the fake's state
        live = [m for m in fake.live_machines()]
        volumes = [v for v in fake.volumes.values() if "destroy" not in v.state]
        apps = [a for a in fake.apps.values() if a.org_slug == fake.org_slug]
        report.machines_created = sum(
            1
            for m in fake.machines.values()
            if (m.config.get("metadata") or {}).get("quoroom_instance_id") in insts
        )
    for iid in ids:
        inst = insts.get(iid)
        if inst is None:
            report.lost += 1
            report.problems.append(f"{iid}: not in the database")
            continue
        status = str(inst.status)
        report.by_status[status] = report.by_status.get(status, 0) + 1
        if status not in rest:
            report.lost += 1
            report.problems.append(f"{iid}: {status} (step {inst.step}, error {inst.error})")
        app = app_name(iid, PREFIX)
        mine = [
            m
            for m in live
            if m.app == app or (m.config.get("metadata") or {}).get("quoroom_instance_id") == iid
        ]
        data_volumes = [v for v in volumes if v.app == app and v.name == "data"]
        if len(mine) > 1 or len(data_volumes) > 1:
            report.doubled += 1
            report.problems.append(f"{iid}: {len(mine)} machines, {len(data_volumes)} volumes")
        if status == "running" and not any(m.id == inst.machine_id for m in mine):
            report.orphans += 1
            report.problems.append(f"{iid}: running but machine {inst.machine_id} is gone")
        if status == "destroyed" and (mine or any(a.name == app for a in apps)):
            report.orphans += 1
            report.problems.append(f"{iid}: destroyed but its app/machine is still on Fly")
        trail = events.get(iid, [])
        why = _trail_problem(trail, status, first_status, secrets_step)
        if why is not None:
            report.incomplete += 1
            report.problems.append(f"{iid}: trail {why}")
        seen: set[tuple[str | None, str | None]] = set()
        for ev in trail:
            if ev.to_status is None:
                continue
            pair = (ev.from_status, ev.to_status)
            if pair in seen and pair[1] not in ("provisioning", "running"):
                report.doubled += 1
                report.problems.append(f"{iid}: transition {pair} recorded twice")
            seen.add(pair)
    if whole_fake:
        # Anything on the fake that no live instance accounts for is an orphan.
        for a in apps:
            owner = instance_id_from_app(a.name, PREFIX)
            if owner is None:
                continue
            if every_live.get(owner) in (None, "destroyed"):
                report.orphans += 1
                report.problems.append(f"app {a.name}: no live instance")
    return report


def _trail_problem(
    trail: Sequence[InstanceEvent], status: str, first: str | None, secrets_step: bool
) -> str | None:
    moves = [(e.from_status, e.to_status) for e in trail if e.to_status is not None]
    current = first
    for before, after in moves:
        if current is not None and before != current:
            return f"jumps from {current} to a move out of {before}"
        current = after
    if current != status:
        return f"ends at {current}, the row says {status}"
    if status == "running":
        steps = {(e.data or {}).get("step") for e in trail if e.kind == "step"}
        wanted = [s for s in PROVISION_TRAIL if secrets_step or s != "secrets"]
        missing = [s for s in wanted if s not in steps]
        if missing:
            return f"has no step event for {missing}"
    if status == "failed" and not any(e.to_status == "failed" and e.message for e in trail):
        return "has no failure message"
    return None


# -- counting queries -----------------------------------------------------------------------------


class QueryCounter:
    """Counts the statements an engine sends (a SQLAlchemy ``before_cursor_execute`` listener)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.count = 0
        self.statements: list[str] = []
        self._engine = engine.sync_engine
        event.listen(self._engine, "before_cursor_execute", self._on)

    def _on(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.count += 1
        self.statements.append(statement.split(None, 1)[0].upper() if statement else "?")

    def reset(self) -> None:
        self.count = 0
        self.statements.clear()

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._on)


def engine_and_factory(url: str, **kw: Any) -> tuple[AsyncEngine, Factory]:
    engine = create_engine(url, **kw)
    return engine, create_session_factory(engine)
