"""Issue 15, items 2 and 5, in Chromium with a CDP virtual authenticator (``WebAuthn.*``: CTAP2,
resident keys, user verification): add a passkey at /app/security, rename it, sign in with it
without a password, use it as the second step after a password; a passkey answer made on another
origin is refused; a cloned authenticator (the same credential copied with a lower signature
counter) is refused and recorded. The sessions list at 375 px: this device marked, another
session signed out, then every session.

WebAuthn needs a secure context and an RP id that is a domain: these tests run their own
control plane with ``PUBLIC_URL=http://localhost:<port>`` (``localhost`` is a secure context to
Chromium; the shared fixture's ``127.0.0.1`` cannot be an RP id)."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from control_plane.devserver import DevServer, bind_socket
from control_plane.settings import Settings
from tests.browser.conftest import PASSWORD, ControlPlane
from tests.browser.test_mobile_matrix import LAYOUT_PROBLEMS

AUTHENTICATOR = {
    "protocol": "ctap2",
    "transport": "internal",
    "hasResidentKey": True,
    "hasUserVerification": True,
    "isUserVerified": True,
    "automaticPresenceSimulation": True,
}
#: A page of another origin on the same host (another port): it may ask for assertions for the
#: RP id ``localhost`` too, so only the server's origin check stands between it and a sign-in.
EVIL_ORIGIN = "http://localhost:9"

#: The browser side of a WebAuthn ceremony on a page without our scripts (the other origin).
GET_ASSERTION = """async (publicKey) => {
  const bytes = (t) => Uint8Array.from(atob(t.replace(/-/g, "+").replace(/_/g, "/") +
    "===".slice((t.length + 3) % 4)), (c) => c.charCodeAt(0));
  const text = (b) => btoa(String.fromCharCode(...new Uint8Array(b)))
    .replace(/\\+/g, "-").replace(/\\//g, "_").replace(/=+$/, "");
  const options = { ...publicKey, challenge: bytes(publicKey.challenge),
    allowCredentials: (publicKey.allowCredentials || []).map((c) => ({ ...c, id: bytes(c.id) })) };
  const c = await navigator.credentials.get({ publicKey: options });
  const r = c.response;
  return { id: c.id, rawId: text(c.rawId), type: c.type, response: {
    clientDataJSON: text(r.clientDataJSON), authenticatorData: text(r.authenticatorData),
    signature: text(r.signature), userHandle: r.userHandle ? text(r.userHandle) : undefined } };
}"""


@pytest.fixture(scope="module")
def localhost_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    root = tmp_path_factory.mktemp("cp-localhost")
    sock = bind_socket("127.0.0.1", 0)
    url = f"http://localhost:{sock.getsockname()[1]}"
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
        run_worker=False,
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


def _db(plane: ControlPlane) -> sqlite3.Connection:
    return sqlite3.connect(plane.var_dir.parent / "cp.db")


async def _account(plane: ControlPlane, email: str) -> None:
    async with httpx.AsyncClient(base_url=plane.url, timeout=10) as http:
        r = await http.post("/api/auth/signup", json={"email": email, "password": PASSWORD})
        assert r.status_code == 202
        token = plane.wait_for_link(email, "verify-email").split("#token=", 1)[1]
        assert (await http.post("/api/auth/verify-email", json={"token": token})).is_success


@dataclass
class Tab:
    page: Any
    cdp: Any
    authenticator: str
    errors: list[str] = field(default_factory=list)


@pytest.fixture
async def tab(browser: Any) -> AsyncIterator[Tab]:
    """A phone-sized page (375 px, touch) with a virtual authenticator and its CDP session;
    console errors collected; confirmation dialogs accepted."""
    context = await browser.new_context(viewport={"width": 375, "height": 740}, has_touch=True)
    page = await context.new_page()
    cdp = await context.new_cdp_session(page)
    await cdp.send("WebAuthn.enable", {"enableUI": False})
    added = await cdp.send("WebAuthn.addVirtualAuthenticator", {"options": AUTHENTICATOR})
    tab = Tab(page, cdp, added["authenticatorId"])
    page.on("console", lambda m: tab.errors.append(m.text) if m.type == "error" else None)
    page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))
    try:
        yield tab
    finally:
        await context.close()


async def _password_sign_in(page: Any, plane: ControlPlane, email: str, next_path: str) -> None:
    await page.goto(f"{plane.url}/signin?next={next_path}")
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.keyboard.press("Enter")


async def _add_passkey(page: Any, plane: ControlPlane, email: str, name: str) -> list[str]:
    """Sign in, add a passkey named ``name`` at /app/security; the recovery codes shown."""
    await _password_sign_in(page, plane, email, "/app/security")
    await page.wait_for_url(f"{plane.url}/app/security")
    await page.get_by_label("Name for a new passkey").fill(name)
    await page.get_by_role("button", name="Add a passkey").click()
    codes = page.locator("#recovery-code-list li")
    await codes.first.wait_for()
    shown = [c.strip() for c in await codes.all_text_contents()]
    await page.get_by_role("button", name="I have saved them").click()
    await page.get_by_role("listitem").filter(has_text=name).wait_for()
    return shown


async def _focus_moves_to(page: Any, element_id: str, timeout: float = 5.0) -> None:
    # Polled from here: wait_for_function evaluates a string, which the pages' CSP forbids.
    deadline = time.monotonic() + timeout
    while await page.evaluate("() => document.activeElement.id") != element_id:
        assert time.monotonic() < deadline, f"focus never moved to #{element_id}"
        await asyncio.sleep(0.05)


async def test_add_rename_and_sign_in_with_a_passkey(tab: Tab, localhost_plane: ControlPlane):
    page, plane = tab.page, localhost_plane
    email = "passkey.owner@example.com"
    await _account(plane, email)
    codes = await _add_passkey(page, plane, email, "Test laptop")
    assert len(codes) == 10
    stored = await tab.cdp.send("WebAuthn.getCredentials", {"authenticatorId": tab.authenticator})
    assert len(stored["credentials"]) == 1 and stored["credentials"][0]["isResidentCredential"]
    assert stored["credentials"][0]["rpId"] == "localhost"

    await page.get_by_role("button", name="Rename passkey “Test laptop”").click()
    field = page.get_by_label("New name for “Test laptop”")
    assert await field.evaluate("el => el === document.activeElement")
    await field.fill("Work laptop")
    await page.get_by_role("button", name="Save").click()
    await page.get_by_text("Passkey renamed to “Work laptop”.").wait_for()
    await page.get_by_role("button", name="Rename passkey “Work laptop”").wait_for()

    await page.goto(f"{plane.url}/app")
    await page.get_by_role("button", name="Sign out", exact=True).click()
    await page.wait_for_url(f"{plane.url}/")
    await page.goto(f"{plane.url}/signin?next=/app/security")
    await page.get_by_role("button", name="Sign in with a passkey").click()
    await page.wait_for_url(f"{plane.url}/app/security")
    item = page.locator("#session-list li").filter(has_text="This device")
    await item.wait_for()
    assert "with passkey" in (await item.text_content() or "")
    row = page.locator("#passkey-list li").filter(has_text="Work laptop")
    assert "last used" in (await row.text_content() or "")
    assert not [e for e in tab.errors if "40" not in e], tab.errors


async def test_a_passkey_is_the_second_step_after_a_password(
    tab: Tab, localhost_plane: ControlPlane
):
    page, plane = tab.page, localhost_plane
    email = "passkey.second@example.com"
    await _account(plane, email)
    await _add_passkey(page, plane, email, "Phone")
    await page.goto(f"{plane.url}/app")
    await page.get_by_role("button", name="Sign out", exact=True).click()
    await page.wait_for_url(f"{plane.url}/")

    await _password_sign_in(page, plane, email, "/app")
    await page.wait_for_url(re.compile(r"/signin/second-factor\?next="))
    await page.get_by_role("button", name="Use a passkey").click()
    await page.wait_for_url(f"{plane.url}/app")
    await page.get_by_role("heading", name="My Rooms").wait_for()


async def test_an_answer_made_on_another_origin_is_refused(tab: Tab, localhost_plane: ControlPlane):
    """The page at another port of ``localhost`` gets a genuine assertion from the same
    authenticator for the same RP id and the server's own challenge; posted from the real
    origin with the right cookie, it is still refused: its client data names the other
    origin."""
    page, plane = tab.page, localhost_plane
    email = "passkey.origin@example.com"
    await _account(plane, email)
    await _add_passkey(page, plane, email, "Phone")
    await page.goto(f"{plane.url}/app")
    await page.get_by_role("button", name="Sign out", exact=True).click()
    await page.wait_for_url(f"{plane.url}/")

    await page.goto(f"{plane.url}/signin")
    options = await page.evaluate(
        "async () => (await (await fetch('/api/auth/passkey/options', {method: 'POST'})).json())"
    )
    await page.route(
        f"{EVIL_ORIGIN}/**",
        lambda route: route.fulfill(
            status=200, content_type="text/html", body="<!doctype html><title>elsewhere</title>"
        ),
    )
    await page.goto(f"{EVIL_ORIGIN}/phish")
    credential = await page.evaluate(GET_ASSERTION, options["public_key"])
    assert credential["id"]

    await page.goto(f"{plane.url}/signin")
    answer = await page.evaluate(
        """async (credential) => {
          const r = await fetch('/api/auth/passkey/sign-in', {method: 'POST',
            headers: {'content-type': 'application/json'}, body: JSON.stringify({credential})});
          return {status: r.status, body: await r.json()};
        }""",
        credential,
    )
    assert answer["status"] == 401 and answer["body"]["code"] == "passkey_origin_mismatch", answer
    me = await page.evaluate("async () => (await fetch('/api/auth/me')).status")
    assert me == 401

    # And the browser itself refuses a page of another site asking for our RP id.
    await page.route(
        "http://127.0.0.1:9/**",
        lambda route: route.fulfill(status=200, content_type="text/html", body="<title>x</title>"),
    )
    await page.goto("http://127.0.0.1:9/phish")
    refused = await page.evaluate(
        f"""async (publicKey) => {{
          try {{ await ({GET_ASSERTION})(publicKey); return "signed"; }}
          catch (err) {{ return err.name; }}
        }}""",
        options["public_key"],
    )
    assert refused in ("SecurityError", "NotAllowedError"), refused


async def test_a_cloned_authenticator_is_refused_and_recorded(
    tab: Tab, localhost_plane: ControlPlane
):
    page, plane = tab.page, localhost_plane
    email = "passkey.clone@example.com"
    await _account(plane, email)
    await _add_passkey(page, plane, email, "Phone")
    await page.goto(f"{plane.url}/app")
    await page.get_by_role("button", name="Sign out", exact=True).click()
    await page.wait_for_url(f"{plane.url}/")
    # Two passwordless sign-ins move the counter on.
    for _ in range(2):
        await page.goto(f"{plane.url}/signin?next=/app")
        await page.get_by_role("button", name="Sign in with a passkey").click()
        await page.wait_for_url(f"{plane.url}/app")
        await page.get_by_role("button", name="Sign out", exact=True).click()
        await page.wait_for_url(f"{plane.url}/")
    original = (
        await tab.cdp.send("WebAuthn.getCredentials", {"authenticatorId": tab.authenticator})
    )["credentials"][0]
    assert original["signCount"] >= 2, original

    # The same key copied to another authenticator when its counter was lower.
    await tab.cdp.send(
        "WebAuthn.removeVirtualAuthenticator", {"authenticatorId": tab.authenticator}
    )
    clone = await tab.cdp.send("WebAuthn.addVirtualAuthenticator", {"options": AUTHENTICATOR})
    copied = {**original, "signCount": 0}
    await tab.cdp.send(
        "WebAuthn.addCredential",
        {"authenticatorId": clone["authenticatorId"], "credential": copied},
    )
    await page.goto(f"{plane.url}/signin?next=/app")
    await page.get_by_role("button", name="Sign in with a passkey").click()
    await page.get_by_text("it looks copied to another device").wait_for()
    assert page.url.startswith(f"{plane.url}/signin")
    with _db(plane) as db:
        rows = db.execute(
            "SELECT p.counter_regressed_at FROM user_passkeys p JOIN users u ON u.id = p.user_id "
            "WHERE u.email = ?",
            (email,),
        ).fetchall()
    assert len(rows) == 1 and rows[0][0] is not None

    # The owner sees it on the security page (a password and a recovery code to get there).
    await _password_sign_in(page, plane, email, "/app/security")
    await page.wait_for_url(re.compile(r"/signin/second-factor"))
    await page.get_by_role("button", name="Use a passkey").click()
    await page.get_by_text("it looks copied to another device").wait_for()


async def test_removing_a_passkey_asks_for_a_step_up_that_a_passkey_answers(
    tab: Tab, localhost_plane: ControlPlane
):
    """Ten minutes after the last proof (here: the session's step-up time cleared in the
    database, as the passing of time would), removing a passkey opens the step-up dialog; its
    "Use a passkey" button proves the factor and the removal goes through."""
    page, plane = tab.page, localhost_plane
    email = "passkey.stepup@example.com"
    await _account(plane, email)
    await _add_passkey(page, plane, email, "Phone")
    # The second passkey on another authenticator (this one already holds the account's).
    await tab.cdp.send(
        "WebAuthn.removeVirtualAuthenticator", {"authenticatorId": tab.authenticator}
    )
    await tab.cdp.send("WebAuthn.addVirtualAuthenticator", {"options": AUTHENTICATOR})
    await page.get_by_label("Name for a new passkey").fill("Spare key")
    await page.get_by_role("button", name="Add a passkey").click()
    await page.get_by_text("Passkey “Spare key” added.").wait_for()
    with _db(plane) as db:
        db.execute(
            "UPDATE user_sessions SET second_factor_at = NULL "
            "WHERE user_id = (SELECT id FROM users WHERE email = ?)",
            (email,),
        )
    await page.get_by_role("button", name="Remove passkey “Spare key”").click()
    dialog = page.get_by_role("dialog", name="Confirm it is you")
    await dialog.wait_for()
    await dialog.get_by_role("button", name="Use a passkey").click()
    await page.get_by_text("Passkey “Spare key” removed.").wait_for()
    await dialog.wait_for(state="hidden")
    await _focus_moves_to(page, "passkeys-title")  # after the list was loaded again
    names = await page.locator("#passkey-list .item-name").all_text_contents()
    assert names == ["Phone"]


async def test_the_security_page_lists_sessions_and_signs_them_out(
    tab: Tab, localhost_plane: ControlPlane
):
    page, plane = tab.page, localhost_plane
    email = "sessions.owner@example.com"
    await _account(plane, email)
    async with httpx.AsyncClient(
        base_url=plane.url, timeout=10, headers={"User-Agent": "quoroom-cli/1.0"}
    ) as cli:
        r = await cli.post(
            "/api/auth/login", json={"email": email, "password": PASSWORD, "transport": "body"}
        )
        bearer = {"Authorization": f"Bearer {r.json()['access_token']}"}
        await _password_sign_in(page, plane, email, "/app/security")
        await page.wait_for_url(f"{plane.url}/app/security")
        sessions = page.locator("#session-list li")
        await sessions.nth(1).wait_for()
        assert await sessions.count() == 2
        mine = sessions.filter(has_text="This device")
        assert "Chrome on Linux" in (await mine.text_content() or "")
        assert "127.0.0.0/24" in (await mine.text_content() or "")
        await page.get_by_role("heading", name="Where you are signed in").wait_for()
        assert not await page.evaluate(LAYOUT_PROBLEMS, 44)
        for label in ("Name for a new passkey", "Current password", "New password"):
            await page.get_by_label(label).wait_for()

        await page.get_by_role("button", name=re.compile(r"^Sign out quoroom-cli")).click()
        await page.get_by_text("quoroom-cli was signed out.").wait_for()
        await _focus_moves_to(page, "sessions-title")
        assert await sessions.count() == 1
        assert (await cli.get("/api/auth/me", headers=bearer)).status_code == 401

        r = await cli.post(
            "/api/auth/login", json={"email": email, "password": PASSWORD, "transport": "body"}
        )
        bearer = {"Authorization": f"Bearer {r.json()['access_token']}"}
        await page.get_by_role("button", name="Sign out everywhere").click()
        await page.wait_for_url(re.compile(r"/signin"))
        assert (await cli.get("/api/auth/me", headers=bearer)).status_code == 401
        me = await page.evaluate("async () => (await fetch('/api/auth/me')).status")
        assert me == 401
