"""Worker-side metrics (issue 14, item 1): provider call latency and errors by step, provisioning
outcomes, retries, reconciler actions, and the fleet gauges read from the database at scrape time
(served on a real loopback listener, as ``quoroom-cloud worker`` does with METRICS_PORT)."""

from __future__ import annotations

from datetime import timedelta

from control_plane.instances.models import InstanceStatus
from control_plane.metrics import Metrics, start_listener
from control_plane.provisioning.reconciler import Reconciler
from control_plane.provisioning.worker import fleet_gauges
from tests.control_plane.metrics_helpers import free_port, scrape
from tests.fakes.fly_machines import FlyMachinesFake

from .conftest import drive, make_instance

S = InstanceStatus


async def test_a_provisioning_run_records_provider_steps_errors_and_outcome(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock, prov_settings
):
    metrics = Metrics()
    credentials = {"openai": "sk-secret"}
    worker = make_worker(fly_provider, metrics=metrics, credentials=lambda inst: credentials)
    iid = await make_instance(factory, clock)
    fly_machines_fake.fail_next("Secrets_update", 502, times=1)

    assert (await drive(worker, clock, factory, iid)).status == "running"

    value = metrics.registry.get_sample_value
    for step in ("app", "secrets", "volume", "machine", "healthy"):
        count = value(
            "quoroom_cp_provider_call_duration_seconds_count", {"step": step, "outcome": "ok"}
        )
        assert count == 1, step
    assert (
        value(
            "quoroom_cp_provider_call_duration_seconds_count",
            {"step": "secrets", "outcome": "error"},
        )
        == 1
    )
    assert value("quoroom_cp_provider_errors_total", {"step": "secrets", "retryable": "true"}) == 1
    assert value("quoroom_cp_worker_retries_total", {"status": "provisioning"}) == 1
    assert value("quoroom_cp_provisioning_finished_total", {"outcome": "running"}) == 1

    # A reconciler pass, counted as the worker's loop counts it.
    worker.record_reconcile(
        await Reconciler(prov_settings, factory, worker.provider, clock=clock).run_once()
    )
    assert value("quoroom_cp_reconciler_passes_total", {"outcome": "ok"}) == 1
    assert (
        value(
            "quoroom_cp_provider_call_duration_seconds_count",
            {"step": "list_owned", "outcome": "ok"},
        )
        == 1
    )
    worker.record_reconcile(None)
    assert value("quoroom_cp_reconciler_passes_total", {"outcome": "error"}) == 1


async def test_a_provisioning_that_runs_out_of_attempts_counts_as_failed(
    make_worker, fly_provider, fly_machines_fake: FlyMachinesFake, factory, clock
):
    metrics = Metrics()
    worker = make_worker(fly_provider, metrics=metrics)
    iid = await make_instance(factory, clock)
    fly_machines_fake.fail_next("Volumes_create", 503, times=10)

    assert (await drive(worker, clock, factory, iid)).status == "failed"

    value = metrics.registry.get_sample_value
    assert value("quoroom_cp_provisioning_finished_total", {"outcome": "failed"}) == 1
    assert value("quoroom_cp_provider_errors_total", {"step": "volume", "retryable": "true"}) == 4


async def test_queue_depth_and_lease_age_are_read_from_the_database_at_scrape_time(
    factory, clock, prov_settings
):
    due = await make_instance(factory, clock, run_after=clock.now - timedelta(seconds=30))
    await make_instance(factory, clock, status=S.RUNNING, run_after=None)
    # A lease taken 100 s ago (lease_until = taken + WORKER_LEASE_SECONDS) and never renewed.
    lease = timedelta(seconds=prov_settings.worker_lease_seconds)
    await make_instance(
        factory,
        clock,
        lease_owner="w1",
        lease_until=clock.now - timedelta(seconds=100) + lease,
    )

    gauges = await fleet_gauges(factory, clock.now, prov_settings.worker_lease_seconds)
    assert gauges.instances_by_status["provisioning"] == 2
    assert gauges.instances_by_status["running"] == 1
    assert gauges.instances_by_status["destroyed"] == 0
    assert (gauges.queue_depth, gauges.oldest_due_seconds) == (1, 30.0)
    assert (gauges.leases_held, gauges.oldest_lease_age_seconds) == (1, 100.0)
    assert due

    # Served over a real loopback socket, read at each scrape.
    metrics = Metrics()

    async def fleet():
        return await fleet_gauges(factory, clock.now, prov_settings.worker_lease_seconds)

    listener = start_listener(metrics, free_port(), fleet)
    try:
        scraped = await scrape(listener.port)
        assert scraped.value("quoroom_cp_worker_queue_depth") == 1
        assert scraped.value("quoroom_cp_worker_lease_oldest_age_seconds") == 100
        clock.advance(60)
        scraped = await scrape(listener.port)
        assert scraped.value("quoroom_cp_worker_queue_oldest_due_seconds") == 90
    finally:
        await listener.aclose()
