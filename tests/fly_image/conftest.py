"""The runtime image's venv, built once per session (tests/helpers/runtime_venv.py)."""

from __future__ import annotations

import pytest

from tests.helpers.runtime_venv import BuiltVenv, build_runtime_venv


@pytest.fixture(scope="session")
def venv(tmp_path_factory: pytest.TempPathFactory) -> BuiltVenv:
    return build_runtime_venv(tmp_path_factory.mktemp("runtime-image"))
