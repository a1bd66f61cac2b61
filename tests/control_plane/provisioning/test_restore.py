"""Backups that restore (issue 14, item 3): Fly's scheduled snapshots with the configured
retention, ``ops restore`` against the Fly fake (listing, a volume created from the snapshot, the
Room running again on it), and the refusals (unknown instance, unknown snapshot, a Room that runs
fine, statuses a restore does not start from). The round trip with real data is in
``test_restore_local.py``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from control_plane import cli
from control_plane.auth.models import User
from control_plane.db import transaction
from control_plane.instances.lifecycle import cancel_now
from control_plane.instances.models import CloudInstance, InstanceEvent, InstanceStatus
from control_plane.provisioning.fly import FlyProvider, restored_volume_name
from control_plane.provisioning.fly_api import FlyMachinesClient
from control_plane.provisioning.local import LocalProvider
from control_plane.provisioning.provider import InstanceSpec, app_name
from control_plane.provisioning.restore import RestoreRefused, request_restore, restore_main
from control_plane.settings import Settings
from tests.fakes.fly_machines import DEFAULT_ORG, DEFAULT_TOKEN, FlyMachinesFake

from .conftest import IMAGE, ISSUER, drive, event_kinds, get_instance, make_instance

S = InstanceStatus


def fly_provider_with(fake: FlyMachinesFake, **kw: Any) -> FlyProvider:
    client = FlyMachinesClient(
        DEFAULT_TOKEN, org_slug=DEFAULT_ORG, base_url=fake.url, timeout=5.0, retry_backoff=0.01
    )
    return FlyProvider(
        client,
        image=IMAGE,
        issuer=ISSUER,
        allowed_origins=[ISSUER],
        wait_timeout=5.0,
        health_timeout=5.0,
        poll_interval=0.02,
        **kw,
    )


@pytest.fixture
async def retained(fly_machines_fake: FlyMachinesFake) -> AsyncIterator[FlyProvider]:
    provider = fly_provider_with(fly_machines_fake, snapshot_retention=9)
    yield provider
    await provider.aclose()


# -- the setting ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["0", "61", "-1", "five", "2.5", ""])
def test_a_bad_snapshot_retention_is_a_start_up_error_naming_the_setting(bad, monkeypatch, capsys):
    with pytest.raises(ValidationError, match="QUOROOM_CP_SNAPSHOT_RETENTION_DAYS"):
        Settings(snapshot_retention_days=bad)
    monkeypatch.setenv("QUOROOM_CP_SNAPSHOT_RETENTION_DAYS", bad)
    cli.get_settings.cache_clear()
    try:
        assert cli.main(["ops", "restore", "anything"]) == 2
    finally:
        cli.get_settings.cache_clear()
    assert "QUOROOM_CP_SNAPSHOT_RETENTION_DAYS" in capsys.readouterr().err


async def test_the_snapshot_retention_setting_reaches_the_fly_provider(
    make_settings, fly_machines_fake
):
    assert make_settings().snapshot_retention_days == 5  # Fly's own default
    settings = make_settings(
        provider="fly",
        public_url=ISSUER,
        env="development",
        fly_api_token=DEFAULT_TOKEN,
        fly_org=DEFAULT_ORG,
        runtime_image=IMAGE,
        fly_api_base_url=fly_machines_fake.url,
        snapshot_retention_days="14",
    )
    assert settings.snapshot_retention_days == 14
    provider = FlyProvider.from_settings(settings)
    try:
        assert provider.snapshot_retention == 14
    finally:
        await provider.aclose()


# -- Fly: scheduled snapshots, listing, restore -----------------------------------------------


async def test_fly_volumes_get_daily_snapshots_with_the_retention_and_adopted_ones_are_updated(
    retained, fly_machines_fake, make_worker, factory, clock
):
    iid = await make_instance(factory, clock)
    inst = await drive(make_worker(retained), clock, factory, iid)
    assert inst.status == "running", inst.error

    (create,) = fly_machines_fake.calls_to("Volumes_create")
    assert create.status == 200
    assert (create.body["snapshot_retention"], create.body["auto_backup_enabled"]) == (9, True)
    volume = fly_machines_fake.volumes[inst.volume_id]
    assert (volume.snapshot_retention, volume.auto_backup_enabled) == (9, True)

    # Fly's schedule runs: the snapshots are listed with the volume's retention.
    daily = fly_machines_fake.run_daily_snapshots()
    listed = await retained.list_snapshots(inst.fly_app)
    assert [s.id for s in listed] == daily
    assert listed[0].volume_id == inst.volume_id and listed[0].region == "iad"
    raw = fly_machines_fake.apps[inst.fly_app].snapshots[inst.volume_id][0]
    assert raw["retention_days"] == 9

    # The setting changes: the volume a provider adopts is updated, once.
    spec = InstanceSpec(iid, inst.owner_id, "iad", "shared", 1, 256, 1)
    longer = fly_provider_with(fly_machines_fake, snapshot_retention=30)
    try:
        await longer.ensure_volume(spec, inst.fly_app, inst.volume_id)
        await longer.ensure_volume(spec, inst.fly_app, inst.volume_id)
    finally:
        await longer.aclose()
    (update,) = fly_machines_fake.calls_to("Volumes_update")
    assert update.body == {"snapshot_retention": 30, "auto_backup_enabled": True}
    assert volume.snapshot_retention == 30
    assert await retained.list_snapshots("qr-no-such-app") == []


async def test_fly_restore_creates_a_volume_from_the_snapshot_and_runs_the_room_on_it(
    retained, fly_machines_fake, make_worker, prov_settings, factory, clock, capsys
):
    fake = fly_machines_fake
    iid = await make_instance(factory, clock)
    worker = make_worker(retained)
    inst = await drive(worker, clock, factory, iid)
    old_volume, old_machine = inst.volume_id, inst.machine_id
    (daily,) = fake.run_daily_snapshots()

    async with transaction(factory) as db:
        await cancel_now(db, prov_settings, iid, now=clock.now, message="canceled (test)")
    inst = await drive(worker, clock, factory, iid, until=frozenset({"destroying"}))
    assert inst.status == "destroying" and inst.snapshot_id not in (None, daily)
    listed = [s.id for s in await retained.list_snapshots(inst.fly_app)]
    assert set(listed) == {daily, inst.snapshot_id}

    # An explicit snapshot: the daily one, not the newest.
    code = await restore_main(prov_settings, iid, daily, provider=retained, clock=clock)
    assert code == 0, capsys.readouterr().err
    queued = await get_instance(factory, iid)
    inst = await drive(worker, clock, factory, iid)
    assert inst.status == "running", (inst.error, await event_kinds(factory, iid))

    restored = fake.volumes[inst.volume_id]
    assert restored.restored_from == daily
    assert restored.name == restored_volume_name(queued.step.partition(":")[2])
    assert (restored.region, restored.snapshot_retention) == ("iad", 9)
    (create,) = [c for c in fake.calls_to("Volumes_create") if c.body.get("snapshot_id")]
    assert create.body["snapshot_id"] == daily and create.body["size_gb"] >= 1
    # The Room runs on the restored volume; the old machine is gone, the old volume kept.
    (machine,) = fake.live_machines(inst.fly_app)
    assert machine.id == inst.machine_id != old_machine
    assert [m["volume"] for m in machine.config["mounts"]] == [restored.id]
    assert fake.volumes[old_volume].attached_machine_id is None
    assert inst.snapshot_id is None and inst.destroy_after is None

    trail = await event_kinds(factory, iid)
    kinds = [k for k, _ in trail]
    assert kinds.index("restore_requested") < kinds.index("restore"), trail
    assert ("restore", f"volume {restored.id} restored from snapshot {daily}") in trail

    # Running fine: refused. A snapshot the app does not hold: refused, nothing written.
    assert await restore_main(prov_settings, iid, provider=retained, clock=clock) == 1
    assert "is running fine" in capsys.readouterr().err
    fake.machines[inst.machine_id].state = "stopped"  # broken now
    assert await restore_main(prov_settings, iid, "vs_nope", provider=retained, clock=clock) == 1
    assert "snapshot 'vs_nope' does not exist" in capsys.readouterr().err
    assert (await get_instance(factory, iid)).status == "running"


async def test_a_restore_of_a_snapshot_fly_no_longer_has_fails_the_instance_with_the_reason(
    retained, fly_machines_fake, make_worker, prov_settings, factory, clock
):
    iid = await make_instance(factory, clock)
    worker = make_worker(retained)
    inst = await drive(worker, clock, factory, iid)
    (daily,) = fly_machines_fake.run_daily_snapshots()
    async with transaction(factory) as db:
        await cancel_now(db, prov_settings, iid, now=clock.now, message="canceled (test)")
    await drive(worker, clock, factory, iid, until=frozenset({"destroying"}))
    await request_restore(prov_settings, factory, retained, iid, daily, now=clock.now)
    fly_machines_fake.apps[inst.fly_app].snapshots[inst.volume_id].clear()  # expired meanwhile

    inst = await drive(worker, clock, factory, iid)
    assert inst.status == "failed" and f"snapshot {daily} does not exist" in (inst.error or "")


# -- refusals ---------------------------------------------------------------------------------


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[LocalProvider]:
    provider = LocalProvider(var_dir=tmp_path / "var", issuer=ISSUER, allowed_origins=[ISSUER])
    yield provider
    await provider.aclose()


def test_an_unknown_instance_is_refused_by_the_command(database_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUOROOM_CP_DATABASE_URL", database_url)
    monkeypatch.setenv("QUOROOM_CP_VAR_DIR", str(tmp_path / "var"))
    cli.get_settings.cache_clear()
    try:
        assert cli.main(["ops", "restore", "no-such-instance"]) == 1
    finally:
        cli.get_settings.cache_clear()
    assert "not restored: no instance 'no-such-instance'" in capsys.readouterr().err


async def test_a_snapshot_that_does_not_exist_is_refused_and_nothing_is_written(
    local, settings, factory, clock
):
    iid = await make_instance(factory, clock, status=S.CANCELED, run_after=None)
    app = app_name(iid)
    with pytest.raises(RestoreRefused, match="has no snapshot to restore from"):
        await request_restore(settings, factory, local, iid, now=clock.now)

    spec = InstanceSpec(iid, "owner", "local", "shared", 1, 256, 1)
    await local.ensure_app(spec)
    await local.ensure_volume(spec, app, None)
    taken = await local.snapshot_volume(app, "data")
    with pytest.raises(RestoreRefused, match=r"snapshot 'nope' does not exist .*" + taken):
        await request_restore(settings, factory, local, iid, "nope", now=clock.now)
    inst = await get_instance(factory, iid)
    assert (inst.status, inst.step, inst.snapshot_id) == ("canceled", None, None)
    assert await event_kinds(factory, iid) == []

    queued = await request_restore(settings, factory, local, iid, taken, now=clock.now)
    assert (queued.snapshot.id, queued.from_status) == (taken, "canceled")
    with pytest.raises(RestoreRefused, match="is being restored already"):
        await request_restore(settings, factory, local, iid, taken, now=clock.now)


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (S.DESTROYED, "was destroyed"),
        (S.SUSPENDED, "is suspended for payment"),
        (S.PROVISIONING, "is being provisioned"),
        (S.AWAITING_PAYMENT, "has never run"),
    ],
)
async def test_statuses_a_restore_does_not_start_from_are_refused(
    status, reason, local, settings, factory, clock
):
    iid = await make_instance(factory, clock, status=status)
    with pytest.raises(RestoreRefused, match=reason):
        await request_restore(settings, factory, local, iid, now=clock.now)


async def test_an_instance_a_worker_holds_is_refused_until_the_lease_ends(
    local, settings, factory, clock
):
    iid = await make_instance(
        factory,
        clock,
        status=S.FAILED,
        run_after=None,
        lease_owner="another-worker",
        lease_until=clock.now.replace(year=clock.now.year + 1),
    )
    spec = InstanceSpec(iid, "owner", "local", "shared", 1, 256, 1)
    await local.ensure_app(spec)
    await local.snapshot_volume(app_name(iid), "data")
    with pytest.raises(RestoreRefused, match="is being worked on right now"):
        await request_restore(settings, factory, local, iid, now=clock.now)


async def _add_instance_of(
    factory, owner_id: str | None, status: InstanceStatus, region: str = "iad"
) -> None:
    """Another Room, of ``owner_id`` (None: of a new user)."""
    async with transaction(factory) as session:
        if owner_id is None:
            user = User(email=f"{uuid.uuid4().hex[:8]}@example.test", email_verified=True)
            session.add(user)
            await session.flush()
            owner_id = user.id
        session.add(
            CloudInstance(
                owner_id=owner_id, name="Other", tier="starter", region=region, status=str(status)
            )
        )


async def _snapshotted(local, iid: str) -> str:
    spec = InstanceSpec(iid, "owner", "local", "shared", 1, 256, 1)
    await local.ensure_app(spec)
    await local.ensure_volume(spec, app_name(iid), None)
    return await local.snapshot_volume(app_name(iid), "data")


async def test_a_canceled_room_is_restored_only_within_its_owners_quota(
    local, make_settings, factory, clock
):
    """A canceled Room holds no slot; restored it takes one, so the owner's INSTANCE_QUOTA
    holds (the refusal writes nothing) unless the operator says --over-quota."""
    settings = make_settings(instance_quota=1)
    iid = await make_instance(factory, clock, status=S.CANCELED, run_after=None)
    owner = (await get_instance(factory, iid)).owner_id
    await _add_instance_of(factory, owner, S.RUNNING)
    taken = await _snapshotted(local, iid)
    with pytest.raises(RestoreRefused, match=r"its owner has 1 live Rooms already \(INSTANCE_"):
        await request_restore(settings, factory, local, iid, taken, now=clock.now)
    inst = await get_instance(factory, iid)
    assert (inst.status, inst.step, inst.snapshot_id) == ("canceled", None, None)
    assert await event_kinds(factory, iid) == []

    queued = await request_restore(
        settings, factory, local, iid, taken, now=clock.now, over_quota=True
    )
    assert queued.from_status == "canceled"
    async with factory() as session:
        event = await session.scalar(select(InstanceEvent).where(InstanceEvent.instance_id == iid))
    assert event is not None and event.data["over_quota"] is True


async def test_a_canceled_room_is_restored_only_within_the_capacity(
    local, make_settings, factory, clock
):
    settings = make_settings(rooms_per_region="iad=1")
    iid = await make_instance(factory, clock, status=S.CANCELED, run_after=None)
    await _add_instance_of(factory, None, S.RUNNING, region="iad")
    taken = await _snapshotted(local, iid)
    with pytest.raises(RestoreRefused, match=r"region iad is full.*--over-quota"):
        await request_restore(settings, factory, local, iid, taken, now=clock.now)
    assert (await get_instance(factory, iid)).status == "canceled"

    # A failed Room still holds its slot: restoring it takes no second one.
    failed = await make_instance(factory, clock, status=S.FAILED, run_after=None, region="fra")
    full_fra = make_settings(rooms_per_region="fra=1", instance_quota=1)
    queued = await request_restore(
        full_fra, factory, local, failed, await _snapshotted(local, failed), now=clock.now
    )
    assert queued.from_status == "failed"
