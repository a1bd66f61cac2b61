"""The local provider keeps each Room's files private to the user (issue 12, item 9): the
instances and snapshots folders are 0700, the owner's credentials 0600 — also when a stale
temporary file with a wider mode was left behind by a crash."""

from __future__ import annotations

import stat
from pathlib import Path

from control_plane.provisioning.local import LocalProvider
from control_plane.provisioning.provider import InstanceSpec

SPEC = InstanceSpec(
    instance_id="0b6a3a52-1111-4222-8333-944445555666",
    owner_id="owner",
    region="local",
    cpu_kind="shared",
    cpus=1,
    memory_mb=256,
    volume_gb=1,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_instance_folders_and_secret_files_are_private(tmp_path: Path) -> None:
    provider = LocalProvider(var_dir=tmp_path, issuer="http://cp.test", allowed_origins=[])
    try:
        app = await provider.ensure_app(SPEC)
        folder = provider.root / SPEC.instance_id
        # A crash left a world-readable temporary file where the secrets are written.
        stale = folder / ".secrets.json.tmp"
        stale.write_text("{}")
        stale.chmod(0o644)
        await provider.set_secrets(SPEC, app, {"OPENAI_API_KEY": "sk-secret"})
        await provider.ensure_volume(SPEC, app, None)
        snapshot = await provider.snapshot_volume(app, "vol")
    finally:
        await provider.aclose()
    assert _mode(provider.root) == 0o700
    assert _mode(folder) == 0o700
    assert _mode(folder / "secrets.json") == 0o600
    assert _mode(provider.snapshots) == 0o700
    assert (provider.snapshots / snapshot).exists()
    for path in folder.rglob("*"):
        if path.is_file():
            assert _mode(path) & 0o077 == 0 or path.name == "app.json", path
