"""The pages of the cloud flow (landing, sign-in, ``/cloud/new``, provisioning, ``/app``).

``install_pages(app)`` adds the page routes, the ``/static`` files and the templates; the app
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

__all__ = ["PAGE_CSP", "install_pages", "safe_next"]


def install_pages(app: FastAPI) -> None:
    """Add the page routes and mount the static files on ``app``."""
    app.state.page_templates = build_templates()
    app.include_router(router)
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="static")
