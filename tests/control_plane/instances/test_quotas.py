"""Quotas and abuse limits (issue 14, item 4): Rooms per region and in all (capacity), members
per Room, invitations per day and runtime tokens per session per minute — each refused with a
stable code, capacity before any payment and with nothing written, and none overshot by two
requests racing for the last slot (SQLite, or PostgreSQL with QUOROOM_TEST_DATABASE_URL)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select

from control_plane import cli
from control_plane.billing.models import InstanceSubscription
from control_plane.billing.service import build_billing
from control_plane.errors import ThrottleUnavailable
from control_plane.instances.models import CloudInstance, CloudInstanceMember, InstanceEvent
from control_plane.settings import Settings, SettingsError
from control_plane.throttle import Throttle
from tests.control_plane.instances.helpers import RUNTIME_URL, Cloud, User
from tests.fakes.stripe_api import FakeStripe

CHECKOUTS = "/v1/checkout/sessions"
DAY = 24 * 3600


async def _count(cloud: Cloud, model: Any) -> int:
    async with cloud.h.services.core.session_factory() as db:
        return int(await db.scalar(select(func.count()).select_from(model)) or 0)


async def _written(cloud: Cloud) -> tuple[int, int, int]:
    return (
        await _count(cloud, CloudInstance),
        await _count(cloud, InstanceSubscription),
        await _count(cloud, InstanceEvent),
    )


def _refused(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == code and body["error"], body
    return body


# -- settings ------------------------------------------------------------------------------------


def test_capacity_settings_parse() -> None:
    s = Settings(rooms_per_region="iad=2, FRA=0, *=5", rooms_total="9")
    assert (s.region_capacity("iad"), s.region_capacity("fra"), s.region_capacity("sin")) == (
        2,
        0,
        5,
    )
    assert s.rooms_total == 9
    assert Settings(rooms_per_region="4").region_capacity("syd") == 4
    unset = Settings(rooms_per_region="", rooms_total="")
    assert unset.region_capacity("iad") is None and unset.rooms_total is None


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ROOMS_PER_REGION", "iad"),
        ("ROOMS_PER_REGION", "iad=two"),
        ("ROOMS_PER_REGION", "iad=1,iad=2"),
        ("ROOMS_PER_REGION", "iad1=3"),
        ("ROOMS_PER_REGION", "-1"),
        ("ROOMS_TOTAL", "-1"),
        ("ROOMS_TOTAL", "lots"),
        ("INVITATIONS_PER_DAY", "0"),
        ("INVITATIONS_PER_DAY", "1.5"),
        ("RUNTIME_TOKENS_PER_MINUTE", "0"),
        ("RUNTIME_TOKENS_PER_MINUTE", "99999"),
    ],
)
def test_a_bad_quota_setting_stops_start_up_naming_it(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"QUOROOM_CP_{variable}"
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert name in str(info.value)
    cli.get_settings.cache_clear()
    try:
        assert cli.main(["migrate"]) == 2
    finally:
        cli.get_settings.cache_clear()
    assert name in capsys.readouterr().err


def test_a_capacity_for_a_region_the_catalog_lacks_is_refused() -> None:
    with pytest.raises(SettingsError) as info:
        build_billing(Settings(rooms_per_region="iad=3,xyz=1"))
    assert info.value.variable == "QUOROOM_CP_ROOMS_PER_REGION" and "xyz" in str(info.value)


# -- capacity ------------------------------------------------------------------------------------


async def test_a_full_region_is_refused_before_any_checkout_and_nothing_is_written(
    make_cloud: Any, stripe_fake: FakeStripe
) -> None:
    async with make_cloud(stripe_fake, rooms_per_region="iad=1") as cloud:
        first = await cloud.user("a@example.com")
        second = await cloud.user("b@example.com")
        taken = (await cloud.created(first))["instance"]["id"]
        before, checkouts = await _written(cloud), len(stripe_fake.requests_to("POST", CHECKOUTS))

        body = _refused(await cloud.create(second, key="k1"), 409, "region_full")
        assert "iad" in body["error"]
        assert await _written(cloud) == before  # no draft, subscription row or event
        assert len(stripe_fake.requests_to("POST", CHECKOUTS)) == checkouts  # Stripe not called

        # Another region has room; a canceled Room frees its slot.
        assert (await cloud.create(second, region="fra")).status_code == 201
        r = await cloud.client.delete(f"/api/cloud/instances/{taken}", headers=first.headers)
        assert r.status_code == 202, r.text
        assert (await cloud.create(second, key="k1")).status_code == 201


async def test_checkouts_racing_for_the_last_slot_make_one_room(
    make_cloud: Any, stripe_fake: FakeStripe
) -> None:
    async with make_cloud(stripe_fake, rooms_total=2) as cloud:
        owner = await cloud.user("owner@example.com")
        racers = [await cloud.user(f"r{i}@example.com") for i in range(3)]
        await cloud.created(owner, region="sin")  # one of the two slots taken
        checkouts = len(stripe_fake.requests_to("POST", CHECKOUTS))

        answers = await asyncio.gather(*(cloud.create(u, region="fra") for u in racers))
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [201, 409, 409], [r.text for r in answers]
        for refused in (r for r in answers if r.status_code == 409):
            _refused(refused, 409, "capacity_full")
        assert await _count(cloud, CloudInstance) == 2
        assert await _count(cloud, InstanceSubscription) == 2
        assert len(stripe_fake.requests_to("POST", CHECKOUTS)) == checkouts + 1


async def test_the_fleet_limit_applies_without_billing_too(make_cloud: Any) -> None:
    async with make_cloud(rooms_total=0) as cloud:  # 0: no new Rooms at all
        user = await cloud.user("a@example.com")
        _refused(await cloud.create(user), 409, "capacity_full")
        assert await _written(cloud) == (0, 0, 0)


# -- members -------------------------------------------------------------------------------------


async def test_invitations_racing_for_the_last_member_slot_make_one(make_cloud: Any) -> None:
    async with make_cloud(max_members_per_instance=2) as cloud:
        owner = await cloud.user("owner@example.com")
        instance_id = (await cloud.created(owner))["instance"]["id"]
        url = f"/api/cloud/instances/{instance_id}/members"
        first = await cloud.client.post(
            url, json={"email": "m0@example.com"}, headers=owner.headers
        )
        assert first.status_code == 202, first.text

        answers = await asyncio.gather(
            *(
                cloud.client.post(url, json={"email": f"m{i}@example.com"}, headers=owner.headers)
                for i in (1, 2, 3)
            )
        )
        assert sorted(r.status_code for r in answers) == [202, 409, 409], [r.text for r in answers]
        for refused in (r for r in answers if r.status_code == 409):
            _refused(refused, 409, "member_limit")
        assert await _count(cloud, CloudInstanceMember) == 2


# -- invitations per day -------------------------------------------------------------------------


async def _invite(cloud: Cloud, owner: User, instance_id: str, email: str) -> Any:
    return await cloud.client.post(
        f"/api/cloud/instances/{instance_id}/members", json={"email": email}, headers=owner.headers
    )


async def test_invitations_per_day_are_counted_per_owner_across_rooms(make_cloud: Any) -> None:
    async with make_cloud(invitations_per_day=3) as cloud:
        owner = await cloud.user("owner@example.com")
        a = (await cloud.created(owner))["instance"]["id"]
        b = (await cloud.created(owner, name="B"))["instance"]["id"]
        assert (await _invite(cloud, owner, a, "m0@example.com")).status_code == 202
        cloud.h.clock.advance(3600)
        owner = await cloud.signin(owner.email)  # the access token has expired
        assert (await _invite(cloud, owner, b, "m1@example.com")).status_code == 202
        assert (await _invite(cloud, owner, a, "m0@example.com")).status_code == 202  # again

        r = await _invite(cloud, owner, b, "m2@example.com")
        _refused(r, 429, "invitation_limit")
        # The first mail turns a day old 23 hours from now.
        assert DAY - 3600 - 5 <= int(r.headers["retry-after"]) <= DAY - 3600 + 1
        _refused(await _invite(cloud, owner, a, "m0@example.com"), 429, "invitation_limit")
        await cloud.h.drain()
        assert cloud.h.outbox.to("m2@example.com") == []
        assert len(cloud.h.outbox.to("m0@example.com")) == 2
        assert await _count(cloud, CloudInstanceMember) == 2

        other = await cloud.user("other@example.com")  # another owner has their own count
        c = (await cloud.created(other))["instance"]["id"]
        assert (await _invite(cloud, other, c, "m2@example.com")).status_code == 202

        cloud.h.clock.advance(DAY - 3600 + 1)  # the first mail is now more than a day old
        owner = await cloud.signin(owner.email)
        assert (await _invite(cloud, owner, b, "m2@example.com")).status_code == 202


# -- runtime tokens per session per minute ------------------------------------------------------


def _url(instance_id: str, tail: str) -> str:
    return f"/api/cloud/instances/{instance_id}/{tail}"


async def test_runtime_tokens_are_limited_per_session(make_cloud: Any) -> None:
    async with make_cloud(runtime_tokens_per_minute=3) as cloud:
        owner = await cloud.user("owner@example.com")
        instance_id = await cloud.paid_and_running(owner)
        grant = _url(instance_id, "runtime-token")
        refresh = _url(instance_id, "refresh-token")
        assert (await cloud.client.post(grant, headers=owner.headers)).status_code == 200
        token = (await cloud.client.post(grant, headers=owner.headers)).json()["token"]
        r = await cloud.client.post(refresh, json={"token": token}, headers={"Origin": RUNTIME_URL})
        assert r.status_code == 200, r.text

        # The refresh past the budget: refused, readable by the Room UI on its origin.
        r = await cloud.client.post(refresh, json={"token": token}, headers={"Origin": RUNTIME_URL})
        _refused(r, 429, "runtime_token_throttled")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert r.headers["access-control-allow-origin"] == RUNTIME_URL
        assert r.headers["access-control-expose-headers"] == "Retry-After"
        _refused(
            await cloud.client.post(grant, headers=owner.headers), 429, "runtime_token_throttled"
        )

        # Another session of the same user has a budget of its own.
        other = await cloud.signin(owner.email)
        assert other.session_id != owner.session_id
        assert (await cloud.client.post(grant, headers=other.headers)).status_code == 200


async def test_the_runtime_token_limit_fails_open_when_its_storage_is_down(
    make_cloud: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_cloud(runtime_tokens_per_minute=1) as cloud:
        owner = await cloud.user("owner@example.com")
        instance_id = await cloud.paid_and_running(owner)

        async def down(*_: Any) -> None:
            raise ThrottleUnavailable()

        monkeypatch.setattr(cloud.h.services.get(Throttle), "hit", down)
        for _ in range(3):
            r = await cloud.client.post(_url(instance_id, "runtime-token"), headers=owner.headers)
            assert r.status_code == 200, r.text


@pytest.mark.redis
async def test_the_runtime_token_limit_holds_through_redis(
    make_cloud: Any, redis_url: str | None
) -> None:
    if not redis_url:
        pytest.skip("QUOROOM_TEST_REDIS_URL not set")
    async with make_cloud(redis_url=redis_url, runtime_tokens_per_minute=1) as cloud:
        owner = await cloud.user("owner@example.com")
        instance_id = await cloud.paid_and_running(owner)
        grant = _url(instance_id, "runtime-token")
        assert (await cloud.client.post(grant, headers=owner.headers)).status_code == 200
        _refused(
            await cloud.client.post(grant, headers=owner.headers), 429, "runtime_token_throttled"
        )
