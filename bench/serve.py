"""Serve one benchmark app (a subprocess of the bench, pinned to its own core).

python -m bench.serve {bare|stack} --port P [--server S]    (the JWKS comes in $BENCH_JWKS)
python -m bench.serve peer --port P    (PyJWKClient fetches $BENCH_JWKS_URL)
$BENCH_SETTINGS (JSON, optional): overrides of apps.bench_settings for stack and peer

--server (bench/bench_server.py compares them; bench_stack measures the shipped one):
  shipped    what `quoroom-runtime serve` runs: granian through the runtime's serve_granian
             (1 worker, uvloop, HTTP/1, head deadline and buffer bound, backpressure at the
             connection cap), the app inside DrainUnreadBody (room_cloud_runtime/_server.py)
  gateway    what `quoroom-runtime gateway` runs: uvicorn with the runtime's guarded httptools
             protocol and connection cap (room_cloud_runtime.cli.server_options)
  uvicorn    uvicorn, httptools + uvloop, its defaults
  h11        uvicorn with h11, its incomplete-event bound at the stack's header budget
  hypercorn  hypercorn (h11) on uvloop, its incomplete-size bound at the same budget
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

import uvicorn

from . import apps

SERVERS = ("shipped", "gateway", "uvicorn", "h11", "hypercorn")


def _settings() -> Any:
    return apps.bench_settings(**json.loads(os.environ.get("BENCH_SETTINGS") or "{}"))


def build_app(kind: str) -> Any:
    logging.getLogger("room_cloud_runtime").setLevel(logging.WARNING)
    if kind == "bare":
        return apps.bare_app()
    if kind == "peer":
        # The common way takes the client's address from X-Forwarded-For set by a trusted proxy
        # (the load bench's locust users each send their own): uvicorn's middleware for it, which
        # uvicorn itself applies and granian has no equivalent of.
        from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

        peer = apps.peer_app(os.environ["BENCH_JWKS_URL"], _settings())
        return ProxyHeadersMiddleware(peer, trusted_hosts="127.0.0.1")
    return apps.stack_app(json.loads(os.environ["BENCH_JWKS"]), _settings())


def granian_app() -> Any:
    """Granian imports its app by name in the worker process: the kind travels in the env.
    Wrapped as ``quoroom-runtime serve`` wraps what it serves (``cli.served_app``)."""
    from room_cloud_runtime._server import DrainUnreadBody, settle_heap

    app = DrainUnreadBody(build_app(os.environ["BENCH_KIND"]), _settings().head_timeout_seconds)
    # `serve` freezes its worker's heap once the stack has started (RuntimeStack.settle_heap);
    # here every kind's heap is frozen once its app is built, just before granian serves it
    # (no kind allocates much at start-up), so the ratios measure the stacks, not the collector.
    settle_heap()
    return app


def _uvicorn(app: Any, port: int, **options: Any) -> None:
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "lifespan": "on",
        "access_log": False,
        "log_level": "warning",
        "loop": "uvloop",
        "http": "httptools",
    }
    uvicorn.run(app, **{**base, **options})


def _hypercorn(app: Any, port: int) -> None:
    import uvloop
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    settings = _settings()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.h11_max_incomplete_size = settings.max_header_bytes
    config.read_timeout = int(settings.head_timeout_seconds)
    config.accesslog = None
    config.errorlog = None
    uvloop.run(serve(app, config))


def _granian(kind: str, port: int) -> None:
    from room_cloud_runtime._server import serve_granian

    settings = _settings()
    os.environ["BENCH_KIND"] = kind
    serve_granian(
        "bench.serve:granian_app",
        app_spec=None,
        host="127.0.0.1",
        port=port,
        max_head_bytes=settings.max_header_bytes,
        head_timeout=settings.head_timeout_seconds,
        max_connections=settings.max_connections,
        log_level="warning",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["bare", "stack", "peer"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--server", choices=SERVERS, default=os.environ.get("BENCH_SERVER") or "shipped"
    )
    args = parser.parse_args()
    if args.server == "shipped":
        _granian(args.kind, args.port)
        return
    app = build_app(args.kind)
    if args.server == "hypercorn":
        _hypercorn(app, args.port)
    elif args.server == "gateway":
        from room_cloud_runtime.cli import server_options

        options = server_options(_settings())
        options.update(access_log=False, log_level="warning", loop="uvloop")
        _uvicorn(app, args.port, **options)
    elif args.server == "h11":
        _uvicorn(
            app, args.port, http="h11", h11_max_incomplete_event_size=_settings().max_header_bytes
        )
    else:
        _uvicorn(app, args.port)


if __name__ == "__main__":
    main()
