"""Fixtures for the provisioning drills: a migrated database, the fake Machines API, a Machines
API client and a Fly provider pointed at it, and helpers that create instances and read their
event trail."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.auth.models import User
from control_plane.billing.models import InstanceSubscription
from control_plane.db import create_engine, create_session_factory, transaction
from control_plane.instances.models import CloudInstance, InstanceEvent, InstanceStatus
from control_plane.provisioning.fly import FlyProvider
from control_plane.provisioning.fly_api import FlyMachinesClient
from control_plane.provisioning.worker import Worker
from control_plane.settings import Settings
from tests.control_plane.conftest import FakeClock
from tests.fakes.fly_machines import (  # noqa: F401  (fixture re-exported)
    DEFAULT_ORG,
    DEFAULT_TOKEN,
    FlyMachinesFake,
    fly_machines_fake,
)

ISSUER = "https://cloud.quoroom.test"  # the builder refuses http off loopback
IMAGE = "registry.fly.io/quoroom-runtime@sha256:" + "a" * 64
Factory = async_sessionmaker[AsyncSession]


@pytest.fixture
async def factory(database_url: str) -> AsyncIterator[Factory]:
    engine = create_engine(database_url)
    try:
        yield create_session_factory(engine)
    finally:
        await engine.dispose()


@pytest.fixture
def prov_settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        provider="fly",
        fly_api_token=DEFAULT_TOKEN,
        fly_org=DEFAULT_ORG,
        runtime_image=IMAGE,
        worker_max_attempts=4,
        worker_retry_base_seconds=2.0,
        worker_retry_max_seconds=60.0,
        worker_lease_seconds=300,
        provision_deadline_seconds=3600,
        retention_days=7,
    )


@pytest.fixture
async def fly_client(
    fly_machines_fake: FlyMachinesFake,  # noqa: F811
) -> AsyncIterator[FlyMachinesClient]:
    """A client pointed at the fake, with fast retries."""
    async with FlyMachinesClient(
        DEFAULT_TOKEN,
        org_slug=DEFAULT_ORG,
        base_url=fly_machines_fake.url,
        retry_backoff=0.01,
        timeout=10.0,
    ) as client:
        yield client


@pytest.fixture
async def fly_provider(
    fly_machines_fake: FlyMachinesFake,  # noqa: F811
) -> AsyncIterator[FlyProvider]:
    client = FlyMachinesClient(
        DEFAULT_TOKEN,
        org_slug=DEFAULT_ORG,
        base_url=fly_machines_fake.url,
        timeout=5.0,
        max_read_attempts=1,  # each injected fault surfaces to the worker as one attempt
        retry_backoff=0.01,
    )
    provider = FlyProvider(
        client,
        image=IMAGE,
        issuer=ISSUER,
        allowed_origins=[ISSUER],
        wait_timeout=5.0,
        health_timeout=5.0,
        poll_interval=0.02,
    )
    try:
        yield provider
    finally:
        await provider.aclose()


@pytest.fixture
def make_worker(
    prov_settings: Settings, factory: Factory, clock: FakeClock
) -> Callable[..., Worker]:
    def build(provider: Any, **kw: Any) -> Worker:
        kw.setdefault("clock", clock)
        kw.setdefault("rng", lambda: 0.5)
        kw.setdefault("reconcile", False)
        return Worker(kw.pop("settings", prov_settings), factory, provider, **kw)

    return build


async def make_instance(
    factory: Factory,
    clock: FakeClock,
    *,
    status: InstanceStatus = InstanceStatus.PROVISIONING,
    tier: str = "starter",
    region: str = "iad",
    run_after: datetime | str | None = "now",
    **fields: Any,
) -> str:
    instance_id = str(uuid.uuid4())
    async with transaction(factory) as session:
        user = User(email=f"{instance_id[:8]}@example.test", email_verified=True)
        session.add(user)
        await session.flush()
        session.add(
            CloudInstance(
                id=instance_id,
                owner_id=user.id,
                name="My Room",
                tier=tier,
                region=region,
                status=str(status),
                run_after=clock.now if run_after == "now" else run_after,
                **fields,
            )
        )
    return instance_id


async def get_instance(factory: Factory, instance_id: str) -> CloudInstance:
    async with factory() as session:
        inst = await session.get(CloudInstance, instance_id)
        assert inst is not None
        return inst


async def event_kinds(factory: Factory, instance_id: str) -> list[tuple[str, str]]:
    async with factory() as session:
        rows = await session.scalars(
            select(InstanceEvent)
            .where(InstanceEvent.instance_id == instance_id)
            .order_by(InstanceEvent.id)
        )
        return [(e.kind, e.message) for e in rows]


async def set_subscription(
    factory: Factory, instance_id: str, status: str, grace_until: datetime | None = None
) -> None:
    async with transaction(factory) as session:
        sub = await session.get(InstanceSubscription, instance_id)
        if sub is None:
            sub = InstanceSubscription(instance_id=instance_id)
            session.add(sub)
        sub.status = status
        sub.grace_until = grace_until


async def drive(
    worker: Worker,
    clock: FakeClock,
    factory: Factory,
    instance_id: str,
    *,
    until: frozenset[str] = frozenset({"running", "failed", "destroyed"}),
    max_rounds: int = 50,
) -> CloudInstance:
    """Run the worker, jumping the clock to each scheduled retry, until a resting status."""
    for _ in range(max_rounds):
        await worker.run_until_idle()
        inst = await get_instance(factory, instance_id)
        if inst.status in until:
            return inst
        if inst.run_after is None:
            return inst
        if inst.run_after > clock.now:
            clock.now = inst.run_after
        if inst.lease_until is not None and inst.lease_until > clock.now:
            clock.now = inst.lease_until + timedelta(seconds=1)
    raise AssertionError(f"instance {instance_id} did not settle: {inst.status}/{inst.step}")


async def assert_no_orphans(fake: FlyMachinesFake, factory: Factory) -> None:
    """Every app on the fake belongs to a live instance, and holds only its persisted ids."""
    async with factory() as session:
        instances = {i.fly_app: i for i in (await session.scalars(select(CloudInstance))).all()}
    for name, app in fake.apps.items():
        if app.org_slug != fake.org_slug:
            continue
        inst = instances.get(name)
        assert inst is not None, f"app {name} has no instance"
        assert inst.status != "destroyed", f"app {name} outlived its destroyed instance"
        machines = {m.id for m in fake.live_machines(name)}
        assert machines <= {inst.machine_id}, f"{name}: machines {machines} vs {inst.machine_id}"
        volumes = {v.id for v in fake.volumes.values() if v.app == name}
        assert volumes <= {inst.volume_id}, f"{name}: volumes {volumes} vs {inst.volume_id}"
