"""``python -m bench`` (or ``scripts/bench``): run the benchmarks and write bench/RESULTS.md.

python -m bench            # everything (stack in-process + loopback, limiter)
python -m bench stack      # only the stack comparison
python -m bench limiter    # only the limiter at 1, 100k and 1M keys
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def _stack_section() -> str:
    from . import bench_stack

    result = bench_stack.run()
    ip = result["in_process"]
    lines = [
        "## Stack vs bare reference Room (authenticated GET /api/rooms, warm caches)",
        "",
        "| measure | bare | stack | difference | target | verdict |",
        "|---|---|---|---|---|---|",
        f"| in-process µs/request (median of 7×5000) | {ip['bare_us']:.1f} | {ip['stack_us']:.1f} "
        f"| +{ip['added_us']:.1f} µs | ≤ +8 µs | {'pass' if ip['added_us'] <= 8 else 'FAIL'} |",
    ]
    lb = result["loopback"]
    if lb:
        lines.append(
            "| loopback requests/s (uvicorn 1 worker on core 0, wrk -t1 -c32 on core 1, "
            "median of 2×6 s) "
            f"| {lb['bare_rps']:.0f} | {lb['stack_rps']:.0f} | {lb['ratio'] * 100:.1f} % of bare "
            f"| ≥ 90 % | {'pass' if lb['ratio'] >= 0.9 else 'FAIL'} |"
        )
    else:
        lines.append("| loopback requests/s | – | – | wrk not installed | ≥ 90 % | not run |")
    return "\n".join(lines)


def _limiter_section() -> str:
    from . import bench_limiter

    rows = bench_limiter.run()
    if not rows:
        return ""
    keys = list(rows[0].keys())
    lines = ["## Rate limiter", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[k]) for k in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    which = set(argv) or {"stack", "limiter"}
    sections = []
    if "stack" in which:
        sections.append(_stack_section())
    if "limiter" in which:
        sections.append(_limiter_section())
    header = (
        f"# Benchmark results\n\nWritten by `scripts/bench {' '.join(argv)}`".rstrip()
        + f" on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} cores, {platform.machine()}.\n"
    )
    text = header + "\n" + "\n\n".join(s for s in sections if s) + "\n"
    print(text)
    out = (
        RESULTS
        if which == {"stack", "limiter"}
        else RESULTS.with_name(f"RESULTS-{'-'.join(sorted(which))}.md")
    )
    out.write_text(text)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
