"""Sign-in throttling without lock-out (issue 12, item 7).

Failed sign-ins count per account *and* address, a signed known-device cookie lets the owner's
own browser past the per-account ceiling that bounds guessing spread over many addresses, and
nobody else can spend the owner's password-reset budget or pending reset link.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from starlette.responses import Response

from control_plane.auth.devices import DEVICE_COOKIE, DEVICE_COOKIE_PATH, set_device_cookie
from tests.control_plane.conftest import PASSWORD, PUBLIC_URL, Harness, signup_and_verify

OWNER = "owner@example.com"
WRONG = "not the password"


@asynccontextmanager
async def _from(h: Harness, address: str) -> AsyncIterator[httpx.AsyncClient]:
    """A browser of its own (own cookie jar) at ``address``."""
    transport = httpx.ASGITransport(app=h.app, client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url=PUBLIC_URL) as client:
        yield client


async def _login(client: httpx.AsyncClient, password: str, email: str = OWNER) -> httpx.Response:
    return await client.post("/api/auth/login", json={"email": email, "password": password})


async def _spray(h: Harness, attempts: int, *, email: str = OWNER, first: int = 1) -> list[int]:
    """``attempts`` wrong passwords, each from an address of its own."""
    codes = []
    for i in range(first, first + attempts):
        async with _from(h, f"198.51.100.{i}") as attacker:
            codes.append((await _login(attacker, WRONG, email)).status_code)
    return codes


def _device_cookie(client: httpx.AsyncClient) -> str:
    values = [c.value for c in client.cookies.jar if c.name == DEVICE_COOKIE]
    assert len(values) == 1, values
    return values[0] or ""


def _with_device_cookie(client: httpx.AsyncClient, value: str) -> None:
    client.cookies.set(DEVICE_COOKIE, value, domain="cp.test", path=DEVICE_COOKIE_PATH)


async def _logout(client: httpx.AsyncClient, signed_in: httpx.Response) -> None:
    csrf = {"X-CSRF-Token": signed_in.json()["csrf_token"], "Origin": PUBLIC_URL}
    assert (await client.post("/api/auth/logout", headers=csrf)).status_code == 200


def _assert_throttled(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert r.json()["code"] == "throttled"
    assert int(r.headers["retry-after"]) >= 1


# -- sign-in ------------------------------------------------------------------------------------


async def test_wrong_passwords_from_many_addresses_leave_the_owners_known_device_signing_in(
    harness: Harness,
):
    """With the default budgets: 40 addresses guessing once each use up the per-account ceiling
    for unknown devices, but the owner's browser, which signed in before, still gets in."""
    h = harness
    await signup_and_verify(h, OWNER)
    r = await _login(h.client, PASSWORD)  # the browser becomes known
    assert r.status_code == 200
    await _logout(h.client, r)

    codes = await _spray(h, 40)
    assert codes[0] == 401 and codes[-1] == 429  # distributed guessing is still bounded

    r = await _login(h.client, PASSWORD)
    assert r.status_code == 200, r.text


async def test_failures_from_one_address_do_not_lock_out_the_owner_at_another_address(
    harness: Harness,
):
    h = harness
    await signup_and_verify(h, OWNER)
    async with _from(h, "198.51.100.66") as attacker:
        for _ in range(5):
            assert (await _login(attacker, WRONG)).status_code == 401
        _assert_throttled(await _login(attacker, WRONG))
        _assert_throttled(await _login(attacker, PASSWORD))  # that address waits, right or not
    async with _from(h, "192.0.2.10") as owner_elsewhere:  # a new device, another address
        r = await _login(owner_elsewhere, PASSWORD)
        assert r.status_code == 200, r.text


async def test_an_unknown_device_is_refused_once_the_account_ceiling_is_spent(
    make_harness: Any, make_settings: Any
):
    async with make_harness(make_settings(throttle_login_account="3/hour")) as h:
        await signup_and_verify(h, OWNER)
        assert await _spray(h, 3) == [401, 401, 401]
        async with _from(h, "192.0.2.10") as new_device:
            _assert_throttled(await _login(new_device, PASSWORD))
        # Accounts nobody guessed at are not affected.
        await signup_and_verify(h, "other@example.com")
        async with _from(h, "192.0.2.11") as other:
            assert (await _login(other, PASSWORD, "other@example.com")).status_code == 200


async def test_unknown_accounts_are_throttled_like_known_ones(
    make_harness: Any, make_settings: Any
):
    """The refusal must not tell whether an account exists."""
    async with make_harness(make_settings(throttle_login_account="3/hour")) as h:
        await signup_and_verify(h, OWNER)
        for email in (OWNER, "nobody@example.com"):
            assert await _spray(h, 4, email=email) == [401, 401, 401, 429]


async def test_wrong_passwords_on_a_known_device_are_throttled_on_that_device(
    make_harness: Any, make_settings: Any
):
    async with make_harness(make_settings(throttle_login_account_address="3/minute")) as h:
        await signup_and_verify(h, OWNER)
        assert (await _login(h.client, PASSWORD)).status_code == 200
        for _ in range(3):
            assert (await _login(h.client, WRONG)).status_code == 401
        _assert_throttled(await _login(h.client, PASSWORD))
        # Another browser at the same address is not held back by this one's failures.
        async with _from(h, "203.0.113.7") as same_address:
            assert (await _login(same_address, PASSWORD)).status_code == 200


@asynccontextmanager
async def _ceiling_spent(make_harness: Any, make_settings: Any) -> AsyncIterator[Harness]:
    """The owner's browser is known; guessing from three addresses spent the account ceiling."""
    settings = make_settings(throttle_login_account="3/hour")
    async with make_harness(settings) as h:
        await signup_and_verify(h, OWNER)
        assert (await _login(h.client, PASSWORD)).status_code == 200
        assert await _spray(h, 3) == [401, 401, 401]
        yield h


async def test_a_tampered_device_cookie_counts_as_unknown(make_harness: Any, make_settings: Any):
    async with _ceiling_spent(make_harness, make_settings) as h:
        good = _device_cookie(h.client)
        payload, _, signature = good.rpartition(".")
        # The first character: all six of its bits are signature bits (the last one's low bits
        # can be base64 padding that decoders ignore, so flipping it may change nothing).
        flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
        for bad in (f"{payload}.{flipped}", good[:-4], f"x{good}"):
            async with _from(h, "192.0.2.20") as forger:
                _with_device_cookie(forger, bad)
                _assert_throttled(await _login(forger, PASSWORD))
        assert (await _login(h.client, PASSWORD)).status_code == 200


async def test_a_device_cookie_for_another_account_counts_as_unknown(
    make_harness: Any, make_settings: Any
):
    async with _ceiling_spent(make_harness, make_settings) as h:
        await signup_and_verify(h, "attacker@example.com")
        async with _from(h, "192.0.2.30") as attacker:
            r = await _login(attacker, PASSWORD, "attacker@example.com")
            assert r.status_code == 200
            _device_cookie(attacker)  # the attacker's browser is known — for their own account
            _assert_throttled(await _login(attacker, PASSWORD))


async def test_an_expired_device_cookie_counts_as_unknown(make_harness: Any, make_settings: Any):
    async with _ceiling_spent(make_harness, make_settings) as h:
        old = _device_cookie(h.client)
        h.clock.advance(h.services.core.settings.known_device_ttl_seconds + 1)
        async with _from(h, "203.0.113.7") as browser:
            _with_device_cookie(browser, old)  # the browser kept it past its Max-Age
            _assert_throttled(await _login(browser, PASSWORD))


@pytest.mark.parametrize(
    "value",
    ["", "x", "a" * 5000, "eyJkIjoiMSIsImEiOltdLCJ0IjoxfQ", "eyJkIjoiMSJ9.bm90IGEgc2ln", "..."],
)
async def test_malformed_device_cookies_are_ignored(harness: Harness, value: str):
    h = harness
    await signup_and_verify(h, OWNER)
    _with_device_cookie(h.client, value)
    assert (await _login(h.client, WRONG)).status_code == 401
    assert (await _login(h.client, PASSWORD)).status_code == 200


async def test_the_device_cookie_is_http_only_strict_scoped_and_survives_sign_out(
    harness: Harness,
):
    h = harness
    await signup_and_verify(h, OWNER)
    r = await _login(h.client, PASSWORD)
    header = next(v for v in r.headers.get_list("set-cookie") if v.startswith(DEVICE_COOKIE))
    attributes = {part.strip().split("=")[0].lower() for part in header.split(";")}
    assert {"httponly", "max-age", "path"} <= attributes
    assert "samesite=strict" in header.lower()
    assert f"path={DEVICE_COOKIE_PATH}" in header.lower()
    assert "secure" not in attributes  # development over http
    before = _device_cookie(h.client)
    # Nothing in the cookie names the account in the clear.
    assert "owner" not in before and "example" not in before
    await _logout(h.client, r)
    assert _device_cookie(h.client) == before  # it names the device, not the session


def test_the_device_cookie_is_secure_and_prefixed_when_cookies_are():
    response = Response()
    set_device_cookie(response, "v", max_age=60, secure=True)
    header = response.headers["set-cookie"]
    assert header.startswith("__Secure-qr_device=v;")
    lowered = header.lower()
    assert "secure" in lowered and "httponly" in lowered and "samesite=strict" in lowered


# -- password reset -----------------------------------------------------------------------------


async def _forgot(client: httpx.AsyncClient, email: str = OWNER) -> httpx.Response:
    return await client.post("/api/auth/forgot-password", json={"email": email})


async def test_reset_requests_from_another_address_do_not_spend_the_owners_budget(
    harness: Harness,
):
    """Defaults: three requests in 15 minutes per account and address."""
    h = harness
    await signup_and_verify(h, OWNER)
    async with _from(h, "198.51.100.66") as attacker:
        for _ in range(3):
            assert (await _forgot(attacker)).status_code == 202
        _assert_throttled(await _forgot(attacker))
    await h.drain()
    sent = len(h.outbox.to(OWNER))
    async with _from(h, "192.0.2.10") as owner_elsewhere:
        assert (await _forgot(owner_elsewhere)).status_code == 202
    await h.drain()
    assert len(h.outbox.to(OWNER)) == sent + 1


async def test_a_known_device_can_ask_for_a_reset_when_others_spent_the_account_ceiling(
    make_harness: Any, make_settings: Any
):
    async with make_harness(make_settings(throttle_email_account="3/hour")) as h:
        await signup_and_verify(h, OWNER)
        assert (await _login(h.client, PASSWORD)).status_code == 200
        for i in range(3):
            async with _from(h, f"198.51.100.{i + 1}") as attacker:
                assert (await _forgot(attacker)).status_code == 202
        async with _from(h, "198.51.100.9") as attacker:
            _assert_throttled(await _forgot(attacker))  # mail to the victim stays bounded
        await h.drain()
        sent = len(h.outbox.to(OWNER))
        assert (await _forgot(h.client)).status_code == 202
        await h.drain()
        assert len(h.outbox.to(OWNER)) == sent + 1


async def test_a_reset_request_by_someone_else_does_not_spend_the_owners_pending_link(
    harness: Harness,
):
    h = harness
    await signup_and_verify(h, OWNER)
    assert (await _forgot(h.client)).status_code == 202
    await h.drain()
    owners_link = h.outbox.last_token(OWNER)
    async with _from(h, "198.51.100.66") as attacker:
        assert (await _forgot(attacker)).status_code == 202
    await h.drain()
    newer_link = h.outbox.last_token(OWNER)
    assert newer_link != owners_link
    r = await h.client.post(
        "/api/auth/reset-password", json={"token": owners_link, "password": "a brand new password"}
    )
    assert r.status_code == 200, r.text
    # Using one link spends every other.
    r = await h.client.post(
        "/api/auth/reset-password", json={"token": newer_link, "password": "yet another password"}
    )
    assert r.status_code == 400 and r.json()["code"] == "invalid_token"


async def test_a_password_reset_makes_the_browser_a_known_device(
    make_harness: Any, make_settings: Any
):
    """The way out for an owner on a new device while the account ceiling is spent."""
    async with make_harness(make_settings(throttle_login_account="3/hour")) as h:
        await signup_and_verify(h, OWNER)
        assert await _spray(h, 3) == [401, 401, 401]
        async with _from(h, "192.0.2.10") as new_device:
            _assert_throttled(await _login(new_device, PASSWORD))
            assert (await _forgot(new_device)).status_code == 202
            await h.drain()
            r = await new_device.post(
                "/api/auth/reset-password",
                json={"token": h.outbox.last_token(OWNER), "password": "a brand new password"},
            )
            assert r.status_code == 200, r.text
            r = await _login(new_device, "a brand new password")
            assert r.status_code == 200, r.text


@pytest.mark.redis
async def test_budgets_and_known_devices_hold_across_processes_sharing_redis(
    make_harness: Any, make_settings: Any, redis_url: str | None
):
    if not redis_url:
        pytest.skip("QUOROOM_TEST_REDIS_URL not set")
    email = f"redis-{time.time_ns()}@example.com"
    settings = make_settings(redis_url=redis_url, throttle_login_account="3/hour")
    async with make_harness(settings) as first, make_harness(settings) as second:
        await signup_and_verify(first, email)
        assert (await _login(first.client, PASSWORD, email)).status_code == 200
        assert await _spray(second, 3, email=email) == [401, 401, 401]
        async with _from(first, "192.0.2.10") as new_device:
            _assert_throttled(await _login(new_device, PASSWORD, email))
        # The cookie the first process set is honoured by the second (same SECRET_KEY).
        _with_device_cookie(second.client, _device_cookie(first.client))
        assert (await _login(second.client, PASSWORD, email)).status_code == 200
