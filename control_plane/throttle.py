"""Throttling of the account endpoints, per account and per client address, with backoff.

Policies use the ``limits`` notation; several ``;``-separated tiers (``5/minute;20/hour``) make the
backoff: past the short tier a client waits a minute, past the long one an hour. Counters use the
sliding-window-counter strategy (no 2x burst at a fixed-window edge, O(1) per hit unlike the
moving window, limits#268). Storage is in memory, or Redis when ``REDIS_URL`` is set so every
process shares the budgets.

A storage outage fails **closed** (503 ``throttle_unavailable``): these limits are what stands
between a password and a brute-force attack, so we refuse rather than let attempts through.
"""

from __future__ import annotations

import hashlib
import logging
import time

from limits import RateLimitItem, RateLimitItemPerMinute, parse_many
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string
from redis.asyncio import BlockingConnectionPool
from starlette.requests import Request

from control_plane.errors import Throttled, ThrottleUnavailable
from control_plane.settings import Settings
from room_cloud_runtime import client_address_key

logger = logging.getLogger("control_plane.throttle")

#: Runtime tokens issued per control-plane session (``RUNTIME_TOKENS_PER_MINUTE``; the caller,
#: control_plane/instances/quotas.py, fails open on a storage outage).
RUNTIME_TOKEN_POLICY = "runtime_token_session"  # noqa: S105 - a policy name


class Throttle:
    """Named policies → hit/test by key. Keys are hashed so no email lands in Redis."""

    def __init__(self, settings: Settings) -> None:
        self._pool: BlockingConnectionPool | None = None
        if settings.redis_url:
            # Our own pool (closed in aclose) with short timeouts, so an outage answers 503
            # quickly; redis-py (a pinned dependency) rather than limits' default coredis.
            self._pool = BlockingConnectionPool.from_url(
                settings.redis_url,
                max_connections=32,
                timeout=2,
                socket_timeout=2,
                socket_connect_timeout=2,
            )
            self.storage = storage_from_string(
                f"async+{settings.redis_url}",
                implementation="redispy",
                key_prefix="quoroom-cp",
                # limits types a storage's options as ``float | str | bool`` though its Redis
                # storages take a ``connection_pool`` (limits 5.8).
                connection_pool=self._pool,  # type: ignore[arg-type]
            )
        else:
            self.storage = storage_from_string("async+memory://")
        self.limiter = SlidingWindowCounterRateLimiter(self.storage)
        self.policies: dict[str, list[RateLimitItem]] = {
            "login_address": parse_many(settings.throttle_login_address),
            "login_account_address": parse_many(settings.throttle_login_account_address),
            "login_account": parse_many(settings.throttle_login_account),
            "signup_address": parse_many(settings.throttle_signup_address),
            "signup_account": parse_many(settings.throttle_signup_account),
            "email_address": parse_many(settings.throttle_email_address),
            "email_account_address": parse_many(settings.throttle_email_account_address),
            "email_account": parse_many(settings.throttle_email_account),
        }
        # Member invitations (issue 12, item 6), keyed by the inviting owner and by the instance.
        self.policies["invite_owner"] = parse_many(settings.throttle_invite_owner)
        self.policies["invite_instance"] = parse_many(settings.throttle_invite_instance)
        self.policies[RUNTIME_TOKEN_POLICY] = [
            RateLimitItemPerMinute(settings.runtime_tokens_per_minute)
        ]

    @staticmethod
    def _key(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    async def hit(self, policy: str, key: str) -> None:
        """Count one attempt; raise :class:`Throttled` (with ``retry_after``) when over a tier."""
        ident = self._key(key)
        refused: list[RateLimitItem] = []
        try:
            for item in self.policies[policy]:
                if not await self.limiter.hit(item, "qr", policy, ident):
                    refused.append(item)
        except Exception as exc:  # storage outage: fail closed, see module docstring
            logger.error("throttle storage failed (%s); refusing", type(exc).__name__)
            raise ThrottleUnavailable() from exc
        if refused:
            raise Throttled(await self._retry_after(refused, policy, ident))

    async def check(self, policy: str, key: str) -> None:
        """Raise :class:`Throttled` when ``key`` is already over a tier, without counting."""
        ident = self._key(key)
        refused: list[RateLimitItem] = []
        try:
            for item in self.policies[policy]:
                if not await self.limiter.test(item, "qr", policy, ident):
                    refused.append(item)
        except Exception as exc:
            logger.error("throttle storage failed (%s); refusing", type(exc).__name__)
            raise ThrottleUnavailable() from exc
        if refused:
            raise Throttled(await self._retry_after(refused, policy, ident))

    async def _retry_after(self, items: list[RateLimitItem], policy: str, ident: str) -> int:
        now = time.time()
        wait = 1.0
        for item in items:
            try:
                stats = await self.limiter.get_window_stats(item, "qr", policy, ident)
                wait = max(wait, stats.reset_time - now)
            except Exception:  # the refusal stands; fall back to the tier's whole window
                wait = max(wait, float(item.get_expiry()))
        return int(wait + 0.999)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()

    async def reset(self) -> None:
        try:
            # The limiter's view of the same storage, typed as the asyncio storage it is.
            await self.limiter.storage.reset()
        except Exception:  # pragma: no cover - best effort
            logger.warning("throttle storage reset failed")


def client_address(request: Request, settings: Settings) -> str:
    """The client's address for throttling: ``Fly-Client-IP`` only when configured (Fly's proxy
    overwrites it), never ``X-Forwarded-For`` (client-controlled). Grouped as the runtime groups
    it (:func:`room_cloud_runtime.client_address_key`: IPv6 by /64); anything that is not an IP
    address is ``"unknown"``."""
    raw: str | None = None
    if settings.trust_fly_client_ip:
        raw = request.headers.get("fly-client-ip")
    if not raw and request.client is not None:
        raw = request.client.host
    if not raw:
        return "unknown"
    return client_address_key(raw) or "unknown"
