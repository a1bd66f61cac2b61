"""The stack against the bare reference Room on an authenticated GET, with warm caches.

1. In-process: µs per request, calling the ASGI app directly (no server), bare and stack
   interleaved over several rounds; the median of each is reported.
2. Over loopback: uvicorn (1 worker, httptools + uvloop) pinned to core 0, wrk pinned to
   core 1, bare and stack alternated, each for a bounded duration; requests/s reported.

Targets (issue 2): the stack adds ≤ 8 µs per request in-process and keeps ≥ 90 % of the bare
app's requests/s over loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

from . import _keys, apps

PATH = "/api/rooms"


def _scope(token: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8080"),
            (b"user-agent", b"bench"),
            (b"accept", b"*/*"),
            (b"authorization", f"Bearer {token}".encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }


async def _per_request_us(app: Any, token: str, n: int) -> float:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    for _ in range(200):  # warm: caches filled, code paths hot
        await app(_scope(token), receive, send)
    statuses.clear()
    started = time.perf_counter()
    for _ in range(n):
        await app(_scope(token), receive, send)
    elapsed = time.perf_counter() - started
    if set(statuses) != {200}:
        raise RuntimeError(f"bench request was not answered 200: {sorted(set(statuses))}")
    return elapsed / n * 1e6


async def in_process(rounds: int = 7, n: int = 5000) -> dict[str, float]:
    key = _keys.new_key()
    token = _keys.mint(key)
    bare = apps.bare_app()
    stack = apps.stack_app(_keys.jwks_of(key))
    await stack.startup()
    try:
        bare_us, stack_us = [], []
        for _ in range(rounds):
            bare_us.append(await _per_request_us(bare, apps.LOCAL_TOKEN, n))
            stack_us.append(await _per_request_us(stack, token, n))
    finally:
        await stack.shutdown()
    b, s = statistics.median(bare_us), statistics.median(stack_us)
    return {"bare_us": b, "stack_us": s, "added_us": s - b}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"bench server on port {port} did not start")


def _wrk(port: int, token: str, seconds: int, connections: int) -> float:
    cmd = [
        "taskset",
        "-c",
        "1",
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "-H",
        f"Authorization: Bearer {token}",
        f"http://127.0.0.1:{port}{PATH}",
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 30, check=True
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if not match:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    if non2xx:
        raise RuntimeError(f"{non2xx.group(1)} non-2xx responses; the comparison would be unfair")
    return float(match.group(1))


def loopback(rounds: int = 2, seconds: int = 6, connections: int = 32) -> dict[str, float] | None:
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        print(
            "wrk/taskset not found: skipping the loopback run (apt-get install wrk)",
            file=sys.stderr,
        )
        return None
    key = _keys.new_key()
    token = _keys.mint(key, ttl=900)
    env = {**os.environ, "BENCH_JWKS": json.dumps(_keys.jwks_of(key))}
    results: dict[str, list[float]] = {"bare": [], "stack": []}
    for _ in range(rounds):
        for kind in ("bare", "stack"):
            port = _free_port()
            server = subprocess.Popen(
                [
                    "taskset",
                    "-c",
                    "0",
                    sys.executable,
                    "-m",
                    "bench.serve",
                    kind,
                    "--port",
                    str(port),
                ],
                env=env,
            )
            try:
                _wait_listening(port)
                _wrk(port, apps.LOCAL_TOKEN if kind == "bare" else token, 1, connections)  # warm
                results[kind].append(
                    _wrk(port, apps.LOCAL_TOKEN if kind == "bare" else token, seconds, connections)
                )
            finally:
                server.terminate()
                server.wait(timeout=10)
    bare, stack = statistics.median(results["bare"]), statistics.median(results["stack"])
    return {"bare_rps": bare, "stack_rps": stack, "ratio": stack / bare}


def run() -> dict[str, Any]:
    return {"in_process": asyncio.run(in_process()), "loopback": loopback()}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
