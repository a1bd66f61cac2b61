"""``quoroom-cloud worker --once`` and ``quoroom-cloud ops update-image`` against the fake."""

from __future__ import annotations

from collections.abc import Callable

from control_plane.cli import build_parser
from control_plane.provisioning.commands import update_image, worker_main
from control_plane.settings import Settings
from tests.fakes.fly_machines import DEFAULT_ORG, DEFAULT_TOKEN, FlyMachinesFake

from .conftest import IMAGE, ISSUER, drive, event_kinds, get_instance, make_instance

NEW_IMAGE = "registry.fly.io/quoroom-runtime@sha256:" + "b" * 64


def fly_settings(make_settings: Callable[..., Settings], fake: FlyMachinesFake) -> Settings:
    return make_settings(
        provider="fly",
        public_url=ISSUER,
        fly_api_token=DEFAULT_TOKEN,
        fly_org=DEFAULT_ORG,
        fly_api_base_url=fake.url,
        runtime_image=IMAGE,
        runtime_health_timeout_seconds=10,
    )


def test_the_cli_knows_the_worker_and_ops_commands():
    args = build_parser().parse_args(["ops", "update-image", NEW_IMAGE, "--max-failures", "2"])
    assert (args.image, args.max_failures) == (NEW_IMAGE, 2)
    assert build_parser().parse_args(["worker", "--once"]).once is True


async def test_worker_once_provisions_what_is_due_and_exits(
    make_settings, fly_machines_fake: FlyMachinesFake, factory, clock, capsys
):
    settings = fly_settings(make_settings, fly_machines_fake)
    iid = await make_instance(factory, clock)

    assert await worker_main(settings, once=True) == 0

    assert (await get_instance(factory, iid)).status == "running"
    assert "processed 1 instance(s)" in capsys.readouterr().out


async def test_update_image_rolls_running_machines_and_records_events(
    make_settings,
    make_worker,
    fly_provider,
    fly_machines_fake: FlyMachinesFake,
    factory,
    clock,
    capsys,
):
    ids = []
    for _ in range(2):
        iid = await make_instance(factory, clock)
        await drive(make_worker(fly_provider), clock, factory, iid)
        ids.append(iid)
    settings = fly_settings(make_settings, fly_machines_fake)

    status = await update_image(
        settings, NEW_IMAGE, wait_timeout=5, health_timeout=2, poll_interval=0.02
    )

    assert status == 0
    for iid in ids:
        assert (await get_instance(factory, iid)).image == NEW_IMAGE
        assert "image_updated" in [k for k, _ in await event_kinds(factory, iid)]
    assert {m.config["image"] for m in fly_machines_fake.live_machines()} == {NEW_IMAGE}
    assert f"QUOROOM_CP_RUNTIME_IMAGE={NEW_IMAGE}" in capsys.readouterr().out


async def test_update_image_stops_after_max_failures_and_exits_non_zero(
    make_settings, make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock
):
    for _ in range(2):
        iid = await make_instance(factory, clock)
        await drive(make_worker(fly_provider), clock, factory, iid)
    fly_machines_fake.mark_image_unhealthy(NEW_IMAGE)

    status = await update_image(
        fly_settings(make_settings, fly_machines_fake),
        NEW_IMAGE,
        wait_timeout=5,
        health_timeout=0.5,
        poll_interval=0.02,
    )

    assert status == 1
    assert {m.config["image"] for m in fly_machines_fake.live_machines()} == {IMAGE}


async def test_update_image_needs_the_fly_provider(make_settings, capsys):
    assert await update_image(make_settings(provider="local"), NEW_IMAGE) == 2
    assert "PROVIDER=fly" in capsys.readouterr().err
