"""The one interface the provisioning worker drives (DESIGN.md "Providers").

A provider holds, per instance, an *app* (a namespace: a Fly app, or a directory for the local
provider), a *volume* (the Room's data), and a *machine* (the running runtime). Every method is
idempotent by deterministic names, so the worker can call it again after a crash, a lost reply or a
retry without creating a second resource:

- :meth:`Provider.ensure_app` finds or creates the app named :func:`app_name` for the instance;
- :meth:`Provider.ensure_volume` / :meth:`Provider.ensure_machine` take the id the worker persisted
  last time (or ``None``) and look the resource up by name / metadata before creating one — a
  create whose reply was lost is found, never repeated blindly;
- every id is returned so the worker persists it right after the create.

Backups: :meth:`Provider.snapshot_volume` (before a destroy), :meth:`Provider.list_snapshots` and
:meth:`Provider.restore_volume` (``quoroom-cloud ops restore``, run by the worker).

Errors are :class:`ProviderError`; ``retryable`` tells the worker whether to back off and try again
(5xx, capacity, timeouts, lost replies) or to fail the instance with the message (bad request,
authentication, a configuration the provider refuses). Messages never carry tokens or secrets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from control_plane.runtime_kinds import DEFAULT_RUNTIME_KIND, RuntimeKind

__all__ = [
    "APP_PREFIX",
    "InstanceSpec",
    "MachineInfo",
    "OwnedApp",
    "Provider",
    "ProviderError",
    "SnapshotInfo",
    "VolumeInfo",
    "app_name",
    "credential_env",
    "instance_id_from_app",
    "machine_name",
]

#: Default prefix of the apps this control plane owns (``QUOROOM_CP_APP_PREFIX``). Two
#: deployments sharing one Fly organization must use different prefixes, or each would sweep
#: the other's apps as orphans.
APP_PREFIX = "qr"
_APP_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def app_name(instance_id: str, prefix: str = APP_PREFIX) -> str:
    """The deterministic app name of an instance: ``<prefix>-<instance id>``.

    The whole id (not a short prefix of it) is used: Fly app names are global, and the name
    alone must map back to the instance for the orphan sweep (:func:`instance_id_from_app`)
    even when the worker died before persisting it.
    """
    name = f"{prefix}-{instance_id.lower()}"
    if not _APP_RE.match(name):
        raise ValueError(f"instance id {instance_id!r} does not make a valid app name")
    return name


def instance_id_from_app(name: str, prefix: str = APP_PREFIX) -> str | None:
    """The instance id an app name was made from, or ``None`` if the app is not ours."""
    head = f"{prefix}-"
    if not name.startswith(head) or len(name) == len(head):
        return None
    return name[len(head) :]


def credential_env(credentials: Mapping[str, str]) -> dict[str, str]:
    """Owner credentials ``{provider: api_key}`` as the runtime's environment:
    ``anthropic`` → ``ANTHROPIC_API_KEY`` (the name each provider's SDK reads)."""
    return {f"{name.upper().replace('-', '_')}_API_KEY": key for name, key in credentials.items()}


def machine_name(instance_id: str) -> str:
    """The deterministic machine name of an instance (unique within its app)."""
    return f"room-{instance_id.lower()}"[:63]


class ProviderError(Exception):
    """A provider operation failed.

    ``retryable``: the same call may succeed later (5xx, 409/412 capacity, timeouts, a lost
    reply). ``step`` names the operation (``app``, ``volume``, ``machine``...). ``str()`` is
    safe to store in ``cloud_instances.error`` and show to the owner.
    """

    def __init__(self, message: str, *, retryable: bool, step: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.step = step


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """What a provider needs to know about one instance (built by the worker from the row)."""

    instance_id: str
    owner_id: str
    region: str
    cpu_kind: str
    cpus: int
    memory_mb: int
    volume_gb: int
    runtime_kind: RuntimeKind = DEFAULT_RUNTIME_KIND
    #: What :meth:`Provider.set_secrets` answered last (persisted on the instance), or ``None``.
    secrets_version: int | None = None


@dataclass(frozen=True, slots=True)
class VolumeInfo:
    id: str
    region: str


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """A snapshot of one of the instance's volumes. ``created_at`` is ISO 8601 (UTC), so
    snapshots sort by it; ``volume_size_gb`` is the size a volume restored from it needs."""

    id: str
    volume_id: str
    created_at: str | None = None
    status: str | None = None
    size_bytes: int | None = None
    volume_size_gb: int | None = None
    region: str | None = None


@dataclass(frozen=True, slots=True)
class MachineInfo:
    """A machine as the provider sees it. ``state`` is the provider's word (``started``,
    ``stopped``...); ``url`` is where the runtime answers once healthy."""

    id: str
    state: str
    url: str | None = None
    image: str | None = None


@dataclass(frozen=True, slots=True)
class OwnedApp:
    """An app tagged as ours on the provider (for the orphan sweep)."""

    app: str
    instance_id: str


@runtime_checkable
class Provider(Protocol):
    """Create, run and wind down the resources of one Room. Every method is idempotent."""

    name: str

    async def ensure_app(self, spec: InstanceSpec) -> str:
        """Find or create the instance's app (and its public addresses); return its name."""
        ...

    async def set_secrets(
        self, spec: InstanceSpec, app: str, values: Mapping[str, str]
    ) -> int | None:
        """Hand ``values`` (decrypted provider credentials) to the runtime as secrets.

        Returns the provider's secrets version, if it has one: the worker persists it and
        passes it back as :attr:`InstanceSpec.secrets_version`."""
        ...

    async def ensure_volume(
        self, spec: InstanceSpec, app: str, volume_id: str | None
    ) -> VolumeInfo:
        """The instance's data volume: ``volume_id`` if it still exists, else found by name,
        else created."""
        ...

    async def find_machine(self, app: str, instance_id: str) -> MachineInfo | None:
        """The instance's machine found by its tags (metadata), whatever id was persisted."""
        ...

    async def ensure_machine(
        self, spec: InstanceSpec, app: str, volume: VolumeInfo, machine_id: str | None
    ) -> MachineInfo:
        """The instance's machine: ``machine_id`` if it still exists, else found by metadata,
        else created (in the volume's region, mounting it)."""
        ...

    async def wait_healthy(self, spec: InstanceSpec, app: str, machine_id: str) -> MachineInfo:
        """Wait until the runtime answers its health check; the reply carries the URL."""
        ...

    async def machine(self, app: str, machine_id: str) -> MachineInfo | None:
        """The machine's current state, or ``None`` if it (or its app) no longer exists."""
        ...

    async def stop(self, app: str, machine_id: str) -> None:
        """Stop the machine (no-op if already stopped or gone)."""
        ...

    async def start(self, app: str, machine_id: str) -> None:
        """Start a stopped machine (no-op if already started)."""
        ...

    async def snapshot_volume(self, app: str, volume_id: str) -> str:
        """Snapshot the volume; return the snapshot id. It must outlive the machine, and live
        until :meth:`destroy` (Fly deletes snapshots with their app: memoetapp/memoet#57)."""
        ...

    async def list_snapshots(self, app: str) -> list[SnapshotInfo]:
        """Every snapshot the provider keeps of the app's volumes (taken before a destroy or on
        the provider's schedule), oldest first; empty if the app is gone."""
        ...

    async def restore_volume(
        self, spec: InstanceSpec, app: str, snapshot_id: str, machine_id: str | None, key: str
    ) -> VolumeInfo:
        """Put the data of ``snapshot_id`` on the volume the instance's next machine mounts.

        The instance's machine (``machine_id``, or found by metadata) is stopped or removed
        first, so the worker's machine step starts one on the restored volume. The data being
        replaced is kept (on Fly the old volume stays; locally it becomes a snapshot).
        Idempotent per ``key`` (one per restore request): a repeated call after a crash or a
        lost reply finds what the first one made. A snapshot that does not exist is a
        ``ProviderError`` that is not retryable."""
        ...

    async def destroy(self, app: str) -> None:
        """Destroy the app and everything in it (no-op if already gone)."""
        ...

    async def list_owned(self) -> list[OwnedApp]:
        """Every app on the provider tagged as this control plane's."""
        ...

    async def aclose(self) -> None:
        """Release clients (and, for the local provider, stop the runtimes it started)."""
        ...
