"""The reconciler checks running instances' machines several at a time, bounded: one by one, a
pass over 10,000 Rooms at Fly's round trip took longer than the interval between passes
(``scripts/drill reconciler-scale``)."""

from __future__ import annotations

import asyncio

import pytest

from control_plane.instances.models import InstanceStatus
from control_plane.provisioning import reconciler as reconciler_module
from control_plane.provisioning.provider import MachineInfo
from control_plane.provisioning.reconciler import Reconciler

from .conftest import get_instance, make_instance


class _SlowProvider:
    """Answers each machine lookup after a delay, counting the calls in flight."""

    name = "slow"

    def __init__(self, gone: set[str]) -> None:
        self.gone = gone
        self.in_flight = 0
        self.most = 0
        self.calls = 0

    async def list_owned(self) -> list[object]:
        return []

    async def machine(self, app: str, machine_id: str) -> MachineInfo | None:
        self.calls += 1
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(0.02)
        finally:
            self.in_flight -= 1
        return None if machine_id in self.gone else MachineInfo(machine_id, "started")


async def test_running_instances_are_checked_concurrently_within_the_bound(
    prov_settings, factory, clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconciler_module, "CHECK_CONCURRENCY", 4)
    ids = [
        await make_instance(
            factory,
            clock,
            status=InstanceStatus.RUNNING,
            run_after=None,
            fly_app=f"qr-app-{n}",
            machine_id=f"m{n}",
            volume_id=f"v{n}",
        )
        for n in range(12)
    ]
    provider = _SlowProvider(gone={"m3", "m7"})

    report = await Reconciler(prov_settings, factory, provider, clock=clock).run_once()  # type: ignore[arg-type]

    assert provider.calls == 12
    assert provider.most == 4  # concurrent, and never more than the bound
    assert sorted(report.reprovisioned) == sorted([ids[3], ids[7]])
    assert report.errors == []
    for n, iid in enumerate(ids):
        inst = await get_instance(factory, iid)
        expected = "provisioning" if n in (3, 7) else "running"
        assert inst.status == expected
