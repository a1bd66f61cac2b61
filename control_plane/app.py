"""The FastAPI application factory. Nothing is built at import time: ``create_app`` wires the
routes, and the lifespan builds the engine, key ring, mailer, throttle and Google client."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from fastapi import FastAPI

from control_plane.auth.csrf import CsrfProtector
from control_plane.auth.google import GoogleClient, StateCookie
from control_plane.auth.passwords import PasswordHasher
from control_plane.auth.routes import router as auth_router
from control_plane.auth.service import AuthContext
from control_plane.billing.routes import router as billing_router
from control_plane.billing.setup import start_billing
from control_plane.db import create_engine, create_session_factory, private_dir, utcnow
from control_plane.errors import install_error_handlers
from control_plane.instances.routes import router as instances_router
from control_plane.keys.fastpath import JWKSFastPath
from control_plane.keys.routes import router as keys_router
from control_plane.keys.service import KeyRing
from control_plane.mail import Mailer, Transport
from control_plane.migrations import upgrade
from control_plane.pages import install_pages
from control_plane.settings import Settings, get_settings
from control_plane.throttle import Throttle
from room_cloud_runtime import RequestLimits, SecurityHeaders

logger = logging.getLogger("control_plane")


def create_app(
    settings: Settings | None = None,
    *,
    clock: Callable[[], datetime] = utcnow,
    mail_transport: Transport | None = None,
) -> FastAPI:
    """The control-plane ASGI app. ``settings`` defaults to the environment (``get_settings()``).

    ``clock`` and ``mail_transport`` are seams for tests.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cfg = (settings or get_settings()).with_dev_secrets()
        url = cfg.resolved_database_url
        if url.startswith("sqlite") and not cfg.database_url:
            private_dir(cfg.var_dir)
        engine = create_engine(url)
        resources: list[Any] = []
        try:
            if cfg.should_auto_migrate:
                await upgrade(engine)
            factory = create_session_factory(engine)
            ring = KeyRing(cfg, factory, clock=clock)
            await ring.start(bootstrap=True)
            resources.append(ring)
            hasher = PasswordHasher(cfg)
            await hasher.warm_up()
            mailer = Mailer(cfg, mail_transport)
            resources.append(mailer)
            throttle = Throttle(cfg)
            resources.append(throttle)
            google = GoogleClient(cfg) if cfg.google_enabled else None
            if google is not None:
                resources.append(google)
            app.state.settings = cfg
            app.state.engine = engine
            app.state.session_factory = factory
            app.state.read_session_factory = create_session_factory(engine, readonly=True)
            app.state.key_ring = ring
            app.state.mailer = mailer
            app.state.throttle = throttle
            app.state.google = google
            resources.append(start_billing(app, cfg, factory, clock))
            # Provisioning: the worker in this process (default in development, `dev`); billing
            # pokes app.state.worker_wakeup after fulfilment so it starts without a poll delay.
            from control_plane.provisioning.runner import WorkerRunner, should_run_worker

            app.state.worker_wakeup = None
            if should_run_worker(cfg):
                runner = WorkerRunner(cfg, factory, clock=clock, catalog=app.state.catalog)
                runner.start()
                resources.append(runner)
                app.state.worker_wakeup = runner.wakeup
            app.state.clock = clock
            app.state.jwks_headers = {
                "Cache-Control": f"public, max-age={cfg.jwks_max_age_seconds}",
                "Access-Control-Allow-Origin": "*",
            }
            app.state.auth = AuthContext(
                settings=cfg,
                key_ring=ring,
                hasher=hasher,
                throttle=throttle,
                mailer=mailer,
                csrf=CsrfProtector(cfg),
                google_state=StateCookie(cfg.secret_key_bytes()),
            )
            yield
        finally:
            for resource in reversed(resources):
                try:
                    await resource.aclose()
                except Exception:  # pragma: no cover - shutdown must finish
                    logger.exception("error while closing %s", type(resource).__name__)
            await engine.dispose()

    # The API docs (and the schema they read) are off in production unless API_DOCS turns them
    # on: the schema maps every route and body for an attacker (issue 12).
    docs = (settings or get_settings()).docs_enabled
    app = FastAPI(
        title="Quoroom control plane",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    install_error_handlers(app)
    app.include_router(keys_router)
    app.include_router(auth_router)
    app.include_router(instances_router)
    app.include_router(billing_router)
    install_pages(app)

    @app.get("/healthz", tags=["ops"], summary="Liveness")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(JWKSFastPath)
    max_body = (settings.max_body_bytes if settings else None) or 64 * 1024
    # The runtime's request limits: bodies counted as they stream (a Content-Length check alone
    # is bypassed by chunked bodies, GHSA-933h-hp56-hf7m), header size, JSON depth.
    app.add_middleware(RequestLimits, max_body_bytes=max_body)
    # Outermost, so refusals carry them too; pages set their own CSP (theirs wins).
    app.add_middleware(SecurityHeaders)
    return app
