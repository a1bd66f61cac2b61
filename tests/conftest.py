"""Shared fixtures. Backends follow the environment: Redis and PostgreSQL when their URLs are set
(CI sets them), memory and SQLite otherwise."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["tests.helpers.jwks_server", "tests.helpers.leak_watch"]

REDIS_URL = os.environ.get("QUOROOM_TEST_REDIS_URL")
DATABASE_URL = os.environ.get("QUOROOM_TEST_DATABASE_URL")


# -- the second CI pass: only what the backends can change ------------------------------------
#
# .ci/run runs the suite on memory/SQLite, then again on Redis/PostgreSQL with
# QUOROOM_TEST_BACKENDS_ONLY=1. The second pass keeps every test that can reach a backend named by
# the environment — one whose fixtures include a backend URL (the control plane's per-test
# database comes from ``database_url``) or whose module reads the URLs itself — and leaves out
# the rest (the runtime against its own servers, the browser flows on their own SQLite files, the
# image checks), which would run the same code twice.
BACKEND_FIXTURES = frozenset({"redis_url", "database_url", "migrated_database"})
_BACKEND_NAMES = ("QUOROOM_TEST_DATABASE_URL", "QUOROOM_TEST_REDIS_URL", "PG_URL")


def _reads_backends(item: pytest.Item, sources: dict[Path, bool]) -> bool:
    if BACKEND_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return True
    path = item.path
    if path not in sources:
        text = path.read_text(encoding="utf-8")
        sources[path] = any(name in text for name in _BACKEND_NAMES)
    return sources[path]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("QUOROOM_TEST_BACKENDS_ONLY") != "1":
        return
    sources: dict[Path, bool] = {}
    keep = [item for item in items if _reads_backends(item, sources)]
    if len(keep) < len(items):
        kept = set(keep)
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = keep


def pytest_collection_finish(session: pytest.Session) -> None:
    """Install the real Room ahead of the tests that run it (``real_room`` marker), outside any
    test's timeout; see tests/helpers/quoroom_room.install_ahead."""
    if any(item.get_closest_marker("real_room") for item in session.items):
        from tests.helpers.quoroom_room import install_ahead

        install_ahead(session.config.pluginmanager.get_plugin("terminalreporter"))


@pytest.fixture(scope="session")
def redis_url() -> str | None:
    return REDIS_URL


@pytest.fixture(scope="session")
def database_url() -> str | None:
    return DATABASE_URL


_OUR_PACKAGES = ("control_plane", "room_cloud_runtime")


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """Undo what a test's ``configure_logging`` (through ``cli.main``) did to the root logger.

    It installs a handler on the ``sys.stderr`` of that moment — pytest's capture, closed after
    the test — and sets the root level. Left in place, a later record from a thread that
    outlived its test (aiosqlite's connection worker) hit the closed stream, and the error it
    raised there failed an unrelated test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        # Only ours: pytest's own capture handlers change per test phase and are its to remove.
        if handler not in handlers and type(handler).__module__.startswith(_OUR_PACKAGES):
            root.removeHandler(handler)
    root.setLevel(level)
