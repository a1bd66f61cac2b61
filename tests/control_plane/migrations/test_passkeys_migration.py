"""Migration 0007 (passkeys, issue 15 item 2) goes down and up again: the downgrade drops its two
tables and leaves the accounts of 0006 as they were."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import Connection, inspect, text

from control_plane.db import create_engine
from control_plane.migrations import alembic_config, upgrade

NOW = "2026-12-06 05:00:00.000000+00:00"


def _downgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def test_0007_downgrades_and_upgrades_again(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'pk.db'}")
    try:
        await upgrade(engine, "0007")
        async with engine.begin() as conn:
            assert {"user_passkeys", "webauthn_challenges"} <= await conn.run_sync(_tables)
            await conn.execute(
                text(
                    "INSERT INTO users (id, email, email_verified, created_at, updated_at) "
                    "VALUES ('u1', 'pk@example.com', 1, :now, :now)"
                ),
                {"now": NOW},
            )
            await conn.execute(
                text(
                    "INSERT INTO user_passkeys (id, user_id, credential_id, public_key, "
                    "sign_count, name, backed_up, created_at) "
                    "VALUES ('p1', 'u1', x'01', x'02', 4294967295, 'Phone', 0, :now)"
                ),
                {"now": NOW},
            )
        async with engine.begin() as conn:
            await conn.run_sync(_downgrade, "0006")
            tables = await conn.run_sync(_tables)
            assert not {"user_passkeys", "webauthn_challenges"} & tables
            assert (await conn.execute(text("SELECT email FROM users"))).all() == [
                ("pk@example.com",)
            ]
        await upgrade(engine, "0007")
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT count(*) FROM user_passkeys"))).scalar()
        assert rows == 0
    finally:
        await engine.dispose()
