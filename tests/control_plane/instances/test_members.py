"""Members: the owner invites them by email and removes them; an invitation is ``pending`` until
its invitee accepts it (test_invitations.py); members read, only the owner writes."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from control_plane.auth.models import User as UserRow
from control_plane.instances.models import CloudInstanceMember
from tests.control_plane.instances.helpers import Cloud, User


def _members(instance_id: str, tail: str = "") -> str:
    return f"/api/cloud/instances/{instance_id}/members{tail}"


async def _add(cloud: Cloud, owner: User, instance_id: str, email: Any) -> Any:
    return await cloud.client.post(
        _members(instance_id), json={"email": email}, headers=owner.headers
    )


async def test_an_accepted_invitation_makes_an_active_member(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    member = await cloud.user("member@example.com")
    instance_id = await cloud.paid_and_running(owner)
    r = await _add(cloud, owner, instance_id, "  Member@Example.com ")
    assert r.status_code == 202
    body = r.json()
    assert set(body) == {"id", "email", "status", "role", "createdAt"}
    assert body["email"] == "member@example.com"
    assert body["status"] == "pending" and body["role"] == "member"
    accepted = await cloud.client.post(
        f"/api/cloud/invitations/{body['id']}/accept", headers=member.headers
    )
    assert accepted.status_code == 200, accepted.text
    listed = (await cloud.client.get("/api/cloud/instances", headers=member.headers)).json()
    assert [(i["id"], i["role"]) for i in listed["instances"]] == [(instance_id, "member")]
    one = await cloud.client.get(f"/api/cloud/instances/{instance_id}", headers=member.headers)
    assert one.json()["role"] == "member"
    status = await cloud.client.get(
        f"/api/cloud/instances/{instance_id}/status", headers=member.headers
    )
    assert status.status_code == 200
    # Members may list the members.
    seen = await cloud.client.get(_members(instance_id), headers=member.headers)
    assert [m["email"] for m in seen.json()["members"]] == ["member@example.com"]


async def test_adding_the_same_address_twice_returns_the_same_member(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = (await cloud.created(owner))["instance"]["id"]
    first = await _add(cloud, owner, instance_id, "friend@example.com")
    second = await _add(cloud, owner, instance_id, "FRIEND@example.com")
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    listed = (await cloud.client.get(_members(instance_id), headers=owner.headers)).json()
    assert len(listed["members"]) == 1


async def test_an_unknown_address_stays_invited_after_signing_up_until_it_accepts(
    cloud: Cloud,
) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    r = await _add(cloud, owner, instance_id, "later@example.com")
    assert r.json()["status"] == "pending"
    later = await cloud.user("later@example.com")  # signs up and verifies the address
    async with cloud.h.services.core.session_factory() as db:
        [row] = (await db.scalars(select(CloudInstanceMember))).all()
        assert row.status == "pending" and row.user_id is None
    listed = (await cloud.client.get("/api/cloud/instances", headers=later.headers)).json()
    assert listed == {"instances": []}
    accepted = await cloud.client.post(
        f"/api/cloud/invitations/{r.json()['id']}/accept", headers=later.headers
    )
    assert accepted.status_code == 200, accepted.text
    async with cloud.h.services.core.session_factory() as db:
        [row] = (await db.scalars(select(CloudInstanceMember))).all()
        assert row.status == "active" and row.user_id == later.user_id
    listed = (await cloud.client.get("/api/cloud/instances", headers=later.headers)).json()
    assert [i["id"] for i in listed["instances"]] == [instance_id]
    token_r = await cloud.client.post(
        f"/api/cloud/instances/{instance_id}/runtime-token", headers=later.headers
    )
    assert token_r.status_code == 200


async def test_an_unverified_account_is_only_invited(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = (await cloud.created(owner))["instance"]["id"]
    async with cloud.h.services.core.session_factory() as db:
        db.add(UserRow(email="unverified@example.com", email_verified=False))
        await db.commit()
    r = await _add(cloud, owner, instance_id, "unverified@example.com")
    assert r.status_code == 202 and r.json()["status"] == "pending"


async def test_the_owner_cannot_add_themselves(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = (await cloud.created(owner))["instance"]["id"]
    r = await _add(cloud, owner, instance_id, "OWNER@example.com")
    assert r.status_code == 422 and r.json()["code"] == "cannot_invite_owner"


@pytest.mark.parametrize(
    "email", ["", "not-an-email", "a@b", "x" * 250 + "@example.com", 42, None, ["a@b.co"]]
)
async def test_a_bad_member_email_is_refused(cloud: Cloud, email: Any) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = (await cloud.created(owner))["instance"]["id"]
    r = await _add(cloud, owner, instance_id, email)
    assert r.status_code == 422 and r.json()["code"] == "invalid_body"


async def test_unknown_fields_in_a_member_body_are_refused(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = (await cloud.created(owner))["instance"]["id"]
    r = await cloud.client.post(
        _members(instance_id),
        json={"email": "a@example.com", "role": "owner"},
        headers=owner.headers,
    )
    assert r.status_code == 422


async def test_members_have_a_limit(make_cloud: Any) -> None:
    async with make_cloud(max_members_per_instance=2) as c:
        owner = await c.user("owner@example.com")
        instance_id = (await c.created(owner))["instance"]["id"]
        for i in range(2):
            assert (await _add(c, owner, instance_id, f"m{i}@example.com")).status_code == 202
        r = await _add(c, owner, instance_id, "m3@example.com")
        assert r.status_code == 409 and r.json()["code"] == "member_limit"


async def test_members_cannot_write(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    member = await cloud.user("member@example.com")
    instance_id = await cloud.paid_and_running(owner)
    added = {"id": await cloud.invite_and_accept(owner, instance_id, member)}
    other = (await _add(cloud, owner, instance_id, "other@example.com")).json()
    base = f"/api/cloud/instances/{instance_id}"
    for method, path in [
        ("POST", _members(instance_id)),
        ("DELETE", _members(instance_id, f"/{other['id']}")),
        ("DELETE", base),
        ("POST", f"{base}/retry"),
        ("POST", f"{base}/checkout/confirm"),
    ]:
        r = await cloud.client.request(
            method, path, headers=member.headers, json={"email": "new@example.com"}
        )
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["code"] == "owner_required"
    # A member may leave on their own.
    r = await cloud.client.delete(_members(instance_id, f"/{added['id']}"), headers=member.headers)
    assert r.status_code == 204
    gone = await cloud.client.get(base, headers=member.headers)
    assert gone.status_code == 404


async def test_removing_a_member_stops_their_access_at_once(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    member = await cloud.user("member@example.com")
    instance_id = await cloud.paid_and_running(owner)
    added = {"id": await cloud.invite_and_accept(owner, instance_id, member)}
    base = f"/api/cloud/instances/{instance_id}"
    issued = await cloud.client.post(f"{base}/runtime-token", headers=member.headers)
    assert issued.status_code == 200 and issued.json()
    r = await cloud.client.delete(_members(instance_id, f"/{added['id']}"), headers=owner.headers)
    assert r.status_code == 204
    assert (
        await cloud.client.post(f"{base}/runtime-token", headers=member.headers)
    ).status_code == 404
    refresh = await cloud.client.post(
        f"{base}/refresh-token", json={"token": issued.json()["token"]}
    )
    assert refresh.status_code == 401 and refresh.json()["code"] == "invalid_token"
    listed = (await cloud.client.get("/api/cloud/instances", headers=member.headers)).json()
    assert listed == {"instances": []}


async def test_removing_an_unknown_member_is_not_found(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    a = (await cloud.created(owner))["instance"]["id"]
    b = (await cloud.created(owner, name="B"))["instance"]["id"]
    in_b = (await _add(cloud, owner, b, "x@example.com")).json()
    for member_id in ("nope", in_b["id"], "m" * 65):
        r = await cloud.client.delete(_members(a, f"/{member_id}"), headers=owner.headers)
        assert r.status_code in (404, 422), member_id
        if r.status_code == 404:
            assert r.json()["code"] == "not_found"
    # The member of the other instance is still there.
    listed = (await cloud.client.get(_members(b), headers=owner.headers)).json()
    assert [m["id"] for m in listed["members"]] == [in_b["id"]]


async def test_strangers_cannot_see_or_change_members(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    stranger = await cloud.user("stranger@example.com")
    instance_id = (await cloud.created(owner))["instance"]["id"]
    member = (await _add(cloud, owner, instance_id, "m@example.com")).json()
    assert (
        await cloud.client.get(_members(instance_id), headers=stranger.headers)
    ).status_code == 404
    r = await cloud.client.delete(
        _members(instance_id, f"/{member['id']}"), headers=stranger.headers
    )
    assert r.status_code == 404
    r = await _add(cloud, stranger, instance_id, "stranger2@example.com")
    assert r.status_code == 404
