"""The instances API: create (checkout, idempotency, quota, validation), read, retry, cancel, the
catalog, billing disabled in development, and credentials sealed at rest."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select

from control_plane.auth.models import User as UserRow
from control_plane.auth.service import AuthContext, issue_access_token
from control_plane.auth.sessions import create_session
from control_plane.billing.models import InstanceSubscription
from control_plane.errors import KeyDecryptionFailed
from control_plane.instances.credentials import decrypt_credentials
from control_plane.instances.models import CloudInstance, InstanceEvent
from tests.control_plane.conftest import PUBLIC_URL
from tests.control_plane.instances.helpers import Cloud, S, User


def _path(instance_id: str, tail: str = "") -> str:
    return f"/api/cloud/instances/{instance_id}{tail}"


# -- catalog -------------------------------------------------------------------------------------


async def test_the_catalog_is_public_and_says_whether_billing_is_enabled(cloud: Cloud) -> None:
    r = await cloud.client.get("/api/cloud/catalog")
    assert r.status_code == 200
    body = r.json()
    assert body["billingEnabled"] is True
    starter = body["tiers"][0]
    assert starter == {
        "id": "starter",
        "name": "Starter",
        "monthlyPriceCents": 900,
        "currency": "usd",
        "cpus": 1,
        "cpuKind": "shared",
        "memoryMb": 1024,
        "volumeGb": 1,
    }
    assert {"id": "iad", "name": "Ashburn, Virginia (US)"} in body["regions"]
    assert "stripe_price_id" not in r.text and "price_" not in r.text


async def test_without_a_stripe_key_the_catalog_says_billing_is_disabled(dev_cloud: Cloud) -> None:
    r = await dev_cloud.client.get("/api/cloud/catalog")
    assert r.json()["billingEnabled"] is False


# -- create with checkout ------------------------------------------------------------------------


async def test_creating_an_instance_opens_a_subscription_checkout_for_it(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    data = await cloud.created(owner, name="  Research room  ", goal="Plan the launch")
    instance = data["instance"]
    assert instance["status"] == "awaiting_payment"
    assert instance["name"] == "Research room"
    assert instance["role"] == "owner"
    assert set(instance) == {
        "id", "name", "goal", "tier", "region", "status", "step", "error", "url", "role",
        "runtimeKind", "createdAt", "updatedAt",
    }  # fmt: skip
    assert instance["runtimeKind"] == "reference"  # the default RUNTIME_KIND
    assert cloud.stripe is not None
    [session] = cloud.stripe.sessions
    assert data["checkout_url"] == session["url"]
    assert session["mode"] == "subscription"
    assert session["client_reference_id"] == instance["id"]
    assert session["metadata"] == {"instance_id": instance["id"], "user_id": owner.user_id}
    assert session["customer_email"] == "owner@example.com"
    success = urlsplit(session["success_url"])
    assert f"{success.scheme}://{success.netloc}{success.path}" == (
        f"{PUBLIC_URL}/cloud/new/provisioning"
    )
    assert parse_qs(success.query) == {
        "instance": [instance["id"]],
        "session_id": ["{CHECKOUT_SESSION_ID}"],
    }
    assert session["cancel_url"] == f"{PUBLIC_URL}/cloud/new?canceled={instance['id']}"
    [request] = cloud.stripe.requests_to("POST", "/v1/checkout/sessions")
    assert request.idempotency_key == f"quoroom-checkout-{instance['id']}"
    events = await cloud.events(instance["id"], owner)
    assert [(e["kind"], e["from"], e["to"]) for e in events] == [
        ("created", None, None),
        ("billing", "draft", "awaiting_payment"),
    ]


async def test_new_instances_get_the_configured_runtime_kind_and_keep_it(make_cloud: Any) -> None:
    async with make_cloud(runtime_kind="quoroom") as c:
        owner = await c.user("owner@example.com")
        created = (await c.created(owner))["instance"]
        assert created["runtimeKind"] == "quoroom"
        assert (await c.instance(created["id"])).runtime_kind == "quoroom"
        read = await c.client.get(_path(created["id"]), headers=owner.headers)
        assert read.json()["runtimeKind"] == "quoroom"
        listed = await c.client.get("/api/cloud/instances", headers=owner.headers)
        assert [i["runtimeKind"] for i in listed.json()["instances"]] == ["quoroom"]
        async with c.h.services.core.session_factory() as db:  # an instance made before the switch
            row = await db.get(CloudInstance, created["id"])
            assert row is not None
            row.runtime_kind = "reference"
            await db.commit()
        read = await c.client.get(_path(created["id"]), headers=owner.headers)
        assert read.json()["runtimeKind"] == "reference"


async def test_a_double_clicked_create_gives_one_instance_and_one_checkout(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    first, second = await asyncio.gather(
        cloud.create(owner, key="click-1"), cloud.create(owner, key="click-1")
    )
    assert first.status_code == second.status_code == 201, (first.text, second.text)
    assert first.json()["instance"]["id"] == second.json()["instance"]["id"]
    assert first.json()["checkout_url"] == second.json()["checkout_url"]
    third = await cloud.create(owner, key="click-1")
    assert third.json()["instance"]["id"] == first.json()["instance"]["id"]
    assert cloud.stripe is not None
    assert len(cloud.stripe.sessions) == 1
    async with cloud.h.services.core.session_factory() as db:
        assert len((await db.scalars(select(CloudInstance))).all()) == 1
        transitions = (
            await db.scalars(select(InstanceEvent).where(InstanceEvent.to_status.is_not(None)))
        ).all()
    assert [e.to_status for e in transitions] == ["awaiting_payment"]


async def test_reusing_an_idempotency_key_for_another_request_is_a_conflict(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    await cloud.created(owner, key="k-1")
    r = await cloud.create(owner, key="k-1", name="Another room")
    assert r.status_code == 409 and r.json()["code"] == "idempotency_conflict"


@pytest.mark.parametrize("key", [b"", b"with space", b"x" * 129, "na\u00efve".encode()])
async def test_a_malformed_idempotency_key_is_refused(cloud: Cloud, key: bytes) -> None:
    owner = await cloud.user("owner@example.com")
    headers = [*((k.encode(), v.encode()) for k, v in owner.headers.items())]
    headers.append((b"Idempotency-Key", key))
    body = {"name": "Room", "tier": "starter", "region": "iad"}
    r = await cloud.client.post("/api/cloud/instances", json=body, headers=headers)
    assert r.status_code == 400 and r.json()["code"] == "invalid_idempotency_key"


async def test_the_same_key_from_another_user_is_another_instance(cloud: Cloud) -> None:
    a = await cloud.user("a@example.com")
    b = await cloud.user("b@example.com")
    ia = (await cloud.created(a, key="same"))["instance"]["id"]
    ib = (await cloud.created(b, key="same"))["instance"]["id"]
    assert ia != ib


async def test_a_later_checkout_reuses_the_stripe_customer_of_an_earlier_one(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    first = await cloud.paid_and_running(owner)
    await cloud.created(owner, name="Second")
    assert cloud.stripe is not None
    sessions = cloud.stripe.sessions
    async with cloud.h.services.core.session_factory() as db:
        sub = await db.get(InstanceSubscription, first)
    assert sub is not None and sub.stripe_customer_id
    assert sessions[-1]["customer"] == sub.stripe_customer_id
    assert sessions[-1]["customer_email"] is None


async def test_stripe_being_down_keeps_a_keyed_draft_for_the_retry(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    assert cloud.stripe is not None
    cloud.stripe.fail_next(500, times=2, path="/v1/checkout/sessions")  # and the SDK's retry
    r = await cloud.create(owner, key="retry-me")
    assert r.status_code == 503 and r.json()["code"] == "billing_unavailable"
    async with cloud.h.services.core.session_factory() as db:
        [row] = (await db.scalars(select(CloudInstance))).all()
    assert row.status == S.DRAFT
    again = await cloud.create(owner, key="retry-me")
    assert again.status_code == 201
    assert again.json()["instance"]["id"] == row.id
    assert again.json()["instance"]["status"] == "awaiting_payment"


async def test_stripe_being_down_cancels_an_unkeyed_draft(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    assert cloud.stripe is not None
    cloud.stripe.fail_next(500, times=5, path="/v1/checkout/sessions")
    r = await cloud.create(owner)
    assert r.status_code == 503
    async with cloud.h.services.core.session_factory() as db:
        [row] = (await db.scalars(select(CloudInstance))).all()
    assert row.status == S.CANCELED  # does not count against the quota


async def test_a_refused_checkout_is_a_502_with_no_stripe_details(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    assert cloud.stripe is not None
    cloud.stripe.fail_next(400, path="/v1/checkout/sessions")
    r = await cloud.create(owner)
    assert r.status_code == 502 and r.json() == {
        "error": "the payment provider refused the request",
        "code": "billing_error",
    }


# -- create: refusals ----------------------------------------------------------------------------


async def test_creating_needs_a_signed_in_user(cloud: Cloud) -> None:
    r = await cloud.client.post(
        "/api/cloud/instances", json={"name": "R", "tier": "starter", "region": "iad"}
    )
    assert r.status_code == 401 and r.json()["code"] == "not_authenticated"


async def test_creating_needs_a_verified_email(cloud: Cloud) -> None:
    h = cloud.h
    now = h.clock()
    async with h.services.core.session_factory() as db:
        user = UserRow(email="new@example.com", email_verified=False, created_at=now)
        db.add(user)
        await db.flush()
        session, _ = await create_session(
            db, user, method="password", ttl=timedelta(days=1), now=now,
            user_agent=None, ip_address=None,
        )  # fmt: skip
        await db.commit()
        token = issue_access_token(h.services.get(AuthContext), user, session.id)
    r = await cloud.client.post(
        "/api/cloud/instances",
        json={"name": "R", "tier": "starter", "region": "iad"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 403 and r.json()["code"] == "email_not_verified"


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("tier", "platinum", "unknown_tier"),
        ("region", "mars", "unknown_region"),
        ("tier", "bad tier!", "invalid_body"),
        ("region", "x" * 33, "invalid_body"),
    ],
)
async def test_an_unknown_tier_or_region_is_refused(
    cloud: Cloud, field: str, value: str, code: str
) -> None:
    owner = await cloud.user("owner@example.com")
    r = await cloud.create(owner, **{field: value})
    assert r.status_code == 422 and r.json()["code"] == code
    assert cloud.stripe is not None and cloud.stripe.sessions == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"name": ""},
        {"name": "   "},
        {"name": "x" * 61},
        {"name": "bad\x00name"},
        {"name": "zero\u200bwidth"},
        {"name": 42},
        {"goal": "g" * 2001},
        {"goal": ["a list"]},
        {"credentials": {"openai": "sk-" + "a" * 600}},
        {"credentials": {"Bad Provider": "key"}},
        {"credentials": {"openai": "has space"}},
        {"credentials": {"openai": 12}},
        {"credentials": {f"p{i}": "k" for i in range(17)}},
        {"credentials": "not an object"},
        {"owner_id": "someone-else"},
    ],
)
async def test_a_bad_create_body_is_refused_without_side_effects(
    cloud: Cloud, overrides: dict[str, Any]
) -> None:
    owner = await cloud.user("owner@example.com")
    r = await cloud.create(owner, **overrides)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_body"
    assert "sk-aaa" not in r.text
    async with cloud.h.services.core.session_factory() as db:
        assert (await db.scalars(select(CloudInstance))).all() == []


async def test_malformed_json_is_refused(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    r = await cloud.client.post(
        "/api/cloud/instances",
        content=b'{"name": ',
        headers={**owner.headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["code"] == "invalid_json"


async def test_the_quota_counts_live_instances_only(make_cloud: Any) -> None:
    async with make_cloud(instance_quota=2) as c:
        owner = await c.user("owner@example.com")
        first = (await c.created(owner))["instance"]["id"]
        await c.created(owner)
        r = await c.create(owner)
        assert r.status_code == 409 and r.json()["code"] == "quota_exceeded"
        # Another user has their own quota.
        other = await c.user("other@example.com")
        assert (await c.create(other)).status_code == 201
        # A canceled instance frees its slot.
        assert (await c.client.delete(_path(first), headers=owner.headers)).status_code == 202
        assert (await c.create(owner)).status_code == 201


async def test_concurrent_creates_do_not_exceed_the_quota(make_cloud: Any) -> None:
    async with make_cloud(instance_quota=2) as c:
        owner = await c.user("owner@example.com")
        results = await asyncio.gather(*(c.create(owner, name=f"R{i}") for i in range(5)))
        codes = sorted(r.status_code for r in results)
        assert codes == [201, 201, 409, 409, 409]


# -- billing disabled (development) --------------------------------------------------------------


async def test_without_stripe_an_instance_goes_straight_to_provisioning(dev_cloud: Cloud) -> None:
    owner = await dev_cloud.user("owner@example.com")
    dev_cloud.h.wakeup.count = 0
    data = await dev_cloud.created(owner)
    assert data["checkout_url"] is None
    assert data["instance"]["status"] == "provisioning"
    events = await dev_cloud.events(data["instance"]["id"], owner)
    assert events[-1]["to"] == "provisioning"
    assert "billing disabled (development)" in events[-1]["message"]
    row = await dev_cloud.instance(data["instance"]["id"])
    assert row.run_after is not None
    assert dev_cloud.h.wakeup.count == 1


async def test_without_stripe_confirm_and_webhook_say_billing_is_disabled(dev_cloud: Cloud) -> None:
    owner = await dev_cloud.user("owner@example.com")
    instance_id = (await dev_cloud.created(owner))["instance"]["id"]
    r = await dev_cloud.client.post(_path(instance_id, "/checkout/confirm"), headers=owner.headers)
    assert r.status_code == 409 and r.json()["code"] == "billing_disabled"
    r = await dev_cloud.client.post("/api/billing/stripe/webhook", content=b"{}")
    assert r.status_code == 409 and r.json()["code"] == "billing_disabled"


# -- read ----------------------------------------------------------------------------------------


async def test_users_list_and_read_only_their_own_instances(cloud: Cloud) -> None:
    a = await cloud.user("a@example.com")
    b = await cloud.user("b@example.com")
    ia = (await cloud.created(a))["instance"]["id"]
    ib = (await cloud.created(b, name="B room"))["instance"]["id"]
    listed = (await cloud.client.get("/api/cloud/instances", headers=a.headers)).json()
    assert [i["id"] for i in listed["instances"]] == [ia]
    assert (await cloud.client.get(_path(ia), headers=a.headers)).json()["name"] == "My Room"
    for tail, method in [
        ("", "GET"),
        ("/status", "GET"),
        ("/members", "GET"),
        ("", "DELETE"),
        ("/retry", "POST"),
        ("/checkout/confirm", "POST"),
        ("/runtime-token", "POST"),
        ("/members", "POST"),
    ]:
        r = await cloud.client.request(
            method, _path(ib, tail), headers=a.headers, json={"email": "x@example.com"}
        )
        assert r.status_code == 404, (tail, method, r.text)
        assert r.json() == {"error": "instance not found", "code": "not_found"}
    # An id that does not exist answers exactly the same.
    missing = await cloud.client.get(
        _path("00000000-0000-0000-0000-000000000000"), headers=a.headers
    )
    assert missing.json() == {"error": "instance not found", "code": "not_found"}
    assert (await cloud.status(ib)) == S.AWAITING_PAYMENT


async def test_reading_needs_a_signed_in_user(cloud: Cloud) -> None:
    assert (await cloud.client.get("/api/cloud/instances")).status_code == 401
    assert (await cloud.client.get(_path("x"))).status_code == 401


async def test_an_overlong_instance_id_is_not_found(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    r = await cloud.client.get(_path("x" * 65), headers=owner.headers)
    assert r.status_code in (404, 422)


async def test_status_shows_the_event_trail_and_the_runtime_url(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    r = await cloud.client.get(_path(instance_id, "/status"), headers=owner.headers)
    body = r.json()
    assert body["status"] == "running"
    assert body["url"] == "https://room-1.quoroom.test"
    moves = [(e["from"], e["to"]) for e in body["events"] if e["to"]]
    assert moves == [
        ("draft", "awaiting_payment"),
        ("awaiting_payment", "provisioning"),
        ("provisioning", "running"),
    ]
    assert set(body["events"][0]) == {"kind", "from", "to", "message", "at"}


# -- retry and cancel ----------------------------------------------------------------------------


async def test_the_owner_retries_a_failed_instance(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    # Simulate: provisioning failed (a fresh instance would fail from provisioning).
    second = (await cloud.created(owner, name="Second"))["instance"]["id"]
    assert cloud.stripe is not None
    row = await cloud.instance(second)
    for event in cloud.stripe.complete_checkout(row.checkout_session_id or ""):
        await cloud.deliver(event)
    await cloud.worker(second, S.PROVISIONING, S.FAILED, "machine never got healthy",
                       error="machine never got healthy", attempts=8, run_after=None)  # fmt: skip
    r = await cloud.client.post(_path(second, "/retry"), headers=owner.headers)
    assert r.status_code == 200 and r.json()["status"] == "provisioning"
    row = await cloud.instance(second)
    assert row.attempts == 0 and row.error is None and row.run_after is not None
    again = await cloud.client.post(_path(second, "/retry"), headers=owner.headers)
    assert again.status_code == 409 and again.json()["code"] == "invalid_state"
    running = await cloud.client.post(_path(instance_id, "/retry"), headers=owner.headers)
    assert running.status_code == 409


async def test_deleting_cancels_the_subscription_and_the_instance(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    subscription_id = await cloud.subscription_id(instance_id)
    r = await cloud.client.delete(_path(instance_id), headers=owner.headers)
    assert r.status_code == 202 and r.json()["status"] == "canceled"
    assert cloud.stripe is not None
    assert cloud.stripe.subscription(subscription_id)["status"] == "canceled"
    [cancel] = cloud.stripe.requests_to("DELETE", f"/v1/subscriptions/{subscription_id}")
    assert cancel.idempotency_key == f"quoroom-cancel-{subscription_id}"
    row = await cloud.instance(instance_id)
    assert row.run_after is not None and row.destroy_after is not None
    assert row.destroy_after - row.updated_at == timedelta(days=7)
    # Deleting again is harmless and changes nothing.
    again = await cloud.client.delete(_path(instance_id), headers=owner.headers)
    assert again.status_code == 202 and again.json()["status"] == "canceled"
    assert len(cloud.stripe.requests_to("DELETE", f"/v1/subscriptions/{subscription_id}")) == 1


async def test_a_failed_stripe_cancel_leaves_the_instance_untouched(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    assert cloud.stripe is not None
    cloud.stripe.fail_next(503, times=5, path="/v1/subscriptions")
    r = await cloud.client.delete(_path(instance_id), headers=owner.headers)
    assert r.status_code == 503 and r.json()["code"] == "billing_unavailable"
    assert await cloud.status(instance_id) == S.RUNNING


async def test_an_unpaid_instance_is_canceled_without_a_subscription_cancel(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = (await cloud.created(owner))["instance"]["id"]
    r = await cloud.client.delete(_path(instance_id), headers=owner.headers)
    assert r.status_code == 202 and r.json()["status"] == "canceled"
    assert cloud.stripe is not None
    assert [r for r in cloud.stripe.requests if r.method == "DELETE"] == []


async def test_paying_a_canceled_checkout_cancels_the_new_subscription(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = (await cloud.created(owner))["instance"]["id"]
    session_id = (await cloud.instance(instance_id)).checkout_session_id
    assert cloud.stripe is not None
    # Paid just before the delete (deleting expires an open checkout, so it cannot be paid
    # after); the webhook arrives after it.
    events = cloud.stripe.complete_checkout(session_id or "")
    await cloud.client.delete(_path(instance_id), headers=owner.headers)
    assert (await cloud.deliver(events[0])).status_code == 200
    assert await cloud.status(instance_id) == S.CANCELED
    [sub] = cloud.stripe.subscriptions
    assert sub["status"] == "canceled"


# -- credentials ---------------------------------------------------------------------------------


async def test_credentials_are_sealed_at_rest_and_never_returned(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    secret = "sk-live-" + "Z" * 40
    data = await cloud.created(owner, credentials={"anthropic": secret, "openai": "sk-o"})
    instance_id = data["instance"]["id"]
    for path in ("", "/status"):
        r = await cloud.client.get(_path(instance_id, path), headers=owner.headers)
        assert secret not in r.text and "credentials" not in r.text
    listed = await cloud.client.get("/api/cloud/instances", headers=owner.headers)
    assert secret not in listed.text
    row = await cloud.instance(instance_id)
    assert row.credentials_encrypted is not None
    assert secret.encode() not in row.credentials_encrypted
    settings = cloud.h.services.core.settings
    assert decrypt_credentials(settings, row) == {"anthropic": secret, "openai": "sk-o"}
    assert cloud.stripe is not None
    assert all(secret not in str(r.params) for r in cloud.stripe.requests)


async def test_sealed_credentials_do_not_open_on_another_instance(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    a = (await cloud.created(owner, credentials={"openai": "sk-a"}))["instance"]["id"]
    b = (await cloud.created(owner, name="B"))["instance"]["id"]
    row_a, row_b = await cloud.instance(a), await cloud.instance(b)
    settings = cloud.h.services.core.settings
    assert decrypt_credentials(settings, row_b) == {}
    row_b.credentials_encrypted = row_a.credentials_encrypted
    with pytest.raises(KeyDecryptionFailed):
        decrypt_credentials(settings, row_b)


async def test_other_users_cannot_see_instances_after_the_owner_lists(cloud: Cloud) -> None:
    a = await cloud.user("a@example.com")
    await cloud.created(a)
    stranger: User = await cloud.user("stranger@example.com")
    listed = (await cloud.client.get("/api/cloud/instances", headers=stranger.headers)).json()
    assert listed == {"instances": []}
