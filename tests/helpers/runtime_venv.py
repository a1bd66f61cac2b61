"""The runtime image's venv without Docker: Dockerfile.runtime's builder stage replayed.

Its ``COPY`` steps copy the same files from the repository (less what .dockerignore keeps out of
the context) into a temporary ``WORKDIR``, and its ``RUN`` steps run there with the stage's
``ENV``, ``python`` being this interpreter and ``/opt/venv`` and ``/wheels`` moved into the
temporary folder. Built once per session (tests/fly_image/conftest.py): the image checks and the
entrypoint smoke test use the same venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.fly_image.test_dockerfile import DOCKERFILE, ROOT, Stage, parse_dockerfile

RUNTIME_PYPROJECT = ROOT / "packaging" / "quoroom-runtime" / "pyproject.toml"
# What .dockerignore keeps out of every copied folder.
IGNORED = shutil.ignore_patterns("__pycache__", "*.py[cod]")


def requirements(pyproject: Path) -> dict[str, Requirement]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    found = [Requirement(spec) for spec in project["dependencies"]]
    return {canonicalize_name(req.name): req for req in found}


@dataclass(frozen=True)
class BuiltVenv:
    root: Path
    site_packages: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def distributions(self) -> dict[str, str]:
        done = subprocess.run(
            [str(self.bin / "python"), "-m", "pip", "list", "--format=json"],
            capture_output=True,
            text=True,
            check=True,
        )
        return {canonicalize_name(d["name"]): d["version"] for d in json.loads(done.stdout)}


def stage(name: str) -> Stage:
    stages = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))[1]
    found = [s for s in stages if s.name == name]
    assert len(found) == 1, f"one stage named {name}"
    return found[0]


def copy_into(workdir: Path, args: str) -> None:
    """One ``COPY src... dest`` from the build context (the repository) into ``workdir``."""
    *sources, dest = args.split()
    assert not any(s.startswith("--") for s in sources), f"unexpected COPY flag: {args}"
    target = workdir / dest
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        if path.is_dir():
            shutil.copytree(path, target, ignore=IGNORED, dirs_exist_ok=True)
        else:
            into = target / path.name if dest.endswith("/") or len(sources) > 1 else target
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, into)


def pip_reaches_an_index(scratch: Path) -> str | None:
    """None when pip can fetch one of the pinned dependencies, else why not."""
    pin = requirements(RUNTIME_PYPROJECT)["starlette"]
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(scratch), str(pin)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode == 0:
        return None
    return f"pip cannot reach a package index ({pin}): {done.stderr.strip()[-300:]}"


def build_runtime_venv(base: Path) -> BuiltVenv:
    """The builder stage's venv under ``base``; skips (the whole caller) when pip cannot reach
    a package index, saying why."""
    reason = pip_reaches_an_index(base / "probe")
    if reason:
        pytest.skip(reason)
    builder = stage("builder")
    (workdir_arg,) = builder.all("WORKDIR")
    workdir = base / workdir_arg.lstrip("/")
    workdir.mkdir(parents=True)
    for args in builder.all("COPY"):
        copy_into(workdir, args)
    env = dict(os.environ)
    for args in builder.all("ENV"):
        for token in args.split():
            key, _, value = token.partition("=")
            env[key] = value
    # `python` is this interpreter, as the base image's is the image's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("VIRTUAL_ENV", None)
    venv_root = base / "opt" / "venv"
    builds = [run for run in builder.all("RUN") if "apt-get" not in run]
    assert builds and any("/opt/venv" in run for run in builds)
    for run in builds:
        command = run.replace("/opt/venv", str(venv_root)).replace("/wheels", str(base / "wheels"))
        done = subprocess.run(
            ["sh", "-c", command], cwd=workdir, env=env, capture_output=True, text=True, timeout=240
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    (site,) = venv_root.glob("lib/python*/site-packages")
    return BuiltVenv(venv_root, site)
