"""The idle wait: a claim loop sleeps until it could claim something, never spins."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from control_plane.provisioning.worker import Worker
from tests.control_plane.conftest import FakeClock
from tests.control_plane.provisioning.conftest import Factory, make_instance


async def test_a_due_instance_leased_by_another_loop_is_not_due_before_its_lease_ends(
    factory: Factory, clock: FakeClock, make_worker: Callable[..., Worker]
) -> None:
    # Due since a minute ago, but another claim loop holds it for five more minutes: waking for
    # its run_after would make every idle loop spin while it is being provisioned.
    lease_end = clock.now + timedelta(minutes=5)
    await make_instance(
        factory,
        clock,
        run_after=clock.now - timedelta(minutes=1),
        lease_owner="other-loop",
        lease_until=lease_end,
    )
    worker = make_worker(provider=None)
    assert await worker.next_due() == lease_end
    assert await worker.claim() is None


async def test_the_earliest_claimable_work_sets_the_wait(
    factory: Factory, clock: FakeClock, make_worker: Callable[..., Worker]
) -> None:
    soon = clock.now + timedelta(seconds=30)
    await make_instance(factory, clock, run_after=soon)
    await make_instance(
        factory,
        clock,
        run_after=clock.now,
        lease_owner="other-loop",
        lease_until=clock.now + timedelta(minutes=5),
    )
    worker: Any = make_worker(provider=None)
    assert await worker.next_due() == soon


async def test_an_expired_lease_makes_the_instance_due_again(
    factory: Factory, clock: FakeClock, make_worker: Callable[..., Worker]
) -> None:
    due = clock.now - timedelta(minutes=10)
    await make_instance(
        factory,
        clock,
        run_after=due,
        lease_owner="crashed-loop",
        lease_until=clock.now - timedelta(seconds=1),
    )
    worker = make_worker(provider=None)
    assert await worker.next_due() == due
