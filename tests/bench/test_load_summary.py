"""The driver's judgement: pass or fail read from sample category CSVs, as locust leaves them."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from bench import load

FIELDS = [
    "category",
    "requests",
    "failures",
    "rps",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "statuses",
    "failed_statuses",
    "events",
    "seconds",
    "wall_seconds",
]


def row(category: str, p99: float, statuses: str, failed: str = "", **extra: Any) -> dict:
    failures = sum(int(v) for v in (p.split(":")[1] for p in failed.split()))
    requests = sum(int(v) for v in (p.split(":")[1] for p in statuses.split()))
    return {
        "category": category,
        "requests": requests,
        "failures": failures,
        "rps": 100,
        "p50_ms": 1.0,
        "p95_ms": p99 / 2,
        "p99_ms": p99,
        "max_ms": p99 * 2,
        "statuses": statuses,
        "failed_statuses": failed,
        "events": 0,
        "seconds": 40,
        "wall_seconds": 40,
        **extra,
    }


def write(tmp_path: Path, name: str, rows: list[dict]) -> dict[str, dict[str, Any]]:
    path = tmp_path / f"{name}_categories.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return load.read_categories(path)


def verdicts(tmp_path: Path, mixed: list[dict], abuse: list[dict], wrk=None) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    results = {
        "ours-mixed": write(tmp_path, "ours-mixed", mixed),
        "ours-abuse": write(tmp_path, "ours-abuse", abuse),
    }
    return {v.target: v.ok for v in load.judge(results, wrk)}


GOOD_MIXED = [row("legit", 12.0, "200:9000 201:50 403:100"), row("ws", 8.0, "ok:900")]
GOOD_ABUSE = [
    row("legit", 13.0, "200:9000 201:50 403:100"),
    row("ws", 9.0, "ok:900"),
    row("flood", 3.0, "200:800 429:15000"),
    row("abuse", 3.0, "401:100 403:20 413:20"),
    row("legit_abused", 13.0, "200:9000 201:50 403:100"),
]
WRK = {"bare": 10000.0, "ours": 9500.0, "peer": 2000.0, "ours_ratio": 0.95, "peer_ratio": 0.2}


def test_a_clean_run_passes_every_target(tmp_path: Path) -> None:
    result = verdicts(tmp_path, GOOD_MIXED, GOOD_ABUSE, WRK)
    assert result and all(ok in (True, None) for ok in result.values()), result
    assert len(result) == 8


def test_legit_429s_are_intended_but_any_other_failure_fails(tmp_path: Path) -> None:
    throttled = [row("legit", 12.0, "200:9000 429:30", failed="429:30"), GOOD_MIXED[1]]
    assert verdicts(tmp_path, throttled, GOOD_ABUSE)[
        "(a) 500 users, mixed: no error other than intended 429s"
    ]
    broken = [row("legit", 12.0, "200:9000 500:1", failed="500:1"), GOOD_MIXED[1]]
    assert not verdicts(tmp_path, broken, GOOD_ABUSE)[
        "(a) 500 users, mixed: no error other than intended 429s"
    ]
    ws_failed = [GOOD_MIXED[0], row("ws", 8.0, "ok:890 error:10", failed="error:10")]
    assert not verdicts(tmp_path, ws_failed, GOOD_ABUSE)[
        "(a) 500 users, mixed: no error other than intended 429s"
    ]


def test_p99_above_50_ms_fails(tmp_path: Path) -> None:
    slow = [row("legit", 50.1, "200:9000"), GOOD_MIXED[1]]
    result = verdicts(tmp_path, slow, GOOD_ABUSE)
    assert result["(a) 500 users, mixed: HTTP p99 ≤ 50 ms"] is False
    on_target = [row("legit", 50.0, "200:9000"), GOOD_MIXED[1]]
    assert verdicts(tmp_path, on_target, GOOD_ABUSE)["(a) 500 users, mixed: HTTP p99 ≤ 50 ms"]


def test_legit_p99_more_than_1_2_times_slower_under_abuse_fails(tmp_path: Path) -> None:
    key = "(b) legit p99 with the abusers ≤ 1.2× without"
    off = row("legit", 12.0, "200:9000")
    abuse = [off, *GOOD_ABUSE[1:4], row("legit_abused", 14.5, "200:9000")]  # 1.21×
    assert verdicts(tmp_path, GOOD_MIXED, abuse)[key] is False
    abuse = [off, *GOOD_ABUSE[1:4], row("legit_abused", 14.4, "200:9000")]
    assert verdicts(tmp_path, GOOD_MIXED, abuse)[key] is True
    # A run with no legitimate request in the abusers' phases cannot pass.
    assert verdicts(tmp_path, GOOD_MIXED, GOOD_ABUSE[:4])[key] is False


def test_with_phases_the_abuse_scenario_is_judged_against_itself(tmp_path: Path) -> None:
    key = "(b) legit p99 with the abusers ≤ 1.2× without"
    # Interleaved: legit_abused (abusers on) against legit (off) of the same run; the mixed
    # scenario's p99 (12 ms here) only stands beside them.
    phased = [
        row("legit", 30.0, "200:4000"),
        row("legit_abused", 35.0, "200:4000"),
        row("legit_edge", 90.0, "200:300"),
        *GOOD_ABUSE[1:4],
    ]
    verdict = next(
        v
        for v in load.judge(
            {
                "ours-mixed": write(tmp_path, "m", GOOD_MIXED),
                "ours-abuse": write(tmp_path, "a", phased),
            },
            None,
        )
        if v.target == key
    )
    assert verdict.ok is True and "35.0 ms vs 30.0 ms = 1.17×" in verdict.figure
    assert "interleaved 2-s phases" in verdict.figure and "12.0 ms" in verdict.figure
    phased[1] = row("legit_abused", 36.5, "200:4000")  # 1.22×
    assert verdicts(tmp_path, GOOD_MIXED, phased)[key] is False
    # A legitimate error in any phase, the edges included, fails it.
    phased[1] = row("legit_abused", 30.0, "200:4000")
    assert verdicts(tmp_path, GOOD_MIXED, phased)[key] is True
    phased[2] = row("legit_edge", 30.0, "200:299 500:1", failed="500:1")
    assert verdicts(tmp_path, GOOD_MIXED, phased)[key] is False


def test_with_phases_the_flooders_allowed_rate_is_over_the_whole_run(tmp_path: Path) -> None:
    key = "(b) flooder at 20× its budget (20/s) is throttled"
    # 1,200 allowed in 20 s of flooding within a 40-s run: the budget (20/s) refilled while the
    # flooder paused, so 30/s of flooding time is 30 · 20 / 40 = 15/s of the run.
    paused = [
        *GOOD_ABUSE[:2],
        row("flood", 3.0, "200:1200 429:7000", seconds=20, wall_seconds=40),
        GOOD_ABUSE[3],
    ]
    assert verdicts(tmp_path, GOOD_MIXED, paused)[key] is True
    leaky = [*paused[:2], row("flood", 3.0, "200:4000 429:4000", seconds=20, wall_seconds=40)]
    assert verdicts(tmp_path, GOOD_MIXED, [*leaky, GOOD_ABUSE[3]])[key] is False


def test_a_flooder_that_is_not_throttled_fails(tmp_path: Path) -> None:
    key = "(b) flooder at 20× its budget (20/s) is throttled"
    unthrottled = [*GOOD_ABUSE[:2], row("flood", 3.0, "200:16000"), GOOD_ABUSE[3]]
    assert verdicts(tmp_path, GOOD_MIXED, unthrottled)[key] is False
    # Refusing some but letting through far more than the budget is no throttle either.
    leaky = [*GOOD_ABUSE[:2], row("flood", 3.0, "200:8000 429:8000"), GOOD_ABUSE[3]]
    assert verdicts(tmp_path, GOOD_MIXED, leaky)[key] is False


def test_an_abuse_that_gets_through_fails(tmp_path: Path) -> None:
    through = [*GOOD_ABUSE[:3], row("abuse", 3.0, "401:100 200:5", failed="200:5")]
    assert not verdicts(tmp_path, GOOD_MIXED, through)[
        "(b) every other abuse refused (401/403/413/429)"
    ]


def test_throughput_below_90_percent_of_bare_fails(tmp_path: Path) -> None:
    key = "(c) our stack ≥ 90% of bare throughput (wrk)"
    assert verdicts(tmp_path, GOOD_MIXED, GOOD_ABUSE, WRK)[key] is True
    # The verdict takes the paired ratio (each round against its own bare run), not the ratio
    # of the two medians: a fast median with slow pairs still fails.
    slow = {**WRK, "ours_ratio": 0.8999}
    assert verdicts(tmp_path, GOOD_MIXED, GOOD_ABUSE, slow)[key] is False


def test_the_paired_ratio_is_the_median_of_the_rounds_ratios() -> None:
    from bench.bench_stack import paired_ratio

    # Round 2 ran in a slow spell for both sides: its pair still says 90 %.
    assert paired_ratio([9000.0, 4500.0, 9300.0], [10000.0, 5000.0, 10000.0]) == 0.9
    # The ratio of the separate medians would mix rounds: 9000 / 10000.
    assert paired_ratio([9500.0, 4000.0], [10000.0, 5000.0]) == (0.95 + 0.8) / 2


def test_the_report_names_each_verdict(tmp_path: Path) -> None:
    results = {"ours-mixed": write(tmp_path, "ours-mixed", GOOD_MIXED)}
    text = load.report(
        results, WRK, load.judge(results, WRK), command="python -m bench.load", notes=["n"]
    )
    assert "| pass |" in text and "python -m bench.load" in text and "- n" in text


# --- (d) the token refresh against the control plane ---------------------------------------------

REFRESH_KEYS = (
    "(d) token refresh at the control plane: no error",
    "(d) token refresh p99 ≤ 50 ms",
    "(d) every refreshed token accepted by the runtime it is for",
)


def refresh_verdicts(tmp_path: Path, rows: list[dict]) -> dict[str, Any]:
    results = {load.REFRESH_SCENARIO: write(tmp_path, load.REFRESH_SCENARIO, rows)}
    return {v.target: v.ok for v in load.judge(results, None)}


def test_a_clean_refresh_run_passes(tmp_path: Path) -> None:
    result = refresh_verdicts(
        tmp_path, [row("refresh", 20.0, "200:600"), row("runtime", 3.0, "200:600")]
    )
    assert {k: result[k] for k in REFRESH_KEYS} == dict.fromkeys(REFRESH_KEYS, True)


def test_refresh_p99_on_and_over_its_target(tmp_path: Path) -> None:
    runtime = row("runtime", 3.0, "200:600")
    on = refresh_verdicts(tmp_path, [row("refresh", 50.0, "200:600"), runtime])
    over = refresh_verdicts(tmp_path, [row("refresh", 50.1, "200:600"), runtime])
    assert on[REFRESH_KEYS[1]] is True and over[REFRESH_KEYS[1]] is False
    assert over[REFRESH_KEYS[0]] is True  # slow is not wrong


def test_any_refused_refresh_is_an_error_429_included(tmp_path: Path) -> None:
    runtime = row("runtime", 3.0, "200:600")
    for failed in ("401:1", "429:1", "error:1"):
        rows = [row("refresh", 20.0, f"200:599 {failed}", failed=failed), runtime]
        assert refresh_verdicts(tmp_path, rows)[REFRESH_KEYS[0]] is False, failed


def test_a_refreshed_token_the_runtime_refuses_fails(tmp_path: Path) -> None:
    rows = [row("refresh", 20.0, "200:600"), row("runtime", 3.0, "200:599 401:1", failed="401:1")]
    result = refresh_verdicts(tmp_path, rows)
    assert result[REFRESH_KEYS[2]] is False and result[REFRESH_KEYS[0]] is True


def test_a_refresh_run_with_no_refreshes_fails_and_no_run_gives_no_verdict(
    tmp_path: Path,
) -> None:
    result = refresh_verdicts(tmp_path, [row("other", 1.0, "200:1")])
    assert result[REFRESH_KEYS[0]] is False and result[REFRESH_KEYS[1]] is False
    assert REFRESH_KEYS[2] not in result  # the runtime was not used: nothing to judge
    assert load.judge_refresh(None) == []
    # And the refresh verdicts stay out of a run without the scenario.
    assert not set(REFRESH_KEYS) & set(verdicts(tmp_path, GOOD_MIXED, GOOD_ABUSE, WRK))


def test_the_refresh_scenario_is_in_the_default_run_and_can_be_left_out() -> None:
    import argparse

    def args(**kw: Any) -> argparse.Namespace:
        base = {
            "no_control_plane": False,
            "cp_url": None,
            "cp_tokens": None,
            "cp_instance": "i",
            "cp_origin": None,
            "refresh_users": load.REFRESH_USERS,
            "seconds": 30,
        }
        return argparse.Namespace(**{**base, **kw})

    scenario, note = load.refresher_scenario(args())
    assert scenario is not None and note is None
    assert (scenario.stack, scenario.users, scenario.seconds) == ("cp", 20, 30)
    assert "BENCH_CP_URL" not in scenario.extra_env  # the driver starts and seeds one
    scenario, note = load.refresher_scenario(args(no_control_plane=True))
    assert scenario is None and note and "left out" in note
    scenario, _ = load.refresher_scenario(args(cp_url="http://127.0.0.1:1", cp_tokens="t.json"))
    assert scenario is not None and scenario.extra_env["BENCH_CP_URL"] == "http://127.0.0.1:1"
    scenario, note = load.refresher_scenario(args(cp_url="http://127.0.0.1:1"))
    assert scenario is None and note and "both" in note


def test_the_speed_note_warns_when_the_host_was_slow() -> None:
    quiet = load.speed_note(131.0, 140.0)
    assert quiet.endswith("131 ms before, 140 ms after.")
    busy = load.speed_note(130.0, 345.0)
    assert "345 ms after" in busy and "the host was busy" in busy
