"""Fixtures for the Fly image, machine config, Machines API client and rolling update tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from control_plane.provisioning.fly_api import FlyMachinesClient
from tests.fakes.fly_machines import (  # noqa: F401  (fixture re-exported for these tests)
    DEFAULT_ORG,
    DEFAULT_TOKEN,
    FlyMachinesFake,
    fly_machines_fake,
)


@pytest.fixture
async def fly_client(
    fly_machines_fake: FlyMachinesFake,  # noqa: F811  (the fixture imported above)
) -> AsyncIterator[FlyMachinesClient]:
    """A client pointed at the fake, with fast retries."""
    async with FlyMachinesClient(
        DEFAULT_TOKEN,
        org_slug=DEFAULT_ORG,
        base_url=fly_machines_fake.url,
        retry_backoff=0.01,
        timeout=10.0,
    ) as client:
        yield client
