"""Control-plane metrics (issue 14, item 1): Prometheus counters, histograms and gauges built with
``prometheus-client`` in a registry each app owns, so two apps in one process (the test suite)
never share counts and nothing lands in the library's global registry.

Where each metric is recorded:

- HTTP: :class:`HttpMetrics`, an outer ASGI middleware, by route *template* (Starlette's matched
  route; ``unmatched`` when none) and status: label values stay bounded whatever paths come in;
- auth events: the login route (``login_ok``) and the error handlers (``login_failed``,
  ``throttled``, ``refresh_reuse``), see :data:`AUTH_EVENTS_BY_CODE`; refusals by stable code;
- runtime tokens: the grant and refresh routes;
- provider calls: :func:`metered_provider` wraps the worker's provider (latency and errors by
  step); provisioning outcomes and reconciler actions: the worker;
- Stripe webhooks: the webhook route (lag = processing time - the event's ``created``);
- instances by status, worker queue depth, oldest due item and oldest lease: read from the
  database at scrape time (:class:`_DatabaseCollector`).

Why at scrape time and not a gauge kept up to date: every transition happens in SQL from any of
several processes (API, workers, the reconciler), so a per-process gauge would count only its own
moves and drift; one ``GROUP BY`` per scrape is exact, cheap (an indexed table of instances), and
costs nothing when nobody scrapes.

Exposure: :func:`start_listener` serves the registry on ``127.0.0.1:QUOROOM_CP_METRICS_PORT``
(prometheus-client's own WSGI server in a thread), never on the public port. Each process
(``serve``, ``worker``, ``dev``) has its own registry and listener: one scrape target per process,
no multiprocess mode.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control_plane.settings import SettingsError

__all__ = [
    "AUTH_EVENTS_BY_CODE",
    "FleetGauges",
    "HttpMetrics",
    "Metrics",
    "MetricsListener",
    "metered_provider",
    "metrics_of",
    "start_listener",
]

logger = logging.getLogger(__name__)

P = TypeVar("P")

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Seconds; requests are mostly sub-millisecond to tens of ms, password hashes ~0.1-0.5 s.
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Provider steps range from ~10 ms API calls to minutes (waiting for a machine to be healthy).
_PROVIDER_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Stripe retries for days; a healthy endpoint sees events within seconds.
_LAG_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)

#: Error code (control_plane/errors.py's table) → auth event, recorded by the error handler.
AUTH_EVENTS_BY_CODE: Mapping[str, str] = {
    "invalid_credentials": "login_failed",
    "throttled": "throttled",
    "refresh_token_reused": "refresh_reuse",
}

#: Provider method → the step label (the Provider protocol, control_plane/provisioning/provider).
PROVIDER_STEPS: Mapping[str, str] = {
    "ensure_app": "app",
    "set_secrets": "secrets",
    "ensure_volume": "volume",
    "find_machine": "find_machine",
    "ensure_machine": "machine",
    "wait_healthy": "healthy",
    "machine": "get_machine",
    "stop": "stop",
    "start": "start",
    "snapshot_volume": "snapshot",
    "destroy": "destroy",
    "list_owned": "list_owned",
}


@dataclass(frozen=True, slots=True)
class FleetGauges:
    """What the database says at scrape time (read by the provisioning side)."""

    instances_by_status: Mapping[str, int] = field(default_factory=dict)
    queue_depth: int = 0
    oldest_due_seconds: float = 0.0
    leases_held: int = 0
    oldest_lease_age_seconds: float = 0.0


FleetQuery = Callable[[], Coroutine[Any, Any, FleetGauges]]


class Metrics:
    """Every control-plane metric, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "quoroom_cp_http_requests",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "quoroom_cp_http_request_duration_seconds",
            "HTTP request latency by method and route template",
            ["method", "route"],
            buckets=_HTTP_BUCKETS,
            registry=r,
        )
        self.refusals = Counter(
            "quoroom_cp_refusals",
            "Refusals by stable error code ({error, code} answers)",
            ["code"],
            registry=r,
        )
        self.auth_events = Counter(
            "quoroom_cp_auth_events",
            "Auth events: login_ok, login_failed, throttled, refresh_reuse",
            ["event"],
            registry=r,
        )
        self.runtime_tokens = Counter(
            "quoroom_cp_runtime_tokens_issued",
            "Runtime tokens issued: grant (runtime-token) or refresh (refresh-token)",
            ["kind"],
            registry=r,
        )
        self.provider_duration = Histogram(
            "quoroom_cp_provider_call_duration_seconds",
            "Provider call latency by step and outcome (ok or error)",
            ["step", "outcome"],
            buckets=_PROVIDER_BUCKETS,
            registry=r,
        )
        self.provider_errors = Counter(
            "quoroom_cp_provider_errors",
            "Provider call errors by step and whether they are retryable",
            ["step", "retryable"],
            registry=r,
        )
        self.provisioning = Counter(
            "quoroom_cp_provisioning_finished",
            "Provisioning runs that ended, by outcome (running or failed)",
            ["outcome"],
            registry=r,
        )
        self.worker_retries = Counter(
            "quoroom_cp_worker_retries",
            "Failed worker attempts scheduled for a retry, by instance status",
            ["status"],
            registry=r,
        )
        self.reconciler_actions = Counter(
            "quoroom_cp_reconciler_actions",
            "Reconciler actions: redriven, abandoned, orphans_destroyed, reprovisioned, "
            "restarted, errors",
            ["action"],
            registry=r,
        )
        self.reconciler_passes = Counter(
            "quoroom_cp_reconciler_passes",
            "Reconciler passes by outcome (ok or error)",
            ["outcome"],
            registry=r,
        )
        self.reconciler_last_pass = Gauge(
            "quoroom_cp_reconciler_last_pass_timestamp_seconds",
            "Unix time the last reconciler pass finished (0: none yet in this process)",
            registry=r,
        )
        self.webhooks = Counter(
            "quoroom_cp_stripe_webhooks",
            "Stripe webhook deliveries by outcome (applied, duplicate, invalid_signature, "
            "invalid_payload, failed)",
            ["outcome"],
            registry=r,
        )
        self.webhook_lag = Histogram(
            "quoroom_cp_stripe_webhook_lag_seconds",
            "Time from a Stripe event's creation to its processing here",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self._database = _DatabaseCollector()
        r.register(self._database)

    # -- recording --------------------------------------------------------------------------------

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in _METHODS else "other"
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_duration.labels(method, route).observe(seconds)

    def refused(self, code: str) -> None:
        self.refusals.labels(code).inc()
        event = AUTH_EVENTS_BY_CODE.get(code)
        if event is not None:
            self.auth_events.labels(event).inc()

    def auth_event(self, event: str) -> None:
        self.auth_events.labels(event).inc()

    def runtime_token(self, kind: str) -> None:
        self.runtime_tokens.labels(kind).inc()

    def webhook(self, outcome: str, lag_seconds: float | None = None) -> None:
        self.webhooks.labels(outcome).inc()
        if lag_seconds is not None:
            self.webhook_lag.observe(max(0.0, lag_seconds))

    def reconciled(self, actions: Mapping[str, int] | None) -> None:
        """One reconciler pass: its action counts, or ``None`` when the pass failed."""
        if actions is None:
            self.reconciler_passes.labels("error").inc()
            return
        for action, count in actions.items():
            if count:
                self.reconciler_actions.labels(action).inc(count)
        self.reconciler_passes.labels("ok").inc()
        self.reconciler_last_pass.set(time.time())

    # -- scrape-time database gauges ---------------------------------------------------------------

    def watch_database(self, query: FleetQuery, loop: asyncio.AbstractEventLoop) -> None:
        """Read :class:`FleetGauges` with ``query`` (a coroutine run on ``loop``) at each scrape."""
        self._database.attach(query, loop)


class _DatabaseCollector(Collector):
    """Runs the fleet query on the app's event loop from the scrape thread, at scrape time."""

    timeout = 5.0

    def __init__(self) -> None:
        self._query: FleetQuery | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, query: FleetQuery, loop: asyncio.AbstractEventLoop) -> None:
        self._query, self._loop = query, loop

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return self._families(None)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        gauges: FleetGauges | None = None
        if self._query is not None and self._loop is not None and not self._on_loop():
            future = asyncio.run_coroutine_threadsafe(self._query(), self._loop)
            try:
                gauges = future.result(self.timeout)
            except Exception as exc:  # the database is down: say so, keep serving the rest
                future.cancel()
                logger.warning("metrics: reading the fleet gauges failed (%s)", type(exc).__name__)
        return self._families(gauges)

    def _on_loop(self) -> bool:
        # Blocking on the loop from its own thread would deadlock; serve without the gauges.
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _families(self, g: FleetGauges | None) -> list[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "quoroom_cp_database_scrape_ok",
            "1 if the fleet gauges below were read from the database at this scrape",
            value=0 if g is None else 1,
        )
        if g is None:
            return [up]
        by_status = GaugeMetricFamily(
            "quoroom_cp_instances", "Instances by status (from the database)", labels=["status"]
        )
        for status, count in sorted(g.instances_by_status.items()):
            by_status.add_metric([status], count)
        return [
            up,
            by_status,
            GaugeMetricFamily(
                "quoroom_cp_worker_queue_depth",
                "Instances due for the worker now and not leased",
                value=g.queue_depth,
            ),
            GaugeMetricFamily(
                "quoroom_cp_worker_queue_oldest_due_seconds",
                "How long the most overdue unleased instance has waited (0: none)",
                value=g.oldest_due_seconds,
            ),
            GaugeMetricFamily(
                "quoroom_cp_worker_leases",
                "Instances a worker holds a lease on (expired leases included)",
                value=g.leases_held,
            ),
            GaugeMetricFamily(
                "quoroom_cp_worker_lease_oldest_age_seconds",
                "Time since the least recently renewed lease was taken or renewed (0: none)",
                value=g.oldest_lease_age_seconds,
            ),
        ]


def metrics_of(conn: HTTPConnection) -> Metrics:
    """The app's metrics (``create_app`` sets ``app.state.metrics`` before any request)."""
    metrics = getattr(conn.app.state, "metrics", None)
    if not isinstance(metrics, Metrics):  # pragma: no cover - an app built without create_app
        raise RuntimeError("app.state.metrics is not set: build the app with create_app()")
    return metrics


# -- HTTP ------------------------------------------------------------------------------------------


class HttpMetrics:
    """Pure ASGI: count and time every HTTP request by route template and status."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, known_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.metrics = metrics
        #: Paths answered ahead of the router (the JWKS fast path) keep their own label.
        self.known_paths = frozenset(known_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.request(
                scope["method"], self._route(scope), status, time.perf_counter() - started
            )

    def _route(self, scope: Scope) -> str:
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        return scope["path"] if scope["path"] in self.known_paths else "unmatched"


# -- provider --------------------------------------------------------------------------------------


class _Metered:
    """Forwards to a provider; its :data:`PROVIDER_STEPS` methods are timed and their errors
    counted (``retryable`` read from the provider's error when it says)."""

    def __init__(self, inner: object, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        step = PROVIDER_STEPS.get(name)
        if step is None or not callable(attr):
            return attr
        metrics = self._metrics

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                result = await attr(*args, **kwargs)
            except BaseException as exc:
                metrics.provider_duration.labels(step, "error").observe(
                    time.perf_counter() - started
                )
                if isinstance(exc, Exception):
                    retryable = getattr(exc, "retryable", None)
                    label = "unknown" if retryable is None else str(bool(retryable)).lower()
                    metrics.provider_errors.labels(step, label).inc()
                raise
            metrics.provider_duration.labels(step, "ok").observe(time.perf_counter() - started)
            return result

        return timed


def metered_provider(provider: P, metrics: Metrics | None) -> P:
    """``provider`` with its calls measured (unchanged when ``metrics`` is None)."""
    if metrics is None:
        return provider
    return cast(P, _Metered(provider, metrics))


# -- listener --------------------------------------------------------------------------------------


class _Server(Protocol):
    def shutdown(self) -> None: ...

    def server_close(self) -> None: ...


@dataclass
class MetricsListener:
    """The loopback scrape endpoint (prometheus-client's WSGI server in a daemon thread)."""

    server: _Server
    port: int

    def close(self) -> None:
        self.server.shutdown()  # waits for the serving loop's next poll (≤ 0.5 s)
        self.server.server_close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)


def start_listener(
    metrics: Metrics, port: int, fleet: FleetQuery, *, host: str = "127.0.0.1"
) -> MetricsListener:
    """Serve ``metrics`` on ``host:port`` (loopback), with ``fleet`` read at each scrape on the
    running event loop. A port that cannot be bound is a start-up error naming the setting."""
    metrics.watch_database(fleet, asyncio.get_running_loop())
    try:
        server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise SettingsError(
            "QUOROOM_CP_METRICS_PORT", f"cannot listen on {host}:{port} ({exc.strerror})"
        ) from exc
    wsgi: WSGIServer = server
    listener = MetricsListener(server, int(wsgi.server_address[1]))
    logger.info("metrics on http://%s:%d/metrics", host, listener.port)
    return listener
