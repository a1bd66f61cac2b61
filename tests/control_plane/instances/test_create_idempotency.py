"""Creating an instance with an ``Idempotency-Key`` under load (issue 12, item 10).

Twelve parallel creates with one key gave eight 500s on PostgreSQL (``DeadlockDetectedError``).
These tests run concurrent requests for real: on PostgreSQL (``QUOROOM_TEST_DATABASE_URL``) each
request holds its own connection and transaction, so lock waits and deadlocks happen as in
production; on SQLite writers are serialised by ``BEGIN IMMEDIATE``, which still checks that every
replay answers with the one instance.

A replay must be the same request: same name, tier, region, goal *and* provider credentials.
Different credentials under a used key answer 409 ``idempotency_conflict``, never keep the old ones
silently.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from control_plane.instances.credentials import decrypt_credentials
from control_plane.instances.models import CloudInstance, InstanceEvent
from tests.control_plane.conftest import PG_URL, PUBLIC_URL
from tests.control_plane.instances.helpers import Cloud, User

PARALLEL = 12
ROUNDS = 3


def _report_backend() -> None:
    if not PG_URL:
        print(
            "test_create_idempotency: running on SQLite, where writers are serialised; "
            "set QUOROOM_TEST_DATABASE_URL to exercise PostgreSQL's row locks and deadlocks"
        )


async def _count(cloud: Cloud, model: Any, *where: Any) -> int:
    async with cloud.h.services.core.session_factory() as db:
        return int(await db.scalar(select(func.count()).select_from(model).where(*where)) or 0)


async def _parallel_creates(cloud: Cloud, owner: User, key: str) -> list[httpx.Response]:
    """``PARALLEL`` creates at once, answered as a server would: an unhandled error is a 500
    response (not an exception raised into the test)."""
    transport = httpx.ASGITransport(app=cloud.h.app, raise_app_exceptions=False)
    body = {"name": "My Room", "tier": "starter", "region": "iad"}
    headers = {**owner.headers, "Idempotency-Key": key}
    async with httpx.AsyncClient(transport=transport, base_url=PUBLIC_URL) as client:
        return list(
            await asyncio.gather(
                *(client.post("/api/cloud/instances", json=body, headers=headers)
                  for _ in range(PARALLEL))
            )
        )  # fmt: skip


async def test_twelve_parallel_creates_with_one_key_never_deadlock(make_cloud: Any) -> None:
    """The issue's run: development (billing disabled) with the in-process worker, which picks
    the new instance up while the replays are still arriving. On PostgreSQL the replays used to
    wait on the worker's transaction inside the unique index while holding the user's row lock
    the worker's foreign-key check needed: 40P01, eight 500s out of twelve."""
    _report_backend()
    for round_ in range(ROUNDS):
        async with make_cloud(run_worker=True) as c:
            owner = await c.user(f"owner{round_}@example.com")
            results = await _parallel_creates(c, owner, "one-click")
            codes = [r.status_code for r in results]
            assert codes.count(500) == 0, f"round {round_}: {codes.count(500)} answers were 500"
            assert codes == [201] * PARALLEL, [r.text for r in results]
            assert len({r.json()["instance"]["id"] for r in results}) == 1
            assert await _count(c, CloudInstance, CloudInstance.owner_id == owner.user_id) == 1


async def test_twelve_parallel_creates_with_one_key_give_one_checkout(cloud: Cloud) -> None:
    _report_backend()
    owner = await cloud.user("owner@example.com")
    results = await asyncio.gather(
        *(cloud.create(owner, key="one-click", credentials={"anthropic": "sk-a"})
          for _ in range(PARALLEL))
    )  # fmt: skip
    codes = [r.status_code for r in results]
    assert codes.count(500) == 0, [r.text for r in results if r.status_code == 500]
    assert codes == [201] * PARALLEL, [r.text for r in results]
    ids = {r.json()["instance"]["id"] for r in results}
    assert len(ids) == 1
    urls = {r.json()["checkout_url"] for r in results}
    assert len(urls) == 1 and None not in urls
    assert await _count(cloud, CloudInstance) == 1
    assert cloud.stripe is not None and len(cloud.stripe.sessions) == 1
    transitions = await _count(cloud, InstanceEvent, InstanceEvent.to_status.is_not(None))
    assert transitions == 1  # one draft → awaiting_payment


async def test_parallel_creates_with_one_key_and_with_others_all_succeed(cloud: Cloud) -> None:
    """Replays of one key racing creates under other keys of the same user (the quota lock)."""
    _report_backend()
    owner = await cloud.user("owner@example.com")
    calls = [cloud.create(owner, key="shared") for _ in range(6)]
    calls += [cloud.create(owner, key=f"own-{i}") for i in range(2)]
    results = await asyncio.gather(*calls)
    assert [r.status_code for r in results] == [201] * 8, [r.text for r in results]
    assert len({r.json()["instance"]["id"] for r in results[:6]}) == 1
    assert await _count(cloud, CloudInstance) == 3


async def test_a_replay_with_other_credentials_is_a_conflict_and_keeps_nothing_new(
    cloud: Cloud,
) -> None:
    owner = await cloud.user("owner@example.com")
    first = await cloud.created(owner, key="k-cred", credentials={"anthropic": "sk-first"})
    instance_id = first["instance"]["id"]
    for credentials in (
        {"anthropic": "sk-second"},  # another key for the same provider
        {"anthropic": "sk-first", "openai": "sk-o"},  # one more provider
        {"openai": "sk-first"},  # same key, another provider
        None,  # dropped
    ):
        r = await cloud.create(owner, key="k-cred", credentials=credentials)
        assert r.status_code == 409, r.text
        assert r.json()["code"] == "idempotency_conflict"
        assert "sk-" not in r.text  # the answer never echoes a secret
    row = await cloud.instance(instance_id)
    assert decrypt_credentials(cloud.h.services.core.settings, row) == {"anthropic": "sk-first"}
    # The same request again is still a replay.
    again = await cloud.create(owner, key="k-cred", credentials={"anthropic": "sk-first"})
    assert again.status_code == 201 and again.json()["instance"]["id"] == instance_id
    assert await _count(cloud, CloudInstance) == 1


async def test_a_replay_without_credentials_of_a_create_without_them_is_the_same(
    cloud: Cloud,
) -> None:
    owner = await cloud.user("owner@example.com")
    first = await cloud.created(owner, key="k-none")
    again = await cloud.create(owner, key="k-none", credentials={})
    assert again.status_code == 201 and again.json()["instance"]["id"] == first["instance"]["id"]
    other = await cloud.create(owner, key="k-none", credentials={"anthropic": "sk-late"})
    assert other.status_code == 409 and other.json()["code"] == "idempotency_conflict"


async def test_parallel_replays_with_different_credentials_give_one_winner(cloud: Cloud) -> None:
    _report_backend()
    owner = await cloud.user("owner@example.com")
    results = await asyncio.gather(
        *(cloud.create(owner, key="race", credentials={"anthropic": f"sk-{i}"}) for i in range(6))
    )
    codes = sorted(r.status_code for r in results)
    assert codes == [201] + [409] * 5, [r.text for r in results]
    assert {r.json()["code"] for r in results if r.status_code == 409} == {"idempotency_conflict"}
    [winner] = [r for r in results if r.status_code == 201]
    row = await cloud.instance(winner.json()["instance"]["id"])
    index = results.index(winner)
    assert decrypt_credentials(cloud.h.services.core.settings, row) == {"anthropic": f"sk-{index}"}


@pytest.mark.parametrize("bad", [{"anthropic": "has space"}, {"Bad Name": "sk"}, ["sk"], "sk"])
async def test_a_replay_with_malformed_credentials_is_refused_as_invalid(
    cloud: Cloud, bad: Any
) -> None:
    owner = await cloud.user("owner@example.com")
    await cloud.created(owner, key="k-bad")
    r = await cloud.create(owner, key="k-bad", credentials=bad)
    assert r.status_code == 422 and r.json()["code"] == "invalid_body"


class _Deadlock(Exception):
    sqlstate = "40P01"


async def test_a_deadlock_while_creating_is_retried_not_a_500(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL picks a victim in a deadlock (40P01) and rolls its transaction back: the
    create runs again instead of answering 500. (Forced here, so it runs on every backend.)"""
    from sqlalchemy.exc import DBAPIError

    from control_plane.instances import service

    owner = await cloud.user("owner@example.com")
    real = service._insert_draft
    failures = {"left": 2}

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise DBAPIError("INSERT INTO cloud_instances ...", None, _Deadlock("deadlock"))
        return await real(*args, **kwargs)

    monkeypatch.setattr(service, "_insert_draft", flaky)
    r = await cloud.create(owner, key="dl")
    assert r.status_code == 201, r.text
    assert failures["left"] == 0
    assert await _count(cloud, CloudInstance) == 1


async def test_other_database_errors_are_not_retried(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import DBAPIError

    from control_plane.instances import service

    owner = await cloud.user("owner@example.com")
    calls: list[int] = []

    class _Other(Exception):
        sqlstate = "23502"  # not_null_violation: running it again cannot help

    async def broken(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise DBAPIError("INSERT ...", None, _Other("boom"))

    monkeypatch.setattr(service, "_insert_draft", broken)
    with pytest.raises(DBAPIError):
        await cloud.create(owner, key="no-retry")
    assert calls == [1]
