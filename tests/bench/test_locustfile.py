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


def probe(script: str, env: dict[str, str] | None = None) -> dict:  # type: ignore[type-arg]
    """Run ``script`` (which prints one JSON line last) in a fresh interpreter; its answer."""
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


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
    answer = probe(PROBE)
    users = answer["users"]
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
    assert (answer["p50"], answer["p99"], answer["empty"]) == (3.0, 5.0, 0.0)


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
    answer = probe(REFRESHER_PROBE, env)
    assert answer["weight"] == 1 and answer["runtime"] == "http://127.0.0.1:2"
    assert 0.5 <= answer["low"] < answer["high"] <= 1.5


PHASE_PROBE = """
import json, time
import bench.locustfile as lf
e, p = lf.PHASE_EPOCH, lf.PHASE_SECONDS
cases = {
    "on": [lf.abusers_on(e + t) for t in (0.1, 4.9, 5.1, 9.9, 10.1, 15.2)],
    "until": [round(lf.until_abuse(e + t), 3) for t in (1.0, 6.0, 12.5)],
    "abuse_seconds": [round(lf.abuse_seconds(e + a, e + b), 3)
                      for a, b in ((0, 20), (2, 7), (6, 16), (11, 12))],
}
# A request filed by the phase it ran in, measured back from now (time.time()).
def filed(ago_end, ms):
    real = time.time
    time.time = lambda: e + ago_end
    try:
        return lf.phase_category("legit", ms)
    finally:
        time.time = real
cases["filed"] = [filed(2.0, 10), filed(7.0, 10), filed(5.2, 10), filed(4.9, 100),
                  filed(5.6, 1000), filed(12.0, 10)]
cases["other"] = lf.phase_category("ws", 10)
# A paced abuser asked to wait in the off phase waits on to the next on phase.
real = time.time
time.time = lambda: e + 1.0
try:
    cases["wait"] = round(lf.paced_by_phase(lambda user: 0.25)(None), 3)
finally:
    time.time = real
print(json.dumps(cases))
"""


def test_abusers_send_in_alternate_phases_and_legit_requests_are_filed_by_phase() -> None:
    answer = probe(
        PHASE_PROBE,
        {"PATH": "/usr/bin:/bin", "BENCH_PHASE_EPOCH": "1000.0", "BENCH_PHASE_SECONDS": "5"},
    )
    # Phase 0 (0-5 s) without abusers, phase 1 (5-10 s) with them, and so on.
    assert answer["on"] == [False, False, True, True, False, True]
    assert answer["until"] == [4.0, 0.0, 2.5]
    assert answer["abuse_seconds"] == [10.0, 2.0, 5.0, 0.0]
    # By the start: off phase; on phase; started 0.19 s after a switch and 0.2 s before one
    # (edges); started at 4.6 s, in the off phase, and ended in the next; off again (10-15 s).
    assert answer["filed"] == [
        "legit",
        "legit_abused",
        "legit_edge",
        "legit_edge",
        "legit",
        "legit",
    ]
    assert answer["other"] == "ws"
    assert answer["wait"] == 4.0  # 0.25 s of pacing, then on to the phase starting at 5 s
