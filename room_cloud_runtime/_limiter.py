"""Rate limiters (memory or Redis) behind one interface; :mod:`._ratelimit` holds the layers.

Concerns are kept apart as in ``limits`` (alisaifee/limits): the *policy* is a
``limits.RateLimitItem`` (``"300/minute"``), the *strategy* is the sliding-window counter (no 2x
burst at a fixed-window edge; O(1) per key, unlike the moving window, limits#268) and the
*storage* is chosen by URL:

- ``memory://`` (default): :class:`MemoryLimiter`, per process, O(1) per check and no background
  thread (see ``_memstore``). It never yields to the event loop.
- ``redis://`` / ``rediss://``: :class:`RedisLimiter`, budgets shared by every process, through
  ``limits.aio``'s sliding-window-counter strategy on redis-py's asyncio client (never blocks the
  loop). What happens when Redis is unreachable is an explicit setting, ``on_storage_error``:
  ``local`` (default: a per-process memory limiter takes over, so abuse is still throttled and
  health checks keep working), ``open`` (allow) or ``closed`` (503 ``rate_limit_unavailable``).
  A failure is logged once per outage and Redis is only retried after a backoff, so a dead Redis
  adds no latency (slowapi turns a Redis outage into 500s everywhere, laurentS/slowapi#281).
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Literal

from limits import RateLimitItem
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import ConfigurationError, StorageError
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ._errors import ConfigError, StorageUnavailableError
from ._memstore import (
    DEFAULT_MAX_KEYS,
    MAX_LIMIT,
    Decision,
    MemoryStore,
    WindowTable,
    retry_in,
)

__all__ = [
    "Decision",
    "Limiter",
    "MemoryLimiter",
    "RedisLimiter",
    "StorageFailMode",
    "build_limiter",
]

logger = logging.getLogger("room_cloud_runtime.ratelimit")

StorageFailMode = Literal["local", "open", "closed"]
_FAIL_MODES = ("local", "open", "closed")


class Limiter(ABC):
    """Counts hits per key against a policy. Built by :func:`build_limiter`."""

    @abstractmethod
    async def hit(self, key: str, item: RateLimitItem) -> Decision:
        """Count one hit for ``key`` under ``item``; returns the :class:`Decision`.

        Raises :class:`StorageUnavailableError` only when the storage is down and the limiter
        was built with ``on_storage_error="closed"``.
        """

    def checker(self, item: RateLimitItem) -> Callable[[str], Decision | None] | None:
        """A synchronous check for ``item``, or ``None`` when this limiter can only answer
        asynchronously (the default; Redis).

        The check counts one hit for its key and returns ``None`` when allowed, the refusal's
        :class:`Decision` otherwise. The layers ask for it once, at construction, so a
        per-process limiter costs neither a coroutine nor a ``Decision`` per allowed request.
        """
        return None

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to close by default
        """Release connections. The limiter must not be used afterwards."""


class MemoryLimiter(Limiter):
    """Per-process limiter on :class:`~room_cloud_runtime._memstore.MemoryStore`.

    :meth:`hit` completes without yielding to the event loop; :meth:`hit_now` is the same
    check as a plain function. ``clock`` (default ``time.monotonic``) is injectable for tests.
    """

    # Resolved policies are cached by id(item) (a dict lookup instead of hashing the item's
    # fields on every request); the item is kept in the entry so its id cannot be reused.
    _MAX_POLICIES = 256

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, max_keys: int = DEFAULT_MAX_KEYS
    ) -> None:
        if max_keys < 1:
            raise ConfigError("max_keys", "must be at least 1")
        self.store = MemoryStore(clock=clock, max_keys=max_keys)
        self._clock = clock
        self._policies: dict[int, tuple[RateLimitItem, WindowTable, int]] = {}

    async def hit(self, key: str, item: RateLimitItem) -> Decision:
        # hit_now's body, inlined: this runs twice per request (one Python call less).
        entry = self._policies.get(id(item))
        if entry is None:
            entry = self._resolve(item)
        return entry[1].hit(key, entry[2], self._clock())

    def hit_now(self, key: str, item: RateLimitItem) -> Decision:
        """:meth:`hit` without the coroutine (for synchronous callers and benchmarks)."""
        entry = self._policies.get(id(item))
        if entry is None:
            entry = self._resolve(item)
        return entry[1].hit(key, entry[2], self._clock())

    def checker(self, item: RateLimitItem) -> Callable[[str], Decision | None]:
        """The synchronous check for ``item`` (see :meth:`Limiter.checker`)."""
        entry = self._policies.get(id(item))
        if entry is None:
            entry = self._resolve(item)
        # Bound once here: the table is kept for good (only the id cache may be cleared).
        return entry[1].checker(entry[2], self._clock)

    def _resolve(self, item: RateLimitItem) -> tuple[RateLimitItem, WindowTable, int]:
        if item.amount > MAX_LIMIT:
            raise ConfigError("limit", f"at most {MAX_LIMIT} per window")
        # Same fields as limits' key_for (namespace, amount, multiples, granularity): two policies
        # that differ only by namespace (e.g. "read" and "write") never share counters.
        name = (item.namespace, item.amount, item.multiples, item.GRANULARITY.seconds)
        table = self.store.table(name, item.get_expiry())
        if len(self._policies) >= self._MAX_POLICIES:
            self._policies.clear()  # only a cache: the tables (the counts) are kept
        entry = (item, table, item.amount)
        self._policies[id(item)] = entry
        return entry


class RedisLimiter(Limiter):
    """Limiter whose counts live in Redis, shared by every process that uses the same prefix.

    Uses ``limits.aio``'s ``SlidingWindowCounterRateLimiter`` over redis-py's asyncio client:
    one Lua round trip per allowed hit, a second only on refusal (for ``Retry-After``). Socket
    timeouts are short and redis-py's own retries are off: the outage policy below handles
    failure, not a retry loop on the request path.
    """

    def __init__(
        self,
        url: str,
        *,
        on_storage_error: StorageFailMode = "local",
        key_prefix: str = "quoroom",
        timeout: float = 0.25,
        max_connections: int = 64,
        backoff: float = 1.0,
        max_backoff: float = 15.0,
        fallback: MemoryLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if on_storage_error not in _FAIL_MODES:
            raise ConfigError(
                "on_storage_error", f"must be one of {_FAIL_MODES}, got {on_storage_error!r}"
            )
        if timeout <= 0:
            raise ConfigError("timeout", "must be positive")
        if not 0 < backoff <= max_backoff:
            raise ConfigError("backoff", "must be positive and at most max_backoff")
        self.on_storage_error: StorageFailMode = on_storage_error
        self._timeout = timeout
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._clock = clock
        self._fallback = fallback or MemoryLimiter()
        try:
            # A blocking pool waits (up to the timeout) for a free connection under a burst
            # instead of failing with "Too many connections", which would look like an outage.
            self._pool = BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=timeout,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
            )
            storage = RedisStorage(
                f"async+{url}",
                implementation="redispy",
                key_prefix=key_prefix,
                # limits types **options as float | str | bool; redis-py takes the pool.
                connection_pool=self._pool,  # type: ignore[arg-type]
            )
        except (ValueError, ConfigurationError) as exc:
            raise ConfigError("QUOROOM_RATE_LIMIT_STORAGE", f"invalid Redis URL: {exc}") from exc
        self._storage = storage
        self._strategy = SlidingWindowCounterRateLimiter(storage)
        # Outage state. Touched only from the event loop, between awaits.
        self._retry_at = 0.0  # monotonic time before which Redis is not tried
        self._delay = 0.0  # current backoff; 0 while Redis is healthy
        self._probing = False  # one request probes a recovering Redis; the rest stay degraded

    @property
    def degraded(self) -> bool:
        """Whether Redis is currently considered down."""
        return self._delay > 0

    async def hit(self, key: str, item: RateLimitItem) -> Decision:
        if self._delay and (self._probing or self._clock() < self._retry_at):
            return self._degraded(key, item)
        probing = self._delay > 0
        if probing:
            self._probing = True
        try:
            decision = await self._hit_redis(key, item)
        except StorageUnavailableError as exc:
            self._mark_down(exc)
            return self._degraded(key, item)
        finally:
            if probing:
                self._probing = False
        if self._delay:
            logger.warning("rate-limit storage reachable again; using Redis budgets")
            self._delay = 0.0
        return decision

    async def _hit_redis(self, key: str, item: RateLimitItem) -> Decision:
        """The one boundary where redis / limits errors become StorageUnavailableError."""
        try:
            async with asyncio.timeout(self._timeout * 2):  # connect + command, belt and braces
                if await self._strategy.hit(item, key):
                    return Decision(True, item.amount, None, float(item.get_expiry()))
                # Refused: read the window to tell the client when to retry. limits'
                # get_window_stats reports when the *next unit* decays, which for the
                # sliding-window counter is often too early; this uses the exact condition.
                window = await self._storage.get_sliding_window(
                    item.key_for(key), item.get_expiry()
                )
        except (RedisError, StorageError, OSError, TimeoutError) as exc:
            raise StorageUnavailableError(f"{type(exc).__name__}: {exc}") from exc
        return _refusal_from_window(item, window)

    def _mark_down(self, exc: StorageUnavailableError) -> None:
        first = self._delay == 0
        self._delay = min(self._max_backoff, self._delay * 2) if self._delay else self._backoff
        self._retry_at = self._clock() + self._delay
        if first:  # once per outage, not once per request
            logger.error(
                "rate-limit storage unreachable (%s); on_storage_error=%s, retrying in %.0fs",
                exc,
                self.on_storage_error,
                self._delay,
            )

    def _degraded(self, key: str, item: RateLimitItem) -> Decision:
        if self.on_storage_error == "local":
            return self._fallback.hit_now(key, item)
        if self.on_storage_error == "open":
            return Decision(True, item.amount, None, float(item.get_expiry()))
        raise StorageUnavailableError("rate-limit storage unavailable")

    async def aclose(self) -> None:
        await self._pool.aclose()


def _refusal_from_window(item: RateLimitItem, window: tuple[int, float, int, float]) -> Decision:
    """A refusal from limits' Redis window ``(prev, prev_ttl, count, count_ttl)``.

    limits' Redis keys are TTL-driven rather than clock-aligned: the previous count weighs
    ``prev_ttl / expiry`` and the current window ends when ``count_ttl`` falls to ``expiry``.
    """
    prev, prev_ttl, count, count_ttl = window
    expiry = item.get_expiry()
    if prev:
        elapsed = expiry - prev_ttl
    elif count:
        elapsed = 2 * expiry - count_ttl
    else:
        elapsed = 0.0
    elapsed = min(max(elapsed, 0.0), float(expiry))
    weighted = prev * (1.0 - elapsed / expiry) + count
    retry = retry_in(prev, count, item.amount, 1, elapsed, expiry)
    return Decision(False, item.amount, max(0, item.amount - int(weighted)), retry)


def build_limiter(
    storage_url: str,
    *,
    on_storage_error: StorageFailMode = "local",
    key_prefix: str = "quoroom",
    clock: Callable[[], float] | None = None,
    max_keys: int = DEFAULT_MAX_KEYS,
    redis_timeout: float = 0.25,
) -> Limiter:
    """The limiter for ``storage_url`` (``QUOROOM_RATE_LIMIT_STORAGE``).

    ``memory://`` gives a :class:`MemoryLimiter`; ``redis://`` / ``rediss://`` a
    :class:`RedisLimiter` whose keys start with ``key_prefix`` (several processes with the same
    prefix share budgets) and which falls back as ``on_storage_error`` says. ``clock`` (monotonic
    seconds) is for tests; ``max_keys`` bounds each in-memory table.
    """
    if on_storage_error not in _FAIL_MODES:
        raise ConfigError(
            "QUOROOM_RATE_LIMIT_ON_STORAGE_ERROR",
            f"must be local, open or closed, got {on_storage_error!r}",
        )
    if not key_prefix or any(c.isspace() for c in key_prefix):
        raise ConfigError("key_prefix", "must be a non-empty string without whitespace")
    clock = clock or time.monotonic
    if storage_url == "memory://":
        return MemoryLimiter(clock=clock, max_keys=max_keys)
    if storage_url.startswith(("redis://", "rediss://")):
        return RedisLimiter(
            storage_url,
            on_storage_error=on_storage_error,
            key_prefix=key_prefix,
            timeout=redis_timeout,
            fallback=MemoryLimiter(clock=clock, max_keys=max_keys),
            clock=clock,
        )
    raise ConfigError(
        "QUOROOM_RATE_LIMIT_STORAGE", "must be memory:// or a redis:// / rediss:// URL"
    )
