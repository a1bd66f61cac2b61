"""The local provider for real: ``quoroom-runtime serve`` subprocesses on loopback ports, found
again after a control-plane restart through their state files, stopped and destroyed without
leaving a process behind."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane.db import transaction
from control_plane.instances.lifecycle import transition
from control_plane.instances.models import InstanceStatus
from control_plane.provisioning.local import LocalProvider, _pid_running
from control_plane.provisioning.provider import InstanceSpec, ProviderError
from control_plane.provisioning.reconciler import Reconciler
from control_plane.settings import Settings

from .conftest import drive, event_kinds, get_instance, make_instance

S = InstanceStatus
ISSUER = "http://127.0.0.1:9"  # nothing listens: /healthz needs no JWKS
pytestmark = pytest.mark.slow


@pytest.fixture
def local_settings(make_settings: Callable[..., Settings], tmp_path: Path) -> Settings:
    return make_settings(
        provider="local", public_url=ISSUER, var_dir=tmp_path / "var", retention_days=7
    )


def new_provider(settings: Settings, **kw: Any) -> LocalProvider:
    return LocalProvider.from_settings(settings, health_timeout=30.0, **kw)


def runtimes_under(root: Path) -> list[int]:
    """Live runtime processes whose working directory is under ``root``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = os.readlink(proc / "cwd")
            argv = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"room_cloud_runtime.cli" in argv and cwd.startswith(str(root)):
            if _pid_running(int(proc.name)):
                found.append(int(proc.name))
    return found


@pytest.fixture
async def local(local_settings: Settings) -> AsyncIterator[LocalProvider]:
    provider = new_provider(local_settings)
    yield provider
    await provider.aclose()
    assert runtimes_under(local_settings.var_dir) == []  # no process left behind


def state_of(settings: Settings, instance_id: str) -> dict[str, Any]:
    path = settings.var_dir / "instances" / instance_id / "runtime.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


async def provisioned(make_worker, local, local_settings, factory, clock, **kw: Any) -> str:
    iid = await make_instance(factory, clock)
    worker = make_worker(local, settings=local_settings, **kw)
    inst = await drive(worker, clock, factory, iid)
    assert inst.status == "running", (inst.error, await event_kinds(factory, iid))
    return iid


async def test_the_local_provider_runs_a_real_runtime_in_cloud_mode_that_answers_healthz(
    make_worker, local, local_settings, factory, clock, monkeypatch
):
    monkeypatch.setenv("QUOROOM_CP_SECRET_KEY", "control-plane-secret-that-must-not-leak")
    iid = await provisioned(
        make_worker,
        local,
        local_settings,
        factory,
        clock,
        credentials=lambda inst: {"anthropic": "sk-ant-local"},
    )
    inst = await get_instance(factory, iid)
    state = state_of(local_settings, iid)

    assert inst.url == f"http://127.0.0.1:{state['port']}"
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{inst.url}/healthz")).status_code == 200
        status = (await client.get(f"{inst.url}/api/status")).json()
    assert status["deploymentMode"] == "cloud"
    environ = Path(f"/proc/{state['pid']}/environ").read_bytes().split(b"\0")
    assert b"ANTHROPIC_API_KEY=sk-ant-local" in environ
    assert f"QUOROOM_CLOUD_ISSUER={ISSUER}".encode() in environ
    assert f"QUOROOM_CLOUD_JWKS_URL={ISSUER}/.well-known/jwks.json".encode() in environ
    assert not any(e.startswith(b"QUOROOM_CP_") for e in environ)  # no control-plane secret
    instance_dir = local_settings.var_dir / "instances" / iid
    assert (instance_dir / "data").is_dir()
    assert (instance_dir / "runtime.log").stat().st_size > 0
    assert oct((instance_dir / "secrets.json").stat().st_mode & 0o777) == "0o600"


async def test_a_restarted_control_plane_finds_its_runtimes_and_can_stop_and_destroy_them(
    make_worker, local, local_settings, factory, clock
):
    iid = await provisioned(make_worker, local, local_settings, factory, clock)
    inst = await get_instance(factory, iid)
    pid = state_of(local_settings, iid)["pid"]

    restarted = new_provider(local_settings)  # a new process: nothing in memory
    try:
        assert [o.instance_id for o in await restarted.list_owned()] == [iid]
        assert (await restarted.machine(inst.fly_app, inst.machine_id)).state == "started"
        report = await Reconciler(local_settings, factory, restarted, clock=clock).run_once()
        assert (report.orphans_destroyed, report.reprovisioned, report.restarted) == ([], [], [])

        await restarted.stop(inst.fly_app, inst.machine_id)
        assert not _pid_running(pid)
        assert (await restarted.machine(inst.fly_app, inst.machine_id)).state == "stopped"

        await restarted.destroy(inst.fly_app)
        assert await restarted.list_owned() == []
        assert not (local_settings.var_dir / "instances" / iid).exists()
        assert await restarted.machine(inst.fly_app, inst.machine_id) is None
    finally:
        await restarted.aclose()


async def test_closing_the_provider_stops_its_runtimes_and_the_next_start_brings_them_back(
    make_worker, local, local_settings, factory, clock
):
    iid = await provisioned(make_worker, local, local_settings, factory, clock)
    pid = state_of(local_settings, iid)["pid"]

    await local.aclose()  # Ctrl-C on `quoroom-cloud dev`
    assert not _pid_running(pid)

    again = new_provider(local_settings)
    try:
        report = await Reconciler(local_settings, factory, again, clock=clock).run_once()
        assert report.restarted == [iid]
        inst = await get_instance(factory, iid)
        await again.wait_healthy(None, inst.fly_app, inst.machine_id)  # type: ignore[arg-type]
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{inst.url}/healthz")).status_code == 200
    finally:
        await again.aclose()
    assert not _pid_running(state_of(local_settings, iid).get("pid") or 0)


async def test_cancel_with_the_local_provider_snapshots_the_data_then_destroys_everything(
    make_worker, local, local_settings, factory, clock
):
    iid = await provisioned(make_worker, local, local_settings, factory, clock)
    pid = state_of(local_settings, iid)["pid"]
    data = local_settings.var_dir / "instances" / iid / "data"
    (data / "room.json").write_text("{}")
    async with transaction(factory) as session:
        await transition(
            session,
            iid,
            expected=[S.RUNNING],
            to=S.CANCELED,
            message="canceled",
            run_after=clock.now,
        )
    worker = make_worker(local, settings=local_settings)

    inst = await drive(worker, clock, factory, iid, until=frozenset({"destroying"}))
    assert not _pid_running(pid)
    snapshot = local_settings.var_dir / "snapshots" / inst.snapshot_id
    assert (snapshot / "room.json").read_text() == "{}"

    clock.advance(timedelta(days=7).total_seconds())
    inst = await drive(worker, clock, factory, iid)
    assert inst.status == "destroyed"
    assert not (local_settings.var_dir / "instances" / iid).exists()
    assert list((local_settings.var_dir / "snapshots").iterdir()) == []
    assert local.children == {}


async def test_a_runtime_that_exits_at_start_is_a_retryable_health_failure(local_settings):
    provider = new_provider(local_settings, python="/bin/false")
    spec = InstanceSpec("0f0e0d0c-aaaa-bbbb-cccc-000000000001", "o", "iad", "shared", 1, 1024, 1)
    try:
        app = await provider.ensure_app(spec)
        volume = await provider.ensure_volume(spec, app, None)
        machine = await provider.ensure_machine(spec, app, volume, None)
        with pytest.raises(ProviderError) as caught:
            await provider.wait_healthy(spec, app, machine.id)
        assert caught.value.retryable
        assert "exited" in str(caught.value)
    finally:
        await provider.aclose()


async def test_a_recorded_pid_that_is_not_our_runtime_is_never_trusted(local_settings, local):
    spec = InstanceSpec("0f0e0d0c-aaaa-bbbb-cccc-000000000002", "o", "iad", "shared", 1, 1024, 1)
    app = await local.ensure_app(spec)
    state = local_settings.var_dir / "instances" / spec.instance_id / "runtime.json"
    # A reused pid: alive, but this test process, not a runtime for this instance.
    payload = {"pid": os.getpid(), "port": 1, "instance_id": spec.instance_id}
    state.write_text(json.dumps(payload))

    assert (await local.machine(app, "rt")).state == "stopped"
    await local.stop(app, "rt")  # must not signal the test process
    assert _pid_running(os.getpid())


async def test_credentials_cannot_override_the_runtimes_trust_settings(local, local_settings):
    spec = InstanceSpec("0f0e0d0c-aaaa-bbbb-cccc-000000000003", "o", "iad", "shared", 1, 1024, 1)
    app = await local.ensure_app(spec)
    with pytest.raises(ProviderError) as caught:
        await local.set_secrets(spec, app, {"QUOROOM_CLOUD_ISSUER": "https://evil.example"})
    assert not caught.value.retryable


def test_a_process_that_exits_while_its_stat_is_read_is_not_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The race seen in a CI run: os.kill(pid, 0) succeeds, then the process exits and reading
    # /proc/<pid>/stat fails with ESRCH (ProcessLookupError), which stop() must take as "gone".
    from pathlib import Path

    from control_plane.provisioning.local import _pid_running

    def vanished(self: Path, *args: object, **kwargs: object) -> str:
        raise ProcessLookupError(3, "No such process")

    monkeypatch.setattr(Path, "read_text", vanished)
    assert _pid_running(os.getpid()) is False
