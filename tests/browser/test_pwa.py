"""The installable app shell (issue 17), in Chromium: the manifest and the service worker are
served with their content types under the pages' CSP; ``/app`` installs with no installability
error; the worker stores only static files and the offline shell — never an API answer, a token
or a page that came with cookies — and ``/app`` opens offline saying the Rooms are unreachable; a
new release takes over on the next navigation with a notice and no reload; and from the app in
standalone display mode, "Open" goes into the reference Room and back."""

from __future__ import annotations

import asyncio
import re
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.templating import Jinja2Templates

from tests.browser.conftest import PASSWORD, ControlPlane
from tests.browser.test_cors import _running_room

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: Every entry of every cache of this origin: URL, Set-Cookie present, the body's text.
CACHE_ENTRIES = """async () => {
  const out = [];
  for (const name of await caches.keys()) {
    const cache = await caches.open(name);
    for (const request of await cache.keys()) {
      const response = await cache.match(request);
      const type = response.headers.get("content-type") || "";
      const text = /text|javascript|json|css/.test(type) ? await response.clone().text() : "";
      out.push({
        cache: name,
        url: request.url,
        setCookie: response.headers.has("set-cookie"),
        text,
      });
    }
  }
  return out;
}"""
WORKER_READY = "navigator.serviceWorker.ready.then((reg) => reg.active.scriptURL)"
READY_SECONDS = 20


@pytest.fixture(scope="module")
def room_owner(control_plane: ControlPlane) -> Iterator[tuple[str, dict[str, Any]]]:
    """A signed-up, verified person with a running reference Room (created through the API)."""
    address = "pwa.owner@example.com"
    grant = asyncio.run(_running_room(control_plane, address))
    yield address, grant


async def _worker_ready(page: Any) -> str:
    """The active worker's script URL, once it controls ``page``. A page whose navigation began
    while the first worker was still activating stays uncontrolled (``clients.claim()`` ran
    before it existed), as it would for a person: the next load is controlled."""
    script = await asyncio.wait_for(page.evaluate(WORKER_READY), READY_SECONDS)
    if not await page.evaluate("navigator.serviceWorker.controller !== null"):
        await page.reload()
    assert await page.evaluate("navigator.serviceWorker.controller !== null")
    return str(script)


async def _sign_in(page: Any, control_plane: ControlPlane, address: str) -> None:
    await page.goto(f"{control_plane.url}/signin?next=/app")
    await page.get_by_label("Email").fill(address)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.keyboard.press("Enter")
    await page.wait_for_url(f"{control_plane.url}/app")


def _csp_watch(page: Any) -> list[str]:
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    return errors


def _png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_SIGNATURE)
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_the_manifest_and_worker_are_served_with_their_types_and_the_pages_link_them(
    control_plane: ControlPlane,
):
    async with httpx.AsyncClient(base_url=control_plane.url) as http:
        r = await http.get("/manifest.webmanifest")
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/manifest+json"
        manifest = r.json()
        assert manifest["start_url"] == "/app" and manifest["scope"] == "/"
        assert manifest["display"] == "standalone"
        assert manifest["name"] and manifest["short_name"]
        assert re.fullmatch(r"#[0-9a-f]{6}", manifest["theme_color"])
        assert re.fullmatch(r"#[0-9a-f]{6}", manifest["background_color"])
        purposes = set()
        for icon in manifest["icons"]:
            got = await http.get(icon["src"])
            assert got.headers["content-type"] == "image/png"
            size = _png_size(got.content)
            assert f"{size[0]}x{size[1]}" == icon["sizes"]
            purposes.add(icon.get("purpose", "any"))
        assert purposes == {"any", "maskable"}

        r = await http.get("/sw.js")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/javascript")
        assert r.headers["cache-control"] == "no-cache"
        release = re.search(r'const RELEASE = "([0-9a-f]{12})"', r.text)
        assert release is not None

        page = (await http.get("/")).text
        assert '<link rel="manifest" href="/manifest.webmanifest">' in page
        assert f'<meta name="quoroom-release" content="{release.group(1)}">' in page
        touch = re.search(r'<link rel="apple-touch-icon" href="([^"]+)">', page)
        assert touch is not None
        assert _png_size((await http.get(touch.group(1))).content) == (180, 180)
        for meta in ("apple-mobile-web-app-capable", "apple-mobile-web-app-title", "theme-color"):
            assert f'<meta name="{meta}"' in page
        # The offline shell is no one's page: no account links, no personal data.
        r = await http.get("/offline")
        assert r.status_code == 200 and "You are offline" in r.text


async def test_app_installs_in_chromium_with_no_installability_error(
    profile_context: Any, control_plane: ControlPlane, room_owner: tuple[str, dict[str, Any]]
):
    context = profile_context
    page = await context.new_page()
    page.set_default_timeout(20_000)
    errors = _csp_watch(page)
    await _sign_in(page, control_plane, room_owner[0])
    await page.locator("li.instance").first.wait_for()
    script = await _worker_ready(page)
    assert script == f"{control_plane.url}/sw.js"
    cdp = await context.new_cdp_session(page)
    result = await cdp.send("Page.getInstallabilityErrors")
    assert result["installabilityErrors"] == [], result
    manifest = await cdp.send("Page.getAppManifest")
    assert manifest["url"] == f"{control_plane.url}/manifest.webmanifest"
    assert manifest["errors"] == [], manifest["errors"]
    assert not errors, errors


async def test_the_worker_stores_no_api_answer_token_or_cookie_bearing_page_and_app_works_offline(
    browser: Any, control_plane: ControlPlane, room_owner: tuple[str, dict[str, Any]]
):
    address, grant = room_owner
    context = await browser.new_context()
    page = await context.new_page()
    page.set_default_timeout(20_000)
    errors = _csp_watch(page)
    try:
        await _sign_in(page, control_plane, address)
        await _worker_ready(page)
        # Everything a signed-in person touches, through the worker: the API (GET and POST),
        # every private page, the runtime-token grant and the Room it opens.
        await page.locator("li.instance").first.wait_for()
        members = await page.locator("li.instance a[href$='/members']").first.get_attribute("href")
        for path in ("/cloud/new", members, "/app"):
            await page.goto(f"{control_plane.url}{path}")
            await page.wait_for_load_state("networkidle")
        await page.evaluate(
            "async () => { await Q.api('GET', '/api/cloud/instances'); await Q.api('GET',"
            " '/api/auth/me'); }"
        )
        await page.get_by_role("link", name=re.compile("^Open")).first.click()
        await page.wait_for_url(lambda url: not url.startswith(control_plane.url))
        await page.wait_for_selector("#role[data-role=owner]")
        # The Room's origin is not the control plane's: no worker of ours controls it.
        assert await page.evaluate("navigator.serviceWorker.controller === null")
        await page.goto(f"{control_plane.url}/app")
        await page.locator("li.instance").first.wait_for()

        entries = await page.evaluate(CACHE_ENTRIES)
        release = await page.get_attribute('meta[name="quoroom-release"]', "content")
        assert {e["cache"] for e in entries} == {f"quoroom-shell-{release}"}
        for entry in entries:
            path = entry["url"].removeprefix(control_plane.url)
            assert path.startswith("/static/") or path == "/offline", path
            assert "/api/" not in path and "token" not in path.lower(), path
            assert not entry["setCookie"], path
            assert address not in entry["text"] and grant["token"] not in entry["text"], path
        cookies = {c["value"] for c in await context.cookies()}
        assert cookies and not any(v in e["text"] for e in entries for v in cookies)

        # Offline: /app is the shell, saying the Rooms are unreachable, with its styles; the API
        # is not answered from any cache.
        await context.set_offline(True)
        await page.goto(f"{control_plane.url}/app")
        await page.get_by_role("heading", name="You are offline").wait_for()
        assert "cannot be reached" in await page.locator("#offline").inner_text()
        assert page.url == f"{control_plane.url}/app"
        background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background != "rgba(0, 0, 0, 0)"  # site.css came from the cache
        api = await page.evaluate(
            "fetch('/api/cloud/instances').then(r => r.status, e => 'failed: ' + e)"
        )
        assert str(api).startswith("failed"), api
        await context.set_offline(False)
        await page.get_by_role("button", name="Try again").click()
        await page.locator("li.instance").first.wait_for()
        assert not errors, errors
    finally:
        await context.close()


async def test_a_new_release_takes_over_on_the_next_navigation_with_a_notice_and_no_reload_loop(
    browser: Any, control_plane: ControlPlane, room_owner: tuple[str, dict[str, Any]]
):
    templates = control_plane.server.config.app.state.services.get(Jinja2Templates)
    first = templates.env.globals["release"]
    context = await browser.new_context()
    page = await context.new_page()
    loads: list[str] = []
    page.on("load", lambda p: loads.append(p.url))
    try:
        await _sign_in(page, control_plane, room_owner[0])
        await _worker_ready(page)
        assert await page.evaluate("caches.keys()") == [f"quoroom-shell-{first}"]

        templates.env.globals["release"] = "0123456789ab"  # what a deploy of a new release does
        await page.goto(f"{control_plane.url}/cloud/new")
        notice = page.locator("#app-update")
        await notice.wait_for(state="visible", timeout=15_000)
        assert "updated" in await notice.inner_text()
        await page.wait_for_function(
            "async () => (await caches.keys()).join() === 'quoroom-shell-0123456789ab'"
        )
        settled = len(loads)
        await page.wait_for_timeout(1500)
        assert len(loads) == settled, loads  # no reload, let alone a loop
        # The next page is the new release's: the notice is shown once more, then not again.
        await page.goto(f"{control_plane.url}/app")
        await notice.wait_for(state="visible")
        await page.get_by_role("button", name="Dismiss").click()
        assert await notice.is_hidden()
        await page.goto(f"{control_plane.url}/cloud/new")
        await page.wait_for_load_state("networkidle")
        assert await notice.is_hidden()
    finally:
        templates.env.globals["release"] = first
        await context.close()


async def test_a_room_opens_from_the_installed_app_in_standalone_mode_and_the_person_comes_back(
    profile_context: Any, control_plane: ControlPlane, room_owner: tuple[str, dict[str, Any]]
):
    """Installed (CDP ``PWA.install``) and launched (``PWA.launch``) in its own standalone
    window, as Chrome does from the home screen, not a tab with display-mode faked."""
    context = profile_context
    page = await context.new_page()
    await _sign_in(page, control_plane, room_owner[0])
    await _worker_ready(page)
    cdp = await context.new_cdp_session(page)
    manifest_id = f"{control_plane.url}/app"
    await cdp.send("PWA.install", {"manifestId": manifest_id})
    await cdp.send(
        "PWA.changeAppUserSettings", {"manifestId": manifest_id, "displayMode": "standalone"}
    )
    async with context.expect_page() as launched:
        await cdp.send("PWA.launch", {"manifestId": manifest_id})
    app = await launched.value
    errors = _csp_watch(app)
    await app.wait_for_load_state()
    assert app.url == f"{control_plane.url}/app"  # the manifest's start_url
    assert await app.evaluate("matchMedia('(display-mode: standalone)').matches")

    row = app.locator("li.instance", has_text="CORS room")
    await row.locator(".badge[data-status=running]").wait_for()
    # No toolbar in an installed app: pages below /app get a Back button, /app itself none.
    assert await app.locator(".app-back").count() == 0
    await row.get_by_role("link", name="Members of CORS room").tap()
    await app.get_by_role("heading", name="Members of CORS room").wait_for()
    await app.locator(".app-back").tap()
    await app.wait_for_url(f"{control_plane.url}/app")

    await row.get_by_role("link", name="Open CORS room").tap()
    await app.wait_for_url(lambda url: url.startswith(room_owner[1]["runtime_url"]))
    await app.wait_for_selector("#role[data-role=owner]")
    assert "#launch" not in app.url
    assert await app.evaluate("navigator.serviceWorker.controller === null")
    await app.go_back()
    await app.wait_for_url(f"{control_plane.url}/app")
    await row.locator(".badge[data-status=running]").wait_for()
    assert await app.evaluate("matchMedia('(display-mode: standalone)').matches")
    assert await app.evaluate("navigator.serviceWorker.controller !== null")
    assert not errors, errors
