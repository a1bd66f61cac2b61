"""Issue 15, items 1 and 3, in a browser: turn on two-step sign-in at /app/security (the QR code
shown, the key in text, a first code, the recovery codes once), sign out, then sign in with the
password and a code from the authenticator (pyotp, at the server's real clock); later, a step-up
answered in the dialog with a recovery code (a wrong code first)."""

from __future__ import annotations

import re
import sqlite3
import time
from typing import Any

import httpx
import pyotp

from tests.browser.conftest import PASSWORD, ControlPlane

EMAIL = "two.step@example.com"


async def test_enrol_then_sign_in_in_two_steps(browser: Any, control_plane: ControlPlane):
    async with httpx.AsyncClient(base_url=control_plane.url, timeout=10) as http:
        r = await http.post("/api/auth/signup", json={"email": EMAIL, "password": PASSWORD})
        assert r.status_code == 202
        token = control_plane.wait_for_link(EMAIL, "verify-email").split("#token=", 1)[1]
        assert (await http.post("/api/auth/verify-email", json={"token": token})).is_success

    context = await browser.new_context()
    page = await context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        await page.goto(f"{control_plane.url}/signin?next=/app/security")
        await page.get_by_label("Email").fill(EMAIL)
        await page.get_by_label("Password").fill(PASSWORD)
        await page.keyboard.press("Enter")
        await page.wait_for_url(f"{control_plane.url}/app/security")

        await page.get_by_role("button", name="Set up an authenticator app").click()
        qr = page.get_by_role("img", name=re.compile("QR code"))
        await qr.wait_for()
        assert (await qr.get_attribute("src") or "").startswith("data:image/svg+xml")
        assert await qr.evaluate("img => img.complete && img.naturalWidth > 100")
        secret = (await page.locator("#totp-secret").text_content() or "").strip()
        assert re.fullmatch(r"[A-Z2-7]{32}", secret)
        await page.get_by_label("Code the app shows now").fill(pyotp.TOTP(secret).now())
        await page.get_by_role("button", name="Turn on two-step sign-in").click()
        codes = page.locator("#recovery-code-list li")
        await codes.first.wait_for()
        assert await codes.count() == 10
        recovery = [c.strip() for c in await codes.all_text_contents()]
        await page.get_by_role("button", name="I have saved them").click()
        await page.locator("#totp-on").wait_for()
        assert await page.locator("#totp-secret").text_content() == ""

        await page.get_by_role("button", name="Sign out", exact=True).click()
        await page.wait_for_url(f"{control_plane.url}/")
        await page.goto(f"{control_plane.url}/signin?next=/app")
        await page.get_by_label("Email").fill(EMAIL)
        await page.get_by_label("Password").fill(PASSWORD)
        await page.keyboard.press("Enter")
        await page.wait_for_url(re.compile(r"/signin/second-factor\?next="))
        field = page.get_by_label("Code from your authenticator app")
        await field.fill("000000")
        await page.keyboard.press("Enter")
        await page.get_by_text("That code is not right").wait_for()
        # The next step's code: the enrolment used this step's (one step of drift is accepted).
        await field.fill(pyotp.TOTP(secret).at(time.time() + 30))
        await page.keyboard.press("Enter")
        await page.wait_for_url(f"{control_plane.url}/app")
        await page.get_by_role("heading", name="My Rooms").wait_for()

        # Ten minutes on (the session's step-up time cleared, as the passing of time would):
        # new recovery codes need the factor again, asked for in the step-up dialog.
        with sqlite3.connect(control_plane.var_dir.parent / "cp.db") as db:
            db.execute(
                "UPDATE user_sessions SET second_factor_at = NULL "
                "WHERE user_id = (SELECT id FROM users WHERE email = ?)",
                (EMAIL,),
            )
        await page.goto(f"{control_plane.url}/app/security")
        await page.get_by_role("button", name="Make new recovery codes").click()
        dialog = page.get_by_role("dialog", name="Confirm it is you")
        await dialog.wait_for()
        code = dialog.get_by_label("Code from your authenticator app, or a recovery code")
        await code.fill("000000")
        await dialog.get_by_role("button", name="Confirm").click()
        await dialog.locator("#step-up-code-error").filter(has_text=re.compile(".")).wait_for()
        await code.fill(recovery[0])
        await dialog.get_by_role("button", name="Confirm").click()
        await dialog.wait_for(state="hidden")
        new_codes = page.locator("#recovery-code-list li")
        await new_codes.first.wait_for()
        fresh = [c.strip() for c in await new_codes.all_text_contents()]
        assert len(fresh) == 10 and not set(fresh) & set(recovery)
        assert not [e for e in errors if not re.search(r"\b(401|403)\b", e)], errors
    finally:
        await context.close()
