"""Wiring for the app factory: billing and the instances' context that uses it, as services.

Here in billing, not in instances: billing sits above instances, and the instances' context gets
billing injected as its ``Payments`` port (control_plane/instances/payments.py)."""

from __future__ import annotations

from control_plane.billing.service import Billing
from control_plane.instances.members import InviteLinks
from control_plane.instances.service import InstancesContext
from control_plane.services import Services


def provide_billing(services: Services, billing: Billing) -> None:
    """Register ``billing``, the invitation links and the instances' context (with ``billing`` as
    its payments port and the core's worker wake-up) in ``services``."""
    core = services.core
    services.provide(billing)
    services.provide(InviteLinks(core.settings))
    services.provide(
        InstancesContext(
            settings=core.settings,
            billing=billing,
            factory=core.session_factory,
            clock=core.clock,
            wakeup=core.wakeup,
        )
    )
