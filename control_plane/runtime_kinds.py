"""What runs in an instance (DESIGN.md "Gateway mode"), shared by settings, instances and
provisioning: ``reference`` is the Python reference Room behind ``quoroom-runtime serve``;
``quoroom`` is the real (Node) Room behind ``quoroom-runtime gateway``. Fixed when the instance
is created (``cloud_instances.runtime_kind``)."""

from __future__ import annotations

from typing import Literal

__all__ = ["DEFAULT_RUNTIME_KIND", "RUNTIME_KINDS", "RuntimeKind"]

RuntimeKind = Literal["reference", "quoroom"]
RUNTIME_KINDS: tuple[RuntimeKind, ...] = ("reference", "quoroom")
DEFAULT_RUNTIME_KIND: RuntimeKind = "reference"
