# ruff: noqa: F811 - the fixtures imported from the instances helpers are test parameters here
"""The Stripe billing flow end to end: signed webhooks (through the real gateway, against the
loopback fake) and ``/checkout/confirm`` drive the same idempotent fulfil step; dunning moves
running → past_due → (worker) suspended → running; events duplicated, shuffled, late, forged."""

from __future__ import annotations

import asyncio
import json
import random
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from control_plane.billing.models import InstanceSubscription, StripeEvent
from control_plane.instances.models import InstanceEvent
from tests.control_plane.instances.helpers import (  # noqa: F401 - fixtures
    WEBHOOK,
    Cloud,
    S,
    User,
    cloud,
    cloud_settings,
    make_cloud,
    stripe_fake,
)
from tests.fakes.stripe_api import DEFAULT_WEBHOOK_SECRET, encode_event, sign_webhook


async def _checkout(cloud: Cloud, owner: User) -> tuple[str, str]:
    instance_id = (await cloud.created(owner))["instance"]["id"]
    session_id = (await cloud.instance(instance_id)).checkout_session_id
    assert session_id is not None
    return instance_id, session_id


async def _transitions(cloud: Cloud, instance_id: str) -> list[tuple[str | None, str | None]]:
    async with cloud.h.services.core.session_factory() as db:
        rows = await db.scalars(
            select(InstanceEvent)
            .where(InstanceEvent.instance_id == instance_id, InstanceEvent.to_status.is_not(None))
            .order_by(InstanceEvent.id)
        )
        return [(e.from_status, e.to_status) for e in rows]


async def _subscription(cloud: Cloud, instance_id: str) -> InstanceSubscription:
    async with cloud.h.services.core.session_factory() as db:
        sub = await db.get(InstanceSubscription, instance_id)
        assert sub is not None
        return sub


async def _recorded(cloud: Cloud) -> int:
    async with cloud.h.services.core.session_factory() as db:
        return int(await db.scalar(select(func.count()).select_from(StripeEvent)) or 0)


# -- checkout ------------------------------------------------------------------------------------


async def test_a_paid_checkout_webhook_starts_provisioning(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    wakeup = cloud.h.wakeup
    wakeup.count = 0
    assert cloud.stripe is not None
    completed, paid = cloud.stripe.complete_checkout(session_id)
    r = await cloud.deliver(completed)
    assert r.status_code == 200 and r.json() == {"ok": True}
    row = await cloud.instance(instance_id)
    assert row.status == S.PROVISIONING
    assert row.run_after == cloud.h.clock.now and row.attempts == 0
    assert wakeup.count == 1
    sub = await _subscription(cloud, instance_id)
    stripe_session = cloud.stripe.session(session_id)
    assert sub.stripe_subscription_id == stripe_session["subscription"]
    assert sub.stripe_customer_id == stripe_session["customer"]
    assert sub.status == "active"
    assert (await cloud.deliver(paid)).status_code == 200
    assert await _transitions(cloud, instance_id) == [
        ("draft", "awaiting_payment"),
        ("awaiting_payment", "provisioning"),
    ]


async def test_the_first_invoice_arriving_before_the_checkout_event_fulfils(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    assert cloud.stripe is not None
    completed, paid = cloud.stripe.complete_checkout(session_id)
    assert (await cloud.deliver(paid)).status_code == 200
    assert await cloud.status(instance_id) == S.PROVISIONING
    assert (await cloud.deliver(completed)).status_code == 200
    assert await _transitions(cloud, instance_id) == [
        ("draft", "awaiting_payment"),
        ("awaiting_payment", "provisioning"),
    ]


async def test_an_unpaid_completion_waits_for_the_payment(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    assert cloud.stripe is not None
    session = cloud.stripe.session(session_id)
    session.update(status="complete", payment_status="unpaid")
    event = cloud.stripe.make_event("checkout.session.completed", session)
    assert (await cloud.deliver(event)).status_code == 200
    assert await cloud.status(instance_id) == S.AWAITING_PAYMENT
    events = await cloud.events(instance_id, owner)
    assert events[-1]["message"] == "checkout completed; waiting for the payment"


async def test_a_checkout_naming_another_user_has_no_effect(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    assert cloud.stripe is not None
    completed, _ = cloud.stripe.complete_checkout(session_id)
    completed["data"]["object"]["metadata"]["user_id"] = "someone-else"
    assert (await cloud.deliver(completed)).status_code == 200
    assert await cloud.status(instance_id) == S.AWAITING_PAYMENT


async def test_events_for_unknown_instances_are_acknowledged_without_effect(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    assert cloud.stripe is not None
    completed, paid = cloud.stripe.complete_checkout(session_id)
    completed["data"]["object"]["metadata"]["instance_id"] = "not-an-instance"
    completed["data"]["object"]["client_reference_id"] = "not-an-instance"
    paid["data"]["object"]["parent"]["subscription_details"]["metadata"]["instance_id"] = "nope"
    paid["data"]["object"]["parent"]["subscription_details"]["subscription"] = "sub_unknown"
    for event in (completed, paid):
        r = await cloud.deliver(event)
        assert r.status_code == 200 and r.json() == {"ok": True}
    assert await _recorded(cloud) == 2
    assert await cloud.status(instance_id) == S.AWAITING_PAYMENT


async def test_an_unhandled_event_type_is_acknowledged_and_ignored(cloud: Cloud) -> None:
    assert cloud.stripe is not None
    event = cloud.stripe.make_event("customer.created", {"id": "cus_1", "object": "customer"})
    r = await cloud.deliver(event)
    assert r.status_code == 200 and r.json() == {"ok": True}
    again = await cloud.deliver(event)
    assert again.json() == {"ok": True, "duplicate": True}


# -- duplicates, order, races --------------------------------------------------------------------


async def test_each_event_takes_effect_once_when_delivered_three_times(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    assert cloud.stripe is not None
    events = cloud.stripe.complete_checkout(session_id)
    answers = [await cloud.deliver(e) for e in events for _ in range(3)]
    assert [a.json().get("duplicate", False) for a in answers] == [
        False, True, True, False, True, True,
    ]  # fmt: skip
    assert await _transitions(cloud, instance_id) == [
        ("draft", "awaiting_payment"),
        ("awaiting_payment", "provisioning"),
    ]


async def test_concurrent_duplicate_deliveries_take_effect_once(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    assert cloud.stripe is not None
    completed, _ = cloud.stripe.complete_checkout(session_id)
    answers = await asyncio.gather(*(cloud.deliver(completed) for _ in range(3)))
    assert sorted(a.json().get("duplicate", False) for a in answers) == [False, True, True]
    assert [t for t in await _transitions(cloud, instance_id) if t[1] == "provisioning"] == [
        ("awaiting_payment", "provisioning")
    ]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
async def test_events_duplicated_and_shuffled_end_in_the_right_state(
    cloud: Cloud, seed: int
) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    assert cloud.stripe is not None
    checkout_events = cloud.stripe.complete_checkout(session_id) * 3
    random.Random(seed).shuffle(checkout_events)
    for event in checkout_events:
        assert (await cloud.deliver(event)).status_code == 200
    assert await cloud.status(instance_id) == S.PROVISIONING
    await cloud.run(instance_id)
    subscription_id = await cloud.subscription_id(instance_id)
    cloud.h.clock.advance(30 * 86400)
    failed = cloud.stripe.fail_invoice(subscription_id)
    cloud.h.clock.advance(3600)
    paid = cloud.stripe.pay_invoice(subscription_id)
    dunning = (failed + paid) * 3
    random.Random(seed).shuffle(dunning)
    for event in dunning:
        assert (await cloud.deliver(event)).status_code == 200
    row = await cloud.instance(instance_id)
    sub = await _subscription(cloud, instance_id)
    assert row.status == S.RUNNING
    assert sub.status == "active" and sub.grace_until is None
    provisioning = [t for t in await _transitions(cloud, instance_id) if t[1] == "provisioning"]
    assert provisioning == [("awaiting_payment", "provisioning")]


async def test_a_late_payment_failure_never_undoes_a_newer_payment(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    subscription_id = await cloud.subscription_id(instance_id)
    assert cloud.stripe is not None
    cloud.h.clock.advance(60)
    [failed] = cloud.stripe.fail_invoice(subscription_id)
    cloud.h.clock.advance(60)
    [paid] = cloud.stripe.pay_invoice(subscription_id)
    assert (await cloud.deliver(paid)).status_code == 200
    assert (await cloud.deliver(failed)).status_code == 200
    assert await cloud.status(instance_id) == S.RUNNING
    events = await cloud.events(instance_id, owner)
    assert events[-1]["message"] == "older payment failure ignored"


async def test_a_payment_failure_in_the_same_second_as_a_payment_does_not_win(
    cloud: Cloud,
) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    subscription_id = await cloud.subscription_id(instance_id)
    assert cloud.stripe is not None
    [failed] = cloud.stripe.fail_invoice(subscription_id)
    [paid] = cloud.stripe.pay_invoice(subscription_id)
    assert failed["created"] == paid["created"]
    await cloud.deliver(paid)
    await cloud.deliver(failed)
    assert await cloud.status(instance_id) == S.RUNNING


@pytest.mark.parametrize("round_", range(3))
async def test_confirm_racing_the_webhook_fulfils_once(cloud: Cloud, round_: int) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    assert cloud.stripe is not None
    completed, _ = cloud.stripe.complete_checkout(session_id)
    confirm = cloud.client.post(
        f"/api/cloud/instances/{instance_id}/checkout/confirm",
        json={"session_id": session_id},
        headers=owner.headers,
    )
    first, second = (confirm, cloud.deliver(completed))[:: 1 if round_ % 2 else -1]
    answers = await asyncio.gather(first, second)
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert await _transitions(cloud, instance_id) == [
        ("draft", "awaiting_payment"),
        ("awaiting_payment", "provisioning"),
    ]
    async with cloud.h.services.core.session_factory() as db:
        payments = await db.scalar(
            select(func.count())
            .select_from(InstanceEvent)
            .where(
                InstanceEvent.instance_id == instance_id, InstanceEvent.to_status == "provisioning"
            )
        )
    assert payments == 1


async def test_confirm_before_the_webhook_fulfils_and_the_webhook_changes_nothing(
    cloud: Cloud,
) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    assert cloud.stripe is not None
    completed, paid = cloud.stripe.complete_checkout(session_id)
    r = await cloud.client.post(
        f"/api/cloud/instances/{instance_id}/checkout/confirm", headers=owner.headers
    )
    assert r.status_code == 200 and r.json()["status"] == "provisioning"
    sub = await _subscription(cloud, instance_id)
    assert sub.stripe_subscription_id == cloud.stripe.session(session_id)["subscription"]
    for event in (completed, paid):
        assert (await cloud.deliver(event)).status_code == 200
    assert len(await _transitions(cloud, instance_id)) == 2
    # Confirming again is a no-op that does not even ask Stripe.
    before = len(cloud.stripe.requests)
    again = await cloud.client.post(
        f"/api/cloud/instances/{instance_id}/checkout/confirm", headers=owner.headers
    )
    assert again.json()["status"] == "provisioning"
    assert len(cloud.stripe.requests) == before


async def test_confirm_of_an_unpaid_checkout_changes_nothing(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, _ = await _checkout(cloud, owner)
    r = await cloud.client.post(
        f"/api/cloud/instances/{instance_id}/checkout/confirm", headers=owner.headers, json={}
    )
    assert r.status_code == 200 and r.json()["status"] == "awaiting_payment"


@pytest.mark.parametrize(
    ("session_id", "status", "code"),
    [
        ("other", 400, "checkout_mismatch"),
        ("cs_test_doesnotexist", 400, "checkout_mismatch"),
        ("not-a-session", 422, "invalid_body"),
        ("cs_" + "a" * 300, 422, "invalid_body"),
        (42, 422, "invalid_body"),
    ],
)
async def test_confirm_refuses_a_session_that_is_not_this_instances(
    cloud: Cloud, session_id: Any, status: int, code: str
) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, _ = await _checkout(cloud, owner)
    _, other_session = await _checkout(cloud, owner)
    if session_id == "other":
        assert cloud.stripe is not None
        cloud.stripe.complete_checkout(other_session)
        session_id = other_session
    r = await cloud.client.post(
        f"/api/cloud/instances/{instance_id}/checkout/confirm",
        json={"session_id": session_id},
        headers=owner.headers,
    )
    assert r.status_code == status and r.json()["code"] == code
    assert await cloud.status(instance_id) == S.AWAITING_PAYMENT


# -- dunning -------------------------------------------------------------------------------------


async def test_payment_failure_grace_suspend_and_payment_resume(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    subscription_id = await cloud.subscription_id(instance_id)
    assert cloud.stripe is not None
    wakeup = cloud.h.wakeup
    wakeup.count = 0
    cloud.h.clock.advance(30 * 86400)
    [failed] = cloud.stripe.fail_invoice(subscription_id)
    assert (await cloud.deliver(failed)).status_code == 200
    row = await cloud.instance(instance_id)
    sub = await _subscription(cloud, instance_id)
    grace = cloud.h.clock.now + timedelta(hours=72)
    assert row.status == S.PAST_DUE
    assert sub.grace_until == grace and row.run_after == grace
    assert sub.status == "past_due"
    # Still openable while past due.
    owner = await cloud.signin(owner.email)
    token = await cloud.client.post(
        f"/api/cloud/instances/{instance_id}/runtime-token", headers=owner.headers
    )
    assert token.status_code == 200
    # A second failure does not extend the grace period.
    cloud.h.clock.advance(86400)
    [failed_again] = cloud.stripe.fail_invoice(subscription_id)
    await cloud.deliver(failed_again)
    assert (await _subscription(cloud, instance_id)).grace_until == grace
    # The worker suspends it when the grace period is over.
    cloud.h.clock.advance(72 * 3600)
    await cloud.worker(instance_id, S.PAST_DUE, S.SUSPENDED, "grace period over", run_after=None)
    owner = await cloud.signin(owner.email)
    blocked = await cloud.client.post(
        f"/api/cloud/instances/{instance_id}/runtime-token", headers=owner.headers
    )
    assert blocked.status_code == 409 and blocked.json()["code"] == "instance_not_running"
    cloud.h.clock.advance(60)
    [paid] = cloud.stripe.pay_invoice(subscription_id)
    assert (await cloud.deliver(paid)).status_code == 200
    row = await cloud.instance(instance_id)
    sub = await _subscription(cloud, instance_id)
    assert row.status == S.SUSPENDED and row.run_after == cloud.h.clock.now
    assert sub.status == "active" and sub.grace_until is None
    assert wakeup.count == 1
    await cloud.worker(instance_id, S.SUSPENDED, S.RUNNING, "machine started", run_after=None)
    moves = [t[1] for t in await _transitions(cloud, instance_id)]
    assert moves[-3:] == ["past_due", "suspended", "running"]


async def test_a_payment_within_the_grace_period_resumes_at_once(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    subscription_id = await cloud.subscription_id(instance_id)
    assert cloud.stripe is not None
    cloud.h.clock.advance(60)
    await cloud.deliver(cloud.stripe.fail_invoice(subscription_id)[0])
    cloud.h.clock.advance(60)
    await cloud.deliver(cloud.stripe.pay_invoice(subscription_id)[0])
    row = await cloud.instance(instance_id)
    assert row.status == S.RUNNING and row.run_after is None
    assert (await _subscription(cloud, instance_id)).grace_until is None


async def test_a_deleted_subscription_cancels_the_instance(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    subscription_id = await cloud.subscription_id(instance_id)
    assert cloud.stripe is not None
    cloud.h.clock.advance(60)
    [deleted] = cloud.stripe.delete_subscription(subscription_id)
    assert (await cloud.deliver(deleted)).status_code == 200
    row = await cloud.instance(instance_id)
    assert row.status == S.CANCELED
    assert row.run_after == cloud.h.clock.now
    assert row.destroy_after == cloud.h.clock.now + timedelta(days=7)
    assert (await _subscription(cloud, instance_id)).status == "canceled"
    # Nothing brings it back: not a later payment event, nor a replay.
    cloud.h.clock.advance(60)
    paid = cloud.stripe.make_event("invoice.paid", failed_like_invoice(cloud, subscription_id))
    await cloud.deliver(paid)
    assert await cloud.status(instance_id) == S.CANCELED


def failed_like_invoice(cloud: Cloud, subscription_id: str) -> dict[str, Any]:
    assert cloud.stripe is not None
    sub = cloud.stripe.subscription(subscription_id)
    invoice = cloud.stripe.invoice(sub["latest_invoice"])
    invoice["id"] = "in_late0000"
    return invoice


async def test_a_deletion_before_the_checkout_event_prevents_provisioning(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    assert cloud.stripe is not None
    completed, _ = cloud.stripe.complete_checkout(session_id)
    subscription_id = cloud.stripe.session(session_id)["subscription"]
    [deleted] = cloud.stripe.delete_subscription(subscription_id)
    assert (await cloud.deliver(deleted)).status_code == 200
    assert (await cloud.deliver(completed)).status_code == 200
    assert await cloud.status(instance_id) == S.CANCELED
    assert "provisioning" not in [t[1] for t in await _transitions(cloud, instance_id)]


# -- forged and malformed deliveries -------------------------------------------------------------


async def _no_effect(cloud: Cloud, instance_id: str, response: Any, code: str) -> None:
    assert response.status_code == 400, response.text
    assert response.json()["code"] == code
    assert await cloud.status(instance_id) == S.AWAITING_PAYMENT
    assert await _recorded(cloud) == 0


async def test_a_tampered_body_is_refused_and_changes_nothing(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    assert cloud.stripe is not None
    completed, _ = cloud.stripe.complete_checkout(session_id)
    body = encode_event(completed)
    header = sign_webhook(body, DEFAULT_WEBHOOK_SECRET)
    tampered = body.replace(b'"livemode": false', b'"livemode": true')
    r = await cloud.client.post(WEBHOOK, content=tampered, headers={"Stripe-Signature": header})
    await _no_effect(cloud, instance_id, r, "invalid_signature")
    # Re-serialised JSON (same data, other bytes) does not verify either.
    reserialised = json.dumps(completed, separators=(",", ":")).encode()
    r = await cloud.client.post(WEBHOOK, content=reserialised, headers={"Stripe-Signature": header})
    await _no_effect(cloud, instance_id, r, "invalid_signature")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        "t=1,v1=00",
        "wrong-secret",
        "too-old",
    ],
)
async def test_a_forged_or_stale_signature_is_refused(cloud: Cloud, header: str | None) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    assert cloud.stripe is not None
    completed, _ = cloud.stripe.complete_checkout(session_id)
    body = encode_event(completed)
    headers: dict[str, str] = {}
    if header == "wrong-secret":
        headers["Stripe-Signature"] = sign_webhook(body, "whsec_someone_else")
    elif header == "too-old":
        headers["Stripe-Signature"] = sign_webhook(
            body, DEFAULT_WEBHOOK_SECRET, timestamp=int(time.time()) - 301
        )
    elif header is not None:
        headers["Stripe-Signature"] = header
    r = await cloud.client.post(WEBHOOK, content=body, headers=headers)
    await _no_effect(cloud, instance_id, r, "invalid_signature")


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"id": "evt_1"}',
        json.dumps({"id": "nope", "object": "event", "type": "x", "created": 1,
                    "livemode": False, "data": {"object": {}}}).encode(),
    ],
)  # fmt: skip
async def test_an_authentic_but_unusable_payload_is_refused(cloud: Cloud, body: bytes) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, _ = await _checkout(cloud, owner)
    r = await cloud.client.post(
        WEBHOOK,
        content=body,
        headers={"Stripe-Signature": sign_webhook(body, DEFAULT_WEBHOOK_SECRET)},
    )
    await _no_effect(cloud, instance_id, r, "invalid_payload")


async def test_a_non_utf8_body_is_refused(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, _ = await _checkout(cloud, owner)
    body = b"\xff\xfe{}"
    r = await cloud.client.post(
        WEBHOOK,
        content=body,
        headers={"Stripe-Signature": sign_webhook(body, DEFAULT_WEBHOOK_SECRET)},
    )
    await _no_effect(cloud, instance_id, r, "invalid_signature")
