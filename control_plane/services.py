"""The app's long-lived objects, typed: what the routes used to read from ``app.state``'s bag.

One :class:`Services` per app, built once in the lifespan and read-only afterwards:

- ``core``: what every domain needs (settings, the engine and its session factories, the clock,
  the worker's :class:`Wakeup`), as one frozen dataclass;
- each domain's own context (``AuthContext``, ``KeyRing``, ``InstancesContext``, ``Billing`` …),
  found by its type: ``services.get(InstancesContext)`` is typed as ``InstancesContext``.

Why a registry by type and not one dataclass with a field per domain: a field would need this
module to import every domain, and the routes of the lower domains (auth, keys) import this module,
so the layers contract (pyproject.toml, docs/architecture.md) would see auth depending on billing.
Keyed by type, each domain names only its own context, and mypy still checks every read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.requests import HTTPConnection

from control_plane.settings import Settings

T = TypeVar("T")


class Wakeup(Protocol):
    """Pokes the in-process provisioning worker (an ``asyncio.Event``'s ``set``)."""

    def set(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Core:
    settings: Settings
    engine: AsyncEngine
    session_factory: async_sessionmaker[AsyncSession]
    #: For requests that only read: no write lock on SQLite, READ ONLY on PostgreSQL.
    read_session_factory: async_sessionmaker[AsyncSession]
    clock: Callable[[], datetime]
    #: The in-process worker's wake-up, or None when no worker runs in this process.
    wakeup: Wakeup | None


class Services:
    """``core`` plus one context object per domain, found by type. Frozen once built."""

    __slots__ = ("_contexts", "_frozen", "core")

    def __init__(self, core: Core) -> None:
        self.core = core
        self._contexts: dict[type, object] = {}
        self._frozen = False

    def provide(self, value: object, *, kind: type | None = None) -> None:
        """Register ``value`` under its type (or ``kind``): once per type, before :meth:`freeze`."""
        key = kind or type(value)
        if self._frozen:
            raise RuntimeError(f"services are frozen; cannot provide {key.__name__}")
        if key in self._contexts:
            raise RuntimeError(f"{key.__name__} is already provided")
        self._contexts[key] = value

    def freeze(self) -> None:
        self._frozen = True

    def get(self, kind: type[T]) -> T:
        try:
            value = self._contexts[kind]
        except KeyError:
            raise LookupError(f"no {kind.__name__} was provided at start-up") from None
        assert isinstance(value, kind)
        return value

    def find(self, kind: type[T]) -> T | None:
        """Like :meth:`get`, for what a deployment may leave out (the Google client)."""
        value = self._contexts.get(kind)
        assert value is None or isinstance(value, kind)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(f"services are frozen; cannot set {name}")
        object.__setattr__(self, name, value)


def services_of(conn: HTTPConnection) -> Services:
    """The app's services, from a request or a WebSocket (set by ``create_app``'s lifespan)."""
    services = conn.app.state.services
    if not isinstance(services, Services):  # pragma: no cover - an app built without create_app
        raise RuntimeError("app.state.services is not set: build the app with create_app()")
    return services
