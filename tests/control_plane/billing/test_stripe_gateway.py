"""StripeGateway against the fake Stripe API, through the real stripe SDK over loopback HTTP."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from control_plane.billing.stripe_errors import (
    BillingError,
    BillingNotFound,
    BillingRejected,
    BillingReplyError,
    BillingUnavailable,
)
from control_plane.billing.stripe_gateway import StripeGateway
from control_plane.billing.stripe_shapes import STRIPE_API_VERSION
from tests.fakes.stripe_api import DEFAULT_SECRET_KEY, DEFAULT_WEBHOOK_SECRET, FakeStripe

from .conftest import STARTER_PRICE


def checkout_args(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "instance_id": "inst_01",
        "user_id": "usr_01",
        "email": "owner@example.com",
        "customer_id": None,
        "price_id": STARTER_PRICE,
        "success_url": "https://cloud.example/instances/inst_01?session={CHECKOUT_SESSION_ID}",
        "cancel_url": "https://cloud.example/instances/inst_01",
        "idempotency_key": "checkout:inst_01",
    }
    args.update(overrides)
    return args


def gateway_for(fake: FakeStripe, **kwargs: Any) -> StripeGateway:
    options: dict[str, Any] = {
        "webhook_secret": DEFAULT_WEBHOOK_SECRET,
        "api_base": fake.url,
        "max_network_retries": 0,
    }
    options.update(kwargs)
    secret_key = options.pop("secret_key", DEFAULT_SECRET_KEY)
    return StripeGateway(secret_key, **options)


# ---- checkout sessions ---------------------------------------------------------------------


async def test_a_checkout_session_is_a_subscription_checkout_carrying_the_instance_id(
    gateway: StripeGateway, fake_stripe: FakeStripe
) -> None:
    session = await gateway.create_checkout_session(**checkout_args())

    assert session.id.startswith("cs_test_")
    assert session.url == f"{fake_stripe.url}/pay/{session.id}"
    [request] = fake_stripe.requests_to("POST", "/v1/checkout/sessions")
    assert request.params["mode"] == "subscription"
    assert request.params["line_items"] == [{"price": STARTER_PRICE, "quantity": "1"}]
    assert request.params["client_reference_id"] == "inst_01"
    assert request.params["metadata"] == {"instance_id": "inst_01", "user_id": "usr_01"}
    assert request.params["subscription_data"] == {
        "metadata": {"instance_id": "inst_01", "user_id": "usr_01"}
    }
    assert request.params["customer_email"] == "owner@example.com"
    assert "customer" not in request.params
    assert request.idempotency_key == "checkout:inst_01"


async def test_every_request_pins_the_api_version_the_parsers_were_written_for(
    gateway: StripeGateway, fake_stripe: FakeStripe
) -> None:
    await gateway.create_checkout_session(**checkout_args())

    assert STRIPE_API_VERSION == "2026-10-28.endive"
    assert [r.stripe_version for r in fake_stripe.requests] == [STRIPE_API_VERSION]


async def test_repeating_a_create_with_the_same_idempotency_key_returns_the_same_session(
    gateway: StripeGateway, fake_stripe: FakeStripe
) -> None:
    first = await gateway.create_checkout_session(**checkout_args())
    second = await gateway.create_checkout_session(**checkout_args())

    assert second == first
    assert len(fake_stripe.sessions) == 1


async def test_reusing_an_idempotency_key_with_other_arguments_is_rejected(
    gateway: StripeGateway,
) -> None:
    await gateway.create_checkout_session(**checkout_args())

    with pytest.raises(BillingRejected) as caught:
        await gateway.create_checkout_session(**checkout_args(price_id="price_quoroom_pro_monthly"))

    assert caught.value.error_type == "idempotency_error"
    assert caught.value.status == 400


async def test_a_known_customer_is_reused_instead_of_an_email(
    gateway: StripeGateway, fake_stripe: FakeStripe
) -> None:
    customer_id = await gateway.create_customer(
        email="owner@example.com", user_id="usr_01", idempotency_key="customer:usr_01"
    )

    await gateway.create_checkout_session(**checkout_args(customer_id=customer_id))

    [request] = fake_stripe.requests_to("POST", "/v1/checkout/sessions")
    assert request.params["customer"] == customer_id
    assert "customer_email" not in request.params


async def test_a_double_clicked_customer_creation_makes_one_customer(
    gateway: StripeGateway, fake_stripe: FakeStripe
) -> None:
    first = await gateway.create_customer(
        email="owner@example.com", user_id="usr_01", idempotency_key="customer:usr_01"
    )
    second = await gateway.create_customer(
        email="owner@example.com", user_id="usr_01", idempotency_key="customer:usr_01"
    )

    assert first == second
    assert first.startswith("cus_")
    assert len(fake_stripe.customers) == 1


async def test_an_unknown_price_is_rejected_with_stripes_code_and_param(
    gateway: StripeGateway,
) -> None:
    with pytest.raises(BillingNotFound) as caught:
        await gateway.create_checkout_session(**checkout_args(price_id="price_nope"))

    assert caught.value.code == "resource_missing"
    assert caught.value.param == "line_items[0][price]"


async def test_an_open_session_reads_back_unpaid(gateway: StripeGateway) -> None:
    session = await gateway.create_checkout_session(**checkout_args())

    state = await gateway.retrieve_checkout_session(session.id)

    assert state.status == "open"
    assert state.payment_status == "unpaid"
    assert state.paid is False
    assert state.subscription_id is None
    assert state.instance_id == "inst_01"


async def test_a_paid_session_reads_back_with_its_subscription_and_customer(
    gateway: StripeGateway, fake_stripe: FakeStripe
) -> None:
    session = await gateway.create_checkout_session(**checkout_args())
    fake_stripe.complete_checkout(session.id)

    state = await gateway.retrieve_checkout_session(session.id)

    assert state.paid is True
    assert state.subscription_id is not None and state.subscription_id.startswith("sub_")
    assert state.customer_id is not None and state.customer_id.startswith("cus_")
    assert state.metadata == {"instance_id": "inst_01", "user_id": "usr_01"}
    assert state.client_reference_id == "inst_01"


async def test_a_missing_session_is_not_found(gateway: StripeGateway) -> None:
    with pytest.raises(BillingNotFound):
        await gateway.retrieve_checkout_session("cs_test_missing")


async def test_an_object_id_that_could_alter_the_request_path_is_refused_locally(
    gateway: StripeGateway, fake_stripe: FakeStripe
) -> None:
    with pytest.raises(ValueError):
        await gateway.retrieve_checkout_session("../customers/cus_1")
    assert fake_stripe.requests == []


# ---- subscriptions -------------------------------------------------------------------------


async def paid_subscription(gateway: StripeGateway, fake: FakeStripe) -> str:
    session = await gateway.create_checkout_session(**checkout_args())
    fake.complete_checkout(session.id)
    subscription_id = fake.session(session.id)["subscription"]
    assert isinstance(subscription_id, str)
    return subscription_id


async def test_a_subscription_reads_back_with_its_period_end_from_its_items(
    gateway: StripeGateway, fake_stripe: FakeStripe
) -> None:
    sub_id = await paid_subscription(gateway, fake_stripe)

    state = await gateway.retrieve_subscription(sub_id)

    assert state.status == "active"
    assert state.instance_id == "inst_01"
    expected_end = fake_stripe.subscription(sub_id)["items"]["data"][0]["current_period_end"]
    assert state.current_period_end is not None
    assert int(state.current_period_end.timestamp()) == expected_end


async def test_canceling_a_subscription_ends_it_now(
    gateway: StripeGateway, fake_stripe: FakeStripe
) -> None:
    sub_id = await paid_subscription(gateway, fake_stripe)

    state = await gateway.cancel_subscription(sub_id, idempotency_key=f"cancel:{sub_id}")

    assert state.status == "canceled"
    assert state.canceled_at is not None
    assert fake_stripe.subscription(sub_id)["status"] == "canceled"
    assert fake_stripe.events[-1]["type"] == "customer.subscription.deleted"


async def test_canceling_an_already_canceled_subscription_succeeds_with_its_state(
    gateway: StripeGateway, fake_stripe: FakeStripe
) -> None:
    sub_id = await paid_subscription(gateway, fake_stripe)
    await gateway.cancel_subscription(sub_id, idempotency_key=f"cancel:{sub_id}")

    again = await gateway.cancel_subscription(sub_id, idempotency_key=f"cancel:{sub_id}:2")

    assert again.status == "canceled"
    deleted = [e for e in fake_stripe.events if e["type"] == "customer.subscription.deleted"]
    assert len(deleted) == 1


async def test_canceling_a_subscription_that_never_existed_is_not_found(
    gateway: StripeGateway,
) -> None:
    with pytest.raises(BillingNotFound):
        await gateway.cancel_subscription("sub_nothere", idempotency_key="cancel:sub_nothere")


async def test_canceling_at_period_end_keeps_the_subscription_active_until_then(
    gateway: StripeGateway, fake_stripe: FakeStripe
) -> None:
    sub_id = await paid_subscription(gateway, fake_stripe)

    state = await gateway.cancel_subscription(
        sub_id, idempotency_key=f"cancel-later:{sub_id}", at_period_end=True
    )

    assert state.status == "active"
    assert state.cancel_at_period_end is True
    [request] = fake_stripe.requests_to("POST", f"/v1/subscriptions/{sub_id}")
    assert request.params == {"cancel_at_period_end": "true"}
    assert request.idempotency_key == f"cancel-later:{sub_id}"


# ---- failures translated at the boundary ---------------------------------------------------


async def test_a_server_error_from_stripe_is_billing_unavailable(
    gateway: StripeGateway, fake_stripe: FakeStripe
) -> None:
    fake_stripe.fail_next(500, path="/v1/checkout/sessions")

    with pytest.raises(BillingUnavailable) as caught:
        await gateway.create_checkout_session(**checkout_args())

    assert caught.value.status == 500
    assert caught.value.request_id is not None and caught.value.request_id.startswith("req_")
    assert fake_stripe.sessions == []


@pytest.mark.parametrize("status", [409, 429, 503])
async def test_lock_conflicts_rate_limits_and_outages_are_billing_unavailable(
    gateway: StripeGateway, fake_stripe: FakeStripe, status: int
) -> None:
    fake_stripe.fail_next(status)

    with pytest.raises(BillingUnavailable) as caught:
        await gateway.retrieve_checkout_session("cs_test_any")

    assert caught.value.status == status


async def test_an_unreachable_stripe_is_billing_unavailable_without_a_status() -> None:
    with FakeStripe() as fake:
        url = fake.url
    async with StripeGateway(
        DEFAULT_SECRET_KEY,
        webhook_secret=DEFAULT_WEBHOOK_SECRET,
        api_base=url,
        max_network_retries=0,
        timeout=2.0,
    ) as gateway:
        with pytest.raises(BillingUnavailable) as caught:
            await gateway.retrieve_subscription("sub_any")

    assert caught.value.status is None


async def test_a_bad_secret_key_is_rejected_and_never_shown_in_errors_or_logs(
    fake_stripe: FakeStripe, caplog: pytest.LogCaptureFixture
) -> None:
    wrong_key = "sk_test_wrongKeyThatMustNotLeak1234"
    caplog.set_level(logging.DEBUG)
    async with gateway_for(fake_stripe, secret_key=wrong_key) as gateway:
        with pytest.raises(BillingRejected) as caught:
            await gateway.create_checkout_session(**checkout_args())

    assert caught.value.status == 401
    assert not isinstance(caught.value, BillingUnavailable)
    assert wrong_key not in str(caught.value)
    assert wrong_key not in repr(gateway)
    assert wrong_key not in caplog.text
    assert DEFAULT_WEBHOOK_SECRET not in caplog.text


async def test_a_lost_response_is_retried_with_the_same_key_and_creates_one_session(
    fake_stripe: FakeStripe,
) -> None:
    # The first attempt executes on Stripe's side but its answer is lost; the SDK retries with
    # the same Idempotency-Key and gets the saved result instead of a second session.
    fake_stripe.fail_next(500, path="/v1/checkout/sessions", lost_response=True)

    async with gateway_for(fake_stripe, max_network_retries=1) as gateway:
        session = await gateway.create_checkout_session(**checkout_args())

    attempts = fake_stripe.requests_to("POST", "/v1/checkout/sessions")
    assert [a.idempotency_key for a in attempts] == ["checkout:inst_01", "checkout:inst_01"]
    assert [s["id"] for s in fake_stripe.sessions] == [session.id]


async def test_a_reply_without_the_fields_we_rely_on_is_a_reply_error(
    gateway: StripeGateway, fake_stripe: FakeStripe
) -> None:
    session = await gateway.create_checkout_session(**checkout_args())
    # Corrupt the stored object the way a broken proxy or an API change would.
    with fake_stripe._lock:
        del fake_stripe._state.sessions[session.id]["payment_status"]

    with pytest.raises(BillingReplyError) as caught:
        await gateway.retrieve_checkout_session(session.id)

    assert "payment_status" in str(caught.value)
    assert isinstance(caught.value, BillingUnavailable)


async def test_every_boundary_error_shares_one_root(gateway: StripeGateway) -> None:
    with pytest.raises(BillingError):
        await gateway.retrieve_subscription("sub_missing")


# ---- construction --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"secret_key": "pk_test_publishable"}, "secret_key"),
        ({"webhook_secret": " "}, "webhook_secret"),
        ({"webhook_tolerance": 0}, "webhook_tolerance"),
        ({"api_base": "ftp://example.com"}, "api_base"),
        ({"max_network_retries": 9}, "max_network_retries"),
    ],
)
def test_bad_options_are_refused_naming_the_option_not_its_value(
    kwargs: dict[str, Any], option: str
) -> None:
    options: dict[str, Any] = {"secret_key": DEFAULT_SECRET_KEY, "webhook_secret": "whsec_x"}
    options.update(kwargs)
    secret_key = options.pop("secret_key")

    with pytest.raises(ValueError) as caught:
        StripeGateway(secret_key, **options)

    assert option in str(caught.value)
    assert "pk_test_publishable" not in str(caught.value)
