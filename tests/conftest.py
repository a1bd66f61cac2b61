"""Shared fixtures. Backends follow the environment: Redis and PostgreSQL when their URLs are set
(CI sets them), memory and SQLite otherwise."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.helpers.jwks_server", "tests.helpers.leak_watch"]

REDIS_URL = os.environ.get("QUOROOM_TEST_REDIS_URL")
DATABASE_URL = os.environ.get("QUOROOM_TEST_DATABASE_URL")


@pytest.fixture(scope="session")
def redis_url() -> str | None:
    return REDIS_URL


@pytest.fixture(scope="session")
def database_url() -> str | None:
    return DATABASE_URL
