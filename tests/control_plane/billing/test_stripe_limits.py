# ruff: noqa: F811 - the fixtures imported from the instances helpers are test parameters here
"""Stripe-calling routes are bounded (issue 12, item 8): per-user limits (429 with Retry-After),
Checkout Session state cached briefly (open: seconds; paid or expired: final), an abandoned
checkout expired at Stripe when its instance is deleted, and cancel-at-period-end for owners
(the API and the ``customer.subscription.updated`` webhook)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import func, select

from control_plane.billing.models import InstanceSubscription
from control_plane.billing.service import Billing
from control_plane.instances.models import CloudInstance
from control_plane.throttle import Throttle
from tests.control_plane.instances.helpers import (  # noqa: F401 - fixtures
    Cloud,
    S,
    User,
    cloud,
    cloud_settings,
    make_cloud,
    stripe_fake,
)
from tests.fakes.stripe_api import FakeStripe


def _path(instance_id: str, tail: str = "") -> str:
    return f"/api/cloud/instances/{instance_id}{tail}"


async def _checkout(cloud: Cloud, owner: User, **kw: Any) -> tuple[str, str]:
    instance_id = (await cloud.created(owner, **kw))["instance"]["id"]
    session_id = (await cloud.instance(instance_id)).checkout_session_id
    assert session_id is not None
    return instance_id, session_id


def _retrievals(stripe: FakeStripe | None, session_id: str) -> int:
    assert stripe is not None
    return len(stripe.requests_to("GET", f"/v1/checkout/sessions/{session_id}"))


async def _confirm(cloud: Cloud, owner: User, instance_id: str) -> Any:
    return await cloud.client.post(_path(instance_id, "/checkout/confirm"), headers=owner.headers)


# -- the Checkout Session cache ------------------------------------------------------------------


async def test_repeated_confirms_of_an_open_checkout_ask_stripe_once_per_few_seconds(
    cloud: Cloud,
) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    for _ in range(20):
        r = await _confirm(cloud, owner, instance_id)
        assert r.status_code == 200 and r.json()["status"] == "awaiting_payment"
    assert _retrievals(cloud.stripe, session_id) == 1
    cloud.h.clock.advance(6)  # past the open state's few seconds
    assert (await _confirm(cloud, owner, instance_id)).status_code == 200
    assert _retrievals(cloud.stripe, session_id) == 2


async def test_concurrent_confirms_share_one_stripe_call(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    answers = await asyncio.gather(*(_confirm(cloud, owner, instance_id) for _ in range(15)))
    assert [a.status_code for a in answers] == [200] * 15
    assert _retrievals(cloud.stripe, session_id) == 1


async def test_a_payment_is_never_hidden_longer_than_the_open_states_ttl(cloud: Cloud) -> None:
    """An open (unpaid) answer is kept a few seconds only: a payment made meanwhile is seen by
    the first confirm after that (and the webhook fulfils it regardless of the cache)."""
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    assert (await _confirm(cloud, owner, instance_id)).json()["status"] == "awaiting_payment"
    assert cloud.stripe is not None
    cloud.stripe.complete_checkout(session_id)  # paid; the webhook has not arrived
    cloud.h.clock.advance(6)
    r = await _confirm(cloud, owner, instance_id)
    assert r.json()["status"] == "provisioning"


async def test_the_checkout_webhook_drops_a_cached_open_state(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    other_id, other_session = await _checkout(cloud, owner, name="Second")
    assert (await _confirm(cloud, owner, other_id)).json()["status"] == "awaiting_payment"
    assert cloud.stripe is not None
    completed, _ = cloud.stripe.complete_checkout(other_session)
    # The completion arrives for the session, but the instance is moved back to make the confirm
    # path ask again: it must not answer from the cached "open".
    billing = cloud.h.services.get(Billing)
    assert billing.checkout_cache.get(other_session, cloud.h.clock()) is not None
    assert (await cloud.deliver(completed)).status_code == 200
    assert billing.checkout_cache.get(other_session, cloud.h.clock()) is None
    assert session_id != other_session and instance_id != other_id


async def test_a_paid_state_is_final_and_cached(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    other_id, _ = await _checkout(cloud, owner, name="Other")
    assert cloud.stripe is not None
    cloud.stripe.complete_checkout(session_id)
    # Someone keeps presenting the paid session against another instance: one Stripe call.
    for _ in range(5):
        r = await cloud.client.post(
            _path(other_id, "/checkout/confirm"),
            json={"session_id": session_id},
            headers=owner.headers,
        )
        assert r.status_code == 400 and r.json()["code"] == "checkout_mismatch"
    cloud.h.clock.advance(60)
    r = await _confirm(cloud, owner, instance_id)
    assert r.json()["status"] == "provisioning"
    assert _retrievals(cloud.stripe, session_id) == 1


# -- per-user limits -----------------------------------------------------------------------------


async def test_confirm_is_limited_per_user_with_429_and_retry_after(make_cloud: Any) -> None:
    with FakeStripe() as stripe:
        async with make_cloud(stripe, throttle_billing_user="5/minute") as c:
            owner = await c.user("owner@example.com")
            other = await c.user("other@example.com")
            # create counts too: 1 of 5
            instance_id, _ = await _checkout(c, owner)
            codes = [(await _confirm(c, owner, instance_id)).status_code for _ in range(6)]
            assert codes == [200, 200, 200, 200, 429, 429]
            r = await _confirm(c, owner, instance_id)
            assert r.json()["code"] == "throttled"
            assert 1 <= int(r.headers["Retry-After"]) <= 60
            # Deleting calls Stripe too: limited as well, and nothing changes.
            gone = await c.client.delete(_path(instance_id), headers=owner.headers)
            assert gone.status_code == 429
            assert await c.status(instance_id) == S.AWAITING_PAYMENT
            # Another user has their own budget.
            other_id, _ = await _checkout(c, other)
            assert (await _confirm(c, other, other_id)).status_code == 200


async def test_a_create_delete_loop_opens_a_bounded_number_of_checkouts(make_cloud: Any) -> None:
    with FakeStripe() as stripe:
        async with make_cloud(stripe, throttle_checkout_user="3/hour") as c:
            owner = await c.user("owner@example.com")
            for _ in range(3):
                instance_id, _ = await _checkout(c, owner)
                gone = await c.client.delete(_path(instance_id), headers=owner.headers)
                assert gone.status_code == 202
            r = await c.create(owner, key="fourth")
            assert r.status_code == 429 and r.json()["code"] == "throttled"
            assert int(r.headers["Retry-After"]) > 0
            assert len(stripe.sessions) == 3
            async with c.h.services.core.session_factory() as db:
                rows = await db.scalar(select(func.count()).select_from(CloudInstance))
            assert rows == 3  # the refused create left nothing behind


async def test_replays_of_one_key_do_not_spend_the_checkout_budget(make_cloud: Any) -> None:
    with FakeStripe() as stripe:
        async with make_cloud(stripe, throttle_checkout_user="1/hour") as c:
            owner = await c.user("owner@example.com")
            answers = await asyncio.gather(*(c.create(owner, key="same") for _ in range(8)))
            assert [a.status_code for a in answers] == [201] * 8, [a.text for a in answers]
            assert len(stripe.sessions) == 1
            assert (await c.create(owner, key="another")).status_code == 429


async def test_a_throttle_storage_outage_lets_billing_through(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Billing limits fail open (logged): they bound cost, not a secret, and an outage of the
    limiter must not stop customers paying. The account limits still fail closed."""
    owner = await cloud.user("owner@example.com")
    throttle = cloud.h.services.get(Throttle)

    async def down(*args: Any, **kwargs: Any) -> bool:
        raise ConnectionError("redis down")

    monkeypatch.setattr(throttle.limiter, "hit", down)
    instance_id, _ = await _checkout(cloud, owner)
    assert (await _confirm(cloud, owner, instance_id)).status_code == 200


# -- expiring abandoned checkouts ----------------------------------------------------------------


async def test_deleting_an_unpaid_instance_expires_its_checkout_at_stripe(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    r = await cloud.client.delete(_path(instance_id), headers=owner.headers)
    assert r.status_code == 202 and r.json()["status"] == "canceled"
    assert cloud.stripe is not None
    assert cloud.stripe.session(session_id)["status"] == "expired"
    path = f"/v1/checkout/sessions/{session_id}/expire"
    [expire] = cloud.stripe.requests_to("POST", path)
    assert expire.idempotency_key == f"quoroom-expire-{session_id}"
    again = await cloud.client.delete(_path(instance_id), headers=owner.headers)
    assert again.status_code == 202
    assert len(cloud.stripe.requests_to("POST", path)) == 1


async def test_stripe_down_while_expiring_leaves_the_instance_untouched(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    assert cloud.stripe is not None
    cloud.stripe.fail_next(503, times=5, path=f"/v1/checkout/sessions/{session_id}/expire")
    r = await cloud.client.delete(_path(instance_id), headers=owner.headers)
    assert r.status_code == 503 and r.json()["code"] == "billing_unavailable"
    assert await cloud.status(instance_id) == S.AWAITING_PAYMENT
    assert cloud.stripe.session(session_id)["status"] == "open"


async def test_a_checkout_paid_just_before_the_delete_ends_in_a_canceled_subscription(
    cloud: Cloud,
) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id, session_id = await _checkout(cloud, owner)
    assert cloud.stripe is not None
    completed, _ = cloud.stripe.complete_checkout(session_id)  # the webhook is still on its way
    r = await cloud.client.delete(_path(instance_id), headers=owner.headers)
    assert r.status_code == 202 and r.json()["status"] == "canceled"  # expire refused: complete
    assert (await cloud.deliver(completed)).status_code == 200
    [sub] = cloud.stripe.subscriptions
    assert sub["status"] == "canceled"


# -- cancel at period end ------------------------------------------------------------------------


async def _billing(cloud: Cloud, owner: User, instance_id: str) -> Any:
    return await cloud.client.get(_path(instance_id, "/billing"), headers=owner.headers)


async def test_the_owner_cancels_at_period_end_and_undoes_it(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    sub_id = await cloud.subscription_id(instance_id)
    before = await _billing(cloud, owner, instance_id)
    assert before.status_code == 200
    assert before.json()["cancelAtPeriodEnd"] is False
    assert before.json()["status"] == "active"
    r = await cloud.client.patch(
        _path(instance_id, "/billing"), json={"cancelAtPeriodEnd": True}, headers=owner.headers
    )
    assert r.status_code == 200, r.text
    assert r.json()["cancelAtPeriodEnd"] is True
    assert r.json()["currentPeriodEnd"] is not None
    assert cloud.stripe is not None
    assert cloud.stripe.subscription(sub_id)["cancel_at_period_end"] is True
    assert (await _billing(cloud, owner, instance_id)).json()["cancelAtPeriodEnd"] is True
    assert await cloud.status(instance_id) == S.RUNNING  # runs until the period ends
    undo = await cloud.client.patch(
        _path(instance_id, "/billing"), json={"cancelAtPeriodEnd": False}, headers=owner.headers
    )
    assert undo.status_code == 200 and undo.json()["cancelAtPeriodEnd"] is False
    assert cloud.stripe.subscription(sub_id)["cancel_at_period_end"] is False
    events = [e["message"] for e in await cloud.events(instance_id, owner)]
    assert any("period end" in m for m in events)


async def test_the_subscription_updated_webhook_reflects_a_change_made_at_stripe(
    cloud: Cloud,
) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    sub_id = await cloud.subscription_id(instance_id)
    assert cloud.stripe is not None
    [scheduled] = cloud.stripe.set_cancel_at_period_end(sub_id, True)  # from the dashboard
    assert scheduled["type"] == "customer.subscription.updated"
    cloud.h.clock.advance(5)
    [undone] = cloud.stripe.set_cancel_at_period_end(sub_id, False)
    assert (await cloud.deliver(undone)).status_code == 200
    assert (await _billing(cloud, owner, instance_id)).json()["cancelAtPeriodEnd"] is False
    # The older event arriving late does not undo the newer one.
    assert (await cloud.deliver(scheduled)).status_code == 200
    assert (await _billing(cloud, owner, instance_id)).json()["cancelAtPeriodEnd"] is False
    cloud.h.clock.advance(5)
    [again] = cloud.stripe.set_cancel_at_period_end(sub_id, True)
    assert (await cloud.deliver(again)).status_code == 200
    body = (await _billing(cloud, owner, instance_id)).json()
    assert body["cancelAtPeriodEnd"] is True and body["currentPeriodEnd"] is not None
    # When the period ends Stripe deletes the subscription: the Room winds down.
    [deleted] = cloud.stripe.delete_subscription(sub_id)
    assert (await cloud.deliver(deleted)).status_code == 200
    assert await cloud.status(instance_id) == S.CANCELED
    async with cloud.h.services.core.session_factory() as db:
        row = await db.get(InstanceSubscription, instance_id)
    assert row is not None and row.status == "canceled"


@pytest.mark.parametrize(
    "body",
    [{}, {"cancelAtPeriodEnd": "yes"}, {"cancelAtPeriodEnd": 1}, {"cancelAtPeriodEnd": None},
     {"cancelAtPeriodEnd": True, "extra": 1}, []],
)  # fmt: skip
async def test_a_bad_cancel_body_is_refused(cloud: Cloud, body: Any) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    r = await cloud.client.patch(_path(instance_id, "/billing"), json=body, headers=owner.headers)
    assert r.status_code == 422 and r.json()["code"] == "invalid_body"
    assert cloud.stripe is not None
    sub_id = await cloud.subscription_id(instance_id)
    assert cloud.stripe.requests_to("POST", f"/v1/subscriptions/{sub_id}") == []


async def test_cancel_at_period_end_needs_a_live_subscription_and_the_owner(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    stranger = await cloud.user("stranger@example.com")
    unpaid, _ = await _checkout(cloud, owner)
    r = await cloud.client.patch(
        _path(unpaid, "/billing"), json={"cancelAtPeriodEnd": True}, headers=owner.headers
    )
    assert r.status_code == 409 and r.json()["code"] == "invalid_state"
    running = await cloud.paid_and_running(owner)
    for method in ("GET", "PATCH"):
        r = await cloud.client.request(
            method, _path(running, "/billing"), json={"cancelAtPeriodEnd": True},
            headers=stranger.headers,
        )  # fmt: skip
        assert r.status_code == 404
    no_auth = await cloud.client.patch(_path(running, "/billing"), json={"cancelAtPeriodEnd": True})
    assert no_auth.status_code == 401
    # A canceled instance's subscription is over: nothing to schedule.
    assert (await cloud.client.delete(_path(running), headers=owner.headers)).status_code == 202
    r = await cloud.client.patch(
        _path(running, "/billing"), json={"cancelAtPeriodEnd": False}, headers=owner.headers
    )
    assert r.status_code == 409 and r.json()["code"] == "invalid_state"


async def test_stripe_refusing_the_update_changes_nothing(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    assert cloud.stripe is not None
    cloud.stripe.fail_next(503, times=5, path="/v1/subscriptions/")
    r = await cloud.client.patch(
        _path(instance_id, "/billing"), json={"cancelAtPeriodEnd": True}, headers=owner.headers
    )
    assert r.status_code == 503 and r.json()["code"] == "billing_unavailable"
    assert (await _billing(cloud, owner, instance_id)).json()["cancelAtPeriodEnd"] is False


async def test_billing_disabled_has_no_subscription_to_cancel(make_cloud: Any) -> None:
    async with make_cloud() as c:
        owner = await c.user("owner@example.com")
        instance_id = (await c.created(owner))["instance"]["id"]
        r = await c.client.patch(
            _path(instance_id, "/billing"), json={"cancelAtPeriodEnd": True}, headers=owner.headers
        )
        assert r.status_code == 409 and r.json()["code"] == "billing_disabled"
