"""``quoroom-cloud dev``, the main job: embedded defaults under ./var, migrates, prints its URL,
provisions a Room with the local provider, and on Ctrl-C stops — the Room's runtime too."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from control_plane.devserver import _url_host, bind_socket, dev_settings

PASSWORD = "correct horse battery staple"


def test_public_url_follows_host_and_port_unless_set():
    assert dev_settings("127.0.0.1", 8123, {}).public_url == "http://127.0.0.1:8123"
    assert _url_host("0.0.0.0") == "127.0.0.1"
    assert _url_host("::1") == "[::1]"


def test_dev_refuses_production(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("QUOROOM_CP_ENV", "production")
    with pytest.raises((SystemExit, ValueError)):
        dev_settings("127.0.0.1", 8000, {"QUOROOM_CP_ENV": "production"})


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_connections_on_the_bound_socket_get_tcp_nodelay(host: str):
    """asyncio sets TCP_NODELAY on an accepted connection only when the listening socket says
    it is TCP (``proto``): without it, an answer written in two pieces (uvicorn writes the head,
    then the body) waited for the client's delayed ACK, 40 ms per request on a kept-alive
    connection (measured: the second request on one connection took 42 ms against 0.4)."""
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")

    async def nodelay_of_an_accepted_connection() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                conn = transport.get_extra_info("socket")
                accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        with bind_socket(host, 0) as sock:
            server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
            async with server:
                _, writer = await asyncio.open_connection(host, sock.getsockname()[1])
                flag = await asyncio.wait_for(accepted, 5)
                writer.close()
                return flag

    assert asyncio.run(nodelay_of_an_accepted_connection()) != 0


def test_a_busy_port_is_reported():
    with bind_socket("127.0.0.1", 0) as taken:
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            bind_socket("127.0.0.1", port).close()


def _wait_for(pattern: str, log: Path, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace"))
        if found:
            return found.group(1)
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not seen:\n{log.read_text()}")


def _verify_link(outbox: Path, to: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in outbox.glob("*.eml"):
            message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            if message["To"] == to:
                body = message.get_body(preferencelist=("plain",))
                found = re.search(r"#token=([A-Za-z0-9_\-]+)", body.get_content() if body else "")
                if found:
                    return found.group(1)
        time.sleep(0.05)
    raise AssertionError(f"no mail to {to}")


@pytest.mark.slow
def test_dev_runs_the_whole_flow_and_stops_its_rooms_on_ctrl_c(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOROOM_")}
    env.update(
        QUOROOM_CP_PASSWORD_HASH_MEMORY_KIB="1024",
        QUOROOM_CP_PASSWORD_HASH_TIME_COST="1",
        QUOROOM_CP_WORKER_POLL_SECONDS="1",
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "control_plane.cli", "dev", "--port", "0"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = _wait_for(r"is up: (http://127\.0\.0\.1:\d+)/", log, proc, 60)
        assert (tmp_path / "var" / "control_plane.db").exists()
        assert "billing   disabled" in log.read_text()
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get("/").status_code == 200
            r = http.post(
                "/api/auth/signup", json={"email": "dev@example.com", "password": PASSWORD}
            )
            assert r.status_code == 202
            token = _verify_link(tmp_path / "var" / "outbox", "dev@example.com")
            assert http.post("/api/auth/verify-email", json={"token": token}).is_success
            r = http.post(
                "/api/auth/login",
                json={"email": "dev@example.com", "password": PASSWORD, "transport": "body"},
            )
            bearer = {"Authorization": f"Bearer {r.json()['access_token']}"}
            catalog = http.get("/api/cloud/catalog").json()
            assert catalog["billingEnabled"] is False
            r = http.post(
                "/api/cloud/instances",
                json={
                    "name": "Dev room",
                    "tier": catalog["tiers"][0]["id"],
                    "region": catalog["regions"][0]["id"],
                },
                headers={**bearer, "Idempotency-Key": "dev-test"},
            )
            assert r.status_code == 201, r.text
            assert r.json()["checkout_url"] is None
            instance_id = r.json()["instance"]["id"]
            deadline = time.monotonic() + 60
            while (
                status := http.get(f"/api/cloud/instances/{instance_id}/status", headers=bearer)
            ).json()["status"] != "running":
                assert time.monotonic() < deadline, status.text
                time.sleep(0.2)
            runtime = status.json()["url"]
        assert httpx.get(f"{runtime}/healthz").status_code == 200

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert "stopped" in log.read_text()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{runtime}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
