"""The request id travels control plane → worker → provider calls (issue 14, item 2): the worker
takes it up from the event that queued its work, stores it with the events it writes and sends it
to Fly with every call (the fake Machines API records what it got)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from control_plane.instances.lifecycle import record_event
from control_plane.instances.models import InstanceEvent, InstanceStatus
from control_plane.logs import REQUEST_ID, bound
from tests.fakes.fly_machines import FlyMachinesFake

from .conftest import drive, make_instance


async def test_the_worker_takes_the_id_up_and_sends_it_to_fly(
    make_worker: Any,
    fly_provider: Any,
    fly_machines_fake: FlyMachinesFake,
    factory: Any,
    clock: Any,
) -> None:
    worker = make_worker(fly_provider)
    iid = await make_instance(factory, clock, status=InstanceStatus.PROVISIONING)
    async with factory() as db:
        with bound("paid-9"):  # the webhook request that queued the provisioning
            await record_event(db, iid, "transition", "paid")
        await db.commit()
    inst = await drive(worker, clock, factory, iid)
    assert inst.status == "running"
    calls = fly_machines_fake.calls
    assert calls and {c.request_id for c in calls} == {"paid-9"}
    async with factory() as db:
        data = (
            (await db.execute(select(InstanceEvent.data).where(InstanceEvent.instance_id == iid)))
            .scalars()
            .all()
        )
    assert len(data) > 1 and {d["request_id"] for d in data} == {"paid-9"}
    assert REQUEST_ID.get() is None
