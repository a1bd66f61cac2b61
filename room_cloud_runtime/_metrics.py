"""The runtime's Prometheus metrics (issue 14, item 1, runtime half), on their own port.

What a scrape reads:

- ``quoroom_runtime_up``: 1 while the Room answers (gateway: the upstream Room's probe or
  supervisor; serve: the Room app is in this process, so 1 while the runtime serves);
- ``quoroom_runtime_jwks_age_seconds``: since the last good JWKS fetch (since start while none
  has succeeded, so a Room that never got keys pages like one whose keys went stale);
  ``quoroom_runtime_jwks_keys`` and ``quoroom_runtime_jwks_stale``;
- ``quoroom_runtime_requests_total{kind, code}`` and ``quoroom_runtime_request_duration_seconds``
  (HTTP only: a WebSocket's "duration" is its session);
- ``quoroom_runtime_info{mode, instance}`` and prometheus-client's process metrics.

Why not prometheus-client's ``Counter``/``Histogram`` on the request path: each ``inc`` or
``observe`` takes a lock and a labels lookup (~1-2 µs), and the stack's whole budget per request
is a few µs (bench/RESULTS.md). Here a request adds to a dict and a list from the one event-loop
thread (:meth:`RequestCounts.observe`, ~0.3 µs); a custom collector turns them into families when
Prometheus scrapes, on the listener's thread (the GIL makes the reads consistent enough: a scrape
may miss the request being counted, never a finished one).

The listener is prometheus-client's own WSGI server in a daemon thread, started with the stack
(inside granian's worker process, where the counts live), never on the public port:
``QUOROOM_METRICS_PORT`` (off when unset) on ``QUOROOM_METRICS_HOST`` (``127.0.0.1``; the Fly
image binds ``::`` so Fly's scraper reaches it over the private network — ``[metrics]`` in
fly_image/fly.toml).
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._errors import ConfigError

logger = logging.getLogger("room_cloud_runtime.metrics")

#: Seconds. The stack answers in tens of µs; a Room's own answers take ms to seconds.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RequestCounts:
    """Requests by kind and status, and HTTP durations, kept as plain numbers."""

    def __init__(self) -> None:
        self.by_status: dict[tuple[str, int], int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.duration_sum = 0.0

    def observe(self, kind: str, status: int, seconds: float) -> None:
        key = (kind, status)
        self.by_status[key] = self.by_status.get(key, 0) + 1
        if kind == "http":
            self.buckets[bisect_left(BUCKETS, seconds)] += 1
            self.duration_sum += seconds


class JwksLike(Protocol):
    def status(self) -> dict[str, Any]: ...


class _RuntimeCollector(Collector):
    def __init__(
        self,
        counts: RequestCounts,
        *,
        mode: str,
        instance: str,
        jwks: JwksLike | None,
        room_up: Callable[[], bool],
        started: float,
        clock: Callable[[], float],
    ) -> None:
        self.counts = counts
        self.mode = mode
        self.instance = instance
        self.jwks = jwks
        self.room_up = room_up
        self.started = started
        self.clock = clock

    def collect(self) -> Iterable[Metric]:
        # ``instance_id``, not ``instance``: Prometheus gives every target an ``instance`` label.
        labels, room = ["instance_id"], [self.instance]
        info = GaugeMetricFamily(
            "quoroom_runtime_info", "The runtime's mode.", labels=["instance_id", "mode"]
        )
        info.add_metric([self.instance, self.mode], 1)
        yield info
        yield _gauge(
            "quoroom_runtime_up", "1 while the Room answers.", labels, room, self.room_up()
        )
        if self.jwks is not None:
            status = self.jwks.status()
            age = status.get("lastRefreshAgeSeconds")
            if age is None:
                age = self.clock() - self.started
            yield _gauge(
                "quoroom_runtime_jwks_age_seconds",
                "Seconds since the last good JWKS fetch (since start while none succeeded).",
                labels,
                room,
                age,
            )
            yield _gauge(
                "quoroom_runtime_jwks_keys", "Signing keys held.", labels, room, status["keyCount"]
            )
            yield _gauge(
                "quoroom_runtime_jwks_stale",
                "1 when the keys are past QUOROOM_JWKS_MAX_STALENESS_SECONDS (auth answers 503).",
                labels,
                room,
                bool(status.get("stale")),
            )
        requests = CounterMetricFamily(
            "quoroom_runtime_requests",
            "Requests answered, by kind (http, ws) and status (101: a WebSocket accepted).",
            labels=["kind", "code"],
        )
        for (kind, status_code), count in sorted(self.counts.by_status.copy().items()):
            requests.add_metric([kind, str(status_code)], count)
        yield requests
        cumulative, running = [], 0
        for bound, count in zip((*BUCKETS, float("inf")), list(self.counts.buckets), strict=True):
            running += count
            cumulative.append((_bound(bound), running))
        duration = HistogramMetricFamily(
            "quoroom_runtime_request_duration_seconds",
            "HTTP requests, from the first byte of the request to the end of the answer.",
        )
        duration.add_metric([], cumulative, sum_value=self.counts.duration_sum)
        yield duration


def _gauge(name: str, doc: str, labels: list[str], values: list[str], value: float) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    family.add_metric(values, float(value))
    return family


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


class MetricsListener:
    """The scrape endpoint: a registry holding the runtime's collector and the process's."""

    def __init__(self, collector: Collector, *, host: str, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self.registry.register(ProcessCollector(registry=None))
        self.host = host
        self.port = port
        self._server: Any = None

    def start(self) -> None:
        try:
            self._server, _thread = start_http_server(
                self.port, addr=self.host, registry=self.registry
            )
        except OSError as exc:
            raise ConfigError(
                "QUOROOM_METRICS_PORT", f"cannot listen on {self.host}:{self.port} ({exc.strerror})"
            ) from exc
        self.port = int(self._server.server_address[1])
        logger.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            # shutdown() waits for the serving loop's next poll (≤ 0.5 s): off the event loop.
            await asyncio.to_thread(_stop, server)


def _stop(server: Any) -> None:
    server.shutdown()
    server.server_close()


def runtime_listener(
    counts: RequestCounts,
    *,
    host: str,
    port: int,
    mode: str,
    instance: str,
    jwks: JwksLike | None,
    room_up: Callable[[], bool],
    clock: Callable[[], float] = time.monotonic,
) -> MetricsListener:
    collector = _RuntimeCollector(
        counts,
        mode=mode,
        instance=instance,
        jwks=jwks,
        room_up=room_up,
        started=clock(),
        clock=clock,
    )
    return MetricsListener(collector, host=host, port=port)
