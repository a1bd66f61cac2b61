"""The whole account journey through the HTTP API: sign up, verify, sign in, refresh, sign out,
reset the password."""

from __future__ import annotations

from tests.control_plane.conftest import PASSWORD, Harness, login_body, login_cookie


async def test_a_new_user_signs_up_verifies_signs_in_refreshes_and_signs_out(harness: Harness):
    h = harness
    r = await h.client.post(
        "/api/auth/signup", json={"email": "Ada@Example.com", "password": PASSWORD, "name": "Ada"}
    )
    assert r.status_code == 202
    assert r.json()["ok"] is True
    await h.drain()
    [mail] = h.outbox.to("ada@example.com")
    assert mail.link is not None and mail.link.startswith("http://cp.test/verify-email#token=")

    # Not verified yet: the right password is not enough.
    r = await h.client.post(
        "/api/auth/login", json={"email": "ada@example.com", "password": PASSWORD}
    )
    assert r.status_code == 403
    assert r.json()["code"] == "email_not_verified"

    r = await h.client.post(
        "/api/auth/verify-email", json={"token": h.outbox.last_token("ada@example.com")}
    )
    assert r.status_code == 200

    data = await login_body(h, "ada@example.com")
    assert data["user"]["email"] == "ada@example.com"
    assert data["user"]["email_verified"] is True
    assert data["access_token"] and data["refresh_token"]
    assert data["expires_in"] <= 900
    bearer = {"Authorization": f"Bearer {data['access_token']}"}

    r = await h.client.get("/api/auth/me", headers=bearer)
    assert r.status_code == 200
    assert r.json()["name"] == "Ada"
    assert r.json()["has_password"] is True

    r = await h.client.post("/api/auth/refresh", json={"refresh_token": data["refresh_token"]})
    assert r.status_code == 200
    refreshed = r.json()
    assert refreshed["refresh_token"] != data["refresh_token"]
    assert refreshed["session_id"] == data["session_id"]

    r = await h.client.post("/api/auth/logout", json={"refresh_token": refreshed["refresh_token"]})
    assert r.status_code == 200
    r = await h.client.get(
        "/api/auth/me", headers={"Authorization": f"Bearer {refreshed['access_token']}"}
    )
    assert r.status_code == 401
    assert r.json()["code"] == "invalid_token"


async def test_a_browser_signs_in_with_cookies_and_never_sees_the_tokens(harness: Harness):
    h = harness
    from tests.control_plane.conftest import signup_and_verify

    await signup_and_verify(h, "bo@example.com")
    data = await login_cookie(h, "bo@example.com")
    assert data["access_token"] is None and data["refresh_token"] is None
    assert data["csrf_token"]
    jar = {c.name: c for c in h.client.cookies.jar}
    assert jar["qr_refresh"].path == "/api/auth"
    assert jar["qr_access"].path == "/"
    assert jar["qr_access"].has_nonstandard_attr("HttpOnly")
    assert not jar["qr_csrf"].has_nonstandard_attr("HttpOnly")

    r = await h.client.get("/api/auth/me")
    assert r.status_code == 200

    csrf = {"X-CSRF-Token": data["csrf_token"], "Origin": "http://cp.test"}
    r = await h.client.post("/api/auth/refresh", headers=csrf)
    assert r.status_code == 200, r.text
    assert r.json()["refresh_token"] is None
    # The refresh rotates the CSRF cookie with the session: a page reads the new one, as here.
    csrf["X-CSRF-Token"] = h.client.cookies.get("qr_csrf") or ""

    r = await h.client.post("/api/auth/logout", headers=csrf)
    assert r.status_code == 200
    assert "qr_access" not in {c.name for c in h.client.cookies.jar}
