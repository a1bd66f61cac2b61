"""Read-only sessions: they never wait for the write lock, and they cannot write."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from control_plane.auth.models import User
from control_plane.db import create_engine, create_session_factory, transaction


async def test_a_read_only_session_reads_while_a_writer_holds_the_lock(database_url: str):
    engine = create_engine(database_url)
    writes, reads = create_session_factory(engine), create_session_factory(engine, readonly=True)
    try:
        async with transaction(writes) as writer:
            writer.add(User(email="writer@example.test", email_verified=True))
            await writer.flush()
            # The writer's transaction is open (on SQLite it holds the write lock): a read-only
            # session must answer at once, not after the busy timeout.
            async with reads() as reader:
                count = await asyncio.wait_for(
                    reader.scalar(select(User.id).where(User.email == "nobody@example.test")), 2
                )
                assert count is None
    finally:
        await engine.dispose()


async def test_a_read_only_session_cannot_write_on_postgresql(database_url: str):
    if not database_url.startswith("postgresql"):
        pytest.skip("READ ONLY transactions are enforced by PostgreSQL only")
    engine = create_engine(database_url)
    try:
        async with create_session_factory(engine, readonly=True)() as reader:
            with pytest.raises(DBAPIError, match="read-only"):
                await reader.execute(
                    text(
                        "INSERT INTO stripe_events (id, type, received_at) VALUES ('e', 't', now())"
                    )
                )
    finally:
        await engine.dispose()
