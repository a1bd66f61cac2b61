"""The Fly runtime image's machine configuration.

``Dockerfile.runtime`` (repository root) builds the image; :func:`build_machine_config` is what the
Fly provider sends for each instance. The rolling image update, which drives the Machines API,
lives in the control plane (``control_plane.provisioning.rollout``): this package imports only the
runtime's public API.
"""

from .config import (
    DATA_DIR,
    ENTRYPOINT,
    GATEWAY_ENTRYPOINT,
    HEALTH_PATH,
    INTERNAL_PORT,
    ROOM_CLI,
    ROOM_PORT,
    RUNTIME_KINDS,
    Concurrency,
    MachineConfigError,
    Tier,
    TierLike,
    build_machine_config,
    check_image_reference,
    runtime_command,
    runtime_env,
)

__all__ = [
    "DATA_DIR",
    "ENTRYPOINT",
    "GATEWAY_ENTRYPOINT",
    "HEALTH_PATH",
    "INTERNAL_PORT",
    "ROOM_CLI",
    "ROOM_PORT",
    "RUNTIME_KINDS",
    "Concurrency",
    "MachineConfigError",
    "Tier",
    "TierLike",
    "build_machine_config",
    "check_image_reference",
    "runtime_command",
    "runtime_env",
]
