"""The Fly secrets version is persisted (issue 12, item 12): Set Secrets answers a version that
machines are created with (``min_secrets_version``, so a machine never boots with older secrets).
It used to live in the provider's memory only: a worker restarted between the secrets step and
the machine step created the machine without it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from control_plane.instances.access_log import REPORT_KEY_ENV, report_key
from control_plane.provisioning.fly import FlyProvider
from control_plane.provisioning.fly_api import FlyMachinesClient
from tests.fakes.fly_machines import DEFAULT_ORG, DEFAULT_TOKEN, FlyMachinesFake

from .conftest import IMAGE, ISSUER, drive, get_instance, make_instance


class DiesAtVolume:
    """A provider whose process dies when the volume step starts (after secrets were set)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def ensure_volume(self, *args: Any, **kw: Any) -> Any:
        raise asyncio.CancelledError


@pytest.fixture
async def restarted_provider(fly_machines_fake: FlyMachinesFake) -> AsyncIterator[FlyProvider]:
    """A second provider: what a restarted worker process builds (nothing in memory)."""
    client = FlyMachinesClient(
        DEFAULT_TOKEN, org_slug=DEFAULT_ORG, base_url=fly_machines_fake.url, timeout=5.0
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


async def test_a_restarted_worker_creates_the_machine_with_the_persisted_secrets_version(
    make_worker,
    fly_provider,
    restarted_provider,
    fly_machines_fake: FlyMachinesFake,
    factory,
    clock,
):
    credentials = {"credentials": lambda inst: {"anthropic": "sk-ant-secret"}}
    iid = await make_instance(factory, clock)
    # Another secrets update on the app first, so the version is not simply 1.
    with pytest.raises(asyncio.CancelledError):
        await make_worker(DiesAtVolume(fly_provider), **credentials).run_once()
    app = fly_machines_fake.apps[f"qr-{iid}"]
    set_version = app.secrets_version
    assert set_version >= 1
    inst = await get_instance(factory, iid)
    assert inst.step == "secrets" and inst.secrets_version == set_version

    inst = await drive(make_worker(restarted_provider, **credentials), clock, factory, iid)

    assert inst.status == "running"
    (create,) = fly_machines_fake.calls_to("Machines_create")
    assert create.body["min_secrets_version"] == set_version
    assert inst.secrets_version == set_version


async def test_the_secrets_version_is_recorded_without_a_restart_too(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock
):
    worker = make_worker(fly_provider, credentials=lambda inst: {"openai": "sk-secret"})
    iid = await make_instance(factory, clock)
    inst = await drive(worker, clock, factory, iid)
    assert inst.status == "running" and inst.secrets_version == 1
    (create,) = fly_machines_fake.calls_to("Machines_create")
    assert create.body["min_secrets_version"] == 1


async def test_without_credentials_only_the_report_key_is_set_and_waited_for(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock
):
    # Every runtime gets its report key (issue 15), so the machine always waits for the secrets.
    worker = make_worker(fly_provider)
    iid = await make_instance(factory, clock)
    inst = await drive(worker, clock, factory, iid)
    assert inst.status == "running" and inst.secrets_version is not None
    assert fly_machines_fake.apps[inst.fly_app].secrets == {
        REPORT_KEY_ENV: report_key(worker.settings, iid)
    }
    (create,) = fly_machines_fake.calls_to("Machines_create")
    assert create.body["min_secrets_version"] == inst.secrets_version
