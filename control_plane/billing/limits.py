"""Bounds on what users can make the control plane ask of Stripe (issue 12, item 8).

Two things keep a user (or a script with their session) from turning our Stripe account into
their load generator: a per-user budget on the routes that call Stripe, and a short cache of
Checkout Session state for ``/checkout/confirm``.

**Limits.** ``billing_user`` counts every request that may reach Stripe (create, confirm,
delete, cancel at period end); ``checkout_user`` counts new Checkout Sessions only (a create that
is not a replay of its Idempotency-Key: replays reuse the session). Both are keyed by user id.
Unlike the account limits, these **fail open** when the limiter's storage is down (logged): they
bound cost, not access to a secret, and a Redis outage must not stop customers paying; Stripe
rate-limits us in the end anyway.

**Cache.** What may be cached, and for how long, follows from what can still change:

- ``complete`` + paid and ``expired`` are final at Stripe: kept :data:`FINAL_TTL_SECONDS`.
- ``open`` (and ``complete`` but unpaid, an asynchronous payment method) can turn paid at any
  moment: kept :data:`OPEN_TTL_SECONDS` only. A payment made meanwhile is never lost: the
  webhook fulfils regardless of the cache (and drops the entry), and the first confirm after
  the few seconds asks Stripe again. Serving "open" a few seconds late only delays the page.

Concurrent confirms of one session share one Stripe call (single flight).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from limits import parse_many

from control_plane.billing.stripe_gateway import CheckoutSessionState
from control_plane.errors import Throttled, ThrottleUnavailable
from control_plane.settings import Settings
from control_plane.throttle import Throttle

logger = logging.getLogger("control_plane.billing")

OPEN_TTL_SECONDS = 5
FINAL_TTL_SECONDS = 300
MAX_CACHED_SESSIONS = 10_000

BILLING_POLICY = "billing_user"
CHECKOUT_POLICY = "checkout_user"


def _final(state: CheckoutSessionState) -> bool:
    return state.paid or state.status == "expired"


class CheckoutCache:
    """Checkout Session states by id, each kept for the TTL its status allows (bounded LRU)."""

    def __init__(self, max_entries: int = MAX_CACHED_SESSIONS) -> None:
        self._entries: OrderedDict[str, tuple[datetime, CheckoutSessionState]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[CheckoutSessionState]] = {}
        self._max = max_entries

    def get(self, session_id: str, now: datetime) -> CheckoutSessionState | None:
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        expires, state = entry
        if now >= expires:
            del self._entries[session_id]
            return None
        return state

    def put(self, state: CheckoutSessionState, now: datetime) -> None:
        ttl = FINAL_TTL_SECONDS if _final(state) else OPEN_TTL_SECONDS
        self._entries[state.id] = (now + timedelta(seconds=ttl), state)
        self._entries.move_to_end(state.id)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def forget(self, session_id: str) -> None:
        self._entries.pop(session_id, None)

    async def fetch(
        self,
        session_id: str,
        now: datetime,
        load: Callable[[str], Awaitable[CheckoutSessionState]],
    ) -> CheckoutSessionState:
        """The cached state, or ``load(session_id)`` once for all concurrent callers."""
        cached = self.get(session_id, now)
        if cached is not None:
            return cached
        pending = self._inflight.get(session_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[CheckoutSessionState] = asyncio.get_running_loop().create_future()
        self._inflight[session_id] = future
        try:
            state = await load(session_id)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        finally:
            self._inflight.pop(session_id, None)
        self.put(state, now)
        future.set_result(state)
        return state


def _ensure_policies(throttle: Throttle, settings: Settings) -> None:
    if BILLING_POLICY not in throttle.policies:
        throttle.policies[BILLING_POLICY] = parse_many(settings.throttle_billing_user)
        throttle.policies[CHECKOUT_POLICY] = parse_many(settings.throttle_checkout_user)


async def limit(throttle: Throttle, settings: Settings, policy: str, user_id: str) -> None:
    """Count one Stripe-bound request of ``user_id`` against ``policy``; raise
    :class:`Throttled` (429 ``throttled`` with Retry-After) past it. Fails open (see above)."""
    _ensure_policies(throttle, settings)
    try:
        await throttle.hit(policy, f"user:{user_id}")
    except Throttled as exc:
        raise Throttled(exc.retry_after, "too many billing requests; try again later") from None
    except ThrottleUnavailable:
        logger.warning("billing limit %s not applied: the limiter's storage is down", policy)
