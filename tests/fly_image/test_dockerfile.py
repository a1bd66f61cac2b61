"""Dockerfile.runtime, .dockerignore and the example fly.toml agree with the machine config builder.

No Docker engine runs here, so the Dockerfile is parsed (a small line parser: continuations,
stages, JSON-form instructions) and checked against the constants the builder uses.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fly_image.config import (
    DATA_DIR,
    ENTRYPOINT,
    GATEWAY_ENTRYPOINT,
    HEALTH_PATH,
    INTERNAL_PORT,
    ROOM_CLI,
    ROOM_NODE,
    ROOM_PORT,
    Tier,
    build_machine_config,
)
from tests.helpers.quoroom_room import shared_dir

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


# -- the quoroom target: the gateway in front of the real Room --------------------------------

SHARED_INSTALL = shared_dir() / "quoroom-room" / "install"
PLACEHOLDER = "https://control-plane.quoroom.invalid"


def stage(parsed, name: str) -> Stage:
    found = [s for s in parsed[1] if s.name == name]
    assert len(found) == 1, f"one stage named {name}"
    return found[0]


@pytest.fixture(scope="module")
def quoroom(parsed) -> Stage:
    return stage(parsed, "quoroom")


@pytest.fixture(scope="module")
def room_builder(parsed) -> Stage:
    return stage(parsed, "room-builder")


@pytest.fixture(scope="module")
def quoroom_config():
    return build_machine_config(
        instance_id="inst-1",
        owner_id="owner-1",
        tier=Tier(id="starter", cpu_kind="shared", cpus=1, memory_mb=1024),
        image=f"registry.fly.io/quoroom-gateway@{DIGEST}",
        issuer="https://cloud.quoroom.ai",
        allowed_origins=["https://app.quoroom.ai"],
        volume_id="vol_abc",
        runtime_kind="quoroom",
    )


def test_the_reference_runtime_stays_the_default_target_and_quoroom_is_a_named_one(parsed):
    names = [s.name for s in parsed[1]]
    assert names[-1] == "runtime"  # `docker build` without --target builds the reference Room
    assert names.index("room-builder") < names.index("quoroom") < names.index("runtime")


def test_the_quoroom_stages_run_on_a_debian_whose_nodejs_is_20_or_later(parsed, quoroom):
    args = parsed[0]
    for name in ("room-builder", "quoroom"):
        base = stage(parsed, name).base
        assert base == "${QUOROOM_PYTHON_IMAGE}", base
    # bookworm ships nodejs 18; trixie ships 20.
    assert args["QUOROOM_PYTHON_IMAGE"].startswith("python:3.11-slim-trixie")
    (install,) = [run for run in quoroom.all("RUN") if "apt-get install" in run]
    assert "--no-install-recommends" in install
    assert re.search(r"\bnodejs\b", install) and re.search(r"\bnpm\b", install)


def test_the_room_is_installed_pinned_without_install_scripts_and_sqlite_built_from_source(
    room_builder,
):
    builder_args = dict(a.partition("=")[::2] for a in room_builder.all("ARG"))
    version = builder_args["QUOROOM_ROOM_VERSION"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), "an exact version, not a range"
    if SHARED_INSTALL.exists():  # the version ../shared/quoroom-room/install installs
        assert f"QUOROOM_ROOM_VERSION:-{version}" in SHARED_INSTALL.read_text()
    runs = " ".join(room_builder.all("RUN"))
    assert any("build-essential" in run and "libnode-dev" in run for run in room_builder.all("RUN"))
    assert (
        'npm install --no-audit --no-fund --ignore-scripts "quoroom@${QUOROOM_ROOM_VERSION}"'
        in runs
    )
    assert "npm_config_build_from_source=true npm rebuild better-sqlite3 --nodedir=/usr" in runs
    assert "require('better-sqlite3')" in runs  # the native module loads, or the build fails
    assert room_builder.last("WORKDIR") + "/node_modules/quoroom/out/mcp/cli.js" == ROOM_CLI


def test_the_ui_comes_from_the_named_context_built_for_the_control_origin(room_builder):
    (ui,) = [c for c in room_builder.all("COPY") if c.startswith("--from=quoroom_room ")]
    source, target = ui.split()[1:]
    assert source == "ui-cloud"
    assert target == ROOM_CLI.replace("/mcp/cli.js", "/ui")
    assert "CONTROL_ORIGIN" in room_builder.all("ARG"), "required: no default origin"
    (origin,) = [run for run in room_builder.all("RUN") if "CONTROL_ORIGIN" in run]
    assert f"s#{PLACEHOLDER}#${{CONTROL_ORIGIN}}#g" in origin
    assert f"! grep -rqF {PLACEHOLDER}" in origin  # nothing left pointing at the placeholder
    assert "exit 1" in origin  # no origin (or not an origin): no image
    if SHARED_INSTALL.exists():
        assert f"PLACEHOLDER={PLACEHOLDER}" in SHARED_INSTALL.read_text()


def test_the_control_origin_check_accepts_origins_only(room_builder):
    (origin,) = [run for run in room_builder.all("RUN") if "CONTROL_ORIGIN" in run]
    pattern = re.search(r"grep -Eq '([^']+)'", origin)
    assert pattern
    check = re.compile(pattern.group(1))
    for good in ("https://cloud.quoroom.ai", "http://127.0.0.1:8000"):
        assert check.search(good), good
    for bad in (
        "",
        "cloud.quoroom.ai",
        "https://cloud.quoroom.ai/",
        "https://a.b/#x",
        "https://a#b",
    ):
        assert not check.search(bad), bad


def test_every_run_of_the_quoroom_stages_is_valid_shell(room_builder, quoroom):
    for run in [*room_builder.all("RUN"), *quoroom.all("RUN")]:
        done = subprocess.run(["sh", "-n", "-c", run], capture_output=True, text=True)
        assert done.returncode == 0, (run, done.stderr)


def test_the_quoroom_stage_has_no_build_tools_and_copies_only_built_artefacts(quoroom):
    text = " ".join(args for _, args in quoroom.instructions)
    for tool in (
        "build-essential",
        "gcc",
        "g++",
        "make ",
        "libnode-dev",
        "pip install",
        "npm install",
    ):
        assert tool not in text, f"{tool!r} in the quoroom stage"
    copies = sorted(quoroom.all("COPY"))
    assert copies == [
        "--from=builder /opt/venv /opt/venv",
        "--from=room-builder /opt/quoroom /opt/quoroom",
    ]


def test_the_quoroom_entrypoint_is_the_gateway_with_the_machine_configs_command(
    quoroom, quoroom_config
):
    assert exec_form(quoroom.last("ENTRYPOINT")) == list(GATEWAY_ENTRYPOINT)
    command = exec_form(quoroom.last("CMD"))
    assert command == quoroom_config["init"]["cmd"]
    assert command[command.index("--") + 1 :] == [
        ROOM_NODE, ROOM_CLI, "serve", "--port", str(ROOM_PORT)
    ]  # fmt: skip
    assert f"http://127.0.0.1:{ROOM_PORT}" == command[command.index("--upstream") + 1]
    assert quoroom.last("EXPOSE").split() == [str(INTERNAL_PORT)]
    assert env_pairs(quoroom)["PORT"] == str(INTERNAL_PORT)


def test_the_quoroom_healthcheck_probes_the_gateways_healthz(quoroom, quoroom_config):
    healthcheck = quoroom.last("HEALTHCHECK")
    match = re.search(r"http://127\.0\.0\.1:(\d+)(/[A-Za-z0-9_/-]*)", healthcheck)
    assert match, healthcheck
    assert int(match.group(1)) == INTERNAL_PORT != ROOM_PORT
    assert match.group(2) == HEALTH_PATH == quoroom_config["checks"]["healthz"]["path"]
    command = exec_form(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"]
    compile(command[2], "<healthcheck>", "exec")


def test_the_quoroom_stage_runs_as_uid_10001_and_keeps_everything_of_the_room_on_the_volume(
    quoroom, quoroom_config
):
    assert quoroom.last("USER") == "10001:10001"
    assert any(f"chown 10001:10001 {DATA_DIR}" in run for run in quoroom.all("RUN"))
    keywords = [kw for kw, _ in quoroom.instructions]
    user_at = keywords.index("USER")
    assert "RUN" not in keywords[user_at:] and keywords.index("ENTRYPOINT") > user_at
    assert exec_form(quoroom.last("VOLUME")) == [DATA_DIR]
    assert quoroom_config["mounts"][0]["path"] == DATA_DIR
    env = env_pairs(quoroom)
    assert env["QUOROOM_DATA_DIR"] == DATA_DIR == quoroom_config["env"]["QUOROOM_DATA_DIR"]
    assert env["QUOROOM_DEPLOYMENT_MODE"] == "cloud"
    # The Room's HOME and npm's global prefix (provider CLIs it installs) live on the volume.
    for name in ("HOME", "npm_config_prefix"):
        assert env[name] == DATA_DIR or env[name].startswith(DATA_DIR + "/"), name
    path = env["PATH"].split(":")
    assert path[0] == env["npm_config_prefix"] + "/bin"
    assert "/opt/venv/bin" in path


@pytest.mark.skipif(
    not SHARED_INSTALL.exists(), reason=f"needs {SHARED_INSTALL} (QUOROOM_SHARED_DIR)"
)
@pytest.mark.parametrize(
    ("origin", "ok"),
    [
        ("https://cloud.quoroom.ai", True),
        ("http://127.0.0.1:8000", True),
        ("", False),
        ("https://cloud.quoroom.ai/", False),
        ("cloud.quoroom.ai", False),
    ],
)
def test_the_ui_step_writes_the_origin_into_the_real_ui_or_fails_the_build(
    room_builder, tmp_path, origin, ok
):
    """The RUN that follows the UI's COPY, run as the build runs it (in WORKDIR, sh -c) on a copy
    of the real ui-cloud folder."""
    import shutil

    ui = tmp_path / "node_modules" / "quoroom" / "out" / "ui"
    shutil.copytree(SHARED_INSTALL.parent / "ui-cloud", ui)
    (run,) = [r for r in room_builder.all("RUN") if "CONTROL_ORIGIN" in r]
    done = subprocess.run(
        ["sh", "-c", run],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "CONTROL_ORIGIN": origin},
        capture_output=True,
        text=True,
    )
    assert (done.returncode == 0) is ok, done.stderr
    scripts = "".join(p.read_text() for p in (ui / "assets").glob("*.js"))
    if ok:
        assert PLACEHOLDER not in scripts
        assert f'"{origin}".replace(' in scripts  # the refresh call's base URL
    else:
        assert "CONTROL_ORIGIN" in done.stderr and PLACEHOLDER in scripts
