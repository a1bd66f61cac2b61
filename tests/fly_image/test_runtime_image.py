"""The runtime image holds the runtime alone (issue 16, item 2).

No Docker engine runs here, so the builder stage of Dockerfile.runtime is replayed
(tests/helpers/runtime_venv.py, the ``venv`` fixture). The venv it makes is what both targets
(``runtime`` and ``quoroom``) copy; the tests read its installed
distributions and files, run the targets' entrypoints, and probe ``/healthz`` with the image's
own health check.

Skipped, saying why, only when pip cannot reach a package index (the build installs the pinned
dependencies from it).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from fly_image.config import Tier, build_machine_config
from tests.fly_image.test_dockerfile import (
    ROOT,
    env_pairs,
    exec_form,
)
from tests.helpers.jwks_server import JWKSServer
from tests.helpers.runtime_venv import RUNTIME_PYPROJECT, BuiltVenv, requirements, stage
from tests.helpers.tokens import TokenFactory

# The control plane's dependencies, named so that a change to either pyproject cannot quietly
# bring one back (the test below also derives the list from the two pyprojects).
CONTROL_PLANE_ONLY = {
    "fastapi", "sqlalchemy", "alembic", "stripe", "asyncpg", "aiosqlite", "jinja2",
    "argon2-cffi", "email-validator", "itsdangerous", "pydantic-settings", "python-multipart",
    "greenlet", "mako", "quoroom-cloud",
}  # fmt: skip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_the_runtime_distribution_pins_exactly_what_the_repository_pins_for_the_runtime() -> None:
    ours = tomllib.loads(RUNTIME_PYPROJECT.read_text(encoding="utf-8"))["project"]
    repo = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert ours["version"] == repo["version"]
    assert ours["requires-python"] == repo["requires-python"]
    assert ours["scripts"] == {"quoroom-runtime": repo["scripts"]["quoroom-runtime"]}
    runtime, everything = requirements(RUNTIME_PYPROJECT), requirements(ROOT / "pyproject.toml")
    for name, req in runtime.items():
        assert str(everything[name]) == str(req), f"{name}: pinned differently in the two"
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", str(req)
    assert not (CONTROL_PLANE_ONLY & set(runtime)), "a control-plane dependency in the runtime's"


# -- the venv, built as the builder stage builds it (tests/fly_image/conftest.py) ----------


def test_the_venv_installs_the_runtime_and_none_of_the_control_planes_dependencies(
    venv: BuiltVenv,
) -> None:
    installed = venv.distributions()
    assert "quoroom-runtime" in installed
    runtime = requirements(RUNTIME_PYPROJECT)
    for name, req in runtime.items():
        assert req.specifier.contains(installed.get(name, "absent")), (
            f"{req}: {installed.get(name)}"
        )
    control_plane_only = set(requirements(ROOT / "pyproject.toml")) - set(runtime)
    assert control_plane_only, "the repository's pyproject lists the control plane's too"
    leaked = (CONTROL_PLANE_ONLY | control_plane_only) & set(installed)
    assert not leaked, f"control-plane dependencies in the runtime image: {sorted(leaked)}"


def test_the_venv_holds_room_cloud_runtime_alone_and_only_the_runtimes_command(
    venv: BuiltVenv,
) -> None:
    assert (venv.site_packages / "room_cloud_runtime" / "py.typed").is_file()
    assert (venv.site_packages / "room_cloud_runtime" / "reference" / "app.py").is_file()
    for package in ("control_plane", "fly_image", "tests", "bench"):
        assert not (venv.site_packages / package).exists(), f"{package} in the runtime image"
    ours = [p.name for p in venv.site_packages.glob("quoroom*")]
    assert ours and all(name.startswith("quoroom_runtime-") for name in ours), ours
    assert (venv.bin / "quoroom-runtime").is_file()
    assert not (venv.bin / "quoroom-cloud").exists()
    sources = {p.relative_to(venv.site_packages).parts[0] for p in venv.site_packages.rglob("*.py")}
    assert not {"control_plane", "fly_image"} & sources


def test_every_module_of_the_runtime_imports_in_the_venv(venv: BuiltVenv) -> None:
    """The runtime's dependencies are complete: nothing it imports is missing from the image."""
    script = (
        "import importlib, pkgutil, room_cloud_runtime as r\n"
        "for m in pkgutil.walk_packages(r.__path__, 'room_cloud_runtime.'):\n"
        "    importlib.import_module(m.name)\n"
    )
    done = subprocess.run(
        [str(venv.bin / "python"), "-c", script], capture_output=True, text=True, cwd=venv.root
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("target", ["runtime", "quoroom"])
def test_each_targets_entrypoint_is_installed_and_answers_help(
    venv: BuiltVenv, target: str
) -> None:
    final = stage(target)
    assert any(c == "--from=builder /opt/venv /opt/venv" for c in final.all("COPY"))
    entrypoint = exec_form(final.last("ENTRYPOINT"))
    done = subprocess.run(
        [str(venv.bin / entrypoint[0]), *entrypoint[1:], "--help"],
        capture_output=True,
        text=True,
        cwd=venv.root,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_the_runtime_targets_health_check_passes_against_the_venvs_server(
    venv: BuiltVenv, tmp_path: Path
) -> None:
    """The ``runtime`` target's ENTRYPOINT and CMD run from the venv with the image's ENV and the
    machine config's, probed by the image's own HEALTHCHECK command (python and the standard
    library alone). Moved to loopback, a free port and a temporary data folder."""
    final = stage("runtime")
    port = free_port()
    healthcheck = final.last("HEALTHCHECK")
    probe = exec_form(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    probe = [re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", part) for part in probe]
    # The image's PATH starts with /opt/venv/bin: both commands are the venv's.
    assert env_pairs(final)["PATH"].startswith("/opt/venv/bin:")
    probe[0] = str(venv.bin / probe[0])
    command = [*exec_form(final.last("ENTRYPOINT")), *exec_form(final.last("CMD"))]
    command[0] = str(venv.bin / command[0])
    command[command.index("--host") + 1] = "127.0.0.1"
    command[command.index("--port") + 1] = str(port)
    (tmp_path / "data").mkdir()
    with JWKSServer() as jwks:
        jwks.jwks = TokenFactory(issuer=jwks.issuer, instance_id="inst-1").jwks()
        config = build_machine_config(
            instance_id="inst-1",
            owner_id="owner-1",
            tier=Tier(id="starter", cpu_kind="shared", cpus=1, memory_mb=512),
            image="registry.fly.io/quoroom-runtime@sha256:" + "ab" * 32,
            issuer=jwks.issuer,
            jwks_url=jwks.url,
            allowed_origins=["https://app.quoroom.ai"],
            volume_id="vol_abc",
            internal_port=port,
        )
        env = {
            **env_pairs(final),
            **config["env"],
            "PATH": f"{venv.bin}{os.pathsep}/usr/bin:/bin",
            "PORT": str(port),
            "QUOROOM_DATA_DIR": str(tmp_path / "data"),
        }
        log_path = tmp_path / "runtime.log"
        with log_path.open("w") as log:
            server = subprocess.Popen(
                command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
            )
            try:
                deadline = time.monotonic() + 30
                while True:
                    done = subprocess.run(probe, env=env, capture_output=True, timeout=10)
                    if done.returncode == 0:
                        break
                    assert server.poll() is None, log_path.read_text()[-3000:]
                    assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                    time.sleep(0.2)
            finally:
                server.terminate()
                server.wait(timeout=10)
