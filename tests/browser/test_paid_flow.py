"""The paid path of the cloud flow, in Chromium: a signed-in person goes landing → Run in cloud →
plan, region and name → Continue to payment → Stripe Checkout (the loopback FakeStripe's hosted
page) → Pay → the control plane's success_url ``/cloud/new/provisioning?instance=…&session_id=…``
(the page calls ``checkout/confirm`` once) → live status → the Room on the runtime's origin,
showing the role ``owner``.

Two ways the payment reaches the control plane: FakeStripe delivers the signed webhooks itself
(after the redirect, as Stripe may), or no webhook arrives at all and only the success page's
``checkout/confirm`` fulfils it (the success page loading before ``checkout.session.completed``).
And the cancel path: back on ``/cloud/new?canceled=…`` with a message and the form ready to try
again, nothing provisioned. Each test runs its own control plane (Stripe keys set, so billing is
on); when it has shut down, no runtime process is left."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pydantic import SecretStr

from control_plane.devserver import DevServer, bind_socket
from control_plane.settings import Settings
from tests.browser.conftest import PASSWORD, ControlPlane
from tests.browser.test_cloud_flow import VIEWPORTS, _shot, _wait_for_room
from tests.control_plane.test_end_to_end import runtimes_under
from tests.fakes.stripe_api import DEFAULT_SECRET_KEY, DEFAULT_WEBHOOK_SECRET, FakeStripe

WEBHOOK_PATH = "/api/billing/stripe/webhook"
CONFIRM = re.compile(r"/api/cloud/instances/[^/]+/checkout/confirm$")


@dataclass
class PaidControlPlane(ControlPlane):
    stripe: FakeStripe

    @property
    def webhook_url(self) -> str:
        return f"{self.url}{WEBHOOK_PATH}"


@pytest.fixture
def paid_control_plane(tmp_path: Path) -> Iterator[PaidControlPlane]:
    """The browser tests' control plane (app + in-process worker + local provider under uvicorn
    on a free loopback port) with billing on: Stripe keys set and the API base pointed at a
    fresh FakeStripe. Webhook delivery is off until a test sets ``stripe.webhook_url``."""
    with FakeStripe() as stripe:
        sock = bind_socket("127.0.0.1", 0)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        var_dir = tmp_path / "var"
        var_dir.mkdir()
        settings = Settings(
            env="development",
            public_url=url,
            var_dir=var_dir,
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'cp.db'}",
            auto_migrate=True,
            mail_outbox=tmp_path / "outbox",
            secret_key=SecretStr("s" * 48),
            key_encryption_key=SecretStr(base64.urlsafe_b64encode(b"k" * 32).decode()),
            password_hash_memory_kib=1024,
            password_hash_time_cost=1,
            provider="local",
            run_worker=True,
            worker_poll_seconds=1.0,
            runtime_health_timeout_seconds=60,
            stripe_secret_key=SecretStr(DEFAULT_SECRET_KEY),
            stripe_webhook_secret=SecretStr(DEFAULT_WEBHOOK_SECRET),
            stripe_api_base=stripe.url,
        )
        dev = DevServer(settings, sock, out=io.StringIO())
        thread = threading.Thread(target=lambda: asyncio.run(dev.serve()), daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        try:
            while not dev.server.started:
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("the control plane did not start")
                time.sleep(0.02)
            yield PaidControlPlane(url, tmp_path / "outbox", var_dir, dev.server, stripe)
        finally:
            dev.server.should_exit = True
            thread.join(timeout=30)
            sock.close()
            assert not thread.is_alive(), "the control plane did not shut down"
            # Shutdown stops the runtimes the local provider started: none is left behind.
            leftover = runtimes_under(var_dir)
            assert leftover == [], f"runtime processes left after shutdown: {leftover}"


async def _verified_account(control_plane: ControlPlane, address: str) -> dict[str, str]:
    """Sign up and verify ``address``; the bearer headers of an API session of that person."""
    async with httpx.AsyncClient(base_url=control_plane.url, timeout=10) as http:
        r = await http.post("/api/auth/signup", json={"email": address, "password": PASSWORD})
        assert r.status_code == 202, r.text
        token = control_plane.wait_for_link(address, "verify-email").split("#token=", 1)[1]
        r = await http.post("/api/auth/verify-email", json={"token": token})
        assert r.status_code == 200, r.text
        r = await http.post(
            "/api/auth/login", json={"email": address, "password": PASSWORD, "transport": "body"}
        )
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['access_token']}"}


async def _signed_in_page(
    browser: Any, control_plane: ControlPlane, address: str
) -> tuple[Any, dict[str, str]]:
    """A desktop page whose person has a verified account and is signed in (cookies), and
    that person's bearer headers for the API."""
    bearer = await _verified_account(control_plane, address)
    context = await browser.new_context(viewport=VIEWPORTS["desktop"])
    page = await context.new_page()
    await page.goto(f"{control_plane.url}/signin")
    await page.get_by_label("Email").fill(address)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in", exact=True).click()
    await page.wait_for_url(f"{control_plane.url}/app")
    return page, bearer


def _watch(page: Any) -> tuple[list[str], list[str], list[str]]:
    """Page errors (and CSP reports), the ``checkout/confirm`` calls and the documents loaded."""
    errors: list[str] = []
    confirms: list[str] = []
    documents: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None,
    )

    def on_request(request: Any) -> None:
        if request.method == "POST" and CONFIRM.search(urlsplit(request.url).path):
            confirms.append(request.url)
        if request.resource_type == "document":
            documents.append(request.url)

    page.on("request", on_request)
    return errors, confirms, documents


async def _to_checkout(page: Any, control_plane: PaidControlPlane, name: str) -> str:
    """Landing → Run in cloud → plan, region, name → Continue to payment → the hosted
    Checkout page. Returns the Checkout Session's id."""
    await page.goto(f"{control_plane.url}/")
    await page.get_by_role("link", name="Run in cloud", exact=True).click()
    await page.wait_for_url(f"{control_plane.url}/cloud/new")
    await page.wait_for_selector("#new-room-form:not([hidden])")
    await page.get_by_text("You will pay on Stripe's secure checkout page").wait_for()
    await page.locator("label.choice-card:has(input[name=tier])").nth(1).click()
    assert await page.locator("input[name=tier]").nth(1).is_checked()
    await page.locator("input[name=region]").first.check()
    await page.get_by_label("Room name").fill(name)
    await page.get_by_label("Goal").fill("Find three grant programmes we qualify for")
    await page.get_by_role("button", name="Continue to payment").click()
    await page.wait_for_url(
        re.compile(re.escape(control_plane.stripe.url) + r"/pay/cs_test_\w+$"), timeout=15_000
    )
    await page.get_by_role("heading", name="Fake Stripe Checkout").wait_for()
    session_id: str = urlsplit(page.url).path.rsplit("/", 1)[1]
    return session_id


async def _instance(cp: ControlPlane, bearer: dict[str, str], instance_id: str) -> dict[str, Any]:
    """``GET /api/cloud/instances/{id}/status`` as the owner."""
    async with httpx.AsyncClient(base_url=cp.url, timeout=10) as http:
        r = await http.get(f"/api/cloud/instances/{instance_id}/status", headers=bearer)
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result


async def _eventually(probe: Any, *, within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not within {within:g}s (last: {last!r})")


@pytest.mark.parametrize("delivery", ["webhook", "confirm-only"])
async def test_a_signed_in_person_pays_on_stripe_and_lands_in_the_room(
    browser: Any, paid_control_plane: PaidControlPlane, artifacts: Path, delivery: str
):
    cp = paid_control_plane
    stripe = cp.stripe
    # "confirm-only": no webhook ever arrives; the success page's checkout/confirm alone must
    # fulfil the payment (the success page loads before checkout.session.completed).
    stripe.webhook_url = cp.webhook_url if delivery == "webhook" else None
    page, bearer = await _signed_in_page(browser, cp, f"payer.{delivery}@example.com")
    errors, confirms, documents = _watch(page)
    try:
        session_id = await _to_checkout(page, cp, f"Paid {delivery}")
        session = stripe.session(session_id)
        instance_id = session["metadata"]["instance_id"]
        assert session["status"] == "open" and session["payment_status"] == "unpaid"
        assert session["success_url"] == (
            f"{cp.url}/cloud/new/provisioning?instance={instance_id}"
            "&session_id={CHECKOUT_SESSION_ID}"
        )
        assert (await _instance(cp, bearer, instance_id))["status"] == "awaiting_payment"
        await _shot(page, artifacts, f"paid-{delivery}-1-stripe-checkout")

        await page.locator("#pay").click()
        await page.wait_for_url(re.compile(r"/cloud/new/provisioning\?instance="))
        # Stripe's redirect carried the session id; the page took it out of the address bar.
        success = [u for u in documents if "/cloud/new/provisioning?" in u]
        assert len(success) == 1, documents
        assert parse_qs(urlsplit(success[0]).query) == {
            "instance": [instance_id],
            "session_id": [session_id],
        }
        await page.locator("#prov-checklist li").first.wait_for()
        assert "session_id" not in page.url
        await _wait_for_room(page, cp)

        # The Room, on the runtime's origin, for its owner.
        assert not page.url.startswith(cp.url) and "#launch" not in page.url
        assert await page.title() == "Quoroom Room"
        assert await page.locator("#role").inner_text() == "owner"
        await page.get_by_text("Research lab").wait_for()
        await _shot(page, artifacts, f"paid-{delivery}-2-room")

        # The success page asked the control plane once.
        assert len(confirms) == 1, confirms
        assert stripe.session(session_id)["status"] == "complete"
        assert [s["status"] for s in stripe.subscriptions] == ["active"]
        if delivery == "webhook":
            statuses = await _eventually(
                lambda: (
                    [d.status for d in stripe.deliveries] if len(stripe.deliveries) >= 2 else None
                ),
                within=10,
                what="checkout.session.completed and invoice.paid delivered",
            )
            assert statuses == [200, 200], statuses
        else:
            assert stripe.deliveries == []

        state = await _instance(cp, bearer, instance_id)
        assert state["status"] == "running", state
        paid = [
            e["message"] for e in state["events"] if e["message"].startswith("payment received")
        ]
        assert len(paid) == 1, state["events"]  # fulfilled once, whichever came first
        if delivery == "confirm-only":
            assert paid == ["payment received (confirm)"], paid
        assert not errors, errors
    finally:
        await page.context.close()


async def test_canceling_on_stripe_returns_to_the_form_and_provisions_nothing(
    browser: Any, paid_control_plane: PaidControlPlane, artifacts: Path
):
    cp = paid_control_plane
    stripe = cp.stripe
    stripe.webhook_url = cp.webhook_url
    page, bearer = await _signed_in_page(browser, cp, "canceler@example.com")
    errors, confirms, _ = _watch(page)
    try:
        session_id = await _to_checkout(page, cp, "Changed my mind")
        session = stripe.session(session_id)
        instance_id = session["metadata"]["instance_id"]
        assert session["cancel_url"] == f"{cp.url}/cloud/new?canceled={instance_id}"
        # The fake's hosted page has no "back" link: go where Stripe's would, the cancel_url.
        cancel = page.get_by_role("link", name=re.compile("back|cancel", re.I))
        if await cancel.count():
            await cancel.first.click()
        else:
            await page.goto(session["cancel_url"])
        await page.wait_for_url(f"{cp.url}/cloud/new?canceled={instance_id}")

        notice = page.locator("#checkout-canceled")
        await notice.wait_for()
        assert "nothing was charged" in await notice.inner_text()
        # The form is back, ready for another try.
        await page.wait_for_selector("#new-room-form:not([hidden])")
        button = page.get_by_role("button", name="Continue to payment")
        assert await button.is_enabled()
        assert await page.locator("input[name=tier]:checked").count() == 1
        assert await page.locator("input[name=region]:checked").count() == 1
        await _shot(page, artifacts, "paid-cancel-1-back-on-the-form")

        # Nothing paid, nothing provisioned, no runtime started; the unpaid Room was removed, so
        # an abandoned checkout holds no quota slot.
        await asyncio.sleep(2)  # a few worker polls
        state = await _instance(cp, bearer, instance_id)
        assert state["status"] in ("canceled", "destroying", "destroyed"), state
        assert [e["to"] for e in state["events"] if e["to"]][:2] == [
            "awaiting_payment",
            "canceled",
        ], state
        # The abandoned Checkout Session is expired at Stripe (it can no longer be paid); its
        # checkout.session.expired event is the only one delivered.
        assert stripe.session(session_id)["status"] == "expired"
        assert stripe.subscriptions == []
        assert [e["type"] for e in stripe.events] == ["checkout.session.expired"]
        assert all(d.status == 200 for d in stripe.deliveries)
        assert confirms == []
        assert runtimes_under(cp.var_dir) == []

        # Trying again opens a new Checkout.
        await page.get_by_label("Room name").fill("Changed my mind")
        await button.click()
        await page.wait_for_url(re.compile(re.escape(stripe.url) + r"/pay/cs_test_\w+$"))
        assert urlsplit(page.url).path.rsplit("/", 1)[1] != session_id
        assert not errors, errors
    finally:
        await page.context.close()
