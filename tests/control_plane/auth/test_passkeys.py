"""Passkeys (issue 15, item 2) through the API, with a software authenticator
(tests/fakes/authenticator.py): registering several, naming and removing them, passwordless
sign-in, a passkey as the second factor and for step-up; and every bad input the issue lists —
a wrong origin, a forged or replayed assertion, a challenge from another session, an oversized
attestation, a counter regression, an expired challenge."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select

from control_plane.auth.models import UserPasskey, WebAuthnChallenge
from tests.control_plane.conftest import PASSWORD, PUBLIC_URL, Harness, signup_and_verify
from tests.fakes.authenticator import SoftAuthenticator, b64, unb64

OWNER = "owner@example.com"
ORIGIN = {"Origin": PUBLIC_URL}


@asynccontextmanager
async def _browser(h: Harness, address: str = "192.0.2.50") -> AsyncIterator[httpx.AsyncClient]:
    """Another browser (its own cookie jar) at ``address``."""
    transport = httpx.ASGITransport(app=h.app, client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url=PUBLIC_URL) as client:
        yield client


def _refused(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["code"] == code, r.text


@dataclass
class Account:
    client: httpx.AsyncClient
    headers: dict[str, str]  # CSRF + Origin for the signed-in browser


async def _signed_in(h: Harness, email: str = OWNER) -> Account:
    await signup_and_verify(h, email)
    r = await h.client.post("/api/auth/login", json={"email": email, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return Account(h.client, {"X-CSRF-Token": r.json()["csrf_token"], **ORIGIN})


async def _register(
    account: Account, authenticator: SoftAuthenticator, name: str | None = None
) -> dict[str, Any]:
    r = await account.client.post("/api/auth/passkeys/options", headers=account.headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = {"credential": authenticator.create(r.json()["public_key"])}
    if name is not None:
        body["name"] = name
    r = await account.client.post("/api/auth/passkeys", json=body, headers=account.headers)
    assert r.status_code == 201, r.text
    answer: dict[str, Any] = r.json()
    return answer


async def _passwordless_options(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.post("/api/auth/passkey/options", headers=ORIGIN)
    assert r.status_code == 200, r.text
    options: dict[str, Any] = r.json()["public_key"]
    return options


async def _passwordless(client: httpx.AsyncClient, credential: dict[str, Any]) -> httpx.Response:
    return await client.post(
        "/api/auth/passkey/sign-in", json={"credential": credential}, headers=ORIGIN
    )


# -- registering, naming, removing --------------------------------------------------------------


async def test_an_account_registers_several_passkeys_and_names_them(harness: Harness):
    h = harness
    account = await _signed_in(h)
    r = await h.client.post("/api/auth/passkeys/options", headers=account.headers)
    options = r.json()["public_key"]
    assert r.headers["cache-control"] == "no-store"
    assert options["rp"] == {"id": "cp.test", "name": "Quoroom"}
    assert options["authenticatorSelection"]["residentKey"] == "required"
    assert unb64(options["user"]["id"]).decode() != OWNER  # the handle is not the address
    assert options["attestation"] == "none" and options["excludeCredentials"] == []
    assert r.json()["expires_in"] == 300

    phone, laptop = SoftAuthenticator(PUBLIC_URL), SoftAuthenticator(PUBLIC_URL)
    first = await _register(account, phone, "My phone")
    assert first["passkey"]["name"] == "My phone"
    # The first factor of the account: the recovery codes, once; the session proved it.
    assert len(first["recovery_codes"]) == 10
    assert (await h.client.get("/api/auth/second-factor")).json()["verified_at"] is not None
    second = await _register(account, laptop)
    assert second["passkey"]["name"] == "Passkey 2" and second["recovery_codes"] is None

    r = await h.client.post("/api/auth/passkeys/options", headers=account.headers)
    excluded = [c["id"] for c in r.json()["public_key"]["excludeCredentials"]]
    assert excluded == [b64(phone.credential_id), b64(laptop.credential_id)]
    # The same authenticator twice is refused.
    r = await h.client.post(
        "/api/auth/passkeys",
        json={"credential": phone.create(r.json()["public_key"])},
        headers=account.headers,
    )
    _refused(r, 409, "passkey_already_registered")

    pid = second["passkey"]["id"]
    r = await h.client.patch(
        f"/api/auth/passkeys/{pid}", json={"name": "  Work laptop "}, headers=account.headers
    )
    assert r.status_code == 200 and r.json()["name"] == "Work laptop"
    for bad in ({"name": ""}, {"name": "x" * 65}, {"name": "ok", "extra": 1}):
        _refused(
            await h.client.patch(f"/api/auth/passkeys/{pid}", json=bad, headers=account.headers),
            422,
            "invalid_body",
        )
    listed = (await h.client.get("/api/auth/passkeys")).json()["passkeys"]
    assert [p["name"] for p in listed] == ["My phone", "Work laptop"]
    assert all(p["counter_regressed_at"] is None for p in listed)
    async with h.services.core.session_factory() as db:
        rows = list(await db.scalars(select(UserPasskey)))
    assert {bytes(r.credential_id) for r in rows} == {phone.credential_id, laptop.credential_id}


async def test_another_accounts_passkey_cannot_be_renamed_or_removed(harness: Harness):
    h = harness
    account = await _signed_in(h)
    pid = (await _register(account, SoftAuthenticator(PUBLIC_URL)))["passkey"]["id"]
    async with _browser(h) as other:
        await signup_and_verify(h, "other@example.com")
        r = await other.post(
            "/api/auth/login", json={"email": "other@example.com", "password": PASSWORD}
        )
        headers = {"X-CSRF-Token": r.json()["csrf_token"], **ORIGIN}
        _refused(
            await other.patch(f"/api/auth/passkeys/{pid}", json={"name": "x"}, headers=headers),
            404,
            "not_found",
        )
        _refused(await other.delete(f"/api/auth/passkeys/{pid}", headers=headers), 404, "not_found")


async def test_registering_and_removing_need_a_recent_second_factor(harness: Harness):
    h = harness
    account = await _signed_in(h)
    phone = SoftAuthenticator(PUBLIC_URL)
    pid = (await _register(account, phone))["passkey"]["id"]
    h.clock.advance(10 * 60 + 1)
    _refused(
        await h.client.post("/api/auth/passkeys/options", headers=account.headers),
        403,
        "step_up_required",
    )
    _refused(
        await h.client.delete(f"/api/auth/passkeys/{pid}", headers=account.headers),
        403,
        "step_up_required",
    )
    # Step-up with the passkey itself.
    r = await h.client.post(
        "/api/auth/second-factor/verify/passkey/options", headers=account.headers
    )
    assert r.status_code == 200, r.text
    options = r.json()["public_key"]
    assert [c["id"] for c in options["allowCredentials"]] == [b64(phone.credential_id)]
    r = await h.client.post(
        "/api/auth/second-factor/verify/passkey",
        json={"credential": phone.get(options)},
        headers=account.headers,
    )
    assert r.status_code == 200 and r.json()["step_up_until"] is not None, r.text
    # Removing the last factor turns two-step sign-in off, recovery codes included.
    r = await h.client.delete(f"/api/auth/passkeys/{pid}", headers=account.headers)
    assert r.status_code == 200, r.text
    status = (await h.client.get("/api/auth/second-factor")).json()
    assert status["recovery_codes_left"] == 0 and status["verified_at"] is None
    async with _browser(h) as browser:
        r = await browser.post("/api/auth/login", json={"email": OWNER, "password": PASSWORD})
        assert "csrf_token" in r.json()  # one step again


async def test_adding_totp_to_an_account_with_a_passkey_needs_a_recent_second_factor(
    harness: Harness,
):
    h = harness
    account = await _signed_in(h)
    phone = SoftAuthenticator(PUBLIC_URL)
    await _register(account, phone)
    h.clock.advance(10 * 60 + 1)
    _refused(
        await h.client.post("/api/auth/totp/setup", headers=account.headers),
        403,
        "step_up_required",
    )
    assert (await h.client.get("/api/auth/second-factor")).json()["totp_enabled"] is False
    r = await h.client.post(
        "/api/auth/second-factor/verify/passkey/options", headers=account.headers
    )
    r = await h.client.post(
        "/api/auth/second-factor/verify/passkey",
        json={"credential": phone.get(r.json()["public_key"])},
        headers=account.headers,
    )
    assert r.status_code == 200, r.text
    r = await h.client.post("/api/auth/totp/setup", headers=account.headers)
    assert r.status_code == 200 and r.json()["secret"], r.text


async def test_passkey_routes_need_a_session(harness: Harness):
    h = harness
    for method, url in (
        ("GET", "/api/auth/passkeys"),
        ("POST", "/api/auth/passkeys/options"),
        ("POST", "/api/auth/second-factor/verify/passkey/options"),
    ):
        _refused(await h.client.request(method, url, headers=ORIGIN), 401, "not_authenticated")


async def test_passkeys_are_off_when_the_public_url_is_an_ip_address(
    make_harness: Any, make_settings: Any
):
    async with make_harness(make_settings(public_url="http://127.0.0.1:8000")) as h:
        r = await h.client.post(
            "/api/auth/passkey/options", headers={"Origin": "http://127.0.0.1:8000"}
        )
        _refused(r, 409, "passkeys_unavailable")


# -- signing in ---------------------------------------------------------------------------------


async def test_passwordless_sign_in_opens_a_session_with_a_fresh_second_factor(harness: Harness):
    h = harness
    account = await _signed_in(h)
    phone = SoftAuthenticator(PUBLIC_URL)
    await _register(account, phone)
    async with _browser(h) as browser:
        r = await browser.post("/api/auth/passkey/options", headers=ORIGIN)
        options = r.json()["public_key"]
        assert options["rpId"] == "cp.test" and options["allowCredentials"] == []
        assert options["userVerification"] == "required"
        cookie = r.headers["set-cookie"].lower()
        assert "qr_passkey=" in cookie and "httponly" in cookie and "samesite=strict" in cookie
        r = await _passwordless(browser, phone.get(options))
        assert r.status_code == 200, r.text
        assert r.json()["user"]["email"] == OWNER and r.json()["csrf_token"]
        names = {c.name for c in browser.cookies.jar}
        assert {"qr_access", "qr_refresh", "qr_csrf", "qr_device"} <= names
        assert "qr_passkey" not in names
        sessions = (await browser.get("/api/auth/sessions")).json()["sessions"]
        assert [s["method"] for s in sessions if s["current"]] == ["passkey"]
        # A fresh second factor: a step-up action passes at once.
        headers = {"X-CSRF-Token": r.json()["csrf_token"], **ORIGIN}
        assert (await browser.post("/api/auth/totp/recovery-codes", headers=headers)).is_success
        listed = (await browser.get("/api/auth/passkeys")).json()["passkeys"]
        assert listed[0]["last_used_at"] is not None


async def test_passwordless_sign_in_needs_user_verification(harness: Harness):
    h = harness
    account = await _signed_in(h)
    phone = SoftAuthenticator(PUBLIC_URL)
    await _register(account, phone)
    async with _browser(h) as browser:
        options = await _passwordless_options(browser)
        r = await _passwordless(browser, phone.get(options, user_verified=False))
        _refused(r, 401, "passkey_invalid")


async def test_a_passkey_is_a_second_factor_after_the_password(harness: Harness):
    h = harness
    account = await _signed_in(h)
    phone = SoftAuthenticator(PUBLIC_URL)
    await _register(account, phone)
    async with _browser(h) as browser:
        r = await browser.post("/api/auth/login", json={"email": OWNER, "password": PASSWORD})
        assert r.json()["second_factor_required"] is True
        assert r.json()["methods"] == ["passkey", "recovery_code"]
        r = await browser.post("/api/auth/second-factor/passkey/options", headers=ORIGIN)
        assert r.status_code == 200, r.text
        options = r.json()["public_key"]
        assert [c["id"] for c in options["allowCredentials"]] == [b64(phone.credential_id)]
        r = await browser.post(
            "/api/auth/second-factor/passkey",
            json={"credential": phone.get(options)},
            headers=ORIGIN,
        )
        assert r.status_code == 200, r.text
        assert "qr_2fa" not in {c.name for c in browser.cookies.jar}
        assert (await browser.get("/api/auth/me")).status_code == 200
        assert (await browser.get("/api/auth/second-factor")).json()["verified_at"] is not None


async def test_body_clients_use_a_passkey_with_the_pending_token(harness: Harness):
    h = harness
    account = await _signed_in(h)
    phone = SoftAuthenticator(PUBLIC_URL)
    await _register(account, phone)
    async with _browser(h) as client:
        r = await client.post(
            "/api/auth/login",
            json={"email": OWNER, "password": PASSWORD, "transport": "body"},
        )
        token = r.json()["second_factor_token"]
        r = await client.post(
            "/api/auth/second-factor/passkey/options", json={"second_factor_token": token}
        )
        options = r.json()["public_key"]
        r = await client.post(
            "/api/auth/second-factor/passkey",
            json={"credential": phone.get(options), "second_factor_token": token},
        )
        assert r.status_code == 200 and r.json()["access_token"], r.text


async def test_a_recovery_code_works_for_an_account_with_only_a_passkey(harness: Harness):
    h = harness
    account = await _signed_in(h)
    codes = (await _register(account, SoftAuthenticator(PUBLIC_URL)))["recovery_codes"]
    async with _browser(h) as browser:
        await browser.post("/api/auth/login", json={"email": OWNER, "password": PASSWORD})
        _refused(
            await browser.post("/api/auth/second-factor", json={"code": "123456"}, headers=ORIGIN),
            409,
            "totp_not_enabled",
        )
        r = await browser.post(
            "/api/auth/second-factor", json={"recovery_code": codes[0]}, headers=ORIGIN
        )
        assert r.status_code == 200, r.text


async def test_a_passkey_of_another_account_is_not_a_second_factor(harness: Harness):
    h = harness
    account = await _signed_in(h)
    await _register(account, SoftAuthenticator(PUBLIC_URL))
    stranger = SoftAuthenticator(PUBLIC_URL)
    async with _browser(h) as other:
        await signup_and_verify(h, "other@example.com")
        r = await other.post(
            "/api/auth/login", json={"email": "other@example.com", "password": PASSWORD}
        )
        headers = {"X-CSRF-Token": r.json()["csrf_token"], **ORIGIN}
        await _register(Account(other, headers), stranger)
    async with _browser(h) as browser:
        await browser.post("/api/auth/login", json={"email": OWNER, "password": PASSWORD})
        r = await browser.post("/api/auth/second-factor/passkey/options", headers=ORIGIN)
        r = await browser.post(
            "/api/auth/second-factor/passkey",
            json={"credential": stranger.get(r.json()["public_key"])},
            headers=ORIGIN,
        )
        _refused(r, 401, "passkey_unknown")


# -- bad input (issue 15) -------------------------------------------------------------------------


async def test_a_wrong_origin_is_refused(harness: Harness):
    h = harness
    account = await _signed_in(h)
    phone = SoftAuthenticator(PUBLIC_URL)
    r = await h.client.post("/api/auth/passkeys/options", headers=account.headers)
    credential = phone.create(r.json()["public_key"], origin="https://evil.example")
    r = await h.client.post(
        "/api/auth/passkeys", json={"credential": credential}, headers=account.headers
    )
    _refused(r, 401, "passkey_origin_mismatch")
    await _register(account, phone)
    async with _browser(h) as browser:
        for origin in ("http://cp.test.evil.example", "https://cp.test", "http://cp.test:8080"):
            options = await _passwordless_options(browser)
            r = await _passwordless(browser, phone.get(options, origin=origin))
            _refused(r, 401, "passkey_origin_mismatch")
        # The right origin but signed for another RP id.
        options = await _passwordless_options(browser)
        r = await _passwordless(browser, phone.get(options, rp_id="evil.example"))
        _refused(r, 401, "passkey_invalid")
        assert (await browser.get("/api/auth/me")).status_code == 401


async def test_a_forged_assertion_is_refused(harness: Harness):
    h = harness
    account = await _signed_in(h)
    phone = SoftAuthenticator(PUBLIC_URL)
    await _register(account, phone)
    async with _browser(h) as browser:
        # Signed by another key under the registered credential's id.
        options = await _passwordless_options(browser)
        forged = phone.get(options, signer=ec.generate_private_key(ec.SECP256R1()))
        _refused(await _passwordless(browser, forged), 401, "passkey_invalid")
        # A genuine signature, then the authenticator data changed (the flags, the counter).
        options = await _passwordless_options(browser)
        genuine = phone.get(options)
        data = bytearray(unb64(genuine["response"]["authenticatorData"]))
        data[-1] ^= 0x01
        genuine["response"]["authenticatorData"] = b64(bytes(data))
        _refused(await _passwordless(browser, genuine), 401, "passkey_invalid")
        # Garbage that is base64url but nothing else.
        options = await _passwordless_options(browser)
        junk = phone.get(options)
        junk["response"]["signature"] = b64(b"\x30\x02\x00")
        _refused(await _passwordless(browser, junk), 401, "passkey_invalid")
        options = await _passwordless_options(browser)
        junk = phone.get(options)
        junk["response"]["clientDataJSON"] = b64(b"[" * 2000)
        _refused(await _passwordless(browser, junk), 401, "passkey_invalid")
        # A challenge never handed out.
        made_up = phone.get({"challenge": b64(b"\x01" * 32), "rpId": "cp.test"})
        _refused(await _passwordless(browser, made_up), 401, "passkey_challenge_invalid")
        assert (await browser.get("/api/auth/me")).status_code == 401


async def test_a_replayed_assertion_is_refused(harness: Harness):
    h = harness
    account = await _signed_in(h)
    phone = SoftAuthenticator(PUBLIC_URL)
    await _register(account, phone)
    async with _browser(h) as browser:
        options = await _passwordless_options(browser)
        token = browser.cookies.get("qr_passkey") or ""
        assertion = phone.get(options)
        assert (await _passwordless(browser, assertion)).status_code == 200
    async with _browser(h, "198.51.100.20") as thief:
        # The same answer again, with the browser's cookie copied too: the challenge is spent.
        thief.cookies.set("qr_passkey", token, domain="cp.test", path="/api/auth")
        _refused(await _passwordless(thief, assertion), 401, "passkey_replayed")
        # Without it, the challenge is another browser's.
        thief.cookies.clear()
        _refused(await _passwordless(thief, assertion), 401, "passkey_challenge_mismatch")
        assert (await thief.get("/api/auth/me")).status_code == 401
    async with h.services.core.session_factory() as db:
        row = await db.scalar(
            select(WebAuthnChallenge).where(
                WebAuthnChallenge.challenge == unb64(options["challenge"])
            )
        )
        assert row is not None and row.used_at is not None


async def test_an_assertion_is_single_use_even_in_its_own_browser(harness: Harness):
    h = harness
    account = await _signed_in(h)
    phone = SoftAuthenticator(PUBLIC_URL)
    await _register(account, phone)
    h.clock.advance(11 * 60)
    r = await h.client.post(
        "/api/auth/second-factor/verify/passkey/options", headers=account.headers
    )
    assertion = phone.get(r.json()["public_key"])
    url = "/api/auth/second-factor/verify/passkey"
    r = await h.client.post(url, json={"credential": assertion}, headers=account.headers)
    assert r.status_code == 200, r.text
    r = await h.client.post(url, json={"credential": assertion}, headers=account.headers)
    _refused(r, 401, "passkey_replayed")


async def test_a_challenge_from_another_session_is_refused(harness: Harness):
    h = harness
    account = await _signed_in(h)
    phone = SoftAuthenticator(PUBLIC_URL)
    await _register(account, phone)
    # Passwordless: the options went to one browser, the answer comes from another.
    async with _browser(h, "192.0.2.51") as asked, _browser(h, "198.51.100.9") as other:
        options = await _passwordless_options(asked)
        await _passwordless_options(other)  # the other browser has a challenge of its own
        assertion = phone.get(options)
        _refused(await _passwordless(other, assertion), 401, "passkey_challenge_mismatch")
        assert (await other.get("/api/auth/me")).status_code == 401
    # The second factor: one pending sign-in's challenge answered at another's.
    async with _browser(h, "192.0.2.51") as first, _browser(h, "192.0.2.52") as second:
        for browser in (first, second):
            await browser.post("/api/auth/login", json={"email": OWNER, "password": PASSWORD})
        r = await first.post("/api/auth/second-factor/passkey/options", headers=ORIGIN)
        assertion = phone.get(r.json()["public_key"])
        r = await second.post(
            "/api/auth/second-factor/passkey", json={"credential": assertion}, headers=ORIGIN
        )
        _refused(r, 401, "passkey_challenge_mismatch")
    # Step-up: another signed-in session's challenge.
    h.clock.advance(11 * 60)
    r = await h.client.post(
        "/api/auth/second-factor/verify/passkey/options", headers=account.headers
    )
    assertion = phone.get(r.json()["public_key"])
    async with _browser(h, "192.0.2.53") as other:
        r = await other.post(
            "/api/auth/passkey/sign-in",
            json={"credential": phone.get(await _passwordless_options(other))},
            headers=ORIGIN,
        )
        headers = {"X-CSRF-Token": r.json()["csrf_token"], **ORIGIN}
        r = await other.post(
            "/api/auth/second-factor/verify/passkey",
            json={"credential": assertion},
            headers=headers,
        )
        _refused(r, 401, "passkey_challenge_mismatch")
    # A step-up challenge is not a sign-in challenge either.
    r = await h.client.post(
        "/api/auth/second-factor/verify/passkey/options", headers=account.headers
    )
    async with _browser(h) as browser:
        await _passwordless_options(browser)
        assertion = phone.get(r.json()["public_key"])
        _refused(await _passwordless(browser, assertion), 401, "passkey_challenge_mismatch")


async def test_an_expired_challenge_is_refused(harness: Harness):
    h = harness
    account = await _signed_in(h)
    phone = SoftAuthenticator(PUBLIC_URL)
    await _register(account, phone)
    r = await h.client.post("/api/auth/passkeys/options", headers=account.headers)
    laptop_options = r.json()["public_key"]
    async with _browser(h) as browser:
        options = await _passwordless_options(browser)
        h.clock.advance(5 * 60 + 1)
        _refused(await _passwordless(browser, phone.get(options)), 401, "passkey_challenge_expired")
    r = await h.client.post(
        "/api/auth/passkeys",
        json={"credential": SoftAuthenticator(PUBLIC_URL).create(laptop_options)},
        headers=account.headers,
    )
    _refused(r, 401, "passkey_challenge_expired")


async def test_oversized_attestations_and_client_data_are_refused_before_parsing(
    harness: Harness,
):
    h = harness
    account = await _signed_in(h)
    phone = SoftAuthenticator(PUBLIC_URL)
    r = await h.client.post("/api/auth/passkeys/options", headers=account.headers)
    options = r.json()["public_key"]
    url = "/api/auth/passkeys"

    big = phone.create(options)
    big["response"]["attestationObject"] = b64(b"\xa0" * 9000)
    r = await h.client.post(url, json={"credential": big}, headers=account.headers)
    _refused(r, 413, "passkey_too_large")
    big = phone.create(options)
    big["response"]["clientDataJSON"] = b64(b" " * 3000)
    r = await h.client.post(url, json={"credential": big}, headers=account.headers)
    _refused(r, 413, "passkey_too_large")
    big = phone.create(options)
    big["id"] = big["rawId"] = b64(b"\x01" * 1100)
    r = await h.client.post(url, json={"credential": big}, headers=account.headers)
    _refused(r, 413, "passkey_too_large")
    # Beyond the body limit the request is refused before it is read as JSON at all.
    big = phone.create(options)
    big["response"]["attestationObject"] = "A" * 70_000
    r = await h.client.post(url, json={"credential": big}, headers=account.headers)
    _refused(r, 413, "body_too_large")
    # Not base64url, not a credential: the schema's 422.
    for credential in (
        {**phone.create(options), "type": "password"},
        {**phone.create(options), "rawId": "not base64!"},
        {"id": "x"},
    ):
        r = await h.client.post(url, json={"credential": credential}, headers=account.headers)
        _refused(r, 422, "invalid_body")
    # None of these spent the challenge: the size checks come before it is looked up.
    await _register_with(account, phone, options)
    async with _browser(h) as browser:
        options = await _passwordless_options(browser)
        big = phone.get(options)
        big["response"]["authenticatorData"] = b64(b"\x00" * 2000)
        _refused(await _passwordless(browser, big), 413, "passkey_too_large")


async def _register_with(
    account: Account, authenticator: SoftAuthenticator, options: dict[str, Any]
) -> None:
    r = await account.client.post(
        "/api/auth/passkeys",
        json={"credential": authenticator.create(options)},
        headers=account.headers,
    )
    assert r.status_code == 201, r.text


async def test_a_counter_regression_is_refused_and_recorded(harness: Harness):
    h = harness
    account = await _signed_in(h)
    phone = SoftAuthenticator(PUBLIC_URL)
    await _register(account, phone)
    for _ in range(3):
        async with _browser(h) as browser:
            options = await _passwordless_options(browser)
            assert (await _passwordless(browser, phone.get(options))).status_code == 200
    clone = phone.clone(sign_count=1)  # copied off the phone when its counter was 1
    async with _browser(h, "198.51.100.30") as thief:
        r = await _passwordless(thief, clone.get(await _passwordless_options(thief)))
        _refused(r, 401, "passkey_counter_regression")
        assert (await thief.get("/api/auth/me")).status_code == 401
    listed = (await h.client.get("/api/auth/passkeys")).json()["passkeys"]
    assert listed[0]["counter_regressed_at"] is not None
    # Which copy is the clone cannot be told: the passkey is refused from now on.
    async with _browser(h) as browser:
        r = await _passwordless(browser, phone.get(await _passwordless_options(browser)))
        _refused(r, 401, "passkey_counter_regression")


async def test_a_counter_of_zero_is_allowed_when_the_authenticator_keeps_none(harness: Harness):
    h = harness
    account = await _signed_in(h)
    synced = SoftAuthenticator(PUBLIC_URL)
    await _register(account, synced)
    for _ in range(2):
        async with _browser(h) as browser:
            options = await _passwordless_options(browser)
            synced.sign_count = -1  # get() adds one: 0, as synced passkeys report
            assert (await _passwordless(browser, synced.get(options))).status_code == 200


async def test_an_unknown_passkey_is_refused(harness: Harness):
    h = harness
    async with _browser(h) as browser:
        options = await _passwordless_options(browser)
        r = await _passwordless(browser, SoftAuthenticator(PUBLIC_URL).get(options))
        _refused(r, 401, "passkey_unknown")


async def test_refused_passkeys_spend_the_sign_in_budget(make_harness: Any, make_settings: Any):
    async with make_harness(make_settings(throttle_login_account_address="3/minute")) as h:
        account = await _signed_in(h)
        phone = SoftAuthenticator(PUBLIC_URL)
        await _register(account, phone)
        async with _browser(h, "192.0.2.77") as browser:
            for _ in range(3):
                options = await _passwordless_options(browser)
                r = await _passwordless(browser, phone.get(options, origin="http://evil.test"))
                _refused(r, 401, "passkey_origin_mismatch")
            r = await _passwordless(browser, phone.get(await _passwordless_options(browser)))
            _refused(r, 429, "throttled")
        async with _browser(h, "192.0.2.78") as browser:
            await browser.post("/api/auth/login", json={"email": OWNER, "password": PASSWORD})
            for _ in range(3):
                r = await browser.post("/api/auth/second-factor/passkey/options", headers=ORIGIN)
                r = await browser.post(
                    "/api/auth/second-factor/passkey",
                    json={"credential": phone.get(r.json()["public_key"], rp_id="x.test")},
                    headers=ORIGIN,
                )
                _refused(r, 401, "passkey_invalid")
            r = await browser.post("/api/auth/second-factor/passkey/options", headers=ORIGIN)
            r = await browser.post(
                "/api/auth/second-factor/passkey",
                json={"credential": phone.get(r.json()["public_key"])},
                headers=ORIGIN,
            )
            _refused(r, 429, "throttled")


async def test_the_second_step_with_a_passkey_allows_few_attempts(harness: Harness):
    h = harness
    account = await _signed_in(h)
    phone = SoftAuthenticator(PUBLIC_URL)
    await _register(account, phone)
    async with _browser(h, "192.0.2.60") as browser:
        await browser.post("/api/auth/login", json={"email": OWNER, "password": PASSWORD})
        for _ in range(5):
            r = await browser.post("/api/auth/second-factor/passkey/options", headers=ORIGIN)
            r = await browser.post(
                "/api/auth/second-factor/passkey",
                json={"credential": phone.get(r.json()["public_key"], origin="http://x.test")},
                headers=ORIGIN,
            )
            _refused(r, 401, "passkey_origin_mismatch")
        _refused(
            await browser.post("/api/auth/second-factor/passkey/options", headers=ORIGIN),
            401,
            "second_factor_expired",
        )


async def test_asking_for_sign_in_options_spends_the_address_budget(
    make_harness: Any, make_settings: Any
):
    """Anyone may ask for passwordless options, and each request writes a challenge."""
    async with make_harness(make_settings(throttle_login_address="3/minute")) as h:
        async with _browser(h, "192.0.2.90") as browser:
            for _ in range(3):
                await _passwordless_options(browser)
            r = await browser.post("/api/auth/passkey/options", headers=ORIGIN)
            _refused(r, 429, "throttled")
            r = await browser.post("/api/auth/second-factor/passkey/options", headers=ORIGIN)
            _refused(r, 429, "throttled")
        async with _browser(h, "192.0.2.91") as other:  # another address is not affected
            await _passwordless_options(other)
