"""Step-up (issue 15, item 3): deleting an instance and adding or removing members need a
second factor proved in this session within the last 10 minutes, when the account has one; the
refusal is 403 ``step_up_required``, which ``POST /api/auth/second-factor/verify`` lifts."""

from __future__ import annotations

import httpx
import pyotp

from tests.control_plane.conftest import PASSWORD
from tests.control_plane.instances.helpers import (  # noqa: F401 - fixtures
    Cloud,
    User,
    dev_cloud,
    make_cloud,
)

TEN_MINUTES = 10 * 60


async def _enrol(cloud: Cloud, user: User) -> str:
    """Turn TOTP on for ``user``'s session (bearer); that session has just proved it."""
    r = await cloud.client.post("/api/auth/totp/setup", headers=user.headers)
    secret: str = r.json()["secret"]
    r = await cloud.client.post(
        "/api/auth/totp/confirm", json={"code": _code(cloud, secret)}, headers=user.headers
    )
    assert r.status_code == 200, r.text
    return secret


def _code(cloud: Cloud, secret: str) -> str:
    return pyotp.TOTP(secret).at(int(cloud.h.clock.now.timestamp()))


async def _step_up(cloud: Cloud, user: User, secret: str) -> None:
    cloud.h.clock.advance(30)  # a code of a new step
    r = await cloud.client.post(
        "/api/auth/second-factor/verify", json={"code": _code(cloud, secret)}, headers=user.headers
    )
    assert r.status_code == 200, r.text


def _step_up_required(r: httpx.Response) -> None:
    assert r.status_code == 403, r.text
    assert r.json()["code"] == "step_up_required"


async def test_members_and_deletion_need_a_recent_second_factor(dev_cloud: Cloud) -> None:  # noqa: F811
    cloud = dev_cloud
    owner = await cloud.user("owner@example.com")
    friend = await cloud.user("friend@example.com")
    instance_id = await cloud.paid_and_running(owner)
    base = f"/api/cloud/instances/{instance_id}"
    secret = await _enrol(cloud, owner)

    # Just enrolled: within the window.
    r = await cloud.client.post(
        f"{base}/members", json={"email": friend.email}, headers=owner.headers
    )
    assert r.status_code == 202, r.text
    member_id = r.json()["id"]

    cloud.h.clock.advance(TEN_MINUTES + 1)
    _step_up_required(
        await cloud.client.post(
            f"{base}/members", json={"email": "third@example.com"}, headers=owner.headers
        )
    )
    _step_up_required(
        await cloud.client.delete(f"{base}/members/{member_id}", headers=owner.headers)
    )
    _step_up_required(await cloud.client.delete(base, headers=owner.headers))
    assert await cloud.status(instance_id) == "running"  # nothing happened

    await _step_up(cloud, owner, secret)
    r = await cloud.client.delete(f"{base}/members/{member_id}", headers=owner.headers)
    assert r.status_code == 204, r.text
    r = await cloud.client.delete(base, headers=owner.headers)
    assert r.status_code == 202, r.text


async def test_accounts_without_a_second_factor_are_not_asked(dev_cloud: Cloud) -> None:  # noqa: F811
    cloud = dev_cloud
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    cloud.h.clock.advance(TEN_MINUTES + 1)
    r = await cloud.client.post(
        f"/api/cloud/instances/{instance_id}/members",
        json={"email": "friend@example.com"},
        headers=owner.headers,
    )
    assert r.status_code == 202, r.text
    r = await cloud.client.delete(f"/api/cloud/instances/{instance_id}", headers=owner.headers)
    assert r.status_code == 202, r.text


async def test_a_two_step_sign_in_counts_as_a_recent_second_factor(dev_cloud: Cloud) -> None:  # noqa: F811
    """The session a two-step sign-in opens has just proved the factor."""
    cloud = dev_cloud
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    secret = await _enrol(cloud, owner)
    r = await cloud.client.post(
        "/api/auth/login",
        json={
            "email": owner.email,
            "password": "correct horse battery staple",
            "transport": "body",
        },
    )
    token = r.json()["second_factor_token"]
    cloud.h.clock.advance(30)
    r = await cloud.client.post(
        "/api/auth/second-factor",
        json={"code": _code(cloud, secret), "second_factor_token": token},
    )
    assert r.status_code == 200, r.text
    fresh = {"Authorization": f"Bearer {r.json()['access_token']}"}
    r = await cloud.client.delete(f"/api/cloud/instances/{instance_id}", headers=fresh)
    assert r.status_code == 202, r.text


# -- changing the password (a step-up action) ---------------------------------------------------

NEW_PASSWORD = "a brand new passphrase"


async def test_changing_the_password_needs_the_current_one_and_signs_out_elsewhere(
    dev_cloud: Cloud,  # noqa: F811
) -> None:
    cloud = dev_cloud
    owner = await cloud.user("owner@example.com")
    elsewhere = await cloud.signin(owner.email)
    url = "/api/auth/password"
    r = await cloud.client.post(
        url,
        json={"current_password": "wrong wrong wrong", "password": NEW_PASSWORD},
        headers=owner.headers,
    )
    assert r.status_code == 401 and r.json()["code"] == "invalid_credentials"
    r = await cloud.client.post(url, json={"password": NEW_PASSWORD}, headers=owner.headers)
    assert r.status_code == 401  # the current password is required
    r = await cloud.client.post(
        url, json={"current_password": PASSWORD, "password": "short"}, headers=owner.headers
    )
    assert r.status_code == 422 and r.json()["code"] == "weak_password"
    r = await cloud.client.post(
        url, json={"current_password": PASSWORD, "password": NEW_PASSWORD}, headers=owner.headers
    )
    assert r.status_code == 200, r.text
    assert (await cloud.client.get("/api/auth/me", headers=owner.headers)).status_code == 200
    assert (await cloud.client.get("/api/auth/me", headers=elsewhere.headers)).status_code == 401
    await cloud.h.drain()
    assert cloud.h.outbox.to(owner.email)[-1].subject == "Your password was changed"
    r = await cloud.client.post(
        "/api/auth/login", json={"email": owner.email, "password": NEW_PASSWORD}
    )
    assert r.status_code == 200, r.text


async def test_changing_the_password_needs_a_recent_second_factor(dev_cloud: Cloud) -> None:  # noqa: F811
    cloud = dev_cloud
    owner = await cloud.user("owner@example.com")
    secret = await _enrol(cloud, owner)
    cloud.h.clock.advance(TEN_MINUTES + 1)
    body = {"current_password": PASSWORD, "password": NEW_PASSWORD}
    _step_up_required(
        await cloud.client.post("/api/auth/password", json=body, headers=owner.headers)
    )
    await _step_up(cloud, owner, secret)
    r = await cloud.client.post("/api/auth/password", json=body, headers=owner.headers)
    assert r.status_code == 200, r.text
