"""PostgreSQL restarted mid-provisioning, on a private throwaway cluster.

The shared server (127.0.0.1:5432) is never restarted: the drill makes its own cluster with
``initdb`` as the ``postgres`` user in a temporary directory, runs it on a free port with
``pg_ctl``, restarts it (``pg_ctl restart -m fast``: every connection is cut) while worker
processes provision instances on the Fly fake, then removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.drills.common import (
    audit,
    cp_values,
    create_instances,
    engine_and_factory,
    free_port,
    make_settings,
    pg_database,
    spawn_worker,
    wait_until_settled,
)
from bench.drills.provisioning import DrillResult
from tests.fakes.fly_machines import FlyMachinesFake

PG_BIN = Path(os.environ.get("QUOROOM_DRILL_PG_BIN", "/usr/lib/postgresql/15/bin"))


class PrivateCluster:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="quoroom-drill-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"

    @property
    def admin_url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *argv: str) -> subprocess.CompletedProcess[str]:
        prefix: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            prefix = ["runuser", "-u", "postgres", "--"]
        return subprocess.run(
            [*prefix, *argv], check=True, capture_output=True, text=True, timeout=120
        )

    def init(self) -> None:
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._as_postgres(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        )

    def _ctl(self, action: str, *extra: str) -> None:
        self._as_postgres(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "-w",
            *extra,
            action,
        )

    def start(self) -> None:
        self._ctl("start")

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._ctl("stop", "-m", "immediate")

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def private_cluster() -> Iterator[PrivateCluster]:
    cluster = PrivateCluster()
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        cluster.remove()


async def postgres_restarted(quick: bool, work: Path) -> DrillResult:
    started = time.monotonic()
    count = 6 if quick else 16
    restarts = 1 if quick else 2
    rows = []
    with private_cluster() as cluster, FlyMachinesFake(start_delay=0.2, check_delay=0.2) as fake:
        for op in ("Apps_create", "Volumes_create", "Machines_create", "Secrets_update"):
            fake.set_latency(op, 0.05, 0.3)
        async with pg_database("pgrestart", admin_url=cluster.admin_url) as url:
            values = cp_values(url, fake.url, work, worker_concurrency=2)
            settings = make_settings(url, fake.url, work)
            engine, factory = engine_and_factory(url)
            procs = [spawn_worker(values, work / f"pg-worker-{n}.log") for n in range(2)]
            try:
                ids = await create_instances(factory, settings, count)
                await engine.dispose()  # the drill's own connections go with the restart too
                for n in range(restarts):
                    # Mid-way: some instances running, the others at some step.
                    deadline = time.monotonic() + 60
                    while True:
                        statuses = await wait_until_settled(factory, ids, timeout=0)
                        up = sum(1 for s in statuses.values() if s == "running")
                        if up >= (n + 1) * count // (restarts + 2) or time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.05)
                    await engine.dispose()
                    t = time.monotonic()
                    await asyncio.to_thread(cluster.restart)
                    rows.append(
                        {
                            "restart": n + 1,
                            "instances running before it": sum(
                                1 for s in statuses.values() if s == "running"
                            ),
                            "restart seconds": round(time.monotonic() - t, 2),
                        }
                    )
                await engine.dispose()
                t = time.monotonic()
                statuses = await wait_until_settled(factory, ids, timeout=120)
                settle = time.monotonic() - t
                alive = sum(1 for p in procs if p.proc.poll() is None)
            finally:
                for proc in procs:
                    proc.stop()
                await engine.dispose()
            engine, factory = engine_and_factory(url)
            try:
                result = await audit(factory, fake, ids)
            finally:
                await engine.dispose()
    ok = result.ok and alive == len(procs)
    return DrillResult(
        "postgres-restarted",
        "PostgreSQL restarted mid-provisioning (a private cluster)",
        ok=ok,
        figures={
            **result.figures(),
            "restarts": restarts,
            "worker processes still alive after": f"{alive}/{len(procs)}",
            "seconds from the last restart until every instance rested": round(settle, 1),
        },
        rows=rows,
        notes=[
            f"A throwaway cluster (`initdb` as the `postgres` user, `pg_ctl` on a free port, in "
            f"a temporary directory; the shared server is not touched). Two worker processes "
            f"(2 claim loops each) provision {count} instances on the Fly fake (calls taking "
            f"50-300 ms) and the cluster is restarted with `pg_ctl restart -m fast` "
            f"{restarts}× mid-way: every connection is cut, writes in flight fail. The workers "
            "log the failures, keep running and finish the work (a step whose persist failed "
            "is found again at Fly by name or metadata). An instance whose lease could not be "
            "released while the database was down waits for the lease to run out "
            "(`WORKER_LEASE_SECONDS`, 30 s here, 900 by default) before another loop takes it: "
            "that wait is most of the settling time.",
        ],
        problems=result.problems + ([] if alive == len(procs) else ["a worker process died"]),
        seconds=time.monotonic() - started,
    )
