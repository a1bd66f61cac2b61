"""Verification and reset tokens (hashed, single use, expiring), enumeration-safe answers, the
password policy, input validation and throttling."""

from __future__ import annotations

import time
from typing import Any

import pytest
from argon2 import PasswordHasher as Argon2

from control_plane.auth.passwords import PasswordHasher
from control_plane.auth.sessions import token_hash
from tests.control_plane.conftest import PASSWORD, Harness, login_body, signup_and_verify


async def test_a_verification_link_works_once(harness: Harness):
    h = harness
    await h.client.post("/api/auth/signup", json={"email": "v@example.com", "password": PASSWORD})
    await h.drain()
    token = h.outbox.last_token("v@example.com")
    assert (await h.client.post("/api/auth/verify-email", json={"token": token})).status_code == 200
    r = await h.client.post("/api/auth/verify-email", json={"token": token})
    assert r.status_code == 400 and r.json()["code"] == "invalid_token"


async def test_a_verification_link_expires_after_24_hours(harness: Harness):
    h = harness
    await h.client.post("/api/auth/signup", json={"email": "e@example.com", "password": PASSWORD})
    await h.drain()
    h.clock.advance(24 * 3600 + 1)
    r = await h.client.post(
        "/api/auth/verify-email", json={"token": h.outbox.last_token("e@example.com")}
    )
    assert r.status_code == 400 and r.json()["code"] == "invalid_token"


async def test_tokens_are_stored_hashed(harness: Harness):
    h = harness
    from sqlalchemy import select

    from control_plane.auth.models import EmailToken

    await h.client.post("/api/auth/signup", json={"email": "hs@example.com", "password": PASSWORD})
    await h.drain()
    raw = h.outbox.last_token("hs@example.com")
    async with h.services.core.session_factory() as db:
        stored = (await db.scalars(select(EmailToken.token_hash))).all()
    assert stored == [token_hash(raw)]


async def test_resending_verification_spends_the_old_link(harness: Harness):
    h = harness
    await h.client.post("/api/auth/signup", json={"email": "rs@example.com", "password": PASSWORD})
    await h.drain()
    old = h.outbox.last_token("rs@example.com")
    r = await h.client.post("/api/auth/resend-verification", json={"email": "rs@example.com"})
    assert r.status_code == 202
    await h.drain()
    new = h.outbox.last_token("rs@example.com")
    assert new != old
    r = await h.client.post("/api/auth/verify-email", json={"token": old})
    assert r.status_code == 400
    assert (await h.client.post("/api/auth/verify-email", json={"token": new})).status_code == 200


async def test_signup_with_a_taken_email_answers_the_same_and_notifies_the_owner(harness: Harness):
    h = harness
    await signup_and_verify(h, "taken@example.com")
    r = await h.client.post(
        "/api/auth/signup", json={"email": "TAKEN@example.com", "password": "another password 2"}
    )
    assert r.status_code == 202
    await h.drain()
    assert h.outbox.to("taken@example.com")[-1].subject == "You already have a Quoroom account"
    # The original password still works.
    await login_body(h, "taken@example.com")


async def test_forgot_password_answers_the_same_for_unknown_emails_and_sends_nothing(
    harness: Harness,
):
    h = harness
    await signup_and_verify(h, "known@example.com")
    known = await h.client.post("/api/auth/forgot-password", json={"email": "known@example.com"})
    unknown = await h.client.post("/api/auth/forgot-password", json={"email": "nobody@example.com"})
    assert known.status_code == unknown.status_code == 202
    assert known.json() == unknown.json()
    await h.drain()
    assert h.outbox.to("nobody@example.com") == []
    assert h.outbox.to("known@example.com")[-1].subject == "Reset your password"


async def test_a_reset_sets_the_password_revokes_every_session_and_sends_a_notice(
    harness: Harness,
):
    h = harness
    await signup_and_verify(h, "reset@example.com")
    session = await login_body(h, "reset@example.com")
    await h.client.post("/api/auth/forgot-password", json={"email": "reset@example.com"})
    await h.drain()
    link = h.outbox.to("reset@example.com")[-1].link
    assert link is not None and link.startswith("http://cp.test/reset-password#token=")
    token = h.outbox.last_token("reset@example.com")
    r = await h.client.post(
        "/api/auth/reset-password", json={"token": token, "password": "a brand new password"}
    )
    assert r.status_code == 200, r.text
    await h.drain()
    assert h.outbox.to("reset@example.com")[-1].subject == "Your password was changed"
    r = await h.client.post("/api/auth/refresh", json={"refresh_token": session["refresh_token"]})
    assert r.status_code == 401
    r = await h.client.post(
        "/api/auth/login", json={"email": "reset@example.com", "password": PASSWORD}
    )
    assert r.status_code == 401
    await login_body(h, "reset@example.com", "a brand new password")
    # The link is spent.
    r = await h.client.post(
        "/api/auth/reset-password", json={"token": token, "password": "yet another password"}
    )
    assert r.status_code == 400 and r.json()["code"] == "invalid_token"


async def test_a_reset_link_expires_after_an_hour(harness: Harness):
    h = harness
    await signup_and_verify(h, "late@example.com")
    await h.client.post("/api/auth/forgot-password", json={"email": "late@example.com"})
    await h.drain()
    h.clock.advance(3601)
    r = await h.client.post(
        "/api/auth/reset-password",
        json={"token": h.outbox.last_token("late@example.com"), "password": "a brand new password"},
    )
    assert r.status_code == 400 and r.json()["code"] == "invalid_token"


async def test_a_verification_token_cannot_reset_a_password(harness: Harness):
    h = harness
    await h.client.post("/api/auth/signup", json={"email": "mix@example.com", "password": PASSWORD})
    await h.drain()
    r = await h.client.post(
        "/api/auth/reset-password",
        json={"token": h.outbox.last_token("mix@example.com"), "password": "a brand new password"},
    )
    assert r.status_code == 400


async def test_a_reset_with_a_weak_password_keeps_the_link_usable(harness: Harness):
    h = harness
    await signup_and_verify(h, "weak@example.com")
    await h.client.post("/api/auth/forgot-password", json={"email": "weak@example.com"})
    await h.drain()
    token = h.outbox.last_token("weak@example.com")
    r = await h.client.post("/api/auth/reset-password", json={"token": token, "password": "short"})
    assert r.status_code == 422 and r.json()["code"] == "weak_password"
    r = await h.client.post(
        "/api/auth/reset-password", json={"token": token, "password": "long enough password"}
    )
    assert r.status_code == 200


@pytest.mark.parametrize(
    "password",
    ["short", " " * 12, "x" * 129, "weakpw@example.com"],
    ids=["too-short", "blank", "too-long", "same-as-email"],
)
async def test_signup_refuses_weak_passwords(harness: Harness, password: str):
    r = await harness.client.post(
        "/api/auth/signup", json={"email": "weakpw@example.com", "password": password}
    )
    assert r.status_code == 422
    assert r.json()["code"] == "weak_password"


async def test_login_with_a_wrong_password_or_unknown_email_gives_one_generic_error(
    harness: Harness,
):
    h = harness
    await signup_and_verify(h, "g@example.com")
    wrong = await h.client.post(
        "/api/auth/login", json={"email": "g@example.com", "password": "wrong password!"}
    )
    unknown = await h.client.post(
        "/api/auth/login", json={"email": "nobody@example.com", "password": "wrong password!"}
    )
    assert wrong.status_code == unknown.status_code == 401
    assert (
        wrong.json()
        == unknown.json()
        == {
            "error": "invalid email or password",
            "code": "invalid_credentials",
        }
    )


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[]", 422, "invalid_body"),
        (b'{"email": 5, "password": "x"}', 422, "invalid_body"),
        (b'{"email": "not-an-email", "password": "x"}', 422, "invalid_body"),
        (b'{"email": "a@example.com"}', 422, "invalid_body"),
        (b'{"email": "a@example.com", "password": "x", "extra": 1}', 422, "invalid_body"),
        (
            b'{"email": "a@example.com", "password": "x", "transport": "carrier-pigeon"}',
            422,
            "invalid_body",
        ),
    ],
    ids=["malformed", "array", "wrong-type", "bad-email", "missing", "unknown-field", "enum"],
)
async def test_login_refuses_bad_bodies_with_a_json_error(
    harness: Harness, body: bytes, status: int, code: str
):
    r = await harness.client.post(
        "/api/auth/login", content=body, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    assert r.json()["code"] == code
    assert "error" in r.json()


async def test_a_validation_error_names_the_field_and_never_echoes_the_password(harness: Harness):
    r = await harness.client.post(
        "/api/auth/signup", json={"email": "a@example.com", "password": "p" * 2000}
    )
    assert r.status_code == 422
    assert r.json()["field"] == "password"
    assert "ppppp" not in r.text


async def test_oversized_fields_and_bodies_are_refused(harness: Harness):
    r = await harness.client.post(
        "/api/auth/forgot-password", json={"email": "a" * 250 + "@example.com"}
    )
    assert r.status_code == 422 and r.json()["field"] == "email"
    r = await harness.client.post("/api/auth/verify-email", json={"token": "t" * 300})
    assert r.status_code == 422 and r.json()["field"] == "token"
    r = await harness.client.post(
        "/api/auth/login",
        content=b'{"email": "' + b"a" * 100_000 + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["code"] == "body_too_large"


async def test_unknown_routes_answer_json_404(harness: Harness):
    r = await harness.client.get("/api/auth/nope")
    assert r.status_code == 404 and r.json()["code"] == "not_found"


# -- throttling ---------------------------------------------------------------------------------


async def test_failed_logins_for_one_account_are_throttled_with_retry_after(
    make_harness: Any, make_settings: Any
):
    async with make_harness(make_settings(throttle_login_account="3/minute;5/hour")) as h:
        await signup_and_verify(h, "t@example.com")
        for _ in range(3):
            r = await h.client.post(
                "/api/auth/login", json={"email": "t@example.com", "password": "wrong password"}
            )
            assert r.status_code == 401
        r = await h.client.post(
            "/api/auth/login", json={"email": "t@example.com", "password": PASSWORD}
        )
        assert r.status_code == 429
        assert r.json()["code"] == "throttled"
        assert 1 <= int(r.headers["retry-after"]) <= 60


async def test_logins_from_one_address_are_throttled(make_harness: Any, make_settings: Any):
    async with make_harness(make_settings(throttle_login_address="2/minute")) as h:
        for i in range(2):
            r = await h.client.post(
                "/api/auth/login", json={"email": f"x{i}@example.com", "password": "whatever pw"}
            )
            assert r.status_code == 401
        r = await h.client.post(
            "/api/auth/login", json={"email": "x9@example.com", "password": "whatever pw"}
        )
        assert r.status_code == 429 and "retry-after" in r.headers


async def test_forgot_password_and_signup_are_throttled_per_account(
    make_harness: Any, make_settings: Any
):
    async with make_harness(
        make_settings(throttle_email_account="1/hour", throttle_signup_account="1/hour")
    ) as h:
        body = {"email": "f@example.com"}
        assert (await h.client.post("/api/auth/forgot-password", json=body)).status_code == 202
        r = await h.client.post("/api/auth/forgot-password", json=body)
        # A sliding-window counter's wait estimate can be short right after a window boundary
        # (seen: 30 s at the hour on Redis), so only its presence and sign are pinned here.
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        r = await h.client.post("/api/auth/resend-verification", json=body)
        assert r.status_code == 429
        signup = {"email": "s@example.com", "password": PASSWORD}
        assert (await h.client.post("/api/auth/signup", json=signup)).status_code == 202
        assert (await h.client.post("/api/auth/signup", json=signup)).status_code == 429


async def test_a_throttle_storage_outage_fails_closed(make_harness: Any, make_settings: Any):
    async with make_harness(make_settings(redis_url="redis://127.0.0.1:1/0")) as h:
        r = await h.client.post(
            "/api/auth/login", json={"email": "o@example.com", "password": "whatever pw"}
        )
        assert r.status_code == 503
        assert r.json()["code"] == "throttle_unavailable"


@pytest.mark.redis
async def test_throttling_shares_budgets_through_redis(
    make_harness: Any, make_settings: Any, redis_url: str | None
):
    if not redis_url:
        pytest.skip("QUOROOM_TEST_REDIS_URL not set")
    email = f"redis-{time.time_ns()}@example.com"
    settings = make_settings(redis_url=redis_url, throttle_email_account="1/hour")
    async with make_harness(settings) as first, make_harness(settings) as second:
        assert (
            await first.client.post("/api/auth/forgot-password", json={"email": email})
        ).status_code == 202
        r = await second.client.post("/api/auth/forgot-password", json={"email": email})
        assert r.status_code == 429


# -- hashing ------------------------------------------------------------------------------------


async def test_passwords_are_hashed_with_argon2id_at_owasp_parameters(make_settings: Any):
    hasher = PasswordHasher(
        make_settings(password_hash_memory_kib=19456, password_hash_time_cost=2)
    )
    encoded = await hasher.hash("a password")
    assert encoded.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert await hasher.verify(encoded, "a password")
    assert not await hasher.verify(encoded, "another")
    assert not await hasher.verify(None, "a password")
    assert not await hasher.verify("not-a-hash", "a password")
    assert Argon2().verify(encoded, "a password")


async def test_an_unknown_account_takes_as_long_as_a_wrong_password(make_settings: Any):
    hasher = PasswordHasher(
        make_settings(password_hash_memory_kib=19456, password_hash_time_cost=2)
    )
    encoded = await hasher.hash("a password")
    await hasher.warm_up()

    async def timed(h: str | None) -> float:
        start = time.perf_counter()
        for _ in range(3):
            await hasher.verify(h, "wrong")
        return time.perf_counter() - start

    # Interleaved, best of five each: other processes on a 2-core box only ever add time.
    known, unknown = float("inf"), float("inf")
    for _ in range(5):
        known = min(known, await timed(encoded))
        unknown = min(unknown, await timed(None))
    assert 0.5 < unknown / known < 2.0
