"""The worker inside the app process (``quoroom-cloud dev``): a fulfilled payment wakes it at
once, the local provider starts a real runtime, and shutting the app down stops it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest

from control_plane.app import create_app
from control_plane.billing.service import fulfil
from control_plane.db import transaction, utcnow
from control_plane.instances.lifecycle import wake
from control_plane.instances.models import InstanceStatus
from control_plane.provisioning.local import _pid_running
from control_plane.settings import Settings

from .conftest import FakeClock, event_kinds, get_instance, make_instance

pytestmark = pytest.mark.slow


async def test_a_fulfilled_payment_wakes_the_in_process_worker_and_the_room_runs(
    make_settings: Callable[..., Settings], factory, tmp_path
):
    settings = make_settings(
        run_worker=True,
        provider="local",
        public_url="http://127.0.0.1:9",
        var_dir=tmp_path / "var",
        worker_poll_seconds=60,  # only the wake-up can make it prompt
        reconcile_seconds=3600,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        assert app.state.services.core.wakeup is not None
        iid = await make_instance(
            factory, FakeClock(), status=InstanceStatus.AWAITING_PAYMENT, run_after=None
        )
        await asyncio.sleep(0.2)  # the worker's loops are idle, waiting for the next poll
        started = time.monotonic()
        async with transaction(factory) as db:
            outcome = await fulfil(
                db, settings, instance_id=iid, subscription_id="sub_1", customer_id="cus_1",
                user_id=None, event_at=None, now=utcnow(), source="test",
            )  # fmt: skip
        assert outcome.wake_worker
        wake(app.state.services.core.wakeup)
        for _ in range(600):
            inst = await get_instance(factory, iid)
            if inst.status != "provisioning":
                break
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - started
        assert inst.status == "running", (inst.error, await event_kinds(factory, iid))
        assert elapsed < 20
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{inst.url}/healthz")).status_code == 200
        pids = _runtime_pids(settings)
        assert len(pids) == 1 and _pid_running(pids[0])
    # Shutting the app down (Ctrl-C on `dev`) stopped the runtime it started.
    assert not any(_pid_running(p) for p in pids)


def _runtime_pids(settings: Settings) -> list[int]:
    import json

    out = []
    for state in (settings.var_dir / "instances").glob("*/runtime.json"):
        pid = json.loads(state.read_text()).get("pid")
        if isinstance(pid, int):
            out.append(pid)
    return out
