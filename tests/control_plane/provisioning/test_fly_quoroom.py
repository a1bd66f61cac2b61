"""The Fly provider and runtime kinds: a ``quoroom`` instance's machine runs the gateway image
(``QUOROOM_RUNTIME_IMAGE``, pinned by digest) with the gateway command, everything else as for
the reference Room; the settings name the image a deployment's kind needs; ``ops update-image``
moves one kind only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from control_plane.provisioning.fly import FlyProvider
from control_plane.provisioning.provider import ProviderError
from control_plane.provisioning.runner import build_provider
from control_plane.settings import Settings, SettingsError
from fly_image.config import ROOM_CLI, ROOM_NODE, ROOM_PORT
from tests.fakes.fly_machines import DEFAULT_ORG, DEFAULT_TOKEN, FlyMachinesFake

from .conftest import IMAGE, ISSUER, drive, event_kinds, get_instance, make_instance

QUOROOM_IMAGE = "registry.fly.io/quoroom-gateway@sha256:" + "c" * 64
NEW_QUOROOM_IMAGE = "registry.fly.io/quoroom-gateway@sha256:" + "d" * 64


def fly_settings(make_settings: Callable[..., Settings], url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "provider": "fly",
        "public_url": ISSUER,
        "fly_api_token": DEFAULT_TOKEN,
        "fly_org": DEFAULT_ORG,
        "fly_api_base_url": url,
        "runtime_health_timeout_seconds": 10,
    }
    values.update(overrides)
    return make_settings(**values)


@pytest.fixture
async def both_images(fly_machines_fake: FlyMachinesFake, make_settings: Any) -> Any:
    provider = build_provider(
        fly_settings(
            make_settings,
            fly_machines_fake.url,
            runtime_image=IMAGE,
            quoroom_runtime_image=QUOROOM_IMAGE,
        ),
        wait_timeout=5.0,
        poll_interval=0.02,
    )
    assert isinstance(provider, FlyProvider)
    try:
        yield provider
    finally:
        await provider.aclose()


async def test_a_quoroom_instance_runs_the_gateway_image_and_command(
    make_worker, both_images, fly_machines_fake: FlyMachinesFake, factory, clock
):
    worker = make_worker(both_images)
    quoroom = await make_instance(factory, clock, runtime_kind="quoroom")
    reference = await make_instance(factory, clock)
    for iid in (quoroom, reference):
        inst = await drive(worker, clock, factory, iid)
        assert inst.status == "running", (inst.error, await event_kinds(factory, iid))
    q_inst, r_inst = await get_instance(factory, quoroom), await get_instance(factory, reference)
    assert (q_inst.image, r_inst.image) == (QUOROOM_IMAGE, IMAGE)
    (q,) = fly_machines_fake.live_machines(q_inst.fly_app)
    (r,) = fly_machines_fake.live_machines(r_inst.fly_app)
    assert q.config["image"] == QUOROOM_IMAGE and r.config["image"] == IMAGE
    assert q.config["init"]["cmd"] == [
        "--host", "0.0.0.0", "--port", "8080", "--upstream", f"http://127.0.0.1:{ROOM_PORT}",
        "--", ROOM_NODE, ROOM_CLI, "serve", "--port", str(ROOM_PORT),
    ]  # fmt: skip
    assert r.config["init"]["cmd"] == ["--host", "0.0.0.0", "--port", "8080"]
    assert q.config["metadata"]["quoroom_runtime_kind"] == "quoroom"
    assert r.config["metadata"]["quoroom_runtime_kind"] == "reference"
    # Same services, checks, mount path, guest, restart policy; the env differs only by the
    # instance's own id and URL.
    for key in ("services", "checks", "guest", "restart", "stop_config"):
        assert q.config[key] == r.config[key], key
    assert q.config["mounts"][0]["path"] == r.config["mounts"][0]["path"] == "/data"
    assert set(q.config["env"]) == set(r.config["env"])
    assert q.config["env"]["QUOROOM_DATA_DIR"] == "/data"
    assert q.config["env"]["QUOROOM_ALLOWED_ORIGINS"] == f"{ISSUER},https://qr-{quoroom}.fly.dev"


@pytest.mark.parametrize(
    ("kind", "images", "variable"),
    [
        ("reference", {}, "QUOROOM_CP_RUNTIME_IMAGE"),
        ("quoroom", {}, "QUOROOM_CP_QUOROOM_RUNTIME_IMAGE"),
        ("quoroom", {"runtime_image": IMAGE}, "QUOROOM_CP_QUOROOM_RUNTIME_IMAGE"),
        (
            "quoroom",
            {"quoroom_runtime_image": "registry.fly.io/quoroom-gateway:latest"},
            "QUOROOM_CP_QUOROOM_RUNTIME_IMAGE",
        ),
        (
            "quoroom",
            {"quoroom_runtime_image": QUOROOM_IMAGE, "runtime_image": "x:1"},
            "QUOROOM_CP_RUNTIME_IMAGE",
        ),
    ],
)
def test_the_image_the_runtime_kind_needs_is_named_when_missing_or_not_pinned(
    make_settings, kind: str, images: dict[str, str], variable: str
) -> None:
    settings = fly_settings(make_settings, "http://127.0.0.1:9", runtime_kind=kind, **images)
    with pytest.raises(SettingsError) as caught:
        build_provider(settings)
    assert caught.value.variable == variable


async def test_a_kind_without_an_image_fails_its_instance_naming_the_setting(make_settings) -> None:
    """RUNTIME_KIND=quoroom with only the gateway image: a reference instance made earlier
    cannot get a new machine, and says which setting is missing."""
    settings = fly_settings(
        make_settings,
        "http://127.0.0.1:9",
        runtime_kind="quoroom",
        quoroom_runtime_image=QUOROOM_IMAGE,
    )
    provider = build_provider(settings)
    try:
        assert isinstance(provider, FlyProvider)
        assert provider.image_for("quoroom") == QUOROOM_IMAGE
        with pytest.raises(ProviderError) as caught:
            provider.image_for("reference")
        assert not caught.value.retryable and "QUOROOM_CP_RUNTIME_IMAGE" in str(caught.value)
    finally:
        await provider.aclose()


async def test_update_image_moves_only_the_instances_of_its_kind(
    make_settings,
    make_worker,
    both_images,
    fly_machines_fake: FlyMachinesFake,
    factory,
    clock,
    capsys,
):
    from control_plane.provisioning.commands import update_image

    quoroom = await make_instance(factory, clock, runtime_kind="quoroom")
    reference = await make_instance(factory, clock)
    for iid in (quoroom, reference):
        await drive(make_worker(both_images), clock, factory, iid)
    settings = fly_settings(
        make_settings,
        fly_machines_fake.url,
        runtime_image=IMAGE,
        quoroom_runtime_image=QUOROOM_IMAGE,
    )

    status = await update_image(
        settings,
        NEW_QUOROOM_IMAGE,
        kind="quoroom",
        wait_timeout=5,
        health_timeout=2,
        poll_interval=0.02,
    )

    assert status == 0
    assert (await get_instance(factory, quoroom)).image == NEW_QUOROOM_IMAGE
    assert (await get_instance(factory, reference)).image == IMAGE
    machines = fly_machines_fake.live_machines()
    images = {m.config["metadata"]["quoroom_instance_id"]: m.config["image"] for m in machines}
    assert images == {quoroom: NEW_QUOROOM_IMAGE, reference: IMAGE}
    assert f"QUOROOM_CP_QUOROOM_RUNTIME_IMAGE={NEW_QUOROOM_IMAGE}" in capsys.readouterr().out


def test_the_cli_takes_the_kind_of_the_image_to_roll_out() -> None:
    from control_plane.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["ops", "update-image", QUOROOM_IMAGE]).kind == "reference"
    args = parser.parse_args(["ops", "update-image", QUOROOM_IMAGE, "--kind", "quoroom"])
    assert args.kind == "quoroom"
    with pytest.raises(SystemExit):
        parser.parse_args(["ops", "update-image", QUOROOM_IMAGE, "--kind", "node"])
