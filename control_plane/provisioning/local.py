"""The ``local`` provider — the embedded default: each Room runtime is a local process.

``quoroom-runtime serve`` runs as a subprocess (``python -m room_cloud_runtime.cli serve --host
127.0.0.1 --port P``) in cloud mode, on a free loopback port, with its issuer and pinned JWKS URL
pointing at this control plane, so the whole flow (pay → provision → open the Room with a runtime
token) runs on one machine with no account anywhere.

An instance of runtime kind ``quoroom`` runs the real (Node) Room behind the gateway instead:
``python -m room_cloud_runtime.cli gateway --host 127.0.0.1 --port P --upstream
http://127.0.0.1:U -- node <QUOROOM_ROOM_CLI> serve --port U`` (U a second free loopback port),
same cloud environment, and ``HOME``, ``npm_config_prefix`` and ``TMPDIR`` inside the instance's
directory: the Room installs provider CLIs with ``npm install -g``, and nothing may land outside.

Layout under ``VAR_DIR``::

    instances/<instance id>/app.json      the "app": marks the directory as ours
    instances/<instance id>/data/         the "volume" (QUOROOM_DATA_DIR)
    instances/<instance id>/secrets.json  the owner's credentials, mode 0600
    instances/<instance id>/runtime.json  the "machine": pid, port, when it started
    instances/<instance id>/runtime.log   the runtime's output
    instances/<instance id>/home/, npm/, tmp/   HOME, npm's global prefix, TMPDIR (kind quoroom)
    instances/<instance id>/restore.json  the last restore (its key: a repeated call is a no-op)
    snapshots/<instance id>-<timestamp>/  copies of data/ taken on cancel, and the data a
                                          restore replaced

A restore (``quoroom-cloud ops restore``, run by the worker) stops the runtime, moves data/
aside as a new snapshot, copies the chosen snapshot into data/, and the worker's machine step
starts the runtime on it again.

The state files let a restarted control plane find the runtimes a previous one started (and the
reconciler sweep them both ways). A pid is only trusted if ``/proc`` shows it is a runtime serving
this instance on that port (pids are reused). Runtimes run in their own session so a Ctrl-C in
the terminal reaches the control plane only; :meth:`LocalProvider.aclose` stops the ones this
process started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from control_plane.db import private_dir
from control_plane.provisioning.fly import check_secret_names
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
)
from control_plane.runtime_kinds import DEFAULT_RUNTIME_KIND
from control_plane.settings import Settings, SettingsError
from room_cloud_runtime import ConfigError, load_settings

__all__ = ["MIN_NODE_MAJOR", "LocalProvider", "find_quoroom_room"]

logger = logging.getLogger(__name__)

VOLUME_ID = "data"
REGION = "local"
_STAMP_FORMAT = "%Y%m%dT%H%M%S%fZ"
_STAMP_RE = re.compile(r"^\d{8}T\d{12}Z$")
#: Environment passed through to the runtime. Nothing else is: the control plane's own
#: QUOROOM_CP_* secrets must never reach a Room.
_PASS_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "TZ")


#: The real Room's engines field (quoroom-room/README.md: node ≥ 20).
MIN_NODE_MAJOR = 20
_ROOM_CLI_VAR = "QUOROOM_CP_QUOROOM_ROOM_CLI"


def find_quoroom_room(
    cli: str | Path | None, *, which: Callable[[str], str | None] = shutil.which
) -> tuple[str, Path]:
    """``(node, cli.js)`` to run the real Room with, or :class:`SettingsError` naming what is
    missing: the ``QUOROOM_ROOM_CLI`` setting, its file, or ``node`` (≥ 20) on ``PATH``."""
    if cli is None or not str(cli).strip():
        raise SettingsError(
            _ROOM_CLI_VAR,
            "is required with RUNTIME_KIND=quoroom and PROVIDER=local: the path of the real "
            "Room's cli.js (the path ../shared/quoroom-room/install prints)",
        )
    path = Path(cli).expanduser().resolve()
    if not path.is_file():
        raise SettingsError(_ROOM_CLI_VAR, f"{path} does not exist (or is not a file)")
    node = which("node")
    if not node:
        raise SettingsError(
            "PATH", f"node is not on PATH; the real Room needs node >= {MIN_NODE_MAJOR}"
        )
    try:
        done = subprocess.run(  # noqa: S603 - node as found on PATH, a fixed argument
            [node, "--version"], capture_output=True, text=True, timeout=15, check=False
        )
        version = done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        version = ""
    match = re.fullmatch(r"v(\d+)\.\d+\.\d+\S*", version)
    if match is None or int(match.group(1)) < MIN_NODE_MAJOR:
        raise SettingsError(
            "PATH",
            f"{node} is node {version or '(unknown version)'}; "
            f"the real Room needs node >= {MIN_NODE_MAJOR}",
        )
    # An absolute path: the Room's PATH starts with its own npm prefix, where a package could
    # install another "node".
    return os.path.abspath(node), path


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _write_json(path: Path, data: Mapping[str, Any], *, mode: int = 0o644) -> None:
    """Atomic write (temp file + rename): a crash never leaves a half-written state file."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # a temporary file left by a crash keeps its old mode otherwise
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)
    os.replace(tmp, path)


def _open_private_log(path: Path) -> BinaryIO:
    """The runtime's log (it may echo what a Room prints), created 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class LocalProvider:
    """Runtimes as local processes (see the module docstring)."""

    name = "local"

    def __init__(
        self,
        *,
        var_dir: Path,
        issuer: str,
        allowed_origins: Sequence[str],
        jwks_url: str | None = None,
        prefix: str = APP_PREFIX,
        host: str = "127.0.0.1",
        health_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        python: str = sys.executable,
        extra_env: Mapping[str, str] | None = None,
        quoroom_room_cli: str | Path | None = None,
    ) -> None:
        self.root = Path(var_dir) / "instances"
        self.snapshots = Path(var_dir) / "snapshots"
        self._issuer = issuer.rstrip("/")
        self._jwks_url = jwks_url or f"{self._issuer}/.well-known/jwks.json"
        self._origins = list(allowed_origins)
        self._prefix = prefix
        self._host = host
        self._health_timeout = health_timeout
        self._stop_timeout = stop_timeout
        self._python = python
        self._extra_env = dict(extra_env or {})
        self._room_cli = quoroom_room_cli
        self._room: tuple[str, Path] | None = None  # (node, cli.js), found on first use
        # Runtimes this object started: waited on (no zombies) and stopped by aclose().
        self._children: dict[str, asyncio.subprocess.Process] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._http = httpx.AsyncClient(timeout=2.0, trust_env=False)

    @classmethod
    def from_settings(cls, settings: Settings, **kw: Any) -> LocalProvider:
        """Build from the settings. With ``RUNTIME_KIND=quoroom`` a missing real Room (its
        ``cli.js`` or ``node`` ≥ 20) stops start-up here, naming what is missing."""
        cli = settings.quoroom_room_cli
        if settings.runtime_kind == "quoroom":
            find_quoroom_room(cli)
        return cls(
            var_dir=settings.var_dir,
            issuer=settings.issuer,
            allowed_origins=[settings.public_origin],
            prefix=settings.app_prefix,
            quoroom_room_cli=cli,
            **kw,
        )

    # ---------------------------------------------------------------- paths and state

    def _dir(self, app: str) -> Path:
        instance_id = instance_id_from_app(app, self._prefix)
        if instance_id is None or "/" in instance_id or instance_id in (".", ".."):
            raise ProviderError(f"{app!r} is not one of our apps", retryable=False)
        return self.root / instance_id

    def _lock(self, app: str) -> asyncio.Lock:
        return self._locks.setdefault(app, asyncio.Lock())

    def _state(self, app: str) -> dict[str, Any] | None:
        return _read_json(self._dir(app) / "runtime.json")

    def _alive(self, app: str, state: Mapping[str, Any] | None) -> bool:
        """Is the runtime recorded in ``state`` running (and really ours)?"""
        if not state or not isinstance(state.get("pid"), int):
            return False
        pid, port = state["pid"], state.get("port")
        child = self._children.get(app)
        if child is not None and child.pid == pid:
            return child.returncode is None
        return _is_our_runtime(pid, str(state.get("instance_id")), port)

    def url_of(self, port: int) -> str:
        return f"http://{self._host}:{port}"

    # ---------------------------------------------------------------- app, secrets, volume

    async def ensure_app(self, spec: InstanceSpec) -> str:
        name = app_name(spec.instance_id, self._prefix)
        path = self._dir(name)
        # The Room's data, its credentials and its log: this user's only (issue 12).
        private_dir(self.root)
        private_dir(path)
        if _read_json(path / "app.json") is None:
            _write_json(path / "app.json", {"app": name, "instance_id": spec.instance_id})
        return name

    async def set_secrets(
        self, spec: InstanceSpec, app: str, values: Mapping[str, str]
    ) -> int | None:
        check_secret_names(values)
        _write_json(self._dir(app) / "secrets.json", dict(values), mode=0o600)
        return None  # a file has no versions

    async def ensure_volume(
        self, spec: InstanceSpec, app: str, volume_id: str | None
    ) -> VolumeInfo:
        (self._dir(app) / "data").mkdir(parents=True, exist_ok=True)
        return VolumeInfo(VOLUME_ID, REGION)

    # ---------------------------------------------------------------- machine

    def _machine_id(self, spec_or_id: str) -> str:
        return f"rt-{spec_or_id[:8]}"

    def _env(self, instance_id: str, app: str, port: int) -> dict[str, str]:
        env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
        secrets = _read_json(self._dir(app) / "secrets.json") or {}
        env.update({str(k): str(v) for k, v in secrets.items()})
        env.update(self._extra_env)
        env.update(
            {
                "QUOROOM_DEPLOYMENT_MODE": "cloud",
                "QUOROOM_CLOUD_INSTANCE_ID": instance_id,
                "QUOROOM_CLOUD_ISSUER": self._issuer,
                "QUOROOM_CLOUD_JWKS_URL": self._jwks_url,
                # The control plane's pages and the runtime's own UI (same-origin writes carry
                # an Origin header too).
                "QUOROOM_ALLOWED_ORIGINS": ",".join(
                    dict.fromkeys([*self._origins, self.url_of(port)])
                ),
                "QUOROOM_DATA_DIR": str((self._dir(app) / "data").resolve()),
                "PYTHONUNBUFFERED": "1",
            }
        )
        try:
            load_settings(env)  # the runtime's own parser: never start one that would refuse
        except ConfigError as exc:
            raise ProviderError(f"runtime settings: {exc}", retryable=False) from exc
        return env

    def _real_room(self) -> tuple[str, Path]:
        if self._room is None:
            self._room = find_quoroom_room(self._room_cli)
        return self._room

    def command(
        self, app: str, instance_id: str, kind: str, port: int, upstream: int | None
    ) -> tuple[list[str], dict[str, str]]:
        """The argv and environment of an instance's runtime (``upstream``: the real Room's
        loopback port, kind ``quoroom`` only)."""
        env = self._env(instance_id, app, port)
        argv = [self._python, "-m", "room_cloud_runtime.cli"]
        listen = ["--host", self._host, "--port", str(port)]
        if kind != "quoroom":
            return [*argv, "serve", *listen], env
        try:
            node, cli = self._real_room()
        except SettingsError as exc:  # an instance made before RUNTIME_KIND changed, say
            raise ProviderError(f"machine: {exc}", retryable=False, step="machine") from exc
        assert upstream is not None
        room = ["--", node, str(cli), "serve", "--port", str(upstream)]
        argv = [*argv, "gateway", *listen, "--upstream", f"http://127.0.0.1:{upstream}", *room]
        # The Room (which inherits this environment through the gateway) installs provider
        # CLIs with `npm install -g` and writes dotfiles: keep all of it in the instance's
        # directory, and put what it installs on its PATH.
        base = self._dir(app).resolve()
        home, prefix, tmp = base / "home", base / "npm", base / "tmp"
        for folder in (home, prefix / "bin", tmp):
            folder.mkdir(parents=True, exist_ok=True)
        env["HOME"] = str(home)
        env["npm_config_prefix"] = str(prefix)
        env["TMPDIR"] = str(tmp)
        env["PATH"] = os.pathsep.join([str(prefix / "bin"), env.get("PATH") or os.defpath])
        return argv, env

    async def _spawn(
        self, app: str, instance_id: str, port: int | None, kind: str = DEFAULT_RUNTIME_KIND
    ) -> dict[str, Any]:
        if port is None or not _port_free(self._host, port):
            port = _free_port(self._host)
        upstream = None  # the real Room's port: only the gateway uses it, any free one will do
        while kind == "quoroom" and upstream in (None, port):
            upstream = _free_port("127.0.0.1")
        path = self._dir(app)
        argv, env = await asyncio.to_thread(self.command, app, instance_id, kind, port, upstream)
        log = await asyncio.to_thread(_open_private_log, path / "runtime.log")
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                cwd=str(path),
                start_new_session=True,  # Ctrl-C in the terminal reaches the control plane only
            )
        finally:
            log.close()  # the child holds its own copy of the descriptor
        self._children[app] = process
        state = {
            "pid": process.pid,
            "port": port,
            "instance_id": instance_id,
            "app": app,
            "runtime_kind": kind,
            "upstream_port": upstream,
            "started_at": datetime.now(UTC).isoformat(),
        }
        _write_json(path / "runtime.json", state)
        logger.info(
            "started %s runtime for %s (pid %d, port %d)", kind, instance_id, process.pid, port
        )
        return state

    async def find_machine(self, app: str, instance_id: str) -> MachineInfo | None:
        return await self.machine(app, self._machine_id(instance_id))

    async def ensure_machine(
        self, spec: InstanceSpec, app: str, volume: VolumeInfo, machine_id: str | None
    ) -> MachineInfo:
        async with self._lock(app):
            state = self._state(app)
            if state is None or not self._alive(app, state):
                port = state.get("port") if state else None
                state = await self._spawn(app, spec.instance_id, port, spec.runtime_kind)
            return MachineInfo(
                self._machine_id(spec.instance_id), "started", url=self.url_of(state["port"])
            )

    async def wait_healthy(self, spec: InstanceSpec, app: str, machine_id: str) -> MachineInfo:
        state = self._state(app)
        if not state:
            raise ProviderError("health: no runtime recorded", retryable=True, step="health")
        url = self.url_of(state["port"])
        deadline = time.monotonic() + self._health_timeout
        delay = 0.02
        while True:
            if not self._alive(app, state):
                raise ProviderError(
                    f"health: the runtime exited ({self._exit_detail(app)})",
                    retryable=True,
                    step="health",
                )
            try:
                reply = await self._http.get(f"{url}/healthz")
                if reply.status_code == 200:
                    return MachineInfo(machine_id, "started", url=url)
            except httpx.HTTPError:
                pass
            if time.monotonic() >= deadline:
                raise ProviderError(
                    f"health: {url}/healthz did not answer within {self._health_timeout:g}s",
                    retryable=True,
                    step="health",
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def _exit_detail(self, app: str) -> str:
        child = self._children.get(app)
        code = f"status {child.returncode}" if child and child.returncode is not None else "gone"
        try:
            lines = (self._dir(app) / "runtime.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        tail = next((line for line in reversed(lines) if "error" in line.lower()), "")
        return f"{code}; {tail[-300:]}" if tail else code

    async def machine(self, app: str, machine_id: str) -> MachineInfo | None:
        try:
            path = self._dir(app)
        except ProviderError:
            return None
        state = _read_json(path / "runtime.json")
        if state is None:
            return None
        alive = self._alive(app, state)
        url = self.url_of(state["port"]) if isinstance(state.get("port"), int) else None
        return MachineInfo(machine_id, "started" if alive else "stopped", url=url)

    async def stop(self, app: str, machine_id: str) -> None:
        async with self._lock(app):
            await self._stop(app)

    async def _stop(self, app: str) -> None:
        state = self._state(app)
        if state is None:
            return
        if self._alive(app, state):
            pid = int(state["pid"])
            await self._terminate(app, pid)
        if state.get("pid") is not None:
            state["pid"] = None
            state["stopped_at"] = datetime.now(UTC).isoformat()
            _write_json(self._dir(app) / "runtime.json", state)

    async def _terminate(self, app: str, pid: int) -> None:
        child = self._children.get(app)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)  # its own session: the group id is its pid
        deadline = time.monotonic() + self._stop_timeout
        while time.monotonic() < deadline:
            if child is not None and child.pid == pid:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(child.wait(), timeout=0.05)
                if child.returncode is not None:
                    break
            elif not _pid_running(pid):
                break
            else:
                await asyncio.sleep(0.05)
        else:
            logger.warning("runtime pid %d did not stop in time; killing it", pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            if child is not None and child.pid == pid:
                await child.wait()
        if child is not None and child.pid == pid:
            self._children.pop(app, None)

    async def start(self, app: str, machine_id: str) -> None:
        async with self._lock(app):
            state = self._state(app)
            if state is None:
                raise ProviderError("start: no runtime recorded", retryable=False, step="start")
            if not self._alive(app, state):
                await self._spawn(
                    app,
                    str(state["instance_id"]),
                    state.get("port"),
                    str(state.get("runtime_kind") or DEFAULT_RUNTIME_KIND),
                )

    # ---------------------------------------------------------------- snapshots and teardown

    def _new_snapshot(self, app: str) -> Path:
        """A fresh snapshot path: ``snapshots/<instance id>-<UTC timestamp>`` (not created)."""
        private_dir(self.snapshots)
        stamp = datetime.now(UTC).strftime(_STAMP_FORMAT)
        return self.snapshots / f"{self._dir(app).name}-{stamp}"

    async def snapshot_volume(self, app: str, volume_id: str) -> str:
        source = self._dir(app) / "data"
        target = self._new_snapshot(app)
        if source.exists():
            await asyncio.to_thread(shutil.copytree, source, target)
        else:
            target.mkdir()
        return target.name

    async def list_snapshots(self, app: str) -> list[SnapshotInfo]:
        instance_id = self._dir(app).name
        found: list[SnapshotInfo] = []
        if not self.snapshots.is_dir():
            return found
        for path in self.snapshots.glob(f"{instance_id}-*"):
            stamp = path.name[len(instance_id) + 1 :]
            if not _STAMP_RE.match(stamp) or not path.is_dir():
                continue
            taken = datetime.strptime(stamp, _STAMP_FORMAT).replace(tzinfo=UTC)
            found.append(
                SnapshotInfo(
                    id=path.name,
                    volume_id=VOLUME_ID,
                    created_at=taken.isoformat(),
                    status="created",
                    size_bytes=_tree_size(path),
                    region=REGION,
                )
            )
        found.sort(key=lambda s: (s.created_at or "", s.id))
        return found

    async def restore_volume(
        self, spec: InstanceSpec, app: str, snapshot_id: str, machine_id: str | None, key: str
    ) -> VolumeInfo:
        if snapshot_id not in {s.id for s in await self.list_snapshots(app)}:
            raise ProviderError(
                f"restore: snapshot {snapshot_id} does not exist for instance {spec.instance_id}",
                retryable=False,
                step="restore",
            )
        async with self._lock(app):
            path = self._dir(app)
            marker = path / "restore.json"
            last = _read_json(marker)
            if last is not None and last.get("key") == key:
                return VolumeInfo(VOLUME_ID, REGION)  # done already (a crash before the save)
            await self._stop(app)
            data, staging = path / "data", path / ".data.restoring"
            replaced = None
            if data.exists():  # kept as a snapshot: a restore can itself be undone
                target = self._new_snapshot(app)
                os.replace(data, target)
                replaced = target.name
            await asyncio.to_thread(shutil.rmtree, staging, True)
            await asyncio.to_thread(shutil.copytree, self.snapshots / snapshot_id, staging)
            os.replace(staging, data)
            _write_json(
                marker,
                {
                    "key": key,
                    "snapshot_id": snapshot_id,
                    "replaced": replaced,
                    "restored_at": datetime.now(UTC).isoformat(),
                },
            )
        logger.info("restored %s from snapshot %s (replaced: %s)", app, snapshot_id, replaced)
        return VolumeInfo(VOLUME_ID, REGION)

    async def destroy(self, app: str) -> None:
        async with self._lock(app):
            await self._stop(app)
            path = self._dir(app)
            instance_id = path.name
            await asyncio.to_thread(shutil.rmtree, path, True)
            if self.snapshots.exists():
                for snap in self.snapshots.glob(f"{instance_id}-*"):
                    await asyncio.to_thread(shutil.rmtree, snap, True)
        self._locks.pop(app, None)

    async def list_owned(self) -> list[OwnedApp]:
        owned: list[OwnedApp] = []
        if not self.root.exists():
            return owned
        for marker in sorted(self.root.glob("*/app.json")):
            data = _read_json(marker)
            if data and isinstance(data.get("app"), str):
                instance_id = instance_id_from_app(data["app"], self._prefix)
                if instance_id is not None and instance_id == marker.parent.name:
                    owned.append(OwnedApp(data["app"], instance_id))
        return owned

    async def aclose(self) -> None:
        """Stop every runtime this process started (their state files stay: a restarted
        control plane starts them again through the reconciler)."""
        for app in list(self._children):
            try:
                await self.stop(app, "")
            except Exception:  # pragma: no cover - shutdown must finish
                logger.exception("could not stop the runtime of %s", app)
        await self._http.aclose()

    @property
    def children(self) -> dict[str, int]:
        """app → pid of the runtimes this object started and that still run."""
        return {a: p.pid for a, p in self._children.items() if p.returncode is None}


def _tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        # A zombie (exited, not yet reaped by its parent) is not running.
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except ProcessLookupError:  # it exited while its stat was being read (ESRCH)
        return False
    except (FileNotFoundError, IndexError):
        return not Path("/proc").is_dir()


def _is_our_runtime(pid: int, instance_id: str, port: Any) -> bool:
    """Is ``pid`` a live ``quoroom-runtime serve`` (or ``gateway``) for this instance on this
    port?

    Pids are reused: after a reboot or a long stop the recorded pid may be anything. On Linux
    the command line and environment say for sure; elsewhere only liveness is checked.
    """
    if not _pid_running(pid):
        return False
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():
        return True
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        environ = (proc / "environ").read_bytes().split(b"\0")
    except (FileNotFoundError, PermissionError, ProcessLookupError):
        return False
    return (
        _runtime_port(argv) == str(port).encode()
        and f"QUOROOM_CLOUD_INSTANCE_ID={instance_id}".encode() in environ
    )


def _runtime_port(argv: list[bytes]) -> bytes | None:
    """The ``--port`` of a ``room_cloud_runtime.cli serve|gateway`` command line (the runtime's
    own, not the one of the Room command after ``--``), else ``None``."""
    own = argv[: argv.index(b"--")] if b"--" in argv else argv
    if b"room_cloud_runtime.cli" not in own:
        return None
    at = own.index(b"room_cloud_runtime.cli")
    if own[at + 1 : at + 2] not in ([b"serve"], [b"gateway"]):
        return None
    ports = [own[i + 1] for i in range(at + 2, len(own) - 1) if own[i] == b"--port"]
    return ports[0] if len(ports) == 1 else None
