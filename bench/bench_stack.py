"""The stack against the bare reference Room on an authenticated GET, with warm caches.

"stack" is what ``wrap()`` serves: the fused pass (``room_cloud_runtime/_fused.py``, issue 13).
"layered" is the same layers composed one inside the other (``RuntimeStack.layered``, what the
stack was before), measured alongside so the fusion's effect is read within one run.

1. In-process: µs per request, calling the ASGI app directly (no server). Bare, stack and
   layered are interleaved in short batches over many rounds; each batch is timed in thread CPU
   time (``time.thread_time``), so time the scheduler gives to other processes on this shared
   2-core machine is not counted. The best batch of each is the figure (best-of-N: noise only
   ever adds), the median is shown too. With valgrind installed, CPU instructions per request
   are counted too (``bench/profile.py --callgrind``: independent of load altogether).
2. Through uvicorn's protocol, no sockets: uvicorn's httptools protocol object is fed the raw
   request bytes on 32 connections at a time and its responses go to an in-memory transport. This
   is the server's CPU per request (parsing, the app, uvicorn's per-header validation of the
   response) without the kernel or the load generator: the least noisy view of what the ratio
   over loopback is made of. A *floor* variant shows what the layered shape alone costs: the
   bare app behind as many no-op pure-ASGI layers as the layered stack has, adding the stack's
   response headers through one ``send`` wrapper; a *headers* variant the same with one layer:
   the ceiling for any stack that sends those headers through uvicorn.
3. Over loopback: the server ``quoroom-runtime serve`` ships (granian, 1 worker, uvloop:
   ``bench/serve.py --server shipped``) pinned to core 0, wrk pinned to core 1, bare and stack
   alternated, each for a bounded duration; requests/s reported (best and median run) with the
   server's CPU time per request (its process tree: granian's worker is a child) read from
   ``/proc`` (user + system).

Targets (issue 13): the stack adds ≤ 5 µs per request in-process and keeps ≥ 90 % of the bare
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
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from . import _keys, apps

PATH = "/api/rooms"
# Pure-ASGI callables a request passes through in the layered stack (RuntimeStack and its nine
# layers in cloud mode, access log off): the floor variant gets as many no-op layers.
STACK_DEPTH = 10


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


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of ``numerator[i] / denominator[i]``: each pair ran back to back,
    so a slow spell of this shared VM (the Room's own CPU per request was seen to swing ×1.7
    between runs minutes apart) slows both sides of a pair, where a ratio of two separate
    medians can take its numerator from a slow round and its denominator from a fast one."""
    return statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))


def _summary(samples: dict[str, list[float]], lower_is_better: bool = True) -> dict[str, float]:
    pick = min if lower_is_better else max
    out: dict[str, float] = {}
    for kind, values in samples.items():
        out[f"{kind}_best"] = pick(values)
        out[f"{kind}_median"] = statistics.median(values)
    return out


# -- 1. in-process ------------------------------------------------------------------------------


async def _batch_us(app: Any, token: str, n: int, receive: Any, send: Any) -> float:
    started = time.thread_time()
    for _ in range(n):
        await app(_scope(token), receive, send)
    return (time.thread_time() - started) / n * 1e6


async def in_process(rounds: int = 150, n: int = 200) -> dict[str, float]:
    key = _keys.new_key()
    token = _keys.mint(key)
    bare = apps.bare_app()
    stack = apps.stack_app(_keys.jwks_of(key))
    layered = _layered(stack)
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await stack.startup()
    try:
        for _ in range(300):  # warm: caches filled, code paths hot
            await bare(_scope(apps.LOCAL_TOKEN), receive, send)
            await stack(_scope(token), receive, send)
            await layered(_scope(token), receive, send)
        samples: dict[str, list[float]] = {"bare": [], "stack": [], "layered": []}
        for _ in range(rounds):
            samples["bare"].append(await _batch_us(bare, apps.LOCAL_TOKEN, n, receive, send))
            samples["stack"].append(await _batch_us(stack, token, n, receive, send))
            samples["layered"].append(await _batch_us(layered, token, n, receive, send))
    finally:
        await stack.shutdown()
    if set(statuses) != {200}:
        raise RuntimeError(f"bench request was not answered 200: {sorted(set(statuses))}")
    out = _summary(samples)
    out["added_us"] = out["stack_best"] - out["bare_best"]
    out["added_median_us"] = out["stack_median"] - out["bare_median"]
    out["layered_added_us"] = out["layered_best"] - out["bare_best"]
    out["rounds"], out["n"] = rounds, n
    return out


def _layered(stack: Any) -> Any:
    """The stack's own layers composed one inside the other, as an app (shared resources)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await stack.layered(scope, receive, send)

    return app


def instructions(requests: int = 2000) -> dict[str, float] | None:
    """CPU instructions per request (callgrind; ``bench/profile.py``), or None without valgrind."""
    if shutil.which("valgrind") is None:
        print("valgrind not found: skipping the instruction counts", file=sys.stderr)
        return None
    from . import profile

    counts = profile.callgrind(["bare", "fused", "layered"], requests)
    return {
        "bare": counts["bare"],
        "stack": counts["fused"],
        "layered": counts["layered"],
        "ratio": counts["bare"] / counts["fused"],
        "layered_ratio": counts["bare"] / counts["layered"],
        "requests": requests,
    }


# -- 2. through uvicorn's protocol, no sockets ----------------------------------------------------


class _MemoryTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def _through_protocol(
    app: Any, request: bytes, rounds: int, connections: int
) -> tuple[float, bytes]:
    """Server CPU µs per request, and the head of the first response."""
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    config = Config(app, http="httptools", lifespan="off", access_log=False, log_level="warning")
    config.load()
    state = ServerState()
    pairs = []
    for _ in range(connections):
        protocol = HttpToolsProtocol(config, state, app_state={})
        transport = _MemoryTransport()
        protocol.connection_made(transport)
        pairs.append((protocol, transport))
    started = time.thread_time()
    for _ in range(rounds):
        for protocol, _ in pairs:
            protocol.data_received(request)
        while state.tasks:
            await asyncio.sleep(0)
    elapsed = time.thread_time() - started
    head = pairs[0][1].out[0].split(b"\r\n\r\n", 1)[0]
    for protocol, _ in pairs:
        protocol.connection_lost(None)
    return elapsed / (rounds * connections) * 1e6, head


def _floor_app(app: Any, headers: list[tuple[bytes, bytes]], depth: int) -> Any:
    """``app`` behind ``depth`` no-op layers, one of them adding ``headers`` at response start."""

    def adding(inner: Any) -> Any:
        async def layer(scope: Any, receive: Any, send: Any) -> None:
            def with_headers(message: Any) -> Awaitable[None]:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", ()), *headers]}
                return send(message)

            await inner(scope, receive, with_headers)

        return layer

    def noop(inner: Any) -> Callable[..., Awaitable[None]]:
        async def layer(scope: Any, receive: Any, send: Any) -> None:
            await inner(scope, receive, send)

        return layer

    out = adding(app)
    for _ in range(depth - 1):
        out = noop(out)
    return out


def _head_headers(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = head.split(b"\r\n")[1:]
    return [tuple(line.split(b": ", 1)) for line in lines]  # type: ignore[misc]


async def protocol(rounds: int = 40, per_round: int = 10, connections: int = 32) -> dict[str, Any]:
    key = _keys.new_key()
    token = _keys.mint(key, ttl=900)

    def request(tok: str) -> bytes:
        return (
            f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAuthorization: Bearer {tok}\r\n\r\n"
        ).encode()

    bare = apps.bare_app()
    stack = apps.stack_app(_keys.jwks_of(key))
    await stack.startup()
    try:
        _, bare_head = await _through_protocol(bare, request(apps.LOCAL_TOKEN), 5, connections)
        _, stack_head = await _through_protocol(stack, request(token), 5, connections)
        for head in (bare_head, stack_head):
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"bench request was not answered 200: {head[:40]!r}")
        bare_headers = _head_headers(bare_head)
        added = [h for h in _head_headers(stack_head) if h not in bare_headers]
        floor = _floor_app(bare, added, STACK_DEPTH)
        variants = {
            "bare": (bare, request(apps.LOCAL_TOKEN)),
            "stack": (stack, request(token)),
            "layered": (_layered(stack), request(token)),
            "floor": (floor, request(apps.LOCAL_TOKEN)),
            "headers": (_floor_app(bare, added, 1), request(apps.LOCAL_TOKEN)),
        }
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, (app, raw) in variants.items():
                us, _ = await _through_protocol(app, raw, per_round, connections)
                samples[name].append(us)
    finally:
        await stack.shutdown()
    out: dict[str, Any] = _summary(samples)
    out["added_us"] = out["stack_best"] - out["bare_best"]
    out["ratio"] = out["bare_best"] / out["stack_best"]
    out["layered_ratio"] = out["bare_best"] / out["layered_best"]
    out["floor_ratio"] = out["bare_best"] / out["floor_best"]
    out["headers_ratio"] = out["bare_best"] / out["headers_best"]
    out["added_headers"] = len(added)
    out["depth"] = STACK_DEPTH
    return out


# -- 3. over loopback -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"bench server on port {port} did not start")


_TASKSET_SERVE = ["taskset", "-c", "0", sys.executable, "-m", "bench.serve"]


def _start_server(
    kind: str, env: dict[str, str], attempts: int = 3, http_server: str = "shipped"
) -> tuple[subprocess.Popen[bytes], int]:
    """Serve ``kind`` pinned to core 0; retried on a fresh port (on a shared machine the port can
    be taken between choosing and binding it, or a start can starve)."""
    for attempt in range(attempts):
        port = _free_port()
        server = subprocess.Popen(
            [*_TASKSET_SERVE, kind, "--port", str(port), "--server", http_server],
            env=env,
        )
        try:
            _wait_listening(port)
        except RuntimeError:
            server.terminate()
            server.wait(timeout=10)
            if attempt == attempts - 1:
                raise
            continue
        return server, port
    raise AssertionError("unreachable")


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (granian serves from a worker process, its child)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                children = Path(f"/proc/{current}/task/{task}/children").read_text().split()
                todo.extend(int(child) for child in children)
        except OSError:
            continue
    return pids


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid``'s process tree so far (Linux ``/proc``; a process that
    has exited counts no more)."""
    total = 0
    for each in _tree(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _wrk(port: int, token: str, seconds: int, connections: int) -> tuple[float, int]:
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
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if not match or not total:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    if non2xx:
        raise RuntimeError(f"{non2xx.group(1)} non-2xx responses; the comparison would be unfair")
    return float(match.group(1)), int(total.group(1))


def loopback(rounds: int = 5, seconds: int = 5, connections: int = 32) -> dict[str, Any] | None:
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        print(
            "wrk/taskset not found: skipping the loopback run (apt-get install wrk)",
            file=sys.stderr,
        )
        return None
    key = _keys.new_key()
    token = _keys.mint(key, ttl=900)
    env = {**os.environ, "BENCH_JWKS": json.dumps(_keys.jwks_of(key))}
    rps: dict[str, list[float]] = {"bare": [], "stack": []}
    cpu: dict[str, list[float]] = {"bare": [], "stack": []}
    for _ in range(rounds):
        for kind in ("bare", "stack"):
            server, port = _start_server(kind, env)
            tok = apps.LOCAL_TOKEN if kind == "bare" else token
            try:
                _wrk(port, tok, 1, connections)  # warm
                before = _cpu_seconds(server.pid)
                per_second, total = _wrk(port, tok, seconds, connections)
                cpu[kind].append((_cpu_seconds(server.pid) - before) / total * 1e6)
                rps[kind].append(per_second)
            finally:
                server.terminate()
                server.wait(timeout=10)
        print(
            f"  loopback round {len(rps['bare'])}: bare {rps['bare'][-1]:.0f} req/s "
            f"{cpu['bare'][-1]:.1f} µs, stack {rps['stack'][-1]:.0f} req/s "
            f"{cpu['stack'][-1]:.1f} µs",
            file=sys.stderr,
        )
    out = _summary(rps, lower_is_better=False)
    out.update({f"cpu_{k}": v for k, v in _summary(cpu).items()})
    out["ratio"] = out["stack_best"] / out["bare_best"]
    out["median_ratio"] = paired_ratio(rps["stack"], rps["bare"])
    out["cpu_ratio"] = out["cpu_bare_best"] / out["cpu_stack_best"]
    out["cpu_median_ratio"] = paired_ratio(cpu["bare"], cpu["stack"])
    out["pairs"] = " · ".join(
        f"{s / b * 100:.1f}" for b, s in zip(rps["bare"], rps["stack"], strict=True)
    )
    out["rounds"], out["seconds"], out["connections"] = rounds, seconds, connections
    return out


def _on_uvloop(coro: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """Run ``coro`` on uvloop, the loop the loopback server uses (``bench/serve.py``)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


def run() -> dict[str, Any]:
    return {
        "in_process": asyncio.run(in_process()),
        "instructions": instructions(),
        "protocol": _on_uvloop(protocol()),
        "loopback": loopback(),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
