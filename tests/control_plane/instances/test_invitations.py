"""Invitations (issue 12, item 6): adding a member is an invitation that the invitee accepts —
by the emailed link or in ``/app`` — before the Room is theirs to see or open.

The owner's answer is the same whatever the invitee's account state (no enumeration oracle, same
work), invitations are rate limited per owner and per instance, and a member never sees the
other invitees' addresses."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, select

from control_plane.auth.models import User as UserRow
from control_plane.instances.models import CloudInstanceMember
from tests.control_plane.conftest import PUBLIC_URL
from tests.control_plane.instances.helpers import Cloud, User

ACCEPT = "/api/cloud/invitations/accept"
INVITATIONS = "/api/cloud/invitations"


def _members(instance_id: str, tail: str = "") -> str:
    return f"/api/cloud/instances/{instance_id}/members{tail}"


async def _invite(cloud: Cloud, owner: User, instance_id: str, email: str) -> Any:
    return await cloud.client.post(
        _members(instance_id), json={"email": email}, headers=owner.headers
    )


async def _link_token(cloud: Cloud, email: str) -> str:
    await cloud.h.drain()
    return cloud.h.outbox.last_token(email)


async def _accept(cloud: Cloud, user: User, token: Any) -> Any:
    return await cloud.client.post(ACCEPT, json={"token": token}, headers=user.headers)


async def _rows(cloud: Cloud) -> list[CloudInstanceMember]:
    async with cloud.h.services.core.session_factory() as db:
        return list((await db.scalars(select(CloudInstanceMember))).all())


async def _sees(cloud: Cloud, user: User, instance_id: str) -> bool:
    listed = (await cloud.client.get("/api/cloud/instances", headers=user.headers)).json()
    return instance_id in [i["id"] for i in listed["instances"]]


@contextmanager
def _statements(cloud: Cloud) -> Iterator[list[str]]:
    """The SQL statements the app runs inside the block (parameters left out)."""
    seen: list[str] = []
    engine = cloud.h.services.core.engine.sync_engine

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


# -- the same answer, the same work --------------------------------------------------------------


async def test_the_answer_to_an_invitation_is_the_same_whatever_the_invitees_account(
    cloud: Cloud,
) -> None:
    owner = await cloud.user("owner@example.com")
    await cloud.user("verified@example.com")
    async with cloud.h.services.core.session_factory() as db:
        db.add(UserRow(email="unverified@example.com", email_verified=False))
        await db.commit()
    instance_id = await cloud.paid_and_running(owner)
    answers: list[tuple[int, set[str], str, str]] = []
    work: list[list[str]] = []
    for email in ("verified@example.com", "unverified@example.com", "nobody@example.com"):
        with _statements(cloud) as seen:
            r = await _invite(cloud, owner, instance_id, email)
        body = r.json()
        answers.append((r.status_code, set(body), body["status"], body["role"]))
        work.append(seen)
    assert (
        answers == [(202, {"id", "email", "status", "role", "createdAt"}, "pending", "member")] * 3
    )
    # Equal work: the same statements whether or not an account exists (no user lookup at all).
    assert work[0] == work[1] == work[2]
    assert not any("users.email =" in s or "users.email IN" in s for s in work[0])
    # Every invitee gets the same invitation mail, account or not.
    await cloud.h.drain()
    for email in ("verified@example.com", "unverified@example.com", "nobody@example.com"):
        [mail] = [m for m in cloud.h.outbox.to(email) if "accept-invite" in (m.link or "")]
        assert mail.link is not None and mail.link.startswith(f"{PUBLIC_URL}/accept-invite#token=")
        assert "owner@example.com" in mail.text and email in mail.text


async def test_inviting_an_address_again_answers_the_same_and_keeps_one_invitation(
    cloud: Cloud,
) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = (await cloud.created(owner))["instance"]["id"]
    first = await _invite(cloud, owner, instance_id, "friend@example.com")
    second = await _invite(cloud, owner, instance_id, "FRIEND@example.com")
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert len(await _rows(cloud)) == 1
    await cloud.h.drain()
    assert len(cloud.h.outbox.to("friend@example.com")) == 2  # sent again, a fresh link


# -- nobody becomes a member without accepting ---------------------------------------------------


async def test_an_invited_verified_user_is_not_a_member_until_they_accept(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    invitee = await cloud.user("invitee@example.com")
    instance_id = await cloud.paid_and_running(owner)
    assert (await _invite(cloud, owner, instance_id, invitee.email)).status_code == 202
    base = f"/api/cloud/instances/{instance_id}"
    assert not await _sees(cloud, invitee, instance_id)
    for method, path in [
        ("GET", base),
        ("GET", f"{base}/status"),
        ("GET", _members(instance_id)),
        ("POST", f"{base}/runtime-token"),
    ]:
        r = await cloud.client.request(method, path, headers=invitee.headers)
        assert r.status_code == 404, (method, path, r.text)
    [row] = await _rows(cloud)
    assert row.status == "pending" and row.user_id is None


async def test_verifying_the_invited_address_does_not_make_a_member(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = (await cloud.created(owner))["instance"]["id"]
    await _invite(cloud, owner, instance_id, "later@example.com")
    later = await cloud.user("later@example.com")  # signs up and verifies afterwards
    assert not await _sees(cloud, later, instance_id)
    [row] = await _rows(cloud)
    assert row.status == "pending" and row.user_id is None


async def test_the_emailed_link_makes_the_invitee_a_member(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    await _invite(cloud, owner, instance_id, "invitee@example.com")
    token = await _link_token(cloud, "invitee@example.com")
    invitee = await cloud.user("invitee@example.com")
    r = await _accept(cloud, invitee, token)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == instance_id and r.json()["role"] == "member"
    assert await _sees(cloud, invitee, instance_id)
    issued = await cloud.client.post(
        f"/api/cloud/instances/{instance_id}/runtime-token", headers=invitee.headers
    )
    assert issued.status_code == 200, issued.text
    [row] = await _rows(cloud)
    assert row.status == "active" and row.user_id == invitee.user_id
    owner_view = (await cloud.client.get(_members(instance_id), headers=owner.headers)).json()
    assert [(m["email"], m["status"]) for m in owner_view["members"]] == [
        ("invitee@example.com", "active")
    ]


async def test_an_accept_link_works_once(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = (await cloud.created(owner))["instance"]["id"]
    await _invite(cloud, owner, instance_id, "invitee@example.com")
    token = await _link_token(cloud, "invitee@example.com")
    invitee = await cloud.user("invitee@example.com")
    assert (await _accept(cloud, invitee, token)).status_code == 200
    again = await _accept(cloud, invitee, token)
    assert again.status_code == 400 and again.json()["code"] == "invalid_token"
    # Leaving and being invited again: the old link is still spent.
    [row] = await _rows(cloud)
    assert (
        await cloud.client.delete(_members(instance_id, f"/{row.id}"), headers=invitee.headers)
    ).status_code == 204
    await _invite(cloud, owner, instance_id, "invitee@example.com")
    old = await _accept(cloud, invitee, token)
    assert old.status_code == 400 and old.json()["code"] == "invalid_token"
    assert (
        await _accept(cloud, invitee, await _link_token(cloud, invitee.email))
    ).status_code == 200


async def test_an_expired_accept_link_is_refused(make_cloud: Any) -> None:
    async with make_cloud(invite_ttl_seconds=3600) as cloud:
        owner = await cloud.user("owner@example.com")
        instance_id = (await cloud.created(owner))["instance"]["id"]
        await _invite(cloud, owner, instance_id, "invitee@example.com")
        token = await _link_token(cloud, "invitee@example.com")
        cloud.h.clock.advance(3601)
        invitee = await cloud.user("invitee@example.com")
        r = await _accept(cloud, invitee, token)
        assert r.status_code == 400 and r.json()["code"] == "invalid_token"
        # Nor can it be accepted in the app any more; the owner invites again.
        assert (await cloud.client.get(INVITATIONS, headers=invitee.headers)).json() == {
            "invitations": []
        }
        [row] = await _rows(cloud)
        r = await cloud.client.post(f"{INVITATIONS}/{row.id}/accept", headers=invitee.headers)
        assert r.status_code == 404 and r.json()["code"] == "not_found"
        owner = await cloud.signin("owner@example.com")
        await _invite(cloud, owner, instance_id, "invitee@example.com")
        fresh = await _link_token(cloud, "invitee@example.com")
        assert (await _accept(cloud, invitee, fresh)).status_code == 200


async def test_a_removed_invitations_link_no_longer_works(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = (await cloud.created(owner))["instance"]["id"]
    added = (await _invite(cloud, owner, instance_id, "invitee@example.com")).json()
    token = await _link_token(cloud, "invitee@example.com")
    r = await cloud.client.delete(_members(instance_id, f"/{added['id']}"), headers=owner.headers)
    assert r.status_code == 204
    invitee = await cloud.user("invitee@example.com")
    r = await _accept(cloud, invitee, token)
    assert r.status_code == 400 and r.json()["code"] == "invalid_token"
    assert not await _sees(cloud, invitee, instance_id)


async def test_another_account_cannot_accept_the_link(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    await _invite(cloud, owner, instance_id, "invitee@example.com")
    token = await _link_token(cloud, "invitee@example.com")
    thief = await cloud.user("thief@example.com")
    r = await _accept(cloud, thief, token)
    assert r.status_code == 403 and r.json()["code"] == "invite_wrong_account"
    assert not await _sees(cloud, thief, instance_id)
    [row] = await _rows(cloud)
    assert row.status == "pending" and row.user_id is None
    # The invitee can still accept it.
    invitee = await cloud.user("invitee@example.com")
    assert (await _accept(cloud, invitee, token)).status_code == 200


@pytest.mark.parametrize(
    "token",
    [
        "",
        "x",
        "not.a.token",
        "a" * 5000,
        42,
        None,
        ["t"],
    ],
)
async def test_a_bad_accept_token_is_refused(cloud: Cloud, token: Any) -> None:
    user = await cloud.user("someone@example.com")
    r = await _accept(cloud, user, token)
    assert r.status_code in (400, 422), r.text
    assert r.json()["code"] in ("invalid_token", "invalid_body")


async def test_a_tampered_or_foreign_token_is_refused(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = (await cloud.created(owner))["instance"]["id"]
    await _invite(cloud, owner, instance_id, "invitee@example.com")
    token = await _link_token(cloud, "invitee@example.com")
    invitee = await cloud.user("invitee@example.com")
    payload, _, signature = token.rpartition(".")
    # The first character: all its bits are signature bits (the last one's may be padding).
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    for bad in (f"{payload}.{flipped}", f"{payload}x.{signature}", token[::-1]):
        r = await _accept(cloud, invitee, bad)
        assert r.status_code == 400 and r.json()["code"] == "invalid_token", bad
    # A token of another kind (the email-verification link) is not an invitation.
    [verify] = [m for m in cloud.h.outbox.to(invitee.email) if "verify-email" in (m.link or "")]
    r = await _accept(cloud, invitee, (verify.link or "").split("#token=", 1)[1])
    assert r.status_code == 400 and r.json()["code"] == "invalid_token"
    [row] = await _rows(cloud)
    assert row.status == "pending"


async def test_accepting_needs_a_signed_in_account(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = (await cloud.created(owner))["instance"]["id"]
    await _invite(cloud, owner, instance_id, "invitee@example.com")
    token = await _link_token(cloud, "invitee@example.com")
    r = await cloud.client.post(ACCEPT, json={"token": token})
    assert r.status_code == 401 and r.json()["code"] == "not_authenticated"
    [row] = await _rows(cloud)
    assert row.status == "pending"


# -- in the app ----------------------------------------------------------------------------------


async def test_an_invitee_sees_their_invitations_and_accepts_in_the_app(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    invitee = await cloud.user("invitee@example.com")
    instance_id = await cloud.paid_and_running(owner)
    await _invite(cloud, owner, instance_id, invitee.email)
    r = await cloud.client.get(INVITATIONS, headers=invitee.headers)
    assert r.status_code == 200
    [invitation] = r.json()["invitations"]
    assert set(invitation) == {"id", "instanceId", "instanceName", "invitedBy", "createdAt"}
    assert invitation["instanceId"] == instance_id
    assert invitation["invitedBy"] == "owner@example.com"
    # Nobody else sees it.
    other = await cloud.user("other@example.com")
    assert (await cloud.client.get(INVITATIONS, headers=other.headers)).json() == {
        "invitations": []
    }
    for method in ("POST", "DELETE"):
        tail = "/accept" if method == "POST" else ""
        r = await cloud.client.request(
            method, f"{INVITATIONS}/{invitation['id']}{tail}", headers=other.headers
        )
        assert r.status_code == 404 and r.json()["code"] == "not_found", method
    r = await cloud.client.post(f"{INVITATIONS}/{invitation['id']}/accept", headers=invitee.headers)
    assert r.status_code == 200 and r.json()["role"] == "member"
    assert await _sees(cloud, invitee, instance_id)
    assert (await cloud.client.get(INVITATIONS, headers=invitee.headers)).json() == {
        "invitations": []
    }
    r = await cloud.client.post(f"{INVITATIONS}/{invitation['id']}/accept", headers=invitee.headers)
    assert r.status_code == 404


async def test_an_invitee_may_decline(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    invitee = await cloud.user("invitee@example.com")
    instance_id = (await cloud.created(owner))["instance"]["id"]
    await _invite(cloud, owner, instance_id, invitee.email)
    token = await _link_token(cloud, invitee.email)
    [invitation] = (await cloud.client.get(INVITATIONS, headers=invitee.headers)).json()[
        "invitations"
    ]
    r = await cloud.client.delete(f"{INVITATIONS}/{invitation['id']}", headers=invitee.headers)
    assert r.status_code == 204
    assert await _rows(cloud) == []
    r = await _accept(cloud, invitee, token)
    assert r.status_code == 400 and r.json()["code"] == "invalid_token"
    assert (await cloud.client.get(_members(instance_id), headers=owner.headers)).json() == {
        "members": []
    }


# -- limits --------------------------------------------------------------------------------------


async def test_invitations_are_limited_per_owner(make_cloud: Any) -> None:
    async with make_cloud(throttle_invite_owner="3/hour") as cloud:
        owner = await cloud.user("owner@example.com")
        a = (await cloud.created(owner))["instance"]["id"]
        b = (await cloud.created(owner, name="B"))["instance"]["id"]
        for i, instance_id in enumerate((a, a, b)):
            assert (
                await _invite(cloud, owner, instance_id, f"m{i}@example.com")
            ).status_code == 202
        r = await _invite(cloud, owner, b, "m9@example.com")
        assert r.status_code == 429, r.text
        assert r.json()["code"] == "throttled" and r.json()["error"]
        assert 1 <= int(r.headers["retry-after"]) <= 3600
        assert len(await _rows(cloud)) == 3
        await cloud.h.drain()
        assert cloud.h.outbox.to("m9@example.com") == []
        # Another owner has their own budget.
        other = await cloud.user("other@example.com")
        c = (await cloud.created(other))["instance"]["id"]
        assert (await _invite(cloud, other, c, "m9@example.com")).status_code == 202


async def test_invitations_are_limited_per_instance(make_cloud: Any) -> None:
    async with make_cloud(throttle_invite_instance="2/hour") as cloud:
        owner = await cloud.user("owner@example.com")
        a = (await cloud.created(owner))["instance"]["id"]
        b = (await cloud.created(owner, name="B"))["instance"]["id"]
        for i in range(2):
            assert (await _invite(cloud, owner, a, f"m{i}@example.com")).status_code == 202
        # Re-sending to the same address counts too (each one mails someone).
        r = await _invite(cloud, owner, a, "m0@example.com")
        assert r.status_code == 429 and r.json()["code"] == "throttled"
        assert "retry-after" in r.headers
        assert (await _invite(cloud, owner, b, "m5@example.com")).status_code == 202


@pytest.mark.redis
async def test_invitation_limits_hold_through_redis(make_cloud: Any, redis_url: str | None) -> None:
    if not redis_url:
        pytest.skip("QUOROOM_TEST_REDIS_URL not set")
    async with make_cloud(redis_url=redis_url, throttle_invite_instance="2/hour") as cloud:
        owner = await cloud.user("owner@example.com")
        a = (await cloud.created(owner))["instance"]["id"]
        for i in range(2):
            assert (await _invite(cloud, owner, a, f"m{i}@example.com")).status_code == 202
        r = await _invite(cloud, owner, a, "m2@example.com")
        assert r.status_code == 429 and r.json()["code"] == "throttled"
        assert int(r.headers["retry-after"]) >= 1


# -- what members see ----------------------------------------------------------------------------


async def test_a_member_sees_active_members_but_not_other_invitees_addresses(
    cloud: Cloud,
) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    alice = await cloud.user("alice@example.com")
    bob = await cloud.user("bob@example.com")
    for user in (alice, bob):
        await cloud.invite_and_accept(owner, instance_id, user)
    await _invite(cloud, owner, instance_id, "carol@example.com")  # not accepted
    owner_view = (await cloud.client.get(_members(instance_id), headers=owner.headers)).json()
    assert sorted((m["email"], m["status"]) for m in owner_view["members"]) == [
        ("alice@example.com", "active"),
        ("bob@example.com", "active"),
        ("carol@example.com", "pending"),
    ]
    alice_view = (await cloud.client.get(_members(instance_id), headers=alice.headers)).json()
    assert sorted((m["email"] or "", m["status"]) for m in alice_view["members"]) == [
        ("", "active"),
        ("alice@example.com", "active"),
    ]
    assert "carol" not in str(alice_view) and "bob@" not in str(alice_view)
