"""Refresh rotation, reuse detection with a grace window, CSRF on cookie requests, sessions list
and revoke-all."""

from __future__ import annotations

from control_plane.keys.service import KeyRing
from tests.control_plane.conftest import Harness, login_body, login_cookie, signup_and_verify


async def test_a_replayed_refresh_token_after_the_grace_window_revokes_the_whole_session(
    harness: Harness,
):
    h = harness
    await signup_and_verify(h, "r@example.com")
    first = await login_body(h, "r@example.com")
    r = await h.client.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    second = r.json()
    h.clock.advance(11)
    r = await h.client.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert r.status_code == 401
    assert r.json()["code"] == "refresh_token_reused"
    # The legitimate holder's newer token dies with the session.
    r = await h.client.post("/api/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_refresh_token"


async def test_a_concurrent_tab_within_the_grace_window_gets_the_same_new_token(harness: Harness):
    h = harness
    await signup_and_verify(h, "tabs@example.com")
    first = await login_body(h, "tabs@example.com")
    a = await h.client.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    h.clock.advance(5)
    b = await h.client.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert a.status_code == b.status_code == 200
    assert a.json()["refresh_token"] == b.json()["refresh_token"]
    # ... and the session still works.
    r = await h.client.post("/api/auth/refresh", json={"refresh_token": b.json()["refresh_token"]})
    assert r.status_code == 200


async def test_an_unknown_or_oversized_refresh_token_is_refused(harness: Harness):
    h = harness
    r = await h.client.post("/api/auth/refresh", json={"refresh_token": "nope"})
    assert r.status_code == 401 and r.json()["code"] == "invalid_refresh_token"
    r = await h.client.post("/api/auth/refresh", json={"refresh_token": "x" * 300})
    assert r.status_code == 422 and r.json()["code"] == "invalid_body"
    r = await h.client.post("/api/auth/refresh", json={"refresh_token": 42})
    assert r.status_code == 422 and r.json()["field"] == "refresh_token"


async def test_a_refresh_token_past_the_session_lifetime_is_refused(harness: Harness):
    h = harness
    await signup_and_verify(h, "old@example.com")
    first = await login_body(h, "old@example.com")
    h.clock.advance(31 * 24 * 3600)
    r = await h.client.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert r.status_code == 401 and r.json()["code"] == "invalid_refresh_token"


async def test_an_access_token_expires_after_its_ttl(harness: Harness):
    h = harness
    await signup_and_verify(h, "ttl@example.com")
    tokens = await login_body(h, "ttl@example.com")
    h.clock.advance(900 + 61)
    r = await h.client.get(
        "/api/auth/me", headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert r.status_code == 401 and r.json()["code"] == "invalid_token"


async def test_cookie_requests_without_the_csrf_token_are_refused(harness: Harness):
    h = harness
    await signup_and_verify(h, "c@example.com")
    data = await login_cookie(h, "c@example.com")
    r = await h.client.post("/api/auth/refresh")
    assert r.status_code == 403 and r.json()["code"] == "csrf_failed"
    r = await h.client.post("/api/auth/sessions/revoke-all")
    assert r.status_code == 403 and r.json()["code"] == "csrf_failed"
    r = await h.client.post(
        "/api/auth/sessions/revoke-all", headers={"X-CSRF-Token": data["csrf_token"] + "x"}
    )
    assert r.status_code == 403 and r.json()["code"] == "csrf_failed"
    r = await h.client.post("/api/auth/logout")
    assert r.status_code == 403
    # Safe requests need no token.
    assert (await h.client.get("/api/auth/me")).status_code == 200


async def test_a_csrf_token_of_another_session_is_refused(harness: Harness):
    h = harness
    await signup_and_verify(h, "c2@example.com")
    other = await login_cookie(h, "c2@example.com")
    await login_cookie(h, "c2@example.com")  # new session, new cookies
    h.client.cookies.set("qr_csrf", other["csrf_token"], domain="cp.test", path="/")
    r = await h.client.post(
        "/api/auth/sessions/revoke-all", headers={"X-CSRF-Token": other["csrf_token"]}
    )
    assert r.status_code == 403 and r.json()["code"] == "csrf_failed"


async def test_a_cross_origin_request_is_refused_even_with_the_token(harness: Harness):
    h = harness
    await signup_and_verify(h, "o@example.com")
    data = await login_cookie(h, "o@example.com")
    r = await h.client.post(
        "/api/auth/refresh",
        headers={"X-CSRF-Token": data["csrf_token"], "Origin": "https://evil.example"},
    )
    assert r.status_code == 403 and r.json()["code"] == "origin_mismatch"
    r = await h.client.post(
        "/api/auth/login",
        json={"email": "o@example.com", "password": "whatever password"},
        headers={"Origin": "https://evil.example"},
    )
    assert r.status_code == 403 and r.json()["code"] == "origin_mismatch"


async def test_bearer_requests_need_no_csrf_token(harness: Harness):
    h = harness
    await signup_and_verify(h, "b@example.com")
    tokens = await login_body(h, "b@example.com")
    r = await h.client.post(
        "/api/auth/sessions/revoke-all",
        headers={"Authorization": f"Bearer {tokens['access_token']}"},
    )
    assert r.status_code == 200 and r.json()["revoked"] == 1


async def test_logout_revokes_only_its_own_session(harness: Harness):
    h = harness
    await signup_and_verify(h, "two@example.com")
    desktop = await login_body(h, "two@example.com")
    phone = await login_body(h, "two@example.com")
    r = await h.client.post("/api/auth/logout", json={"refresh_token": desktop["refresh_token"]})
    assert r.status_code == 200
    r = await h.client.get(
        "/api/auth/me", headers={"Authorization": f"Bearer {phone['access_token']}"}
    )
    assert r.status_code == 200
    r = await h.client.post("/api/auth/refresh", json={"refresh_token": desktop["refresh_token"]})
    assert r.status_code == 401


async def test_sessions_are_listed_and_one_can_be_revoked(harness: Harness):
    h = harness
    await signup_and_verify(h, "list@example.com")
    a = await login_body(h, "list@example.com")
    b = await login_body(h, "list@example.com")
    bearer = {"Authorization": f"Bearer {a['access_token']}"}
    r = await h.client.get("/api/auth/sessions", headers=bearer)
    sessions = r.json()["sessions"]
    assert {s["id"] for s in sessions} == {a["session_id"], b["session_id"]}
    assert [s["current"] for s in sessions if s["id"] == a["session_id"]] == [True]
    r = await h.client.delete(f"/api/auth/sessions/{b['session_id']}", headers=bearer)
    assert r.status_code == 200
    r = await h.client.delete(f"/api/auth/sessions/{b['session_id']}", headers=bearer)
    assert r.status_code == 404 and r.json()["code"] == "session_not_found"
    r = await h.client.get("/api/auth/sessions", headers=bearer)
    assert [s["id"] for s in r.json()["sessions"]] == [a["session_id"]]


async def test_another_users_session_cannot_be_revoked(harness: Harness):
    h = harness
    await signup_and_verify(h, "u1@example.com")
    await signup_and_verify(h, "u2@example.com")
    u1 = await login_body(h, "u1@example.com")
    u2 = await login_body(h, "u2@example.com")
    r = await h.client.delete(
        f"/api/auth/sessions/{u2['session_id']}",
        headers={"Authorization": f"Bearer {u1['access_token']}"},
    )
    assert r.status_code == 404


async def test_me_refuses_missing_malformed_and_forged_tokens(harness: Harness):
    h = harness
    r = await h.client.get("/api/auth/me")
    assert r.status_code == 401 and r.json()["code"] == "not_authenticated"
    for header in ("Basic abc", "Bearer ", "Bearer not.a.jwt", "Bearer " + "a" * 5000):
        r = await h.client.get("/api/auth/me", headers={"Authorization": header})
        assert r.status_code == 401, header
        assert r.json()["code"] == "invalid_token"


async def test_a_runtime_audience_token_is_not_accepted_by_the_control_plane(harness: Harness):
    h = harness
    await signup_and_verify(h, "aud@example.com")
    tokens = await login_body(h, "aud@example.com")
    me = (
        await h.client.get(
            "/api/auth/me", headers={"Authorization": f"Bearer {tokens['access_token']}"}
        )
    ).json()
    runtime_token = h.services.get(KeyRing).sign(
        {"sub": me["id"], "sid": tokens["session_id"]}, audience="quoroom-runtime"
    )
    r = await h.client.get("/api/auth/me", headers={"Authorization": f"Bearer {runtime_token}"})
    assert r.status_code == 401
