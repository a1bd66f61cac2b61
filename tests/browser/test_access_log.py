"""The access log page (issue 15, item 5) in Chromium at 375 px: reached from /app and from the
members page, a captioned table with column headers, a labelled filter, older pages on demand,
a CSV download that follows the filter, and no sideways scrolling of the page."""

from __future__ import annotations

import base64
import csv
import io
import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt

from control_plane.instances.access_log import report_key
from control_plane.settings import Settings
from tests.browser.conftest import PASSWORD, ControlPlane
from tests.browser.test_cors import _running_room


def _key(instance_id: str) -> str:
    # The browser fixture's control plane seals with this KEK (tests/browser/conftest.py).
    settings = Settings(
        env="development", key_encryption_key=base64.urlsafe_b64encode(b"k" * 32).decode()
    )
    return report_key(settings, instance_id)


async def _report(control_plane: ControlPlane, instance_id: str, owner: str) -> None:
    """A launch with a formula for a user agent, and what the instance's runtime sends when it
    refused expired tokens this minute."""
    minute = int(time.time()) // 60 * 60
    body = {
        "instanceId": instance_id,
        "batchId": uuid.uuid4().hex,
        "entries": [
            {"minute": minute, "reason": "token_expired", "address": "198.51.100.7", "count": 12},
            {
                "minute": minute,
                "reason": "origin_not_allowed",
                "address": "203.0.113.9",
                "count": 1,
            },
        ],
    }
    async with httpx.AsyncClient(base_url=control_plane.url, timeout=10) as http:
        r = await http.post(
            "/api/auth/login", json={"email": owner, "password": PASSWORD, "transport": "body"}
        )
        bearer = {"Authorization": f"Bearer {r.json()['access_token']}"}
        r = await http.post(
            f"/api/cloud/instances/{instance_id}/runtime-token",
            headers={**bearer, "User-Agent": "=1+1"},  # a launch whose user agent is a formula
        )
        assert r.status_code == 200, r.text
        r = await http.post(
            f"/api/cloud/instances/{instance_id}/access-reports",
            json=body,
            headers={"Authorization": f"Bearer {_key(instance_id)}"},
        )
        assert r.status_code == 202, r.text


async def test_the_owner_reads_filters_and_exports_the_access_log_on_a_phone(
    browser: Any, control_plane: ControlPlane
) -> None:
    address = "owner.log@example.com"
    grant = await _running_room(control_plane, address)
    room = jwt.decode(grant["token"], options={"verify_signature": False})["instanceId"]
    await _report(control_plane, room, address)
    context = await browser.new_context(viewport={"width": 375, "height": 812})
    page = await context.new_page()
    try:
        await page.goto(f"{control_plane.url}/app")
        await page.wait_for_url(re.compile(r"/signin\?next="))
        await page.get_by_label("Email").fill(address)
        await page.get_by_label("Password").fill(PASSWORD)
        await page.keyboard.press("Enter")
        await page.wait_for_url(f"{control_plane.url}/app")

        # From the members page (the instance's manage page) to its access log.
        row = page.locator("li.instance", has_text="CORS room")
        await row.get_by_role("link", name="Members of CORS room").click()
        await page.get_by_role("heading", name="Members of CORS room").wait_for()
        await page.get_by_role("link", name="Access log").click()
        await page.get_by_role("heading", name="Access log of CORS room").wait_for()

        table = page.get_by_role("table", name="Access log entries, newest first")
        await table.wait_for()
        for header in ("When", "What", "Who", "From", "Browser", "Count"):
            assert await table.get_by_role("columnheader", name=header).count() == 1
        await table.get_by_role("cell", name="Opened the Room").first.wait_for()
        await table.get_by_role("cell", name="Refused: Expired token").wait_for()
        await page.get_by_text("Entries are kept for 90 days.").wait_for()
        refused = table.locator("tr", has_text="Refused: Expired token")
        assert await refused.get_by_role("cell", name="198.51.100.7", exact=True).count() == 1
        assert await refused.get_by_role("cell", name="198.51.100.0/24", exact=True).count() == 1
        assert await refused.get_by_role("cell", name="12", exact=True).count() == 1

        # 375 px: the page never scrolls sideways; the table scrolls in its own focusable box.
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, width
        box = page.get_by_role("region", name="Access log entries, newest first")
        assert await box.get_attribute("tabindex") == "0"
        assert await box.evaluate("e => getComputedStyle(e).overflowX") == "auto"

        # The labelled filter: refused attempts only, and the CSV link follows it.
        await page.get_by_label("Show").select_option("refused")
        await page.wait_for_function(
            "() => [...document.querySelectorAll('#access-rows tr')]"
            ".every(r => r.dataset.kind === 'refused')"
        )
        assert await table.locator("tbody tr").count() == 2
        csv_link = page.get_by_role("link", name="Download CSV")
        href = await csv_link.get_attribute("href")
        assert href is not None and href.endswith("access-log.csv?category=refused")
        async with page.expect_download() as pending:
            await csv_link.click()
        download = await pending.value
        text = Path(await download.path()).read_text(encoding="utf-8")
        rows = list(csv.DictReader(io.StringIO(text)))
        assert {r["reason"] for r in rows} == {"token_expired", "origin_not_allowed"}
        everything = await page.request.get(
            f"{control_plane.url}/api/cloud/instances/{room}/access-log.csv"
        )
        agents = {r["user_agent"] for r in csv.DictReader(io.StringIO(await everything.text()))}
        assert "'=1+1" in agents  # no formula reaches a spreadsheet

        # Keyboard: the filter and the table's box are reachable with Tab.
        await page.get_by_label("Show").focus()
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.id") == "access-csv"
    finally:
        await context.close()
