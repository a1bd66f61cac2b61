"""Provisioning drills with the Fly provider against the fake Machines API: the happy path,
a failure at every step, lost replies, max attempts and deadlines. Each drill ends with the
instance running, failed or destroyed, a full event trail, and no orphan on the fake."""

from __future__ import annotations

from datetime import timedelta

import pytest

from control_plane.instances.access_log import REPORT_KEY_ENV, report_key
from control_plane.instances.models import InstanceStatus
from tests.fakes.fly_machines import FlyMachinesFake

from .conftest import (
    IMAGE,
    ISSUER,
    assert_no_orphans,
    drive,
    event_kinds,
    get_instance,
    make_instance,
)

S = InstanceStatus


async def test_a_paid_instance_is_provisioned_step_by_step_and_runs(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock
):
    worker = make_worker(fly_provider, credentials=lambda inst: {"anthropic": "sk-ant-secret"})
    iid = await make_instance(factory, clock)

    inst = await drive(worker, clock, factory, iid)

    assert inst.status == "running", (inst.error, await event_kinds(factory, iid))
    assert inst.fly_app == f"qr-{iid}"
    assert inst.url == f"https://qr-{iid}.fly.dev"
    assert inst.image == IMAGE
    assert (inst.attempts, inst.error, inst.run_after, inst.lease_owner) == (0, None, None, None)
    (machine,) = fly_machines_fake.live_machines(inst.fly_app)
    assert machine.id == inst.machine_id
    volume = fly_machines_fake.volumes[inst.volume_id]
    # The volume was created with the machine's guest as compute hints; the machine follows it.
    assert volume.compute == {"cpu_kind": "shared", "cpus": 1, "memory_mb": 1024}
    assert machine.region == volume.region == "iad"
    assert machine.config["mounts"] == [{"volume": volume.id, "path": "/data"}]
    assert machine.config["metadata"]["quoroom_instance_id"] == iid
    env = machine.config["env"]
    assert env["QUOROOM_CLOUD_ISSUER"] == ISSUER
    assert env["QUOROOM_CLOUD_JWKS_URL"] == f"{ISSUER}/.well-known/jwks.json"
    assert env["QUOROOM_ALLOWED_ORIGINS"] == f"{ISSUER},https://qr-{iid}.fly.dev"
    app = fly_machines_fake.apps[inst.fly_app]
    # The owner's credential, and the runtime's key for its refusal reports (issue 15): secrets,
    # never in the machine's config.
    assert app.secrets == {
        "ANTHROPIC_API_KEY": "sk-ant-secret",
        REPORT_KEY_ENV: report_key(worker.settings, iid),
    }
    assert REPORT_KEY_ENV not in env
    assert {ip["shared"] for ip in app.ips} == {True, False}  # shared v4 and a v6
    kinds = [k for k, _ in await event_kinds(factory, iid)]
    assert kinds == ["step", "step", "step", "step", "transition"]
    await assert_no_orphans(fly_machines_fake, factory)


# (operation, status, times): each fault fails one worker attempt at that step. Create App is
# resent once by the client with its idempotency key, so it needs two faults to surface.
STEP_FAULTS = [
    ("Apps_create", 503, 2),
    ("App_IPAssignments_list", 503, 1),
    ("App_IPAssignments_create", 500, 1),
    ("Secrets_update", 502, 1),
    ("Volumes_list", 503, 1),
    ("Volumes_create", 503, 1),
    ("Machines_list", 503, 1),
    ("Machines_create", 412, 1),  # capacity on the volume's host (Kilo-Org/cloud#388)
    ("Machines_create", 409, 1),
    ("Machines_wait", 503, 1),
    ("Machines_show", 500, 1),
]


@pytest.mark.parametrize(("operation", "status", "times"), STEP_FAULTS)
async def test_a_provider_failure_at_any_step_is_retried_with_backoff_until_running(
    make_worker,
    fly_provider,
    fly_machines_fake: FlyMachinesFake,
    factory,
    clock,
    operation,
    status,
    times,
):
    worker = make_worker(fly_provider, credentials=lambda inst: {"openai": "sk-secret"})
    iid = await make_instance(factory, clock)
    fly_machines_fake.fail_next(operation, status, times=times)
    start = clock.now

    await worker.run_until_idle()
    retrying = await get_instance(factory, iid)
    assert retrying.status == "provisioning"
    assert retrying.attempts == 1
    assert retrying.error and str(status) in retrying.error
    # Backoff is data: base 2 s with the jitter pinned at the middle → 1.5 s, no sleep.
    assert retrying.run_after == start + timedelta(seconds=1.5)
    assert retrying.lease_owner is None

    inst = await drive(worker, clock, factory, iid)
    assert inst.status == "running"
    assert inst.error is None
    trail = await event_kinds(factory, iid)
    retries = [m for k, m in trail if k == "retry"]
    assert len(retries) == 1 and "attempt 1" in retries[0]
    assert trail[-1][0] == "transition"
    assert len(fly_machines_fake.live_machines()) == 1
    assert len(fly_machines_fake.volumes) == 1
    await assert_no_orphans(fly_machines_fake, factory)


@pytest.mark.parametrize(
    "operation",
    ["Apps_create", "App_IPAssignments_create", "Volumes_create", "Machines_create"],
)
async def test_a_lost_create_reply_is_found_on_retry_and_never_created_twice(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock, operation
):
    worker = make_worker(fly_provider)
    iid = await make_instance(factory, clock)
    fly_machines_fake.drop_next(operation)

    inst = await drive(worker, clock, factory, iid)

    assert inst.status == "running"
    assert len(fly_machines_fake.apps) == 1
    assert len(fly_machines_fake.volumes) == 1
    assert len(fly_machines_fake.live_machines()) == 1
    assert len(fly_machines_fake.apps[inst.fly_app].ips) == 2
    # Create App is resent with its key inside the client; two addresses (v4 and v6) are made.
    expected = {"Apps_create": 2, "App_IPAssignments_create": 2}.get(operation, 1)
    assert len(fly_machines_fake.calls_to(operation)) == expected
    await assert_no_orphans(fly_machines_fake, factory)


async def test_provisioning_fails_after_max_attempts_with_the_error_and_a_full_trail(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock
):
    worker = make_worker(fly_provider)
    iid = await make_instance(factory, clock)
    fly_machines_fake.fail_next("Machines_create", 503, times=10, message="no capacity")

    inst = await drive(worker, clock, factory, iid)

    assert inst.status == "failed"
    assert inst.attempts == 4
    assert "no capacity" in (inst.error or "")
    trail = await event_kinds(factory, iid)
    assert [k for k, _ in trail] == ["step", "step", "step"] + ["retry"] * 3 + ["failed"]
    assert "out of attempts" in trail[-1][1]
    # Backoff doubled each time: 1.5, 3, 6 s (base 2, jitter pinned at the middle).
    assert len(fly_machines_fake.calls_to("Machines_create")) == 4
    assert fly_machines_fake.live_machines() == []
    await assert_no_orphans(fly_machines_fake, factory)


async def test_a_refused_request_fails_at_once_without_retrying(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock
):
    worker = make_worker(fly_provider)
    iid = await make_instance(factory, clock)
    fly_machines_fake.fail_next("Volumes_create", 422, message="invalid size")

    inst = await drive(worker, clock, factory, iid)

    assert inst.status == "failed"
    assert inst.attempts == 1
    assert "not retryable" in (await event_kinds(factory, iid))[-1][1]
    await assert_no_orphans(fly_machines_fake, factory)


async def test_provisioning_past_its_deadline_fails_even_with_attempts_left(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock
):
    worker = make_worker(fly_provider)
    iid = await make_instance(factory, clock, deadline_at=clock.now + timedelta(seconds=60))
    fly_machines_fake.fail_next("Apps_create", 503, times=2)
    await worker.run_until_idle()
    clock.advance(120)
    fly_machines_fake.fail_next("Apps_create", 503, times=2)

    inst = await drive(worker, clock, factory, iid)

    assert inst.status == "failed"
    assert "deadline passed" in (await event_kinds(factory, iid))[-1][1]


async def test_an_unhealthy_machine_is_retried_then_failed_and_a_retry_reuses_it(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock
):
    fly_machines_fake.mark_image_unhealthy(IMAGE)
    fly_provider._health_timeout = 0.3  # checks never pass: don't wait 5 s per attempt
    worker = make_worker(fly_provider)
    iid = await make_instance(factory, clock)

    inst = await drive(worker, clock, factory, iid)
    assert inst.status == "failed"
    assert "not healthy" in (inst.error or "")
    assert len(fly_machines_fake.calls_to("Machines_create")) == 1

    # The owner retries (the API moves failed → provisioning); the image is fixed meanwhile.
    fly_machines_fake._unhealthy_images.clear()
    from control_plane.db import transaction
    from control_plane.instances.lifecycle import transition

    async with transaction(factory) as session:
        await transition(
            session,
            iid,
            expected=[S.FAILED],
            to=S.PROVISIONING,
            message="retry",
            run_after=clock.now,
            attempts=0,
        )
    inst = await drive(worker, clock, factory, iid)
    assert inst.status == "running"
    assert len(fly_machines_fake.calls_to("Machines_create")) == 1
    await assert_no_orphans(fly_machines_fake, factory)
