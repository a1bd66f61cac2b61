"""In-process rate-limit storage: sliding-window counters in O(1) per check, no thread.

Why not ``limits``' own memory storages (see PERF-NOTES.md, PITFALLS.md):

- the sync ``MemoryStorage`` re-arms a ``threading.Timer`` every 10 ms that scans *every* key under
  the GIL (11 ms per pass at 100k keys): a steady tax on the event loop that grows with the number
  of clients;
- ``limits.aio``'s ``MemoryStorage`` walks the live keys on each hit (O(keys); 11 ms at 100k) and
  has expiry races (limits#267, #277).

This module keeps the same *algorithm* as limits' sliding-window-counter strategy (the previous
window's count weighted by how much of it still overlaps the sliding window, plus the current
window's count; no 2x burst at a fixed-window edge, and O(1) per key unlike the moving window,
limits#268) but stores each key as **one int** in one of two generation dicts:

- ``cur``  -- keys hit in the current window: ``prev_count << 32 | cur_count``;
- ``prev`` -- keys last hit in the previous window (their ``cur_count`` becomes ``prev_count``
  when they are hit again, moved over with one ``pop`` + one insert).

When a window ends, ``prev`` (whose keys can no longer weigh anything) goes to a *dying* list and
is drained a few entries per call with ``dict.popitem()`` (O(1)), so a million expired keys are
freed over the following calls instead of in one 50 ms deallocation. Values are ints rather than
per-key objects so the cyclic GC never has to traverse a million containers.

:class:`MemoryStore` exposes this through the ``limits.storage.Storage`` interface (scheme
``quoroom+memory://``) so limits' ``SlidingWindowCounterRateLimiter`` runs on it unchanged, and
through :meth:`MemoryStore.table`/:meth:`WindowTable.hit` -- a direct call that returns the whole
decision (allowed, remaining, reset) from one dict lookup, which the runtime's limiter uses on the
hot path (bench/bench_limiter.py has the figures that justify the shortcut).

Not thread-safe by design: it is used from one event loop and never awaits, so every call runs to
completion without interleaving; locks would only add cost.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from math import ceil
from typing import NamedTuple

from limits.storage import SlidingWindowCounterSupport, Storage

Clock = Callable[[], float]

_SHIFT = 32
_MASK = (1 << _SHIFT) - 1
#: The largest limit a table can count to (counts are packed in 32 bits).
MAX_LIMIT = _MASK
#: Entries freed from expired generations per call: more than the at-most-one key a call can
#: create, so expired keys are always freed faster than new ones arrive.
DRAIN_PER_CALL = 4
#: Default cap on live keys per table. A key costs ~160-180 bytes (bench/bench_limiter.py), so a
#: spray of distinct addresses can hold at most ~90 MB live plus as much again while expired
#: generations drain: sized for a small VM. Raise it with ``max_keys`` where memory allows.
DEFAULT_MAX_KEYS = 500_000


class Decision(NamedTuple):
    """The outcome of one rate-limit check.

    - ``allowed``: whether the hit was counted and the request may proceed;
    - ``limit``: the policy's quota (``q`` in ``RateLimit-Policy``);
    - ``remaining``: quota left after this check, or ``None`` when the storage cannot tell
      without another round trip (Redis on an allowed hit) or did not count (fail-open);
    - ``reset_after``: when refused, seconds until the hit would be allowed again (the
      ``Retry-After``); when allowed, seconds until the current window ends.
    """

    allowed: bool
    limit: int
    remaining: int | None
    reset_after: float


class WindowTable:
    """Sliding-window counters for one window length (``expiry`` seconds).

    Keys live in at most one of two generation dicts, so a check is one or two dict lookups
    whatever the number of keys. Memory is bounded by ``max_keys`` live keys plus the expired
    generations still being drained (at most about as many again).
    """

    __slots__ = ("_cur", "_dying", "_prev", "_wstart", "expiry", "max_keys")

    def __init__(self, expiry: float, *, now: float, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if expiry <= 0:
            raise ValueError("expiry must be positive")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.expiry = float(expiry)
        self.max_keys = max_keys
        self._cur: dict[str, int] = {}
        self._prev: dict[str, int] = {}
        self._dying: list[dict[str, int]] = []
        # Windows are aligned to multiples of ``expiry`` on the clock, as limits aligns them.
        self._wstart = now - (now % self.expiry)

    def __len__(self) -> int:
        """Live keys (hit in the current or the previous window)."""
        return len(self._cur) + len(self._prev)

    @property
    def pending(self) -> int:
        """Expired keys not yet freed (drained a few per call)."""
        return sum(len(d) for d in self._dying)

    def hit(self, key: str, limit: int, now: float, amount: int = 1) -> Decision:
        """Count ``amount`` against ``key`` if the sliding-window count allows it (see
        :class:`Decision` for what the result carries)."""
        expiry = self.expiry
        elapsed = now - self._wstart
        if elapsed >= expiry:
            self._roll(now)
            elapsed = now - self._wstart
        elif elapsed < 0:  # an injected clock stepped back: stay in this window
            elapsed = 0.0
        if self._dying:
            self._drain()
        cur = self._cur
        value = cur.get(key)
        if value is not None and value <= _MASK:
            # Fast path, the common case: a key already counted in this window and with no
            # previous-window count, so the weighted count is the plain integer ``value``.
            if value + amount <= limit:
                cur[key] = value + amount
                return Decision(True, limit, limit - value - amount, expiry - elapsed)
            retry = retry_in(0, value, limit, amount, elapsed, expiry)
            return Decision(False, limit, max(0, limit - value), retry)
        fresh = value is None
        if value is None:
            moved = self._prev.pop(key, None)
            # A key seen last window brings its count over as this window's "previous" count.
            value = (moved & _MASK) << _SHIFT if moved is not None else 0
            if len(cur) + len(self._prev) >= self.max_keys:
                self._evict()
        count = value & _MASK
        weighted = (value >> _SHIFT) * (1.0 - elapsed / expiry) + count
        # floor(weighted) + amount <= limit  <=>  weighted < limit - amount + 1 (integers)
        if weighted >= limit - amount + 1:
            if fresh and value:
                cur[key] = value  # keep the previous count that was moved over
            retry = retry_in(value >> _SHIFT, count, limit, amount, elapsed, expiry)
            return Decision(False, limit, max(0, limit - int(weighted)), retry)
        cur[key] = value + amount
        return Decision(True, limit, limit - int(weighted) - amount, expiry - elapsed)

    def acquire(self, key: str, limit: int, now: float) -> Decision | None:
        """:meth:`hit` for one unit, allocation-free when allowed: ``None`` means the hit was
        counted; a refusal returns the same :class:`Decision` :meth:`hit` would.

        The runtime's layers call this on every request: they only need the details of a
        refusal (for ``Retry-After``), and skipping the allowed ``Decision`` saves a NamedTuple
        per check. Same algorithm as :meth:`hit` (tests hold the two to the same answers).
        """
        expiry = self.expiry
        elapsed = now - self._wstart
        if elapsed >= expiry:
            self._roll(now)
            elapsed = now - self._wstart
        elif elapsed < 0:
            elapsed = 0.0
        if self._dying:
            self._drain()
        cur = self._cur
        value = cur.get(key)
        if value is not None:
            # limit <= _MASK, so value < limit also means "no previous-window count": the
            # weighted count is the plain integer value.
            if value < limit:
                cur[key] = value + 1
                return None
            if value <= _MASK:
                retry = retry_in(0, value, limit, 1, elapsed, expiry)
                return Decision(False, limit, max(0, limit - value), retry)
            fresh = False
        else:
            fresh = True
            moved = self._prev.pop(key, None)
            value = (moved & _MASK) << _SHIFT if moved is not None else 0
            if len(cur) + len(self._prev) >= self.max_keys:
                self._evict()
        count = value & _MASK
        weighted = (value >> _SHIFT) * (1.0 - elapsed / expiry) + count
        # floor(weighted) + 1 <= limit  <=>  weighted < limit (integers)
        if weighted >= limit:
            if fresh and value:
                cur[key] = value
            retry = retry_in(value >> _SHIFT, count, limit, 1, elapsed, expiry)
            return Decision(False, limit, max(0, limit - int(weighted)), retry)
        cur[key] = value + 1
        return None

    def checker(self, limit: int, clock: Clock) -> Callable[[str], Decision | None]:
        """:meth:`acquire` for one ``limit`` on ``clock``'s time, as a one-argument function.

        Its common case (a key already counted in this window, under the limit, nothing to roll
        or drain) is inlined, so a check is one Python call; anything else goes to
        :meth:`acquire`, which gives the same answers.
        """
        acquire = self.acquire
        expiry = self.expiry

        def check(key: str) -> Decision | None:
            now = clock()
            if now - self._wstart < expiry and not self._dying:
                cur = self._cur
                value = cur.get(key)
                # value < limit <= _MASK: no previous-window count, room for one more.
                if value is not None and value < limit:
                    cur[key] = value + 1
                    return None
            return acquire(key, limit, now)

        return check

    def peek(self, key: str, now: float) -> tuple[int, int, float]:
        """``(previous_count, current_count, seconds_into_window)`` without counting."""
        elapsed = self.advance(now)
        value = self._cur.get(key)
        if value is None:
            moved = self._prev.get(key)
            return (moved & _MASK if moved is not None else 0), 0, elapsed
        return value >> _SHIFT, value & _MASK, elapsed

    def clear(self, key: str) -> None:
        """Forget ``key`` (its budget starts afresh)."""
        self._cur.pop(key, None)
        self._prev.pop(key, None)

    def reset(self) -> int:
        """Forget every key; returns how many live keys there were."""
        count = len(self)
        self._cur = {}
        self._prev = {}
        self._dying = []
        return count

    def sweep(self, budget: int) -> int:
        """Free up to ``budget`` expired entries now; returns how many were freed."""
        freed = 0
        dying = self._dying
        while dying and freed < budget:
            last = dying[-1]
            while last and freed < budget:
                last.popitem()
                freed += 1
            if not last:
                dying.pop()
        return freed

    def advance(self, now: float) -> float:
        """Roll the windows forward to ``now``; returns the seconds into the current window."""
        elapsed = now - self._wstart
        if elapsed >= self.expiry:
            self._roll(now)
            return now - self._wstart
        return max(0.0, elapsed)

    def _roll(self, now: float) -> None:
        expiry = self.expiry
        windows = int((now - self._wstart) // expiry)
        if windows == 1:
            if self._prev:
                self._dying.append(self._prev)
            self._prev = self._cur
        else:  # idle for two windows or more: nothing left to weigh
            for gen in (self._prev, self._cur):
                if gen:
                    self._dying.append(gen)
            self._prev = {}
        self._cur = {}
        self._wstart += windows * expiry

    def _drain(self) -> None:
        last = self._dying[-1]
        if len(last) <= DRAIN_PER_CALL:
            self._dying.pop()  # freeing a handful at once is as cheap as popping them
            return
        for _ in range(DRAIN_PER_CALL):
            last.popitem()

    def _evict(self) -> None:
        # Over max_keys (a spray of distinct keys, e.g. many IPv6 prefixes): drop a key that only
        # weighs in through the previous window first, else the most recently created key.
        # popitem() is O(1) and needs no ordering structure; established keys are kept, so the
        # flood churns through its own fresh keys rather than resetting known clients' budgets.
        if self._prev:
            self._prev.popitem()
        else:
            self._cur.popitem()


class MemoryStore(Storage, SlidingWindowCounterSupport):
    """A ``limits`` storage for the sliding-window-counter strategy, O(1) per call.

    Scheme ``quoroom+memory://``; usable with ``limits.strategies.SlidingWindowCounterRateLimiter``
    (it implements exactly what that strategy needs). The fixed-window and moving-window methods
    are not supported: fixed window lets ~2x through at a window edge and moving window is
    O(limit) per hit (limits#268).

    ``clock`` defaults to ``time.monotonic`` (immune to wall-clock steps); tests inject one.
    """

    STORAGE_SCHEME = ["quoroom+memory"]

    def __init__(
        self,
        uri: str | None = None,
        wrap_exceptions: bool = False,
        *,
        clock: Clock = time.monotonic,
        max_keys: int = DEFAULT_MAX_KEYS,
        **options: float | str | bool,
    ) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.clock = clock
        self.max_keys = max_keys
        self._tables: dict[object, WindowTable] = {}

    # -- direct API (the runtime's hot path) --------------------------------------------------

    def table(self, name: object, expiry: float) -> WindowTable:
        """The table for ``name`` (any hashable naming one policy), created on first use."""
        table = self._tables.get(name)
        if table is None:
            table = WindowTable(expiry, now=self.clock(), max_keys=self.max_keys)
            self._tables[name] = table
        elif table.expiry != expiry:
            raise ValueError(f"table {name!r} already has expiry {table.expiry}")
        return table

    def tables(self) -> list[WindowTable]:
        """Every table, e.g. to report sizes or to sweep."""
        return list(self._tables.values())

    def sweep(self, budget: int = 10_000) -> int:
        """Free up to ``budget`` expired entries across tables (tables also drain on each hit)."""
        now = self.clock()
        freed = 0
        for table in self._tables.values():
            table.advance(now)  # expired generations only move to "dying" when a window rolls
            freed += table.sweep(budget - freed)
        return freed

    # -- limits.storage.Storage ---------------------------------------------------------------

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ()  # nothing to translate: no I/O

    def _by_expiry(self, expiry: float) -> WindowTable:
        return self.table(("expiry", float(expiry)), expiry)

    def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        if amount > limit:
            return False
        return self._by_expiry(expiry).hit(key, limit, self.clock(), amount).allowed

    def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        prev, count, elapsed = self._by_expiry(expiry).peek(key, self.clock())
        left = expiry - elapsed
        return prev, (left if prev else 0.0), count, left + expiry

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        self._by_expiry(expiry).clear(key)

    def clear(self, key: str) -> None:
        for table in self._tables.values():
            table.clear(key)

    def check(self) -> bool:
        return True

    def reset(self) -> int | None:
        return sum(table.reset() for table in self._tables.values())

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        raise NotImplementedError("quoroom+memory:// supports the sliding-window-counter only")

    def get(self, key: str) -> int:
        raise NotImplementedError("quoroom+memory:// supports the sliding-window-counter only")

    def get_expiry(self, key: str) -> float:
        raise NotImplementedError("quoroom+memory:// supports the sliding-window-counter only")


def retry_in(
    prev: int, count: int, limit: int, amount: int, elapsed: float, expiry: float
) -> float:
    """Seconds until ``amount`` fits under ``limit`` again, if nothing else is counted meanwhile.

    The sliding-window-counter allows a hit when ``floor(prev * (1 - f)) + count + amount <=
    limit``, ``f`` being the fraction of the current window elapsed (``elapsed / expiry``).
    """
    room = limit - amount - count  # what the weighted previous count must fall to
    if room >= 0 and prev:
        # floor(prev * (1 - f)) <= room  <=  prev * (1 - f) < room + 1
        return max(0.0, (1.0 - (room + 1) / prev) * expiry - elapsed)
    wait = max(0.0, expiry - elapsed)  # this window's count only starts to decay when it ends
    room = limit - amount
    if room < 0:
        return float("inf")  # can never fit
    if count > room:  # next window: floor(count * (1 - f')) <= room
        wait += (1.0 - (room + 1) / count) * expiry
    return wait


def retry_after_seconds(reset_after: float) -> int:
    """``Retry-After`` value: whole seconds, at least 1 (RFC 9110 §10.2.3 takes integers)."""
    if reset_after == float("inf"):
        return 86_400
    return max(1, ceil(reset_after))
