"""``GET /api/cloud/catalog`` and ``POST /api/billing/stripe/webhook``.

The webhook verifies the signature on the raw body (a parsed and re-serialised body would not
verify, stripe/stripe-node#341), records the event id in ``stripe_events`` in the same transaction
as its effect (a duplicate delivery is acknowledged with no effect), and acknowledges events it
does not act on so Stripe stops redelivering them.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request

from control_plane.billing import service
from control_plane.billing.schemas import BillingOut, BillingPatchIn, CatalogOut, RegionOut, TierOut
from control_plane.billing.service import Billing, BillingState
from control_plane.billing.stripe_errors import WebhookPayloadError, WebhookSignatureError
from control_plane.billing.stripe_events import CheckoutCompleted
from control_plane.deps import Now, SessionDep
from control_plane.errors import BillingDisabled, InvalidWebhookPayload, InvalidWebhookSignature
from control_plane.instances.access import OwnedInstance
from control_plane.metrics import metrics_of
from control_plane.schemas import ErrorOut
from control_plane.services import services_of
from control_plane.throttle import Throttle

logger = logging.getLogger("control_plane.billing")

router = APIRouter(tags=["billing"])


def _billing(request: Request) -> Billing:
    return services_of(request).get(Billing)


@router.get("/api/cloud/catalog", summary="Tiers and regions (public)")
async def catalog(request: Request) -> CatalogOut:
    billing = _billing(request)
    return CatalogOut(
        tiers=[
            TierOut(
                id=t.id,
                name=t.name,
                monthlyPriceCents=t.monthly_price_cents,
                currency=t.currency,
                cpus=t.cpus,
                cpuKind=t.cpu_kind,
                memoryMb=t.memory_mb,
                volumeGb=t.volume_gb,
            )
            for t in billing.catalog.tiers
        ],
        regions=[RegionOut(id=r.id, name=r.name) for r in billing.catalog.regions],
        billingEnabled=billing.enabled,
    )


@router.post(
    "/api/billing/stripe/webhook",
    summary="Stripe webhook endpoint (signed; each event's effect happens once)",
    responses={400: {"model": ErrorOut}, 409: {"model": ErrorOut}},
    include_in_schema=True,
)
async def stripe_webhook(request: Request, db: SessionDep, now: Now) -> dict[str, Any]:
    billing = _billing(request)
    if billing.gateway is None:
        raise BillingDisabled()
    raw = await request.body()
    metrics = metrics_of(request)
    try:
        event = billing.gateway.parse_webhook(raw, request.headers.get("stripe-signature"))
    except WebhookSignatureError as exc:
        metrics.webhook("invalid_signature")
        raise InvalidWebhookSignature() from exc
    except WebhookPayloadError as exc:
        metrics.webhook("invalid_payload")
        logger.warning("stripe webhook with an unusable payload: %s", exc)
        raise InvalidWebhookPayload() from exc
    # Lag: the event's creation at Stripe to now (the processing clock); retries show up here.
    lag = (now - event.created).total_seconds()
    if isinstance(event, CheckoutCompleted):
        billing.checkout_cache.forget(event.session_id)  # a cached "open" is over
    try:
        if not await service.record_stripe_event(db, event, now):
            await db.rollback()
            metrics.webhook("duplicate", lag)
            return {"ok": True, "duplicate": True}
        outcome = await service.apply_event(db, billing.settings, event, now)
        await db.commit()
    except Exception:
        metrics.webhook("failed", lag)  # Stripe redelivers; the alert watches the rate
        raise
    metrics.webhook("applied", lag)
    logger.info(
        "stripe event applied",
        extra={"stripe_event_id": event.event_id, "billing_effect": outcome.effect},
    )
    await service.after_commit(billing, outcome, services_of(request).core.wakeup)
    return {"ok": True}


# -- the owner's subscription --------------------------------------------------------------------

_OWNER_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (401, 403, 404, 409, 422, 429, 502, 503)
}


def _billing_out(state: BillingState) -> BillingOut:
    return BillingOut(
        billingEnabled=state.enabled,
        status=state.status,
        cancelAtPeriodEnd=state.cancel_at_period_end,
        currentPeriodEnd=state.current_period_end,
    )


@router.get(
    "/api/cloud/instances/{instance_id}/billing",
    summary="The instance's subscription (owner only)",
    responses=_OWNER_ERRORS,
)
async def instance_billing(access: OwnedInstance, request: Request, db: SessionDep) -> BillingOut:
    state = await service.billing_of(db, _billing(request), access.instance)
    await db.commit()
    return _billing_out(state)


@router.patch(
    "/api/cloud/instances/{instance_id}/billing",
    summary="Cancel the subscription at the end of the paid period, or undo that (owner only)",
    responses=_OWNER_ERRORS,
)
async def change_instance_billing(
    body: BillingPatchIn, access: OwnedInstance, request: Request, db: SessionDep
) -> BillingOut:
    services = services_of(request)
    billing = services.get(Billing)
    if billing.enabled:
        await billing.limit_requests(services.get(Throttle), access.user.id)
    state = await service.change_period_end(
        db, billing, access.instance, body.cancelAtPeriodEnd, clock=services.core.clock
    )
    return _billing_out(state)
