"""docs/operations.md, the runbook (issue 14, item 5), against the code it tells operators to run.

- Every line of its ```sh blocks starts with a program this project ships (``quoroom-cloud``,
  ``quoroom-runtime``, ``scripts/…``) or a standard tool from a short list.
- Every ``quoroom-cloud`` and ``quoroom-runtime`` line parses with the real parser
  (``control_plane.cli.build_parser()``, ``room_cloud_runtime.cli.build_parser()``), placeholders
  (``INSTANCE``, ``ID``, ``<…>``) replaced by sample values. Parsing runs no handler.
- Every ``QUOROOM_…`` name it mentions is a field of the control plane's ``Settings`` or a
  variable the runtime's source reads; every ``quoroom_cp_*`` metric exists.
- Every alert of ``ops/prometheus/alerts.yml`` and every panel of the dashboard is explained.
- Every repository path it names exists, unless its paragraph says "not yet" or its section
  documents work still to land ("lands with issue …").
- Its ``python -c`` one-liners run, and ``ops/prometheus/prometheus.yml`` passes
  ``promtool check config`` when promtool is installed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

from control_plane import cli as cp_cli
from control_plane.settings import Settings
from room_cloud_runtime import cli as runtime_cli

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "docs" / "operations.md"
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "quoroom-cloud.json"
PROMETHEUS = ROOT / "ops" / "prometheus" / "prometheus.yml"

#: What a runbook step may run besides this project's own commands.
STANDARD_TOOLS = frozenset({"psql", "redis-cli", "fly", "curl", "prometheus", "promtool", "python"})
#: The operator commands the runbook must show at least once.
REQUIRED = {
    ("quoroom-cloud", "migrate"),
    ("quoroom-cloud", "serve"),
    ("quoroom-cloud", "worker"),
    ("quoroom-cloud", "keys", "rotate"),
    ("quoroom-cloud", "ops", "update-image"),
    ("quoroom-cloud", "ops", "restore"),
}
#: A section whose heading says this documents a command still being built: if the parser does
#: not know it yet, its lines are skipped, not failed.
PENDING = re.compile(r"lands with issue \d+", re.IGNORECASE)

SAMPLE_INSTANCE = "0b9f2c1e-4d5a-4c3b-9e8f-7a6b5c4d3e2f"
SAMPLES = {"INSTANCE": SAMPLE_INSTANCE, "ID": "vs_sample", "SECONDS": "900", "N": "2"}
_ANGLE = re.compile(r"<([^<>]+)>")
_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
_PATH = re.compile(
    r"^(?:control_plane|room_cloud_runtime|fly_image|docs|ops|scripts|bench|tests|packaging)/"
    r"[\w./-]*$|^Dockerfile\.runtime$"
)


@dataclass(frozen=True)
class Command:
    section: str
    line: str
    argv: tuple[str, ...]
    env: tuple[str, ...]  # leading NAME=value assignments, names only

    def __str__(self) -> str:  # the test id
        return self.line


def _text() -> str:
    return RUNBOOK.read_text(encoding="utf-8")


@cache
def _commands() -> tuple[Command, ...]:
    """Every command line of the ```sh blocks, continuation lines joined."""
    found: list[Command] = []
    section = ""
    fence: str | None = None
    pending = ""
    for raw in _text().splitlines():
        stripped = raw.strip()
        if fence is None:
            if raw.startswith("## "):
                section = raw[3:].strip()
            elif stripped.startswith("```"):
                fence = stripped[3:].strip()
            continue
        if stripped.startswith("```"):
            fence = None
            continue
        if fence != "sh":
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line, pending = (pending + stripped).strip(), ""
        words = shlex.split(line, comments=True)
        if not words:
            continue
        env = []
        while words and _ASSIGNMENT.match(words[0]):
            env.append(words.pop(0).partition("=")[0])
        found.append(Command(section, line, tuple(words), tuple(env)))
    return tuple(found)


def _ours(program: str) -> list[Command]:
    return [c for c in _commands() if c.argv and c.argv[0] == program]


def _sample(word: str) -> str:
    if word in SAMPLES:
        return SAMPLES[word]

    def fill(match: re.Match[str]) -> str:
        return "0" * 64 if match.group(1).endswith("digest") else "sample"

    return _ANGLE.sub(fill, word)


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"does not parse: {argv}\n{err.getvalue()}")


def _parse_or_skip_pending(
    command: Command, parser: argparse.ArgumentParser, argv: list[str]
) -> argparse.Namespace:
    if PENDING.search(command.section):
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                return parser.parse_args(argv)
        except SystemExit:
            pytest.skip(f"section {command.section!r} documents a command still to land")
    return _parse(parser, argv)


# -- the commands -----------------------------------------------------------------------------


def test_the_runbook_has_commands_of_both_programs() -> None:
    assert len(_ours("quoroom-cloud")) >= 8
    assert _ours("quoroom-runtime")


@pytest.mark.parametrize("command", _commands(), ids=str)
def test_every_step_runs_something_this_project_ships_or_a_standard_tool(
    command: Command,
) -> None:
    program = command.argv[0]
    if program.startswith("scripts/"):
        assert (ROOT / program).is_file(), f"{program} is not in the repository"
        return
    assert program in STANDARD_TOOLS | {"quoroom-cloud", "quoroom-runtime"}, command.line


@pytest.mark.parametrize("command", _ours("quoroom-cloud"), ids=str)
def test_quoroom_cloud_lines_parse(command: Command) -> None:
    argv = [_sample(word) for word in command.argv[1:]]
    args = _parse_or_skip_pending(command, cp_cli.build_parser(), argv)
    assert callable(args.handler)  # a real subcommand, found and not run


@pytest.mark.parametrize("command", _ours("quoroom-runtime"), ids=str)
def test_quoroom_runtime_lines_parse(command: Command) -> None:
    argv = [_sample(word) for word in command.argv[1:]]
    if "--" in argv:  # the Room's own command line (gateway), as main() cuts it
        argv = argv[: argv.index("--")]
    args = _parse_or_skip_pending(command, runtime_cli.build_parser(), argv)
    assert args.command in ("serve", "gateway")


def test_the_operator_commands_are_all_in_the_runbook() -> None:
    shown = set()
    for command in _ours("quoroom-cloud"):
        words = [w for w in command.argv if not w.startswith("-")]
        shown.update(tuple(words[:n]) for n in (2, 3))
    assert REQUIRED <= shown, f"not in the runbook: {sorted(REQUIRED - shown)}"


def test_python_one_liners_run() -> None:
    claims = {"sub": "user-1", "sid": "session-1", "instanceId": SAMPLE_INSTANCE}
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    sample_jwt = f"eyJhbGciOiJFZERTQSJ9.{payload}.c2ln\n"
    lines = _ours("python")
    assert len(lines) >= 3
    for command in lines:
        assert command.argv[1] == "-c", command.line
        done = subprocess.run(
            [sys.executable, *command.argv[1:]],
            input=sample_jwt,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        assert done.returncode == 0, f"{command.line}\n{done.stderr}"
        assert done.stdout.strip(), command.line
        if "stdin" in command.line:  # the token decoder prints the claims
            assert json.loads(done.stdout) == claims


# -- settings, metrics, alerts, panels, paths ---------------------------------------------------


@cache
def _runtime_source() -> str:
    return "\n".join(
        p.read_text(encoding="utf-8") for p in (ROOT / "room_cloud_runtime").glob("*.py")
    )


def _sections() -> list[tuple[str, str]]:
    """(heading, text) of each ``## `` section (the text before the first: heading "")."""
    parts = re.split(r"^## (.*)$", _text(), flags=re.MULTILINE)
    return [("", parts[0]), *zip(parts[1::2], parts[2::2], strict=True)]


def _known_setting(name: str) -> bool:
    if name.startswith("QUOROOM_CP_"):
        return name.removeprefix("QUOROOM_CP_").lower() in Settings.model_fields
    return f'"{name}"' in _runtime_source()


def test_every_setting_the_runbook_names_exists() -> None:
    unknown, seen = set(), set()
    for heading, text in _sections():
        names = {n for n in re.findall(r"QUOROOM_[A-Z0-9_]+", text) if not n.endswith("_")}
        names.update(e for c in _commands() if c.section == heading for e in c.env)
        seen |= names
        if not PENDING.search(heading):  # a section still to land may name its new settings
            unknown |= {n for n in names if not _known_setting(n)}
    assert len(seen) > 30
    assert not unknown, f"named in docs/operations.md, read by no settings code: {sorted(unknown)}"


def test_every_control_plane_metric_the_runbook_names_exists() -> None:
    source = (ROOT / "control_plane" / "metrics.py").read_text(encoding="utf-8")
    for name in set(re.findall(r"\bquoroom_cp_[a-z0-9_]*[a-z0-9]", _text())):
        base = re.sub(r"_(total|bucket|count|sum)$", "", name)
        assert f'"{base}"' in source, name


def test_every_alert_and_every_panel_is_explained() -> None:
    text = _text()
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    alerts = [r["alert"] for g in rules["groups"] for r in g["rules"]]
    assert alerts
    missing = [a for a in alerts if f"`{a}`" not in text]
    panels = [p["title"] for p in json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]]
    assert panels
    missing += [p for p in panels if f"| {p} |" not in text]
    assert not missing, f"not explained in docs/operations.md: {missing}"


def test_every_repository_path_exists_or_is_marked_not_yet() -> None:
    section = ""
    absent = []
    for paragraph in re.split(r"\n\s*\n", _text()):
        heading = re.search(r"^## (.*)$", paragraph, re.MULTILINE)
        if heading:
            section = heading.group(1)
        pending = "not yet" in (paragraph + section).lower() or PENDING.search(section)
        for token in re.findall(r"`([^`\s]+)`", paragraph):
            if _PATH.match(token) and not (ROOT / token).exists() and not pending:
                absent.append(token)
    assert not absent, f"paths that do not exist: {absent}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_the_prometheus_configuration_is_valid() -> None:
    done = subprocess.run(
        ["promtool", "check", "config", str(PROMETHEUS)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_prometheus_configuration_scrapes_what_the_runbook_starts() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    assert config["rule_files"] == ["alerts.yml"]
    targets = [
        t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    ]
    started = [c for c in _commands() if c.argv == ("scripts/run",)]
    assert started and "QUOROOM_CP_METRICS_PORT" in started[0].env
    port = re.search(r"QUOROOM_CP_METRICS_PORT=(\d+) scripts/run", _text())
    assert port is not None and f"127.0.0.1:{port.group(1)}" in targets
    assert any(
        c.argv[0] == "prometheus" and f"--config.file={PROMETHEUS.relative_to(ROOT)}" in c.argv
        for c in _commands()
    )
