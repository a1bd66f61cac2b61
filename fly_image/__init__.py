"""The Fly runtime image's machine configuration and the rolling image update.

``Dockerfile.runtime`` (repository root) builds the image; :func:`build_machine_config` is what the
Fly provider sends for each instance; :func:`run_update_image` backs
``quoroom-cloud ops update-image IMAGE``.
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
from .rollout import (
    InstanceResult,
    Outcome,
    RolloutReport,
    RolloutTarget,
    format_report,
    rolling_update,
    run_update_image,
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
    "InstanceResult",
    "MachineConfigError",
    "Outcome",
    "RolloutReport",
    "RolloutTarget",
    "Tier",
    "TierLike",
    "build_machine_config",
    "check_image_reference",
    "format_report",
    "rolling_update",
    "run_update_image",
    "runtime_command",
    "runtime_env",
]
