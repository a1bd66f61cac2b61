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
  package ``valgrind``) with instrumentation on around the measured requests only (callgrind's
  client requests through a three-line C helper compiled here with ``cc``; without a compiler,
  the difference between runs of N and 2N requests) and reports CPU instructions per request.
  Instruction counts do not depend on what else the machine runs, unlike times on these two
  shared cores: repeated runs agree within ~0.5 %. ``callgrind.<variant>.out.1`` (the measured
  loop; interpreter level: the C functions of CPython and the extensions) is kept.

Outputs go to ``bench/out/profile/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
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


async def _loop(
    variant: str, requests: int, profiler: cProfile.Profile | None = None, hooks: Any = None
) -> None:
    """Warm the app, then send ``requests`` authenticated GETs (under ``profiler``, or between
    ``hooks.bench_start()`` and ``hooks.bench_stop()``, if given).

    Before the measured part the heap is collected and frozen (``gc.freeze``): a full collection
    that happens to fall inside it would otherwise walk every object the imports made, and
    whether one does depends on allocation counts, not on the code under test.
    """
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
        gc.collect()
        gc.freeze()
        if profiler is not None:
            profiler.enable()
        if hooks is not None:
            hooks.bench_start()
        for _ in range(requests):
            await app(_scope(token), receive, send)
        if hooks is not None:
            hooks.bench_stop()
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

# Callgrind's client requests (valgrind/callgrind.h) as a tiny shared library, so the child can
# switch instrumentation on around the measured loop only: imports and warm-up are not counted.
_TOGGLE_C = """
#include <valgrind/callgrind.h>
void bench_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void bench_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS_AT("measured"); }
"""


def _toggle_library() -> Path | None:
    """Build (once) the library that switches callgrind on and off; None without a C compiler
    or valgrind's headers (the count then falls back to the difference of two runs)."""
    library = OUT / "callgrind_toggle.so"
    if library.exists():
        return library
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not Path("/usr/include/valgrind/callgrind.h").exists():
        return None
    OUT.mkdir(parents=True, exist_ok=True)
    source = OUT / "callgrind_toggle.c"
    source.write_text(_TOGGLE_C)
    done = subprocess.run(
        [compiler, "-O1", "-shared", "-fPIC", "-o", str(library), str(source)],
        capture_output=True,
        text=True,
    )
    return library if done.returncode == 0 else None


def _child(variant: str, requests: int, toggle: str | None) -> None:
    """valgrind's child: the loop, with instrumentation on around the measured part only."""
    hooks = None
    if toggle:
        import ctypes

        hooks = ctypes.CDLL(toggle)
    asyncio.run(_loop(variant, requests, hooks=hooks))


def _valgrind(variant: str, requests: int, out: Path, toggle: Path | None) -> int:
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    if toggle is not None:
        command.append("--instr-atstart=no")
    command += [sys.executable, "-m", "bench.profile", "--run", variant]
    command += ["--requests", str(requests)]
    if toggle is not None:
        command += ["--toggle", str(toggle)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    if toggle is not None:
        # The dump made by bench_stop holds exactly the measured loop.
        dumps = sorted(out.parent.glob(out.name + "*"))
        for dump in dumps:
            text = dump.read_text(errors="replace")
            if "measured" in text.split("events:", 1)[0]:
                match = re.search(r"^totals:\s*(\d+)", text, re.MULTILINE) or re.search(
                    r"^summary:\s*(\d+)", text, re.MULTILINE
                )
                if match:
                    return int(match.group(1))
        raise RuntimeError(f"no 'measured' dump among {dumps}")
    match = re.search(r"Collected\s*:\s*(\d+)", done.stderr)
    if match is None:
        raise RuntimeError(f"valgrind output not understood:\n{done.stderr[-2000:]}")
    return int(match.group(1))


def _instructions(variant: str, requests: int, toggle: Path | None) -> float:
    """Instructions per request of ``variant``: the measured loop alone when the toggle
    library exists, else the difference between ``requests`` and twice as many."""
    kept = OUT / f"callgrind.{variant}.out"
    for old in OUT.glob(f"callgrind.{variant}.out*"):
        old.unlink()
    if toggle is not None:
        return _valgrind(variant, requests, kept, toggle) / requests
    with tempfile.TemporaryDirectory() as tmp:
        small = _valgrind(variant, requests, Path(tmp) / "callgrind.out", None)
    large = _valgrind(variant, 2 * requests, kept, None)
    return (large - small) / requests


def callgrind(variants: list[str], requests: int) -> dict[str, float]:
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found (apt-get install valgrind)")
    OUT.mkdir(parents=True, exist_ok=True)
    toggle = _toggle_library()
    how = "measured loop only" if toggle else "difference of two runs (no C compiler)"
    print(f"callgrind, {requests} requests per variant, {how}", flush=True)
    per_request: dict[str, float] = {}
    for variant in variants:
        started = time.monotonic()
        per_request[variant] = _instructions(variant, requests, toggle)
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
    print(f"\nkept: {OUT}/callgrind.<variant>.out*")
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
    parser.add_argument("--toggle", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        _child(args.run, args.requests or 2000, args.toggle)
        return 0
    if args.callgrind:
        callgrind(args.variants.split(","), args.requests or 2000)
        return 0
    profile(args.variant, args.requests or 20_000, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
