"""The one boundary to Stripe: the client.

Everything the control plane asks of Stripe, and everything Stripe tells it through webhooks,
passes through ``StripeGateway``. Above it there are no ``stripe`` types: calls return small
frozen dataclasses, webhook deliveries (verified here) become a typed ``BillingEvent`` union
(translated in ``stripe_events.py``), and every ``stripe`` exception is translated into
``BillingError`` (``stripe_errors.py``; ``raise ... from exc``). Replies are validated against
``stripe_shapes.py``.

Calls use the SDK's native async methods (``*_async``) over its httpx client, so nothing blocks
the event loop and no thread pool is involved. Every reply is validated before it is trusted.
The secret key and the webhook secret are never logged, never put in an error message and never
shown by ``repr``.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
import httpx
import stripe
from pydantic import ValidationError
from stripe.params import CustomerCreateParams
from stripe.params.checkout import SessionCreateParams

from control_plane.billing.stripe_errors import (
    BillingError,
    BillingNotFound,
    BillingRejected,
    BillingReplyError,
    BillingUnavailable,
    WebhookSignatureError,
)
from control_plane.billing.stripe_events import BillingEvent, parse_event, translate_event
from control_plane.billing.stripe_shapes import (
    PAID_STATUSES,
    STRIPE_API_VERSION,
    CustomerShape,
    SessionShape,
    ShapeT,
    SubscriptionShape,
    describe,
    ref_id,
    timestamp,
)

__all__ = [
    "CheckoutSession",
    "CheckoutSessionState",
    "StripeGateway",
    "SubscriptionState",
]

log = logging.getLogger(__name__)

# Stripe rejects longer idempotency keys.
_MAX_IDEMPOTENCY_KEY = 255


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
        return self.status == "complete" and self.payment_status in PAID_STATUSES


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
            # stripe leaves APIConnectionError.__init__ unannotated (stripe 16.1).
            raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]
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
        api: str | None = None
        if api_base is not None:
            parts = urlsplit(api_base)
            if parts.scheme not in {"http", "https"} or not parts.netloc or parts.query:
                raise ValueError("api_base must be an http(s) URL without a query")
            api = api_base.rstrip("/")
        self._api_base = api if api is not None else stripe.DEFAULT_API_BASE
        self._secret_key = secret_key
        self._webhook_secret = webhook_secret
        self._webhook_tolerance = webhook_tolerance
        self._http = _AsyncHTTPX(httpx.Timeout(timeout, connect=min(timeout, 5.0)))
        self._client = stripe.StripeClient(
            secret_key,
            stripe_version=STRIPE_API_VERSION,
            # A literal, so mypy checks it against stripe's BaseAddresses TypedDict.
            base_addresses={"api": api} if api is not None else {},
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
        return self._reply("create customer", CustomerShape, obj).id

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
        session = self._reply("create checkout session", SessionShape, obj)
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
        session = self._reply("retrieve checkout session", SessionShape, obj)
        if session.id != session_id:
            raise BillingReplyError(
                f"retrieve checkout session: asked for {session_id}, got {session.id}"
            )
        return CheckoutSessionState(
            id=session.id,
            status=session.status,
            payment_status=session.payment_status,
            subscription_id=ref_id(session.subscription),
            customer_id=ref_id(session.customer),
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
        session = self._reply("expire checkout session", SessionShape, obj)
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
        event = parse_event(text)
        translated = translate_event(event)
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

    def _reply(self, operation: str, shape: type[ShapeT], obj: Any) -> ShapeT:
        try:
            data = obj.to_dict()
            return shape.model_validate(data)
        except (AttributeError, ValidationError) as exc:
            detail = describe(exc) if isinstance(exc, ValidationError) else "not an object"
            raise BillingReplyError(f"{operation}: unexpected reply: {detail}") from exc

    def _subscription_state(self, operation: str, expected_id: str, obj: Any) -> SubscriptionState:
        sub = self._reply(operation, SubscriptionShape, obj)
        if sub.id != expected_id:
            raise BillingReplyError(f"{operation}: asked for {expected_id}, got {sub.id}")
        period_ends = [i.current_period_end for i in (sub.items.data if sub.items else [])]
        known = [end for end in period_ends if end is not None]
        return SubscriptionState(
            id=sub.id,
            status=sub.status,
            customer_id=ref_id(sub.customer),
            cancel_at_period_end=sub.cancel_at_period_end,
            canceled_at=timestamp(sub.canceled_at),
            current_period_end=timestamp(max(known)) if known else None,
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
