"""``scripts/drill``: run the drills, write ``bench/RESULTS-drills.md`` (and ``bench/drills.png``),
exit non-zero when a target is missed.

    scripts/drill                    # every drill and measurement (~10 minutes on 2 cores)
    scripts/drill --quick            # smaller runs of each (a smoke run)
    scripts/drill worker-killed jwks # only these; their sections replace those of the last run
                                     # (bench/RESULTS-drills.json) in RESULTS-drills.md
    scripts/drill --list
    scripts/drill --no-write         # print only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.drills.common import ROOT
from bench.drills.provisioning import DrillResult

Drill = Callable[[bool, Path], Awaitable[DrillResult]]

RESULTS = ROOT / "bench" / "RESULTS-drills.md"
PLOT = ROOT / "bench" / "drills.png"
RAW = ROOT / "bench" / "RESULTS-drills.json"  # the figures as data; merged by partial runs


def registry() -> dict[str, Drill]:
    from bench.drills import control_plane, jwks, postgres, provisioning

    return {
        "worker-killed": provisioning.worker_killed,
        "fly-failing": provisioning.fly_failing,
        "jwks-outage": jwks.jwks_outage,
        "webhooks-replayed": control_plane.webhooks_replayed,
        "redis-stopped": control_plane.redis_stopped,
        "postgres-restarted": postgres.postgres_restarted,
        "cp-restarted": control_plane.cp_restarted_mid_checkout,
        "racing-workers": provisioning.racing_workers,
        # item 7: past one machine
        "reconciler-scale": provisioning.reconciler_scale,
        "throughput": provisioning.throughput,
        "two-control-planes": control_plane.two_control_planes,
    }


async def run_all(names: Sequence[str], quick: bool) -> list[DrillResult]:
    drills = registry()
    results: list[DrillResult] = []
    keep = os.environ.get("QUOROOM_DRILL_WORK")  # keep the logs there instead of a temp dir
    with tempfile.TemporaryDirectory(prefix="quoroom-drill-") as tmp:
        for name in names:
            work = Path(keep or tmp) / name
            work.mkdir(parents=True, exist_ok=True)
            print(f"drill {name}…", file=sys.stderr, flush=True)
            started = time.monotonic()
            try:
                result = await drills[name](quick, work)
            except Exception as exc:
                result = DrillResult(
                    name,
                    name,
                    ok=False,
                    figures={},
                    problems=[f"the drill itself failed: {exc!r}", traceback.format_exc()],
                    seconds=time.monotonic() - started,
                )
            result.when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
            results.append(result)
            verdict = "ok" if result.ok else "MISSED"
            print(
                f"  {verdict} in {result.seconds:.1f}s: "
                + ", ".join(f"{k}={v}" for k, v in result.figures.items()),
                file=sys.stderr,
                flush=True,
            )
            for problem in result.problems[:10]:
                print(f"    {problem}", file=sys.stderr)
    return results


def _table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        out.append("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    return out


def render(results: list[DrillResult], quick: bool, plot: Path | None) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    lines = [
        "# Drills and scale measurements (issue 14, items 6 and 7)",
        "",
        f"`scripts/drill{' --quick' if quick else ''}`, {now}, {platform.node()} "
        f"({os.cpu_count()} cores, load average {load:.2f} at the end). Written by "
        '`bench/drills/run.py`; how each drill works: bench/README.md, "Drills".',
        "",
        "Targets: 0 lost, 0 doubled, 0 orphans, every instance with a complete event trail.",
        "",
        "| drill | result | lost | doubled | orphans | incomplete trails | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        f = r.figures
        lines.append(
            f"| {r.name} | {'pass' if r.ok else '**MISSED**'} | {f.get('lost', '-')} | "
            f"{f.get('doubled', '-')} | {f.get('orphans', '-')} | "
            f"{f.get('incomplete trails', '-')} | {r.seconds:.0f} |"
        )
    if plot is not None:
        lines += ["", f"![drills]({plot.name})"]
    for r in results:
        ran = f", run {r.when}" if r.when else ""
        verdict = "pass" if r.ok else "**MISSED**"
        lines += ["", f"## {r.title}", "", f"`{r.name}`: {verdict} ({r.seconds:.0f} s{ran}).", ""]
        lines += [f"- {k}: {v}" for k, v in r.figures.items()]
        if r.rows:
            lines += ["", *_table(r.rows)]
        if r.notes:
            lines += [""] + [f"{n}" for n in r.notes]
        if r.problems:
            lines += ["", "Problems:", ""] + [
                f"- `{p.splitlines()[0][:300]}`" for p in r.problems[:20]
            ]
    return "\n".join(lines) + "\n"


def make_plot(results: list[DrillResult], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by = {r.name: r for r in results}
    panels = [n for n in ("throughput", "reconciler-scale") if n in by]
    audited = [
        r for r in results if isinstance(r.figures.get("instances"), int) and "lost" in r.figures
    ]
    if audited:
        panels.append("targets")
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    if len(panels) == 1:
        axes = [axes]
    for ax, name in zip(axes, panels, strict=True):
        rows = by[name].rows if name in by else []
        if name == "throughput" and rows:
            xs = [r["worker processes"] for r in rows]
            ys = [r["instances/min at Fly's speed"] for r in rows]
            ax.plot(xs, ys, "o-", label="measured")
            ax.plot(xs, [ys[0] * x for x in xs], "--", color="grey", label="linear")
            ax.set_xlabel("worker processes (1 claim loop each)")
            ax.set_ylabel("instances running per minute (Fly's speed)")
            ax.set_title("Provisioning throughput")
            ax.set_xticks(xs)
            ax.legend()
        elif name == "reconciler-scale" and rows:
            labels = [
                "Fly fake (HTTP)"
                if "HTTP" in r["provider"]
                else "DB side alone"
                if "alone" in r["provider"]
                else "100 ms provider"
                for r in rows
            ]
            ax.bar(labels, [r["pass seconds"] for r in rows], color=["C1", "C0", "C2"][: len(rows)])
            for i, r in enumerate(rows):
                ax.annotate(
                    f"{r['SQL statements']} SQL",
                    (i, r["pass seconds"]),
                    ha="center",
                    va="bottom",
                )
            ax.set_ylim(0, max(r["pass seconds"] for r in rows) * 1.2)
            ax.set_ylabel("seconds per pass")
            ax.text(
                0.02,
                0.95,
                "one lookup at a time at 100 ms: ~1000 s",
                transform=ax.transAxes,
                va="top",
                fontsize=8,
            )
            ax.set_title(f"Reconciler pass, {rows[0]['instances']:,} running instances")
        elif name == "targets":
            names = [r.name for r in audited]
            missed = [
                sum(int(r.figures.get(k, 0) or 0) for k in ("lost", "doubled", "orphans"))
                for r in audited
            ]
            ax.barh(names, [r.figures["instances"] for r in audited], color="C2", label="audited")
            ax.barh(names, missed, color="C3", label="lost + doubled + orphans")
            for i, r in enumerate(audited):
                ax.annotate(f" {missed[i]} missed", (r.figures["instances"], i), va="center")
            ax.invert_yaxis()
            ax.set_xlim(0, max(r.figures["instances"] for r in audited) * 1.45)
            ax.set_xlabel("instances audited")
            ax.set_title("Drills: instances and targets missed")
            ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _merged(results: list[DrillResult], order: list[str], quick: bool) -> list[DrillResult]:
    """A run of some drills replaces their sections and keeps the others' from the last run
    (``bench/RESULTS-drills.json``) when it was of the same mode."""
    try:
        saved = json.loads(RAW.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return results
    if not isinstance(saved, dict) or saved.get("quick") != quick:
        return results
    by = {d["name"]: DrillResult(**d) for d in saved.get("results", [])}
    by.update({r.name: r for r in results})
    return [by[n] for n in order if n in by]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/drill", description=__doc__)
    parser.add_argument("names", nargs="*", help="drills to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke run)")
    parser.add_argument("--list", action="store_true", help="list the drills and exit")
    parser.add_argument("--no-write", action="store_true", help="print, do not write results")
    args = parser.parse_args(argv)
    known = registry()
    if args.list:
        print("\n".join(known))
        return 0
    names = args.names or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown drill(s): {', '.join(unknown)}; --list names them")
    # The faults the drills inject are logged as warnings by the code under test: keep the
    # drill's own output readable (worker processes log to their files under the work folder).
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)
    for name in ("control_plane", "room_cloud_runtime", "bench"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    started = time.monotonic()
    results = asyncio.run(run_all(names, args.quick))
    print(f"{len(results)} drill(s) in {time.monotonic() - started:.0f}s", file=sys.stderr)
    if not args.no_write:
        if args.names:
            results = _merged(results, list(known), args.quick)
        plot = PLOT if make_plot(results, PLOT) else None
        RESULTS.write_text(render(results, args.quick, plot), encoding="utf-8")
        RAW.parent.mkdir(parents=True, exist_ok=True)
        RAW.write_text(
            json.dumps(
                {"quick": args.quick, "results": [r.__dict__ for r in results]},
                indent=2,
                default=str,
            ),
            encoding="utf-8",
        )
        print(f"wrote {RESULTS.relative_to(ROOT)}", file=sys.stderr)
    else:
        print(render(results, args.quick, None))
    return 0 if all(r.ok for r in results) else 1
