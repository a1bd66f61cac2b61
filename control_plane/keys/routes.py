"""``GET /.well-known/jwks.json``: the prebuilt JWKS bytes, no database per request."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from control_plane.keys.service import KeyRing

router = APIRouter(tags=["keys"])


@router.get(
    "/.well-known/jwks.json",
    summary="Public signing keys (JWKS)",
    responses={200: {"content": {"application/jwk-set+json": {}}}},
)
async def jwks(request: Request) -> Response:
    ring: KeyRing = request.app.state.key_ring
    return Response(
        ring.jwks_bytes(),
        media_type="application/jwk-set+json",
        headers=request.app.state.jwks_headers,
    )
