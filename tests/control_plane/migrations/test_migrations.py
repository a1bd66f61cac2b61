"""Schema changes go through Alembic: 0003 adds ``cloud_instances.runtime_kind`` and gives the
instances that existed before it the kind they were running (``reference``); the models and the
migrations describe the same schema."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, text

from control_plane.db import create_engine
from control_plane.migrations import upgrade
from control_plane.models import metadata

NOW = "2026-11-30 12:00:00.000000+00:00"


async def test_instances_created_before_0003_run_the_reference_room(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'old.db'}")
    try:
        await upgrade(engine, "0002")
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO users (id, email, email_verified, created_at, updated_at) "
                    "VALUES ('u1', 'old@example.com', 1, :now, :now)"
                ),
                {"now": NOW},
            )
            await conn.execute(
                text(
                    "INSERT INTO cloud_instances (id, owner_id, name, tier, region, status, "
                    "attempts, created_at, updated_at) "
                    "VALUES ('i1', 'u1', 'Old', 'starter', 'iad', 'running', 0, :now, :now)"
                ),
                {"now": NOW},
            )
        await upgrade(engine)
        async with engine.connect() as conn:
            kinds = (await conn.execute(text("SELECT runtime_kind FROM cloud_instances"))).all()
        assert kinds == [("reference",)]
    finally:
        await engine.dispose()


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": False})
    return list(compare_metadata(context, metadata))


async def test_the_migrations_build_the_schema_the_models_describe(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'head.db'}")
    try:
        await upgrade(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()
