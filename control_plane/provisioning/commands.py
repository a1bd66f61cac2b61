"""``quoroom-cloud worker``, ``quoroom-cloud ops update-image IMAGE`` and ``quoroom-cloud ops
restore INSTANCE [--snapshot ID]`` (registered in ``control_plane.cli``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Mapping
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.metrics import FleetGauges, Metrics, MetricsListener, start_listener
from control_plane.runtime_kinds import DEFAULT_RUNTIME_KIND, RUNTIME_KINDS
from control_plane.settings import Settings, get_settings

__all__ = ["configure_ops", "configure_worker", "restore", "update_image", "worker_main"]

logger = logging.getLogger(__name__)


# -- worker -------------------------------------------------------------------------------------


def configure_worker(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--once",
        action="store_true",
        help="reconcile, process the work that is due now, then exit (for a scheduler)",
    )
    parser.set_defaults(handler=_worker)


def _worker(args: argparse.Namespace) -> int:
    return asyncio.run(worker_main(get_settings(), once=args.once))


async def worker_main(settings: Settings, *, once: bool = False) -> int:
    """Run the worker (and the reconciler) until SIGINT/SIGTERM; ``once``: one pass."""
    from control_plane.db import create_engine, create_session_factory
    from control_plane.provisioning.reconciler import Reconciler
    from control_plane.provisioning.runner import WorkerRunner

    engine = create_engine(settings.resolved_database_url)
    listener: MetricsListener | None = None
    try:
        metrics = Metrics() if settings.metrics_port is not None and not once else None
        runner = WorkerRunner(settings, create_session_factory(engine), metrics=metrics)
        if metrics is not None:
            listener = _metrics_listener(settings, metrics, runner.worker.factory)
        if once:
            try:
                await Reconciler(settings, runner.worker.factory, runner.provider).run_once()
                count = await runner.worker.run_until_idle()
            finally:
                await runner.provider.aclose()
            print(f"processed {count} instance(s)")
            return 0
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # not on Windows
                loop.add_signal_handler(signum, runner.stop)
        logger.info(
            "worker %s running (provider %s, %d claim loop(s))",
            runner.worker.owner,
            settings.provider,
            settings.worker_concurrency,
        )
        await runner.run()
        return 0
    finally:
        if listener is not None:
            await listener.aclose()
        await engine.dispose()


def _metrics_listener(
    settings: Settings, metrics: Metrics, factory: async_sessionmaker[AsyncSession]
) -> MetricsListener:
    """The worker process's own scrape target on 127.0.0.1:METRICS_PORT (one per process)."""
    from control_plane.db import utcnow
    from control_plane.provisioning.worker import fleet_gauges

    async def fleet() -> FleetGauges:
        return await fleet_gauges(factory, utcnow(), settings.worker_lease_seconds)

    assert settings.metrics_port is not None
    return start_listener(metrics, settings.metrics_port, fleet)


# -- ops update-image ---------------------------------------------------------------------------


def configure_ops(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ops_command", required=True, metavar="COMMAND")
    update = sub.add_parser(
        "update-image",
        help="roll every running Room machine of one runtime kind to IMAGE, one at a time",
        description="Roll every running Room machine of one runtime kind to IMAGE (pinned by "
        "digest), one at a time; a machine that does not become healthy is rolled back, and "
        "the rollout stops after --max-failures failed machines.",
    )
    update.add_argument("image", help="registry/repo@sha256:<64 hex>")
    update.add_argument("--max-failures", type=int, default=1, metavar="N")
    update.add_argument(
        "--kind",
        choices=RUNTIME_KINDS,
        default=DEFAULT_RUNTIME_KIND,
        help="the runtime kind IMAGE is built for (the Dockerfile's default target: reference; "
        "its quoroom target: quoroom); only instances of that kind are moved",
    )
    update.set_defaults(handler=_update_image)
    restore_parser = sub.add_parser(
        "restore",
        help="bring a canceled or broken Room back from a snapshot of its data (the worker runs "
        "it)",
        description="Bring a canceled, destroying, failed or broken running Room back from a "
        "snapshot of its data: the newest unless --snapshot names one. The restore is queued for "
        "the worker (which must be running: quoroom-cloud worker, serve with RUN_WORKER, or "
        "dev), with restore_requested and restore events on the instance's trail. Refused, with "
        "exit status 1, for an unknown instance, a snapshot that does not exist and a Room "
        "that runs fine.",
    )
    restore_parser.add_argument("instance", metavar="INSTANCE", help="the instance id")
    restore_parser.add_argument(
        "--snapshot", metavar="ID", help="the snapshot to restore (default: the newest)"
    )
    restore_parser.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="wait up to SECONDS for the Room to run again (exit 1 if it fails or is not "
        "running by then)",
    )
    restore_parser.add_argument(
        "--over-quota",
        action="store_true",
        help="restore a canceled Room even past its owner's INSTANCE_QUOTA or the capacity "
        "(ROOMS_PER_REGION, ROOMS_TOTAL); the event records it",
    )
    restore_parser.set_defaults(handler=_restore)


def _restore(args: argparse.Namespace) -> int:
    if args.wait is not None and args.wait <= 0:
        print("--wait must be a positive number of seconds", file=sys.stderr)
        return 2
    return asyncio.run(
        restore(
            get_settings(),
            args.instance,
            args.snapshot,
            wait=args.wait,
            over_quota=args.over_quota,
        )
    )


async def restore(
    settings: Settings, instance_id: str, snapshot_id: str | None = None, **kw: Any
) -> int:
    """``ops restore`` (see :mod:`control_plane.provisioning.restore`)."""
    from control_plane.provisioning.restore import restore_main

    return await restore_main(settings, instance_id, snapshot_id, **kw)


def _update_image(args: argparse.Namespace) -> int:
    if args.max_failures < 1:
        print("--max-failures must be at least 1", file=sys.stderr)
        return 2
    return asyncio.run(
        update_image(get_settings(), args.image, max_failures=args.max_failures, kind=args.kind)
    )


async def update_image(
    settings: Settings,
    image: str,
    *,
    max_failures: int = 1,
    kind: str = DEFAULT_RUNTIME_KIND,
    transport: httpx.AsyncBaseTransport | None = None,
    **rollout_kw: Any,
) -> int:
    """Roll the running ``kind`` instances' machines to ``image``; every step is an instance
    event. Instances of the other kind are left alone: an image runs one kind of Room only.

    Returns the exit status: 0 when every machine is updated (or skipped), 1 otherwise, 2 on a
    configuration error.
    """
    from control_plane.db import create_engine, create_session_factory, transaction
    from control_plane.instances.lifecycle import IllegalTransition, record_event, update_fields
    from control_plane.instances.models import CloudInstance, InstanceStatus
    from control_plane.provisioning.rollout import (
        Outcome,
        RolloutTarget,
        format_report,
        run_update_image,
    )
    from fly_image.config import MachineConfigError, check_image_reference

    if settings.provider != "fly":
        print("ops update-image needs QUOROOM_CP_PROVIDER=fly", file=sys.stderr)
        return 2
    if settings.fly_api_token is None or not settings.fly_org:
        print("ops update-image needs QUOROOM_CP_FLY_API_TOKEN and _FLY_ORG", file=sys.stderr)
        return 2
    try:
        check_image_reference(image)
    except MachineConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    engine = create_engine(settings.resolved_database_url)
    try:
        factory = create_session_factory(engine)
        async with factory() as session:
            rows = (
                await session.scalars(
                    select(CloudInstance)
                    .where(
                        CloudInstance.status == str(InstanceStatus.RUNNING),
                        CloudInstance.runtime_kind == kind,
                        CloudInstance.fly_app.is_not(None),
                        CloudInstance.machine_id.is_not(None),
                    )
                    .order_by(CloudInstance.created_at)
                )
            ).all()
        targets = [RolloutTarget(r.id, r.fly_app or "", r.machine_id or "") for r in rows]

        async def on_event(instance_id: str, kind: str, detail: Mapping[str, Any]) -> None:
            message = f"{kind.replace('_', ' ')}: {detail.get('detail') or image}"
            async with transaction(factory) as db:
                await record_event(db, instance_id, kind, message, dict(detail))

        report = await run_update_image(
            image,
            targets=targets,
            token=settings.fly_api_token.get_secret_value(),
            org_slug=settings.fly_org,
            base_url=settings.fly_api_base_url,
            max_failures=max_failures,
            on_event=on_event,
            transport=transport,
            **rollout_kw,
        )
        for result in report.by_outcome(Outcome.UPDATED):
            with contextlib.suppress(IllegalTransition):  # moved meanwhile: nothing to record
                async with transaction(factory) as db:
                    await update_fields(
                        db, result.instance_id, status=InstanceStatus.RUNNING, image=image
                    )
        print(format_report(report))
        if report.ok:
            variable = "QUOROOM_RUNTIME_IMAGE" if kind == "quoroom" else "RUNTIME_IMAGE"
            print(f"set QUOROOM_CP_{variable}={image} so new {kind} Rooms start on it too")
        return 0 if report.ok else 1
    finally:
        await engine.dispose()
