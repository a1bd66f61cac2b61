"""Control-plane fixtures: a migrated database per test (SQLite, or PostgreSQL when
QUOROOM_TEST_DATABASE_URL is set), the app driven in-process with its lifespan, a fake clock, and
a mail transport that records what would be sent."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from control_plane.app import create_app
from control_plane.db import create_engine
from control_plane.mail import Mail, Mailer
from control_plane.migrations import upgrade
from control_plane.models import metadata
from control_plane.services import Services
from control_plane.settings import Settings

PUBLIC_URL = "http://cp.test"
KEK = base64.urlsafe_b64encode(b"k" * 32).decode()
PG_URL = os.environ.get("QUOROOM_TEST_DATABASE_URL")


# -- FastAPI's per-app route state, shared across the suite's apps -----------------------------


def _share_route_state_across_apps() -> None:
    """Build each route's request state once per process instead of once per app.

    FastAPI (0.16x) builds a route's state — its dependant, its fields and their pydantic
    validators — lazily, per app that includes the router, when a request first walks past the
    route; the suite makes a new app for every test, and that build was about half of a
    control-plane test's time (~10 ms a route, ~50 routes a test). Every app here comes from the
    same ``create_app`` with the same routers and inclusion settings, so the state is the same;
    only ``dependency_overrides_provider`` (the app) differs, and nothing here overrides a
    dependency. Production builds it once per process anyway. Skipped, unchanged, when FastAPI
    no longer has the hook."""
    from fastapi import routing

    cls = getattr(routing, "_EffectiveRouteContext", None)
    build = getattr(cls, "from_api_route", None)
    if cls is None or build is None:
        return
    original = build.__func__
    cache: dict[tuple[Any, ...], tuple[Any, Any]] = {}

    def from_api_route(klass: Any, *, original_route: Any, include_context: Any) -> Any:
        c = include_context
        key = (
            id(original_route),
            id(c.included_router),
            c.prefix,
            tuple(map(str, c.tags)),
            tuple(map(id, c.dependencies)),
            repr(c.default_response_class),
            repr(c.responses),
            tuple(map(id, c.callbacks)),
            c.deprecated,
            c.include_in_schema,
            repr(c.generate_unique_id_function),
            repr(c.strict_content_type),
            c.max_body_size,
            repr(c.form_limits),
        )
        hit = cache.get(key)
        if hit is None:
            # The route is kept with its state, so its id cannot be reused while cached.
            hit = cache[key] = (
                original_route,
                original(klass, original_route=original_route, include_context=include_context),
            )
        return hit[1]

    cls.from_api_route = classmethod(from_api_route)


_share_route_state_across_apps()


# -- database -----------------------------------------------------------------------------------


async def _migrate(url: str) -> None:
    engine = create_engine(url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


async def _pg_admin(url: str, sql: str) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(sql))
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def migrated_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database built by running the Alembic migrations once per session.

    SQLite: a template file copied per test. PostgreSQL: a fresh database per session (so
    parallel runs don't collide), emptied between tests.
    """
    if PG_URL:
        name = f"cp_test_{uuid.uuid4().hex[:12]}"
        url = make_url(PG_URL)
        asyncio.run(_pg_admin(PG_URL, f'CREATE DATABASE "{name}"'))
        test_url = url.set(database=name).render_as_string(hide_password=False)
        try:
            asyncio.run(_migrate(test_url))
            yield test_url
        finally:
            asyncio.run(_pg_admin(PG_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    else:
        path = tmp_path_factory.mktemp("db") / "template.db"
        url = f"sqlite+aiosqlite:///{path}"
        asyncio.run(_migrate(url))
        yield url


async def _empty(url: str) -> None:
    """Delete every row, children first. DELETE rather than TRUNCATE: a test leaves a handful of
    rows, and PostgreSQL's TRUNCATE (new files for every table) took ~220 ms per test here
    against ~40 ms for this, over the ~600 tests of CI's PostgreSQL pass."""
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            for table in reversed(metadata.sorted_tables):
                await conn.execute(table.delete())
    finally:
        await engine.dispose()


@pytest.fixture
async def database_url(migrated_database: str, tmp_path: Path) -> AsyncIterator[str]:
    if PG_URL:
        yield migrated_database
        await _empty(migrated_database)
    else:
        template = Path(make_url(migrated_database).database or "")
        target = tmp_path / "cp.db"
        shutil.copyfile(template, target)
        yield f"sqlite+aiosqlite:///{target}"


# -- clock and mail -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@dataclass
class RecordingTransport:
    sent: list[Mail] = field(default_factory=list)
    messages: list[EmailMessage] = field(default_factory=list)

    async def deliver(self, message: EmailMessage, mail: Mail) -> None:
        self.sent.append(mail)
        self.messages.append(message)

    def to(self, email: str) -> list[Mail]:
        return [m for m in self.sent if m.to == email]

    def last_token(self, email: str) -> str:
        link = self.to(email)[-1].link or ""
        assert "#token=" in link, link
        return link.split("#token=", 1)[1]


@pytest.fixture
def outbox() -> RecordingTransport:
    return RecordingTransport()


# -- settings and app ---------------------------------------------------------------------------


@pytest.fixture
def make_settings(database_url: str, tmp_path: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "env": "development",
            "public_url": PUBLIC_URL,
            "database_url": database_url,
            "var_dir": tmp_path / "var",
            "auto_migrate": False,
            "secret_key": "s" * 48,
            "key_encryption_key": KEK,
            # Fast hashes for the suite; the OWASP parameters are tested on their own.
            "password_hash_memory_kib": 1024,
            "password_hash_time_cost": 1,
            "redis_url": None,
            # No in-process provisioning worker unless a test asks for one (run_worker=True).
            "run_worker": False,
        }
        values.update(overrides)
        return Settings(**values)

    return build


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


class RecordingWakeup:
    """Stands where the in-process worker's wake-up would be: counts the pokes."""

    def __init__(self) -> None:
        self.count = 0

    def set(self) -> None:
        self.count += 1


@dataclass
class Harness:
    app: Any
    client: httpx.AsyncClient
    clock: FakeClock
    outbox: RecordingTransport
    wakeup: RecordingWakeup

    @property
    def services(self) -> Services:
        return cast(Services, self.app.state.services)

    async def drain(self) -> None:
        await self.services.get(Mailer).drain()


@pytest.fixture
def make_harness(clock: FakeClock, outbox: RecordingTransport) -> Callable[[Settings], Any]:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def build(settings: Settings) -> AsyncIterator[Harness]:
        wakeup = RecordingWakeup()
        app = create_app(settings, clock=clock, mail_transport=outbox, wakeup=wakeup)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 50000))
            async with httpx.AsyncClient(transport=transport, base_url=PUBLIC_URL) as client:
                harness = Harness(app, client, clock, outbox, wakeup)
                yield harness
                await harness.drain()

    return build


@pytest.fixture
async def harness(make_harness: Any, settings: Settings) -> AsyncIterator[Harness]:
    async with make_harness(settings) as h:
        yield h


# -- account helpers ----------------------------------------------------------------------------

PASSWORD = "correct horse battery staple"


async def signup_and_verify(h: Harness, email: str, password: str = PASSWORD) -> None:
    r = await h.client.post("/api/auth/signup", json={"email": email, "password": password})
    assert r.status_code == 202, r.text
    await h.drain()
    token = h.outbox.last_token(email)
    r = await h.client.post("/api/auth/verify-email", json={"token": token})
    assert r.status_code == 200, r.text


async def login_body(h: Harness, email: str, password: str = PASSWORD) -> dict[str, Any]:
    r = await h.client.post(
        "/api/auth/login", json={"email": email, "password": password, "transport": "body"}
    )
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


async def login_cookie(h: Harness, email: str, password: str = PASSWORD) -> dict[str, Any]:
    r = await h.client.post("/api/auth/login", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data
