"""Wiring for the app factory: what the instances and billing routes need on ``app.state``.

Here in billing, not in instances: billing sits above instances, and the instances' context gets
billing injected as its ``Payments`` port (control_plane/instances/payments.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.billing.service import Billing, build_billing
from control_plane.instances.members import InviteLinks
from control_plane.instances.service import InstancesContext
from control_plane.settings import Settings


def start_billing(
    app: FastAPI,
    settings: Settings,
    factory: async_sessionmaker[AsyncSession],
    clock: Callable[[], datetime],
) -> Billing:
    """Build the catalog and Stripe gateway, and the instances' context that uses them, and put
    them on ``app.state`` (``catalog``, ``stripe_gateway``, ``billing``, ``instances``,
    ``invite_links``). The caller closes the returned object.

    ``app.state.worker_wakeup`` (an ``asyncio.Event``-like object), when an in-process worker
    registers one, is poked whenever there is new work for it.
    """
    billing = build_billing(settings)
    app.state.billing = billing
    app.state.catalog = billing.catalog
    app.state.stripe_gateway = billing.gateway
    app.state.invite_links = InviteLinks(settings)
    app.state.instances = InstancesContext(
        settings=settings,
        billing=billing,
        factory=factory,
        clock=clock,
        wakeup=lambda: getattr(app.state, "worker_wakeup", None),
    )
    return billing
