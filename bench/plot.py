"""The benches' plots (matplotlib, Agg backend: no display).

- bench/load.png (``python -m bench.load``): legitimate latency percentiles per scenario, and
  throughput per stack;
- bench/stack.png (``python -m bench`` with its server part): requests/s of the bare Room and of
  the stack under each HTTP server, the stack's share of bare over each pair.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLOURS = {"bare": "#9e9e9e", "ours": "#1f77b4", "peer": "#ff7f0e"}


def plot(
    results: dict[str, dict[str, dict[str, Any]]],
    wrk: dict[str, float] | None,
    out: Path,
) -> None:
    """Left: p50/p95/p99 of legitimate HTTP requests per locust scenario. Right: wrk req/s."""
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    # (label, scenario, category): an abuse scenario's phases with the abusers off and on.
    bars = []
    for n, c in results.items():
        if c.get("legit_abused"):
            bars += [(f"{n} (off)", n, "legit"), (f"{n} (on)", n, "legit_abused")]
        elif c.get("legit"):
            bars.append((n, n, "legit"))
    names = [label for label, _, _ in bars]
    width = 0.26
    for i, (pct, alpha) in enumerate((("p50_ms", 0.45), ("p95_ms", 0.7), ("p99_ms", 1.0))):
        xs = [j + (i - 1) * width for j in range(len(names))]
        values = [results[n].get(cat, {}).get(pct, 0.0) for _, n, cat in bars]
        colours = [COLOURS.get(n.split("-")[0], "#555555") for n in names]
        lat.bar(xs, values, width, color=colours, alpha=alpha, label=pct.removesuffix("_ms"))
    lat.axhline(50, color="red", linestyle="--", linewidth=1, label="p99 target 50 ms")
    lat.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    lat.set_ylabel("legitimate HTTP latency (ms)")
    lat.set_title("locust: p50 / p95 / p99 (light → dark)")
    lat.legend(fontsize=8)
    if wrk:
        kinds = [k for k in ("bare", "ours", "peer") if k in wrk]
        thr.bar(kinds, [wrk[k] for k in kinds], color=[COLOURS.get(k, "#555") for k in kinds])
        for j, k in enumerate(kinds):
            thr.text(j, wrk[k], f"{wrk[k] / wrk['bare']:.0%}", ha="center", va="bottom", fontsize=8)
        thr.set_title("wrk: requests/s")
    else:
        thr.set_axis_off()
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def plot_servers(servers: dict[str, dict[str, Any]], labels: dict[str, str], out: Path) -> None:
    """Bare and stack requests/s per server (``bench_server.run()["servers"]``); ``labels``:
    short tick labels by server name."""
    names = list(servers)
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.38
    for i, (kind, colour) in enumerate((("bare", COLOURS["bare"]), ("stack", COLOURS["ours"]))):
        xs = [j + (i - 0.5) * width for j in range(len(names))]
        values = [servers[n]["throughput"][f"{kind}_best"] for n in names]
        ax.bar(xs, values, width, color=colour, label=kind)
    for j, n in enumerate(names):
        t = servers[n]["throughput"]
        top = max(t["bare_best"], t["stack_best"])
        ax.text(j, top, f"{t['ratio']:.0%}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(names)), [labels.get(n, n) for n in names], fontsize=8)
    ax.set_ylabel("requests/s (best run)")
    ax.set_title("authenticated GET /api/rooms, wrk -c32, server on one core: stack / bare above")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
