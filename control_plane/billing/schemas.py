"""Bodies of the billing endpoints: the public catalog (``/api/cloud/catalog``) and the owner's
subscription (``/api/cloud/instances/{id}/billing``)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, StrictBool


class BillingOut(BaseModel):
    """The instance's subscription as last seen from Stripe (never Stripe ids)."""

    billingEnabled: bool
    status: str | None  # Stripe's subscription status: incomplete, active, past_due, canceled
    cancelAtPeriodEnd: bool
    currentPeriodEnd: datetime | None  # when the paid period ends (renews or ends)


class BillingPatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: ``true``: end the subscription (and the Room) when the paid period ends; ``false``: undo.
    cancelAtPeriodEnd: StrictBool


class TierOut(BaseModel):
    id: str
    name: str
    monthlyPriceCents: int
    currency: str
    cpus: int
    cpuKind: str
    memoryMb: int
    volumeGb: int


class RegionOut(BaseModel):
    id: str
    name: str


class CatalogOut(BaseModel):
    tiers: list[TierOut]
    regions: list[RegionOut]
    billingEnabled: bool
