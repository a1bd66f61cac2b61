"""A lease the database refused to release is retried, not left to expire (found by the
PostgreSQL restart drill, ``scripts/drill postgres-restarted``: with the default 15-minute lease,
every instance whose release failed during a restart waited a quarter of an hour)."""

from __future__ import annotations

from typing import Any

import pytest

from control_plane.provisioning import worker as worker_module

from .conftest import Factory, get_instance, make_instance


class _Flaky:
    """A session factory whose next ``fail`` sessions cannot be opened (the server restarting)."""

    def __init__(self, factory: Factory) -> None:
        self._factory = factory
        self.fail = 0
        self.refused = 0

    def __call__(self, *args: Any, **kw: Any) -> Any:
        if self.fail > 0:
            self.fail -= 1
            self.refused += 1
            raise ConnectionRefusedError(111, "Connect call failed")
        return self._factory(*args, **kw)


@pytest.fixture
def no_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "RELEASE_RETRY_DELAYS", (0.0, 0.0, 0.0))


async def test_a_release_refused_while_the_database_restarts_is_retried(
    make_worker, factory: Factory, clock, no_delays: None
) -> None:
    flaky = _Flaky(factory)
    worker = make_worker(object())
    worker.factory = flaky
    iid = await make_instance(factory, clock)
    job = await worker.claim()
    assert job is not None and job.inst.id == iid
    flaky.fail = 2

    await worker._release(iid)

    assert flaky.refused == 2
    inst = await get_instance(factory, iid)
    assert (inst.lease_owner, inst.lease_until) == (None, None)


async def test_a_release_that_keeps_failing_gives_up_and_leaves_the_lease_to_expire(
    make_worker, factory: Factory, clock, no_delays: None, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = _Flaky(factory)
    worker = make_worker(object())
    worker.factory = flaky
    iid = await make_instance(factory, clock)
    assert await worker.claim() is not None
    flaky.fail = 10

    await worker._release(iid)  # does not raise

    assert flaky.refused == 4  # the first try and one per delay
    inst = await get_instance(factory, iid)
    assert inst.lease_owner == worker.owner
    assert "could not release the lease" in caplog.text
