"""Fixtures for the billing tests: a fresh fake Stripe API per test and a gateway pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from control_plane.billing.stripe_gateway import StripeGateway
from tests.fakes.stripe_api import DEFAULT_SECRET_KEY, DEFAULT_WEBHOOK_SECRET, FakeStripe
from tests.fakes.stripe_api import fake_stripe as fake_stripe  # the fixture

STARTER_PRICE = "price_quoroom_starter_monthly"


@pytest.fixture
async def gateway(fake_stripe: FakeStripe) -> AsyncIterator[StripeGateway]:
    async with StripeGateway(
        DEFAULT_SECRET_KEY,
        webhook_secret=DEFAULT_WEBHOOK_SECRET,
        api_base=fake_stripe.url,
        max_network_retries=0,
    ) as gw:
        yield gw
