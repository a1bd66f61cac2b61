"""Database: the declarative ``Base``, column helpers, and the async engine/session factory.

SQLite (aiosqlite) is the embedded default; PostgreSQL (asyncpg) in production. Timestamps are
always timezone-aware UTC in Python, whatever the backend stores.
"""

from __future__ import annotations

import logging
import os
import stat
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, MetaData, String, event
from sqlalchemy.engine import CursorResult, Dialect, Result, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

logger = logging.getLogger("control_plane.db")

# Stable constraint names so Alembic migrations are the same on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every control-plane table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always returned timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


def rowcount(result: Result[*tuple[Any, ...]]) -> int:
    """The rows an UPDATE or DELETE run through ``AsyncSession.execute`` matched.

    The session types every ``execute`` as a ``Result``, but a DML statement's is a
    ``CursorResult``, which alone has ``rowcount`` (SQLAlchemy 2.1's typing): narrowed here, once.
    """
    if not isinstance(result, CursorResult):
        raise TypeError(f"not the result of an UPDATE or DELETE: {type(result).__name__}")
    return result.rowcount


def id_column_type() -> String:
    return String(36)


#: Execution option marking a read-only session's connections (see create_session_factory).
READONLY = "quoroom_readonly"


def private_dir(path: Path) -> None:
    """Create ``path`` readable by this user only (missing parents too: ``mkdir(parents=True)``
    would give them the default mode); tighten ``path`` itself if it exists."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
    _tighten(path, 0o700)


def _tighten(path: Path, mode: int) -> None:
    current = stat.S_IMODE(path.stat().st_mode)
    if current & 0o077:
        path.chmod(mode)
        logger.warning("%s was readable by others (mode %o); now %o", path, current, mode)


def _private_sqlite_file(url: str) -> None:
    """The SQLite file holds password hashes, sessions and sealed credentials: create it 0600
    before SQLite does (SQLite gives its -wal, -shm and -journal files the database's mode)."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if not path.exists():
        if not path.parent.exists():
            private_dir(path.parent)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    _tighten(path, 0o600)
    for sidecar in ("-wal", "-shm", "-journal"):
        extra = path.with_name(path.name + sidecar)
        if extra.exists():
            _tighten(extra, 0o600)


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine; SQLite gets foreign keys, WAL and a busy timeout on every connection.

    A SQLite file is created (or tightened) to mode 0600 first."""
    if url.startswith("sqlite"):
        _private_sqlite_file(url)
        kwargs.setdefault("connect_args", {}).setdefault("timeout", 15)
    engine = create_async_engine(url, pool_pre_ping=not url.startswith("sqlite"), **kwargs)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=15000")
            cursor.close()
            # Let SQLAlchemy emit BEGIN itself (below) instead of the driver's lazy BEGIN.
            dbapi_connection.isolation_level = None

        @event.listens_for(engine.sync_engine, "begin")
        def _sqlite_begin(connection: Any) -> None:
            # IMMEDIATE takes the write lock up front: a deferred transaction that reads and then
            # writes fails with SQLITE_BUSY (no busy wait) when another writer got in between.
            # Read-only sessions (create_session_factory(readonly=True)) take no write lock, so
            # concurrent reads (token refreshes, say) do not queue behind one another.
            if connection.get_execution_options().get(READONLY):
                connection.exec_driver_sql("BEGIN")
            else:
                connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def create_session_factory(
    engine: AsyncEngine, *, readonly: bool = False
) -> async_sessionmaker[AsyncSession]:
    """Sessions on ``engine``; ``readonly`` ones are for requests that only read.

    On PostgreSQL a read-only session's transactions are ``READ ONLY`` (a write fails); on SQLite
    they begin deferred instead of taking the write lock.
    """
    if readonly:
        engine = engine.execution_options(**{READONLY: True, "postgresql_readonly": True})
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


@asynccontextmanager
async def transaction(
    factory: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """A session whose transaction commits on success and rolls back on any exception."""
    async with factory() as session, session.begin():
        yield session
