"""The real Room through "Run in cloud": a control plane with ``RUNTIME_KIND=quoroom`` provisions
the real (Node) Room behind ``quoroom-runtime gateway`` with the local provider; the open page
launches it at ``{runtime}/?token=<token>``, the real UI (built for this control plane's origin)
takes the token and drops it from the address bar, and refreshes it from its own origin with
``credentials: "include"``. With the shortest runtime-token TTL the settings accept (60 s), the
same flow shows a Room created from the UI's page listed in the UI, the UI's own scheduled refresh
(at 0.8 x TTL) swapping in a new token that the Room accepts, and a removed member refused a
refresh at once and locked out when their token expires (the gateway's proxy refuses an expired
token at its ``exp``, whatever the verifier's clock-skew leeway)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
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

pytestmark = pytest.mark.real_room

#: The shortest runtime-token TTL the settings accept; the UI refreshes at max(30 s, 0.8 x TTL).
TTL = 60

API = """async ([path, token, method, body]) => {
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== null) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method, headers, body: body === null ? undefined : JSON.stringify(body),
  });
  let json = null;
  try { json = await res.json(); } catch (err) {}
  return { status: res.status, body: json };
}"""
STORED = "() => localStorage.getItem('quoroom_cloud_token')"


@pytest.fixture(scope="module")
def quoroom_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    root = tmp_path_factory.mktemp("cp-quoroom")
    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        cli = room_cli(control_origin=url)  # the UI calls this control plane to refresh
    except BaseException:  # skipped or failed: the socket must not outlive the fixture
        sock.close()
        raise
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
        runtime_token_ttl_seconds=TTL,
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


async def _signed_up(http: httpx.AsyncClient, plane: ControlPlane, address: str) -> dict[str, str]:
    """Sign up, verify and log in; the bearer header."""
    r = await http.post("/api/auth/signup", json={"email": address, "password": PASSWORD})
    assert r.status_code == 202
    token = plane.wait_for_link(address, "verify-email").split("#token=", 1)[1]
    assert (await http.post("/api/auth/verify-email", json={"token": token})).is_success
    r = await http.post(
        "/api/auth/login", json={"email": address, "password": PASSWORD, "transport": "body"}
    )
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


async def _running_quoroom_room(
    plane: ControlPlane, address: str, member: str
) -> tuple[str, dict[str, str], str]:
    """Sign up, verify, create a Room (billing disabled), invite ``member`` (signed up and
    verified), who accepts; wait until it runs; its id, the owner's bearer header, the member's
    id."""
    async with httpx.AsyncClient(base_url=plane.url, timeout=10) as http:
        bearer = await _signed_up(http, plane, address)
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
        member_bearer = await _signed_up(http, plane, member)
        r = await http.post(
            f"/api/cloud/instances/{instance_id}/members", json={"email": member}, headers=bearer
        )
        assert r.status_code == 202, r.text
        member_id: str = r.json()["id"]
        # An invitation: the member accepts it (in the app) before the Room is theirs to open.
        r = await http.post(f"/api/cloud/invitations/{member_id}/accept", headers=member_bearer)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 120
        while True:
            status = (
                await http.get(f"/api/cloud/instances/{instance_id}/status", headers=bearer)
            ).json()
            if status["status"] == "running":
                return instance_id, bearer, member_id
            assert status["status"] in ("provisioning", "awaiting_payment"), status
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.5)


async def _launched(
    browser: Any, plane: ControlPlane, instance_id: str, address: str
) -> tuple[Any, Any, list[str]]:
    """A new context signed in as ``address`` on the open page, once the real UI took the token
    off the address bar; the context, its page and the launch navigations it saw."""
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
    await page.goto(f"{plane.url}/healthz")
    assert await page.evaluate(SIGN_IN, [address, PASSWORD]) == 200
    await page.goto(f"{plane.url}/app/instances/{instance_id}/open")
    # The real UI verifies the token, keeps it, and removes it from the address bar.
    taken = "localStorage.getItem('quoroom_cloud_token') && !location.search.includes('token=')"
    await page.wait_for_function(f"() => {taken}", timeout=60_000)
    return context, page, launched


def _exp(token: str) -> int:
    payload = token.split(".")[1]
    return int(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])


async def test_the_open_page_launches_the_real_room_which_takes_and_refreshes_its_token(
    browser: Any, quoroom_plane: ControlPlane, artifacts: Any
):
    address, member = "real-room@example.com", "real-member@example.com"
    instance_id, owner_bearer, member_id = await _running_quoroom_room(
        quoroom_plane, address, member
    )
    context, page, launched = await _launched(browser, quoroom_plane, instance_id, address)
    launched_at = time.monotonic()
    member_context, member_page, _ = await _launched(browser, quoroom_plane, instance_id, member)
    refresh_url = f"{quoroom_plane.url}/api/cloud/instances/{instance_id}/refresh-token"
    try:
        runtime = f"{urlsplit(page.url).scheme}://{urlsplit(page.url).netloc}"
        assert runtime != quoroom_plane.url
        (launch,) = launched
        assert launch.startswith(f"{runtime}/?token=")
        await page.screenshot(path=str(artifacts / "real-room-1-launched.png"))
        token = await page.evaluate(STORED)
        assert launch == f"{runtime}/?token={token}"

        # The refresh the UI makes, from the Room's own origin, with the control plane's cookies.
        refreshed = await page.evaluate(REFRESH, [refresh_url, token])
        assert refreshed["ok"] is True and refreshed["status"] == 200, refreshed
        assert refreshed["body"]["token"] != token

        # 1. A Room created with the UI's own "+ New Room" form shows in its list and in the
        # Room's API. The first-run walkthrough and the "Connect Your Clerk" dialog cover the
        # page, so the clicks are dispatched to the buttons themselves.
        await page.get_by_text("+ New Room", exact=True).dispatch_event("click")
        await page.get_by_placeholder("myproject").fill("launchpad")
        await page.get_by_role("button", name="Create", exact=True).dispatch_event("click")
        await page.get_by_text("launchpad", exact=True).first.wait_for(
            state="visible", timeout=20_000
        )
        await page.screenshot(path=str(artifacts / "real-room-2-created.png"))
        r = await page.evaluate(API, ["/api/rooms", token, "GET", None])
        assert r["status"] == 200, r
        assert [room["name"] for room in r["body"]] == ["launchpad"]

        # 3. A member opens the Room; the owner removes them: their refresh is refused at once,
        # and their token stops working when it expires (within the TTL of its issue).
        member_token = await member_page.evaluate(STORED)
        assert member_token and member_token != token
        r = await member_page.evaluate(API, ["/api/rooms", member_token, "GET", None])
        assert r["status"] == 200, r
        assert "launchpad" in [room["name"] for room in r["body"]]
        async with httpx.AsyncClient(base_url=quoroom_plane.url, timeout=10) as http:
            removed = await http.delete(
                f"/api/cloud/instances/{instance_id}/members/{member_id}", headers=owner_bearer
            )
        assert removed.status_code == 204, removed.text
        refused = await member_page.evaluate(REFRESH, [refresh_url, member_token])
        assert refused["ok"] is True and refused["status"] in (401, 403, 404), refused

        # 2. The UI's own scheduled refresh (0.8 x TTL after it took the token) swaps in a new
        # token, which the Room accepts for the UI's API calls.
        await page.wait_for_function(
            f"() => {STORED[6:]} !== {json.dumps(token)}", timeout=(TTL + 10) * 1000
        )
        swapped_after = time.monotonic() - launched_at
        new_token = await page.evaluate(STORED)
        assert new_token != token and _exp(new_token) > _exp(token)
        r = await page.evaluate(API, ["/api/rooms", new_token, "GET", None])
        assert r["status"] == 200, r
        assert "launchpad" in [room["name"] for room in r["body"]]
        await page.screenshot(path=str(artifacts / "real-room-3-refreshed.png"))

        # 3, continued: the removed member's token works until its exp, then no longer.
        expires = _exp(member_token)
        while True:
            r = await member_page.evaluate(API, ["/api/rooms", member_token, "GET", None])
            if r["status"] != 200:
                break
            assert time.time() < expires + 5, "still accepted past its expiry"
            await asyncio.sleep(1)
        assert r["status"] == 401 and "expired" in json.dumps(r["body"]), r
        lapsed_after_exp = time.time() - expires
        assert lapsed_after_exp > 0, lapsed_after_exp
        refused = await member_page.evaluate(REFRESH, [refresh_url, member_token])
        assert refused["ok"] is True and refused["status"] in (401, 403, 404), refused
        print(
            f"UI token swapped {swapped_after:.0f}s after launch; removed member's token "
            f"refused {lapsed_after_exp:.0f}s after its exp"
        )
    finally:
        await member_context.close()
        await context.close()
    # Neither log holds the token: the runtime's (gateway and Room) nor the control plane's
    # page never put it anywhere but the address it navigated to.
    log = (quoroom_plane.var_dir / "instances" / instance_id / "runtime.log").read_text()
    for secret in (token, new_token, member_token):
        assert secret not in log and secret.split(".")[2] not in log
