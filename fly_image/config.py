"""The Fly machine config for one Room runtime.

:func:`build_machine_config` turns an instance (id, owner, tier, pinned image, trust settings,
volume) into the ``fly.MachineConfig`` the Fly provider sends in Create/Update Machine. Its output
is checked twice: here, by parsing the runtime environment it produces with the runtime's own
settings parser (so a config the runtime would refuse at start-up is never sent), and in the tests
against the ``fly.MachineConfig`` schema of the Machines API description.

The constants below are shared with ``Dockerfile.runtime`` (port, health path, data dir, the
entrypoint command); ``tests/fly_image/test_dockerfile.py`` keeps the two in step.

Two runtime kinds (DESIGN.md "Gateway mode"): ``reference`` runs ``quoroom-runtime serve`` (the
Dockerfile's default target), ``quoroom`` runs ``quoroom-runtime gateway`` in front of the real
(Node) Room on loopback (its ``quoroom`` target). Same services, checks, mounts and environment;
the image and the command differ.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from room_cloud_runtime import ConfigError, load_settings

__all__ = [
    "DATA_DIR",
    "ENTRYPOINT",
    "GATEWAY_ENTRYPOINT",
    "HEALTH_PATH",
    "INTERNAL_PORT",
    "MANAGED_BY",
    "METADATA_INSTANCE_ID",
    "METADATA_MANAGED_BY",
    "METADATA_OWNER_ID",
    "METADATA_RUNTIME_KIND",
    "ROOM_CLI",
    "ROOM_NODE",
    "ROOM_PORT",
    "RUNTIME_KINDS",
    "Concurrency",
    "MachineConfigError",
    "Tier",
    "TierLike",
    "build_machine_config",
    "check_image_reference",
    "runtime_command",
    "runtime_env",
]

INTERNAL_PORT = 8080
HEALTH_PATH = "/healthz"
DATA_DIR = "/data"
#: The runtime's Prometheus listener inside the machine (Fly scrapes it: the config's ``metrics``).
METRICS_PORT = 9091
METRICS_PATH = "/metrics"
ENTRYPOINT = ("quoroom-runtime", "serve")
#: The ``quoroom`` image: the gateway in front of the real Room, which listens on loopback only.
GATEWAY_ENTRYPOINT = ("quoroom-runtime", "gateway")
ROOM_PORT = 3700
#: Where the ``quoroom`` target installs the npm package ``quoroom``, and Debian's node. Absolute:
#: the Room's PATH starts with its npm prefix on the volume, where a package could add a "node".
ROOM_CLI = "/opt/quoroom/node_modules/quoroom/out/mcp/cli.js"
ROOM_NODE = "/usr/bin/node"
RUNTIME_KINDS = ("reference", "quoroom")
MANAGED_BY = "quoroom-cloud"
METADATA_INSTANCE_ID = "quoroom_instance_id"
METADATA_OWNER_ID = "quoroom_owner_id"
METADATA_MANAGED_BY = "managed_by"
METADATA_RUNTIME_KIND = "quoroom_runtime_kind"

# registry[:port]/path[:tag]@sha256:<64 hex>. A tag alone is mutable (the image under a tag can
# change between create and a later restart), so only a digest pins what runs.
_IMAGE_RE = re.compile(
    r"^(?P<repo>[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]{1,5})?"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"@sha256:[0-9a-f]{64}$"
)
_INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_CPU_KINDS = ("shared", "performance")
_CPU_COUNTS = (1, 2, 4, 8, 16)


class MachineConfigError(ValueError):
    """The builder refused its input. ``field`` names the offending argument."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class TierLike(Protocol):
    """What the builder needs from a tier; the catalog's tier objects (issue 4) fit as they are."""

    @property
    def cpu_kind(self) -> str: ...
    @property
    def cpus(self) -> int: ...
    @property
    def memory_mb(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Tier:
    """A minimal machine size. The catalog (from configuration) owns prices and Stripe ids."""

    id: str
    cpu_kind: Literal["shared", "performance"]
    cpus: int
    memory_mb: int
    volume_size_gb: int = 1

    def __post_init__(self) -> None:
        _check_guest(self)
        if self.volume_size_gb < 1:
            raise MachineConfigError("tier", "volume_size_gb must be at least 1")


@dataclass(frozen=True, slots=True)
class Concurrency:
    """Fly proxy load limits per machine. ``requests`` counts in-flight HTTP requests (a
    WebSocket counts as one for its life); past ``soft_limit`` the proxy prefers other machines,
    at ``hard_limit`` it queues."""

    type: Literal["connections", "requests"] = "requests"
    soft_limit: int = 200
    hard_limit: int = 250

    def __post_init__(self) -> None:
        if not 0 < self.soft_limit <= self.hard_limit:
            raise MachineConfigError("concurrency", "need 0 < soft_limit <= hard_limit")


def check_image_reference(image: str) -> str:
    """Return ``image`` if it is pinned by digest (``repo@sha256:<64 hex>``), else raise."""
    if not isinstance(image, str) or not _IMAGE_RE.match(image):
        raise MachineConfigError(
            "image",
            f"must be pinned by digest, like registry.fly.io/app@sha256:<64 hex>; got {image!r}",
        )
    return image


def runtime_env(
    *,
    instance_id: str,
    issuer: str,
    allowed_origins: Iterable[str],
    jwks_url: str | None = None,
    internal_port: int = INTERNAL_PORT,
    behind_fly_proxy: bool = True,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment the runtime reads (names per DESIGN.md "Runtime settings").

    The JWKS URL is always written out (pinned, never derived from a token: PITFALLS.md, the
    Pomerium SDK case). ``extra`` may add settings but never override these.
    """
    origins = _check_origins(allowed_origins)
    _check_instance_id(instance_id)
    _check_url("issuer", issuer)
    jwks = jwks_url or f"{issuer.rstrip('/')}/.well-known/jwks.json"
    _check_url("jwks_url", jwks)
    env = {
        "QUOROOM_DEPLOYMENT_MODE": "cloud",
        "QUOROOM_CLOUD_INSTANCE_ID": instance_id,
        "QUOROOM_CLOUD_ISSUER": issuer,
        "QUOROOM_CLOUD_JWKS_URL": jwks,
        "QUOROOM_ALLOWED_ORIGINS": ",".join(origins),
        "QUOROOM_DATA_DIR": DATA_DIR,
        # Fly's proxy overwrites Fly-Client-IP; trust it only when we are behind it
        # (arcjet/arcjet-js#5412: X-Forwarded-For stays client-controlled).
        "QUOROOM_BEHIND_FLY_PROXY": "true" if behind_fly_proxy else "false",
        "PORT": str(internal_port),
        # Prometheus metrics for Fly's scraper (the machine config's ``metrics``), on the
        # private network only: no service publishes METRICS_PORT.
        "QUOROOM_METRICS_PORT": str(METRICS_PORT),
        "QUOROOM_METRICS_HOST": "::",
    }
    for key, value in (extra or {}).items():
        if key in env:
            raise MachineConfigError("extra_env", f"{key} is set by the builder")
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
            raise MachineConfigError("extra_env", f"{key!r} is not an environment variable name")
        env[key] = str(value)
    try:
        # The runtime's own parser: a config the runtime would refuse is never sent.
        load_settings(env)
    except ConfigError as exc:
        raise MachineConfigError("env", str(exc)) from exc
    return env


def runtime_command(
    runtime_kind: str = "reference", internal_port: int = INTERNAL_PORT
) -> list[str]:
    """The arguments to the image's entrypoint (the machine's ``init.cmd``, the image's ``CMD``):
    listen on every address at ``internal_port``; for ``quoroom``, proxy to the real Room, which
    the gateway starts and supervises on ``127.0.0.1:ROOM_PORT``."""
    listen = ["--host", "0.0.0.0", "--port", str(internal_port)]
    if runtime_kind == "reference":
        return listen
    if runtime_kind != "quoroom":
        raise MachineConfigError(
            "runtime_kind", f"must be one of {', '.join(RUNTIME_KINDS)}, got {runtime_kind!r}"
        )
    if internal_port == ROOM_PORT:
        raise MachineConfigError("internal_port", f"{ROOM_PORT} is the Room's own port")
    upstream = f"http://127.0.0.1:{ROOM_PORT}"
    room = [ROOM_NODE, ROOM_CLI, "serve", "--port", str(ROOM_PORT)]
    return [*listen, "--upstream", upstream, "--", *room]


def build_machine_config(
    *,
    instance_id: str,
    owner_id: str,
    tier: TierLike,
    image: str,
    issuer: str,
    allowed_origins: Iterable[str],
    volume_id: str,
    jwks_url: str | None = None,
    internal_port: int = INTERNAL_PORT,
    concurrency: Concurrency | None = None,
    restart_max_retries: int = 10,
    check_interval: str = "15s",
    check_timeout: str = "5s",
    check_grace_period: str = "20s",
    stop_timeout: str = "30s",
    extra_env: Mapping[str, str] | None = None,
    extra_metadata: Mapping[str, str] | None = None,
    runtime_kind: str = "reference",
) -> dict[str, Any]:
    """The ``fly.MachineConfig`` for one Room runtime.

    ``image`` must be the image of ``runtime_kind`` (the ``quoroom`` target for ``quoroom``).
    The region is not part of a machine config: pass the *volume's* region to Create Machine
    (a volume pins its host: Kilo-Org/cloud#388).
    """
    check_image_reference(image)
    command = runtime_command(runtime_kind, internal_port)
    _check_guest(tier)
    if not owner_id or not str(owner_id).strip():
        raise MachineConfigError("owner_id", "is required")
    if not re.fullmatch(r"vol_[a-z0-9]+", volume_id or ""):
        raise MachineConfigError(
            "volume_id", f"must be a Fly volume id (vol_...), got {volume_id!r}"
        )
    if not 1 <= internal_port <= 65535:
        raise MachineConfigError("internal_port", "must be a TCP port")
    if internal_port == METRICS_PORT:
        raise MachineConfigError("internal_port", f"{METRICS_PORT} is the metrics port")
    if restart_max_retries < 0:
        raise MachineConfigError("restart_max_retries", "must not be negative")
    limits = concurrency or Concurrency()
    env = runtime_env(
        instance_id=instance_id,
        issuer=issuer,
        allowed_origins=allowed_origins,
        jwks_url=jwks_url,
        internal_port=internal_port,
        extra=extra_env,
    )
    metadata = {
        METADATA_INSTANCE_ID: instance_id,
        METADATA_OWNER_ID: str(owner_id),
        METADATA_MANAGED_BY: MANAGED_BY,
        METADATA_RUNTIME_KIND: runtime_kind,
    }
    for key, value in (extra_metadata or {}).items():
        if key in metadata:
            raise MachineConfigError("extra_metadata", f"{key} is set by the builder")
        metadata[key] = str(value)
    http_check = {
        "type": "http",
        "protocol": "http",
        "method": "GET",
        "port": internal_port,
        "path": HEALTH_PATH,
        "interval": check_interval,
        "timeout": check_timeout,
        "grace_period": check_grace_period,
    }
    return {
        "image": image,
        "guest": {"cpu_kind": tier.cpu_kind, "cpus": tier.cpus, "memory_mb": tier.memory_mb},
        "env": env,
        # Override the image's CMD so the listening port always equals internal_port, even
        # when a non-default port is configured here.
        "init": {"cmd": command},
        "services": [
            {
                "protocol": "tcp",
                "internal_port": internal_port,
                # A paid Room runs its agents in the background: never stop it for being idle.
                "autostop": "off",
                "autostart": True,
                "min_machines_running": 1,
                "ports": [
                    {"port": 80, "handlers": ["http"], "force_https": True},
                    {"port": 443, "handlers": ["tls", "http"]},
                ],
                "concurrency": {
                    "type": limits.type,
                    "soft_limit": limits.soft_limit,
                    "hard_limit": limits.hard_limit,
                },
                # Service checks gate the proxy's routing to this machine.
                "checks": [dict(http_check)],
            }
        ],
        # Top-level checks are what the Machines API reports in ``machine.checks``; the rolling
        # update waits on them because ``started`` is not ready (PITFALLS.md).
        "checks": {"healthz": dict(http_check)},
        "mounts": [{"volume": volume_id, "path": DATA_DIR}],
        "restart": {"policy": "on-failure", "max_retries": restart_max_retries},
        # SIGTERM, then time for the server (granian for serve, uvicorn for the gateway) to finish
        # requests and SQLite to checkpoint.
        "stop_config": {"signal": "SIGTERM", "timeout": stop_timeout},
        "metrics": {"port": METRICS_PORT, "path": METRICS_PATH},
        "metadata": metadata,
    }


# ---------------------------------------------------------------------------- validation


def _check_guest(tier: TierLike) -> None:
    if tier.cpu_kind not in _CPU_KINDS:
        raise MachineConfigError("tier", f"cpu_kind must be one of {_CPU_KINDS}")
    if tier.cpus not in _CPU_COUNTS:
        raise MachineConfigError("tier", f"cpus must be one of {_CPU_COUNTS}")
    if tier.memory_mb < 256 or tier.memory_mb % 256:
        raise MachineConfigError("tier", "memory_mb must be a multiple of 256, at least 256")
    # Fly's memory bounds per CPU: shared 256 MB..2 GB, performance 2 GB..8 GB.
    low, high = (256, 2048) if tier.cpu_kind == "shared" else (2048, 8192)
    if not low * tier.cpus <= tier.memory_mb <= high * tier.cpus:
        raise MachineConfigError(
            "tier",
            f"{tier.cpu_kind} with {tier.cpus} CPU(s) takes {low * tier.cpus}.."
            f"{high * tier.cpus} MB, got {tier.memory_mb}",
        )


def _check_instance_id(instance_id: str) -> None:
    if not isinstance(instance_id, str) or not _INSTANCE_ID_RE.match(instance_id):
        raise MachineConfigError(
            "instance_id", f"must be 1-64 letters, digits, '-' or '_', got {instance_id!r}"
        )


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_url(field: str, value: str) -> None:
    parts = urlsplit(value or "")
    if parts.scheme == "http" and _is_loopback(parts.hostname):
        return  # development and tests on one machine
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
        raise MachineConfigError(field, f"must be an https URL (http only on loopback): {value!r}")


def _check_origins(origins: Iterable[str]) -> list[str]:
    if isinstance(origins, str):
        raise MachineConfigError("allowed_origins", "pass a list of origins, not one string")
    out: list[str] = []
    for origin in origins:
        parts = urlsplit(origin)
        exact = f"{parts.scheme}://{parts.netloc}"
        if (
            origin != exact
            or "," in origin
            or "*" in origin
            or not parts.hostname
            or parts.scheme not in ("https", "http")
            or (parts.scheme == "http" and not _is_loopback(parts.hostname))
        ):
            raise MachineConfigError(
                "allowed_origins",
                f"each must be an exact https origin like https://app.quoroom.ai, got {origin!r}",
            )
        if origin not in out:
            out.append(origin)
    if not out:
        raise MachineConfigError("allowed_origins", "at least one origin is required")
    return out
