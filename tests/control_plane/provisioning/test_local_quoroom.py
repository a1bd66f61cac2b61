"""The local provider and ``quoroom`` instances: the real (Node) Room behind
``quoroom-runtime gateway``, its command line and environment (HOME, npm's global prefix and
TMPDIR inside the instance's directory), the start-up checks that name what is missing (the
Room's cli.js, node ≥ 20), and — with a stand-in gateway and a stand-in Room on node — a process
spawned, found again by a restarted control plane, stopped and started without leaving anything."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane import cli
from control_plane.provisioning.local import (
    LocalProvider,
    _pid_running,
    _runtime_port,
    find_quoroom_room,
)
from control_plane.provisioning.provider import InstanceSpec, ProviderError
from control_plane.provisioning.runner import build_provider, check_provider_settings
from control_plane.settings import Settings, SettingsError

from .conftest import drive, get_instance, make_instance

HERE = Path(__file__).parent
ISSUER = "http://127.0.0.1:9"  # nothing listens: /healthz needs no JWKS
SPEC = InstanceSpec(
    "0f0e0d0c-aaaa-bbbb-cccc-0000000000a1", "o", "iad", "shared", 1, 1024, 1, "quoroom"
)


def fake_node(folder: Path, version: str) -> Path:
    """An executable ``node`` that only knows ``--version``."""
    folder.mkdir(parents=True, exist_ok=True)
    node = folder / "node"
    node.write_text(f"#!/bin/sh\necho {version}\n")
    node.chmod(0o755)
    return node


@pytest.fixture
def room_cli(tmp_path: Path) -> Path:
    path = tmp_path / "room" / "cli.js"
    path.parent.mkdir()
    shutil.copyfile(HERE / "fake_room.js", path)
    return path


@pytest.fixture
def quoroom_settings(
    make_settings: Callable[..., Settings], tmp_path: Path, room_cli: Path
) -> Settings:
    return make_settings(
        provider="local",
        public_url=ISSUER,
        var_dir=tmp_path / "var",
        runtime_kind="quoroom",
        quoroom_room_cli=room_cli,
    )


def processes_under(root: Path) -> list[int]:
    """Live processes (any program) whose working directory is under ``root``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if cwd.startswith(str(root)) and _pid_running(int(proc.name)):
            found.append(int(proc.name))
    return found


# -- start-up checks -----------------------------------------------------------------------------


def test_the_real_room_is_found_with_node_20_or_later(tmp_path: Path, room_cli: Path) -> None:
    node = fake_node(tmp_path / "bin", "v20.11.1")
    found = find_quoroom_room(str(room_cli), which=lambda _: str(node))
    assert found == (str(node), room_cli.resolve())
    newer = fake_node(tmp_path / "bin22", "v22.3.0")
    assert find_quoroom_room(room_cli, which=lambda _: str(newer))[0] == str(newer)


@pytest.mark.parametrize(
    ("cli_js", "version", "variable", "words"),
    [
        (None, "v20.11.1", "QUOROOM_CP_QUOROOM_ROOM_CLI", "is required"),
        ("  ", "v20.11.1", "QUOROOM_CP_QUOROOM_ROOM_CLI", "is required"),
        ("missing/cli.js", "v20.11.1", "QUOROOM_CP_QUOROOM_ROOM_CLI", "does not exist"),
        ("room", "v20.11.1", "QUOROOM_CP_QUOROOM_ROOM_CLI", "not a file"),  # a folder
        ("room/cli.js", None, "PATH", "node is not on PATH"),
        ("room/cli.js", "v18.19.0", "PATH", "node v18.19.0; the real Room needs node >= 20"),
        ("room/cli.js", "v9.0.0", "PATH", "needs node >= 20"),
        ("room/cli.js", "", "PATH", "(unknown version)"),
    ],
)
def test_a_missing_real_room_is_refused_naming_what_is_missing(
    tmp_path: Path,
    room_cli: Path,
    cli_js: str | None,
    version: str | None,
    variable: str,
    words: str,
) -> None:
    node = None if version is None else fake_node(tmp_path / "bin", version)
    where = None if cli_js is None else (cli_js if not cli_js.strip() else tmp_path / cli_js)
    with pytest.raises(SettingsError) as caught:
        find_quoroom_room(where, which=lambda _: None if node is None else str(node))
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable}: ")
    assert words in str(caught.value)


def test_the_provider_refuses_to_start_for_quoroom_without_the_real_room(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(provider="local", var_dir=tmp_path / "var", runtime_kind="quoroom")
    with pytest.raises(SettingsError) as caught:
        build_provider(settings)
    assert caught.value.variable == "QUOROOM_CP_QUOROOM_ROOM_CLI"
    with pytest.raises(SettingsError):
        check_provider_settings(settings)
    gone = settings.model_copy(update={"quoroom_room_cli": tmp_path / "nowhere" / "cli.js"})
    with pytest.raises(SettingsError, match="does not exist"):
        check_provider_settings(gone)
    # The reference kind needs none of it; Fly brings the Room in its image.
    check_provider_settings(settings.model_copy(update={"runtime_kind": "reference"}))
    check_provider_settings(settings.model_copy(update={"provider": "fly"}))


def test_quoroom_cloud_dev_stops_before_starting_anything_and_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QUOROOM_CP_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("QUOROOM_CP_RUNTIME_KIND", "quoroom")
    monkeypatch.delenv("QUOROOM_CP_QUOROOM_ROOM_CLI", raising=False)
    monkeypatch.delenv("QUOROOM_CP_ENV", raising=False)
    monkeypatch.delenv("QUOROOM_CP_PROVIDER", raising=False)
    assert cli.main(["dev", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "configuration error: QUOROOM_CP_QUOROOM_ROOM_CLI: is required" in err
    assert not (tmp_path / "var" / "control_plane.db").exists()  # not even migrated


# -- command line and environment ----------------------------------------------------------------


async def test_a_quoroom_instance_runs_the_gateway_with_the_room_as_its_command(
    quoroom_settings: Settings,
    room_cli: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = fake_node(tmp_path / "bin", "v20.11.1")
    monkeypatch.setenv("PATH", f"{node.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("HOME", "/home/operator")
    monkeypatch.setenv("TMPDIR", "/tmp/operator")
    provider = LocalProvider.from_settings(quoroom_settings, python="/opt/py")
    try:
        app = await provider.ensure_app(SPEC)
        await provider.ensure_volume(SPEC, app, None)
        argv, env = provider.command(app, SPEC.instance_id, "quoroom", 41000, 41001)
        reference_argv, reference_env = provider.command(
            app, SPEC.instance_id, "reference", 41000, None
        )
    finally:
        await provider.aclose()
    assert argv == [
        "/opt/py", "-m", "room_cloud_runtime.cli", "gateway",
        "--host", "127.0.0.1", "--port", "41000", "--upstream", "http://127.0.0.1:41001",
        "--", str(node), str(room_cli.resolve()), "serve", "--port", "41001",
    ]  # fmt: skip
    assert reference_argv == [
        "/opt/py", "-m", "room_cloud_runtime.cli", "serve", "--host", "127.0.0.1", "--port", "41000"
    ]  # fmt: skip
    base = (quoroom_settings.var_dir / "instances" / SPEC.instance_id).resolve()
    assert env["HOME"] == str(base / "home") and (base / "home").is_dir()
    assert env["npm_config_prefix"] == str(base / "npm") and (base / "npm" / "bin").is_dir()
    assert env["TMPDIR"] == str(base / "tmp") and (base / "tmp").is_dir()
    assert env["PATH"].split(os.pathsep)[0] == str(base / "npm" / "bin")
    assert env["PATH"].split(os.pathsep)[1:] == reference_env["PATH"].split(os.pathsep)
    # The same cloud environment as the reference runtime; nothing of the control plane's.
    moved = ("HOME", "npm_config_prefix", "TMPDIR", "PATH")
    assert {k: v for k, v in env.items() if k not in moved} == {
        k: v for k, v in reference_env.items() if k not in moved
    }
    assert env["QUOROOM_DEPLOYMENT_MODE"] == "cloud"
    assert env["QUOROOM_CLOUD_INSTANCE_ID"] == SPEC.instance_id
    assert env["QUOROOM_CLOUD_ISSUER"] == ISSUER
    assert env["QUOROOM_DATA_DIR"] == str(base / "data")
    assert not any(k.startswith("QUOROOM_CP_") for k in env)
    assert reference_env["HOME"] == "/home/operator"  # the reference runtime as before


async def test_an_older_quoroom_instance_without_the_real_room_fails_without_retrying(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """RUNTIME_KIND back at reference, QUOROOM_ROOM_CLI unset: a quoroom instance made earlier
    cannot start, and says why."""
    settings = make_settings(provider="local", public_url=ISSUER, var_dir=tmp_path / "var")
    provider = LocalProvider.from_settings(settings)
    try:
        app = await provider.ensure_app(SPEC)
        volume = await provider.ensure_volume(SPEC, app, None)
        with pytest.raises(ProviderError) as caught:
            await provider.ensure_machine(SPEC, app, volume, None)
    finally:
        await provider.aclose()
    assert not caught.value.retryable
    assert "QUOROOM_CP_QUOROOM_ROOM_CLI" in str(caught.value)


async def test_the_worker_hands_each_instance_its_own_kind(
    make_worker: Any, factory: Any, clock: Any
) -> None:
    worker = make_worker(None)
    made = await make_instance(factory, clock, runtime_kind="quoroom")
    quoroom = await get_instance(factory, made)
    older = await get_instance(factory, await make_instance(factory, clock))
    assert worker.spec(quoroom).runtime_kind == "quoroom"
    assert worker.spec(older).runtime_kind == "reference"
    quoroom.runtime_kind = "node"  # written by hand: refused, not guessed
    with pytest.raises(ProviderError) as caught:
        worker.spec(quoroom)
    assert not caught.value.retryable and "node" in str(caught.value)


@pytest.mark.parametrize(
    ("argv", "port"),
    [
        (["py", "-m", "room_cloud_runtime.cli", "serve", "--host", "h", "--port", "8"], b"8"),
        (
            ["py", "-m", "room_cloud_runtime.cli", "gateway", "--host", "h", "--port", "8",
             "--upstream", "http://127.0.0.1:9", "--", "node", "cli.js", "serve", "--port", "9"],
            b"8",
        ),  # the gateway's own port, not the Room's after "--"
        (["py", "fake.py", "-m", "room_cloud_runtime.cli", "gateway", "--port", "8"], b"8"),
        (["node", "cli.js", "serve", "--port", "8"], None),  # the Room itself is not the runtime
        (["py", "-m", "room_cloud_runtime.cli", "keys", "--port", "8"], None),
        (["py", "-m", "room_cloud_runtime.cli", "serve"], None),
        (["py", "-m", "room_cloud_runtime.cli", "serve", "--port", "8", "--port", "9"], None),
        (["x", "--", "py", "-m", "room_cloud_runtime.cli", "serve", "--port", "8"], None),
    ],
)  # fmt: skip
def test_the_identity_check_knows_serve_and_gateway_by_their_own_port(
    argv: list[str], port: bytes | None
) -> None:
    assert _runtime_port([a.encode() for a in argv]) == port


# -- for real: a stand-in gateway and a stand-in Room on node ------------------------------------


def _node_20() -> bool:
    node = shutil.which("node")
    if node is None:
        return False
    out = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout
    return out.startswith("v") and int(out[1:].split(".")[0]) >= 20


def _has_gateway() -> bool:
    from room_cloud_runtime.cli import build_parser

    return "gateway" in build_parser().format_help()


@pytest.fixture(params=["stand-in gateway", "quoroom-runtime gateway"])
def gateway_python(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The provider's "python": the real interpreter (so the real gateway runs), or the
    stand-in gateway script in its place (its argv stays the provider's)."""
    if request.param == "quoroom-runtime gateway":
        if not _has_gateway():
            pytest.skip("quoroom-runtime has no gateway command yet")
        return sys.executable
    script = tmp_path / "fake-gateway"
    source = (HERE / "fake_gateway.py").read_text()
    script.write_text(f"#!{sys.executable}\n{source}")
    script.chmod(0o755)
    return str(script)


@pytest.mark.slow
@pytest.mark.skipif(not _node_20(), reason="needs node >= 20 on PATH")
async def test_a_quoroom_instance_is_spawned_found_again_stopped_and_started(
    make_worker: Any,
    factory: Any,
    clock: Any,
    quoroom_settings: Settings,
    gateway_python: str,
) -> None:
    provider = LocalProvider.from_settings(
        quoroom_settings, health_timeout=30.0, python=gateway_python
    )
    root = quoroom_settings.var_dir
    try:
        iid = await make_instance(factory, clock, runtime_kind="quoroom")
        worker = make_worker(
            provider,
            settings=quoroom_settings,
            credentials=lambda inst: {"anthropic": "sk-ant-local"},
        )
        inst = await drive(worker, clock, factory, iid)
        assert inst.status == "running", inst.error
        base = (root / "instances" / iid).resolve()
        state = json.loads((base / "runtime.json").read_text())
        assert state["runtime_kind"] == "quoroom"
        port, upstream = state["port"], state["upstream_port"]
        assert inst.url == f"http://127.0.0.1:{port}" and upstream != port
        async with httpx.AsyncClient(trust_env=False) as http:
            assert (await http.get(f"{inst.url}/healthz")).status_code == 200
            seen = (await http.get(f"http://127.0.0.1:{upstream}/")).json()
        # What the Room sees: its folders inside the instance's, the cloud settings, the
        # owner's credentials, and what the gateway adds.
        assert seen["HOME"] == str(base / "home")
        assert seen["npm_config_prefix"] == str(base / "npm")
        assert seen["TMPDIR"] == str(base / "tmp")
        assert seen["PATH"].startswith(f"{base / 'npm' / 'bin'}{os.pathsep}")
        assert seen["QUOROOM_DATA_DIR"] == str(base / "data")
        assert seen["QUOROOM_DEPLOYMENT_MODE"] == "cloud"
        assert seen["QUOROOM_CLOUD_INSTANCE_ID"] == iid
        assert seen["QUOROOM_BIND_HOST"] == "127.0.0.1"
        assert seen["ANTHROPIC_API_KEY"] == "sk-ant-local"
        assert seen["argv"][-3:] == ["serve", "--port", str(upstream)]

        restarted = LocalProvider.from_settings(quoroom_settings, python=gateway_python)
        try:
            assert (await restarted.machine(inst.fly_app, inst.machine_id)).state == "started"
            await restarted.stop(inst.fly_app, inst.machine_id)
            assert processes_under(root) == []  # the gateway and the Room
            assert (await restarted.machine(inst.fly_app, inst.machine_id)).state == "stopped"
            await restarted.start(inst.fly_app, inst.machine_id)  # the kind comes from the state
            again = await restarted.wait_healthy(SPEC, inst.fly_app, inst.machine_id)
            assert again.state == "started"
            state = json.loads((base / "runtime.json").read_text())
            assert state["runtime_kind"] == "quoroom" and state["upstream_port"] != state["port"]
        finally:
            await restarted.aclose()
        assert processes_under(root) == []
    finally:
        await provider.aclose()
    assert processes_under(root) == []
