"""The locustfile imports and declares its users.

Imported in a subprocess: locust monkey-patches the standard library with gevent on import and
gevent/locust emit warnings of their own, neither of which belongs in the test process (where
warnings are errors).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json
import bench.locustfile as lf
users = {n: (c.weight, getattr(c, "fixed_count", 0)) for n, c in vars(lf).items()
         if isinstance(c, type) and issubclass(c, lf.User) and not c.__dict__.get("abstract")}
values = sorted([5.0, 1.0, 4.0, 2.0, 3.0] * 20)
print(json.dumps({"users": users, "p50": lf.percentile(values, 50),
                  "p99": lf.percentile(values, 99), "empty": lf.percentile([], 99)}))
"""


def test_the_locustfile_imports_and_declares_every_user_class() -> None:
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    probe = json.loads(out.strip().splitlines()[-1])
    users = probe["users"]
    assert {
        "OwnerUser",
        "MemberUser",
        "WebSocketUser",
        "TokenRefresherUser",
        "FloodUser",
        "AbuserUser",
    } <= set(users)
    # Abusers only run when the driver names them, and then at fixed counts.
    assert users["FloodUser"] == [0, 4] and users["AbuserUser"] == [0, 1]
    # No control plane configured: the refresher has no weight.
    assert users["TokenRefresherUser"][0] == 0
    assert (probe["p50"], probe["p99"], probe["empty"]) == (3.0, 5.0, 0.0)


REFRESHER_PROBE = """
import json
import bench.locustfile as lf
wait = [lf.TokenRefresherUser.wait_time(None) for _ in range(200)]
print(json.dumps({"weight": lf.TokenRefresherUser.weight, "runtime": lf.RUNTIME_URL,
                  "low": min(wait), "high": max(wait)}))
"""


def test_the_refresher_runs_when_the_driver_gives_a_control_plane(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"control_plane": ["t1", "t2"]}))
    env = {
        "PATH": "/usr/bin:/bin",
        "BENCH_CP_URL": "http://127.0.0.1:1",
        "BENCH_TOKENS": str(tokens),
        "BENCH_RUNTIME_URL": "http://127.0.0.1:2",
        "BENCH_REFRESH_WAIT": "0.5,1.5",
    }
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", REFRESHER_PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    probe = json.loads(out.strip().splitlines()[-1])
    assert probe["weight"] == 1 and probe["runtime"] == "http://127.0.0.1:2"
    assert 0.5 <= probe["low"] < probe["high"] <= 1.5
