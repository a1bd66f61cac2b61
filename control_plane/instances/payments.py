"""What the instance operations need from billing: a port, implemented by billing (issue 16).

Billing sits above instances. Its webhook effects drive the instance lifecycle (``lifecycle.py``)
and its tables point at ``cloud_instances``, so billing imports instances and never the other way
round. The instance operations (create, confirm, cancel) reach billing only through
:class:`Payments`: ``control_plane.billing.service.Billing`` implements it, and the app's start-up
(``control_plane/billing/setup.py``) injects it as ``InstancesContext.billing``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.instances.models import CloudInstance
from control_plane.services import Wakeup
from control_plane.throttle import Throttle

#: Said in the log and in the event of an instance provisioned without payment (development).
BILLING_DISABLED_NOTE = "billing disabled (development)"


class Offers(Protocol):
    """The tiers and regions on sale (billing's catalog)."""

    def has_tier(self, tier_id: str) -> bool: ...

    def has_region(self, region_id: str) -> bool: ...


class CheckoutLink(Protocol):
    """A started checkout: its session id and the page the customer pays on."""

    @property
    def id(self) -> str: ...

    @property
    def url(self) -> str: ...


class Payments(Protocol):
    """Billing's side of the instance operations. Each method that calls Stripe commits the
    caller's transaction first: no transaction is held across a call to Stripe."""

    @property
    def enabled(self) -> bool:
        """``False`` in development without Stripe: instances provision without payment."""
        ...

    @property
    def catalog(self) -> Offers: ...

    async def limit_requests(self, throttle: Throttle, user_id: str) -> None:
        """Count a request that may call Stripe against the user's budget (raises when over)."""
        ...

    async def limit_checkouts(self, throttle: Throttle, user_id: str) -> None:
        """Count a new Checkout Session against the user's budget (raises when over)."""
        ...

    async def open_subscription(
        self, db: AsyncSession, *, instance_id: str, owner_id: str, now: datetime
    ) -> None:
        """Add the new instance's (incomplete) subscription row, in the caller's transaction."""
        ...

    async def start_checkout(
        self, db: AsyncSession, instance: CloudInstance, *, email: str
    ) -> CheckoutLink:
        """The instance's Checkout Session (the same one when repeated)."""
        ...

    async def confirm_checkout(
        self,
        db: AsyncSession,
        instance: CloudInstance,
        *,
        session_id: str,
        clock: Callable[[], datetime],
        wakeup: Wakeup | None,
    ) -> bool:
        """Ask Stripe about the checkout and, if it is paid, fulfil it (committed); ``False``
        if it is not paid yet."""
        ...

    async def cancel(
        self, db: AsyncSession, instance: CloudInstance, *, clock: Callable[[], datetime]
    ) -> None:
        """End the instance's payments at Stripe (expire an unpaid checkout, cancel the
        subscription; raises and changes nothing when Stripe refuses), then move the instance
        ``→ canceled`` and record its subscription as ended (committed). Repeating it is harmless.
        """
        ...
