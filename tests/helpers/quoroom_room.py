"""The real Quoroom Room (npm ``quoroom``) for tests: installed once, run behind the gateway.

``room_cli()`` installs the pinned package with ``../shared/quoroom-room/install`` into a cache
folder kept between runs (``$QUOROOM_TEST_ROOM_CACHE``, default ``~/.cache/quoroom-cloud``) and
returns the path of its ``cli.js``. Without node or npm the calling test is skipped, with the
reason; any other install failure fails the test (a broken install is not a skip).

``RoomGateway`` runs ``quoroom-runtime gateway --upstream … -- node cli.js serve`` as a real
subprocess with its own data folder, ``HOME`` and ``npm_config_prefix`` (the Room installs
provider CLIs globally with npm: nothing may land outside the test's folder), and waits for its
``/healthz``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
ROOM_VERSION = "0.1.42"


def shared_dir() -> Path:
    return Path(os.environ.get("QUOROOM_SHARED_DIR") or REPO.parent / "shared")


def cache_dir() -> Path:
    base = os.environ.get("QUOROOM_TEST_ROOM_CACHE") or Path.home() / ".cache" / "quoroom-cloud"
    return Path(base) / f"quoroom-room-{ROOM_VERSION}"


def node_missing() -> str | None:
    """Why the real Room cannot run here, or None."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (the real Room is a Node.js server)"
    return None


def _install(control_origin: str | None) -> subprocess.CompletedProcess[str]:
    argv = ["bash", str(shared_dir() / "quoroom-room" / "install"), str(cache_dir())]
    if control_origin:
        argv.append(control_origin)
    # One install at a time per cache: the suite, `scripts/bench gateway` and a second checkout
    # may all ask at once, and two npm runs in one folder break each other's native builds.
    lock_path = cache_dir().parent / f"{cache_dir().name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "QUOROOM_ROOM_VERSION": ROOM_VERSION},
        )


def install_ahead(reporter: Any = None) -> None:
    """Install the package before the first test that needs it starts (tests/conftest.py calls
    this once collection is done). The first install on a machine (npm, then better-sqlite3
    built from source) took 108 s here: inside a test's fixture it counted against that test's
    120 s timeout. A failure is left for ``room_cli`` to report in the tests themselves."""
    if node_missing() is not None or not (shared_dir() / "quoroom-room" / "install").exists():
        return
    if reporter is not None and not (cache_dir() / "node_modules" / "quoroom").is_dir():
        reporter.write_line(
            f"installing the real Room (npm quoroom {ROOM_VERSION}) once into {cache_dir()}"
        )
    _install(None)


def room_cli(control_origin: str | None = None) -> str:
    """Install (once) and return the real Room's ``cli.js``; skip the test without node/npm."""
    reason = node_missing()
    if reason is not None:
        pytest.skip(reason)
    script = shared_dir() / "quoroom-room" / "install"
    if not script.exists():
        pytest.fail(
            f"{script} is missing: the real Room's install script (../shared beside the "
            "checkout, or QUOROOM_SHARED_DIR)"
        )
    done = _install(control_origin)
    if done.returncode != 0:
        pytest.fail(f"installing the real Room failed:\n{done.stderr[-4000:]}")
    cli = done.stdout.strip().splitlines()[-1]
    assert Path(cli).is_file(), cli
    return cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RoomGateway:
    """``quoroom-runtime gateway`` in front of the real Room, as a subprocess."""

    def __init__(
        self,
        cli: str,
        folder: Path,
        *,
        issuer: str,
        instance_id: str,
        extra_origins: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.folder = folder
        self.port = free_port()
        self.room_port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.origin = self.base
        self.log_path = folder / "gateway.log"
        for sub in ("data", "home", "npm"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "QUOROOM_DEPLOYMENT_MODE": "cloud",
            "QUOROOM_CLOUD_INSTANCE_ID": instance_id,
            "QUOROOM_CLOUD_ISSUER": issuer,
            "QUOROOM_ALLOWED_ORIGINS": ",".join((self.origin, *extra_origins)),
            "QUOROOM_DATA_DIR": str(folder / "data"),
            "HOME": str(folder / "home"),
            "npm_config_prefix": str(folder / "npm"),
            "QUOROOM_GATEWAY_START_TIMEOUT_SECONDS": "30",
            **(env or {}),
        }
        room = command or ["node", cli, "serve", "--port", str(self.room_port)]
        self.argv = [
            sys.executable,
            "-m",
            "room_cloud_runtime.cli",
            "gateway",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--upstream",
            f"http://127.0.0.1:{self.room_port}",
            "--",
            *room,
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True, timeout: float = 45.0) -> RoomGateway:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder
        )
        log.close()
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 45.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"gateway not healthy in {timeout}s:\n{self.log()}")

    def room_pid(self) -> int:
        """The Room's pid: the gateway's child (``-f`` alone would match the gateway's own command
        line, which holds the Room's)."""
        assert self.process is not None
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        pids = [int(p) for p in out.stdout.split()]
        assert pids, "the Room is not running"
        return pids[0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> int | None:
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        return process.returncode

    def __enter__(self) -> RoomGateway:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
