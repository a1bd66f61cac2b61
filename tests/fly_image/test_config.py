"""The machine-config builder: schema-valid output, env the runtime accepts, bad input refused."""

from __future__ import annotations

import itertools

import pytest

from control_plane.runtime_kinds import RUNTIME_KINDS
from fly_image.config import (
    DATA_DIR,
    HEALTH_PATH,
    INTERNAL_PORT,
    ROOM_CLI,
    ROOM_NODE,
    ROOM_PORT,
    Concurrency,
    MachineConfigError,
    Tier,
    build_machine_config,
    check_image_reference,
    runtime_command,
)
from fly_image.config import RUNTIME_KINDS as BUILDER_KINDS
from room_cloud_runtime._settings import load_settings
from tests.fakes.fly_machines import OpenAPISpec

DIGEST = "sha256:" + "0123456789abcdef" * 4
IMAGE = f"registry.fly.io/quoroom-runtime@{DIGEST}"

TIERS = [
    Tier(id="starter", cpu_kind="shared", cpus=1, memory_mb=512, volume_size_gb=1),
    Tier(id="standard", cpu_kind="shared", cpus=2, memory_mb=2048, volume_size_gb=5),
    Tier(id="pro", cpu_kind="performance", cpus=2, memory_mb=4096, volume_size_gb=20),
    Tier(id="max", cpu_kind="performance", cpus=8, memory_mb=16384, volume_size_gb=50),
]
REGIONS = ["ams", "iad", "sin"]
ORIGIN_SETS = [
    ["https://app.quoroom.ai"],
    ["https://app.quoroom.ai", "https://quoroom.ai", "https://cloud.quoroom.ai:8443"],
]


@pytest.fixture(scope="module")
def spec() -> OpenAPISpec:
    return OpenAPISpec(strict=True)


def build(**overrides):
    kwargs = dict(
        instance_id="inst_01HXYZ",
        owner_id="user-42",
        tier=TIERS[0],
        image=IMAGE,
        issuer="https://cloud.quoroom.ai",
        allowed_origins=["https://app.quoroom.ai"],
        volume_id="vol_abc123",
    )
    kwargs.update(overrides)
    return build_machine_config(**kwargs)


@pytest.mark.parametrize(
    ("tier", "region", "origins"),
    list(itertools.product(TIERS, REGIONS, ORIGIN_SETS)),
    ids=lambda v: v.id if isinstance(v, Tier) else (v if isinstance(v, str) else str(len(v))),
)
def test_every_built_config_validates_against_the_fly_machine_config_schema(
    spec, tier, region, origins
):
    config = build(tier=tier, allowed_origins=origins)
    assert spec.errors("fly.MachineConfig", config) == []
    request = {"config": config, "region": region, "name": "room-inst_01HXYZ"}
    assert spec.errors("CreateMachineRequest", request) == []
    update = {"config": config, "current_version": "01HXYZ", "region": region}
    assert spec.errors("UpdateMachineRequest", update) == []


def test_strict_schema_check_would_catch_a_misspelled_field(spec):
    config = build()
    config["services"][0]["internal_Port"] = 8080
    assert any("internal_Port" in e for e in spec.errors("fly.MachineConfig", config))


def test_config_carries_guest_env_services_checks_mount_restart_and_metadata():
    tier = TIERS[2]
    config = build(
        tier=tier, concurrency=Concurrency(type="connections", soft_limit=50, hard_limit=80)
    )
    assert config["image"] == IMAGE
    assert config["guest"] == {"cpu_kind": "performance", "cpus": 2, "memory_mb": 4096}
    assert config["env"] == {
        "QUOROOM_DEPLOYMENT_MODE": "cloud",
        "QUOROOM_CLOUD_INSTANCE_ID": "inst_01HXYZ",
        "QUOROOM_CLOUD_ISSUER": "https://cloud.quoroom.ai",
        "QUOROOM_CLOUD_JWKS_URL": "https://cloud.quoroom.ai/.well-known/jwks.json",
        "QUOROOM_ALLOWED_ORIGINS": "https://app.quoroom.ai",
        "QUOROOM_DATA_DIR": DATA_DIR,
        "QUOROOM_BEHIND_FLY_PROXY": "true",
        "PORT": str(INTERNAL_PORT),
        "QUOROOM_METRICS_PORT": "9091",
        "QUOROOM_METRICS_HOST": "::",
    }
    # Scraped by Fly over the private network; no service publishes the metrics port.
    assert config["metrics"] == {"port": 9091, "path": "/metrics"}
    assert all(s["internal_port"] != 9091 for s in config["services"])
    (service,) = config["services"]
    assert service["internal_port"] == INTERNAL_PORT
    assert service["autostop"] == "off"
    ports = {p["port"]: p for p in service["ports"]}
    assert ports[80] == {"port": 80, "handlers": ["http"], "force_https": True}
    assert ports[443]["handlers"] == ["tls", "http"]
    assert service["concurrency"] == {"type": "connections", "soft_limit": 50, "hard_limit": 80}
    for check in [config["checks"]["healthz"], *service["checks"]]:
        assert check["type"] == "http"
        assert check["path"] == HEALTH_PATH
        assert check["port"] == INTERNAL_PORT
        assert {"interval", "timeout", "grace_period"} <= check.keys()
    assert config["mounts"] == [{"volume": "vol_abc123", "path": DATA_DIR}]
    assert config["restart"] == {"policy": "on-failure", "max_retries": 10}
    assert config["metadata"] == {
        "quoroom_instance_id": "inst_01HXYZ",
        "quoroom_owner_id": "user-42",
        "managed_by": "quoroom-cloud",
        "quoroom_runtime_kind": "reference",
    }
    assert config["init"]["cmd"] == ["--host", "0.0.0.0", "--port", str(INTERNAL_PORT)]


@pytest.mark.parametrize("tier", TIERS, ids=lambda t: t.id)
def test_a_quoroom_config_runs_the_gateway_in_front_of_the_real_room(spec, tier):
    quoroom = build(tier=tier, runtime_kind="quoroom")
    reference = build(tier=tier)
    assert spec.errors("fly.MachineConfig", quoroom) == []
    assert quoroom["init"]["cmd"] == [
        "--host", "0.0.0.0", "--port", str(INTERNAL_PORT),
        "--upstream", f"http://127.0.0.1:{ROOM_PORT}",
        "--", ROOM_NODE, ROOM_CLI, "serve", "--port", str(ROOM_PORT),
    ]  # fmt: skip
    assert quoroom["metadata"]["quoroom_runtime_kind"] == "quoroom"
    # Only the command and the kind tag differ: same env, services, checks, mounts, guest.
    for config in (quoroom, reference):
        config.pop("init")
        config["metadata"].pop("quoroom_runtime_kind")
    assert quoroom == reference


def test_the_command_follows_the_port_and_the_kinds_are_the_control_planes():
    assert runtime_command("reference", 9000) == ["--host", "0.0.0.0", "--port", "9000"]
    assert runtime_command("quoroom", 9000)[:4] == ["--host", "0.0.0.0", "--port", "9000"]
    assert build(runtime_kind="quoroom", internal_port=9000)["services"][0]["internal_port"] == 9000
    assert BUILDER_KINDS == RUNTIME_KINDS


def test_the_runtime_settings_parser_accepts_the_env_the_builder_produces():
    config = build(allowed_origins=ORIGIN_SETS[1], jwks_url="https://keys.quoroom.ai/jwks.json")
    settings = load_settings(config["env"])
    assert settings.mode == "cloud"
    assert settings.instance_id == "inst_01HXYZ"
    assert settings.issuer == "https://cloud.quoroom.ai"
    assert settings.resolved_jwks_url == "https://keys.quoroom.ai/jwks.json"
    assert settings.allowed_origins == tuple(ORIGIN_SETS[1])
    assert settings.behind_fly_proxy is True
    assert settings.data_dir == DATA_DIR


def test_a_non_default_port_moves_the_service_the_checks_and_the_listen_command_together():
    config = build(internal_port=9000)
    assert config["services"][0]["internal_port"] == 9000
    assert config["checks"]["healthz"]["port"] == 9000
    assert config["init"]["cmd"][-1] == "9000"
    assert config["env"]["PORT"] == "9000"


@pytest.mark.parametrize(
    "image",
    [
        "registry.fly.io/quoroom-runtime:latest",
        "registry.fly.io/quoroom-runtime",
        "quoroom-runtime@sha256:abc",
        f"registry.fly.io/quoroom-runtime@sha512:{'0' * 128}",
        f"Registry.Fly.io/Quoroom@{DIGEST}",
        f" registry.fly.io/quoroom-runtime@{DIGEST}",
        "",
    ],
)
def test_an_image_not_pinned_by_digest_is_refused(image):
    with pytest.raises(MachineConfigError) as caught:
        build(image=image)
    assert caught.value.field == "image"


@pytest.mark.parametrize(
    "image",
    [
        IMAGE,
        f"registry.fly.io/quoroom-runtime:v1.2.3@{DIGEST}",
        f"localhost:5000/team/quoroom_runtime@{DIGEST}",
        f"ghcr.io/quoroom/room-runtime@{DIGEST}",
    ],
)
def test_digest_pinned_images_are_accepted_with_or_without_a_tag(image):
    assert check_image_reference(image) == image


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"instance_id": ""}, "instance_id"),
        ({"instance_id": "has space"}, "instance_id"),
        ({"instance_id": "x" * 65}, "instance_id"),
        ({"owner_id": ""}, "owner_id"),
        ({"owner_id": "   "}, "owner_id"),
        ({"volume_id": ""}, "volume_id"),
        ({"volume_id": "data"}, "volume_id"),
        ({"allowed_origins": []}, "allowed_origins"),
        ({"allowed_origins": "https://app.quoroom.ai"}, "allowed_origins"),
        ({"allowed_origins": ["https://app.quoroom.ai/"]}, "allowed_origins"),
        ({"allowed_origins": ["https://app.quoroom.ai/path"]}, "allowed_origins"),
        ({"allowed_origins": ["https://*.quoroom.ai"]}, "allowed_origins"),
        ({"allowed_origins": ["http://app.quoroom.ai"]}, "allowed_origins"),
        ({"allowed_origins": ["app.quoroom.ai"]}, "allowed_origins"),
        ({"allowed_origins": ["https://a.quoroom.ai,https://b.quoroom.ai"]}, "allowed_origins"),
        ({"issuer": "http://cloud.quoroom.ai"}, "issuer"),
        ({"issuer": "cloud.quoroom.ai"}, "issuer"),
        ({"jwks_url": "http://evil.example/jwks.json"}, "jwks_url"),
        ({"internal_port": 0}, "internal_port"),
        ({"extra_env": {"QUOROOM_DEPLOYMENT_MODE": "local"}}, "extra_env"),
        ({"extra_env": {"lower-case": "x"}}, "extra_env"),
        ({"extra_metadata": {"quoroom_owner_id": "someone-else"}}, "extra_metadata"),
        ({"extra_env": {"QUOROOM_RATE_LIMIT_READ": "lots"}}, "env"),
        ({"runtime_kind": "node"}, "runtime_kind"),
        ({"runtime_kind": "Quoroom"}, "runtime_kind"),
        ({"runtime_kind": "quoroom", "internal_port": ROOM_PORT}, "internal_port"),
        ({"internal_port": 9091}, "internal_port"),
    ],
)
def test_bad_builder_input_is_refused_with_the_field_named(overrides, field):
    with pytest.raises(MachineConfigError) as caught:
        build(**overrides)
    assert caught.value.field == field


def test_loopback_http_issuer_and_origins_are_allowed_for_development():
    config = build(issuer="http://127.0.0.1:8000", allowed_origins=["http://localhost:5173"])
    assert config["env"]["QUOROOM_CLOUD_JWKS_URL"] == "http://127.0.0.1:8000/.well-known/jwks.json"


@pytest.mark.parametrize(
    ("cpu_kind", "cpus", "memory_mb"),
    [
        ("gpu", 1, 512),
        ("shared", 3, 768),
        ("shared", 1, 300),
        ("shared", 1, 4096),
        ("performance", 1, 1024),
    ],
)
def test_impossible_machine_sizes_are_refused(cpu_kind, cpus, memory_mb):
    with pytest.raises(MachineConfigError):
        Tier(id="bad", cpu_kind=cpu_kind, cpus=cpus, memory_mb=memory_mb)


def test_any_object_with_cpu_kind_cpus_and_memory_works_as_a_tier():
    class CatalogTier:
        cpu_kind = "shared"
        cpus = 1
        memory_mb = 1024
        price_cents = 900

    config = build(tier=CatalogTier())
    assert config["guest"] == {"cpu_kind": "shared", "cpus": 1, "memory_mb": 1024}


def test_extra_env_and_metadata_are_added_without_overriding_the_builder():
    config = build(
        extra_env={"QUOROOM_RATE_LIMIT_READ": "600/minute"}, extra_metadata={"tier": "starter"}
    )
    assert config["env"]["QUOROOM_RATE_LIMIT_READ"] == "600/minute"
    assert config["metadata"]["tier"] == "starter"
