"""What we accept from Stripe: the pinned API version and the shapes of replies and event
payloads, validated before anything trusts them. Unknown fields are ignored: Stripe adds fields
without a version change. Shared by the gateway (replies) and the webhook translation (events)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# The API version this parsing was written against. Requests pin it explicitly, so an SDK upgrade
# cannot silently move the shapes under us (API 2026-10-28 moved an invoice's subscription to
# ``invoice.parent.subscription_details``; see PITFALLS.md, "Stripe").
STRIPE_API_VERSION = "2026-10-28.endive"

PAID_STATUSES = frozenset({"paid", "no_payment_required"})


class Shape(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Ref(Shape):
    """An expanded object in an expandable field: only its id matters to us."""

    id: str


Expandable = str | Ref | None


def ref_id(value: Expandable) -> str | None:
    return value.id if isinstance(value, Ref) else value


class SessionShape(Shape):
    id: str = Field(pattern=r"^cs_")
    object: Literal["checkout.session"]
    mode: str
    status: str | None = None
    payment_status: str
    url: str | None = None
    subscription: Expandable = None
    customer: Expandable = None
    client_reference_id: str | None = None
    metadata: dict[str, str] | None = None


class CustomerShape(Shape):
    id: str = Field(pattern=r"^cus_")
    object: Literal["customer"]


class SubscriptionItemShape(Shape):
    current_period_end: int | None = None


class SubscriptionItems(Shape):
    data: list[SubscriptionItemShape] = Field(default_factory=list)


class SubscriptionShape(Shape):
    id: str = Field(pattern=r"^sub_")
    object: Literal["subscription"]
    status: str
    customer: Expandable = None
    cancel_at_period_end: bool = False
    canceled_at: int | None = None
    metadata: dict[str, str] | None = None
    # Since API 2025-03-31 the billing period lives on the subscription items.
    items: SubscriptionItems | None = None


class SubscriptionDetails(Shape):
    subscription: str | Ref
    metadata: dict[str, str] | None = None


class InvoiceParent(Shape):
    type: str
    subscription_details: SubscriptionDetails | None = None


class LegacySubscriptionDetails(Shape):
    metadata: dict[str, str] | None = None


class InvoiceShape(Shape):
    id: str = Field(pattern=r"^in_")
    object: Literal["invoice"]
    customer: Expandable = None
    billing_reason: str | None = None
    attempt_count: int = Field(default=0, ge=0)
    next_payment_attempt: int | None = None
    parent: InvoiceParent | None = None
    # Endpoints pinned to an API version older than 2025-03-31 still send these.
    subscription: Expandable = None
    subscription_details: LegacySubscriptionDetails | None = None


class EventData(Shape):
    object: dict[str, Any]


class EventShape(Shape):
    id: str = Field(pattern=r"^evt_")
    object: Literal["event"]
    type: str = Field(min_length=1)
    created: int
    livemode: bool
    api_version: str | None = None
    data: EventData


ShapeT = TypeVar("ShapeT", bound=Shape)


def describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
        for err in exc.errors(include_url=False)
    )


def timestamp(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=UTC)
