"""A stateful fake of the parts of the Stripe API that quoroom-cloud uses.

It is a real HTTP server on loopback (Starlette under uvicorn in a background thread), driven
through the real ``stripe`` SDK with its API base pointed at ``FakeStripe.url``, and it speaks
Stripe's wire format: form-encoded nested parameters (``metadata[instance_id]=...``,
``line_items[0][price]=...``), Bearer secret-key auth, ``Idempotency-Key`` replay and conflict,
``Stripe-Version`` pinning and Stripe's error JSON (``{"error": {"type", "code", "message",
"param"}}``). Objects carry Stripe's shapes for API 2026-10-28, notably an invoice's subscription
at ``invoice.parent.subscription_details.subscription``.

What the hosted pages and Stripe's back office would do is done by test-driver methods
(``complete_checkout``, ``fail_invoice``, ``pay_invoice``, ``delete_subscription``, ...): each
changes the state and returns the events Stripe would send. ``sign_webhook`` / ``deliver`` /
``adeliver`` sign and post them exactly as Stripe does, so tests can send events duplicated,
shuffled, late or re-signed. Given ``webhook_url``, the fake also delivers by itself the events
caused over HTTP (the ``/pay/{id}`` page, ``DELETE /v1/subscriptions/{id}``), like Stripe.

Faults: ``fail_next(status, ...)`` answers the next matching request with a Stripe-shaped
error; ``lost_response=True`` executes the request (and saves its idempotent result) but
answers the error anyway, as when a response is lost on the way back.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import html
import json
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from control_plane.billing.catalog import default_catalog

__all__ = [
    "API_VERSION",
    "DEFAULT_SECRET_KEY",
    "DEFAULT_WEBHOOK_SECRET",
    "FakeStripe",
    "LoopbackServer",
    "RecordedRequest",
    "adeliver",
    "deliver",
    "encode_event",
    "fake_stripe",
    "parse_form",
    "sign_webhook",
    "webhook_headers",
]

API_VERSION = "2026-10-28.endive"
DEFAULT_SECRET_KEY = "sk_test_fake51QuoroomCloudSecretKey0000"
DEFAULT_WEBHOOK_SECRET = "whsec_fakeQuoroomCloudWebhookSecret0000"

_DAY = 86_400
_MONTH = 30 * _DAY
_RETRY_DELAY = 3 * _DAY
_MAX_PAYMENT_ATTEMPTS = 4
_KEY_RE = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


# ------------------------------------------------------------------------------------------------
# Webhook signing and delivery (what Stripe's webhook sender does)
# ------------------------------------------------------------------------------------------------


def sign_webhook(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The ``Stripe-Signature`` header for ``payload``: ``t={timestamp},v1={hex}`` where the
    signature is HMAC-SHA256 keyed with the endpoint secret over ``"{timestamp}." + payload``."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    mac = hmac.new(secret.encode("utf-8"), f"{ts}.".encode() + payload, hashlib.sha256)
    return f"t={ts},v1={mac.hexdigest()}"


def encode_event(event: Mapping[str, Any]) -> bytes:
    """An event body as Stripe sends it (pretty-printed UTF-8 JSON)."""
    return json.dumps(event, indent=2).encode("utf-8")


def webhook_headers(payload: bytes, secret: str, timestamp: int | None = None) -> dict[str, str]:
    return {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        "Stripe-Signature": sign_webhook(payload, secret, timestamp),
    }


def _body(event: Mapping[str, Any] | bytes) -> bytes:
    return event if isinstance(event, bytes) else encode_event(event)


def deliver(
    event: Mapping[str, Any] | bytes,
    url: str,
    secret: str,
    *,
    timestamp: int | None = None,
    timeout: float = 10.0,
) -> httpx.Response:
    """POST a signed event (or raw bytes) to a webhook URL served by another thread/process.
    From an async test whose app runs on the same event loop, use ``adeliver``."""
    payload = _body(event)
    return httpx.post(
        url, content=payload, headers=webhook_headers(payload, secret, timestamp), timeout=timeout
    )


async def adeliver(
    event: Mapping[str, Any] | bytes,
    url: str,
    secret: str,
    *,
    timestamp: int | None = None,
    client: httpx.AsyncClient | None = None,
) -> httpx.Response:
    """Async ``deliver``; pass ``client`` (e.g. one on ``httpx.ASGITransport``) to reach an app
    in-process."""
    payload = _body(event)
    headers = webhook_headers(payload, secret, timestamp)
    if client is not None:
        return await client.post(url, content=payload, headers=headers)
    async with httpx.AsyncClient(timeout=10.0) as own:
        return await own.post(url, content=payload, headers=headers)


# ------------------------------------------------------------------------------------------------
# Wire format helpers
# ------------------------------------------------------------------------------------------------


class _APIError(Exception):
    """Raised inside a handler; becomes Stripe's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"error": {"message": message, "type": type}}
        if code is not None:
            self.body["error"]["code"] = code
            self.body["error"]["doc_url"] = f"https://stripe.com/docs/error-codes/{code}"
        if param is not None:
            self.body["error"]["param"] = param


def _missing(kind: str, object_id: str, param: str = "id") -> _APIError:
    return _APIError(404, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)


def parse_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Decode Stripe's bracketed form keys into nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        match = _KEY_RE.match(key)
        if match is None:
            raise _APIError(400, f"Invalid parameter name: {key}", param=key)
        tokens = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]
        node = root
        for index, token in enumerate(tokens):
            name = token if token != "" else str(len(node))  # "expand[]" appends
            if index == len(tokens) - 1:
                if name in node:
                    raise _APIError(400, f"Duplicate parameter: {key}", param=key)
                node[name] = value
            else:
                child = node.setdefault(name, {})
                if not isinstance(child, dict):
                    raise _APIError(400, f"Invalid parameter structure: {key}", param=key)
                node = child
    return _listify(root)


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    converted = {k: _listify(v) for k, v in node.items()}
    if converted and all(k.isdigit() for k in converted):
        indexes = sorted(int(k) for k in converted)
        if indexes == list(range(len(indexes))):
            return [converted[str(i)] for i in indexes]
    return converted


def _new_id(prefix: str, length: int = 24) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return prefix + "".join(secrets.choice(alphabet) for _ in range(length))


def _mask_key(key: str) -> str:
    # Stripe never echoes a key back in full.
    prefix = key[:8] if key.startswith(("sk_test_", "sk_live_")) else key[:3]
    return f"{prefix}{'*' * max(len(key) - len(prefix) - 4, 4)}{key[-4:]}"


def _only(params: Mapping[str, Any], allowed: set[str], prefix: str = "") -> None:
    for name in params:
        if name not in allowed:
            full = f"{prefix}[{name}]" if prefix else name
            raise _APIError(
                400, f"Received unknown parameter: {full}", code="parameter_unknown", param=full
            )


def _metadata(value: Any, param: str) -> dict[str, str]:
    if value is None or value == "":
        return {}
    if not isinstance(value, dict):
        raise _APIError(400, "Invalid object", code="parameter_invalid_string", param=param)
    if len(value) > 50:
        raise _APIError(400, "Metadata can have at most 50 keys", param=param)
    for key, item in value.items():
        if len(key) > 40 or not isinstance(item, str) or len(item) > 500:
            raise _APIError(400, f"Invalid metadata entry: {key}", param=f"{param}[{key}]")
    return dict(value)


def _url(value: Any, param: str, *, required: bool) -> str | None:
    if value is None:
        if required:
            raise _APIError(
                400, f"Missing required param: {param}.", code="parameter_missing", param=param
            )
        return None
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in {"http", "https"} or not parts.netloc:
        raise _APIError(400, "Not a valid URL", code="url_invalid", param=param)
    return str(value)


def _bool(value: Any, param: str) -> bool:
    if value in ("true", "false"):
        return value == "true"
    raise _APIError(400, "Invalid boolean", code="parameter_invalid_boolean", param=param)


# ------------------------------------------------------------------------------------------------
# The fake
# ------------------------------------------------------------------------------------------------


class LoopbackServer:
    """Serve an ASGI app with uvicorn on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.url = ""

    def start(self) -> LoopbackServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(
            self.app, lifespan="off", ws="none", http="h11", log_level="warning", access_log=False
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="loopback-server", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                sock.close()
                raise RuntimeError("the loopback server did not start")
            time.sleep(0.01)
        self._server, self._thread, self._socket = server, thread, sock
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    params: dict[str, Any]
    idempotency_key: str | None
    stripe_version: str | None
    authorization: str | None


@dataclass
class _Fault:
    status: int
    method: str | None
    path: str | None
    remaining: int
    lost_response: bool

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.path is None or path.startswith(self.path)
        )


@dataclass
class _Idempotent:
    method: str
    path: str
    params: dict[str, Any]
    status: int
    body: dict[str, Any]


@dataclass
class _SessionExtra:
    line_items: list[dict[str, Any]]
    subscription_metadata: dict[str, str]


@dataclass
class _Delivery:
    event_id: str
    status: int | None
    error: str | None = None


@dataclass
class _State:
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    prices: dict[str, dict[str, Any]] = field(default_factory=dict)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    session_extra: dict[str, _SessionExtra] = field(default_factory=dict)
    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)


class FakeStripe:
    """The fake Stripe API. Use as a context manager (``with FakeStripe() as fake``) or the
    ``fake_stripe`` fixture; ``fake.url`` is the API base to give the SDK."""

    def __init__(
        self,
        *,
        secret_key: str = DEFAULT_SECRET_KEY,
        prices: Mapping[str, int] | None = None,
        currency: str = "usd",
        webhook_url: str | None = None,
        webhook_secret: str = DEFAULT_WEBHOOK_SECRET,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.secret_key = secret_key
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self.clock = clock
        self._currency = currency
        self._lock = threading.RLock()
        self._state = _State()
        self._idempotency: dict[str, _Idempotent] = {}
        self._faults: list[_Fault] = []
        self.requests: list[RecordedRequest] = []
        self.events: list[dict[str, Any]] = []
        self.deliveries: list[_Delivery] = []
        if prices is None:
            prices = {t.stripe_price_id: t.monthly_price_cents for t in default_catalog().tiers}
        for price_id, amount in prices.items():
            self.add_price(price_id, amount)
        self.app = Starlette(
            routes=[
                Route("/v1/{path:path}", self._api, methods=["GET", "POST", "DELETE"]),
                Route("/pay/{session_id}", self._pay_page, methods=["GET", "POST"]),
            ]
        )
        self._server: LoopbackServer | None = None
        self._url: str | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("FakeStripe is not running; use it as a context manager")
        return self._url

    def start(self) -> FakeStripe:
        self._server = LoopbackServer(self.app).start()
        self._url = self._server.url
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        self._server = None
        self._url = None

    def __enter__(self) -> FakeStripe:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- configuration and inspection ----------------------------------------------------------

    def add_price(self, price_id: str, unit_amount: int, *, currency: str | None = None) -> None:
        now = int(self.clock())
        with self._lock:
            self._state.prices[price_id] = {
                "id": price_id,
                "object": "price",
                "active": True,
                "billing_scheme": "per_unit",
                "created": now,
                "currency": currency or self._currency,
                "livemode": False,
                "lookup_key": None,
                "metadata": {},
                "nickname": None,
                "product": _new_id("prod_", 14),
                "recurring": {
                    "interval": "month",
                    "interval_count": 1,
                    "meter": None,
                    "usage_type": "licensed",
                },
                "tax_behavior": "unspecified",
                "type": "recurring",
                "unit_amount": unit_amount,
                "unit_amount_decimal": str(unit_amount),
            }

    def fail_next(
        self,
        status: int = 500,
        *,
        times: int = 1,
        method: str | None = None,
        path: str | None = None,
        lost_response: bool = False,
    ) -> None:
        """Answer the next ``times`` requests matching ``method``/``path`` prefix with a
        Stripe-shaped ``status`` error. With ``lost_response`` the request is executed first
        (its idempotent result saved) and only the answer is replaced."""
        with self._lock:
            self._faults.append(
                _Fault(status, method.upper() if method else None, path, times, lost_response)
            )

    def session(self, session_id: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._state.sessions[session_id])

    def subscription(self, subscription_id: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._state.subscriptions[subscription_id])

    def invoice(self, invoice_id: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._state.invoices[invoice_id])

    def customer(self, customer_id: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._state.customers[customer_id])

    @property
    def sessions(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self._state.sessions.values()))

    @property
    def subscriptions(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self._state.subscriptions.values()))

    @property
    def customers(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self._state.customers.values()))

    def requests_to(self, method: str, path: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == method.upper() and r.path == path]

    # ---- test drivers (what the hosted page and Stripe's billing engine do) --------------------

    def make_event(
        self,
        type: str,
        data_object: Mapping[str, Any],
        *,
        previous_attributes: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record and return an event carrying a snapshot of ``data_object``."""
        data: dict[str, Any] = {"object": copy.deepcopy(dict(data_object))}
        if previous_attributes is not None:
            data["previous_attributes"] = copy.deepcopy(dict(previous_attributes))
        event = {
            "id": _new_id("evt_"),
            "object": "event",
            "api_version": API_VERSION,
            "created": int(self.clock()),
            "data": data,
            "livemode": False,
            "pending_webhooks": 1 if self.webhook_url else 0,
            "request": {"id": None, "idempotency_key": None},
            "type": type,
        }
        with self._lock:
            self.events.append(event)
        return copy.deepcopy(event)

    def complete_checkout(self, session_id: str) -> list[dict[str, Any]]:
        """The customer pays on the hosted page: the session completes, a customer (unless one
        was given), an active subscription (metadata from ``subscription_data``) and a paid
        first invoice appear. Returns ``[checkout.session.completed, invoice.paid]``."""
        with self._lock:
            session = self._state.sessions.get(session_id)
            if session is None:
                raise KeyError(f"no checkout session {session_id}")
            if session["status"] != "open":
                raise ValueError(f"checkout session {session_id} is {session['status']}")
            extra = self._state.session_extra[session_id]
            customer_id = session["customer"]
            if customer_id is None:
                email = session["customer_email"] or "customer@example.com"
                customer_id = self._new_customer(email, None, {})["id"]
            email = self._state.customers[customer_id]["email"]
            subscription = self._new_subscription(
                customer_id, extra.line_items, extra.subscription_metadata
            )
            invoice = self._new_invoice(subscription, status="paid", reason="subscription_create")
            session.update(
                status="complete",
                payment_status="paid",
                customer=customer_id,
                customer_details={"email": email, "name": None, "tax_exempt": "none"},
                subscription=subscription["id"],
                invoice=invoice["id"],
                url=None,
            )
            return [
                self.make_event("checkout.session.completed", session),
                self.make_event("invoice.paid", invoice),
            ]

    def expire_checkout(self, session_id: str) -> list[dict[str, Any]]:
        with self._lock:
            session = self._state.sessions[session_id]
            if session["status"] != "open":
                raise ValueError(f"checkout session {session_id} is {session['status']}")
            session.update(status="expired", url=None)
            return [self.make_event("checkout.session.expired", session)]

    def fail_invoice(self, subscription_id: str) -> list[dict[str, Any]]:
        """A renewal payment fails: the open invoice (a new cycle invoice if none) records an
        attempt and the subscription goes ``past_due``. Returns ``[invoice.payment_failed]``."""
        with self._lock:
            subscription = self._live_subscription(subscription_id)
            invoice = self._open_invoice(subscription_id)
            if invoice is None:
                self._advance_period(subscription)
                invoice = self._new_invoice(
                    subscription, status="open", reason="subscription_cycle"
                )
            invoice["attempt_count"] += 1
            invoice["attempted"] = True
            more = invoice["attempt_count"] < _MAX_PAYMENT_ATTEMPTS
            invoice["next_payment_attempt"] = int(self.clock()) + _RETRY_DELAY if more else None
            subscription["status"] = "past_due"
            subscription["latest_invoice"] = invoice["id"]
            return [self.make_event("invoice.payment_failed", invoice)]

    def pay_invoice(self, subscription_id: str) -> list[dict[str, Any]]:
        """A payment succeeds: the open invoice is paid (or, with none open, the next cycle's
        invoice is created paid) and the subscription is ``active``. Returns
        ``[invoice.paid]``."""
        with self._lock:
            subscription = self._live_subscription(subscription_id)
            invoice = self._open_invoice(subscription_id)
            if invoice is None:
                self._advance_period(subscription)
                invoice = self._new_invoice(
                    subscription, status="paid", reason="subscription_cycle"
                )
            else:
                invoice["attempt_count"] += 1
                self._mark_paid(invoice)
            subscription["status"] = "active"
            subscription["latest_invoice"] = invoice["id"]
            return [self.make_event("invoice.paid", invoice)]

    def set_cancel_at_period_end(self, subscription_id: str, at_end: bool) -> list[dict[str, Any]]:
        """The flag changed from the dashboard or the customer portal. Returns
        ``[customer.subscription.updated]`` (empty when it was already so)."""
        with self._lock:
            self._live_subscription(subscription_id)
            before = len(self.events)
            self._update_subscription(
                subscription_id, {"cancel_at_period_end": "true" if at_end else "false"}
            )
            return copy.deepcopy(self.events[before:])

    def delete_subscription(self, subscription_id: str) -> list[dict[str, Any]]:
        """The subscription ends (dunning gave up, or canceled from the dashboard). Returns
        ``[customer.subscription.deleted]``."""
        with self._lock:
            subscription = self._live_subscription(subscription_id)
            return [self._cancel(subscription)]

    # ---- object factories (call with the lock held) --------------------------------------------

    def _new_customer(
        self, email: str | None, name: str | None, metadata: dict[str, str]
    ) -> dict[str, Any]:
        customer: dict[str, Any] = {
            "id": _new_id("cus_", 14),
            "object": "customer",
            "address": None,
            "balance": 0,
            "created": int(self.clock()),
            "currency": None,
            "default_source": None,
            "delinquent": False,
            "description": None,
            "email": email,
            "invoice_prefix": secrets.token_hex(4).upper(),
            "livemode": False,
            "metadata": metadata,
            "name": name,
            "phone": None,
            "preferred_locales": [],
            "shipping": None,
            "tax_exempt": "none",
            "test_clock": None,
        }
        self._state.customers[customer["id"]] = customer
        return customer

    def _new_subscription(
        self, customer_id: str, line_items: list[dict[str, Any]], metadata: dict[str, str]
    ) -> dict[str, Any]:
        now = int(self.clock())
        sub_id = _new_id("sub_")
        items: list[dict[str, Any]] = [
            {
                "id": _new_id("si_", 14),
                "object": "subscription_item",
                "created": now,
                "current_period_start": now,
                "current_period_end": now + _MONTH,
                "metadata": {},
                "price": copy.deepcopy(self._state.prices[item["price"]]),
                "quantity": item["quantity"],
                "subscription": sub_id,
            }
            for item in line_items
        ]
        subscription: dict[str, Any] = {
            "id": sub_id,
            "object": "subscription",
            "billing_cycle_anchor": now,
            "cancel_at": None,
            "cancel_at_period_end": False,
            "canceled_at": None,
            "cancellation_details": {"comment": None, "feedback": None, "reason": None},
            "collection_method": "charge_automatically",
            "created": now,
            "currency": items[0]["price"]["currency"],
            "customer": customer_id,
            "ended_at": None,
            "items": {
                "object": "list",
                "data": items,
                "has_more": False,
                "total_count": len(items),
                "url": f"/v1/subscription_items?subscription={sub_id}",
            },
            "latest_invoice": None,
            "livemode": False,
            "metadata": dict(metadata),
            "start_date": now,
            "status": "active",
            "test_clock": None,
        }
        self._state.subscriptions[sub_id] = subscription
        return subscription

    def _new_invoice(
        self, subscription: dict[str, Any], *, status: str, reason: str
    ) -> dict[str, Any]:
        now = int(self.clock())
        items = subscription["items"]["data"]
        amount = sum(i["price"]["unit_amount"] * i["quantity"] for i in items)
        invoice_id = _new_id("in_")
        customer = self._state.customers.get(subscription["customer"], {})
        invoice: dict[str, Any] = {
            "id": invoice_id,
            "object": "invoice",
            "account_country": "US",
            "amount_due": amount,
            "amount_paid": 0,
            "amount_remaining": amount,
            "attempt_count": 0,
            "attempted": False,
            "auto_advance": True,
            "billing_reason": reason,
            "collection_method": "charge_automatically",
            "created": now,
            "currency": subscription["currency"],
            "customer": subscription["customer"],
            "customer_email": customer.get("email"),
            "hosted_invoice_url": f"{self._url or ''}/invoice/{invoice_id}",
            "lines": {
                "object": "list",
                "data": [
                    {
                        "id": _new_id("il_"),
                        "object": "line_item",
                        "amount": i["price"]["unit_amount"] * i["quantity"],
                        "currency": i["price"]["currency"],
                        "invoice": invoice_id,
                        "parent": {
                            "type": "subscription_item_details",
                            "subscription_item_details": {
                                "subscription": subscription["id"],
                                "subscription_item": i["id"],
                            },
                        },
                        "period": {
                            "start": i["current_period_start"],
                            "end": i["current_period_end"],
                        },
                        "pricing": {
                            "type": "price_details",
                            "price_details": {
                                "price": i["price"]["id"],
                                "product": i["price"]["product"],
                            },
                        },
                        "quantity": i["quantity"],
                    }
                    for i in items
                ],
                "has_more": False,
                "url": f"/v1/invoices/{invoice_id}/lines",
            },
            "livemode": False,
            "metadata": {},
            "next_payment_attempt": None,
            "number": None,
            # API 2026-10-28: the subscription is no longer a top-level field of the invoice.
            "parent": {
                "type": "subscription_details",
                "quote_details": None,
                "subscription_details": {
                    "metadata": dict(subscription["metadata"]),
                    "subscription": subscription["id"],
                    "subscription_proration_date": None,
                },
            },
            "period_start": items[0]["current_period_start"],
            "period_end": items[0]["current_period_end"],
            "status": "open",
            "status_transitions": {"finalized_at": now, "paid_at": None, "voided_at": None},
            "subtotal": amount,
            "total": amount,
        }
        if status == "paid":
            invoice["attempt_count"] = 1
            self._mark_paid(invoice)
        self._state.invoices[invoice_id] = invoice
        subscription["latest_invoice"] = invoice_id
        return invoice

    def _mark_paid(self, invoice: dict[str, Any]) -> None:
        invoice.update(
            status="paid",
            attempted=True,
            amount_paid=invoice["amount_due"],
            amount_remaining=0,
            next_payment_attempt=None,
        )
        invoice["status_transitions"]["paid_at"] = int(self.clock())

    def _open_invoice(self, subscription_id: str) -> dict[str, Any] | None:
        for invoice in reversed(self._state.invoices.values()):
            details = invoice["parent"]["subscription_details"]
            if details["subscription"] == subscription_id and invoice["status"] == "open":
                return invoice
        return None

    def _advance_period(self, subscription: dict[str, Any]) -> None:
        for item in subscription["items"]["data"]:
            item["current_period_start"] = item["current_period_end"]
            item["current_period_end"] += _MONTH

    def _live_subscription(self, subscription_id: str) -> dict[str, Any]:
        subscription = self._state.subscriptions.get(subscription_id)
        if subscription is None:
            raise KeyError(f"no subscription {subscription_id}")
        if subscription["status"] == "canceled":
            raise ValueError(f"subscription {subscription_id} is canceled")
        return subscription

    def _cancel(self, subscription: dict[str, Any]) -> dict[str, Any]:
        now = int(self.clock())
        subscription.update(status="canceled", canceled_at=now, ended_at=now)
        open_invoice = self._open_invoice(subscription["id"])
        if open_invoice is not None:
            open_invoice.update(status="void", next_payment_attempt=None)
        return self.make_event("customer.subscription.deleted", subscription)

    # ---- HTTP: the API -------------------------------------------------------------------------

    async def _api(self, request: Request) -> Response:
        method = request.method
        path = "/v1/" + request.path_params["path"]
        raw = (await request.body()).decode("utf-8", "replace") if method == "POST" else ""
        idempotency_key = request.headers.get("idempotency-key")
        request_id = _new_id("req_", 14)
        headers = {"Request-Id": request_id, "Stripe-Version": API_VERSION}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        try:
            pairs = parse_qsl(
                raw if method == "POST" else request.url.query, keep_blank_values=True
            )
            params = parse_form(pairs)
        except _APIError as exc:
            return JSONResponse(exc.body, exc.status, headers=headers)
        with self._lock:
            self.requests.append(
                RecordedRequest(
                    method,
                    path,
                    params,
                    idempotency_key,
                    request.headers.get("stripe-version"),
                    request.headers.get("authorization"),
                )
            )
            status, body, pending, replayed = self._handle(request, method, path, params)
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        task = BackgroundTask(self._deliver_all, pending) if pending else None
        return JSONResponse(body, status, headers=headers, background=task)

    def _handle(
        self, request: Request, method: str, path: str, params: dict[str, Any]
    ) -> tuple[int, dict[str, Any], list[dict[str, Any]], bool]:
        """(status, body, events to deliver, replayed). Runs with the lock held."""
        try:
            self._authenticate(request.headers.get("authorization"))
            version = request.headers.get("stripe-version")
            if version is not None and version != API_VERSION:
                raise _APIError(
                    400, f"This fake speaks only API version {API_VERSION}, not {version}."
                )
            fault = self._take_fault(method, path)
            if fault is not None and not fault.lost_response:
                return (*self._fault_reply(fault.status), [], False)
            key = request.headers.get("idempotency-key") if method == "POST" else None
            if key is not None:
                saved = self._idempotency.get(key)
                if saved is not None:
                    if saved.method != method or saved.path != path or saved.params != params:
                        raise _APIError(
                            400,
                            "Keys for idempotent requests can only be used with the same "
                            "parameters they were first used with. Try using a key other than "
                            f"'{key}' if you meant to execute a different request.",
                            type="idempotency_error",
                        )
                    if fault is not None:
                        return (*self._fault_reply(fault.status), [], False)
                    return saved.status, copy.deepcopy(saved.body), [], True
            events_before = len(self.events)
            status, body = self._route(method, path, params)
            pending = [copy.deepcopy(e) for e in self.events[events_before:]]
            # Stripe saves the result of a request that executed; one refused while validating
            # its parameters (raised before this point) is not saved.
            if key is not None:
                self._idempotency[key] = _Idempotent(
                    method, path, params, status, copy.deepcopy(body)
                )
            if fault is not None:  # lost response: executed, but the caller sees an error
                return (*self._fault_reply(fault.status), pending, False)
            return status, body, pending, False
        except _APIError as exc:
            return exc.status, exc.body, [], False

    def _authenticate(self, authorization: str | None) -> None:
        if not authorization:
            raise _APIError(
                401,
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                "YOUR_SECRET_KEY').",
            )
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            key.encode(), self.secret_key.encode()
        ):
            raise _APIError(
                401, f"Invalid API Key provided: {_mask_key(key)}", code="api_key_invalid"
            )

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.matches(method, path):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    @staticmethod
    def _fault_reply(status: int) -> tuple[int, dict[str, Any]]:
        if status == 429:
            error = _APIError(429, "Request rate limit exceeded.", code="rate_limit")
        elif status == 409:
            error = _APIError(
                409,
                "This object cannot be accessed right now because another "
                "API request or Stripe process is currently accessing it.",
                code="lock_timeout",
            )
        elif status >= 500:
            error = _APIError(status, "An unknown error occurred", type="api_error")
        else:
            error = _APIError(status, "Injected failure.")
        return error.status, error.body

    def _route(self, method: str, path: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        parts = path.strip("/").split("/")[1:]  # drop "v1"
        match (method, parts):
            case ("POST", ["customers"]):
                return 200, self._create_customer(params)
            case ("GET", ["customers", customer_id]):
                return 200, self._get("customer", self._state.customers, customer_id, params)
            case ("GET", ["prices", price_id]):
                return 200, self._get("price", self._state.prices, price_id, params)
            case ("POST", ["checkout", "sessions"]):
                return 200, self._create_session(params)
            case ("GET", ["checkout", "sessions", session_id]):
                return 200, self._get("checkout.session", self._state.sessions, session_id, params)
            case ("POST", ["checkout", "sessions", session_id, "expire"]):
                return 200, self._expire_session(session_id, params)
            case ("GET", ["subscriptions", sub_id]):
                return 200, self._get("subscription", self._state.subscriptions, sub_id, params)
            case ("POST", ["subscriptions", sub_id]):
                return 200, self._update_subscription(sub_id, params)
            case ("DELETE", ["subscriptions", sub_id]):
                return 200, self._delete_subscription(sub_id, params)
            case ("GET", ["invoices", invoice_id]):
                return 200, self._get("invoice", self._state.invoices, invoice_id, params)
        raise _APIError(
            404,
            f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs "
            "or we can help at https://support.stripe.com/.",
        )

    # Which fields of which objects can be expanded, and from which table.
    _EXPANDABLE: Mapping[str, Mapping[str, str]] = {
        "checkout.session": {
            "customer": "customers",
            "subscription": "subscriptions",
            "invoice": "invoices",
        },
        "subscription": {"customer": "customers", "latest_invoice": "invoices"},
        "invoice": {"customer": "customers"},
    }

    def _get(
        self, kind: str, table: dict[str, dict[str, Any]], object_id: str, params: dict[str, Any]
    ) -> dict[str, Any]:
        _only(params, {"expand"})
        found = table.get(object_id)
        if found is None:
            raise _missing(kind, object_id)
        result = copy.deepcopy(found)
        expand = params.get("expand", [])
        if not isinstance(expand, list):
            raise _APIError(400, "Invalid array", param="expand")
        for name in expand:
            source = self._EXPANDABLE.get(kind, {}).get(name)
            if source is None:
                raise _APIError(400, f"This property cannot be expanded ({name}).", param="expand")
            value = result.get(name)
            if isinstance(value, str):
                result[name] = copy.deepcopy(getattr(self._state, source)[value])
        return result

    def _create_customer(self, params: dict[str, Any]) -> dict[str, Any]:
        _only(params, {"email", "name", "description", "metadata", "expand"})
        customer = self._new_customer(
            params.get("email"), params.get("name"), _metadata(params.get("metadata"), "metadata")
        )
        customer["description"] = params.get("description")
        return copy.deepcopy(customer)

    def _create_session(self, params: dict[str, Any]) -> dict[str, Any]:
        _only(
            params,
            {
                "mode", "line_items", "success_url", "cancel_url", "client_reference_id",
                "customer", "customer_email", "metadata", "subscription_data", "expand",
                "expires_at", "allow_promotion_codes", "billing_address_collection", "locale",
            },
        )  # fmt: skip
        mode = params.get("mode")
        if mode is None:
            raise _APIError(
                400, "Missing required param: mode.", code="parameter_missing", param="mode"
            )
        if mode != "subscription":
            raise _APIError(400, f"This fake supports only mode=subscription, not {mode}.",
                            param="mode")  # fmt: skip
        line_items = self._line_items(params.get("line_items"))
        success_url = _url(params.get("success_url"), "success_url", required=True)
        cancel_url = _url(params.get("cancel_url"), "cancel_url", required=False)
        customer = params.get("customer")
        customer_email = params.get("customer_email")
        if customer is not None and customer_email is not None:
            raise _APIError(
                400,
                "You may only specify one of these parameters: customer, customer_email.",
                param="customer_email",
            )
        if customer is not None and customer not in self._state.customers:
            raise _missing("customer", customer, "customer")
        reference = params.get("client_reference_id")
        if reference is not None and not 1 <= len(reference) <= 200:
            raise _APIError(400, "Invalid client_reference_id", param="client_reference_id")
        subscription_data = params.get("subscription_data") or {}
        if not isinstance(subscription_data, dict):
            raise _APIError(400, "Invalid object", param="subscription_data")
        _only(subscription_data, {"metadata", "description"}, "subscription_data")
        sub_metadata = _metadata(subscription_data.get("metadata"), "subscription_data[metadata]")
        now = int(self.clock())
        session_id = _new_id("cs_test_", 58)
        amount = sum(
            self._state.prices[i["price"]]["unit_amount"] * i["quantity"] for i in line_items
        )
        session: dict[str, Any] = {
            "id": session_id,
            "object": "checkout.session",
            "amount_subtotal": amount,
            "amount_total": amount,
            "billing_address_collection": None,
            "cancel_url": cancel_url,
            "client_reference_id": reference,
            "created": now,
            "currency": self._state.prices[line_items[0]["price"]]["currency"],
            "customer": customer,
            "customer_details": None,
            "customer_email": customer_email,
            "expires_at": now + _DAY,
            "invoice": None,
            "livemode": False,
            "locale": None,
            "metadata": _metadata(params.get("metadata"), "metadata"),
            "mode": "subscription",
            "payment_intent": None,
            "payment_method_types": ["card"],
            "payment_status": "unpaid",
            "status": "open",
            "subscription": None,
            "success_url": success_url,
            "ui_mode": "hosted",
            "url": f"{self._url}/pay/{session_id}",
        }
        self._state.sessions[session_id] = session
        self._state.session_extra[session_id] = _SessionExtra(line_items, sub_metadata)
        return copy.deepcopy(session)

    def _line_items(self, value: Any) -> list[dict[str, Any]]:
        if not isinstance(value, list) or not value:
            raise _APIError(
                400,
                "Missing required param: line_items.",
                code="parameter_missing",
                param="line_items",
            )
        items = []
        for index, item in enumerate(value):
            where = f"line_items[{index}]"
            if not isinstance(item, dict):
                raise _APIError(400, "Invalid object", param=where)
            _only(item, {"price", "quantity"}, where)
            price = item.get("price")
            if price is None:
                raise _APIError(400, f"Missing required param: {where}[price].",
                                code="parameter_missing", param=f"{where}[price]")  # fmt: skip
            if price not in self._state.prices:
                raise _missing("price", price, f"{where}[price]")
            quantity = item.get("quantity", "1")
            if not quantity.isdigit() or int(quantity) < 1:
                raise _APIError(400, "Invalid positive integer", param=f"{where}[quantity]")
            items.append({"price": price, "quantity": int(quantity)})
        return items

    def _update_subscription(self, sub_id: str, params: dict[str, Any]) -> dict[str, Any]:
        _only(params, {"cancel_at_period_end", "metadata", "expand"})
        subscription = self._state.subscriptions.get(sub_id)
        if subscription is None:
            raise _missing("subscription", sub_id)
        if subscription["status"] == "canceled" and "cancel_at_period_end" in params:
            raise _APIError(
                400,
                "A canceled subscription can only update its cancellation_details and metadata.",
            )
        previous: dict[str, Any] = {}
        if "cancel_at_period_end" in params:
            at_end = _bool(params["cancel_at_period_end"], "cancel_at_period_end")
            if at_end != subscription["cancel_at_period_end"]:
                previous = {
                    "cancel_at_period_end": subscription["cancel_at_period_end"],
                    "cancel_at": subscription["cancel_at"],
                }
            subscription["cancel_at_period_end"] = at_end
            period_end = subscription["items"]["data"][0]["current_period_end"]
            subscription["cancel_at"] = period_end if at_end else None
        if "metadata" in params:
            subscription["metadata"].update(_metadata(params["metadata"], "metadata"))
        if previous:  # Stripe sends the event only when something changed
            self.make_event(
                "customer.subscription.updated", subscription, previous_attributes=previous
            )
        return copy.deepcopy(subscription)

    def _expire_session(self, session_id: str, params: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/checkout/sessions/{id}/expire``: only an open session can be expired;
        the customer can no longer pay it and ``checkout.session.expired`` is sent."""
        _only(params, {"expand"})
        session = self._state.sessions.get(session_id)
        if session is None:
            raise _missing("checkout.session", session_id, "session")
        if session["status"] != "open":
            raise _APIError(
                400,
                'Only Checkout Sessions with a status in ["open"] can be expired. This '
                f'Checkout Session has a status of "{session["status"]}".',
            )
        session.update(status="expired", url=None)
        self.make_event("checkout.session.expired", session)
        return copy.deepcopy(session)

    def _delete_subscription(self, sub_id: str, params: dict[str, Any]) -> dict[str, Any]:
        _only(params, {"invoice_now", "prorate", "cancellation_details", "expand"})
        subscription = self._state.subscriptions.get(sub_id)
        # Stripe answers a second cancel with 404 even though GET still returns the canceled
        # subscription (stripe/stripe-go#1887).
        if subscription is None or subscription["status"] == "canceled":
            raise _missing("subscription", sub_id)
        self._cancel(subscription)
        return copy.deepcopy(subscription)

    # ---- HTTP: the hosted checkout page --------------------------------------------------------

    async def _pay_page(self, request: Request) -> Response:
        session_id = request.path_params["session_id"]
        with self._lock:
            session = copy.deepcopy(self._state.sessions.get(session_id))
        if session is None:
            return HTMLResponse("<h1>No such checkout session</h1>", 404)
        if request.method == "GET":
            state = html.escape(str(session["status"]))
            button = (
                f'<form method="post"><button type="submit" id="pay">Pay '
                f"{session['amount_total'] / 100:.2f} {session['currency'].upper()}"
                "</button></form>"
                if session["status"] == "open"
                else ""
            )
            return HTMLResponse(f"<h1>Fake Stripe Checkout</h1><p>{state}</p>{button}")
        try:
            events = self.complete_checkout(session_id)
        except ValueError as exc:
            return HTMLResponse(f"<h1>{html.escape(str(exc))}</h1>", 409)
        target = str(session["success_url"]).replace("{CHECKOUT_SESSION_ID}", session_id)
        return RedirectResponse(target, 303, background=BackgroundTask(self._deliver_all, events))

    async def _deliver_all(self, events: list[dict[str, Any]]) -> None:
        if not self.webhook_url:
            return
        async with httpx.AsyncClient(timeout=10.0) as client:
            for event in events:
                try:
                    response = await adeliver(
                        event, self.webhook_url, self.webhook_secret, client=client
                    )
                    delivery = _Delivery(event["id"], response.status_code)
                except httpx.HTTPError as exc:
                    delivery = _Delivery(event["id"], None, repr(exc))
                with self._lock:
                    self.deliveries.append(delivery)


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    """A running fake Stripe API on loopback, fresh for each test."""
    with FakeStripe() as fake:
        yield fake
