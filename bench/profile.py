"""Where the stack's time per request goes: a profile of the in-process request loop.

python -m bench.profile                      # cProfile, fused stack → bench/out/profile/
python -m bench.profile --variant layered    # the same for the layers composed one by one
python -m bench.profile --callgrind          # instructions per request under valgrind

Both profile the request ``bench/bench_stack.py`` times in-process (authenticated ``GET
/api/rooms`` through ``RuntimeStack`` around the reference Room, warm caches, budgets far above
the load), so the figures read next to its rows.

- **cProfile** (default): ``--requests`` requests (20,000) under ``cProfile``; writes
  ``<variant>.pstats`` and ``<variant>.callgrind`` (the same profile in callgrind's format: open
  it with ``kcachegrind``/``qcachegrind``, or ``gprof2dot -f callgrind``), and prints the functions
  with the most own time per request. cProfile adds its own overhead to every Python call, so
  read it for *where* the time goes, not for how much there is.
- **callgrind** (``--callgrind``): runs the loop under ``valgrind --tool=callgrind`` (Debian
  package ``valgrind``) twice per variant, with ``--requests`` and twice that, and reports
  CPU instructions per request as the difference divided by the extra requests (start-up and
  imports cancel out). Instruction counts do not depend on what else the machine runs, unlike
  times on these two shared cores; a few minutes per variant. The larger run's
  ``callgrind.<variant>.out`` is kept (interpreter-level: C functions of CPython and the
  extensions).

Outputs go to ``bench/out/profile/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from . import _keys, apps
from .bench_stack import _scope

OUT = Path(__file__).with_name("out") / "profile"
VARIANTS = ("bare", "fused", "layered")


async def _loop(variant: str, requests: int, profiler: cProfile.Profile | None = None) -> None:
    """Warm the app, then send ``requests`` authenticated GETs (under ``profiler`` if given)."""
    key = _keys.new_key()
    token = _keys.mint(key, ttl=900)
    if variant == "bare":
        app: Any = apps.bare_app()
        token = apps.LOCAL_TOKEN
        stack = None
    else:
        stack = apps.stack_app(_keys.jwks_of(key))
        if variant == "layered":
            stack.app = stack.layered  # the same layers, composed one inside the other
        app = stack
        await stack.startup()
    statuses: set[int] = set()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.add(message["status"])

    try:
        for _ in range(500):
            await app(_scope(token), receive, send)
        if profiler is not None:
            profiler.enable()
        for _ in range(requests):
            await app(_scope(token), receive, send)
        if profiler is not None:
            profiler.disable()
    finally:
        if stack is not None:
            await stack.shutdown()
    if statuses != {200}:
        raise RuntimeError(f"bench request was not answered 200: {sorted(statuses)}")


# -- cProfile ---------------------------------------------------------------------------------


def _callgrind_text(stats: pstats.Stats) -> str:
    """``stats`` in callgrind's format (costs in nanoseconds), as pyprof2calltree writes it."""
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    callees: dict[Any, list[tuple[Any, int, float]]] = {}
    for func, (_cc, _nc, _tt, _ct, callers) in table.items():
        for caller, (_c, ncalls, _t, cumulative) in callers.items():
            callees.setdefault(caller, []).append((func, ncalls, cumulative))
    lines = ["version: 1", "creator: bench/profile.py (cProfile)", "events: ns", ""]
    for func, (_cc, _nc, own, _ct, _callers) in table.items():
        file, line, name = func
        lines += [f"fl={file}", f"fn={name}:{line}", f"{line} {int(own * 1e9)}"]
        for callee, ncalls, cumulative in callees.get(func, ()):
            cfile, cline, cname = callee
            lines += [
                f"cfl={cfile}",
                f"cfn={cname}:{cline}",
                f"calls={ncalls} {cline}",
                f"{line} {int(cumulative * 1e9)}",
            ]
        lines.append("")
    return "\n".join(lines)


def profile(variant: str, requests: int, top: int) -> None:
    profiler = cProfile.Profile()
    asyncio.run(_loop(variant, requests, profiler))
    OUT.mkdir(parents=True, exist_ok=True)
    stats = pstats.Stats(profiler)
    stats.dump_stats(OUT / f"{variant}.pstats")
    (OUT / f"{variant}.callgrind").write_text(_callgrind_text(stats))
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    rows = sorted(table.items(), key=lambda item: item[1][2], reverse=True)[:top]
    total = sum(entry[2] for entry in table.values())
    print(
        f"{variant}: {requests} requests, {total / requests * 1e6:.2f} µs of own time per request "
        "under cProfile (its overhead included)\n"
    )
    print(f"{'own µs/req':>10} {'calls/req':>9}  function")
    for (file, line, name), (_cc, ncalls, own, _ct, _callers) in rows:
        where = f"{Path(file).name}:{line}" if line else file
        print(f"{own / requests * 1e6:10.3f} {ncalls / requests:9.2f}  {name} ({where})")
    print(f"\nwritten: {OUT / f'{variant}.pstats'}, {OUT / f'{variant}.callgrind'}")


# -- callgrind --------------------------------------------------------------------------------


def _instructions(variant: str, requests: int, keep: Path | None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = keep or Path(tmp) / "callgrind.out"
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-m",
                "bench.profile",
                "--run",
                variant,
                "--requests",
                str(requests),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    match = re.search(r"Collected\s*:\s*(\d+)", done.stderr)
    if match is None:
        raise RuntimeError(f"valgrind output not understood:\n{done.stderr[-2000:]}")
    return int(match.group(1))


def callgrind(variants: list[str], requests: int) -> dict[str, float]:
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found (apt-get install valgrind)")
    OUT.mkdir(parents=True, exist_ok=True)
    per_request: dict[str, float] = {}
    for variant in variants:
        started = time.monotonic()
        small = _instructions(variant, requests, None)
        large = _instructions(variant, 2 * requests, OUT / f"callgrind.{variant}.out")
        per_request[variant] = (large - small) / requests
        print(
            f"{variant:8} {per_request[variant]:12,.0f} instructions/request "
            f"({time.monotonic() - started:.0f} s)",
            flush=True,
        )
    if "bare" in per_request:
        for variant in variants:
            if variant != "bare":
                extra = per_request[variant] - per_request["bare"]
                ratio = per_request["bare"] / per_request[variant]
                print(
                    f"{variant}: +{extra:,.0f} instructions/request over bare "
                    f"({ratio * 100:.1f} % of bare's rate at equal instruction speed)"
                )
    print(f"\nkept: {OUT}/callgrind.<variant>.out")
    return per_request


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--variant", choices=VARIANTS, default="fused")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--callgrind", action="store_true", help="instructions per request")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="with --callgrind: which, comma-separated"
    )
    parser.add_argument("--run", choices=VARIANTS, help=argparse.SUPPRESS)  # valgrind's child
    args = parser.parse_args(argv)
    if args.run:
        asyncio.run(_loop(args.run, args.requests or 2000))
        return 0
    if args.callgrind:
        callgrind(args.variants.split(","), args.requests or 2000)
        return 0
    profile(args.variant, args.requests or 20_000, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
