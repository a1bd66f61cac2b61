"""bench/gateway_floors.py forwards for real (each mode, kept-alive connections), and
bench_gateway reports the floors next to the gateway."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from bench.bench_gateway import FLOOR_MODES, WrkRun, _floors_markdown
from tests.helpers.quoroom_room import free_port

ROOT = Path(__file__).resolve().parents[2]


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the Room

    def do_GET(self) -> None:
        body = json.dumps(
            {"path": self.path, "authorization": self.headers.get("Authorization")}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("mode", FLOOR_MODES)
def test_each_floor_forwards_requests_and_answers_on_a_kept_alive_connection(
    upstream: int, mode: str
) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.gateway_floors", mode, str(upstream), str(port)], cwd=ROOT
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            deadline = time.monotonic() + 20
            while True:
                try:
                    first = client.get("/api/rooms?x=1", headers={"Authorization": "Bearer t1"})
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            second = client.get("/api/rooms", headers={"Authorization": "Bearer t2"})
        assert first.status_code == second.status_code == 200
        # The floors check nothing: the client's token reaches the upstream as sent.
        assert first.json() == {"path": "/api/rooms?x=1", "authorization": "Bearer t1"}
        assert second.json() == {"path": "/api/rooms", "authorization": "Bearer t2"}
    finally:
        process.terminate()
        process.wait(10)


class _Transport:
    def __init__(self, closing: bool = False) -> None:
        self.written: list[bytes] = []
        self.closing = closing

    def write(self, data: bytes) -> None:
        if self.closing:  # what uvloop does: RuntimeError, "the handler is closed"
            raise RuntimeError("unable to perform operation: the handler is closed")
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing


@pytest.mark.parametrize("parse", [False, True])
def test_bytes_for_a_side_that_is_closing_are_dropped(parse: bool) -> None:
    # At the end of a wrk run the client's socket closes while the Room's answer is arriving:
    # the forwarder must drop it, not raise in uvloop's read callback ("Fatal error on
    # transport"), and the same the other way round.
    from bench.gateway_floors import _Downstream, _Upstream

    down = _Downstream(upstream_port=1, parse=parse)
    down.transport = _Transport(closing=True)  # type: ignore[assignment]
    up = _Upstream(down, parse)
    up.transport = _Transport()  # type: ignore[assignment]
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]")
    assert down.transport.written == []  # type: ignore[attr-defined]
    down.up = up
    up.transport.closing = True  # type: ignore[attr-defined]
    down.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert up.transport.written == []  # type: ignore[attr-defined]
    # Open sides get the bytes.
    up.transport.closing = False  # type: ignore[attr-defined]
    down.data_received(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    assert up.transport.written == [b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"]  # type: ignore[attr-defined]


def test_a_bad_mode_is_refused_with_the_usage() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.gateway_floors", "splice", "1", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "usage" in out.stdout


def _run(case: str, rps: float, **cpu: float) -> WrkRun:
    return WrkRun(case, rps, int(rps * 10), 0, 0, 1.0, 2.0, cpu)


def test_the_floors_table_gives_each_forwarder_its_paired_ratio_to_the_direct_room() -> None:
    floors = {
        "direct": [_run("direct", 8000, room=120), _run("direct", 6000, room=125)],
        "pipe": [_run("pipe", 6400, proxy=40, room=118), _run("pipe", 4200, proxy=42, room=121)],
        "parse": [_run("parse", 6000, proxy=45, room=119), _run("parse", 4500, proxy=44, room=120)],
        "callback": [
            _run("callback", 5600, proxy=50, room=118),
            _run("callback", 4800, proxy=52, room=121),
        ],
        "asgi": [_run("asgi", 4800, proxy=80, room=119), _run("asgi", 3000, proxy=90, room=122)],
    }
    gateway = [_run("gateway", 4000, gateway=134, room=117)]
    text = "\n".join(_floors_markdown(floors, gateway, 10))
    # pipe: 6400/8000 = 80 %, 4200/6000 = 70 % → median 75 %; asgi: 60 % and 50 % → 55 %.
    assert "| 75.0 % | 41 | 120 |" in text
    assert "| 55.0 % | 85 | 120 |" in text
    # callback: 70 % and 80 % → 75 %.
    assert "(no ASGI cycle, no task) | 5,200 | 75.0 % | 51 | 120 |" in text
    assert "| none (the direct Room) | 7,000 | 100 % | – | 122 |" in text
    assert "| 4,000 | – | 134 | 117 |" in text
