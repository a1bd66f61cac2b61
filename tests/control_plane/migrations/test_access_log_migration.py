"""Migration 0008 (the access log, issue 15 item 4) goes down and up again: the downgrade drops its
two tables and leaves the instances of 0007 as they were; refusal rows aggregate on their key."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Connection, inspect, text
from sqlalchemy.exc import IntegrityError

from control_plane.db import create_engine
from control_plane.migrations import alembic_config, upgrade

NOW = "2026-12-06 05:00:00.000000+00:00"
TABLES = {"access_log_entries", "access_report_batches"}


def _downgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


_REFUSAL = (
    "INSERT INTO access_log_entries (instance_id, kind, at, reason, address, count) "
    "VALUES ('i1', 'refused', :now, 'token_expired', '192.0.2.1', 1)"
)


async def test_0008_downgrades_and_upgrades_again(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}")
    try:
        await upgrade(engine, "0008")
        async with engine.begin() as conn:
            assert await conn.run_sync(_tables) >= TABLES
            await conn.execute(
                text(
                    "INSERT INTO users (id, email, email_verified, created_at, updated_at) "
                    "VALUES ('u1', 'log@example.com', 1, :now, :now)"
                ),
                {"now": NOW},
            )
            await conn.execute(
                text(
                    "INSERT INTO cloud_instances (id, owner_id, name, tier, region, status, "
                    "attempts, created_at, updated_at) "
                    "VALUES ('i1', 'u1', 'Lab', 'starter', 'iad', 'running', 0, :now, :now)"
                ),
                {"now": NOW},
            )
            await conn.execute(text(_REFUSAL), {"now": NOW})
            # Launches never collide (NULL reason and address); a refusal key is unique.
            for _ in range(2):
                await conn.execute(
                    text(
                        "INSERT INTO access_log_entries (instance_id, kind, at, count) "
                        "VALUES ('i1', 'launch', :now, 1)"
                    ),
                    {"now": NOW},
                )
        with pytest.raises(IntegrityError):
            async with engine.begin() as conn:
                await conn.execute(text(_REFUSAL), {"now": NOW})
        async with engine.begin() as conn:
            await conn.run_sync(_downgrade, "0007")
            assert not TABLES & await conn.run_sync(_tables)
            rows = (await conn.execute(text("SELECT id FROM cloud_instances"))).all()
            assert rows == [("i1",)]
        await upgrade(engine, "0008")
        async with engine.connect() as conn:
            count = (await conn.execute(text("SELECT count(*) FROM access_log_entries"))).scalar()
        assert count == 0
    finally:
        await engine.dispose()
