"""The server comparison's safety probes (bench/bench_server.py) tell a bounded server from an
unbounded one: what the RESULTS.md "Servers" table reports is what the servers do."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from bench import _keys, bench_server
from bench.bench_stack import _start_server

pytestmark = pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset not installed")


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return {
        **os.environ,
        "BENCH_JWKS": json.dumps(_keys.jwks_of(_keys.new_key())),
        "BENCH_SETTINGS": json.dumps({"head_timeout_seconds": bench_server.HEAD_TIMEOUT}),
    }


@pytest.mark.parametrize(("server", "trickle"), [("shipped", "closed"), ("gateway", "408")])
def test_the_shipped_servers_refuse_a_huge_head_and_end_slow_and_idle_ones(
    env: dict[str, str], server: str, trickle: str
) -> None:
    # serve's granian closes a trickled head (hyper sends no 408); the gateway's uvicorn answers
    result = bench_server.probes(server, env)
    assert result["outcome"].startswith("431")
    assert result["rss_growth_mib"] < 8
    assert result["trickle"].startswith(trickle)
    assert result["idle"].startswith("closed")
    for probe in ("trickle", "idle"):  # "… after 2.0 s": the head timeout, not the probe's end
        seconds = float(result[probe].split(" after ")[1].removesuffix(" s"))
        assert bench_server.HEAD_TIMEOUT - 0.5 <= seconds < bench_server.HEAD_TIMEOUT + 2


def test_plain_uvicorn_buffers_the_whole_head(env: dict[str, str]) -> None:
    proc, port = _start_server("stack", env, http_server="uvicorn")
    try:
        result = bench_server._big_head(port, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert result["outcome"] == "open"
    assert result["sent_mib"] == 32
    assert result["rss_growth_mib"] > 16
