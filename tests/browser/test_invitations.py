"""Issue 12, item 6, in a browser: an invitee opens the emailed link signed out, signs in, and
accepts with a click; another invitation is accepted from /app. Nothing is shared before."""

from __future__ import annotations

import re
from typing import Any

import httpx

from tests.browser.conftest import PASSWORD, ControlPlane


async def _account(http: httpx.AsyncClient, plane: ControlPlane, address: str) -> dict[str, str]:
    r = await http.post("/api/auth/signup", json={"email": address, "password": PASSWORD})
    assert r.status_code == 202
    token = plane.wait_for_link(address, "verify-email").split("#token=", 1)[1]
    assert (await http.post("/api/auth/verify-email", json={"token": token})).is_success
    r = await http.post(
        "/api/auth/login", json={"email": address, "password": PASSWORD, "transport": "body"}
    )
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


async def _room(http: httpx.AsyncClient, owner: dict[str, str], name: str) -> str:
    catalog = (await http.get("/api/cloud/catalog", headers=owner)).json()
    r = await http.post(
        "/api/cloud/instances",
        json={
            "name": name,
            "tier": catalog["tiers"][0]["id"],
            "region": catalog["regions"][0]["id"],
        },
        headers=owner,
    )
    assert r.status_code == 201, r.text
    instance_id: str = r.json()["instance"]["id"]
    return instance_id


async def test_an_invitee_accepts_by_the_link_and_in_the_app(
    browser: Any, control_plane: ControlPlane
):
    invitee = "invitee.browser@example.com"
    async with httpx.AsyncClient(base_url=control_plane.url, timeout=10) as http:
        owner = await _account(http, control_plane, "owner.invites@example.com")
        first = await _room(http, owner, "Invited room")
        second = await _room(http, owner, "Second room")
        r = await http.post(
            f"/api/cloud/instances/{first}/members", json={"email": invitee}, headers=owner
        )
        assert r.status_code == 202, r.text
        link = control_plane.wait_for_link(invitee, "accept-invite")
        await _account(http, control_plane, invitee)
        r = await http.post(
            f"/api/cloud/instances/{second}/members", json={"email": invitee}, headers=owner
        )
        assert r.status_code == 202, r.text

    context = await browser.new_context()
    page = await context.new_page()
    try:
        await page.goto(link)
        assert "#token" not in page.url  # taken off the address bar at once
        signin = page.locator("#invite-signin")
        await signin.wait_for()
        await signin.get_by_role("link", name="Sign in").click()
        await page.wait_for_url(re.compile(r"/signin\?next="))
        await page.get_by_label("Email").fill(invitee)
        await page.get_by_label("Password").fill(PASSWORD)
        await page.keyboard.press("Enter")
        await page.wait_for_url(f"{control_plane.url}/accept-invite")
        # Signed in: nothing happens until the invitee says yes.
        accept = page.get_by_role("button", name="Accept the invitation")
        await accept.wait_for()
        await accept.click()
        await page.locator("#invite-done", has_text="You joined Invited room").wait_for()

        await page.goto(f"{control_plane.url}/app")
        await page.locator("li.instance", has_text="Invited room").wait_for()
        assert await page.locator("li.instance", has_text="Second room").count() == 0
        invitation = page.locator("#invitations li", has_text="Second room")
        await invitation.get_by_text("owner.invites@example.com invited you to").wait_for()
        await invitation.get_by_role("button", name="Accept the invitation to Second room").click()
        await page.locator("li.instance", has_text="Second room").wait_for()
        await page.locator("#invitations").wait_for(state="hidden")
    finally:
        await context.close()
