"""The pages of the cloud flow (landing, sign-in, ``/cloud/new``, provisioning, ``/app``).

``install_pages(app)`` adds the page routes and the ``/static`` files; the app factory provides
the templates (``build_templates()``) as a service. The app
factory wraps everything in :class:`room_cloud_runtime.SecurityHeaders` and each page sets its own
Content-Security-Policy (see :mod:`control_plane.pages.routes`).
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from control_plane.pages.routes import (
    PAGE_CSP,
    STATIC_DIR,
    STATIC_PREFIX,
    build_templates,
    router,
    safe_next,
)

__all__ = ["PAGE_CSP", "build_templates", "install_pages", "safe_next"]


def install_pages(app: FastAPI) -> None:
    """Add the page routes and mount the static files on ``app``."""
    app.include_router(router)
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="static")
