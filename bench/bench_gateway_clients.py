"""Which HTTP client the gateway forwards with: httpx, aiohttp or the gateway's own lean client
(``room_cloud_runtime._upstream_http``: asyncio protocol + httptools), measured.

The gateway's upstream leg is one keep-alive GET (or a streamed body) per request to a Room on
loopback, so the figure that matters is the client's CPU per request at a realistic concurrency.
An upstream Node server (the same runtime as the real Room: ``http.createServer`` answering a
~2 KB JSON body) runs pinned to core 0; each client runs pinned to core 1 with 32 concurrent
requests in flight, bodies read as raw streamed chunks (what the proxy does).

    .venv/bin/python -m bench.bench_gateway_clients [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time

NODE_SERVER = r"""
const http = require('http');
const body = JSON.stringify({rooms: Array.from({length: 12}, (_, i) => ({id: i, name: 'room ' + i,
  goal: 'x'.repeat(100), status: 'active'}))});
http.createServer((req, res) => {
  const headers = {'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body)};
  res.writeHead(200, headers);
  res.end(body);
}).listen(+process.argv[1], '127.0.0.1', () => console.log('ready'));
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _run(fetch, n: int, concurrency: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``n`` fetches: imports and pool warm-up not counted."""
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await fetch()

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, time.process_time() - cpu


async def bench_httpx(url: str, n: int, concurrency: int) -> tuple[float, float]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits) as client:

        async def fetch() -> None:
            async with client.stream("GET", url) as response:
                async for _ in response.aiter_raw():
                    pass

        await _run(fetch, 200, concurrency)  # warm the pool
        return await _run(fetch, n, concurrency)


async def bench_aiohttp(url: str, n: int, concurrency: int) -> tuple[float, float]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency, local_addr=("127.77.0.1", 0))
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

        async def fetch() -> None:
            async with session.get(url) as response:
                async for _ in response.content.iter_any():
                    pass

        await _run(fetch, 200, concurrency)
        return await _run(fetch, n, concurrency)


async def bench_lean(url: str, n: int, concurrency: int) -> tuple[float, float]:
    from urllib.parse import urlsplit

    from room_cloud_runtime._upstream_http import UpstreamPool, request_head

    parts = urlsplit(url)
    pool = UpstreamPool(parts.hostname or "127.0.0.1", parts.port or 80)
    head = request_head("GET", parts.path, [(b"host", parts.netloc.encode())])

    async def fetch() -> None:
        response = await pool.request("127.77.0.1", head)
        async for _ in response.chunks():
            pass
        response.release()

    await _run(fetch, 200, concurrency)
    try:
        return await _run(fetch, n, concurrency)
    finally:
        await pool.aclose()


BENCHES = {"httpx": bench_httpx, "aiohttp": bench_aiohttp, "lean": bench_lean}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--client", choices=sorted(BENCHES))
    parser.add_argument("--url")
    args = parser.parse_args()
    if args.client:  # child: one client, pinned by the parent
        bench = BENCHES[args.client]
        wall, cpu = asyncio.run(bench(args.url, args.requests, args.concurrency))
        print(f"{args.requests / wall:.0f} {cpu / args.requests * 1e6:.1f}")
        return 0
    node = shutil.which("node")
    if node is None:
        print("node is required", file=sys.stderr)
        return 1
    port = _free_port()
    server = subprocess.Popen(
        ["taskset", "-c", "0", node, "-e", NODE_SERVER, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        url = f"http://127.0.0.1:{port}/api/rooms"
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in BENCHES}
        for _ in range(3):  # interleaved rounds
            for client in results:
                out = subprocess.run(
                    [
                        "taskset",
                        "-c",
                        "1",
                        sys.executable,
                        "-m",
                        "bench.bench_gateway_clients",
                        "--client",
                        client,
                        "--url",
                        url,
                        "--requests",
                        str(args.requests),
                        "--concurrency",
                        str(args.concurrency),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    env={**os.environ},
                )
                rps, us = out.stdout.split()
                results[client].append((float(rps), float(us)))
        print("| client | requests/s (median of 3) | client CPU µs/request |")
        print("|---|---|---|")
        for client, rows in results.items():
            rows.sort()
            print(f"| {client} | {rows[1][0]:,.0f} | {sorted(r[1] for r in rows)[1]:.1f} |")
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
