"""The browser judges the runtime's CORS: a page on an allowed origin (the control plane's) can call
the Room's API with a runtime token and read the answer; a page on any other origin — another
loopback port, or the same port under another host name — cannot (fetch rejects)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.browser.conftest import PASSWORD, ControlPlane

FETCH_ROOMS = """async ([url, token]) => {
  try {
    const res = await fetch(url, { headers: { authorization: `Bearer ${token}` } });
    return { ok: true, status: res.status, body: await res.json() };
  } catch (err) {
    return { ok: false, error: String(err) };
  }
}"""


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>elsewhere</title><p>another origin</p>"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def other_origin() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def _running_room(control_plane: ControlPlane, address: str) -> dict[str, Any]:
    """Sign up, verify, sign in (bearer), create a Room, wait for it, get a runtime token."""
    async with httpx.AsyncClient(base_url=control_plane.url, timeout=10) as http:
        r = await http.post("/api/auth/signup", json={"email": address, "password": PASSWORD})
        assert r.status_code == 202
        token = control_plane.wait_for_link(address, "verify-email").split("#token=", 1)[1]
        assert (await http.post("/api/auth/verify-email", json={"token": token})).is_success
        r = await http.post(
            "/api/auth/login", json={"email": address, "password": PASSWORD, "transport": "body"}
        )
        bearer = {"Authorization": f"Bearer {r.json()['access_token']}"}
        catalog = (await http.get("/api/cloud/catalog", headers=bearer)).json()
        r = await http.post(
            "/api/cloud/instances",
            json={
                "name": "CORS room",
                "tier": catalog["tiers"][0]["id"],
                "region": catalog["regions"][0]["id"],
            },
            headers={**bearer, "Idempotency-Key": f"cors-{address}"},
        )
        assert r.status_code == 201, r.text
        instance_id = r.json()["instance"]["id"]
        deadline = time.monotonic() + 60
        while True:
            status = (
                await http.get(f"/api/cloud/instances/{instance_id}/status", headers=bearer)
            ).json()
            if status["status"] == "running":
                break
            assert status["status"] in ("provisioning", "awaiting_payment"), status
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.2)
        r = await http.post(f"/api/cloud/instances/{instance_id}/runtime-token", headers=bearer)
        assert r.status_code == 200, r.text
        grant: dict[str, Any] = r.json()
        return grant


async def test_only_an_allowed_origin_can_read_the_rooms_api(
    browser: Any, control_plane: ControlPlane, other_origin: str
):
    grant = await _running_room(control_plane, "cors@example.com")
    rooms_url = grant["runtime_url"].rstrip("/") + "/api/rooms"
    args = [rooms_url, grant["token"]]
    context = await browser.new_context()
    page = await context.new_page()
    try:
        # Allowed: a page of the control plane's origin.
        await page.goto(f"{control_plane.url}/healthz")
        allowed = await page.evaluate(FETCH_ROOMS, args)
        assert allowed["ok"] is True, allowed
        assert allowed["status"] == 200
        assert {room["name"] for room in allowed["body"]} >= {"Research lab"}

        # Another loopback port: a different origin, refused.
        await page.goto(f"{other_origin}/")
        refused = await page.evaluate(FETCH_ROOMS, args)
        assert refused["ok"] is False, refused
        assert "TypeError" in refused["error"]

        # The control plane's port under another host name is another origin too.
        port = control_plane.url.rsplit(":", 1)[1]
        await page.goto(f"http://localhost:{port}/healthz")
        refused = await page.evaluate(FETCH_ROOMS, args)
        assert refused["ok"] is False, refused
    finally:
        await context.close()

    # What the browser did not let the page see: the runtime refused that origin outright.
    async with httpx.AsyncClient() as http:
        r = await http.get(
            rooms_url,
            headers={"Authorization": f"Bearer {grant['token']}", "Origin": other_origin},
        )
        assert r.status_code == 403
        assert "access-control-allow-origin" not in r.headers
