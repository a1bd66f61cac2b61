"""The FastAPI application factory. Nothing is built at import time: ``create_app`` wires the
routes, and the lifespan builds the engine, key ring, mailer, throttle, Google client, billing and
the in-process worker, and hands them to the routes as one typed ``Services`` object
(control_plane/services.py) on ``app.state.services``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Protocol

from fastapi import FastAPI

from control_plane.auth.csrf import CsrfProtector
from control_plane.auth.google import GoogleClient, StateCookie
from control_plane.auth.passwords import PasswordHasher
from control_plane.auth.routes import router as auth_router
from control_plane.auth.service import AuthContext
from control_plane.billing.routes import router as billing_router
from control_plane.billing.service import build_billing
from control_plane.billing.setup import provide_billing
from control_plane.db import create_engine, create_session_factory, private_dir, utcnow
from control_plane.errors import install_error_handlers
from control_plane.instances.access_routes import router as access_log_router
from control_plane.instances.routes import router as instances_router
from control_plane.keys.fastpath import JWKS_PATH, JWKSFastPath
from control_plane.keys.routes import router as keys_router
from control_plane.keys.service import KeyRing
from control_plane.logs import RequestIds
from control_plane.mail import Mailer, Transport
from control_plane.metrics import FleetGauges, HttpMetrics, Metrics, start_listener
from control_plane.migrations import upgrade
from control_plane.pages import build_templates, install_pages
from control_plane.services import Core, Services, Wakeup
from control_plane.settings import Settings, get_settings
from control_plane.throttle import Throttle
from room_cloud_runtime import RequestLimits, SecurityHeaders

logger = logging.getLogger("control_plane")


class _Closable(Protocol):
    """What the lifespan closes on shutdown, newest first."""

    async def aclose(self) -> None: ...


def create_app(
    settings: Settings | None = None,
    *,
    clock: Callable[[], datetime] = utcnow,
    mail_transport: Transport | None = None,
    wakeup: Wakeup | None = None,
) -> FastAPI:
    """The control-plane ASGI app. ``settings`` defaults to the environment (``get_settings()``).

    ``clock``, ``mail_transport`` and ``wakeup`` (poked where the in-process worker would be,
    when none runs in this process) are seams for tests.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cfg = (settings or get_settings()).with_dev_secrets()
        url = cfg.resolved_database_url
        if url.startswith("sqlite") and not cfg.database_url:
            private_dir(cfg.var_dir)
        engine = create_engine(url)
        resources: list[_Closable] = []
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
            billing = build_billing(cfg)
            resources.append(billing)
            # Provisioning: the worker in this process (default in development, `dev`); billing
            # and the instance routes poke its wake-up after fulfilment, so it starts without a
            # poll delay.
            from control_plane.provisioning.runner import WorkerRunner, should_run_worker

            worker_wakeup = wakeup
            if should_run_worker(cfg):
                runner = WorkerRunner(
                    cfg, factory, clock=clock, catalog=billing.catalog, metrics=metrics
                )
                runner.start()
                resources.append(runner)
                worker_wakeup = runner.wakeup
            services = Services(
                Core(
                    settings=cfg,
                    engine=engine,
                    session_factory=factory,
                    read_session_factory=create_session_factory(engine, readonly=True),
                    clock=clock,
                    wakeup=worker_wakeup,
                )
            )
            services.provide(ring)
            services.provide(mailer)
            services.provide(throttle)
            if google is not None:
                services.provide(google)
            services.provide(
                AuthContext(
                    settings=cfg,
                    key_ring=ring,
                    hasher=hasher,
                    throttle=throttle,
                    mailer=mailer,
                    csrf=CsrfProtector(cfg),
                    google_state=StateCookie(cfg.secret_key_bytes()),
                )
            )
            provide_billing(services, billing)
            services.provide(templates)
            services.provide(metrics)
            services.freeze()
            app.state.services = services
            if cfg.metrics_port is not None:
                resources.append(_metrics_listener(cfg, metrics, factory, clock))
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
    templates = build_templates()
    metrics = Metrics()  # this app's own registry (control_plane/metrics.py)
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(keys_router)
    app.include_router(auth_router)
    app.include_router(instances_router)
    app.include_router(access_log_router)
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
    # Outermost of all: every answer is counted, the refusals of the layers above included.
    app.add_middleware(HttpMetrics, metrics=metrics, known_paths=(JWKS_PATH,))
    # Outside even the metrics: the request id is set before anything logs (control_plane/logs).
    app.add_middleware(RequestIds)
    return app


def _metrics_listener(
    cfg: Settings, metrics: Metrics, factory: Any, clock: Callable[[], datetime]
) -> _Closable:
    """Serve ``metrics`` on 127.0.0.1:METRICS_PORT, the fleet gauges read at each scrape."""
    from control_plane.provisioning.worker import fleet_gauges

    async def fleet() -> FleetGauges:
        return await fleet_gauges(factory, clock(), cfg.worker_lease_seconds)

    assert cfg.metrics_port is not None
    return start_listener(metrics, cfg.metrics_port, fleet)
