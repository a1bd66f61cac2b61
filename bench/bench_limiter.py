"""Rate limiter micro-benchmark: µs per check and bytes per key at 1, 100k and 1M keys.

    python -m bench.bench_limiter      # prints a markdown table
    python -m bench limiter            # the driver writes the same rows into bench/RESULTS.md

Compared, in one run (bounded to well under two minutes on a 2-core box):

- ours: ``MemoryLimiter`` (room_cloud_runtime._memstore), awaited as the layers await it, at 1,
  100k and 1M keys; memory measured with tracemalloc *including* the key strings, in the worst
  steady state (every key carries a previous-window count, so every value is a heap int);
- limits' sync ``MemoryStorage`` + ``SlidingWindowCounterRateLimiter`` at 1, 10k and 100k keys (its
  expiry thread runs meanwhile, as in production; ``hit`` returns only a bool);
- limits' ``MemoryStorage`` on our storage interface: limits' own strategy over ``MemoryStore``;
- ``limits.aio`` ``MemoryStorage`` at 1, 1k and 10k keys, with the event loop running between hits
  (its expiry task then walks every key: PERF-NOTES.md);
- Redis through ``RedisLimiter`` (one Lua round trip per allowed check), if reachable;
- the two ASGI layers (address + principal) over a no-op app: what they add per request.

``run()`` returns the rows (dicts with the same keys) for the driver.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable
from functools import partial
from operator import getitem
from typing import Any

from limits import parse
from limits.aio.storage import MemoryStorage as AioMemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter as AioSlidingWindow
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from room_cloud_runtime._limiter import MemoryLimiter, build_limiter
from room_cloud_runtime._memstore import MemoryStore
from room_cloud_runtime._ratelimit import AddressRateLimit, PrincipalRateLimit
from room_cloud_runtime._scope import CLIENT_ADDRESS, PRINCIPAL, Principal

ITEM = parse("1000000/minute")  # high enough that every check is allowed and counted
PROBES = 200_000
REDIS_URL = os.environ.get("QUOROOM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")


def _address(i: int) -> str:
    return f"a:10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def _row(storage: str, keys: int, us: float, bytes_per_key: float | None, note: str) -> dict:
    return {
        "storage": storage,
        "keys": f"{keys:,}",
        "µs/check": f"{us:.2f}",
        "bytes/key": "n/a" if bytes_per_key is None else f"{bytes_per_key:.0f}",
        "note": note,
    }


def _best_of(repeats: int, fn: Callable[[], float]) -> float:
    return min(fn() for _ in range(repeats))


# -- ours ----------------------------------------------------------------------------------------


def _store_bytes(limiter: MemoryLimiter) -> int:
    """What the store holds, by ``sys.getsizeof``: dicts, key strings, heap ints (small ints are
    shared by the interpreter and cost nothing per key)."""
    total = 0
    for table in limiter.store.tables():
        for gen in (table._cur, table._prev, *table._dying):
            total += sys.getsizeof(gen)
            for key, value in gen.items():
                total += sys.getsizeof(key) + (sys.getsizeof(value) if value > 256 else 0)
    return total


def _ours(keys: int, *, traced: bool) -> dict:
    # A C-level clock (partial(getitem, box, 0)) that the bench can move: building the worst
    # steady state needs a second window, and a Python-level fake clock would inflate timings.
    box = [1_000_020.0]
    clock: Callable[[], float] = partial(getitem, box, 0)  # type: ignore[assignment]
    limiter = MemoryLimiter(clock=clock, max_keys=max(keys, 1))
    gc.collect()
    if traced:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
    names = [_address(i) for i in range(keys)]
    for name in names:
        limiter.hit_now(name, ITEM)
    box[0] += 60.0  # next window: every key now carries a previous count (a heap int)
    for name in names:
        limiter.hit_now(name, ITEM)
    if traced:
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        how = "tracemalloc"
    else:  # tracemalloc makes building 1M keys ~8x slower; same figure within a few % at 100k
        used = _store_bytes(limiter)
        how = "getsizeof"
    if keys >= 100_000:
        how += f" (getsizeof: {_store_bytes(limiter) / keys:.0f})" if traced else ""
    probe = [names[random.randrange(keys)] for _ in range(PROBES)]

    async def loop() -> float:
        hit = limiter.hit
        start = time.perf_counter()
        for name in probe:
            await hit(name, ITEM)
        return (time.perf_counter() - start) / len(probe) * 1e6

    us = _best_of(3, lambda: asyncio.run(loop()))
    return _row(
        "ours: MemoryLimiter (memory://)",
        keys,
        us,
        used / keys,
        f"awaited, full Decision; bytes by {how}, keys included",
    )


def _limits_strategy_on_our_store(keys: int) -> dict:
    store = MemoryStore(max_keys=max(keys, 1))
    strategy = SlidingWindowCounterRateLimiter(store)
    names = [_address(i) for i in range(keys)]
    for name in names:
        strategy.hit(ITEM, name)
    probe = [names[random.randrange(keys)] for _ in range(PROBES // 4)]

    def loop() -> float:
        start = time.perf_counter()
        for name in probe:
            strategy.hit(ITEM, name)
        return (time.perf_counter() - start) / len(probe) * 1e6

    us = _best_of(3, loop)
    return _row(
        "limits strategy on our MemoryStore", keys, us, None, "sync; bool only (key_for per hit)"
    )


# -- limits' own memory storages -----------------------------------------------------------------


def _limits_sync(keys: int) -> dict:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    storage = MemoryStorage()
    strategy = SlidingWindowCounterRateLimiter(storage)
    names = [_address(i) for i in range(keys)]
    for name in names:
        strategy.hit(ITEM, name)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    probe = [names[random.randrange(keys)] for _ in range(PROBES // 10)]

    def loop() -> float:
        start = time.perf_counter()
        for name in probe:
            strategy.hit(ITEM, name)
        return (time.perf_counter() - start) / len(probe) * 1e6

    us = _best_of(3, loop)
    storage.timer.cancel()
    return _row(
        "limits MemoryStorage (sync)",
        keys,
        us,
        used / keys,
        "expiry thread scans all keys every 10 ms; bool only",
    )


def _limits_aio(keys: int) -> dict:
    async def main() -> tuple[float, float]:
        storage = AioMemoryStorage()
        strategy = AioSlidingWindow(storage)
        names = [_address(i) for i in range(keys)]
        for name in names:
            await strategy.hit(ITEM, name)
        probes = max(200, min(20_000, 2_000_000 // max(keys, 1)))
        probe = [names[random.randrange(keys)] for _ in range(probes)]
        sleep = asyncio.sleep
        start = time.perf_counter()
        for _ in probe:
            await sleep(0)
        idle = time.perf_counter() - start
        start = time.perf_counter()
        for name in probe:
            await strategy.hit(ITEM, name)
            await sleep(0)  # the event loop runs between requests, so does the expiry task
        took = time.perf_counter() - start - idle
        if storage.timer is not None:
            storage.timer.cancel()
        return took / len(probe) * 1e6, 0.0

    us, _ = asyncio.run(main())
    return _row(
        "limits.aio MemoryStorage", keys, us, None, "loop runs between hits; expiry walks all keys"
    )


# -- Redis --------------------------------------------------------------------------------------


def _redis(keys: int) -> dict | None:
    async def main() -> dict | None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5, socket_timeout=1)
        try:
            await client.ping()
        except Exception:  # any failure means "not reachable": skip the Redis rows
            await client.aclose()
            return None
        prefix = f"bench-{uuid.uuid4().hex}"
        limiter = build_limiter(REDIS_URL, key_prefix=prefix, on_storage_error="closed")
        before = int((await client.info("memory"))["used_memory"])
        names = [_address(i) for i in range(keys)]
        for name in names:
            await limiter.hit(name, ITEM)
        after = int((await client.info("memory"))["used_memory"])
        probe = [names[random.randrange(keys)] for _ in range(2_000)]
        start = time.perf_counter()
        for name in probe:
            await limiter.hit(name, ITEM)
        us = (time.perf_counter() - start) / len(probe) * 1e6
        await limiter.aclose()
        stale = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for i in range(0, len(stale), 1000):
            await client.delete(*stale[i : i + 1000])
        await client.aclose()
        return _row(
            "RedisLimiter (redis://, loopback)",
            keys,
            us,
            max(0, after - before) / keys if keys >= 1_000 else None,  # 1 key: noise
            "one Lua round trip per allowed check; bytes = Redis used_memory",
        )

    return asyncio.run(main())


# -- the layers ---------------------------------------------------------------------------------


async def _receive() -> dict:
    return {"type": "http.request", "body": b""}


async def _send(message: Any) -> None:
    return None


def _layers(keys: int) -> dict:
    async def noop(scope: Any, receive: Any, send: Any) -> None:
        return None

    limiter = MemoryLimiter()
    stack = AddressRateLimit(
        PrincipalRateLimit(noop, limiter=limiter, read_limit=ITEM, write_limit=ITEM),
        limiter=limiter,
        limit=ITEM,
    )
    principal = Principal("user", "member", "inst", "sid", "jti", time.time() + 600)
    scopes = [
        {
            "type": "http",
            "method": "GET",
            "path": "/api/rooms",
            "client": ("10.0.0.1", 1),
            "state": {CLIENT_ADDRESS: _address(i)[2:], PRINCIPAL: principal},
        }
        for i in range(keys)
    ]
    probe = [scopes[random.randrange(keys)] for _ in range(PROBES // 2)]

    async def loop(app: Any) -> float:
        start = time.perf_counter()
        for scope in probe:
            await app(scope, _receive, _send)
        return (time.perf_counter() - start) / len(probe) * 1e6

    async def main() -> float:
        for scope in scopes:
            await stack(scope, _receive, _send)
        bare = min([await loop(noop) for _ in range(3)])
        layered = min([await loop(stack) for _ in range(3)])
        return layered - bare

    added = asyncio.run(main())
    return _row(
        "layers: AddressRateLimit + PrincipalRateLimit",
        keys,
        added,
        None,
        "µs added per request over a no-op app (2 checks)",
    )


def run() -> list[dict]:
    """Run every measurement; returns rows with the keys storage, keys, µs/check, bytes/key,
    note."""
    random.seed(7)
    rows: list[dict] = []
    for keys in (1, 100_000):
        rows.append(_ours(keys, traced=True))
        gc.collect()
    rows.append(_ours(1_000_000, traced=False))
    gc.collect()
    for keys in (1, 100_000):
        rows.append(_limits_strategy_on_our_store(keys))
    for keys in (1, 10_000, 100_000):
        rows.append(_limits_sync(keys))
        gc.collect()
    for keys in (1, 1_000, 10_000):
        rows.append(_limits_aio(keys))
    for keys in (1, 10_000):
        row = _redis(keys)
        if row is not None:
            rows.append(row)
    for keys in (1, 100_000):
        rows.append(_layers(keys))
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    started = time.perf_counter()
    print(markdown(run()))
    print(f"\n(run took {time.perf_counter() - started:.0f} s)")
