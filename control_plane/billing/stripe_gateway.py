"""The one boundary to Stripe.

Everything the control plane asks of Stripe, and everything Stripe tells it through webhooks,
passes through ``StripeGateway``. Above this module there are no ``stripe`` types: calls return
small frozen dataclasses, webhook deliveries become a typed ``BillingEvent`` union, and every
``stripe`` exception is translated into ``BillingError`` (``raise ... from exc``).

Calls use the SDK's native async methods (``*_async``) over its httpx client, so nothing blocks
the event loop and no thread pool is involved. Every reply is validated before it is trusted.
The secret key and the webhook secret are never logged, never put in an error message and never
shown by ``repr``.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import anyio
import httpx
import stripe
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from stripe.params import CustomerCreateParams
from stripe.params.checkout import SessionCreateParams

__all__ = [
    "STRIPE_API_VERSION",
    "BillingError",
    "BillingEvent",
    "BillingNotFound",
    "BillingRejected",
    "BillingReplyError",
    "BillingUnavailable",
    "CheckoutCompleted",
    "CheckoutSession",
    "CheckoutSessionState",
    "Ignored",
    "InvoicePaid",
    "InvoicePaymentFailed",
    "StripeGateway",
    "SubscriptionDeleted",
    "SubscriptionState",
    "SubscriptionUpdated",
    "WebhookPayloadError",
    "WebhookSignatureError",
]

log = logging.getLogger(__name__)

# The API version this module's reply and event parsing was written against. Requests pin it
# explicitly, so an SDK upgrade cannot silently move the shapes under us (API 2026-10-28 moved an
# invoice's subscription to ``invoice.parent.subscription_details``; see PITFALLS.md, "Stripe").
STRIPE_API_VERSION = "2026-10-28.endive"

# Stripe rejects longer idempotency keys.
_MAX_IDEMPOTENCY_KEY = 255
_PAID_STATUSES = frozenset({"paid", "no_payment_required"})


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class BillingError(Exception):
    """Root of every error raised by the billing boundary."""


class BillingUnavailable(BillingError):
    """Stripe could not be reached, timed out, rate-limited us or failed (5xx, 409 lock
    conflicts). Safe to retry later with the same idempotency key."""

    def __init__(self, message: str, *, status: int | None = None, request_id: str | None = None):
        super().__init__(message)
        self.status = status
        self.request_id = request_id


class BillingReplyError(BillingUnavailable):
    """Stripe answered 2xx with a body we cannot use (missing or malformed fields)."""


class BillingRejected(BillingError):
    """Stripe refused the request (4xx): bad parameters, bad key, idempotency key reused with
    different parameters. Retrying the same request will not help."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        error_type: str | None = None,
        param: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.error_type = error_type
        self.param = param
        self.request_id = request_id


class BillingNotFound(BillingRejected):
    """The object does not exist (404 ``resource_missing``) — or, for a subscription being
    canceled, no longer accepts the call because it is already canceled."""


class WebhookSignatureError(BillingError):
    """The webhook delivery is not authentic or is too old: answer 400 and process nothing."""


class WebhookPayloadError(BillingError):
    """The webhook is authentic but its payload lacks fields we need or has the wrong shape."""


# --------------------------------------------------------------------------------------------
# Values returned by calls
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckoutSession:
    """A new Checkout Session: send the browser to ``url``."""

    id: str
    url: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckoutSessionState:
    """What Stripe currently says about a Checkout Session (for ``/checkout/confirm``)."""

    id: str
    status: str | None
    payment_status: str
    subscription_id: str | None
    customer_id: str | None
    client_reference_id: str | None
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def instance_id(self) -> str | None:
        return self.metadata.get("instance_id") or self.client_reference_id

    @property
    def paid(self) -> bool:
        """Complete and paid (or nothing to pay): the fulfil step may run."""
        return self.status == "complete" and self.payment_status in _PAID_STATUSES


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriptionState:
    """What Stripe currently says about a subscription."""

    id: str
    status: str
    customer_id: str | None
    cancel_at_period_end: bool
    canceled_at: datetime | None
    current_period_end: datetime | None
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def instance_id(self) -> str | None:
        return self.metadata.get("instance_id")


# --------------------------------------------------------------------------------------------
# Webhook events, translated
# --------------------------------------------------------------------------------------------


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
# Shapes we accept from Stripe (replies and event payloads). Unknown fields are ignored: Stripe
# adds fields without a version change.
# --------------------------------------------------------------------------------------------


class _Shape(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Ref(_Shape):
    """An expanded object in an expandable field: only its id matters to us."""

    id: str


_Expandable = str | _Ref | None


def _ref_id(value: _Expandable) -> str | None:
    return value.id if isinstance(value, _Ref) else value


class _SessionShape(_Shape):
    id: str = Field(pattern=r"^cs_")
    object: Literal["checkout.session"]
    mode: str
    status: str | None = None
    payment_status: str
    url: str | None = None
    subscription: _Expandable = None
    customer: _Expandable = None
    client_reference_id: str | None = None
    metadata: dict[str, str] | None = None


class _CustomerShape(_Shape):
    id: str = Field(pattern=r"^cus_")
    object: Literal["customer"]


class _SubscriptionItemShape(_Shape):
    current_period_end: int | None = None


class _SubscriptionItems(_Shape):
    data: list[_SubscriptionItemShape] = Field(default_factory=list)


class _SubscriptionShape(_Shape):
    id: str = Field(pattern=r"^sub_")
    object: Literal["subscription"]
    status: str
    customer: _Expandable = None
    cancel_at_period_end: bool = False
    canceled_at: int | None = None
    metadata: dict[str, str] | None = None
    # Since API 2025-03-31 the billing period lives on the subscription items.
    items: _SubscriptionItems | None = None


class _SubscriptionDetails(_Shape):
    subscription: str | _Ref
    metadata: dict[str, str] | None = None


class _InvoiceParent(_Shape):
    type: str
    subscription_details: _SubscriptionDetails | None = None


class _LegacySubscriptionDetails(_Shape):
    metadata: dict[str, str] | None = None


class _InvoiceShape(_Shape):
    id: str = Field(pattern=r"^in_")
    object: Literal["invoice"]
    customer: _Expandable = None
    billing_reason: str | None = None
    attempt_count: int = Field(default=0, ge=0)
    next_payment_attempt: int | None = None
    parent: _InvoiceParent | None = None
    # Endpoints pinned to an API version older than 2025-03-31 still send these.
    subscription: _Expandable = None
    subscription_details: _LegacySubscriptionDetails | None = None


class _EventData(_Shape):
    object: dict[str, Any]


class _EventShape(_Shape):
    id: str = Field(pattern=r"^evt_")
    object: Literal["event"]
    type: str = Field(min_length=1)
    created: int
    livemode: bool
    api_version: str | None = None
    data: _EventData


_S = TypeVar("_S", bound=_Shape)


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
        for err in exc.errors(include_url=False)
    )


def _timestamp(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=UTC)


# --------------------------------------------------------------------------------------------
# Transport
# --------------------------------------------------------------------------------------------


class _AsyncHTTPX(stripe.HTTPClient):
    """The SDK's transport, async only, over one ``httpx.AsyncClient``.

    stripe-python 16's own ``HTTPXClient`` hands the form body to httpx as ``data=<str>``,
    which httpx 0.28 deprecates with a ``DeprecationWarning`` on every call (the same family
    as stripe/stripe-python#1428); under ``-W error`` that warning even surfaces as a
    connection error. This client sends the body as ``content=`` and otherwise keeps the SDK's
    behaviour: its CA bundle, and transport failures raised as retryable
    ``APIConnectionError`` so the SDK's retry loop (same idempotency key) applies.
    """

    name = "httpx"

    def __init__(self, timeout: httpx.Timeout) -> None:
        super().__init__()
        self._client = httpx.AsyncClient(
            timeout=timeout, verify=ssl.create_default_context(cafile=stripe.ca_bundle_path)
        )

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        try:
            response = await self._client.request(
                method, url, headers=dict(headers), content=post_data
            )
        except httpx.HTTPError as exc:
            raise stripe.APIConnectionError(
                f"network error talking to Stripe ({type(exc).__name__})", should_retry=True
            ) from exc
        return response.content, response.status_code, response.headers

    def sleep_async(self, secs: float) -> Awaitable[None]:
        return anyio.sleep(secs)

    async def close_async(self) -> None:
        await self._client.aclose()


# --------------------------------------------------------------------------------------------
# The gateway
# --------------------------------------------------------------------------------------------

_T = TypeVar("_T")


class StripeGateway:
    """Stripe calls and webhook parsing for the control plane.

    ``api_base`` points the SDK at another server (the loopback fake in tests). Close the
    gateway with ``await gateway.aclose()`` (or use it as an async context manager) to release
    its connection pool.
    """

    def __init__(
        self,
        secret_key: str,
        *,
        webhook_secret: str,
        api_base: str | None = None,
        webhook_tolerance: int = 300,
        max_network_retries: int = 1,
        timeout: float = 10.0,
    ) -> None:
        # Errors name the option, never its value: these are secrets.
        if not isinstance(secret_key, str) or not secret_key.startswith(("sk_", "rk_")):
            raise ValueError("secret_key must be a Stripe secret or restricted key (sk_/rk_)")
        if not isinstance(webhook_secret, str) or not webhook_secret.strip():
            raise ValueError("webhook_secret must be set (the endpoint's whsec_ signing secret)")
        if webhook_tolerance <= 0:
            # The SDK treats a falsy tolerance as "no replay protection at all".
            raise ValueError("webhook_tolerance must be a positive number of seconds")
        if not 0 <= max_network_retries <= 5:
            raise ValueError("max_network_retries must be between 0 and 5")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        base_addresses: dict[str, str] = {}
        if api_base is not None:
            parts = urlsplit(api_base)
            if parts.scheme not in {"http", "https"} or not parts.netloc or parts.query:
                raise ValueError("api_base must be an http(s) URL without a query")
            base_addresses["api"] = api_base.rstrip("/")
        self._api_base = base_addresses.get("api", stripe.DEFAULT_API_BASE)
        self._secret_key = secret_key
        self._webhook_secret = webhook_secret
        self._webhook_tolerance = webhook_tolerance
        self._http = _AsyncHTTPX(httpx.Timeout(timeout, connect=min(timeout, 5.0)))
        self._client = stripe.StripeClient(
            secret_key,
            stripe_version=STRIPE_API_VERSION,
            base_addresses=base_addresses,  # type: ignore[arg-type]
            max_network_retries=max_network_retries,
            http_client=self._http,
        )

    def __repr__(self) -> str:
        return f"StripeGateway(api_base={self._api_base!r})"

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self._http.close_async()

    async def __aenter__(self) -> StripeGateway:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ---- calls -----------------------------------------------------------------------------

    async def create_customer(self, *, email: str, user_id: str, idempotency_key: str) -> str:
        """Create a Stripe customer for a user and return its id. The idempotency key (derive
        it from the user id) makes a double click create one customer, not two
        (jagduvi1/Cellarion#632)."""
        params: CustomerCreateParams = {"email": email, "metadata": {"user_id": user_id}}
        obj = await self._call(
            "create customer",
            lambda: self._client.v1.customers.create_async(
                params, {"idempotency_key": _idempotency_key(idempotency_key)}
            ),
        )
        return self._reply("create customer", _CustomerShape, obj).id

    async def create_checkout_session(
        self,
        *,
        instance_id: str,
        user_id: str,
        email: str,
        customer_id: str | None,
        price_id: str,
        success_url: str,
        cancel_url: str,
        idempotency_key: str,
    ) -> CheckoutSession:
        """Start a subscription Checkout for one instance.

        The instance id travels three ways — ``client_reference_id``, the session's metadata
        and the subscription's metadata (copied onto every invoice) — so the webhook, the
        confirm call and later invoice events can all find the instance without a lookup
        table: the success page may load before ``checkout.session.completed`` arrives
        (stripe/stripe-cli#418). The same idempotency key with the same arguments returns the
        same session, so a double-clicked create opens one checkout (jagduvi1/Cellarion#632).
        ``success_url`` may contain ``{CHECKOUT_SESSION_ID}``; Stripe substitutes it.
        """
        ids = {"instance_id": instance_id, "user_id": user_id}
        for name, value in ids.items():
            if not value:
                raise ValueError(f"{name} must not be empty")
        params: SessionCreateParams = {
            "mode": "subscription",
            "line_items": [{"price": price_id, "quantity": 1}],
            "success_url": success_url,
            "cancel_url": cancel_url,
            "client_reference_id": instance_id,
            "metadata": dict(ids),
            "subscription_data": {"metadata": dict(ids)},
        }
        # Stripe accepts one of the two: reuse the user's customer when we have one.
        if customer_id:
            params["customer"] = customer_id
        else:
            params["customer_email"] = email
        obj = await self._call(
            "create checkout session",
            lambda: self._client.v1.checkout.sessions.create_async(
                params, {"idempotency_key": _idempotency_key(idempotency_key)}
            ),
        )
        session = self._reply("create checkout session", _SessionShape, obj)
        if session.mode != "subscription" or not session.url:
            raise BillingReplyError(
                f"create checkout session: reply for {session.id} has mode={session.mode!r} "
                f"and url={'set' if session.url else 'missing'}"
            )
        parts = urlsplit(session.url)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise BillingReplyError(
                f"create checkout session: reply for {session.id} has no usable url"
            )
        if (session.metadata or {}).get("instance_id") != instance_id:
            raise BillingReplyError(
                f"create checkout session: reply for {session.id} does not carry the instance id"
            )
        return CheckoutSession(id=session.id, url=session.url)

    async def retrieve_checkout_session(self, session_id: str) -> CheckoutSessionState:
        """Read a Checkout Session back (the confirm path; it may run before the webhook)."""
        obj = await self._call(
            "retrieve checkout session",
            lambda: self._client.v1.checkout.sessions.retrieve_async(_object_id(session_id)),
        )
        session = self._reply("retrieve checkout session", _SessionShape, obj)
        if session.id != session_id:
            raise BillingReplyError(
                f"retrieve checkout session: asked for {session_id}, got {session.id}"
            )
        return CheckoutSessionState(
            id=session.id,
            status=session.status,
            payment_status=session.payment_status,
            subscription_id=_ref_id(session.subscription),
            customer_id=_ref_id(session.customer),
            client_reference_id=session.client_reference_id,
            metadata=dict(session.metadata or {}),
        )

    async def expire_checkout_session(self, session_id: str, *, idempotency_key: str) -> str:
        """Expire an open Checkout Session so it can no longer be paid; returns its status.

        Stripe refuses (400) a session that is no longer open (complete or already expired):
        that surfaces as ``BillingRejected`` for the caller to decide on."""
        obj = await self._call(
            "expire checkout session",
            lambda: self._client.v1.checkout.sessions.expire_async(
                _object_id(session_id),
                None,
                {"idempotency_key": _idempotency_key(idempotency_key)},
            ),
        )
        session = self._reply("expire checkout session", _SessionShape, obj)
        if session.id != session_id:
            raise BillingReplyError(
                f"expire checkout session: asked for {session_id}, got {session.id}"
            )
        return session.status or "expired"

    async def set_cancel_at_period_end(
        self, subscription_id: str, at_period_end: bool, *, idempotency_key: str
    ) -> SubscriptionState:
        """Schedule (``True``) or undo (``False``) the end of a subscription at the end of its
        paid period. Use a fresh idempotency key per request: a key reused for a later toggle
        would replay the earlier answer without changing anything."""
        sub_id = _object_id(subscription_id)
        options: stripe.RequestOptions = {"idempotency_key": _idempotency_key(idempotency_key)}
        obj = await self._call(
            "update subscription",
            lambda: self._client.v1.subscriptions.update_async(
                sub_id, {"cancel_at_period_end": at_period_end}, options
            ),
        )
        return self._subscription_state("update subscription", sub_id, obj)

    async def retrieve_subscription(self, subscription_id: str) -> SubscriptionState:
        """Read a subscription (the reconciler's source of truth for billing state)."""
        obj = await self._call(
            "retrieve subscription",
            lambda: self._client.v1.subscriptions.retrieve_async(_object_id(subscription_id)),
        )
        return self._subscription_state("retrieve subscription", subscription_id, obj)

    async def cancel_subscription(
        self, subscription_id: str, *, idempotency_key: str, at_period_end: bool = False
    ) -> SubscriptionState:
        """Cancel a subscription now (default) or at the end of the paid period.

        Idempotent: canceling an already canceled subscription returns its state. Stripe
        answers a second immediate cancel with 404 ``resource_missing`` even though the
        subscription still exists (stripe/stripe-go#1887, dj-stripe/dj-stripe#502), so on 404
        we read it back and succeed if it is canceled.
        """
        sub_id = _object_id(subscription_id)
        options: stripe.RequestOptions = {"idempotency_key": _idempotency_key(idempotency_key)}
        if at_period_end:
            obj = await self._call(
                "cancel subscription at period end",
                lambda: self._client.v1.subscriptions.update_async(
                    sub_id, {"cancel_at_period_end": True}, options
                ),
            )
            return self._subscription_state("cancel subscription", sub_id, obj)
        try:
            obj = await self._call(
                "cancel subscription",
                lambda: self._client.v1.subscriptions.cancel_async(sub_id, None, options),
            )
        except BillingNotFound:
            state = await self.retrieve_subscription(sub_id)
            if state.status != "canceled":
                raise
            return state
        return self._subscription_state("cancel subscription", sub_id, obj)

    # ---- webhooks --------------------------------------------------------------------------

    def parse_webhook(self, raw_body: bytes, signature_header: str | None) -> BillingEvent:
        """Verify a webhook delivery and translate it.

        ``raw_body`` must be the request body exactly as received: the signature covers those
        bytes, and a parsed-then-re-serialised body fails verification (stripe/stripe-node#341).
        Deliveries older than the tolerance are refused (replay protection). Raises
        ``WebhookSignatureError`` (answer 400, process nothing) or ``WebhookPayloadError``.
        The same event may arrive twice or out of order (stripe/stripe-cli#418): deduplicate on
        ``event_id`` and make each effect idempotent.
        """
        if not isinstance(raw_body, bytes | bytearray):
            raise TypeError("parse_webhook needs the raw request body as bytes")
        if not signature_header:
            raise WebhookSignatureError("missing Stripe-Signature header")
        try:
            text = bytes(raw_body).decode("utf-8")
        except UnicodeDecodeError:
            # Stripe signs UTF-8 JSON; an undecodable body cannot carry a valid signature.
            raise WebhookSignatureError("webhook body is not UTF-8") from None
        try:
            stripe.WebhookSignature.verify_header(
                text, signature_header, self._webhook_secret, self._webhook_tolerance
            )
        except stripe.SignatureVerificationError as exc:
            raise WebhookSignatureError(f"invalid Stripe-Signature: {exc.user_message}") from exc
        try:
            document = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise WebhookPayloadError(f"webhook body is not JSON: {exc}") from exc
        try:
            event = _EventShape.model_validate(document)
        except ValidationError as exc:
            raise WebhookPayloadError(f"not a Stripe event: {_describe(exc)}") from exc
        translated = _translate_event(event)
        log.info(
            "stripe webhook verified",
            extra={"stripe_event_id": event.id, "stripe_event_type": event.type},
        )
        return translated

    # ---- internals -------------------------------------------------------------------------

    async def _call(self, operation: str, call: Callable[[], Awaitable[_T]]) -> _T:
        try:
            return await call()
        except stripe.StripeError as exc:
            error = self._translate_error(operation, exc)
            log.warning(
                "stripe call failed",
                extra={
                    "operation": operation,
                    "http_status": exc.http_status,
                    "stripe_code": exc.code,
                    "stripe_request_id": exc.request_id,
                    "billing_error": type(error).__name__,
                },
            )
            raise error from exc

    def _translate_error(self, operation: str, exc: stripe.StripeError) -> BillingError:
        status = exc.http_status
        detail = self._redact(exc.user_message or type(exc).__name__)
        message = f"{operation}: {detail}"
        if isinstance(exc, stripe.APIConnectionError) or status is None:
            return BillingUnavailable(message, status=status, request_id=exc.request_id)
        # 409 is Stripe's "a concurrent request holds the lock"; 429 is rate limiting. Both
        # succeed on a later retry with the same idempotency key, like a 5xx.
        if status >= 500 or status in {409, 429}:
            return BillingUnavailable(message, status=status, request_id=exc.request_id)
        body = exc.json_body.get("error") if isinstance(exc.json_body, dict) else None
        error = body if isinstance(body, dict) else {}
        error_type = error.get("type") if isinstance(error.get("type"), str) else None
        param = error.get("param") if isinstance(error.get("param"), str) else None
        cls = BillingNotFound if status == 404 else BillingRejected
        return cls(
            message,
            status=status,
            code=exc.code,
            error_type=error_type,
            param=param,
            request_id=exc.request_id,
        )

    def _redact(self, text: str) -> str:
        # Stripe already masks keys in its messages; this guards the message we build anyway.
        for secret in (self._secret_key, self._webhook_secret):
            text = text.replace(secret, "[redacted]")
        return text

    def _reply(self, operation: str, shape: type[_S], obj: Any) -> _S:
        try:
            data = obj.to_dict()
            return shape.model_validate(data)
        except (AttributeError, ValidationError) as exc:
            detail = _describe(exc) if isinstance(exc, ValidationError) else "not an object"
            raise BillingReplyError(f"{operation}: unexpected reply: {detail}") from exc

    def _subscription_state(self, operation: str, expected_id: str, obj: Any) -> SubscriptionState:
        sub = self._reply(operation, _SubscriptionShape, obj)
        if sub.id != expected_id:
            raise BillingReplyError(f"{operation}: asked for {expected_id}, got {sub.id}")
        period_ends = [i.current_period_end for i in (sub.items.data if sub.items else [])]
        known = [end for end in period_ends if end is not None]
        return SubscriptionState(
            id=sub.id,
            status=sub.status,
            customer_id=_ref_id(sub.customer),
            cancel_at_period_end=sub.cancel_at_period_end,
            canceled_at=_timestamp(sub.canceled_at),
            current_period_end=_timestamp(max(known)) if known else None,
            metadata=dict(sub.metadata or {}),
        )


def _idempotency_key(key: str) -> str:
    if not key or len(key) > _MAX_IDEMPOTENCY_KEY:
        raise ValueError(f"idempotency_key must be 1-{_MAX_IDEMPOTENCY_KEY} characters")
    return key


def _object_id(value: str) -> str:
    if not value or not value.isascii() or not value.replace("_", "").isalnum():
        raise ValueError("a Stripe object id is letters, digits and underscores")
    return value


# --------------------------------------------------------------------------------------------
# Event translation
# --------------------------------------------------------------------------------------------


def _translate_event(event: _EventShape) -> BillingEvent:
    created = datetime.fromtimestamp(event.created, tz=UTC)
    handler = _HANDLERS.get(event.type)
    if handler is None:
        return Ignored(event_id=event.id, created=created, type=event.type, reason="unhandled type")
    return handler(event, created)


def _payload(event: _EventShape, shape: type[_S]) -> _S:
    try:
        return shape.model_validate(event.data.object)
    except ValidationError as exc:
        raise WebhookPayloadError(
            f"event {event.id} ({event.type}): data.object: {_describe(exc)}"
        ) from exc


def _checkout_completed(event: _EventShape, created: datetime) -> BillingEvent:
    session = _payload(event, _SessionShape)
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
    paid = session.status == "complete" and session.payment_status in _PAID_STATUSES
    subscription_id = _ref_id(session.subscription)
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
        customer_id=_ref_id(session.customer),
        paid=paid,
    )


def _invoice_subscription(
    event: _EventShape, invoice: _InvoiceShape
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
        sub_id = _ref_id(details.subscription)
        assert sub_id is not None  # a str | _Ref field
        return sub_id, dict(details.metadata or {})
    fields = invoice.model_fields_set
    if "parent" in fields:
        return None  # parent: null — an invoice not created by a subscription
    if "subscription" in fields:
        legacy = _ref_id(invoice.subscription)
        if legacy is None:
            return None
        legacy_meta = invoice.subscription_details.metadata if invoice.subscription_details else {}
        return legacy, dict(legacy_meta or {})
    raise WebhookPayloadError(
        f"{where}: invoice has neither parent.subscription_details.subscription (API "
        f"{STRIPE_API_VERSION}) nor subscription (API versions before 2025-03-31)"
    )


def _invoice_event(event: _EventShape, created: datetime) -> BillingEvent:
    invoice = _payload(event, _InvoiceShape)
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
            customer_id=_ref_id(invoice.customer),
            instance_id=metadata.get("instance_id"),
            billing_reason=invoice.billing_reason,
        )
    return InvoicePaymentFailed(
        event_id=event.id,
        created=created,
        invoice_id=invoice.id,
        subscription_id=subscription_id,
        customer_id=_ref_id(invoice.customer),
        instance_id=metadata.get("instance_id"),
        attempt_count=invoice.attempt_count,
        next_payment_attempt=_timestamp(invoice.next_payment_attempt),
    )


def _subscription_deleted(event: _EventShape, created: datetime) -> BillingEvent:
    sub = _payload(event, _SubscriptionShape)
    return SubscriptionDeleted(
        event_id=event.id,
        created=created,
        subscription_id=sub.id,
        customer_id=_ref_id(sub.customer),
        instance_id=(sub.metadata or {}).get("instance_id"),
    )


def _subscription_updated(event: _EventShape, created: datetime) -> BillingEvent:
    sub = _payload(event, _SubscriptionShape)
    ends = [i.current_period_end for i in (sub.items.data if sub.items else [])]
    known = [end for end in ends if end is not None]
    return SubscriptionUpdated(
        event_id=event.id,
        created=created,
        subscription_id=sub.id,
        customer_id=_ref_id(sub.customer),
        instance_id=(sub.metadata or {}).get("instance_id"),
        status=sub.status,
        cancel_at_period_end=sub.cancel_at_period_end,
        current_period_end=_timestamp(max(known)) if known else None,
    )


_HANDLERS: Mapping[str, Callable[[_EventShape, datetime], BillingEvent]] = {
    "checkout.session.completed": _checkout_completed,
    # Delayed payment methods complete the session unpaid and confirm payment later.
    "checkout.session.async_payment_succeeded": _checkout_completed,
    "invoice.paid": _invoice_event,
    "invoice.payment_failed": _invoice_event,
    "customer.subscription.deleted": _subscription_deleted,
    "customer.subscription.updated": _subscription_updated,
}
