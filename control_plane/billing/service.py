"""Billing effects: the one idempotent fulfil step and the dunning state changes.

Stripe's webhook and ``/checkout/confirm`` both call :func:`fulfil`; every effect runs with the
instance row locked (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE``
serialises writers anyway) and changes status only through ``lifecycle.transition``, so a
confirm racing the webhook gives one ``provisioning`` transition and one event.

Out-of-order delivery (stripe/stripe-cli#418, pay-rails/pay#282): ``instance_subscriptions
.last_event_at`` holds the ``created`` time of the newest invoice/subscription event applied, and
an older event is recorded but has no effect, so a late ``invoice.payment_failed`` never undoes a
newer ``invoice.paid``. ``customer.subscription.deleted`` is terminal and always wins.

Calls to Stripe never run inside a database transaction; effects that need one after the commit
(cancelling a subscription nobody can use) are returned as :class:`Outcome` for the caller.

Billing sits above instances (issue 16): it drives the instance lifecycle from here, and the
instance operations call back only through the port they define,
:class:`control_plane.instances.payments.Payments`, which :class:`Billing` implements.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.billing import limits
from control_plane.billing.catalog import Catalog, default_catalog, load_catalog
from control_plane.billing.limits import CheckoutCache
from control_plane.billing.models import InstanceSubscription, StripeEvent
from control_plane.billing.stripe_errors import BillingError, BillingNotFound, BillingRejected
from control_plane.billing.stripe_events import (
    BillingEvent,
    CheckoutCompleted,
    Ignored,
    InvoicePaid,
    InvoicePaymentFailed,
    SubscriptionDeleted,
    SubscriptionUpdated,
)
from control_plane.billing.stripe_gateway import (
    CheckoutSession,
    CheckoutSessionState,
    StripeGateway,
    SubscriptionState,
)
from control_plane.errors import (
    BillingDisabled,
    CheckoutMismatch,
    ControlPlaneError,
    InvalidInstanceState,
    PaymentProviderError,
    PaymentProviderUnavailable,
)
from control_plane.instances.lifecycle import (
    cancel_now,
    lock_instance,
    record_event,
    transition,
    update_fields,
    wake,
)
from control_plane.instances.models import CloudInstance, InstanceStatus
from control_plane.instances.payments import BILLING_DISABLED_NOTE
from control_plane.services import Wakeup
from control_plane.settings import ENV_PREFIX, Settings, SettingsError
from control_plane.throttle import Throttle

logger = logging.getLogger("control_plane.billing")

S = InstanceStatus
#: ``instance_subscriptions.status`` values we write (Stripe's subscription statuses).
SUB_INCOMPLETE, SUB_ACTIVE, SUB_PAST_DUE, SUB_CANCELED = (
    "incomplete",
    "active",
    "past_due",
    "canceled",
)
_ENDED = frozenset({S.CANCELED, S.DESTROYING, S.DESTROYED})


@dataclass
class Billing:
    """The catalog and (when Stripe is configured) the gateway, built once at start-up.

    Implements the instances' :class:`~control_plane.instances.payments.Payments` port: the
    methods below are what the instance operations may ask of billing."""

    settings: Settings
    catalog: Catalog
    gateway: StripeGateway | None
    #: Checkout Session states for ``/checkout/confirm`` (see ``billing/limits.py``).
    checkout_cache: CheckoutCache = field(default_factory=CheckoutCache)

    @property
    def enabled(self) -> bool:
        return self.gateway is not None

    async def aclose(self) -> None:
        if self.gateway is not None:
            await self.gateway.aclose()

    # -- the Payments port -----------------------------------------------------------------------

    async def limit_requests(self, throttle: Throttle, user_id: str) -> None:
        await limits.limit(throttle, self.settings, limits.BILLING_POLICY, user_id)

    async def limit_checkouts(self, throttle: Throttle, user_id: str) -> None:
        await limits.limit(throttle, self.settings, limits.CHECKOUT_POLICY, user_id)

    async def open_subscription(
        self, db: AsyncSession, *, instance_id: str, owner_id: str, now: datetime
    ) -> None:
        db.add(
            InstanceSubscription(
                instance_id=instance_id,
                status=SUB_INCOMPLETE,
                stripe_customer_id=await _known_customer(db, owner_id),
                updated_at=now,
            )
        )

    async def start_checkout(
        self, db: AsyncSession, instance: CloudInstance, *, email: str
    ) -> CheckoutSession:
        customer = await db.scalar(
            select(InstanceSubscription.stripe_customer_id).where(
                InstanceSubscription.instance_id == instance.id
            )
        )
        await db.commit()  # no transaction (nor SQLite write lock) held across the Stripe call
        return await start_checkout(self, instance, email=email, customer_id=customer)

    async def confirm_checkout(
        self,
        db: AsyncSession,
        instance: CloudInstance,
        *,
        session_id: str,
        clock: Callable[[], datetime],
        wakeup: Wakeup | None,
    ) -> bool:
        return await confirm_checkout(
            db, self, instance, session_id=session_id, clock=clock, wakeup=wakeup
        )

    async def cancel(
        self, db: AsyncSession, instance: CloudInstance, *, clock: Callable[[], datetime]
    ) -> None:
        await cancel_instance(db, self, instance, clock=clock)


def build_billing(settings: Settings) -> Billing:
    """The catalog from ``CATALOG_PATH`` (the built-in one in development) and the gateway when
    both Stripe secrets are set. Production settings already refuse a missing Stripe key."""
    if settings.catalog_path is not None:
        catalog = load_catalog(settings.catalog_path)
    elif settings.development:
        catalog = default_catalog()
    else:
        raise SettingsError(
            f"{ENV_PREFIX}CATALOG_PATH",
            "is required in production (the built-in catalog's Stripe prices are placeholders)",
        )
    unknown = sorted(
        r for r in settings.region_capacities if r != "*" and not catalog.has_region(r)
    )
    if unknown:  # a typo would otherwise leave that region without its limit
        raise SettingsError(
            f"{ENV_PREFIX}ROOMS_PER_REGION",
            f"names regions the catalog does not have: {', '.join(unknown)}",
        )
    secret, webhook = settings.stripe_secret_key, settings.stripe_webhook_secret
    if (secret is None) != (webhook is None):
        missing = "STRIPE_WEBHOOK_SECRET" if webhook is None else "STRIPE_SECRET_KEY"
        raise SettingsError(f"{ENV_PREFIX}{missing}", "is required when the other is set")
    gateway = None
    if secret is not None and webhook is not None:
        try:
            gateway = StripeGateway(
                secret.get_secret_value(),
                webhook_secret=webhook.get_secret_value(),
                api_base=settings.stripe_api_base,
            )
        except ValueError as exc:  # names the option, never its value
            raise SettingsError(f"{ENV_PREFIX}STRIPE_SECRET_KEY", str(exc)) from None
    elif not settings.development:  # pragma: no cover - check_production refuses this first
        raise SettingsError(f"{ENV_PREFIX}STRIPE_SECRET_KEY", "is required in production")
    else:
        logger.warning("Stripe is not configured: %s, checkout is skipped", BILLING_DISABLED_NOTE)
    return Billing(settings, catalog, gateway)


def translate(exc: BillingError) -> ControlPlaneError:
    """A gateway error as the error the client sees (details stay in the log)."""
    if isinstance(exc, BillingRejected):
        logger.error("stripe refused a request: %s", exc)
        return PaymentProviderError()
    logger.warning("stripe unavailable: %s", exc)
    return PaymentProviderUnavailable()


def checkout_idempotency_key(instance_id: str) -> str:
    return f"quoroom-checkout-{instance_id}"


def cancel_idempotency_key(subscription_id: str) -> str:
    return f"quoroom-cancel-{subscription_id}"


async def start_checkout(
    billing: Billing,
    instance: CloudInstance,
    *,
    email: str,
    customer_id: str | None,
) -> CheckoutSession:
    """The instance's Checkout Session. The idempotency key is derived from the instance id,
    so a repeated call (double click, retry) returns the same session."""
    assert billing.gateway is not None
    settings = billing.settings
    tier = billing.catalog.tier(instance.tier)
    try:
        return await billing.gateway.create_checkout_session(
            instance_id=instance.id,
            user_id=instance.owner_id,
            email=email,
            customer_id=customer_id,
            price_id=tier.stripe_price_id,
            success_url=(
                f"{settings.public_url}/cloud/new/provisioning?instance={instance.id}"
                "&session_id={CHECKOUT_SESSION_ID}"
            ),
            cancel_url=f"{settings.public_url}/cloud/new?canceled={instance.id}",
            idempotency_key=checkout_idempotency_key(instance.id),
        )
    except BillingError as exc:
        raise translate(exc) from exc


async def retrieve_checkout(
    billing: Billing, session_id: str, now: datetime
) -> CheckoutSessionState:
    """The session's state, from the short cache when it is fresh (``billing/limits.py``)."""
    gateway = billing.gateway
    assert gateway is not None
    try:
        return await billing.checkout_cache.fetch(
            session_id, now, gateway.retrieve_checkout_session
        )
    except BillingNotFound as exc:
        raise CheckoutMismatch() from exc
    except BillingError as exc:
        raise translate(exc) from exc


def expire_idempotency_key(session_id: str) -> str:
    return f"quoroom-expire-{session_id}"


async def expire_checkout(billing: Billing, session_id: str) -> None:
    """Expire an abandoned Checkout Session at Stripe so it can no longer be paid.

    Stripe unreachable: raises (the caller changes nothing). A session that is no longer open
    (paid meanwhile, or expired already) is refused by Stripe and left as it is: a payment that
    got through is fulfilled by its webhook, which cancels the subscription of an instance that
    was canceled meanwhile."""
    billing.checkout_cache.forget(session_id)
    if billing.gateway is None:
        return
    try:
        await billing.gateway.expire_checkout_session(
            session_id, idempotency_key=expire_idempotency_key(session_id)
        )
    except BillingRejected as exc:
        logger.info("checkout session %s not expired (no longer open): %s", session_id, exc)
    except BillingError as exc:
        raise translate(exc) from exc


async def set_cancel_at_period_end(
    billing: Billing, subscription_id: str, at_period_end: bool
) -> SubscriptionState:
    """Schedule or undo the subscription's end at its period end. A fresh idempotency key per
    call (the SDK's retries reuse it): a reused key would replay an earlier toggle."""
    assert billing.gateway is not None
    try:
        return await billing.gateway.set_cancel_at_period_end(
            subscription_id,
            at_period_end,
            idempotency_key=f"quoroom-period-end-{subscription_id}-{uuid.uuid4().hex}",
        )
    except BillingError as exc:
        raise translate(exc) from exc


async def cancel_subscription(billing: Billing, subscription_id: str) -> None:
    """Cancel at Stripe now (idempotent: an already canceled subscription is fine)."""
    if billing.gateway is None:
        return
    try:
        await billing.gateway.cancel_subscription(
            subscription_id, idempotency_key=cancel_idempotency_key(subscription_id)
        )
    except BillingError as exc:
        raise translate(exc) from exc


# -- effects -------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What an effect did, and what the caller must do after committing."""

    effect: str
    wake_worker: bool = False
    #: Subscriptions paid for an instance that cannot use them (canceled meanwhile, or a second
    #: checkout): cancel them at Stripe after the commit.
    cancel_subscriptions: list[str] = field(default_factory=list)


async def record_stripe_event(db: AsyncSession, event: BillingEvent, now: datetime) -> bool:
    """Record the event id in the caller's transaction; ``False`` if it was processed before."""
    kind = event.type if isinstance(event, Ignored) else _event_type(event)
    try:
        async with db.begin_nested():
            await db.execute(
                insert(StripeEvent).values(id=event.event_id, type=kind[:64], received_at=now)
            )
    except IntegrityError:
        return False
    return True


def _event_type(event: BillingEvent) -> str:
    return {
        CheckoutCompleted: "checkout.session.completed",
        InvoicePaid: "invoice.paid",
        InvoicePaymentFailed: "invoice.payment_failed",
        SubscriptionDeleted: "customer.subscription.deleted",
        SubscriptionUpdated: "customer.subscription.updated",
    }.get(type(event), "unknown")


async def _subscription_row(db: AsyncSession, instance_id: str) -> InstanceSubscription | None:
    return await db.scalar(
        select(InstanceSubscription)
        .where(InstanceSubscription.instance_id == instance_id)
        .execution_options(populate_existing=True)
    )


async def fulfil(
    db: AsyncSession,
    settings: Settings,
    *,
    instance_id: str,
    subscription_id: str | None,
    customer_id: str | None,
    user_id: str | None,
    event_at: datetime | None,
    now: datetime,
    source: str,
) -> Outcome:
    """A paid checkout: store the Stripe ids and move ``draft|awaiting_payment → provisioning``.

    Idempotent: a second call (the webhook after confirm, a duplicate, ``invoice.paid`` for the
    first invoice) finds the instance past ``awaiting_payment`` and changes nothing.
    """
    instance = await lock_instance(db, instance_id)
    if instance is None:
        return Outcome("unknown instance")
    if user_id is not None and user_id != instance.owner_id:
        await record_event(
            db,
            instance.id,
            "billing",
            f"payment ignored: it names another user ({source})",
            now=now,
        )
        return Outcome("user mismatch")
    sub = await _subscription_row(db, instance.id)
    if sub is None:
        sub = InstanceSubscription(instance_id=instance.id, status=SUB_INCOMPLETE, updated_at=now)
        db.add(sub)
    if (
        subscription_id is not None
        and sub.stripe_subscription_id is not None
        and sub.stripe_subscription_id != subscription_id
    ):
        # A second checkout for the same instance was paid: keep the first, refund the rest.
        await record_event(
            db, instance.id, "billing", f"a second subscription was paid; canceling it ({source})",
            now=now,
        )  # fmt: skip
        return Outcome("second subscription", cancel_subscriptions=[subscription_id])
    if subscription_id is not None:
        sub.stripe_subscription_id = subscription_id
    if customer_id is not None:
        sub.stripe_customer_id = customer_id
    if sub.status == SUB_INCOMPLETE:
        sub.status = SUB_ACTIVE
    if event_at is not None and (sub.last_event_at is None or event_at > sub.last_event_at):
        sub.last_event_at = event_at
    sub.updated_at = now
    await db.flush()
    status = S(instance.status)
    if status in (S.DRAFT, S.AWAITING_PAYMENT):
        if sub.status == SUB_CANCELED:  # deleted before the completion arrived
            return Outcome("subscription already ended")
        await transition(
            db,
            instance.id,
            expected=(status,),
            to=S.PROVISIONING,
            message=f"payment received ({source})",
            kind="billing",
            now=now,
            run_after=now,
            attempts=0,
            error=None,
            step=None,
        )
        return Outcome("fulfilled", wake_worker=True)
    if status in _ENDED and subscription_id is not None and sub.status != SUB_CANCELED:
        await record_event(
            db, instance.id, "billing",
            f"payment received for a canceled instance; canceling the subscription ({source})",
            now=now,
        )  # fmt: skip
        sub.status = SUB_CANCELED
        return Outcome("canceled instance", cancel_subscriptions=[subscription_id])
    return Outcome("already fulfilled")


async def _find_for_subscription(
    db: AsyncSession, subscription_id: str, instance_id: str | None
) -> tuple[CloudInstance, InstanceSubscription | None] | None:
    """The instance an invoice/subscription event is about: by the stored subscription id,
    else by the instance id in the subscription's metadata (before fulfil stored the id)."""
    owner = await db.scalar(
        select(InstanceSubscription.instance_id).where(
            InstanceSubscription.stripe_subscription_id == subscription_id
        )
    )
    if owner is None:
        if instance_id is None:
            return None
        owner = instance_id
    instance = await lock_instance(db, owner)
    if instance is None:
        return None
    sub = await _subscription_row(db, instance.id)
    if sub is not None and sub.stripe_subscription_id not in (None, subscription_id):
        return None  # another subscription of this instance (e.g. a refunded duplicate)
    return instance, sub


def _is_stale(sub: InstanceSubscription | None, created: datetime, *, failure: bool) -> bool:
    if sub is None or sub.last_event_at is None:
        return False
    if created < sub.last_event_at:
        return True
    # Same second: a payment failure never undoes a success it cannot be ordered against.
    return failure and created == sub.last_event_at and sub.status == SUB_ACTIVE


async def _ensure_sub(
    db: AsyncSession,
    instance: CloudInstance,
    sub: InstanceSubscription | None,
    subscription_id: str,
    customer_id: str | None,
    created: datetime,
    now: datetime,
) -> InstanceSubscription:
    if sub is None:
        sub = InstanceSubscription(instance_id=instance.id, status=SUB_INCOMPLETE)
        db.add(sub)
    if sub.stripe_subscription_id is None:
        sub.stripe_subscription_id = subscription_id
    if sub.stripe_customer_id is None and customer_id is not None:
        sub.stripe_customer_id = customer_id
    if sub.last_event_at is None or created > sub.last_event_at:
        sub.last_event_at = created
    sub.updated_at = now
    return sub


async def _payment_failed(
    db: AsyncSession, settings: Settings, event: InvoicePaymentFailed, now: datetime
) -> Outcome:
    found = await _find_for_subscription(db, event.subscription_id, event.instance_id)
    if found is None:
        return Outcome("unknown subscription")
    instance, sub = found
    if _is_stale(sub, event.created, failure=True):
        await record_event(db, instance.id, "billing", "older payment failure ignored", now=now)
        return Outcome("stale")
    if sub is not None and sub.status == SUB_CANCELED:
        return Outcome("subscription ended")
    sub = await _ensure_sub(
        db, instance, sub, event.subscription_id, event.customer_id, event.created, now
    )
    sub.status = SUB_PAST_DUE
    status = S(instance.status)
    attempt = f"attempt {event.attempt_count}" if event.attempt_count else "first attempt"
    if status == S.RUNNING:
        grace = now + timedelta(hours=settings.grace_period_hours)
        sub.grace_until = grace
        await db.flush()
        await transition(
            db,
            instance.id,
            expected=(S.RUNNING,),
            to=S.PAST_DUE,
            message=(
                f"payment failed ({attempt}); the Room keeps running until "
                f"{grace:%Y-%m-%d %H:%M} UTC"
            ),
            kind="billing",
            now=now,
            run_after=grace,  # the worker suspends it then, unless paid meanwhile
        )
        return Outcome("past due")
    await db.flush()
    await record_event(db, instance.id, "billing", f"payment failed ({attempt})", now=now)
    return Outcome("payment failed recorded")


async def _paid(db: AsyncSession, settings: Settings, event: InvoicePaid, now: datetime) -> Outcome:
    found = await _find_for_subscription(db, event.subscription_id, event.instance_id)
    if found is None:
        return Outcome("unknown subscription")
    instance, sub = found
    if _is_stale(sub, event.created, failure=False):
        await record_event(db, instance.id, "billing", "older payment ignored", now=now)
        return Outcome("stale")
    if sub is not None and sub.status == SUB_CANCELED:
        return Outcome("subscription ended")
    status = S(instance.status)
    if status in (S.DRAFT, S.AWAITING_PAYMENT):
        # The first invoice can arrive before checkout.session.completed: it proves payment
        # for a subscription that carries our instance id (set by us, signed by Stripe).
        return await fulfil(
            db,
            settings,
            instance_id=instance.id,
            subscription_id=event.subscription_id,
            customer_id=event.customer_id,
            user_id=None,
            event_at=event.created,
            now=now,
            source="invoice.paid",
        )
    sub = await _ensure_sub(
        db, instance, sub, event.subscription_id, event.customer_id, event.created, now
    )
    sub.status = SUB_ACTIVE
    sub.grace_until = None
    await db.flush()
    if status == S.PAST_DUE:
        await transition(
            db,
            instance.id,
            expected=(S.PAST_DUE,),
            to=S.RUNNING,
            message="payment received; back in good standing",
            kind="billing",
            now=now,
            run_after=None,
        )
        return Outcome("resumed")
    if status == S.SUSPENDED:
        # The worker starts the machine and moves suspended → running.
        await update_fields(db, instance.id, status=S.SUSPENDED, run_after=now, attempts=0)
        await record_event(
            db, instance.id, "billing", "payment received; the Room is being started", now=now
        )
        return Outcome("resume requested", wake_worker=True)
    await record_event(db, instance.id, "billing", "invoice paid", now=now)
    return Outcome("paid")


async def _deleted(
    db: AsyncSession, settings: Settings, event: SubscriptionDeleted, now: datetime
) -> Outcome:
    found = await _find_for_subscription(db, event.subscription_id, event.instance_id)
    if found is None:
        return Outcome("unknown subscription")
    instance, sub = found
    sub = await _ensure_sub(
        db, instance, sub, event.subscription_id, event.customer_id, event.created, now
    )
    sub.status = SUB_CANCELED
    sub.grace_until = None
    await db.flush()
    status = S(instance.status)
    if status in _ENDED:
        return Outcome("already canceled")
    await cancel_now(db, settings, instance.id, now=now, message="the subscription ended")
    return Outcome("canceled", wake_worker=True)


def period_end_message(at_period_end: bool, period_end: datetime | None) -> str:
    if not at_period_end:
        return "cancellation at period end undone; the subscription renews"
    when = f" ({period_end:%Y-%m-%d %H:%M} UTC)" if period_end is not None else ""
    return f"the subscription ends at period end{when}; the Room runs until then"


def store_period_end(
    sub: InstanceSubscription,
    *,
    at_period_end: bool,
    period_end: datetime | None,
    seen_at: datetime,
    now: datetime,
) -> bool:
    """Keep a subscription snapshot's flag and period end; ``True`` if the flag changed."""
    changed = sub.cancel_at_period_end != at_period_end
    sub.cancel_at_period_end = at_period_end
    if period_end is not None:
        sub.current_period_end = period_end
    if sub.subscription_updated_at is None or seen_at > sub.subscription_updated_at:
        sub.subscription_updated_at = seen_at
    sub.updated_at = now
    return changed


async def _updated(db: AsyncSession, event: SubscriptionUpdated, now: datetime) -> Outcome:
    """``customer.subscription.updated``: the cancel-at-period-end flag and the period end.
    Ordered by ``subscription_updated_at`` (apart from the invoice events' ordering): an older
    snapshot arriving late never undoes a newer one; the same second, the later delivery wins."""
    found = await _find_for_subscription(db, event.subscription_id, event.instance_id)
    if found is None:
        return Outcome("unknown subscription")
    instance, sub = found
    if sub is None or sub.status == SUB_CANCELED or S(instance.status) in _ENDED:
        return Outcome("subscription ended")
    if sub.subscription_updated_at is not None and event.created < sub.subscription_updated_at:
        return Outcome("stale")
    changed = store_period_end(
        sub,
        at_period_end=event.cancel_at_period_end,
        period_end=event.current_period_end,
        seen_at=event.created,
        now=now,
    )
    await db.flush()
    if changed:
        message = period_end_message(event.cancel_at_period_end, sub.current_period_end)
        await record_event(db, instance.id, "billing", message, now=now)
    return Outcome("period end updated" if changed else "subscription updated")


async def apply_event(
    db: AsyncSession, settings: Settings, event: BillingEvent, now: datetime
) -> Outcome:
    """The effect of one verified, first-seen webhook event, in the caller's transaction."""
    if isinstance(event, CheckoutCompleted):
        if not event.paid:
            found = await lock_instance(db, event.instance_id)
            if found is not None:
                await record_event(
                    db, found.id, "billing", "checkout completed; waiting for the payment", now=now
                )
            return Outcome("awaiting payment")
        return await fulfil(
            db,
            settings,
            instance_id=event.instance_id,
            subscription_id=event.subscription_id,
            customer_id=event.customer_id,
            user_id=event.user_id,
            event_at=event.created,
            now=now,
            source="webhook",
        )
    if isinstance(event, InvoicePaid):
        return await _paid(db, settings, event, now)
    if isinstance(event, InvoicePaymentFailed):
        return await _payment_failed(db, settings, event, now)
    if isinstance(event, SubscriptionDeleted):
        return await _deleted(db, settings, event, now)
    if isinstance(event, SubscriptionUpdated):
        return await _updated(db, event, now)
    return Outcome(f"ignored: {event.reason}")


async def after_commit(billing: Billing, outcome: Outcome, wakeup: Wakeup | None) -> None:
    """The follow-ups of an effect, once its transaction committed. Best effort: a failure is
    logged and left for the reconciler (the subscription ids are stored)."""
    for subscription_id in outcome.cancel_subscriptions:
        try:
            await cancel_subscription(billing, subscription_id)
        except ControlPlaneError:
            logger.error("could not cancel an unusable subscription %s", subscription_id)
    if outcome.wake_worker:
        wake(wakeup)


# -- billing's side of the instance operations (the Payments port) -------------------------------


async def _known_customer(db: AsyncSession, user_id: str) -> str | None:
    """The Stripe customer of this user's earlier subscriptions, so invoices stay together."""
    return await db.scalar(
        select(InstanceSubscription.stripe_customer_id)
        .join(CloudInstance, CloudInstance.id == InstanceSubscription.instance_id)
        .where(
            CloudInstance.owner_id == user_id,
            InstanceSubscription.stripe_customer_id.is_not(None),
        )
        .order_by(InstanceSubscription.updated_at.desc())
        .limit(1)
    )


async def confirm_checkout(
    db: AsyncSession,
    billing: Billing,
    instance: CloudInstance,
    *,
    session_id: str,
    clock: Callable[[], datetime],
    wakeup: Wakeup | None,
) -> bool:
    """Ask Stripe about the checkout and run the webhook's fulfil step (the success page can
    load before ``checkout.session.completed`` arrives). ``False``: not paid yet."""
    await db.commit()  # nothing held across the Stripe call
    state = await retrieve_checkout(billing, session_id, clock())
    if state.instance_id is None or state.instance_id != instance.id:
        raise CheckoutMismatch()
    if not state.paid:
        return False
    outcome = await fulfil(
        db,
        billing.settings,
        instance_id=instance.id,
        subscription_id=state.subscription_id,
        customer_id=state.customer_id,
        user_id=state.metadata.get("user_id"),
        event_at=None,
        now=clock(),
        source="confirm",
    )
    await db.commit()
    await after_commit(billing, outcome, wakeup)
    return True


async def cancel_instance(
    db: AsyncSession, billing: Billing, instance: CloudInstance, *, clock: Callable[[], datetime]
) -> None:
    """Cancel the subscription at Stripe, then ``→ canceled`` (committed). Stripe refusing or
    unreachable raises before anything changes."""
    canceled: set[str] = set()
    subscription_id = await _live_subscription(db, instance.id)
    unpaid_checkout = (
        instance.checkout_session_id
        if S(instance.status) in (S.DRAFT, S.AWAITING_PAYMENT)
        else None
    )
    await db.commit()  # nothing held across the Stripe call
    if unpaid_checkout is not None:
        # The customer must not be able to pay an abandoned checkout (issue 12, item 8). Stripe
        # unreachable: raises, nothing changes; no longer open: the webhook path handles it.
        await expire_checkout(billing, unpaid_checkout)
    if subscription_id is not None:
        await cancel_subscription(billing, subscription_id)  # raises: no change
        canceled.add(subscription_id)
    now = clock()
    locked = await lock_instance(db, instance.id)
    if locked is not None and S(locked.status) not in _ENDED:
        await cancel_now(
            db, billing.settings, instance.id, now=now, message="canceled by the owner"
        )
        sub = await _subscription_row(db, instance.id)
        if sub is not None and sub.stripe_subscription_id in canceled:
            sub.status = SUB_CANCELED
            sub.grace_until = None
            sub.updated_at = now
    late = await _live_subscription(db, instance.id)
    await db.commit()
    if late is not None and late not in canceled:
        # Paid between our read and the cancel: the fulfil step saw it live, so cancel it too.
        outcome = Outcome("late subscription", cancel_subscriptions=[late])
        await after_commit(billing, outcome, None)


async def _live_subscription(db: AsyncSession, instance_id: str) -> str | None:
    return await db.scalar(
        select(InstanceSubscription.stripe_subscription_id).where(
            InstanceSubscription.instance_id == instance_id,
            InstanceSubscription.stripe_subscription_id.is_not(None),
            InstanceSubscription.status != SUB_CANCELED,
        )
    )


# -- the owner's subscription: cancel at period end ----------------------------------------------


@dataclass(frozen=True)
class BillingState:
    enabled: bool
    status: str | None
    cancel_at_period_end: bool
    current_period_end: datetime | None


async def billing_of(db: AsyncSession, billing: Billing, instance: CloudInstance) -> BillingState:
    sub = await _subscription_row(db, instance.id)
    return BillingState(
        enabled=billing.enabled,
        status=sub.status if sub is not None else None,
        cancel_at_period_end=bool(sub.cancel_at_period_end) if sub is not None else False,
        current_period_end=sub.current_period_end if sub is not None else None,
    )


async def change_period_end(
    db: AsyncSession,
    billing: Billing,
    instance: CloudInstance,
    at_period_end: bool,
    *,
    clock: Callable[[], datetime],
) -> BillingState:
    """Schedule (or undo) the end of the instance's subscription at the end of the paid period.
    Stripe first (nothing held across the call); then its answer is stored with the instance
    locked, and an event row says what changed. ``customer.subscription.updated`` stores the
    same, so a change made at Stripe directly (dashboard, portal) shows too."""
    if not billing.enabled:
        raise BillingDisabled()
    sub = await _subscription_row(db, instance.id)
    if (
        S(instance.status) in _ENDED
        or sub is None
        or sub.stripe_subscription_id is None
        or sub.status == SUB_CANCELED
    ):
        raise InvalidInstanceState("this instance has no live subscription to change")
    subscription_id = sub.stripe_subscription_id
    await db.commit()
    state = await set_cancel_at_period_end(billing, subscription_id, at_period_end)
    now = clock()
    await lock_instance(db, instance.id)
    sub = await _subscription_row(db, instance.id)
    if sub is not None and sub.stripe_subscription_id == subscription_id:
        changed = store_period_end(
            sub,
            at_period_end=state.cancel_at_period_end,
            period_end=state.current_period_end,
            seen_at=now,
            now=now,
        )
        await db.flush()
        if changed:
            message = period_end_message(state.cancel_at_period_end, sub.current_period_end)
            await record_event(db, instance.id, "billing", f"{message} (by the owner)", now=now)
    await db.commit()
    return await billing_of(db, billing, instance)
