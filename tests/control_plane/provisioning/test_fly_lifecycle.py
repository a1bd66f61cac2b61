"""Lifecycle drills with the Fly provider against the fake: a worker killed mid-provisioning,
concurrent workers, payment failure → grace → suspend → resume, cancel → snapshot → destroy,
and the reconciler's orphan sweep both ways."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest

from control_plane.db import transaction
from control_plane.instances.lifecycle import transition, update_fields
from control_plane.instances.models import InstanceStatus
from control_plane.provisioning.provider import InstanceSpec
from control_plane.provisioning.reconciler import Reconciler
from tests.fakes.fly_machines import FlyMachinesFake

from .conftest import (
    assert_no_orphans,
    drive,
    event_kinds,
    get_instance,
    make_instance,
    set_subscription,
)

S = InstanceStatus


async def running_instance(make_worker, fly_provider, factory, clock) -> str:
    iid = await make_instance(factory, clock)
    inst = await drive(make_worker(fly_provider), clock, factory, iid)
    assert inst.status == "running"
    return iid


# -- killed mid-provisioning ------------------------------------------------------------------


async def test_a_worker_killed_while_waiting_for_health_resumes_without_a_second_machine(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock
):
    fly_machines_fake.set_start_delay(1.0)
    iid = await make_instance(factory, clock)
    first = make_worker(fly_provider)
    task = asyncio.create_task(first.run_once())
    for _ in range(500):
        if (await get_instance(factory, iid)).machine_id:
            break
        await asyncio.sleep(0.01)
    task.cancel()  # killed while waiting for the machine to be healthy
    with pytest.raises(asyncio.CancelledError):
        await task
    killed = await get_instance(factory, iid)
    assert (killed.status, killed.step) == ("provisioning", "machine")

    inst = await drive(make_worker(fly_provider), clock, factory, iid)

    assert inst.status == "running"
    assert inst.machine_id == killed.machine_id
    assert len(fly_machines_fake.calls_to("Machines_create")) == 1
    assert len(fly_machines_fake.calls_to("Volumes_create")) == 1
    await assert_no_orphans(fly_machines_fake, factory)


class KilledAfterCreate:
    """A provider whose process dies right after a create succeeded, before the id is saved."""

    def __init__(self, inner: Any, method: str) -> None:
        self.inner, self.method = inner, method

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name != self.method:
            return attr

        async def dying(*args: Any, **kw: Any) -> Any:
            await attr(*args, **kw)
            raise asyncio.CancelledError

        return dying


@pytest.mark.parametrize("method", ["ensure_app", "ensure_volume", "ensure_machine"])
async def test_a_worker_killed_between_a_create_and_its_persist_adopts_it_on_restart(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock, method
):
    iid = await make_instance(factory, clock)
    with pytest.raises(asyncio.CancelledError):
        await make_worker(KilledAfterCreate(fly_provider, method)).run_once()

    inst = await drive(make_worker(fly_provider), clock, factory, iid)

    assert inst.status == "running"
    assert len(fly_machines_fake.calls_to("Machines_create")) == 1
    assert len(fly_machines_fake.calls_to("Volumes_create")) == 1
    assert len(fly_machines_fake.live_machines()) == 1
    await assert_no_orphans(fly_machines_fake, factory)


async def test_a_crashed_workers_lease_blocks_others_until_it_expires(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock
):
    iid = await make_instance(factory, clock)
    crashed = make_worker(fly_provider, owner="crashed")
    assert (await crashed.claim()) is not None  # claimed, then the process died (kill -9)
    other = make_worker(fly_provider, owner="other")

    assert await other.run_once() is False
    clock.advance(301)  # worker_lease_seconds = 300
    inst = await drive(other, clock, factory, iid)

    assert inst.status == "running"
    assert len(fly_machines_fake.live_machines()) == 1


async def test_a_worker_that_lost_its_lease_stops_at_its_next_write(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock
):
    iid = await make_instance(factory, clock)
    slow = make_worker(fly_provider, owner="slow")
    job = await slow.claim()
    assert job is not None
    clock.advance(301)
    fast = make_worker(fly_provider, owner="fast")
    assert (await fast.claim()) is not None  # took over the expired lease

    await slow.process(job)  # its first fenced write fails: it does nothing more

    assert (await get_instance(factory, iid)).lease_owner == "fast"
    assert fly_machines_fake.calls_to("Volumes_create") == []


# -- concurrent workers -----------------------------------------------------------------------


async def test_two_workers_racing_for_one_due_instance_claim_it_once(
    make_worker, fly_provider, factory, clock
):
    a, b = make_worker(fly_provider, owner="a"), make_worker(fly_provider, owner="b")
    for _ in range(10):
        iid = await make_instance(factory, clock)
        claims = await asyncio.gather(a.claim(), b.claim())
        winners = [c for c in claims if c is not None]
        assert len(winners) == 1
        assert winners[0].inst.id == iid
        async with transaction(factory) as session:  # done with it
            await update_fields(session, iid, status=S.PROVISIONING, run_after=None)


async def test_two_concurrent_workers_provision_every_instance_exactly_once(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock
):
    fly_machines_fake.set_start_delay(0.2)
    ids = [await make_instance(factory, clock) for _ in range(4)]
    a, b = make_worker(fly_provider, owner="a"), make_worker(fly_provider, owner="b")

    done = await asyncio.gather(a.run_until_idle(), b.run_until_idle())

    assert sum(done) == 4 and min(done) >= 1  # each took its share, none twice
    for iid in ids:
        assert (await get_instance(factory, iid)).status == "running"
    assert len(fly_machines_fake.calls_to("Machines_create")) == 4
    assert len(fly_machines_fake.live_machines()) == 4
    await assert_no_orphans(fly_machines_fake, factory)


# -- billing: grace, suspend, resume ----------------------------------------------------------


async def test_payment_failure_suspends_after_grace_and_payment_resumes_the_machine(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock
):
    iid = await running_instance(make_worker, fly_provider, factory, clock)
    worker = make_worker(fly_provider)
    grace = clock.now + timedelta(hours=72)
    await set_subscription(factory, iid, "past_due", grace)
    async with transaction(factory) as session:  # what invoice.payment_failed does
        await transition(
            session,
            iid,
            expected=[S.RUNNING],
            to=S.PAST_DUE,
            message="payment failed",
            run_after=grace,
        )

    assert await worker.run_until_idle() == 0  # within grace: nothing due
    clock.now = grace + timedelta(seconds=1)
    inst = await drive(worker, clock, factory, iid, until=frozenset({"suspended"}))
    assert inst.status == "suspended"
    (machine,) = fly_machines_fake.live_machines()
    assert machine.state == "stopped"

    await set_subscription(factory, iid, "active")
    async with transaction(factory) as session:  # what invoice.paid does for a suspended Room
        await update_fields(session, iid, status=S.SUSPENDED, run_after=clock.now)
    inst = await drive(worker, clock, factory, iid)

    assert inst.status == "running"
    assert fly_machines_fake.live_machines()[0].state == "started"
    kinds = [k for k, _ in await event_kinds(factory, iid)]
    assert kinds[-3:] == ["transition", "suspended", "resumed"]
    await assert_no_orphans(fly_machines_fake, factory)


async def test_a_suspended_instance_stays_stopped_while_the_subscription_is_unpaid(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock
):
    iid = await running_instance(make_worker, fly_provider, factory, clock)
    await set_subscription(factory, iid, "past_due", clock.now)
    async with transaction(factory) as session:
        await transition(
            session,
            iid,
            expected=[S.RUNNING],
            to=S.PAST_DUE,
            message="payment failed",
            run_after=clock.now,
        )
    worker = make_worker(fly_provider)
    await worker.run_until_idle()
    async with transaction(factory) as session:
        await update_fields(session, iid, status=S.SUSPENDED, run_after=clock.now)

    await worker.run_until_idle()

    inst = await get_instance(factory, iid)
    assert (inst.status, inst.run_after) == ("suspended", None)
    assert fly_machines_fake.live_machines()[0].state == "stopped"


# -- cancel → snapshot → destroy --------------------------------------------------------------


async def test_cancel_stops_snapshots_keeps_the_data_for_retention_then_destroys(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock
):
    iid = await running_instance(make_worker, fly_provider, factory, clock)
    worker = make_worker(fly_provider)
    async with transaction(factory) as session:  # what DELETE /instances/{id} does
        await transition(
            session,
            iid,
            expected=[S.RUNNING],
            to=S.CANCELED,
            message="canceled",
            run_after=clock.now,
        )

    await worker.run_until_idle()
    inst = await get_instance(factory, iid)
    assert inst.status == "destroying"
    assert inst.destroy_after == clock.now + timedelta(days=7)
    assert inst.run_after == inst.destroy_after
    (machine,) = fly_machines_fake.live_machines()
    assert machine.state == "stopped"
    snapshots = fly_machines_fake.apps[inst.fly_app].snapshots[inst.volume_id]
    assert [s["id"] for s in snapshots] == [inst.snapshot_id]

    clock.advance(6 * 24 * 3600)
    assert await worker.run_until_idle() == 0  # still within retention
    clock.advance(24 * 3600)
    inst = await drive(worker, clock, factory, iid)

    assert inst.status == "destroyed"
    assert fly_machines_fake.apps == {}
    assert fly_machines_fake.live_machines() == []
    kinds = [k for k, _ in await event_kinds(factory, iid)]
    assert kinds[-4:] == ["step", "step", "transition", "destroyed"]


async def test_an_instance_canceled_mid_provisioning_finds_its_unsaved_machine_and_stops_it(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock
):
    iid = await make_instance(factory, clock)
    with pytest.raises(asyncio.CancelledError):
        await make_worker(KilledAfterCreate(fly_provider, "ensure_machine")).run_once()
    async with transaction(factory) as session:
        await transition(
            session,
            iid,
            expected=[S.PROVISIONING],
            to=S.CANCELED,
            message="canceled",
            run_after=clock.now,
        )

    inst = await drive(make_worker(fly_provider), clock, factory, iid)

    assert inst.status == "destroyed"
    assert fly_machines_fake.apps == {}


# -- reconciler -------------------------------------------------------------------------------


def spec_for(instance_id: str) -> InstanceSpec:
    return InstanceSpec(instance_id, "owner", "iad", "shared", 1, 1024, 1)


async def test_the_sweep_destroys_provider_apps_with_no_live_instance_and_nothing_else(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock, prov_settings
):
    live = await running_instance(make_worker, fly_provider, factory, clock)
    # An app whose instance row does not exist (a crash, another database)...
    stranger = spec_for(str(uuid.uuid4()))
    app = await fly_provider.ensure_app(stranger)
    volume = await fly_provider.ensure_volume(stranger, app, None)
    await fly_provider.ensure_machine(stranger, app, volume, None)
    # ...one whose instance is destroyed, and an app that is not ours at all.
    gone = await make_instance(factory, clock, status=S.DESTROYED, run_after=None)
    gone_app = await fly_provider.ensure_app(spec_for(gone))
    fly_machines_fake.apps["someone-else"] = type(fly_machines_fake.apps[gone_app])(
        id="app_x", name="someone-else", org_slug=fly_machines_fake.org_slug
    )

    report = await Reconciler(prov_settings, factory, fly_provider, clock=clock).run_once()

    assert sorted(report.orphans_destroyed) == sorted([app, gone_app])
    assert set(fly_machines_fake.apps) == {f"qr-{live}", "someone-else"}
    assert ("orphan_destroyed", f"app {gone_app} was still on the provider: destroyed") in (
        await event_kinds(factory, gone)
    )
    del fly_machines_fake.apps["someone-else"]
    await assert_no_orphans(fly_machines_fake, factory)


async def test_a_running_instance_whose_machine_vanished_is_reprovisioned_on_its_volume(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock, prov_settings
):
    iid = await running_instance(make_worker, fly_provider, factory, clock)
    before = await get_instance(factory, iid)
    await fly_provider._client.delete_machine(before.fly_app, before.machine_id, force=True)

    report = await Reconciler(prov_settings, factory, fly_provider, clock=clock).run_once()
    assert report.reprovisioned == [iid]
    assert (await get_instance(factory, iid)).status == "provisioning"
    inst = await drive(make_worker(fly_provider), clock, factory, iid)

    assert inst.status == "running"
    assert inst.machine_id != before.machine_id
    assert inst.volume_id == before.volume_id
    assert len(fly_machines_fake.live_machines()) == 1
    assert len(fly_machines_fake.volumes) == 1
    assert any(k == "reconcile" for k, _ in await event_kinds(factory, iid))
    await assert_no_orphans(fly_machines_fake, factory)


async def test_a_running_instance_whose_machine_stopped_is_started_again(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock, prov_settings
):
    iid = await running_instance(make_worker, fly_provider, factory, clock)
    inst = await get_instance(factory, iid)
    await fly_provider.stop(inst.fly_app, inst.machine_id)

    report = await Reconciler(prov_settings, factory, fly_provider, clock=clock).run_once()

    assert report.restarted == [iid]
    assert fly_machines_fake.live_machines()[0].state in ("starting", "started")


async def test_work_with_nothing_scheduled_is_redriven_and_then_provisioned(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock, prov_settings
):
    iid = await make_instance(factory, clock, run_after=None)
    worker = make_worker(fly_provider)
    assert await worker.run_until_idle() == 0

    report = await Reconciler(prov_settings, factory, fly_provider, clock=clock).run_once()
    assert report.redriven == [iid]
    inst = await drive(worker, clock, factory, iid)

    assert inst.status == "running"
    assert (await event_kinds(factory, iid))[0][0] == "reconcile"


async def test_a_retry_that_adopts_a_stopped_machine_starts_it_instead_of_waiting_forever(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock
):
    iid = await make_instance(factory, clock)
    fly_machines_fake.fail_next("Machines_wait", 503)
    worker = make_worker(fly_provider)
    await worker.run_until_idle()  # machine created, the wait failed: a retry is scheduled
    inst = await get_instance(factory, iid)
    await fly_provider.stop(inst.fly_app, inst.machine_id)  # it crashed meanwhile

    inst = await drive(worker, clock, factory, iid)

    assert inst.status == "running"
    assert fly_machines_fake.live_machines()[0].state == "started"
    assert len(fly_machines_fake.calls_to("Machines_create")) == 1
