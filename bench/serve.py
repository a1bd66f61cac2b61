"""Serve one benchmark app with uvicorn (a subprocess of the bench, pinned to its own core).

python -m bench.serve {bare|stack} --port P    (the JWKS comes in $BENCH_JWKS)
python -m bench.serve peer --port P    (PyJWKClient fetches $BENCH_JWKS_URL)
$BENCH_SETTINGS (JSON, optional): overrides of apps.bench_settings for stack and peer
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import uvicorn

from . import apps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["bare", "stack", "peer"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.getLogger("room_cloud_runtime").setLevel(logging.WARNING)
    settings = apps.bench_settings(**json.loads(os.environ.get("BENCH_SETTINGS") or "{}"))
    if args.kind == "bare":
        app = apps.bare_app()
    elif args.kind == "peer":
        app = apps.peer_app(os.environ["BENCH_JWKS_URL"], settings)
    else:
        app = apps.stack_app(json.loads(os.environ["BENCH_JWKS"]), settings)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        lifespan="on",
        access_log=False,
        log_level="warning",
        loop="uvloop",
        http="httptools",
    )


if __name__ == "__main__":
    main()
