"""The real Room through "Run in cloud": a control plane with ``RUNTIME_KIND=quoroom`` provisions
the real (Node) Room behind ``quoroom-runtime gateway`` with the local provider; the open page
launches it at ``{runtime}/?token=<token>``, the real UI (built for this control plane's origin)
takes the token and drops it from the address bar, and refreshes it from its own origin with
``credentials: "include"``."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from control_plane.devserver import DevServer, bind_socket
from control_plane.settings import Settings
from tests.browser.conftest import PASSWORD, ControlPlane
from tests.browser.test_refresh_cors import REFRESH, SIGN_IN
from tests.helpers.quoroom_room import room_cli


@pytest.fixture(scope="module")
def quoroom_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    root = tmp_path_factory.mktemp("cp-quoroom")
    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    cli = room_cli(control_origin=url)  # the UI calls this control plane to refresh
    settings = Settings(
        env="development",
        public_url=url,
        var_dir=root / "var",
        database_url=f"sqlite+aiosqlite:///{root / 'cp.db'}",
        auto_migrate=True,
        mail_outbox=root / "outbox",
        secret_key="s" * 48,
        key_encryption_key=base64.urlsafe_b64encode(b"k" * 32).decode(),
        password_hash_memory_kib=1024,
        password_hash_time_cost=1,
        provider="local",
        run_worker=True,
        worker_poll_seconds=1.0,
        runtime_health_timeout_seconds=90,
        runtime_kind="quoroom",
        quoroom_room_cli=cli,
        throttle_signup_address="1000/minute",
        throttle_email_address="1000/minute",
        throttle_login_address="1000/minute",
    )
    (root / "var").mkdir()
    dev = DevServer(settings, sock, out=io.StringIO())
    thread = threading.Thread(target=lambda: asyncio.run(dev.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not dev.server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the control plane did not start")
        time.sleep(0.02)
    try:
        yield ControlPlane(url, root / "outbox", root / "var", dev.server)
    finally:
        dev.server.should_exit = True
        thread.join(timeout=30)
        sock.close()


async def _running_quoroom_room(plane: ControlPlane, address: str) -> str:
    """Sign up, verify, create a Room (billing disabled), wait until it runs; its id."""
    async with httpx.AsyncClient(base_url=plane.url, timeout=10) as http:
        r = await http.post("/api/auth/signup", json={"email": address, "password": PASSWORD})
        assert r.status_code == 202
        token = plane.wait_for_link(address, "verify-email").split("#token=", 1)[1]
        assert (await http.post("/api/auth/verify-email", json={"token": token})).is_success
        r = await http.post(
            "/api/auth/login", json={"email": address, "password": PASSWORD, "transport": "body"}
        )
        bearer = {"Authorization": f"Bearer {r.json()['access_token']}"}
        catalog = (await http.get("/api/cloud/catalog", headers=bearer)).json()
        r = await http.post(
            "/api/cloud/instances",
            json={
                "name": "Real room",
                "tier": catalog["tiers"][0]["id"],
                "region": catalog["regions"][0]["id"],
            },
            headers=bearer,
        )
        assert r.status_code == 201, r.text
        assert r.json()["instance"]["runtimeKind"] == "quoroom"
        instance_id: str = r.json()["instance"]["id"]
        deadline = time.monotonic() + 120
        while True:
            status = (
                await http.get(f"/api/cloud/instances/{instance_id}/status", headers=bearer)
            ).json()
            if status["status"] == "running":
                return instance_id
            assert status["status"] in ("provisioning", "awaiting_payment"), status
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.5)


async def test_the_open_page_launches_the_real_room_which_takes_and_refreshes_its_token(
    browser: Any, quoroom_plane: ControlPlane, artifacts: Any
):
    address = "real-room@example.com"
    instance_id = await _running_quoroom_room(quoroom_plane, address)
    context = await browser.new_context()
    page = await context.new_page()
    launched: list[str] = []
    page.on(
        "request",
        lambda req: (
            launched.append(req.url)
            if "token=" in req.url and req.is_navigation_request()
            else None
        ),
    )
    try:
        await page.goto(f"{quoroom_plane.url}/healthz")
        assert await page.evaluate(SIGN_IN, [address, PASSWORD]) == 200
        await page.goto(f"{quoroom_plane.url}/app/instances/{instance_id}/open")
        # The real UI verifies the token, keeps it, and removes it from the address bar.
        taken = "localStorage.getItem('quoroom_cloud_token') && !location.search.includes('token=')"
        await page.wait_for_function(f"() => {taken}", timeout=60_000)
        runtime = f"{urlsplit(page.url).scheme}://{urlsplit(page.url).netloc}"
        assert runtime != quoroom_plane.url
        (launch,) = launched
        assert launch.startswith(f"{runtime}/?token=")
        await page.screenshot(path=str(artifacts / "real-room-1-launched.png"))
        token = await page.evaluate("() => localStorage.getItem('quoroom_cloud_token')")
        assert launch == f"{runtime}/?token={token}"

        # The refresh the UI makes, from the Room's own origin, with the control plane's cookies.
        url = f"{quoroom_plane.url}/api/cloud/instances/{instance_id}/refresh-token"
        refreshed = await page.evaluate(REFRESH, [url, token])
        assert refreshed["ok"] is True and refreshed["status"] == 200, refreshed
        assert refreshed["body"]["token"] != token
    finally:
        await context.close()
    # Neither log holds the token: the runtime's (gateway and Room) nor the control plane's
    # page never put it anywhere but the address it navigated to.
    log = (quoroom_plane.var_dir / "instances" / instance_id / "runtime.log").read_text()
    assert token not in log and token.split(".")[2] not in log
