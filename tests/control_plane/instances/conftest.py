"""Fixtures of the instances tests (shared with the billing-flow tests through ``helpers``)."""

from tests.control_plane.instances.helpers import (  # noqa: F401 - fixtures
    cloud,
    cloud_settings,
    dev_cloud,
    make_cloud,
    stripe_fake,
)
