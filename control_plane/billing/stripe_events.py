"""Stripe's webhook events, translated: a verified delivery becomes one typed ``BillingEvent``.

The gateway verifies the signature (``StripeGateway.parse_webhook``) and hands the body here.
Only the event types we act on are translated; any other authentic event is ``Ignored`` (still
acknowledged, so Stripe stops redelivering it). A payload missing what we need raises
``WebhookPayloadError``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import ValidationError

from control_plane.billing.stripe_errors import WebhookPayloadError
from control_plane.billing.stripe_shapes import (
    PAID_STATUSES,
    STRIPE_API_VERSION,
    EventShape,
    InvoiceShape,
    SessionShape,
    ShapeT,
    SubscriptionShape,
    describe,
    ref_id,
    timestamp,
)

__all__ = [
    "BillingEvent",
    "CheckoutCompleted",
    "Ignored",
    "InvoicePaid",
    "InvoicePaymentFailed",
    "SubscriptionDeleted",
    "SubscriptionUpdated",
    "parse_event",
    "translate_event",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckoutCompleted:
    """``checkout.session.completed`` (or ``checkout.session.async_payment_succeeded``) for one
    of our subscription checkouts. Fulfil only when ``paid``."""

    event_id: str
    created: datetime
    session_id: str
    instance_id: str
    user_id: str | None
    subscription_id: str | None
    customer_id: str | None
    paid: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class InvoicePaid:
    """``invoice.paid`` for a subscription invoice: the subscription is (again) in good standing."""

    event_id: str
    created: datetime
    invoice_id: str
    subscription_id: str
    customer_id: str | None
    instance_id: str | None
    billing_reason: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class InvoicePaymentFailed:
    """``invoice.payment_failed`` for a subscription invoice: start or extend the grace period."""

    event_id: str
    created: datetime
    invoice_id: str
    subscription_id: str
    customer_id: str | None
    instance_id: str | None
    attempt_count: int
    next_payment_attempt: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriptionDeleted:
    """``customer.subscription.deleted``: the subscription has ended; wind the instance down."""

    event_id: str
    created: datetime
    subscription_id: str
    customer_id: str | None
    instance_id: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriptionUpdated:
    """``customer.subscription.updated``: we keep its cancel-at-period-end flag and period end
    (the dashboard, the customer portal or our own API changed them)."""

    event_id: str
    created: datetime
    subscription_id: str
    customer_id: str | None
    instance_id: str | None
    status: str
    cancel_at_period_end: bool
    current_period_end: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Ignored:
    """An authentic event we take no action on (another type, or not one of our objects).
    Acknowledge it with 2xx so Stripe stops redelivering it."""

    event_id: str
    created: datetime
    type: str
    reason: str


BillingEvent = (
    CheckoutCompleted
    | InvoicePaid
    | InvoicePaymentFailed
    | SubscriptionDeleted
    | SubscriptionUpdated
    | Ignored
)


# --------------------------------------------------------------------------------------------
# Translation
# --------------------------------------------------------------------------------------------


def parse_event(text: str) -> EventShape:
    """A verified delivery's body as a Stripe event (``WebhookPayloadError`` if it is not one)."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise WebhookPayloadError(f"webhook body is not JSON: {exc}") from exc
    try:
        return EventShape.model_validate(document)
    except ValidationError as exc:
        raise WebhookPayloadError(f"not a Stripe event: {describe(exc)}") from exc


def translate_event(event: EventShape) -> BillingEvent:
    """The typed event of a parsed delivery (``Ignored`` for a type we take no action on)."""
    created = datetime.fromtimestamp(event.created, tz=UTC)
    handler = _HANDLERS.get(event.type)
    if handler is None:
        return Ignored(event_id=event.id, created=created, type=event.type, reason="unhandled type")
    return handler(event, created)


def _payload(event: EventShape, shape: type[ShapeT]) -> ShapeT:
    try:
        return shape.model_validate(event.data.object)
    except ValidationError as exc:
        raise WebhookPayloadError(
            f"event {event.id} ({event.type}): data.object: {describe(exc)}"
        ) from exc


def _checkout_completed(event: EventShape, created: datetime) -> BillingEvent:
    session = _payload(event, SessionShape)
    if session.mode != "subscription":
        return Ignored(
            event_id=event.id, created=created, type=event.type, reason="not a subscription"
        )
    metadata = session.metadata or {}
    from_metadata = metadata.get("instance_id")
    reference = session.client_reference_id
    if from_metadata and reference and from_metadata != reference:
        raise WebhookPayloadError(
            f"event {event.id} ({event.type}): metadata.instance_id and client_reference_id "
            "disagree"
        )
    instance_id = from_metadata or reference
    if not instance_id:
        # Another integration's checkout on the same account: not ours to fulfil.
        return Ignored(event_id=event.id, created=created, type=event.type, reason="no instance_id")
    paid = session.status == "complete" and session.payment_status in PAID_STATUSES
    subscription_id = ref_id(session.subscription)
    if paid and not subscription_id:
        raise WebhookPayloadError(
            f"event {event.id} ({event.type}): a paid subscription checkout has no subscription"
        )
    return CheckoutCompleted(
        event_id=event.id,
        created=created,
        session_id=session.id,
        instance_id=instance_id,
        user_id=metadata.get("user_id"),
        subscription_id=subscription_id,
        customer_id=ref_id(session.customer),
        paid=paid,
    )


def _invoice_subscription(
    event: EventShape, invoice: InvoiceShape
) -> tuple[str, dict[str, str]] | None:
    """(subscription id, subscription metadata) of an invoice, or None for a standalone one.

    API 2026-10-28 puts them at ``invoice.parent.subscription_details``; webhook payloads follow
    the endpoint's API version rather than the SDK's, so an endpoint still on a version before
    2025-03-31 sends the old top-level ``invoice.subscription`` (PITFALLS.md, "Stripe")."""
    where = f"event {event.id} ({event.type})"
    if invoice.parent is not None:
        if invoice.parent.type != "subscription_details":
            return None
        details = invoice.parent.subscription_details
        if details is None:
            raise WebhookPayloadError(
                f"{where}: invoice.parent.type is subscription_details but "
                "parent.subscription_details is missing"
            )
        sub_id = ref_id(details.subscription)
        assert sub_id is not None  # a str | Ref field
        return sub_id, dict(details.metadata or {})
    fields = invoice.model_fields_set
    if "parent" in fields:
        return None  # parent: null — an invoice not created by a subscription
    if "subscription" in fields:
        legacy = ref_id(invoice.subscription)
        if legacy is None:
            return None
        legacy_meta = invoice.subscription_details.metadata if invoice.subscription_details else {}
        return legacy, dict(legacy_meta or {})
    raise WebhookPayloadError(
        f"{where}: invoice has neither parent.subscription_details.subscription (API "
        f"{STRIPE_API_VERSION}) nor subscription (API versions before 2025-03-31)"
    )


def _invoice_event(event: EventShape, created: datetime) -> BillingEvent:
    invoice = _payload(event, InvoiceShape)
    found = _invoice_subscription(event, invoice)
    if found is None:
        return Ignored(
            event_id=event.id, created=created, type=event.type, reason="not a subscription invoice"
        )
    subscription_id, metadata = found
    if event.type == "invoice.paid":
        return InvoicePaid(
            event_id=event.id,
            created=created,
            invoice_id=invoice.id,
            subscription_id=subscription_id,
            customer_id=ref_id(invoice.customer),
            instance_id=metadata.get("instance_id"),
            billing_reason=invoice.billing_reason,
        )
    return InvoicePaymentFailed(
        event_id=event.id,
        created=created,
        invoice_id=invoice.id,
        subscription_id=subscription_id,
        customer_id=ref_id(invoice.customer),
        instance_id=metadata.get("instance_id"),
        attempt_count=invoice.attempt_count,
        next_payment_attempt=timestamp(invoice.next_payment_attempt),
    )


def _subscription_deleted(event: EventShape, created: datetime) -> BillingEvent:
    sub = _payload(event, SubscriptionShape)
    return SubscriptionDeleted(
        event_id=event.id,
        created=created,
        subscription_id=sub.id,
        customer_id=ref_id(sub.customer),
        instance_id=(sub.metadata or {}).get("instance_id"),
    )


def _subscription_updated(event: EventShape, created: datetime) -> BillingEvent:
    sub = _payload(event, SubscriptionShape)
    ends = [i.current_period_end for i in (sub.items.data if sub.items else [])]
    known = [end for end in ends if end is not None]
    return SubscriptionUpdated(
        event_id=event.id,
        created=created,
        subscription_id=sub.id,
        customer_id=ref_id(sub.customer),
        instance_id=(sub.metadata or {}).get("instance_id"),
        status=sub.status,
        cancel_at_period_end=sub.cancel_at_period_end,
        current_period_end=timestamp(max(known)) if known else None,
    )


_HANDLERS: Mapping[str, Callable[[EventShape, datetime], BillingEvent]] = {
    "checkout.session.completed": _checkout_completed,
    # Delayed payment methods complete the session unpaid and confirm payment later.
    "checkout.session.async_payment_succeeded": _checkout_completed,
    "invoice.paid": _invoice_event,
    "invoice.payment_failed": _invoice_event,
    "customer.subscription.deleted": _subscription_deleted,
    "customer.subscription.updated": _subscription_updated,
}
