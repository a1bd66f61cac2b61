"""Which HTTP server the runtime ships: safety and throughput, measured side by side.

``python -m bench server`` (part of a full ``scripts/bench``) → bench/RESULTS.md "Servers".

The servers are those of ``bench/serve.py --server``: what ``quoroom-runtime serve`` ships
(granian through ``serve_granian``), what ``quoroom-runtime gateway`` runs (uvicorn with the
runtime's guarded httptools protocol; ``room_cloud_runtime/_server.py`` says why each), uvicorn as
it comes (httptools), uvicorn with h11 and hypercorn, each given the stack's header budget and
head timeout where it has a setting for them.

Safety, three probes against each server running the stack (head timeout 2 s for the run):

- **big head**: one connection sends a request head that never ends, 32 MiB of one header, as
  fast as the server takes it. Reported: what the client saw (a status, or the connection closed)
  and how much the server's resident memory grew (its process tree, peak seen while sending).
- **trickle**: a head sent one byte every 0.5 s. Reported: when the server ended it (status or
  close), or "open" if it still held the socket at the end of the probe (8 s).
- **idle**: a connection that sends nothing. Same report.

Throughput: the bare Room and the stack, each server pinned to core 0, ``wrk -t1 -c32`` on core 1,
authenticated ``GET /api/rooms``, best of 2 interleaved 4 s runs; the server's CPU per request is
its process tree's user + system time (granian's worker is a child process).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from . import _keys, apps
from .bench_stack import _cpu_seconds, _start_server, _summary, _tree, _wrk
from .serve import SERVERS

HEAD_TIMEOUT = 2.0
PROBE_SECONDS = 8.0
BIG_HEAD_BYTES = 32 * 1024 * 1024


# -- /proc readings of a server's process tree -----------------------------------------------------


def _tree_rss_mib(pid: int) -> float:
    total = 0
    for each in _tree(pid):
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


# -- safety probes ---------------------------------------------------------------------------------


def _outcome(sock: socket.socket, wait: float) -> str:
    """What the server did with this connection within ``wait`` seconds: a status or a close."""
    sock.settimeout(wait)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return "open"
    except OSError:
        return "reset"
    if not data:
        return "closed"
    return data.split(b"\r\n", 1)[0].decode("latin-1").removeprefix("HTTP/1.1 ")[:40]


def _big_head(port: int, pid: int) -> dict[str, Any]:
    before = peak = _tree_rss_mib(pid)
    sent = 0
    chunk = b"a" * (256 * 1024)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /api/rooms HTTP/1.1\r\nHost: bench\r\nX-Big: ")
        sock.settimeout(2.0)
        try:
            while sent < BIG_HEAD_BYTES:
                sock.sendall(chunk)
                sent += len(chunk)
                if sent % (4 * 1024 * 1024) == 0:
                    peak = max(peak, _tree_rss_mib(pid))
        except (TimeoutError, OSError):
            pass  # the server stopped reading or closed: its answer says which
        time.sleep(0.3)
        peak = max(peak, _tree_rss_mib(pid))
        outcome = _outcome(sock, 2.0)
    return {"outcome": outcome, "rss_growth_mib": peak - before, "sent_mib": sent / 2**20}


def _timed(port: int, first: bytes, trickle: bool) -> str:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        if first:
            sock.sendall(first)
        while time.monotonic() - started < PROBE_SECONDS:
            outcome = _outcome(sock, 0.5)
            if outcome != "open":
                return f"{outcome} after {time.monotonic() - started:.1f} s"
            if trickle:
                try:
                    sock.sendall(b"x")
                except OSError:
                    return f"reset after {time.monotonic() - started:.1f} s"
    return f"open after {PROBE_SECONDS:.0f} s"


def probes(server: str, env: dict[str, str]) -> dict[str, Any]:
    proc, port = _start_server("stack", env, http_server=server)
    try:
        time.sleep(0.5)
        result = _big_head(port, proc.pid)
        result["trickle"] = _timed(port, b"GET /api/rooms HTTP/1.1\r\nX-Slow: ", trickle=True)
        result["idle"] = _timed(port, b"", trickle=False)
        return result
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- throughput ------------------------------------------------------------------------------------


def throughput(
    server: str, env: dict[str, str], token: str, rounds: int, seconds: int, connections: int
) -> dict[str, float]:
    rps: dict[str, list[float]] = {"bare": [], "stack": []}
    cpu: dict[str, list[float]] = {"bare": [], "stack": []}
    for _ in range(rounds):
        for kind in ("bare", "stack"):
            proc, port = _start_server(kind, env, http_server=server)
            tok = apps.LOCAL_TOKEN if kind == "bare" else token
            try:
                _wrk(port, tok, 1, connections)  # warm
                before = _cpu_seconds(proc.pid)
                per_second, total = _wrk(port, tok, seconds, connections)
                cpu[kind].append((_cpu_seconds(proc.pid) - before) / total * 1e6)
                rps[kind].append(per_second)
            finally:
                proc.terminate()
                proc.wait(timeout=10)
    out = _summary(rps, lower_is_better=False)
    out.update({f"cpu_{k}": v for k, v in _summary(cpu).items()})
    out["ratio"] = out["stack_best"] / out["bare_best"]
    return out


def run(rounds: int = 2, seconds: int = 4, connections: int = 32) -> dict[str, Any] | None:
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        print("wrk/taskset not found: skipping the server comparison", file=sys.stderr)
        return None
    key = _keys.new_key()
    token = _keys.mint(key, ttl=900)
    env = {
        **os.environ,
        "BENCH_JWKS": json.dumps(_keys.jwks_of(key)),
        "BENCH_SETTINGS": json.dumps({"head_timeout_seconds": HEAD_TIMEOUT}),
    }
    results: dict[str, Any] = {}
    for server in SERVERS:
        results[server] = {
            "throughput": throughput(server, env, token, rounds, seconds, connections),
            "safety": probes(server, env),
        }
    return {
        "servers": results,
        "rounds": rounds,
        "seconds": seconds,
        "connections": connections,
        "head_timeout": HEAD_TIMEOUT,
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
