"""The Machines API's replies as small validated models: the fields we rely on are required;
everything else is ignored. The ``_``-prefixed ones are envelopes only the client reads."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from control_plane.provisioning.fly_api.errors import FlyProtocolError

__all__ = [
    "FlyApp",
    "FlyCheckStatus",
    "FlyIPAssignment",
    "FlyLease",
    "FlyMachine",
    "FlySnapshot",
    "FlyVolume",
    "FlyWaitResult",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Org(_Model):
    slug: str | None = None
    name: str | None = None


class FlyApp(_Model):
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    organization: _Org | None = None
    status: str | None = None

    @property
    def org_slug(self) -> str | None:
        return self.organization.slug if self.organization else None


class _CreateAppReply(_Model):
    id: str = Field(min_length=1)


class _AppList(_Model):
    apps: list[FlyApp] = Field(default_factory=list)
    next_cursor: str | None = None


class _SecretsReply(_Model):
    version: int


class FlyIPAssignment(_Model):
    ip: str = Field(min_length=1)
    region: str | None = None
    service_name: str | None = None
    shared: bool | None = None


class _IPList(_Model):
    ips: list[FlyIPAssignment] = Field(default_factory=list)


class FlyVolume(_Model):
    id: str = Field(min_length=1)
    name: str
    region: str = Field(min_length=1)
    size_gb: int
    state: str
    zone: str | None = None
    attached_machine_id: str | None = None
    encrypted: bool | None = None
    #: Days Fly keeps each of the volume's snapshots, and whether it takes one daily.
    snapshot_retention: int | None = None
    auto_backup_enabled: bool | None = None


class FlySnapshot(_Model):
    id: str = Field(min_length=1)
    status: str | None = None
    created_at: str | None = None
    size: int | None = None
    #: The size of the volume it was taken of, in bytes (a restore needs at least that much).
    volume_size: int | None = None
    retention_days: int | None = None


class FlyCheckStatus(_Model):
    name: str
    status: str
    output: str | None = None
    updated_at: str | None = None


class FlyMachine(_Model):
    id: str = Field(min_length=1)
    name: str | None = None
    state: str = Field(min_length=1)
    region: str | None = None
    version: str | None = None
    instance_id: str | None = None  # deprecated alias of ``version`` in the spec
    private_ip: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    checks: list[FlyCheckStatus] = Field(default_factory=list)
    created_at: str | None = None
    updated_at: str | None = None

    @property
    def current_version(self) -> str:
        """The machine version (``version``, or the deprecated ``instance_id``)."""
        value = self.version or self.instance_id
        if not value:  # both missing: _parse() refuses such replies, this is for the type checker
            raise FlyProtocolError("machine reply has no version")
        return value

    @property
    def metadata(self) -> dict[str, str]:
        raw = self.config.get("metadata") or {}
        return {str(k): str(v) for k, v in raw.items()}

    @property
    def image(self) -> str | None:
        image = self.config.get("image")
        return str(image) if image else None

    @property
    def healthy(self) -> bool:
        """Started and every check passing (``started`` alone is not ready: PITFALLS.md)."""
        return self.state == "started" and all(c.status == "passing" for c in self.checks)


class FlyWaitResult(_Model):
    ok: bool = True
    state: str | None = None
    version: str | None = None
    event_id: str | None = None


class FlyLease(_Model):
    nonce: str = Field(min_length=1)
    expires_at: int | None = None
    owner: str | None = None
    version: str | None = None


class _LeaseReply(_Model):
    # The Create Lease reply wraps the lease in ``data`` on the real API; accept both shapes.
    data: FlyLease | None = None
    nonce: str | None = None
    expires_at: int | None = None
    owner: str | None = None
    version: str | None = None


class _ErrorBody(_Model):
    error: str | None = None
    status: str | None = None
