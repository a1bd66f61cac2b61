"""``quoroom-runtime serve`` as shipped: the stack under granian (issue 13, the server item), with
the bounds of the hardening work (issue 12, item 2) — run as the real command, in a subprocess,
driven over raw sockets. The gateway's server (uvicorn, guarded httptools) is test_server.py's."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.runtime.test_server import read_all

APP = ("--app", "tests.runtime.server_apps:route")


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def worker_pid(self) -> int:
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(out) == 1, out
        return int(out[0])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(folder: Path, **env: str) -> Served:
    port = _free_port()
    log = folder / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "room_cloud_runtime.cli", "serve", "--port", str(port), *APP],
            env={**os.environ, "QUOROOM_DEPLOYMENT_MODE": "local", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    served = Served(process, port, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            socket.create_connection(served.address, timeout=1).close()
            return served
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"serve did not listen in 30 s:\n{log.read_text()}")


def _stop(served: Served) -> int:
    served.process.terminate()
    return served.process.wait(timeout=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    served = _serve(
        tmp_path_factory.mktemp("serve"),
        QUOROOM_HEAD_TIMEOUT_SECONDS="1",
        QUOROOM_MAX_HEADER_BYTES="8192",
    )
    yield served.address
    assert _stop(served) == 0


HEAD = b"Host: 127.0.0.1\r\n"


def _request(path: bytes, *lines: bytes, body: bytes = b"") -> bytes:
    return b"POST " + path + b" HTTP/1.1\r\n" + HEAD + b"".join(lines) + b"\r\n" + body


def test_a_request_with_its_body_in_the_same_packet_is_served(server):
    with socket.create_connection(server) as conn:
        conn.sendall(_request(b"/", b"Content-Length: 60000\r\n", body=b"x" * 60_000))
        conn.settimeout(5)
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")


def test_a_huge_header_is_refused_with_431_before_it_is_buffered(server):
    with socket.socket() as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)  # test_server.py says why
        conn.connect(server)
        conn.sendall(b"GET / HTTP/1.1\r\n" + HEAD + b"X-Big: ")
        sent = 0
        with pytest.raises(OSError):  # the server hangs up long before 64 MiB
            for _ in range(1024):
                conn.sendall(b"a" * 65536)
                sent += 65536
        assert sent < 4 << 20
        assert read_all(conn).startswith(b"HTTP/1.1 431")


def _trickle(conn: socket.socket, data: bytes, every: float = 0.2) -> tuple[bytes, float]:
    """Send ``data`` a byte at a time; what came back and when the server hung up."""
    started = time.monotonic()
    answer = b""
    conn.settimeout(every)
    for byte in data:
        try:
            conn.sendall(bytes([byte]))
            chunk = conn.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        answer += chunk
    return answer, time.monotonic() - started


def test_a_trickled_head_is_cut_off_at_the_deadline(server):
    with socket.create_connection(server) as conn:
        answer, took = _trickle(conn, b"GET / HTTP/1.1\r\n" + HEAD + b"X-Slow: " + b"a" * 100)
        assert answer == b""  # closed; hyper sends no 408
        assert 0.9 < took < 3


def test_a_connection_that_sends_nothing_is_closed_at_the_deadline(server):
    with socket.create_connection(server) as conn:
        started = time.monotonic()
        assert read_all(conn, wait=5) == b""
        assert time.monotonic() - started < 3


def test_a_slow_second_head_on_a_kept_alive_connection_is_cut_off_too(server):
    with socket.create_connection(server) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\n" + HEAD + b"\r\n")
        conn.settimeout(5)
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        conn.sendall(b"GET / HTTP/1.1\r\n" + HEAD)  # never finished
        assert read_all(conn) == b""
        assert time.monotonic() - started < 3


def test_a_client_still_sending_after_an_early_answer_reads_it_and_keeps_the_connection(server):
    with socket.create_connection(server) as conn:
        conn.sendall(_request(b"/early", b"Content-Length: 2097152\r\n"))
        for _ in range(32):
            conn.sendall(b"x" * 65536)
        conn.settimeout(5)
        answer = b""
        while b"too large" not in answer:
            answer += conn.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413")
        conn.sendall(b"GET / HTTP/1.1\r\n" + HEAD + b"\r\n")  # the connection lives on
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")


def test_the_rest_of_a_body_after_an_early_answer_must_arrive_within_the_head_deadline(server):
    with socket.create_connection(server) as conn:
        conn.sendall(_request(b"/early", b"Content-Length: 1000\r\n", body=b"xx"))
        answer, took = _trickle(conn, b"x" * 50)  # a byte every 0.2 s, never finishing
        assert answer.startswith(b"HTTP/1.1 413")
        assert took < 3


def test_expect_100_continue_gets_no_100_before_an_early_answer_and_one_when_read(server):
    with socket.create_connection(server) as conn:
        conn.sendall(_request(b"/early", b"Content-Length: 10\r\n", b"Expect: 100-continue\r\n"))
        assert read_all(conn, wait=0.5).startswith(b"HTTP/1.1 413")
    with socket.create_connection(server) as conn:
        conn.sendall(_request(b"/", b"Content-Length: 10\r\n", b"Expect: 100-continue\r\n"))
        assert read_all(conn, wait=0.5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        conn.sendall(b"x" * 10)
        assert read_all(conn, wait=0.5).startswith(b"HTTP/1.1 200")


def test_requests_past_the_cap_wait_for_a_free_slot(tmp_path):
    served = _serve(tmp_path, QUOROOM_MAX_CONNECTIONS="2")
    try:
        held = [socket.create_connection(served.address) for _ in range(2)]
        for conn in held:  # two requests in flight, their bodies still to come
            conn.sendall(_request(b"/", b"Content-Length: 2\r\n", body=b"x"))
        time.sleep(0.2)
        with socket.create_connection(served.address) as third:
            third.sendall(b"GET / HTTP/1.1\r\n" + HEAD + b"\r\n")
            assert read_all(third, wait=0.5) == b""  # waits: not served past the cap
            for conn in held:
                conn.sendall(b"x")
                assert read_all(conn, wait=0.5).startswith(b"HTTP/1.1 200")
                conn.close()
            assert read_all(third, wait=2).startswith(b"HTTP/1.1 200")
    finally:
        assert _stop(served) == 0


def test_a_dead_worker_stops_serve_with_a_non_zero_status(tmp_path):
    served = _serve(tmp_path)
    os.kill(served.worker_pid(), signal.SIGKILL)
    assert served.process.wait(timeout=20) != 0
    assert "Unexpected exit from worker" in served.log.read_text()


@pytest.mark.parametrize(
    ("headers", "drained"),
    [
        ([], False),
        ([(b"content-length", b"0")], False),
        ([(b"content-length", b"10")], True),
        ([(b"transfer-encoding", b"chunked")], True),
        ([(b"content-length", b"10"), (b"expect", b"100-Continue")], False),
        ([(b"expect", b"100-continue"), (b"transfer-encoding", b"chunked")], False),
        ([(b"host", b"a"), (b"content-length", b" 5 ")], True),
    ],
)
def test_which_requests_get_their_unread_body_drained(headers, drained):
    from room_cloud_runtime._server import _has_unsent_body

    assert _has_unsent_body(headers) is drained
