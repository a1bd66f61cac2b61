"""Serve the JWKS in pure ASGI, ahead of FastAPI's routing.

Every hosted Room (and the JWKS caches behind them) fetches ``/.well-known/jwks.json``; through
FastAPI's router and dependency machinery one answer costs ~60 µs, which caps a process near
4k requests/s (bench/bench_control_plane.py). The key ring already holds the JWKS as prebuilt
bytes, so this layer answers GET/HEAD from them directly. The FastAPI route in ``routes.py``
stays for the OpenAPI description and is what answers when the ring is not up yet.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from control_plane.keys.service import KeyRing
from control_plane.services import Services

JWKS_PATH = "/.well-known/jwks.json"


class JWKSFastPath:
    def __init__(self, app: ASGIApp, *, path: str = JWKS_PATH) -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != self.path
            or scope["method"] not in ("GET", "HEAD")
        ):
            await self.app(scope, receive, send)
            return
        services = getattr(scope["app"].state, "services", None)
        if not isinstance(services, Services):  # lifespan not run (or failed): the route answers
            await self.app(scope, receive, send)
            return
        ring = services.get(KeyRing)
        body = ring.jwks_bytes()
        headers = [
            (b"content-type", b"application/jwk-set+json"),
            (b"content-length", str(len(body)).encode()),
            *((k.lower().encode(), v.encode()) for k, v in ring.jwks_headers.items()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )
