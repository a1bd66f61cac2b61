"""The apps the benchmarks compare: the bare reference Room and the same Room inside the stack.

The stack's JWKS cache is handed the bench key through an in-process httpx transport, so the
benchmark measures the stack, not a JWKS server. Rate limits are set far above the load so
every request still pays for both limiter checks but none is refused.
"""

from __future__ import annotations

import json

import httpx
from starlette.applications import Starlette

from room_cloud_runtime import reference
from room_cloud_runtime._jwks import JWKSCache
from room_cloud_runtime._settings import RuntimeSettings
from room_cloud_runtime._stack import RuntimeStack

from ._keys import INSTANCE_ID, ISSUER

LOCAL_TOKEN = "bench-local-token"
ORIGIN = "https://app.bench.example"


def bench_settings(**overrides: object) -> RuntimeSettings:
    values: dict[str, object] = {
        "mode": "cloud",
        "instance_id": INSTANCE_ID,
        "issuer": ISSUER,
        "allowed_origins": (ORIGIN,),
        "address_limit": "1000000000/minute",
        "read_limit": "1000000000/minute",
        "write_limit": "1000000000/minute",
        # Both sides run without an access log (uvicorn's costs 24 %, PERF-NOTES.md).
        "access_log": False,
    }
    values.update(overrides)
    return RuntimeSettings(**values)  # type: ignore[arg-type]


def bare_app():  # type: ignore[no-untyped-def]
    return reference.create_room_app(local_token=LOCAL_TOKEN)


def stack_app(jwks: dict, settings: RuntimeSettings | None = None) -> RuntimeStack:
    settings = settings or bench_settings()
    body = json.dumps(jwks).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            content=body,
            headers={"content-type": "application/json", "cache-control": "max-age=3600"},
        )

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    cache = JWKSCache(settings.resolved_jwks_url, algorithms=settings.algorithms, client=client)
    return RuntimeStack(reference.create_room_app(), settings, jwks=cache)


def peer_app(jwks_url: str, settings: RuntimeSettings | None = None) -> Starlette:
    """The same Room hardened the common way (bench/peer.py), with the same budgets."""
    from .peer import peer_app as build

    return build(jwks_url, settings or bench_settings())
