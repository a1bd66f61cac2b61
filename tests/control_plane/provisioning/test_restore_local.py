"""Backups that restore, with the local provider for real (issue 14, item 3): a Room with data
written through its runtime's API → canceled (the worker stops it and copies its data folder) →
``ops restore`` queues the restore → the worker copies the snapshot back and starts the Room →
the same data is served, with the whole story on the instance's event trail."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from control_plane.db import transaction
from control_plane.instances.lifecycle import cancel_now
from control_plane.provisioning.local import LocalProvider
from control_plane.provisioning.restore import restore_main
from control_plane.settings import Settings
from tests.helpers.jwks_server import JWKSServer
from tests.helpers.tokens import TokenFactory

from .conftest import drive, event_kinds, get_instance, make_instance

pytestmark = pytest.mark.slow


@pytest.fixture
def local_settings(
    make_settings: Callable[..., Settings], tmp_path: Path, jwks_server: JWKSServer
) -> Settings:
    # The issuer is the JWKS server: the runtime fetches its keys from there.
    return make_settings(
        provider="local", public_url=jwks_server.issuer, var_dir=tmp_path / "var", retention_days=7
    )


@pytest.fixture
async def local(local_settings: Settings) -> AsyncIterator[LocalProvider]:
    provider = LocalProvider.from_settings(local_settings, health_timeout=30.0)
    yield provider
    await provider.aclose()


async def test_a_canceled_room_is_restored_from_its_snapshot_and_serves_the_same_data(
    make_worker, local, local_settings, factory, clock, jwks_server, capsys
):
    iid = await make_instance(factory, clock)
    tokens = TokenFactory(issuer=jwks_server.issuer, instance_id=iid)
    jwks_server.jwks = tokens.jwks()
    worker = make_worker(local, settings=local_settings)
    inst = await drive(worker, clock, factory, iid)
    assert inst.status == "running", (inst.error, await event_kinds(factory, iid))

    def owner(url: str) -> dict[str, str]:
        token = tokens.mint(role="owner", sub=inst.owner_id)
        return {"Authorization": f"Bearer {token}", "Origin": url}

    # -- a Room with data, written through the running runtime's API ---------------------------
    async with httpx.AsyncClient(base_url=inst.url, timeout=10.0, trust_env=False) as room:
        r = await room.post(
            "/api/rooms", json={"name": "Kept across a restore"}, headers=owner(inst.url)
        )
        assert r.status_code == 201, r.text
        room_id = r.json()["id"]
        r = await room.get(f"/api/rooms/{room_id}", headers=owner(inst.url))
        assert r.status_code == 200, r.text
        before = r.json()

    # -- canceled: the worker stops the runtime and snapshots its data folder ----------------
    async with transaction(factory) as db:
        await cancel_now(db, local_settings, iid, now=clock.now, message="canceled (test)")
    inst = await drive(worker, clock, factory, iid, until=frozenset({"destroying"}))
    assert inst.status == "destroying" and inst.snapshot_id, await event_kinds(factory, iid)
    snapshot_dir = local_settings.var_dir / "snapshots" / inst.snapshot_id
    assert room_id in json.loads((snapshot_dir / "room.json").read_text())["rooms"]
    assert [s.id for s in await local.list_snapshots(inst.fly_app)] == [inst.snapshot_id]
    with pytest.raises(httpx.TransportError):  # the Room is down
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            await client.get(f"{inst.url}/healthz")
    # Whatever happened to the live folder since, the snapshot is what comes back.
    live = local_settings.var_dir / "instances" / iid / "data" / "room.json"
    live.write_text("{}")

    # -- ops restore: queued for the worker (the newest snapshot), which runs it --------------
    assert await restore_main(local_settings, iid, provider=local, clock=clock) == 0
    assert f"from snapshot {inst.snapshot_id}" in capsys.readouterr().out
    queued = await get_instance(factory, iid)
    assert (queued.status, queued.destroy_after) == ("provisioning", None)
    assert (queued.step or "").startswith("restore:")
    inst = await drive(worker, clock, factory, iid)
    assert inst.status == "running", (inst.error, await event_kinds(factory, iid))
    assert inst.snapshot_id is None  # the next cancel snapshots the restored data again

    # -- the same data served ----------------------------------------------------------------
    async with httpx.AsyncClient(base_url=inst.url, timeout=10.0, trust_env=False) as room:
        r = await room.get(f"/api/rooms/{room_id}", headers=owner(inst.url))
        assert r.status_code == 200, r.text
        assert r.json() == before

    # The replaced folder became a snapshot (a restore can be undone), newest of the two.
    snapshots = [s.id for s in await local.list_snapshots(inst.fly_app)]
    assert len(snapshots) == 2 and snapshots[0] == snapshot_dir.name
    replaced = local_settings.var_dir / "snapshots" / snapshots[1] / "room.json"
    assert replaced.read_text() == "{}"

    # The event trail tells it: requested by the operator, volume restored, running again.
    trail = await event_kinds(factory, iid)
    kinds = [kind for kind, _ in trail]
    at = kinds.index("restore_requested")
    assert kinds[at:].count("restore") == 1, trail
    assert trail[-1][1].startswith("running at "), trail

    # Running fine now: a second restore is refused, naming why.
    assert await restore_main(local_settings, iid, provider=local, clock=clock) == 1
    assert "is running fine" in capsys.readouterr().err
