"""Shared fixtures and helpers for the instances and billing-flow tests: the control plane with a
fake Stripe on loopback (driven through the real gateway), signed-in users, and a stand-in for
the provisioning worker (plain ``lifecycle.transition`` calls)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from control_plane.instances.lifecycle import transition
from control_plane.instances.models import CloudInstance, InstanceStatus
from control_plane.settings import Settings
from tests.control_plane.conftest import (
    FakeClock,
    Harness,
    login_body,
    signup_and_verify,
)
from tests.fakes.stripe_api import (
    DEFAULT_SECRET_KEY,
    DEFAULT_WEBHOOK_SECRET,
    FakeStripe,
    adeliver,
)

S = InstanceStatus
WEBHOOK = "/api/billing/stripe/webhook"
RUNTIME_URL = "https://room-1.quoroom.test"
_GENEROUS = "1000/minute"


@dataclass
class User:
    email: str
    headers: dict[str, str]
    user_id: str
    session_id: str
    access_token: str


@dataclass
class Cloud:
    """The app (harness), the fake Stripe behind it, and helpers to drive both."""

    h: Harness
    stripe: FakeStripe | None

    @property
    def client(self) -> httpx.AsyncClient:
        return self.h.client

    async def user(self, email: str) -> User:
        await signup_and_verify(self.h, email)
        return await self.signin(email)

    async def signin(self, email: str) -> User:
        """A new session (after the clock moved past the access token's life)."""
        body = await login_body(self.h, email)
        return User(
            email=email,
            headers={"Authorization": f"Bearer {body['access_token']}"},
            user_id=body["user"]["id"],
            session_id=body["session_id"],
            access_token=body["access_token"],
        )

    async def create(
        self, user: User, *, key: str | None = None, **overrides: Any
    ) -> httpx.Response:
        body: dict[str, Any] = {"name": "My Room", "tier": "starter", "region": "iad"}
        body.update(overrides)
        headers = dict(user.headers)
        if key is not None:
            headers["Idempotency-Key"] = key
        return await self.client.post("/api/cloud/instances", json=body, headers=headers)

    async def created(self, user: User, **kw: Any) -> dict[str, Any]:
        response = await self.create(user, **kw)
        assert response.status_code == 201, response.text
        data: dict[str, Any] = response.json()
        return data

    async def deliver(self, event: dict[str, Any] | bytes, **kw: Any) -> httpx.Response:
        return await adeliver(event, WEBHOOK, DEFAULT_WEBHOOK_SECRET, client=self.client, **kw)

    async def instance(self, instance_id: str) -> CloudInstance:
        async with self.h.services.core.session_factory() as db:
            row = await db.get(CloudInstance, instance_id)
            assert row is not None
            return row

    async def status(self, instance_id: str) -> str:
        return (await self.instance(instance_id)).status

    async def events(self, instance_id: str, user: User) -> list[dict[str, Any]]:
        r = await self.client.get(
            f"/api/cloud/instances/{instance_id}/status", headers=user.headers
        )
        assert r.status_code == 200, r.text
        events: list[dict[str, Any]] = r.json()["events"]
        return events

    async def worker(
        self, instance_id: str, expected: S, to: S, message: str = "worker", **fields: Any
    ) -> None:
        """What the provisioning worker would do (the other engineer's code drives this)."""
        async with self.h.services.core.session_factory() as db:
            await transition(
                db, instance_id, expected=(expected,), to=to, message=message, **fields
            )
            await db.commit()

    async def run(self, instance_id: str, url: str = RUNTIME_URL) -> None:
        """provisioning → running, as the worker does when the machine is healthy."""
        await self.worker(
            instance_id, S.PROVISIONING, S.RUNNING, "healthy", url=url, run_after=None
        )

    async def paid_and_running(self, user: User, url: str = RUNTIME_URL) -> str:
        """Create, pay (signed webhook) and let the 'worker' bring it up. Returns the id."""
        data = await self.created(user)
        instance_id: str = data["instance"]["id"]
        if self.stripe is not None:
            session_id = (await self.instance(instance_id)).checkout_session_id
            assert session_id is not None
            for event in self.stripe.complete_checkout(session_id):
                assert (await self.deliver(event)).status_code == 200
        await self.run(instance_id, url)
        return instance_id

    async def invite_and_accept(self, owner: User, instance_id: str, member: User) -> str:
        """The owner invites ``member``, who accepts in the app. Returns the membership id."""
        r = await self.client.post(
            f"/api/cloud/instances/{instance_id}/members",
            json={"email": member.email},
            headers=owner.headers,
        )
        assert r.status_code == 202, r.text
        member_id: str = r.json()["id"]
        r = await self.client.post(
            f"/api/cloud/invitations/{member_id}/accept", headers=member.headers
        )
        assert r.status_code == 200, r.text
        return member_id

    async def subscription_id(self, instance_id: str) -> str:
        from control_plane.billing.models import InstanceSubscription

        async with self.h.services.core.session_factory() as db:
            sub = await db.get(InstanceSubscription, instance_id)
            assert sub is not None and sub.stripe_subscription_id is not None
            return sub.stripe_subscription_id


def generous(make_settings: Callable[..., Settings], **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        # These tests stand in for the provisioning worker (``Cloud.worker``); the real one has
        # its own tests.
        "run_worker": False,
        "throttle_signup_address": _GENEROUS,
        "throttle_signup_account": _GENEROUS,
        "throttle_login_address": _GENEROUS,
        "throttle_email_address": _GENEROUS,
    }
    values.update(overrides)
    return make_settings(**values)


@pytest.fixture
def stripe_fake(clock: FakeClock) -> Iterator[FakeStripe]:
    """The fake Stripe API on loopback; its clock (event ``created``) is the app's clock."""
    with FakeStripe(clock=lambda: clock.now.timestamp()) as fake:
        yield fake


@pytest.fixture
def cloud_settings(make_settings: Callable[..., Settings], stripe_fake: FakeStripe) -> Settings:
    return generous(
        make_settings,
        stripe_secret_key=DEFAULT_SECRET_KEY,
        stripe_webhook_secret=DEFAULT_WEBHOOK_SECRET,
        stripe_api_base=stripe_fake.url,
    )


@pytest.fixture
async def cloud(
    make_harness: Any, cloud_settings: Settings, stripe_fake: FakeStripe
) -> AsyncIterator[Cloud]:
    async with make_harness(cloud_settings) as h:
        yield Cloud(h, stripe_fake)


@pytest.fixture
def make_cloud(make_harness: Any, make_settings: Callable[..., Settings]) -> Any:
    """A control plane with other settings (``stripe=None``: billing disabled)."""

    @asynccontextmanager
    async def build(stripe: FakeStripe | None = None, **overrides: Any) -> AsyncIterator[Cloud]:
        if stripe is not None:
            overrides.setdefault("stripe_secret_key", DEFAULT_SECRET_KEY)
            overrides.setdefault("stripe_webhook_secret", DEFAULT_WEBHOOK_SECRET)
            overrides.setdefault("stripe_api_base", stripe.url)
        async with make_harness(generous(make_settings, **overrides)) as h:
            yield Cloud(h, stripe)

    return build


@pytest.fixture
async def dev_cloud(make_cloud: Any) -> AsyncIterator[Cloud]:
    """Billing disabled (no Stripe key): development only."""
    async with make_cloud() as c:
        yield c
