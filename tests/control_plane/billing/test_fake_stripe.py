"""The fake Stripe API speaks Stripe's wire format, so tests elsewhere can trust it."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import stripe
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.stripe_api import (
    API_VERSION,
    DEFAULT_SECRET_KEY,
    DEFAULT_WEBHOOK_SECRET,
    FakeStripe,
    LoopbackServer,
    deliver,
    encode_event,
    parse_form,
    sign_webhook,
)

from .conftest import STARTER_PRICE

AUTH = {"Authorization": f"Bearer {DEFAULT_SECRET_KEY}"}


def post_session(fake: FakeStripe, form: dict[str, str], **headers: str) -> httpx.Response:
    return httpx.post(f"{fake.url}/v1/checkout/sessions", data=form, headers={**AUTH, **headers})


SESSION_FORM = {
    "mode": "subscription",
    "line_items[0][price]": STARTER_PRICE,
    "line_items[0][quantity]": "1",
    "success_url": "https://cloud.example/ok?session={CHECKOUT_SESSION_ID}",
    "metadata[instance_id]": "inst_01",
    "subscription_data[metadata][instance_id]": "inst_01",
    "customer_email": "owner@example.com",
}


def test_bracketed_form_keys_decode_into_nested_objects_and_lists() -> None:
    decoded = parse_form(
        [
            ("metadata[instance_id]", "i1"),
            ("line_items[0][price]", "p"),
            ("line_items[1][price]", "q"),
            ("expand[]", "subscription"),
            ("expand[]", "customer"),
        ]
    )

    assert decoded == {
        "metadata": {"instance_id": "i1"},
        "line_items": [{"price": "p"}, {"price": "q"}],
        "expand": ["subscription", "customer"],
    }


def test_a_request_without_a_key_gets_stripes_401_error_shape(fake_stripe: FakeStripe) -> None:
    response = httpx.get(f"{fake_stripe.url}/v1/customers/cus_1")

    assert response.status_code == 401
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.headers["request-id"].startswith("req_")


def test_a_wrong_key_is_refused_and_echoed_only_masked(fake_stripe: FakeStripe) -> None:
    wrong = "sk_test_abcdefghijklmnop1234"
    response = httpx.get(
        f"{fake_stripe.url}/v1/customers/cus_1", headers={"Authorization": f"Bearer {wrong}"}
    )

    assert response.status_code == 401
    message = response.json()["error"]["message"]
    assert wrong not in message
    assert message.endswith("1234")


def test_a_session_is_shaped_like_stripes(fake_stripe: FakeStripe) -> None:
    response = post_session(fake_stripe, SESSION_FORM)

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "checkout.session"
    assert body["id"].startswith("cs_test_")
    assert body["livemode"] is False
    assert (body["status"], body["payment_status"]) == ("open", "unpaid")
    assert body["url"] == f"{fake_stripe.url}/pay/{body['id']}"
    assert body["metadata"] == {"instance_id": "inst_01"}
    assert body["amount_total"] == 900
    assert isinstance(body["created"], int)


def test_the_same_idempotency_key_replays_the_first_answer(fake_stripe: FakeStripe) -> None:
    first = post_session(fake_stripe, SESSION_FORM, **{"Idempotency-Key": "k1"})
    second = post_session(fake_stripe, SESSION_FORM, **{"Idempotency-Key": "k1"})

    assert second.json() == first.json()
    assert second.headers["idempotent-replayed"] == "true"
    assert len(fake_stripe.sessions) == 1


def test_the_same_idempotency_key_with_other_parameters_is_an_idempotency_error(
    fake_stripe: FakeStripe,
) -> None:
    post_session(fake_stripe, SESSION_FORM, **{"Idempotency-Key": "k1"})
    changed = {**SESSION_FORM, "metadata[instance_id]": "inst_02"}

    response = post_session(fake_stripe, changed, **{"Idempotency-Key": "k1"})

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "idempotency_error"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"surprise": "1"}, "surprise"),
        ({"mode": None}, "mode"),
        ({"success_url": "not a url"}, "success_url"),
        ({"line_items[0][price]": "price_missing"}, "line_items[0][price]"),
        ({"customer": "cus_1", "customer_email": "a@b.c"}, "customer_email"),
        ({"subscription_data[trial_days]": "3"}, "subscription_data[trial_days]"),
    ],
)
def test_invalid_session_parameters_are_refused_naming_the_param(
    fake_stripe: FakeStripe, change: dict[str, Any], param: str
) -> None:
    form = {**SESSION_FORM, **change}
    form = {k: v for k, v in form.items() if v is not None}

    response = post_session(fake_stripe, form)

    assert response.status_code in {400, 404}
    assert response.json()["error"]["param"] == param


def test_a_version_other_than_the_pinned_one_is_refused(fake_stripe: FakeStripe) -> None:
    response = post_session(fake_stripe, SESSION_FORM, **{"Stripe-Version": "2024-06-20"})

    assert response.status_code == 400
    assert API_VERSION in response.json()["error"]["message"]


def test_retrieving_a_session_can_expand_its_subscription(fake_stripe: FakeStripe) -> None:
    session_id = post_session(fake_stripe, SESSION_FORM).json()["id"]
    fake_stripe.complete_checkout(session_id)

    response = httpx.get(
        f"{fake_stripe.url}/v1/checkout/sessions/{session_id}",
        params={"expand[0]": "subscription"},
        headers=AUTH,
    )

    subscription = response.json()["subscription"]
    assert subscription["object"] == "subscription"
    assert subscription["metadata"] == {"instance_id": "inst_01"}


def test_completing_a_checkout_creates_a_customer_subscription_and_paid_invoice(
    fake_stripe: FakeStripe,
) -> None:
    session_id = post_session(fake_stripe, SESSION_FORM).json()["id"]

    completed, paid = fake_stripe.complete_checkout(session_id)

    assert (completed["type"], paid["type"]) == ("checkout.session.completed", "invoice.paid")
    for event in (completed, paid):
        assert event["object"] == "event"
        assert event["id"].startswith("evt_")
        assert event["api_version"] == API_VERSION
    invoice = paid["data"]["object"]
    sub_id = completed["data"]["object"]["subscription"]
    assert invoice["status"] == "paid"
    assert invoice["parent"]["subscription_details"]["subscription"] == sub_id
    assert invoice["parent"]["subscription_details"]["metadata"] == {"instance_id": "inst_01"}
    assert fake_stripe.customer(invoice["customer"])["email"] == "owner@example.com"
    with pytest.raises(ValueError):
        fake_stripe.complete_checkout(session_id)


def test_a_signed_delivery_verifies_with_the_stripe_sdk() -> None:
    payload = b'{"id": "evt_1", "object": "event"}'
    header = sign_webhook(payload, DEFAULT_WEBHOOK_SECRET)

    assert stripe.WebhookSignature.verify_header(
        payload.decode(), header, DEFAULT_WEBHOOK_SECRET, 300
    )


class Receiver:
    """A webhook endpoint on loopback that records what it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, str | None]] = []

        async def hook(request: Request) -> Response:
            self.received.append((await request.body(), request.headers.get("stripe-signature")))
            return Response(status_code=200)

        self.server = LoopbackServer(Starlette(routes=[Route("/hook", hook, methods=["POST"])]))


def test_deliver_posts_the_exact_signed_bytes() -> None:
    receiver = Receiver()
    event = {"id": "evt_1", "object": "event", "type": "invoice.paid"}
    with receiver.server:
        response = deliver(event, f"{receiver.server.url}/hook", DEFAULT_WEBHOOK_SECRET)

    assert response.status_code == 200
    [(body, header)] = receiver.received
    assert body == encode_event(event)
    assert header is not None
    assert stripe.WebhookSignature.verify_header(body.decode(), header, DEFAULT_WEBHOOK_SECRET, 300)


def test_paying_on_the_hosted_page_redirects_to_success_and_delivers_the_events() -> None:
    receiver = Receiver()
    with receiver.server:
        with FakeStripe(webhook_url=f"{receiver.server.url}/hook") as fake:
            session_id = post_session(fake, SESSION_FORM).json()["id"]
            page = httpx.get(f"{fake.url}/pay/{session_id}")
            assert 'id="pay"' in page.text

            paid = httpx.post(f"{fake.url}/pay/{session_id}")

            assert paid.status_code == 303
            assert paid.headers["location"] == f"https://cloud.example/ok?session={session_id}"
            deadline = time.monotonic() + 5
            while len(fake.deliveries) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert [d.status for d in fake.deliveries] == [200, 200]

    bodies = [body for body, _ in receiver.received]
    assert b'"type": "checkout.session.completed"' in bodies[0]
    assert b'"type": "invoice.paid"' in bodies[1]


def test_an_injected_fault_answers_once_with_stripes_error_shape(fake_stripe: FakeStripe) -> None:
    fake_stripe.fail_next(503, method="GET")

    failed = httpx.get(f"{fake_stripe.url}/v1/prices/{STARTER_PRICE}", headers=AUTH)
    ok = httpx.get(f"{fake_stripe.url}/v1/prices/{STARTER_PRICE}", headers=AUTH)

    assert failed.status_code == 503
    assert failed.json()["error"]["type"] == "api_error"
    assert ok.status_code == 200
    assert ok.json()["unit_amount"] == 900
