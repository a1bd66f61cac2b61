"""Webhook verification on the raw body and translation of Stripe events into BillingEvents."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from control_plane.billing.stripe_errors import WebhookPayloadError, WebhookSignatureError
from control_plane.billing.stripe_events import (
    CheckoutCompleted,
    Ignored,
    InvoicePaid,
    InvoicePaymentFailed,
    SubscriptionDeleted,
)
from control_plane.billing.stripe_gateway import StripeGateway
from tests.fakes.stripe_api import DEFAULT_WEBHOOK_SECRET, FakeStripe, encode_event, sign_webhook

from .conftest import STARTER_PRICE


def signed(event: dict[str, Any], *, secret: str = DEFAULT_WEBHOOK_SECRET, **kw: Any):
    body = encode_event(event)
    return body, sign_webhook(body, secret, **kw)


async def checkout(gateway: StripeGateway, instance_id: str = "inst_01") -> str:
    session = await gateway.create_checkout_session(
        instance_id=instance_id,
        user_id="usr_01",
        email="owner@example.com",
        customer_id=None,
        price_id=STARTER_PRICE,
        success_url="https://cloud.example/ok",
        cancel_url="https://cloud.example/no",
        idempotency_key=f"checkout:{instance_id}",
    )
    return session.id


@pytest.fixture
async def paid(gateway: StripeGateway, fake_stripe: FakeStripe) -> dict[str, Any]:
    """A completed checkout: its session id, subscription id and the two events it sent."""
    session_id = await checkout(gateway)
    completed, invoice_paid = fake_stripe.complete_checkout(session_id)
    return {
        "session_id": session_id,
        "subscription_id": fake_stripe.session(session_id)["subscription"],
        "completed": completed,
        "invoice_paid": invoice_paid,
    }


# ---- signature verification ----------------------------------------------------------------


def test_a_correctly_signed_event_is_accepted(gateway: StripeGateway, paid: dict[str, Any]) -> None:
    body, header = signed(paid["completed"])

    event = gateway.parse_webhook(body, header)

    assert event.event_id == paid["completed"]["id"]


def test_a_tampered_body_is_refused(gateway: StripeGateway, paid: dict[str, Any]) -> None:
    body, header = signed(paid["completed"])
    tampered = body.replace(b'"inst_01"', b'"inst_99"')
    assert tampered != body

    with pytest.raises(WebhookSignatureError):
        gateway.parse_webhook(tampered, header)


def test_an_event_signed_with_another_secret_is_refused(
    gateway: StripeGateway, paid: dict[str, Any]
) -> None:
    body, header = signed(paid["completed"], secret="whsec_someone_else")

    with pytest.raises(WebhookSignatureError):
        gateway.parse_webhook(body, header)


def test_an_event_signed_longer_ago_than_the_tolerance_is_refused_as_a_replay(
    gateway: StripeGateway, paid: dict[str, Any]
) -> None:
    body, header = signed(paid["completed"], timestamp=int(time.time()) - 301)

    with pytest.raises(WebhookSignatureError, match="tolerance"):
        gateway.parse_webhook(body, header)


def test_an_event_signed_just_inside_the_tolerance_is_accepted(
    gateway: StripeGateway, paid: dict[str, Any]
) -> None:
    body, header = signed(paid["completed"], timestamp=int(time.time()) - 290)

    assert isinstance(gateway.parse_webhook(body, header), CheckoutCompleted)


@pytest.mark.parametrize("header", [None, "", "garbage", "t=notanumber,v1=abc", "t=123"])
def test_a_missing_or_malformed_signature_header_is_refused(
    gateway: StripeGateway, paid: dict[str, Any], header: str | None
) -> None:
    body = encode_event(paid["completed"])

    with pytest.raises(WebhookSignatureError):
        gateway.parse_webhook(body, header)


def test_a_parsed_and_reserialised_body_fails_verification(
    gateway: StripeGateway, paid: dict[str, Any]
) -> None:
    # stripe/stripe-node#341: the signature covers the exact bytes Stripe sent.
    body, header = signed(paid["completed"])
    reserialised = json.dumps(json.loads(body)).encode()

    with pytest.raises(WebhookSignatureError):
        gateway.parse_webhook(reserialised, header)


def test_a_parsed_body_instead_of_raw_bytes_is_a_programming_error(
    gateway: StripeGateway, paid: dict[str, Any]
) -> None:
    body, header = signed(paid["completed"])

    with pytest.raises(TypeError):
        gateway.parse_webhook(json.loads(body), header)


def test_a_body_that_is_not_utf8_is_refused_before_parsing(gateway: StripeGateway) -> None:
    body = b"\xff\xfe{}"

    with pytest.raises(WebhookSignatureError):
        gateway.parse_webhook(body, sign_webhook(body, DEFAULT_WEBHOOK_SECRET))


def test_a_header_with_a_rolled_secret_signature_among_others_is_accepted(
    gateway: StripeGateway, paid: dict[str, Any]
) -> None:
    # While an endpoint secret is rolled, Stripe signs with both secrets (two v1 entries).
    body = encode_event(paid["completed"])
    ts = int(time.time())
    old = sign_webhook(body, "whsec_old_secret", ts).split(",")[1]
    header = f"{sign_webhook(body, DEFAULT_WEBHOOK_SECRET, ts)},{old}"

    assert isinstance(gateway.parse_webhook(body, header), CheckoutCompleted)


# ---- payload validation --------------------------------------------------------------------


def test_an_authentic_body_that_is_not_json_is_a_payload_error(gateway: StripeGateway) -> None:
    body = b"not json"

    with pytest.raises(WebhookPayloadError):
        gateway.parse_webhook(body, sign_webhook(body, DEFAULT_WEBHOOK_SECRET))


def test_an_authentic_body_that_is_not_an_event_is_a_payload_error(
    gateway: StripeGateway,
) -> None:
    body = json.dumps({"id": "evt_1", "object": "event", "type": "invoice.paid"}).encode()

    with pytest.raises(WebhookPayloadError, match="data"):
        gateway.parse_webhook(body, sign_webhook(body, DEFAULT_WEBHOOK_SECRET))


def test_a_checkout_event_without_a_session_id_names_the_missing_field(
    gateway: StripeGateway, paid: dict[str, Any]
) -> None:
    event = paid["completed"]
    del event["data"]["object"]["id"]

    with pytest.raises(WebhookPayloadError, match=r"data\.object: id"):
        gateway.parse_webhook(*signed(event))


def test_a_paid_checkout_without_a_subscription_is_a_payload_error(
    gateway: StripeGateway, paid: dict[str, Any]
) -> None:
    event = paid["completed"]
    event["data"]["object"]["subscription"] = None

    with pytest.raises(WebhookPayloadError, match="no subscription"):
        gateway.parse_webhook(*signed(event))


def test_a_checkout_whose_metadata_and_reference_disagree_is_a_payload_error(
    gateway: StripeGateway, paid: dict[str, Any]
) -> None:
    event = paid["completed"]
    event["data"]["object"]["client_reference_id"] = "inst_other"

    with pytest.raises(WebhookPayloadError, match="disagree"):
        gateway.parse_webhook(*signed(event))


def test_an_invoice_claiming_a_subscription_parent_without_details_is_a_payload_error(
    gateway: StripeGateway, paid: dict[str, Any]
) -> None:
    event = paid["invoice_paid"]
    event["data"]["object"]["parent"]["subscription_details"] = None

    with pytest.raises(WebhookPayloadError, match="subscription_details"):
        gateway.parse_webhook(*signed(event))


def test_an_invoice_with_neither_the_new_nor_the_old_subscription_field_is_a_payload_error(
    gateway: StripeGateway, paid: dict[str, Any]
) -> None:
    event = paid["invoice_paid"]
    del event["data"]["object"]["parent"]

    with pytest.raises(WebhookPayloadError, match=r"parent\.subscription_details\.subscription"):
        gateway.parse_webhook(*signed(event))


# ---- translation ---------------------------------------------------------------------------


def test_checkout_completed_becomes_a_paid_checkout_for_the_instance(
    gateway: StripeGateway, paid: dict[str, Any]
) -> None:
    event = gateway.parse_webhook(*signed(paid["completed"]))

    assert event == CheckoutCompleted(
        event_id=paid["completed"]["id"],
        created=datetime.fromtimestamp(paid["completed"]["created"], tz=UTC),
        session_id=paid["session_id"],
        instance_id="inst_01",
        user_id="usr_01",
        subscription_id=paid["subscription_id"],
        customer_id=paid["completed"]["data"]["object"]["customer"],
        paid=True,
    )


def test_a_completed_but_unpaid_checkout_is_reported_unpaid(
    gateway: StripeGateway, paid: dict[str, Any]
) -> None:
    # Delayed payment methods complete the session first; payment follows later.
    event = paid["completed"]
    event["data"]["object"]["payment_status"] = "unpaid"

    translated = gateway.parse_webhook(*signed(event))

    assert isinstance(translated, CheckoutCompleted)
    assert translated.paid is False


def test_async_payment_succeeded_is_a_paid_checkout(
    gateway: StripeGateway, paid: dict[str, Any], fake_stripe: FakeStripe
) -> None:
    session = fake_stripe.session(paid["session_id"])
    event = fake_stripe.make_event("checkout.session.async_payment_succeeded", session)

    translated = gateway.parse_webhook(*signed(event))

    assert isinstance(translated, CheckoutCompleted)
    assert translated.paid is True


def test_a_checkout_that_is_not_ours_is_ignored(
    gateway: StripeGateway, paid: dict[str, Any]
) -> None:
    event = paid["completed"]
    event["data"]["object"]["metadata"] = {}
    event["data"]["object"]["client_reference_id"] = None

    translated = gateway.parse_webhook(*signed(event))

    assert isinstance(translated, Ignored)
    assert translated.reason == "no instance_id"


def test_invoice_paid_reads_the_subscription_from_the_2026_10_28_parent_field(
    gateway: StripeGateway, paid: dict[str, Any]
) -> None:
    invoice = paid["invoice_paid"]["data"]["object"]
    assert "subscription" not in invoice  # the pre-2025-03-31 field is gone
    assert invoice["parent"]["type"] == "subscription_details"

    event = gateway.parse_webhook(*signed(paid["invoice_paid"]))

    assert event == InvoicePaid(
        event_id=paid["invoice_paid"]["id"],
        created=datetime.fromtimestamp(paid["invoice_paid"]["created"], tz=UTC),
        invoice_id=invoice["id"],
        subscription_id=paid["subscription_id"],
        customer_id=invoice["customer"],
        instance_id="inst_01",
        billing_reason="subscription_create",
    )


def test_invoice_paid_from_an_endpoint_on_an_older_api_version_still_finds_the_subscription(
    gateway: StripeGateway, paid: dict[str, Any]
) -> None:
    # Webhook payloads follow the endpoint's API version, not the SDK's (PITFALLS.md, Stripe).
    event = paid["invoice_paid"]
    invoice = event["data"]["object"]
    details = invoice.pop("parent")["subscription_details"]
    invoice["subscription"] = details["subscription"]
    invoice["subscription_details"] = {"metadata": details["metadata"]}
    event["api_version"] = "2024-06-20"

    translated = gateway.parse_webhook(*signed(event))

    assert isinstance(translated, InvoicePaid)
    assert translated.subscription_id == paid["subscription_id"]
    assert translated.instance_id == "inst_01"


def test_an_invoice_not_created_by_a_subscription_is_ignored(
    gateway: StripeGateway, paid: dict[str, Any]
) -> None:
    event = paid["invoice_paid"]
    event["data"]["object"]["parent"] = None

    translated = gateway.parse_webhook(*signed(event))

    assert isinstance(translated, Ignored)


def test_a_failed_renewal_carries_the_attempt_count_and_next_attempt(
    gateway: StripeGateway, paid: dict[str, Any], fake_stripe: FakeStripe
) -> None:
    [failed] = fake_stripe.fail_invoice(paid["subscription_id"])

    event = gateway.parse_webhook(*signed(failed))

    assert isinstance(event, InvoicePaymentFailed)
    assert event.subscription_id == paid["subscription_id"]
    assert event.instance_id == "inst_01"
    assert event.attempt_count == 1
    invoice = failed["data"]["object"]
    assert event.next_payment_attempt == datetime.fromtimestamp(
        invoice["next_payment_attempt"], tz=UTC
    )
    assert fake_stripe.subscription(paid["subscription_id"])["status"] == "past_due"


def test_paying_after_a_failure_pays_the_same_invoice(
    gateway: StripeGateway, paid: dict[str, Any], fake_stripe: FakeStripe
) -> None:
    [failed] = fake_stripe.fail_invoice(paid["subscription_id"])
    [recovered] = fake_stripe.pay_invoice(paid["subscription_id"])

    event = gateway.parse_webhook(*signed(recovered))

    assert isinstance(event, InvoicePaid)
    assert event.invoice_id == failed["data"]["object"]["id"]
    assert event.billing_reason == "subscription_cycle"
    assert fake_stripe.subscription(paid["subscription_id"])["status"] == "active"


def test_subscription_deleted_names_the_subscription_and_instance(
    gateway: StripeGateway, paid: dict[str, Any], fake_stripe: FakeStripe
) -> None:
    [deleted] = fake_stripe.delete_subscription(paid["subscription_id"])

    event = gateway.parse_webhook(*signed(deleted))

    assert isinstance(event, SubscriptionDeleted)
    assert event.subscription_id == paid["subscription_id"]
    assert event.instance_id == "inst_01"
    assert event.customer_id == deleted["data"]["object"]["customer"]


def test_other_event_types_are_ignored_with_their_type(
    gateway: StripeGateway, fake_stripe: FakeStripe
) -> None:
    event = fake_stripe.make_event("customer.created", {"id": "cus_1", "object": "customer"})

    translated = gateway.parse_webhook(*signed(event))

    assert translated == Ignored(
        event_id=event["id"],
        created=datetime.fromtimestamp(event["created"], tz=UTC),
        type="customer.created",
        reason="unhandled type",
    )


def test_the_same_delivery_twice_translates_to_the_same_event_id(
    gateway: StripeGateway, paid: dict[str, Any]
) -> None:
    # Stripe redelivers (stripe/stripe-cli#418); the caller deduplicates on event_id.
    first = gateway.parse_webhook(*signed(paid["completed"]))
    again = gateway.parse_webhook(*signed(paid["completed"], timestamp=int(time.time()) + 1))

    assert first == again
