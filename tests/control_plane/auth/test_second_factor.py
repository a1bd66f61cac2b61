"""The second factor (issue 15, item 1): TOTP enrolment, the two-step sign-in, recovery codes,
replay, throttling and removal; and the step-up rule (item 3). Codes come from pyotp, at the
app's (fake) clock."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pyotp
from sqlalchemy import select

from control_plane.auth import second_factor
from control_plane.auth.models import RecoveryCode, User, UserTotp
from tests.control_plane.conftest import PASSWORD, PUBLIC_URL, Harness, signup_and_verify

OWNER = "owner@example.com"
STEP = 30


@asynccontextmanager
async def _browser(h: Harness, address: str = "192.0.2.50") -> AsyncIterator[httpx.AsyncClient]:
    """Another browser (its own cookie jar) at ``address``."""
    transport = httpx.ASGITransport(app=h.app, client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url=PUBLIC_URL) as client:
        yield client


def _code(h: Harness, secret: str, offset: int = 0) -> str:
    return pyotp.TOTP(secret).at(int(h.clock.now.timestamp()) + offset)


def _csrf(signed_in: dict[str, Any]) -> dict[str, str]:
    return {"X-CSRF-Token": signed_in["csrf_token"], "Origin": PUBLIC_URL}


@dataclass
class Enrolled:
    secret: str
    recovery_codes: list[str]
    headers: dict[str, str]  # the enrolling browser's (h.client) CSRF headers


async def _enrol(h: Harness, email: str = OWNER) -> Enrolled:
    """Sign up, sign in (h.client, cookies), turn TOTP on; the clock then moves one step on so
    the confirmation code is not the current one."""
    await signup_and_verify(h, email)
    r = await h.client.post("/api/auth/login", json={"email": email, "password": PASSWORD})
    assert r.status_code == 200, r.text
    headers = _csrf(r.json())
    r = await h.client.post("/api/auth/totp/setup", headers=headers)
    assert r.status_code == 200, r.text
    secret = r.json()["secret"]
    r = await h.client.post(
        "/api/auth/totp/confirm", json={"code": _code(h, secret)}, headers=headers
    )
    assert r.status_code == 200, r.text
    codes = r.json()["recovery_codes"]
    h.clock.advance(STEP)
    return Enrolled(secret, codes, headers)


async def _password(client: httpx.AsyncClient, **extra: Any) -> httpx.Response:
    return await client.post(
        "/api/auth/login", json={"email": OWNER, "password": PASSWORD, **extra}
    )


async def _second(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await client.post("/api/auth/second-factor", json=body, headers={"Origin": PUBLIC_URL})


def _refused(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["code"] == code, r.text


# -- enrolment ----------------------------------------------------------------------------------


async def test_enrolment_shows_a_qr_code_and_the_secret_then_needs_a_code(harness: Harness):
    h = harness
    await signup_and_verify(h, OWNER)
    r = await h.client.post("/api/auth/login", json={"email": OWNER, "password": PASSWORD})
    headers = _csrf(r.json())
    assert (await h.client.get("/api/auth/second-factor")).json()["totp_enabled"] is False

    r = await h.client.post("/api/auth/totp/setup", headers=headers)
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    setup = r.json()
    secret = setup["secret"]
    assert re.fullmatch(r"[A-Z2-7]{32}", secret)
    assert setup["qr_svg"].startswith("<svg") and "<script" not in setup["qr_svg"]
    assert setup["qr_data_uri"].startswith("data:image/svg+xml")
    assert f"secret={secret}" in setup["otpauth_uri"] and "issuer=Quoroom" in setup["otpauth_uri"]
    assert pyotp.parse_uri(setup["otpauth_uri"]).secret == secret

    # Not on until confirmed: a password still signs in alone.
    async with _browser(h) as other:
        assert "csrf_token" in (await _password(other)).json()
    _refused(
        await h.client.post("/api/auth/totp/confirm", json={"code": "000000"}, headers=headers),
        401,
        "invalid_code",
    )
    r = await h.client.post(
        "/api/auth/totp/confirm", json={"code": _code(h, secret)}, headers=headers
    )
    assert r.status_code == 200, r.text
    codes = r.json()["recovery_codes"]
    assert len(codes) == len(set(codes)) == 10
    assert all(re.fullmatch(r"[a-z2-7]{4}(-[a-z2-7]{4}){3}", c) for c in codes)

    status = (await h.client.get("/api/auth/second-factor")).json()
    assert status["totp_enabled"] is True and status["recovery_codes_left"] == 10
    assert status["verified_at"] is not None  # enrolling proved the factor for this session
    # The secret is never shown again, and is stored neither in the clear nor are the codes.
    _refused(
        await h.client.post("/api/auth/totp/setup", headers=headers), 409, "totp_already_enabled"
    )
    async with h.services.core.session_factory() as db:
        row = (await db.scalars(select(UserTotp))).one()
        hashes = list(await db.scalars(select(RecoveryCode.code_hash)))
    assert secret.encode() not in row.secret_ciphertext
    assert len(hashes) == 10 and all(len(x) == 32 for x in hashes)
    assert not any(c.replace("-", "").encode() in x for c in codes for x in hashes)


async def test_setup_needs_a_session(harness: Harness):
    _refused(await harness.client.post("/api/auth/totp/setup"), 401, "not_authenticated")


# -- two-step sign-in ---------------------------------------------------------------------------


async def test_sign_in_takes_a_password_then_a_code_and_only_then_opens_a_session(
    harness: Harness,
):
    h = harness
    enrolled = await _enrol(h)
    async with _browser(h) as browser:
        r = await _password(browser)
        assert r.status_code == 200, r.text
        pending = r.json()
        assert pending["second_factor_required"] is True
        assert pending["methods"] == ["totp", "recovery_code"]
        assert "second_factor_token" not in pending  # browsers: an HttpOnly cookie
        names = {c.name for c in browser.cookies.jar}
        assert names == {"qr_2fa"}, names  # no session, refresh, CSRF or device cookie yet
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/api/auth" in cookie
        _refused(await browser.get("/api/auth/me"), 401, "not_authenticated")

        r = await _second(browser, code=_code(h, enrolled.secret))
        assert r.status_code == 200, r.text
        assert r.json()["user"]["email"] == OWNER and r.json()["csrf_token"]
        names = {c.name for c in browser.cookies.jar}
        assert {"qr_access", "qr_refresh", "qr_csrf", "qr_device"} <= names
        assert "qr_2fa" not in names
        assert (await browser.get("/api/auth/me")).status_code == 200
        status = (await browser.get("/api/auth/second-factor")).json()
        assert status["verified_at"] is not None


async def test_body_transport_gets_the_pending_token_then_the_tokens(harness: Harness):
    h = harness
    enrolled = await _enrol(h)
    async with _browser(h) as client:
        r = await _password(client, transport="body")
        token = r.json()["second_factor_token"]
        assert "access_token" not in r.json() and not client.cookies.jar
        r = await _second(client, code=_code(h, enrolled.secret), second_factor_token=token)
        assert r.status_code == 200, r.text
        assert r.json()["access_token"] and r.json()["refresh_token"]
        me = await client.get(
            "/api/auth/me", headers={"Authorization": f"Bearer {r.json()['access_token']}"}
        )
        assert me.status_code == 200


async def test_a_wrong_code_is_refused_and_the_right_one_still_works(harness: Harness):
    h = harness
    enrolled = await _enrol(h)
    async with _browser(h) as browser:
        await _password(browser)
        right = _code(h, enrolled.secret)
        wrong = f"{(int(right) + 1) % 1_000_000:06d}"
        _refused(await _second(browser, code=wrong), 401, "invalid_code")
        _refused(
            await _second(browser, code=_code(h, enrolled.secret, -3 * STEP)), 401, "invalid_code"
        )
        assert (await _second(browser, code=right)).status_code == 200


async def test_a_used_code_is_refused_within_its_window(harness: Harness):
    h = harness
    enrolled = await _enrol(h)
    code = _code(h, enrolled.secret)
    async with _browser(h, "192.0.2.51") as first, _browser(h, "192.0.2.52") as second:
        await _password(first)
        await _password(second)
        assert (await _second(first, code=code)).status_code == 200
        _refused(await _second(second, code=code), 401, "code_reused")
        h.clock.advance(STEP)  # the same code, a step later, is still inside the drift window
        _refused(await _second(second, code=code), 401, "code_reused")
        # The next step's code is a new one.
        assert (await _second(second, code=_code(h, enrolled.secret))).status_code == 200


async def test_the_enrolment_code_cannot_sign_in(harness: Harness):
    h = harness
    enrolled = await _enrol(h)
    async with _browser(h) as browser:
        await _password(browser)
        _refused(await _second(browser, code=_code(h, enrolled.secret, -STEP)), 401, "code_reused")


async def test_an_expired_pending_sign_in_is_refused(harness: Harness):
    h = harness
    enrolled = await _enrol(h)
    async with _browser(h) as browser:
        await _password(browser)
        h.clock.advance(5 * 60 + 1)
        _refused(
            await _second(browser, code=_code(h, enrolled.secret)), 401, "second_factor_expired"
        )


async def test_a_pending_sign_in_belongs_to_the_browser_that_started_it(harness: Harness):
    h = harness
    enrolled = await _enrol(h)
    async with _browser(h, "192.0.2.51") as started, _browser(h, "198.51.100.9") as other:
        await _password(started)
        code = _code(h, enrolled.secret)
        _refused(await _second(other, code=code), 401, "second_factor_expired")
        other.cookies.set("qr_2fa", "forged-" + "x" * 40, domain="cp.test", path="/api/auth")
        _refused(await _second(other, code=code), 401, "second_factor_expired")
        other.cookies.set("qr_2fa", "y" * 5000, domain="cp.test", path="/api/auth")
        _refused(await _second(other, code=code), 401, "second_factor_expired")
        assert (await _second(started, code=code)).status_code == 200


async def test_a_pending_sign_in_is_single_use_and_allows_few_attempts(harness: Harness):
    h = harness
    enrolled = await _enrol(h)
    async with _browser(h, "192.0.2.51") as browser:
        await _password(browser)
        pending = browser.cookies.get("qr_2fa")
        assert (await _second(browser, code=_code(h, enrolled.secret))).status_code == 200
        h.clock.advance(STEP)
        browser.cookies.set("qr_2fa", pending or "", domain="cp.test", path="/api/auth")
        _refused(
            await _second(browser, code=_code(h, enrolled.secret)), 401, "second_factor_expired"
        )
    async with _browser(h, "192.0.2.52") as browser:
        await _password(browser)
        for _ in range(5):
            _refused(await _second(browser, code="000000"), 401, "invalid_code")
        # Spent by the wrong codes: even the right one needs the password again.
        _refused(
            await _second(browser, code=_code(h, enrolled.secret)), 401, "second_factor_expired"
        )


async def test_malformed_second_factor_input_is_refused(harness: Harness):
    h = harness
    await _enrol(h)
    async with _browser(h) as browser:
        await _password(browser)
        for body in (
            {},
            {"code": "12345"},
            {"code": "1234567"},
            {"code": "12a456"},
            {"code": 123456},
            {"code": "123456", "recovery_code": "aaaa-bbbb-cccc-dddd"},
            {"recovery_code": "short"},
            {"recovery_code": "a" * 33},
            {"code": "123456", "extra": 1},
            {"code": "123456", "second_factor_token": "x" * 300},
        ):
            _refused(await _second(browser, **body), 422, "invalid_body")
        r = await browser.post(
            "/api/auth/second-factor",
            content=b"{not json",
            headers={"Origin": PUBLIC_URL, "Content-Type": "application/json"},
        )
        _refused(r, 400, "invalid_json")
        _refused(await _second(browser, recovery_code="!!!!-!!!!-!!!!-!!!!"), 401, "invalid_code")


async def test_second_factor_failures_spend_the_sign_in_budget(
    make_harness: Any, make_settings: Any
):
    async with make_harness(make_settings(throttle_login_account_address="3/minute")) as h:
        enrolled = await _enrol(h)
        async with _browser(h, "192.0.2.51") as browser:
            await _password(browser)
            for _ in range(3):
                _refused(await _second(browser, code="000000"), 401, "invalid_code")
            r = await _second(browser, code=_code(h, enrolled.secret))
            _refused(r, 429, "throttled")
            assert int(r.headers["retry-after"]) >= 1


async def test_a_recovery_code_signs_in_once(harness: Harness):
    h = harness
    enrolled = await _enrol(h)
    code = enrolled.recovery_codes[3]
    async with _browser(h, "192.0.2.51") as browser:
        await _password(browser)
        r = await _second(browser, recovery_code=f"  {code.upper().replace('-', ' ')} ")
        assert r.status_code == 200, r.text
        assert (await browser.get("/api/auth/second-factor")).json()["recovery_codes_left"] == 9
    async with _browser(h, "192.0.2.52") as browser:
        await _password(browser)
        _refused(await _second(browser, recovery_code=code), 401, "invalid_code")
    await h.drain()
    [notice] = _recovery_notices(h)  # the refused second use sends nothing
    assert "9 recovery codes are left" in notice.text
    assert notice.link == f"{PUBLIC_URL}/app/security"
    assert code not in notice.text and code.upper() not in notice.text


def _recovery_notices(h: Harness) -> list[Any]:
    return [m for m in h.outbox.to(OWNER) if m.subject.startswith("A recovery code was used")]


async def test_a_totp_code_sends_no_recovery_notice(harness: Harness):
    h = harness
    enrolled = await _enrol(h)
    async with _browser(h, "192.0.2.53") as browser:
        await _password(browser)
        assert (await _second(browser, code=_code(h, enrolled.secret))).status_code == 200
    await h.drain()
    assert _recovery_notices(h) == []


async def test_a_recovery_code_used_for_step_up_or_to_turn_totp_off_is_told(harness: Harness):
    h = harness
    enrolled = await _enrol(h)
    headers = enrolled.headers
    r = await h.client.post(
        "/api/auth/second-factor/verify",
        json={"recovery_code": enrolled.recovery_codes[0]},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    await h.drain()
    assert ["9 recovery codes are left" in m.text for m in _recovery_notices(h)] == [True]
    r = await h.client.post(
        "/api/auth/totp/disable",
        json={"recovery_code": enrolled.recovery_codes[1]},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    await h.drain()
    # The last factor went, and its codes with it: the count says so.
    assert "0 recovery codes are left" in _recovery_notices(h)[-1].text
    assert len(_recovery_notices(h)) == 2


async def test_google_sign_in_waits_for_the_second_factor(harness: Harness):
    """The login route and the Google callback share the pending sign-in; Google itself is
    driven in test_google.py, so here the callback's branch is reached through its service."""
    h = harness
    enrolled = await _enrol(h)
    async with h.services.core.session_factory() as db:
        account = (await db.scalars(select(User).where(User.email == OWNER))).one()
        raw = await second_factor.open_challenge(
            db, account, method="google", transport="cookie", now=h.clock.now
        )
        await db.commit()
    async with _browser(h) as browser:
        browser.cookies.set("qr_2fa", raw, domain="cp.test", path="/api/auth")
        assert (await _second(browser, code=_code(h, enrolled.secret))).status_code == 200
        sessions = (await browser.get("/api/auth/sessions")).json()["sessions"]
        assert [s["method"] for s in sessions if s["current"]] == ["google"]


# -- turning it off -----------------------------------------------------------------------------


async def test_turning_totp_off_needs_a_fresh_code(harness: Harness):
    h = harness
    enrolled = await _enrol(h)
    url, headers = "/api/auth/totp/disable", enrolled.headers
    _refused(await h.client.post(url, json={}, headers=headers), 422, "invalid_body")
    _refused(
        await h.client.post(url, json={"code": "000000"}, headers=headers), 401, "invalid_code"
    )
    r = await h.client.post(url, json={"code": _code(h, enrolled.secret)}, headers=headers)
    assert r.status_code == 200, r.text
    assert (await h.client.get("/api/auth/second-factor")).json() == {
        "totp_enabled": False,
        "recovery_codes_left": 0,
        "verified_at": None,
        "step_up_until": None,
    }
    async with _browser(h) as browser:  # one step again
        assert "csrf_token" in (await _password(browser)).json()
    _refused(
        await h.client.post(url, json={"code": "000000"}, headers=headers), 409, "totp_not_enabled"
    )


# -- step-up (item 3) ---------------------------------------------------------------------------


async def test_new_recovery_codes_need_a_recent_second_factor(harness: Harness):
    h = harness
    enrolled = await _enrol(h)
    url, headers = "/api/auth/totp/recovery-codes", enrolled.headers
    r = await h.client.post(url, headers=headers)  # enrolment was 30 s ago
    assert r.status_code == 200 and len(r.json()["recovery_codes"]) == 10
    assert enrolled.recovery_codes[0] not in r.json()["recovery_codes"]
    h.clock.advance(10 * 60)
    r = await h.client.post(url, headers=headers)
    _refused(r, 403, "step_up_required")
    _refused(
        await h.client.post(
            "/api/auth/second-factor/verify", json={"code": "000000"}, headers=headers
        ),
        401,
        "invalid_code",
    )
    r = await h.client.post(
        "/api/auth/second-factor/verify", json={"code": _code(h, enrolled.secret)}, headers=headers
    )
    assert r.status_code == 200 and r.json()["step_up_until"] is not None
    assert (await h.client.post(url, headers=headers)).status_code == 200


# -- pages --------------------------------------------------------------------------------------


async def test_the_second_step_and_security_pages(harness: Harness):
    from control_plane.pages.routes import PAGE_CSP

    h = harness
    r = await h.client.get("/signin/second-factor?next=//evil.example")
    assert r.status_code == 200 and r.headers["content-security-policy"] == PAGE_CSP
    assert 'id="second-factor-form"' in r.text and 'autocomplete="one-time-code"' in r.text
    assert 'data-next="/app"' in r.text  # never an open redirect
    r = await h.client.get("/app/security")
    assert r.status_code == 303 and r.headers["location"] == "/signin?next=/app/security"
    await signup_and_verify(h, OWNER)
    await h.client.post("/api/auth/login", json={"email": OWNER, "password": PASSWORD})
    r = await h.client.get("/app/security")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    assert 'data-action="totp-setup"' in r.text and 'id="step-up-dialog"' in r.text
    assert 'id="password-form"' in r.text and 'name="current_password"' in r.text
