"""scripts/drill (bench/drills): the quick mode of two cheap drills, the audit that judges them,
and the Fly fake's latency and pause used by the others."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from bench.drills import common, jwks, provisioning, run
from tests.fakes.fly_machines import DEFAULT_TOKEN, FlyMachinesFake

TEST_URL = os.environ.get("QUOROOM_TEST_DATABASE_URL")


def _postgres() -> str | None:
    """The server's admin URL: the suite's PostgreSQL when given, else the local one if it
    answers; ``None`` skips the drills that need it."""
    if TEST_URL and TEST_URL.startswith("postgresql"):
        return make_url(TEST_URL).set(database="postgres").render_as_string(hide_password=False)
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=0.5):
            return common.ADMIN_URL
    except OSError:
        return None


needs_postgres = pytest.mark.skipif(_postgres() is None, reason="no PostgreSQL to make a database")


@pytest.fixture
def admin_url(monkeypatch: pytest.MonkeyPatch) -> str:
    url = _postgres()
    assert url is not None
    monkeypatch.setattr(common, "ADMIN_URL", url)
    return url


async def test_the_jwks_drill_refuses_no_valid_and_accepts_no_invalid_token(
    tmp_path: Path,
) -> None:
    result = await jwks.jwks_outage(True, tmp_path)
    assert result.ok, result.problems
    assert result.figures["valid tokens refused during the hour"] == 0
    assert result.figures["invalid tokens accepted (whole run)"] == 0
    assert result.figures["valid tokens checked during the hour"] == 5 * 360


@needs_postgres
async def test_the_quick_fly_failure_drill_passes(tmp_path: Path, admin_url: str) -> None:
    result = await provisioning.fly_failing(True, tmp_path)
    assert result.ok, result.problems
    assert result.figures["lost"] == result.figures["doubled"] == result.figures["orphans"] == 0
    assert result.figures["status destroyed"] == result.figures["instances"]
    assert [r["call"] for r in result.rows][:3] == [c for c, _, _ in provisioning.QUICK_FAULTS]


@needs_postgres
async def test_the_audit_counts_a_doubled_machine_an_orphan_and_a_lost_instance(
    tmp_path: Path, admin_url: str
) -> None:
    from control_plane.instances.models import CloudInstance

    with FlyMachinesFake() as fake:
        async with common.pg_database("audit") as url:
            settings = common.make_settings(url, fake.url, tmp_path)
            engine, factory = common.engine_and_factory(url)
            provider = common.fly_provider(fake.url)
            try:
                ids = await common.create_instances(factory, settings, 1)
                worker = provisioning.Worker(settings, factory, provider, reconcile=False)
                await provisioning.drive_in_process(
                    worker, factory, ids[:1], rest=frozenset({"running"}), timeout=30
                )
                clean = await common.audit(factory, fake, ids[:1])
                assert clean.ok and clean.by_status == {"running": 1}, clean.problems
                async with factory() as session:
                    inst = await session.get(CloudInstance, ids[0])
                    assert inst is not None and inst.fly_app and inst.volume_id
                # A second machine for the instance (a create that was repeated) …
                async with httpx.AsyncClient(
                    base_url=fake.url, headers={"authorization": f"Bearer {DEFAULT_TOKEN}"}
                ) as client:
                    machine = fake.machines[inst.machine_id or ""]
                    config = {**machine.config, "mounts": []}
                    r = await client.post(
                        f"/v1/apps/{inst.fly_app}/machines", json={"config": config}
                    )
                    assert r.status_code == 200
                    # … and an app nobody owns.
                    r = await client.post(
                        "/v1/apps", json={"name": "qr-nobody", "org_slug": fake.org_slug}
                    )
                    assert r.status_code in (200, 201)
                # Another one never run: still queued, not resting (lost).
                ids += await common.create_instances(factory, settings, 1)
                report = await common.audit(factory, fake, ids)
            finally:
                await provider.aclose()
                await engine.dispose()
    assert (report.lost, report.doubled, report.orphans) == (1, 1, 1), report.problems
    assert not report.ok


async def test_the_fly_fake_holds_a_call_before_or_after_its_action() -> None:
    with FlyMachinesFake() as fake:
        fake.set_latency("Apps_list", 0.05)
        async with httpx.AsyncClient(
            base_url=fake.url, headers={"authorization": f"Bearer {DEFAULT_TOKEN}"}, timeout=10
        ) as client:
            body = {"name": "qr-held", "org_slug": fake.org_slug}
            before = fake.pause_next("Apps_create", after=False)
            call = asyncio.create_task(client.post("/v1/apps", json=body))
            assert await asyncio.to_thread(before.reached.wait, 5)
            assert "qr-held" not in fake.apps
            before.release()
            assert (await call).status_code == 503
            assert "qr-held" not in fake.apps  # it never got through

            after = fake.pause_next("Apps_create", after=True)
            call = asyncio.create_task(client.post("/v1/apps", json=body))
            assert await asyncio.to_thread(after.reached.wait, 5)
            assert "qr-held" in fake.apps  # done, the reply held
            after.release()
            assert (await call).status_code in (200, 201)

            loop = asyncio.get_running_loop()
            started = loop.time()
            assert (await client.get("/v1/apps", params={"org_slug": fake.org_slug})).is_success
            assert loop.time() - started >= 0.05


def test_the_report_names_each_drill_and_its_verdict() -> None:
    ok = provisioning.DrillResult("a", "Drill A", True, {"lost": 0, "doubled": 0}, seconds=1)
    missed = provisioning.DrillResult(
        "b", "Drill B", False, {"lost": 1}, rows=[{"x": 1}], problems=["inst: failed"]
    )
    text = run.render([ok, missed], quick=True, plot=None)
    assert "| a | pass | 0 | 0 |" in text
    assert "| b | **MISSED** | 1 |" in text
    assert "- `inst: failed`" in text and "| x |" in text
    assert run.main(["--list"]) == 0
