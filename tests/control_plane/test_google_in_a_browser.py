"""A person whose Google sign-in fails lands on the sign-in page with the reason, not on JSON."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.control_plane.conftest import Harness
from tests.control_plane.test_google import _authorize
from tests.fakes.google_oidc import CLIENT_ID, CLIENT_SECRET, FakeGoogle

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


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
