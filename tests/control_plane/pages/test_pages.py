"""The pages without a browser: each renders with the right headers, private pages send a
signed-out visitor to sign-in, and ``next`` never leads off the site."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from control_plane.pages import PAGE_CSP, safe_next
from control_plane.pages.routes import STATIC_DIR, TEMPLATES_DIR
from tests.control_plane.conftest import Harness, login_cookie, signup_and_verify

PUBLIC_PAGES = [
    "/",
    "/signin",
    "/signup",
    "/verify-email",
    "/forgot-password",
    "/reset-password",
    "/accept-invite",
]
PRIVATE_PAGES = [
    "/app",
    "/cloud/new/provisioning?instance=abc123",
    "/app/instances/abc123/members",
    "/app/instances/abc123/open",
]


def _assert_page_headers(response, *, private: bool) -> None:
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"] == PAGE_CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    cache = response.headers["cache-control"]
    if private:
        assert cache == "no-store"
    else:
        assert "no-store" not in cache and "private" in cache


@pytest.mark.parametrize("path", [*PUBLIC_PAGES, "/cloud/new"])
async def test_every_public_page_renders_with_a_strict_policy(harness: Harness, path: str):
    r = await harness.client.get(path)
    assert r.status_code == 200, r.text
    _assert_page_headers(r, private=False)
    assert "<script>" not in r.text  # no inline script: the CSP forbids it
    assert not re.search(r"\son[a-z]+=", r.text)  # nor inline handlers
    assert 'role="alert"' in r.text


def test_the_policy_forbids_inline_scripts_and_framing():
    directives = dict(d.strip().split(" ", 1) for d in PAGE_CSP.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'"
    assert "unsafe-inline" not in PAGE_CSP and "unsafe-eval" not in PAGE_CSP
    assert directives["frame-ancestors"] == "'none'"


@pytest.mark.parametrize("path", PRIVATE_PAGES)
async def test_a_signed_out_visit_to_a_private_page_goes_to_sign_in(harness: Harness, path: str):
    r = await harness.client.get(path)
    assert r.status_code == 303
    location = r.headers["location"]
    assert location.startswith("/signin?next=")
    assert r.headers["cache-control"] == "no-store"
    follow = await harness.client.get(location)
    assert follow.status_code == 200
    # The page keeps where to go back to.
    from urllib.parse import unquote

    assert f'data-next="{unquote(location.split("=", 1)[1])}"'.replace("&", "&amp;") in follow.text


async def test_cloud_new_shows_the_account_step_when_signed_out(harness: Harness):
    r = await harness.client.get("/cloud/new")
    assert r.status_code == 200
    assert 'id="account-signup"' in r.text and "/signup?next=/cloud/new" in r.text
    assert 'id="new-room-form"' not in r.text


async def test_signed_in_pages_render_private_and_show_the_account(harness: Harness):
    await signup_and_verify(harness, "pages@example.com")
    await login_cookie(harness, "pages@example.com")
    for path in ["/cloud/new", *PRIVATE_PAGES]:
        r = await harness.client.get(path)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
        _assert_page_headers(r, private=True)
        assert "pages@example.com" in r.text
    r = await harness.client.get("/")
    assert 'data-action="signout"' in r.text


async def test_cloud_new_keeps_a_canceled_checkout_in_view(harness: Harness):
    await signup_and_verify(harness, "cancel@example.com")
    await login_cookie(harness, "cancel@example.com")
    r = await harness.client.get("/cloud/new?canceled=inst_1")
    assert 'id="checkout-canceled"' in r.text
    r = await harness.client.get("/cloud/new?canceled=%3Cscript%3E")
    assert 'id="checkout-canceled"' not in r.text


async def test_provisioning_without_an_instance_goes_to_the_dashboard(harness: Harness):
    await signup_and_verify(harness, "prov@example.com")
    await login_cookie(harness, "prov@example.com")
    for query in ["", "?instance=", "?instance=../x", "?instance=%22%3E"]:
        r = await harness.client.get(f"/cloud/new/provisioning{query}")
        assert r.status_code == 303 and r.headers["location"] == "/app"


async def test_a_stale_access_cookie_counts_as_signed_out(harness: Harness):
    harness.client.cookies.set("qr_access", "not-a-jwt", domain="cp.test")
    r = await harness.client.get("/app")
    assert r.status_code == 303
    r = await harness.client.get("/")
    assert r.status_code == 200 and 'data-action="signout"' not in r.text


@pytest.mark.parametrize(
    "value",
    [
        "https://evil.example/",
        "//evil.example/x",
        "/\\evil.example",
        "\\\\evil.example",
        "/\t/evil.example",
        "javascript:alert(1)",
        "evil.example",
        "",
        "/" + "a" * 600,
    ],
)
async def test_next_never_leads_off_the_site(harness: Harness, value: str):
    assert safe_next(value) == "/app"
    from urllib.parse import quote

    r = await harness.client.get(f"/signin?next={quote(value)}")
    assert r.status_code in (200, 422)
    if r.status_code == 200:
        assert 'data-next="/app"' in r.text


@pytest.mark.parametrize("value", ["/cloud/new", "/app/instances/x/members?tab=1", "/"])
def test_local_paths_are_kept_as_next(value: str):
    assert safe_next(value) == value


async def test_static_files_are_served_with_the_security_headers(harness: Harness):
    r = await harness.client.get("/static/js/common.js")
    assert r.status_code == 200
    assert "javascript" in r.headers["content-type"]
    assert r.headers["x-content-type-options"] == "nosniff"
    r = await harness.client.get("/static/../routes.py")
    assert r.status_code == 404


async def test_pages_link_versioned_assets_that_exist(harness: Harness):
    r = await harness.client.get("/signin")
    for src in re.findall(r'(?:src|href)="(/static/[^"?]+)\?v=[0-9a-f]{12}"', r.text):
        assert (await harness.client.get(src)).status_code == 200, src
    assert "/static/js/common.js?v=" in r.text


def test_templates_and_scripts_ship_without_inline_code():
    for template in TEMPLATES_DIR.glob("*.html"):
        text = template.read_text()
        assert not re.search(r"<script(?![^>]*\ssrc=)", text), template.name
        assert "style=" not in text, template.name
    scripts = list(Path(STATIC_DIR, "js").glob("*.js"))
    assert scripts
    for script in scripts:
        assert "eval(" not in script.read_text() and "innerHTML" not in script.read_text()


async def test_api_answers_get_no_store_and_the_security_headers(harness: Harness):
    r = await harness.client.get("/api/auth/me")
    assert r.status_code == 401
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    r = await harness.client.get("/.well-known/jwks.json")
    assert r.headers["cache-control"].startswith("public, max-age=")


async def test_the_google_button_appears_only_when_google_is_configured(
    make_harness, make_settings, harness: Harness
):
    r = await harness.client.get("/signin?next=/cloud/new")
    assert "Continue with Google" not in r.text
    settings = make_settings(google_client_id="client-id", google_client_secret="g" * 24)
    async with make_harness(settings) as h:
        for path in ("/signin?next=/cloud/new", "/signup?next=/cloud/new", "/cloud/new"):
            r = await h.client.get(path)
            assert 'href="/api/auth/google?next=/cloud/new"' in r.text, path


async def test_the_invitation_page_asks_before_accepting_and_the_dashboard_lists_invitations(
    harness: Harness,
):
    """Issue 12: an invitation is accepted by a click of its invitee (the link's page, or /app)."""
    signed_out = await harness.client.get("/accept-invite")
    assert 'id="invite-signin"' in signed_out.text and 'data-signed-in=""' in signed_out.text
    await signup_and_verify(harness, "invitee@example.com")
    await login_cookie(harness, "invitee@example.com")
    page = await harness.client.get("/accept-invite")
    assert 'data-signed-in="yes"' in page.text and 'id="invite-accept"' in page.text
    assert "invitee@example.com" in page.text
    script = (STATIC_DIR / "js" / "invite.js").read_text()
    assert "/api/cloud/invitations/accept" in script and 'addEventListener("click"' in script
    dashboard = await harness.client.get("/app")
    assert 'id="invitations"' in dashboard.text
    assert "/api/cloud/invitations" in (STATIC_DIR / "js" / "dashboard.js").read_text()
