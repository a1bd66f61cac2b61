"""The ``fly`` provider: one Fly app per instance over :class:`FlyMachinesClient`.

Per instance: app ``<prefix>-<instance id>`` (Create App with an ``idempotency_key``; a
``name_taken`` owned by our org is adopted), a shared IPv4 and an IPv6 (listed before allocating),
app secrets (the owner's provider credentials), a volume named ``data`` created with the machine's
guest as ``compute`` hints, and one machine in *the volume's* region mounting it (a volume pins its
host: Kilo-Org/cloud#388) with the config from :func:`fly_image.config.build_machine_config` — the
image pinned by digest, issuer and JWKS URL pointing at this control plane. The image follows the
instance's runtime kind: ``RUNTIME_IMAGE`` for ``reference``, ``QUOROOM_RUNTIME_IMAGE`` (the
gateway in front of the real Room) for ``quoroom``.

No create is ever repeated blindly (PITFALLS.md): before creating a volume the app's volumes are
listed by name, before creating a machine the app's machines are listed by the instance's
metadata, so a create whose reply was lost is found and adopted instead of doubled. Fly keeps a
volume's snapshots only as long as the app (memoetapp/memoet#57): the app is destroyed only when
the retention period ends.

Backups: every volume is created with Fly's automatic daily snapshots on and
``snapshot_retention`` = ``SNAPSHOT_RETENTION_DAYS`` (a volume adopted with other values is
updated); :meth:`FlyProvider.snapshot_volume` adds one before a destroy. A restore
(:meth:`FlyProvider.restore_volume`) removes the instance's machine and creates a new volume from
the snapshot (named from the restore's key, so a lost reply is found, never doubled); the old
volume is kept, unattached, for the operator to delete once the restore is confirmed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx

from control_plane.instances.access_log import REPORT_KEY_ENV
from control_plane.provisioning.fly_api import (
    DEFAULT_BASE_URL,
    FlyCapacity,
    FlyConflict,
    FlyError,
    FlyMachine,
    FlyMachinesClient,
    FlyNotFound,
    FlyProtocolError,
    FlyRateLimited,
    FlyServerError,
    FlyTimeout,
    FlyUnavailable,
    FlyUnhealthy,
    FlyVolume,
)
from control_plane.provisioning.provider import (
    APP_PREFIX,
    InstanceSpec,
    MachineInfo,
    OwnedApp,
    ProviderError,
    SnapshotInfo,
    VolumeInfo,
    app_name,
    instance_id_from_app,
    machine_name,
)
from control_plane.settings import Settings, SettingsError
from fly_image.config import (
    METADATA_INSTANCE_ID,
    MachineConfigError,
    build_machine_config,
    check_image_reference,
)

__all__ = ["VOLUME_NAME", "FlyProvider", "check_secret_names", "restored_volume_name"]

logger = logging.getLogger(__name__)

VOLUME_NAME = "data"
_GIB = 1024**3
_GONE = frozenset({"destroyed", "destroying"})
_STOPPED = frozenset({"stopped", "suspended"})
#: Transient failures: the same call may succeed later (the worker backs off and retries).
_RETRYABLE: tuple[type[FlyError], ...] = (
    FlyServerError,
    FlyTimeout,
    FlyUnavailable,
    FlyRateLimited,
    FlyCapacity,
    FlyConflict,
    FlyUnhealthy,
    FlyProtocolError,
)
_SECRET_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")
#: Names the runtime's trust rests on (issuer, JWKS, origins, instance id) or Fly sets itself:
#: an owner-supplied credential must never override them.
_RESERVED_PREFIXES = ("QUOROOM_", "FLY_")
_RESERVED_NAMES = frozenset({"PORT", "PATH", "HOME", "PYTHONPATH", "LD_PRELOAD"})
#: Secrets the control plane itself sets (never an owner's: theirs all end in ``_API_KEY``).
_CONTROL_PLANE_SECRETS = frozenset({REPORT_KEY_ENV})


def restored_volume_name(key: str) -> str:
    """The name of the volume a restore creates: deterministic per restore request (``key``),
    so a create whose reply was lost is found by name; a later restore gets another name."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return f"{VOLUME_NAME}_r{digest}"  # Fly volume names: [a-z0-9_], at most 30


def check_secret_names(values: Mapping[str, str]) -> None:
    """Refuse credential names that are not env names or that would override runtime settings."""
    for key in values:
        if not _SECRET_NAME.match(key):
            raise ProviderError(
                f"secrets: {key!r} is not an environment variable name",
                retryable=False,
                step="secrets",
            )
        if key in _CONTROL_PLANE_SECRETS:
            continue
        if key.startswith(_RESERVED_PREFIXES) or key in _RESERVED_NAMES:
            raise ProviderError(
                f"secrets: {key!r} is reserved for the runtime", retryable=False, step="secrets"
            )


@asynccontextmanager
async def _boundary(step: str) -> AsyncIterator[None]:
    """Translate client errors into :class:`ProviderError` (one place)."""
    try:
        yield
    except FlyError as exc:
        raise ProviderError(
            f"{step}: {exc}", retryable=isinstance(exc, _RETRYABLE), step=step
        ) from exc
    except MachineConfigError as exc:
        raise ProviderError(f"{step}: {exc}", retryable=False, step=step) from exc


class FlyProvider:
    """The Fly Machines provider (see the module docstring)."""

    name = "fly"

    def __init__(
        self,
        client: FlyMachinesClient,
        *,
        image: str | None,
        issuer: str,
        allowed_origins: Sequence[str],
        jwks_url: str | None = None,
        prefix: str = APP_PREFIX,
        app_domain: str = "fly.dev",
        ip_types: Sequence[str] = ("shared_v4", "v6"),
        wait_timeout: float = 180.0,
        health_timeout: float = 120.0,
        poll_interval: float = 1.0,
        owns_client: bool = True,
        quoroom_image: str | None = None,
        snapshot_retention: int = 5,
    ) -> None:
        # Each kind's image, pinned by digest; a kind without one cannot start new machines.
        self.image = check_image_reference(image) if image is not None else None
        self.quoroom_image = (
            check_image_reference(quoroom_image) if quoroom_image is not None else None
        )
        self._client = client
        self._issuer = issuer
        self._origins = list(allowed_origins)
        self._jwks_url = jwks_url
        self._prefix = prefix
        self._domain = app_domain
        self._ip_types = tuple(ip_types)
        self._wait_timeout = wait_timeout
        self._health_timeout = health_timeout
        self._poll = poll_interval
        self._owns_client = owns_client
        #: Days Fly keeps each daily snapshot of a Room's volume (the volume's setting).
        self.snapshot_retention = snapshot_retention

    @classmethod
    def from_settings(
        cls, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None, **kw: Any
    ) -> FlyProvider:
        """Build from :class:`control_plane.settings.Settings` (token, org, image, public URL)."""
        if settings.fly_api_token is None:
            raise SettingsError("QUOROOM_CP_FLY_API_TOKEN", "is required when PROVIDER=fly")
        if not settings.fly_org:
            raise SettingsError("QUOROOM_CP_FLY_ORG", "is required when PROVIDER=fly")
        kind = settings.runtime_kind
        images: dict[str, str | None] = {}
        # The image of the kind new instances get is required; the other one only if set (for
        # instances made before RUNTIME_KIND changed).
        for variable, name, setting, needed in (
            (
                "QUOROOM_CP_RUNTIME_IMAGE",
                "runtime_image",
                settings.runtime_image,
                kind == "reference",
            ),
            (
                "QUOROOM_CP_QUOROOM_RUNTIME_IMAGE",
                "quoroom_runtime_image",
                settings.quoroom_runtime_image,
                kind == "quoroom",
            ),
        ):
            value = setting or None
            if value is None and needed:
                raise SettingsError(
                    variable, f"is required when PROVIDER=fly and RUNTIME_KIND={kind}"
                )
            try:
                images[name] = check_image_reference(value) if value is not None else None
            except MachineConfigError as exc:
                raise SettingsError(variable, str(exc)) from exc
        client = FlyMachinesClient(
            settings.fly_api_token.get_secret_value(),
            org_slug=settings.fly_org,
            base_url=settings.fly_api_base_url or DEFAULT_BASE_URL,
            transport=transport,
        )
        return cls(
            client,
            image=images["runtime_image"],
            quoroom_image=images["quoroom_runtime_image"],
            issuer=settings.issuer,
            allowed_origins=[settings.public_origin],
            prefix=settings.app_prefix,
            snapshot_retention=settings.snapshot_retention_days,
            **kw,
        )

    def __repr__(self) -> str:
        return f"FlyProvider(client={self._client!r}, prefix={self._prefix!r})"

    def url_of(self, app: str) -> str:
        return f"https://{app}.{self._domain}"

    def image_for(self, runtime_kind: str) -> str:
        """The pinned image new machines of ``runtime_kind`` start from."""
        image = self.quoroom_image if runtime_kind == "quoroom" else self.image
        if image is None:
            variable = "QUOROOM_RUNTIME_IMAGE" if runtime_kind == "quoroom" else "RUNTIME_IMAGE"
            raise ProviderError(
                f"machine: QUOROOM_CP_{variable} is not set: no image for {runtime_kind} Rooms",
                retryable=False,
                step="machine",
            )
        return image

    # ---------------------------------------------------------------- app

    async def ensure_app(self, spec: InstanceSpec) -> str:
        name = app_name(spec.instance_id, self._prefix)
        async with _boundary("app"):
            # Create App honours idempotency_key: safe to resend; a name_taken is adopted only
            # when the app is in our organization (the client checks).
            await self._client.create_app(name, idempotency_key=f"quoroom-app-{spec.instance_id}")
        async with _boundary("ip"):
            # IP assignment has no idempotency key: list first, allocate only what is missing.
            ips = await self._client.list_ips(name)
            have = {"shared_v4" if ip.shared else ("v6" if ":" in ip.ip else "v4") for ip in ips}
            for ip_type in self._ip_types:
                if ip_type not in have:
                    await self._client.allocate_ip(name, ip_type=ip_type)
        return name

    async def set_secrets(
        self, spec: InstanceSpec, app: str, values: Mapping[str, str]
    ) -> int | None:
        """Set the app's secrets; the version returned is persisted by the worker (not kept
        here: a restarted worker must still create the machine with it)."""
        check_secret_names(values)
        if not values:
            return None
        async with _boundary("secrets"):
            return await self._client.set_secrets(app, values)

    # ---------------------------------------------------------------- volume

    async def ensure_volume(
        self, spec: InstanceSpec, app: str, volume_id: str | None
    ) -> VolumeInfo:
        async with _boundary("volume"):
            if volume_id:
                try:
                    known = await self._client.get_volume(app, volume_id)
                    if not _volume_gone(known.state):
                        await self._keep_daily_snapshots(app, known)
                        return VolumeInfo(known.id, known.region)
                except FlyNotFound:
                    pass
            # A create whose reply was lost is found here, never made twice.
            existing = [
                v
                for v in await self._client.list_volumes(app)
                if v.name == VOLUME_NAME and not _volume_gone(v.state)
            ]
            if existing:
                existing.sort(key=lambda v: v.id)
                if len(existing) > 1:
                    logger.warning("app %s has %d data volumes", app, len(existing))
                await self._keep_daily_snapshots(app, existing[0])
                return VolumeInfo(existing[0].id, existing[0].region)
            created = await self._client.create_volume(
                app,
                name=VOLUME_NAME,
                region=spec.region,
                size_gb=spec.volume_gb,
                # The volume pins its host: ask for one that can also run the machine.
                compute=_compute(spec),
                # Fly's scheduled backups: a snapshot a day, each kept this many days.
                snapshot_retention=self.snapshot_retention,
                auto_backup_enabled=True,
            )
            return VolumeInfo(created.id, created.region)

    async def _keep_daily_snapshots(self, app: str, volume: FlyVolume) -> None:
        """An adopted volume (made before the setting changed, or by hand) gets the configured
        daily snapshots. Best effort: the Room runs either way, so a refusal is logged."""
        if volume.snapshot_retention == self.snapshot_retention and (
            volume.auto_backup_enabled is not False
        ):
            return
        try:
            await self._client.update_volume(
                app,
                volume.id,
                snapshot_retention=self.snapshot_retention,
                auto_backup_enabled=True,
            )
        except FlyError as exc:
            logger.warning("volume %s: snapshot retention not updated: %s", volume.id, exc)

    # ---------------------------------------------------------------- machine

    async def _find_machines(self, app: str, instance_id: str) -> list[FlyMachine]:
        found = await self._client.list_machines(app, metadata={METADATA_INSTANCE_ID: instance_id})
        return sorted((m for m in found if m.state not in _GONE), key=lambda m: m.id)

    async def find_machine(self, app: str, instance_id: str) -> MachineInfo | None:
        async with _boundary("machine"):
            try:
                found = await self._find_machines(app, instance_id)
            except FlyNotFound:
                return None
        return self._info(app, found[0]) if found else None

    async def ensure_machine(
        self, spec: InstanceSpec, app: str, volume: VolumeInfo, machine_id: str | None
    ) -> MachineInfo:
        async with _boundary("machine"):
            if machine_id:
                try:
                    known = await self._client.get_machine(app, machine_id)
                    if known.state not in _GONE:
                        return await self._launched(app, known)
                except FlyNotFound:
                    pass
            found = await self._find_machines(app, spec.instance_id)
            if found:
                if len(found) > 1:
                    logger.warning("app %s has %d machines for one instance", app, len(found))
                return await self._launched(app, found[0])
            config = build_machine_config(
                instance_id=spec.instance_id,
                owner_id=spec.owner_id,
                tier=spec,
                image=self.image_for(spec.runtime_kind),
                runtime_kind=spec.runtime_kind,
                issuer=self._issuer,
                allowed_origins=[*self._origins, self.url_of(app)],
                jwks_url=self._jwks_url,
                volume_id=volume.id,
            )
            try:
                created = await self._client.create_machine(
                    app,
                    config=config,
                    region=volume.region,  # the volume's region, not the requested one
                    name=machine_name(spec.instance_id),
                    # The secrets set for this instance, never older (persisted version).
                    min_secrets_version=spec.secrets_version,
                )
            except FlyConflict:
                # The deterministic name exists already: a create we lost track of.
                again = await self._find_machines(app, spec.instance_id)
                if again:
                    return self._info(app, again[0])
                raise
            return self._info(app, created)

    async def _launched(self, app: str, machine: FlyMachine) -> MachineInfo:
        """An adopted machine that is stopped (crashed past its restart policy, or stopped
        before a retry) is started: waiting for health would otherwise never end."""
        if machine.state in _STOPPED:
            await self._client.start_machine(app, machine.id)
        return self._info(app, machine)

    def _info(self, app: str, machine: FlyMachine) -> MachineInfo:
        return MachineInfo(machine.id, machine.state, url=self.url_of(app), image=machine.image)

    async def wait_healthy(self, spec: InstanceSpec, app: str, machine_id: str) -> MachineInfo:
        async with _boundary("health"):
            # /wait answers 408 at its 60 s ceiling: the client loops; then the checks must pass
            # (started is not ready: PITFALLS.md).
            await self._client.wait(app, machine_id, "started", timeout_total=self._wait_timeout)
            machine = await self._client.wait_healthy(
                app, machine_id, timeout_total=self._health_timeout, poll_interval=self._poll
            )
            return self._info(app, machine)

    async def machine(self, app: str, machine_id: str) -> MachineInfo | None:
        async with _boundary("machine"):
            try:
                found = await self._client.get_machine(app, machine_id)
            except FlyNotFound:
                return None
            return None if found.state in _GONE else self._info(app, found)

    async def stop(self, app: str, machine_id: str) -> None:
        async with _boundary("stop"):
            try:
                machine = await self._client.get_machine(app, machine_id)
            except FlyNotFound:
                return
            if machine.state in _GONE or machine.state in _STOPPED:
                return
            await self._client.stop_machine(app, machine_id)
            # Waiting for "stopped" needs the version (superfly/flyctl#1751).
            await self._client.wait(
                app,
                machine_id,
                "stopped",
                version=machine.current_version,
                timeout_total=self._wait_timeout,
            )

    async def start(self, app: str, machine_id: str) -> None:
        async with _boundary("start"):
            machine = await self._client.get_machine(app, machine_id)
            if machine.state in ("started", "starting"):
                return
            await self._client.start_machine(app, machine_id)

    # ---------------------------------------------------------------- snapshots and teardown

    async def snapshot_volume(self, app: str, volume_id: str) -> str:
        async with _boundary("snapshot"):
            before = {s.id for s in await self._client.list_volume_snapshots(app, volume_id)}
            try:
                await self._client.create_volume_snapshot(app, volume_id)
            except (FlyUnavailable, FlyTimeout) as exc:
                if not exc.maybe_applied:
                    raise
                logger.info("snapshot of %s: reply lost (%s); looking it up", volume_id, exc)
            after = await self._client.list_volume_snapshots(app, volume_id)
            new = [s for s in after if s.id not in before]
            if not new:
                raise FlyServerError(
                    f"the snapshot of volume {volume_id} is not listed yet", method="GET"
                )
            new.sort(key=lambda s: (s.created_at or "", s.id))
            return new[-1].id

    async def list_snapshots(self, app: str) -> list[SnapshotInfo]:
        """The snapshots of every volume of the app (daily ones and those taken before a
        destroy), oldest first."""
        found: list[SnapshotInfo] = []
        async with _boundary("snapshot"):
            try:
                volumes = await self._client.list_volumes(app)
            except FlyNotFound:
                return []
            for volume in volumes:
                try:
                    snapshots = await self._client.list_volume_snapshots(app, volume.id)
                except FlyNotFound:
                    continue
                for snap in snapshots:
                    size_gb = (
                        math.ceil(snap.volume_size / _GIB) if snap.volume_size else volume.size_gb
                    )
                    found.append(
                        SnapshotInfo(
                            id=snap.id,
                            volume_id=volume.id,
                            created_at=snap.created_at,
                            status=snap.status,
                            size_bytes=snap.size,
                            volume_size_gb=size_gb,
                            region=volume.region,
                        )
                    )
        found.sort(key=lambda s: (s.created_at or "", s.id))
        return found

    async def restore_volume(
        self, spec: InstanceSpec, app: str, snapshot_id: str, machine_id: str | None, key: str
    ) -> VolumeInfo:
        snapshot = next((s for s in await self.list_snapshots(app) if s.id == snapshot_id), None)
        if snapshot is None:
            raise ProviderError(
                f"restore: snapshot {snapshot_id} does not exist in app {app}",
                retryable=False,
                step="restore",
            )
        name = restored_volume_name(key)
        async with _boundary("restore"):
            # The old machine mounts the old volume: it goes, and the machine step creates one
            # on the restored volume (found by metadata otherwise, and started on the old data).
            doomed = {m.id for m in await self._find_machines(app, spec.instance_id)}
            if machine_id:
                try:
                    known = await self._client.get_machine(app, machine_id)
                    if known.state not in _GONE:
                        doomed.add(known.id)
                except FlyNotFound:
                    pass
            for doomed_id in sorted(doomed):
                try:
                    await self._client.delete_machine(app, doomed_id, force=True)
                except FlyNotFound:
                    pass
            # A create whose reply was lost is found by its name, never made twice.
            for volume in await self._client.list_volumes(app):
                if volume.name == name and not _volume_gone(volume.state):
                    return VolumeInfo(volume.id, volume.region)
            created = await self._client.create_volume(
                app,
                name=name,
                # A snapshot restores in its volume's region, at least at its volume's size.
                region=snapshot.region or spec.region,
                size_gb=max(spec.volume_gb, snapshot.volume_size_gb or 0),
                compute=_compute(spec),
                snapshot_id=snapshot_id,
                snapshot_retention=self.snapshot_retention,
                auto_backup_enabled=True,
            )
            return VolumeInfo(created.id, created.region)

    async def destroy(self, app: str) -> None:
        async with _boundary("destroy"):
            try:
                await self._client.delete_app(app)
            except FlyNotFound:
                return

    async def list_owned(self) -> list[OwnedApp]:
        async with _boundary("list"):
            apps = await self._client.list_apps()
        owned = []
        for app in apps:
            instance_id = instance_id_from_app(app.name, self._prefix)
            if instance_id is not None:
                owned.append(OwnedApp(app.name, instance_id))
        return owned

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def _volume_gone(state: str) -> bool:
    return "destroy" in state


def _compute(spec: InstanceSpec) -> dict[str, Any]:
    """The machine's guest, sent with a volume create so its host can also run the machine."""
    return {"cpu_kind": spec.cpu_kind, "cpus": spec.cpus, "memory_mb": spec.memory_mb}
