"""Build the configured provider and run the worker as a background task (the app's lifespan)
or in the foreground (``quoroom-cloud worker``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.db import utcnow
from control_plane.provisioning.provider import Provider
from control_plane.provisioning.worker import Worker
from control_plane.settings import Settings

__all__ = ["WorkerRunner", "build_provider", "check_provider_settings", "should_run_worker"]

logger = logging.getLogger(__name__)


def should_run_worker(settings: Settings) -> bool:
    """``QUOROOM_CP_RUN_WORKER``, defaulting to on in development (``quoroom-cloud dev``)."""
    return settings.development if settings.run_worker is None else settings.run_worker


def check_provider_settings(settings: Settings) -> None:
    """Raise :class:`~control_plane.settings.SettingsError` for what the configured provider
    would refuse at its first Room: with ``RUNTIME_KIND=quoroom`` the local provider needs the
    real Room (``QUOROOM_ROOM_CLI``) and ``node`` ≥ 20. The provider's constructor checks the
    same; this lets ``quoroom-cloud dev`` stop before it starts anything."""
    if settings.provider == "local" and settings.runtime_kind == "quoroom":
        from control_plane.provisioning.local import find_quoroom_room

        find_quoroom_room(settings.quoroom_room_cli)


def build_provider(settings: Settings, **kw: Any) -> Provider:
    """The provider ``QUOROOM_CP_PROVIDER`` names, built from the settings."""
    if settings.provider == "fly":
        from control_plane.provisioning.fly import FlyProvider

        return FlyProvider.from_settings(
            settings, health_timeout=settings.runtime_health_timeout_seconds, **kw
        )
    from control_plane.provisioning.local import LocalProvider

    return LocalProvider.from_settings(
        settings, health_timeout=settings.runtime_health_timeout_seconds, **kw
    )


class WorkerRunner:
    """A worker and its provider, run as one task; :meth:`aclose` stops both (the local provider
    stops the runtimes it started)."""

    def __init__(
        self,
        settings: Settings,
        session_factory: async_sessionmaker[AsyncSession],
        *,
        provider: Provider | None = None,
        clock: Callable[[], datetime] = utcnow,
        **worker_kw: Any,
    ) -> None:
        self.provider = provider or build_provider(settings)
        self.worker = Worker(settings, session_factory, self.provider, clock=clock, **worker_kw)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def wakeup(self) -> asyncio.Event:
        return self.worker.wakeup

    def start(self) -> None:
        self._task = asyncio.create_task(self.worker.run(self._stop), name="provisioning-worker")

    async def run(self) -> None:
        """Run in the foreground until :meth:`stop` (or cancellation), then close."""
        try:
            await self.worker.run(self._stop)
        finally:
            await self.provider.aclose()

    def stop(self) -> None:
        self._stop.set()

    async def aclose(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await self._task
            except Exception:  # pragma: no cover - shutdown must finish
                logger.exception("the worker stopped with an error")
        await self.provider.aclose()
