"""A worker process for the drills: ``quoroom-cloud worker`` with the health-poll interval of the
Fly provider set from the command line (the drills scale Fly's latencies down, and the default 1 s
poll would not be scaled with them). Settings come from ``QUOROOM_CP_*`` like the real command.

    python -m bench.drills.worker_proc [--poll SECONDS] [--no-reconcile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from control_plane.db import create_engine, create_session_factory
from control_plane.provisioning.fly import FlyProvider
from control_plane.provisioning.runner import WorkerRunner
from control_plane.settings import get_settings


async def main(poll: float, reconcile: bool) -> int:
    settings = get_settings()
    engine = create_engine(settings.resolved_database_url)
    try:
        provider = FlyProvider.from_settings(
            settings,
            poll_interval=poll,
            wait_timeout=60.0,
            health_timeout=60.0,
        )
        runner = WorkerRunner(
            settings, create_session_factory(engine), provider=provider, reconcile=reconcile
        )
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signum, runner.stop)
        print(f"worker {runner.worker.owner} ready", flush=True)
        await runner.run()
        return 0
    finally:
        await engine.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--poll", type=float, default=0.05)
    parser.add_argument("--no-reconcile", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    raise SystemExit(asyncio.run(main(args.poll, not args.no_reconcile)))
