"""The public surface of ``fly_image`` is pinned, so a change to it is deliberate."""

from __future__ import annotations

import fly_image


def test_fly_image_exports_exactly_its_public_names():
    assert sorted(fly_image.__all__) == [
        "Concurrency",
        "DATA_DIR",
        "ENTRYPOINT",
        "GATEWAY_ENTRYPOINT",
        "HEALTH_PATH",
        "INTERNAL_PORT",
        "MachineConfigError",
        "ROOM_CLI",
        "ROOM_PORT",
        "RUNTIME_KINDS",
        "Tier",
        "TierLike",
        "build_machine_config",
        "check_image_reference",
        "runtime_command",
        "runtime_env",
    ]
    for name in fly_image.__all__:
        assert getattr(fly_image, name) is not None
