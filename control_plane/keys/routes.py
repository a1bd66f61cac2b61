"""``GET /.well-known/jwks.json``: the prebuilt JWKS bytes, no database per request."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from control_plane.keys.service import KeyRing
from control_plane.services import services_of

router = APIRouter(tags=["keys"])


@router.get(
    "/.well-known/jwks.json",
    summary="Public signing keys (JWKS)",
    responses={200: {"content": {"application/jwk-set+json": {}}}},
)
async def jwks(request: Request) -> Response:
    ring = services_of(request).get(KeyRing)
    return Response(
        ring.jwks_bytes(), media_type="application/jwk-set+json", headers=ring.jwks_headers
    )
