"""Smoke test of the image's contents without Docker: the venv Dockerfile.runtime's builder stage
makes (replayed, tests/helpers/runtime_venv.py, shared with test_runtime_image.py), its
entrypoint started with exactly the environment the machine config builder produces, talked to
over loopback.

Differences from a machine, on purpose: the data directory is a temporary one instead of the
volume at /data, and it listens on 127.0.0.1 (tests stay on loopback) on a free port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from fly_image.config import ENTRYPOINT, HEALTH_PATH, Tier, build_machine_config
from tests.helpers.jwks_server import JWKSServer
from tests.helpers.runtime_venv import BuiltVenv
from tests.helpers.tokens import TokenFactory

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "registry.fly.io/quoroom-runtime@sha256:" + "f" * 64
INSTANCE_ID = "inst-smoke-1"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def installed_runtime(venv: BuiltVenv) -> Path:
    """The image's ``quoroom-runtime`` script."""
    script = venv.bin / ENTRYPOINT[0]
    assert script.exists(), f"the image's venv has no {ENTRYPOINT[0]} console script"
    return script


def test_the_installed_entrypoint_serves_healthz_refuses_anonymous_calls_and_accepts_a_token(
    installed_runtime, tmp_path
):
    with JWKSServer() as jwks:
        tokens = TokenFactory(issuer=jwks.issuer, instance_id=INSTANCE_ID)
        jwks.jwks = tokens.jwks()
        port = free_port()
        config = build_machine_config(
            instance_id=INSTANCE_ID,
            owner_id="owner-1",
            tier=Tier(id="starter", cpu_kind="shared", cpus=1, memory_mb=512),
            image=IMAGE,
            issuer=jwks.issuer,
            jwks_url=jwks.url,
            allowed_origins=["https://app.quoroom.ai"],
            volume_id="vol_smoke",
            internal_port=port,
        )
        env = dict(config["env"], QUOROOM_DATA_DIR=str(tmp_path / "data"))
        (tmp_path / "data").mkdir()
        args = list(config["init"]["cmd"])
        args[args.index("--host") + 1] = "127.0.0.1"
        command = [str(installed_runtime), *ENTRYPOINT[1:], *args]
        log = (tmp_path / "runtime.log").open("w")
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until_listening(process, base, tmp_path / "runtime.log")
            with httpx.Client(base_url=base, timeout=10) as client:
                health = client.get(HEALTH_PATH)
                assert health.status_code == 200 and health.json() == {"ok": True}

                anonymous = client.get("/api/rooms")
                assert anonymous.status_code == 401
                assert "error" in anonymous.json()

                owner = {"Authorization": f"Bearer {tokens.mint(role='owner')}"}
                assert client.get("/api/rooms", headers=owner).status_code == 200
                verify = client.get("/api/auth/verify", headers=owner)
                assert verify.status_code == 200 and verify.json()["role"] == "owner"
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
        assert jwks.requests >= 1  # the runtime fetched the pinned JWKS from loopback


def wait_until_listening(process: subprocess.Popen, base: str, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the runtime exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            httpx.get(base + HEALTH_PATH, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    pytest.fail(f"the runtime did not listen within 60 s:\n{log_path.read_text()}")


def test_the_runtime_refuses_to_start_without_its_cloud_settings(installed_runtime, tmp_path):
    env = {"QUOROOM_DEPLOYMENT_MODE": "cloud", "PATH": os.defpath}
    done = subprocess.run(
        [str(installed_runtime), *ENTRYPOINT[1:], "--host", "127.0.0.1", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "QUOROOM_CLOUD_INSTANCE_ID" in done.stderr
