"""Dockerfile.runtime, .dockerignore and the example fly.toml agree with the machine config builder.

No Docker engine runs here, so the Dockerfile is parsed (a small line parser: continuations,
stages, JSON-form instructions) and checked against the constants the builder uses.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fly_image.config import (
    DATA_DIR,
    ENTRYPOINT,
    HEALTH_PATH,
    INTERNAL_PORT,
    Tier,
    build_machine_config,
)

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.runtime"
DIGEST = "sha256:" + "ab" * 32


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        values = self.all(keyword)
        assert values, f"no {keyword} in stage {self.name or self.base}"
        return values[-1]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARGs, stages). Joins ``\\`` continuations and drops comments."""
    logical: list[str] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue  # comment lines inside a continuation are removed by Docker
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    assert not buffer, "dangling line continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may precede FROM, got {keyword}"
            key, _, value = rest.partition("=")
            args[key] = value
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_pairs(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for token in shlex.split(args):
            key, sep, value = token.partition("=")
            assert sep, f"use ENV KEY=VALUE, got {token!r}"
            env[key] = value
    return env


@pytest.fixture(scope="module")
def parsed():
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final(parsed) -> Stage:
    return parsed[1][-1]


@pytest.fixture(scope="module")
def machine_config():
    return build_machine_config(
        instance_id="inst-1",
        owner_id="owner-1",
        tier=Tier(id="starter", cpu_kind="shared", cpus=1, memory_mb=512),
        image=f"registry.fly.io/quoroom-runtime@{DIGEST}",
        issuer="https://cloud.quoroom.ai",
        allowed_origins=["https://app.quoroom.ai"],
        volume_id="vol_abc",
    )


def test_the_dockerfile_is_multi_stage_with_a_python_311_slim_base(parsed):
    args, stages = parsed
    assert len(stages) >= 2
    assert stages[0].name == "builder"
    for stage in stages:
        base = stage.base
        if base.startswith("${"):
            base = args[base[2:-1]]
        assert base.startswith("python:3.11-slim"), base


def test_the_final_stage_copies_the_venv_from_the_builder_and_has_no_build_tools(parsed, final):
    builder = parsed[1][0]
    assert any("build-essential" in run for run in builder.all("RUN"))
    assert any("pip wheel" in run for run in builder.all("RUN"))
    assert any(c.startswith("--from=builder /opt/venv") for c in final.all("COPY"))
    text = " ".join(args for _, args in final.instructions)
    for tool in ("build-essential", "gcc", "g++", "make ", "apt-get install", "pip install"):
        assert tool not in text, f"{tool!r} in the final stage"
    assert not any(c.startswith(("./", ". ")) for c in final.all("COPY")), "no source in final"


def test_the_exposed_port_is_the_services_internal_port(final, machine_config):
    assert final.last("EXPOSE").split() == [str(INTERNAL_PORT)]
    assert machine_config["services"][0]["internal_port"] == INTERNAL_PORT
    assert env_pairs(final)["PORT"] == str(INTERNAL_PORT)


def test_the_healthcheck_probes_the_same_path_and_port_as_the_machine_checks(final, machine_config):
    healthcheck = final.last("HEALTHCHECK")
    match = re.search(r"http://127\.0\.0\.1:(\d+)(/[A-Za-z0-9_/-]*)", healthcheck)
    assert match, healthcheck
    assert int(match.group(1)) == INTERNAL_PORT
    assert match.group(2) == HEALTH_PATH == machine_config["checks"]["healthz"]["path"]
    command = exec_form(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"], "slim has no curl: probe with python"
    compile(command[2], "<healthcheck>", "exec")


def test_the_entrypoint_is_the_command_the_smoke_test_runs(final, machine_config):
    assert exec_form(final.last("ENTRYPOINT")) == list(ENTRYPOINT)
    # The image's CMD and the machine config's init.cmd listen on the same address and port.
    assert exec_form(final.last("CMD")) == machine_config["init"]["cmd"]


def test_the_final_stage_runs_as_a_non_root_user_that_owns_the_data_volume(final):
    user = final.last("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 1000, f"numeric non-root uid, got {user!r}"
    assert gid.isdigit() and int(gid) != 0
    assert any(f"chown {uid}:{gid} {DATA_DIR}" in run for run in final.all("RUN"))
    # USER comes after every RUN (nothing runs as root once the user is set) and before ENTRYPOINT.
    keywords = [kw for kw, _ in final.instructions]
    user_at = keywords.index("USER")
    assert "RUN" not in keywords[user_at:]
    assert keywords.index("ENTRYPOINT") > user_at


def test_data_lives_on_a_declared_volume_at_the_mount_path(final, machine_config):
    assert exec_form(final.last("VOLUME")) == [DATA_DIR]
    assert machine_config["mounts"][0]["path"] == DATA_DIR
    env = env_pairs(final)
    assert env["QUOROOM_DATA_DIR"] == DATA_DIR == machine_config["env"]["QUOROOM_DATA_DIR"]
    assert env["QUOROOM_DEPLOYMENT_MODE"] == "cloud"
    assert final.all("WORKDIR")


def test_the_build_context_excludes_secrets_caches_and_tests():
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for entry in (
        ".venv",
        ".git",
        "var",
        "tests",
        "bench",
        ".env",
        "**/__pycache__",
        ".mypy_cache",
    ):
        assert entry in ignored, entry


def test_the_example_fly_toml_matches_the_builder(machine_config):
    doc = tomllib.loads((ROOT / "fly_image" / "fly.toml").read_text(encoding="utf-8"))
    (service,) = doc["services"]
    built = machine_config["services"][0]
    assert service["internal_port"] == built["internal_port"]
    assert service["auto_stop_machines"] == built["autostop"]
    assert sorted(p["port"] for p in service["ports"]) == sorted(p["port"] for p in built["ports"])
    assert service["concurrency"] == built["concurrency"]
    assert service["http_checks"][0]["path"] == HEALTH_PATH
    assert doc["checks"]["healthz"]["path"] == HEALTH_PATH
    assert doc["checks"]["healthz"]["port"] == INTERNAL_PORT
    assert doc["mounts"][0]["destination"] == DATA_DIR
    assert set(doc["env"]) == set(machine_config["env"])
    assert doc["restart"][0]["policy"] == machine_config["restart"]["policy"]
