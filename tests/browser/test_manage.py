"""The Room page keeps its token fresh (80 % of its life, through the control plane, across
origins), and the owner manages members and deletes a Room from /app."""

from __future__ import annotations

import re
from typing import Any

from tests.browser.conftest import PASSWORD, ControlPlane
from tests.browser.test_cors import _running_room


async def test_the_room_page_refreshes_its_token_through_the_control_plane(
    browser: Any, control_plane: ControlPlane
):
    grant = await _running_room(control_plane, "refresh@example.com")
    context = await browser.new_context()
    page = await context.new_page()
    try:
        await page.clock.install()
        await page.goto(f"{grant['runtime_url'].rstrip('/')}/#launch={grant['token']}")
        await page.wait_for_selector("#role[data-role=owner]")
        assert "#launch" not in page.url
        first = await page.evaluate("sessionStorage.getItem('quoroom.runtimeToken')")
        assert first == grant["token"]
        # Past 80 % of the token's life: the page asks the control plane (its iss) for a new one.
        await page.clock.fast_forward("10:00")
        await page.wait_for_function(
            "t => sessionStorage.getItem('quoroom.runtimeToken') !== t", arg=first
        )
        assert await page.locator("#role").inner_text() == "owner"
    finally:
        await context.close()


async def test_the_owner_adds_and_removes_a_member_and_deletes_the_room(
    browser: Any, control_plane: ControlPlane
):
    address = "owner.manage@example.com"
    await _running_room(control_plane, address)
    context = await browser.new_context(viewport={"width": 375, "height": 812})
    page = await context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # window.confirm on Remove
    try:
        await page.goto(f"{control_plane.url}/app")
        await page.wait_for_url(re.compile(r"/signin\?next=(%2F|/)app$"))
        await page.get_by_label("Email").fill(address)
        await page.get_by_label("Password").fill(PASSWORD)
        await page.keyboard.press("Enter")  # keyboard-usable: Enter submits
        await page.wait_for_url(f"{control_plane.url}/app")

        row = page.locator("li.instance", has_text="CORS room")
        await row.get_by_role("link", name="Members of CORS room").click()
        await page.get_by_role("heading", name="Members of CORS room").wait_for()
        await page.get_by_label("Invite someone by email").fill(address)
        await page.get_by_role("button", name="Invite").click()
        # The owner cannot be their own member: the refusal is shown, not swallowed.
        refusal = page.locator("#email-error:not([hidden]), #page-alert:not([hidden])")
        await refusal.first.wait_for()
        await page.get_by_label("Invite someone by email").fill("friend@example.com")
        await page.get_by_role("button", name="Invite").click()
        member = page.locator("li.member", has_text="friend@example.com")
        await member.get_by_text("Invited").wait_for()
        await member.get_by_role("button", name="Remove friend@example.com").click()
        await page.get_by_text("No members yet.").wait_for()

        await page.goto(f"{control_plane.url}/app")
        delete = row.get_by_role("button", name="Delete CORS room")
        await delete.click()
        dialog = page.locator("dialog#delete-dialog")
        await dialog.get_by_role("button", name="Keep it").click()
        assert await row.locator(".badge[data-status=running]").is_visible()
        await delete.click()
        await dialog.get_by_role("button", name="Delete").click()
        await page.get_by_text("The Room is being deleted.").wait_for()
        await row.locator(".badge:not([data-status=running])").wait_for()
    finally:
        await context.close()
