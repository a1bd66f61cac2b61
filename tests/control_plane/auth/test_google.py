"""Google sign-in against a fake OpenID provider on loopback: PKCE, state cookie, nonce, ID-token
checks, identities keyed by ``sub``, linking only between verified emails."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.control_plane.conftest import Harness, signup_and_verify
from tests.fakes.google_oidc import CLIENT_ID, CLIENT_SECRET, FakeGoogle


@pytest.fixture(scope="module")
def fake_google() -> Iterator[FakeGoogle]:
    fake = FakeGoogle().start()
    yield fake
    fake.stop()


@pytest.fixture
async def gh(
    make_harness: Any, make_settings: Any, fake_google: FakeGoogle
) -> AsyncIterator[Harness]:
    fake_google.reset()
    settings = make_settings(
        google_client_id=CLIENT_ID,
        google_client_secret=CLIENT_SECRET,
        google_discovery_url=fake_google.discovery_url,
    )
    async with make_harness(settings) as h:
        yield h


async def _authorize(h: Harness, next_path: str | None = None) -> tuple[str, dict[str, list[str]]]:
    """Start the flow; follow the provider's redirect; return the callback path and query."""
    params = {"next": next_path} if next_path else None
    r = await h.client.get("/api/auth/google", params=params)
    assert r.status_code == 302, r.text
    location = r.headers["location"]
    query = parse_qs(urlsplit(location).query)
    assert query["code_challenge_method"] == ["S256"]
    assert query["nonce"][0] and query["state"][0]
    async with httpx.AsyncClient() as browser:
        r = await browser.get(location)
    assert r.status_code == 302, r.text
    callback = urlsplit(r.headers["location"])
    assert callback.netloc == "cp.test"
    return callback.path, parse_qs(callback.query)


async def _sign_in(h: Harness, next_path: str | None = None) -> httpx.Response:
    path, query = await _authorize(h, next_path)
    return await h.client.get(path, params={k: v[0] for k, v in query.items()})


async def test_google_sign_in_creates_a_verified_account_and_signs_the_browser_in(
    gh: Harness, fake_google: FakeGoogle
):
    r = await _sign_in(gh, next_path="/cloud/new")
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "http://cp.test/cloud/new"
    me = await gh.client.get("/api/auth/me")
    assert me.status_code == 200
    body = me.json()
    assert body["email"] == "gina@example.com"
    assert body["email_verified"] is True
    assert body["has_password"] is False
    assert body["identities"] == ["google"]
    # PKCE: the verifier went to the token endpoint, never the challenge's preimage in the URL.
    assert fake_google.token_requests[-1]["code_verifier"]


async def test_a_second_google_sign_in_finds_the_account_by_sub_even_if_the_email_changed(
    gh: Harness, fake_google: FakeGoogle
):
    assert (await _sign_in(gh)).status_code == 303
    first = (await gh.client.get("/api/auth/me")).json()["id"]
    gh.client.cookies.clear()
    fake_google.next_identity = {**fake_google.next_identity, "email": "gina.new@example.com"}
    assert (await _sign_in(gh)).status_code == 303
    assert (await gh.client.get("/api/auth/me")).json()["id"] == first


async def test_google_links_to_an_existing_password_account_when_both_emails_are_verified(
    gh: Harness, fake_google: FakeGoogle
):
    await signup_and_verify(gh, "gina@example.com")
    assert (await _sign_in(gh)).status_code == 303
    me = (await gh.client.get("/api/auth/me")).json()
    assert me["has_password"] is True
    assert me["identities"] == ["google"]


async def test_google_refuses_to_link_to_an_account_whose_email_is_not_verified(gh: Harness):
    r = await gh.client.post(
        "/api/auth/signup", json={"email": "gina@example.com", "password": "squatter password 1"}
    )
    assert r.status_code == 202
    r = await _sign_in(gh)
    assert r.status_code == 409
    assert r.json()["code"] == "account_link_refused"


async def test_google_refuses_an_unverified_google_email(gh: Harness, fake_google: FakeGoogle):
    fake_google.next_identity = {**fake_google.next_identity, "email_verified": False}
    r = await _sign_in(gh)
    assert r.status_code == 403
    assert r.json()["code"] == "oauth_email_not_verified"


async def test_a_callback_whose_state_does_not_match_the_cookie_is_refused(gh: Harness):
    path, query = await _authorize(gh)
    params = {k: v[0] for k, v in query.items()}
    params["state"] = "attacker-state"
    r = await gh.client.get(path, params=params)
    assert r.status_code == 400
    assert r.json()["code"] == "oauth_state_mismatch"


async def test_a_callback_without_the_state_cookie_is_refused(gh: Harness):
    """CVE-2025-68481: a state that is not bound to this browser must not sign anyone in."""
    path, query = await _authorize(gh)
    gh.client.cookies.clear()
    r = await gh.client.get(path, params={k: v[0] for k, v in query.items()})
    assert r.status_code == 400
    assert r.json()["code"] == "oauth_state_mismatch"


async def test_a_tampered_state_cookie_is_refused(gh: Harness):
    path, query = await _authorize(gh)
    value = gh.client.cookies.get("qr_oauth", path="/api/auth/google")
    assert value
    gh.client.cookies.set("qr_oauth", value[:-2] + "xx", domain="cp.test", path="/api/auth/google")
    r = await gh.client.get(path, params={k: v[0] for k, v in query.items()})
    assert r.status_code == 400
    assert r.json()["code"] == "oauth_state_mismatch"


async def test_an_id_token_with_another_nonce_is_refused(gh: Harness, fake_google: FakeGoogle):
    fake_google.claim_overrides = {"nonce": "replayed-nonce"}
    r = await _sign_in(gh)
    assert r.status_code == 400
    assert r.json()["code"] == "invalid_id_token"


@pytest.mark.parametrize(
    "overrides",
    [
        {"aud": "someone-else.apps.googleusercontent.com"},
        {"iss": "https://evil.example"},
        {"exp": 1_000_000_000},
        {"nonce": None},
        {"sub": None},
        {"email": None},
    ],
    ids=["wrong-aud", "wrong-iss", "expired", "no-nonce", "no-sub", "no-email"],
)
async def test_an_id_token_with_a_bad_claim_is_refused(
    gh: Harness, fake_google: FakeGoogle, overrides: dict[str, Any]
):
    fake_google.claim_overrides = overrides
    r = await _sign_in(gh)
    assert r.status_code in (400, 403)
    assert r.json()["code"] == "invalid_id_token"
    assert (await gh.client.get("/api/auth/me")).status_code == 401


async def test_a_provider_error_on_the_callback_is_refused(gh: Harness):
    path, query = await _authorize(gh)
    r = await gh.client.get(path, params={"state": query["state"][0], "error": "access_denied"})
    assert r.status_code == 400
    assert r.json()["code"] == "oauth_provider_error"


async def test_a_code_that_the_provider_rejects_is_refused(gh: Harness):
    path, query = await _authorize(gh)
    r = await gh.client.get(path, params={"state": query["state"][0], "code": "forged"})
    assert r.status_code == 400
    assert r.json()["code"] == "oauth_provider_error"


async def test_the_return_path_cannot_redirect_off_site(gh: Harness):
    r = await _sign_in(gh, next_path="//evil.example/x")
    assert r.status_code == 303
    assert r.headers["location"] == "http://cp.test/"


async def test_google_sign_in_is_404_when_not_configured(harness: Harness):
    r = await harness.client.get("/api/auth/google")
    assert r.status_code == 404
    assert r.json()["code"] == "oauth_not_configured"


async def test_an_unreachable_provider_answers_502(make_harness: Any, make_settings: Any):
    settings = make_settings(
        google_client_id=CLIENT_ID,
        google_client_secret=CLIENT_SECRET,
        google_discovery_url="http://127.0.0.1:1/.well-known/openid-configuration",
    )
    async with make_harness(settings) as h:
        r = await h.client.get("/api/auth/google")
        assert r.status_code == 502
        assert r.json()["code"] == "oauth_provider_unavailable"


async def test_a_google_key_rotation_is_picked_up_without_a_restart(
    gh: Harness, fake_google: FakeGoogle
):
    assert (await _sign_in(gh)).status_code == 303
    assert fake_google.jwks_requests == 1
    gh.client.cookies.clear()
    fake_google.rotate()  # the next ID token carries a kid the cache has not seen
    assert (await _sign_in(gh)).status_code == 303
    # The unknown kid cost exactly one refetch of the JWKS.
    assert fake_google.jwks_requests == 2
    assert (await gh.client.get("/api/auth/me")).json()["email"] == "gina@example.com"


# -- a person's browser, not an API client --------------------------------------------------------

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


async def test_a_browser_with_a_forged_state_is_sent_to_the_sign_in_page_with_the_reason(
    gh: Harness,
):
    path, query = await _authorize(gh)
    params = {k: v[0] for k, v in query.items()}
    params["state"] = "attacker-state"
    r = await gh.client.get(path, params=params, headers=HTML)
    assert r.status_code == 303
    assert r.headers["location"].endswith("/signin?error=oauth_state_mismatch")
    assert "qr_access" not in r.cookies  # nobody was signed in
    page = await gh.client.get("/signin?error=oauth_state_mismatch")
    assert '<div class="alert" role="alert">The Google sign-in expired' in page.text


async def test_an_api_client_still_gets_the_json_error(gh: Harness):
    path, query = await _authorize(gh)
    params = {k: v[0] for k, v in query.items()}
    params["state"] = "attacker-state"
    r = await gh.client.get(path, params=params, headers={"Accept": "application/json"})
    assert r.status_code == 400
    assert r.json()["code"] == "oauth_state_mismatch"


async def test_the_sign_in_page_never_echoes_an_unknown_error_parameter(harness: Harness):
    page = await harness.client.get("/signin", params={"error": "<script>alert(1)</script>"})
    assert page.status_code == 200
    assert "<script>alert(1)" not in page.text
    assert 'class="alert" role="alert">' not in page.text
