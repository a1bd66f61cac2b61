"""An instance whose checkout was never paid stops holding a quota slot: the reconciler cancels it
once its Checkout Session has expired, and the worker winds it down to destroyed."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from control_plane.instances.models import InstanceStatus
from control_plane.provisioning.fly import FlyProvider
from control_plane.provisioning.reconciler import Reconciler
from control_plane.provisioning.worker import Worker
from control_plane.settings import Settings
from tests.control_plane.conftest import FakeClock
from tests.control_plane.provisioning.conftest import (
    Factory,
    assert_no_orphans,
    drive,
    event_kinds,
    get_instance,
    make_instance,
)
from tests.fakes.fly_machines import FlyMachinesFake


async def test_an_unpaid_checkout_is_canceled_after_it_expired_and_a_recent_one_is_kept(
    factory: Factory,
    clock: FakeClock,
    prov_settings: Settings,
    fly_provider: FlyProvider,
    fly_machines_fake: FlyMachinesFake,
    make_worker: Callable[..., Worker],
):
    stale = await make_instance(
        factory,
        clock,
        status=InstanceStatus.AWAITING_PAYMENT,
        run_after=None,
        created_at=clock.now - timedelta(hours=26),
    )
    fresh = await make_instance(
        factory,
        clock,
        status=InstanceStatus.AWAITING_PAYMENT,
        run_after=None,
        created_at=clock.now - timedelta(hours=1),
    )

    report = await Reconciler(prov_settings, factory, fly_provider, clock=clock).run_once()

    assert report.abandoned == [stale]
    assert report.changed
    assert (await get_instance(factory, fresh)).status == "awaiting_payment"
    inst = await get_instance(factory, stale)
    assert inst.status == "canceled"
    assert ("billing", "checkout abandoned: no payment within 25 h") in await event_kinds(
        factory, stale
    )
    # Nothing was ever created on the provider: the worker winds it down at once.
    inst = await drive(make_worker(fly_provider), clock, factory, stale)
    assert inst.status == "destroyed"
    await assert_no_orphans(fly_machines_fake, factory)


async def test_a_second_pass_changes_nothing(
    factory: Factory, clock: FakeClock, prov_settings: Settings, fly_provider: FlyProvider
):
    await make_instance(
        factory,
        clock,
        status=InstanceStatus.AWAITING_PAYMENT,
        run_after=None,
        created_at=clock.now - timedelta(hours=30),
    )
    reconciler = Reconciler(prov_settings, factory, fly_provider, clock=clock)
    assert len((await reconciler.run_once()).abandoned) == 1
    assert (await reconciler.run_once()).abandoned == []
