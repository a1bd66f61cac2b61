"""Every table module, imported so ``Base.metadata`` is complete (Alembic autogenerate, tests).

Other domains add their model module to ``MODEL_MODULES``.
"""

from __future__ import annotations

import importlib

from control_plane.db import Base

MODEL_MODULES = (
    "control_plane.auth.models",
    "control_plane.keys.models",
    "control_plane.instances.models",
    "control_plane.billing.models",
)

for _module in MODEL_MODULES:
    importlib.import_module(_module)

metadata = Base.metadata
