"""The rolling update against the fake Machines API: one machine at a time, rollback, stop early."""

from __future__ import annotations

import pytest

from control_plane.provisioning.fly_api import FlyMachinesClient
from control_plane.provisioning.rollout import (
    Outcome,
    RolloutTarget,
    format_report,
    rolling_update,
    run_update_image,
)
from fly_image.config import MachineConfigError, Tier, build_machine_config
from tests.fakes.fly_machines import DEFAULT_ORG, DEFAULT_TOKEN

OLD = "registry.fly.io/quoroom-runtime@sha256:" + "1" * 64
NEW = "registry.fly.io/quoroom-runtime@sha256:" + "2" * 64
TIER = Tier(id="starter", cpu_kind="shared", cpus=1, memory_mb=512)
FAST = {"wait_timeout": 5, "health_timeout": 0.6, "poll_interval": 0.02}


async def make_instances(client: FlyMachinesClient, count: int = 3) -> list[RolloutTarget]:
    targets = []
    for n in range(1, count + 1):
        instance_id, app = f"inst-{n}", f"qr-inst-{n}"
        await client.create_app(app, idempotency_key=f"app-{instance_id}")
        volume = await client.create_volume(
            app, name="data", region="ams", size_gb=1, compute={"cpus": 1, "memory_mb": 512}
        )
        config = build_machine_config(
            instance_id=instance_id,
            owner_id=f"owner-{n}",
            tier=TIER,
            image=OLD,
            issuer="https://cloud.quoroom.ai",
            allowed_origins=["https://app.quoroom.ai"],
            volume_id=volume.id,
        )
        machine = await client.create_machine(
            app, config=config, region=volume.region, name=f"room-{instance_id}"
        )
        await client.wait_healthy(app, machine.id, timeout_total=5, poll_interval=0.02)
        targets.append(RolloutTarget(instance_id, app, machine.id))
    return targets


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict]] = []

    async def __call__(self, instance_id, kind, detail) -> None:
        self.seen.append((instance_id, kind, dict(detail)))

    def kinds(self, instance_id: str) -> list[str]:
        return [kind for iid, kind, _ in self.seen if iid == instance_id]


async def test_one_machine_failing_health_is_rolled_back_and_the_others_are_updated(
    fly_client, fly_machines_fake
):
    targets = await make_instances(fly_client)
    fly_machines_fake.mark_machine_unhealthy(targets[1].machine_id, image=NEW)
    events = Events()
    report = await run_update_image(
        NEW,
        targets=targets,
        token=DEFAULT_TOKEN,
        org_slug=DEFAULT_ORG,
        base_url=fly_machines_fake.url,
        max_failures=2,
        on_event=events,
        **FAST,
    )
    assert [r.outcome for r in report.results] == [
        Outcome.UPDATED,
        Outcome.ROLLED_BACK,
        Outcome.UPDATED,
    ]
    assert report.failures == 1 and not report.stopped_early and not report.ok
    images = [(await fly_client.get_machine(t.app_name, t.machine_id)).image for t in targets]
    assert images == [NEW, OLD, NEW]
    rolled_back = await fly_client.get_machine(targets[1].app_name, targets[1].machine_id)
    assert rolled_back.healthy
    assert all(r.previous_image == OLD for r in report.results)
    assert events.kinds("inst-1") == ["image_update_started", "image_updated"]
    assert events.kinds("inst-2") == ["image_update_started", "image_rolled_back"]
    assert events.kinds("inst-3") == ["image_update_started", "image_updated"]
    assert "rolled_back" in format_report(report)


async def test_the_rollout_stops_after_max_failures_and_skips_the_rest(
    fly_client, fly_machines_fake
):
    targets = await make_instances(fly_client)
    fly_machines_fake.mark_machine_unhealthy(targets[1].machine_id, image=NEW)
    events = Events()
    report = await rolling_update(fly_client, targets, NEW, max_failures=1, on_event=events, **FAST)
    assert [r.outcome for r in report.results] == [
        Outcome.UPDATED,
        Outcome.ROLLED_BACK,
        Outcome.SKIPPED,
    ]
    assert report.stopped_early
    untouched = await fly_client.get_machine(targets[2].app_name, targets[2].machine_id)
    assert untouched.image == OLD
    assert events.kinds("inst-3") == ["image_update_skipped"]
    assert len(fly_machines_fake.calls_to("Machines_update")) == 2 + 1  # inst-2 updated twice


async def test_a_bad_image_harms_only_the_first_machine(fly_client, fly_machines_fake):
    targets = await make_instances(fly_client)
    fly_machines_fake.mark_image_unhealthy(NEW)
    report = await rolling_update(fly_client, targets, NEW, max_failures=1, **FAST)
    assert [r.outcome for r in report.results] == [
        Outcome.ROLLED_BACK,
        Outcome.SKIPPED,
        Outcome.SKIPPED,
    ]
    for target in targets:
        machine = await fly_client.get_machine(target.app_name, target.machine_id)
        assert machine.image == OLD


async def test_the_update_changes_only_the_image_and_is_guarded_by_current_version(
    fly_client, fly_machines_fake
):
    (target,) = await make_instances(fly_client, count=1)
    before = await fly_client.get_machine(target.app_name, target.machine_id)
    report = await rolling_update(fly_client, [target], NEW, **FAST)
    assert report.ok
    (call,) = fly_machines_fake.calls_to("Machines_update")
    assert call.body["current_version"] == before.version
    assert call.body["config"] == dict(before.config, image=NEW)


async def test_a_machine_changed_meanwhile_fails_without_being_overwritten(
    fly_client, fly_machines_fake
):
    (target,) = await make_instances(fly_client, count=1)
    fly_machines_fake.fail_next("Machines_update", 409, message="version mismatch")
    events = Events()
    report = await rolling_update(fly_client, [target], NEW, on_event=events, **FAST)
    (result,) = report.results
    assert result.outcome is Outcome.FAILED and "409" in result.detail
    assert (await fly_client.get_machine(target.app_name, target.machine_id)).image == OLD
    assert events.kinds("inst-1") == ["image_update_started", "image_update_failed"]


async def test_a_machine_that_is_unhealthy_on_both_images_is_reported_failed(
    fly_client, fly_machines_fake
):
    (target,) = await make_instances(fly_client, count=1)
    fly_machines_fake.mark_machine_unhealthy(target.machine_id)
    events = Events()
    report = await rolling_update(fly_client, [target], NEW, on_event=events, **FAST)
    assert report.results[0].outcome is Outcome.FAILED
    assert "after rollback" in report.results[0].detail
    assert events.kinds("inst-1")[-1] == "image_rollback_failed"


async def test_machines_already_on_the_image_or_not_running_are_skipped(
    fly_client, fly_machines_fake
):
    first, second = await make_instances(fly_client, count=2)
    machine = await fly_client.get_machine(second.app_name, second.machine_id)
    await fly_client.stop_machine(second.app_name, second.machine_id)
    await fly_client.wait(
        second.app_name, second.machine_id, "stopped", version=machine.version, timeout_total=5
    )
    await rolling_update(fly_client, [first], NEW, **FAST)
    report = await rolling_update(fly_client, [first, second], NEW, **FAST)
    assert [r.outcome for r in report.results] == [Outcome.SKIPPED, Outcome.SKIPPED]
    assert "already" in report.results[0].detail and "stopped" in report.results[1].detail
    assert report.ok


async def test_a_missing_machine_is_reported_failed_and_counts_toward_the_limit(fly_client):
    (target,) = await make_instances(fly_client, count=1)
    ghost = RolloutTarget("inst-ghost", target.app_name, "00000000000000")
    report = await rolling_update(fly_client, [ghost, target], NEW, max_failures=1, **FAST)
    assert [r.outcome for r in report.results] == [Outcome.FAILED, Outcome.SKIPPED]


async def test_a_failing_event_recorder_does_not_stop_the_rollout(fly_client):
    targets = await make_instances(fly_client, count=2)

    def broken(instance_id, kind, detail):
        raise RuntimeError("database down")

    report = await rolling_update(fly_client, targets, NEW, on_event=broken, **FAST)
    assert [r.outcome for r in report.results] == [Outcome.UPDATED, Outcome.UPDATED]


@pytest.mark.parametrize("image", ["registry.fly.io/quoroom-runtime:latest", "quoroom-runtime"])
async def test_an_image_not_pinned_by_digest_is_refused_before_touching_anything(
    fly_client, fly_machines_fake, image
):
    with pytest.raises(MachineConfigError):
        await rolling_update(fly_client, [RolloutTarget("i", "a", "m")], image)
    assert fly_machines_fake.calls == []
