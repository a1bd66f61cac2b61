"""The JWKS is answered in pure ASGI from the key ring's bytes, with the same headers."""

from __future__ import annotations

from control_plane.keys.service import KeyRing
from tests.control_plane.conftest import Harness


async def test_the_jwks_fast_path_serves_the_ring_bytes_with_cache_and_security_headers(
    harness: Harness,
):
    r = await harness.client.get("/.well-known/jwks.json")
    assert r.status_code == 200
    assert r.content == harness.services.get(KeyRing).jwks_bytes()
    assert r.headers["content-type"] == "application/jwk-set+json"
    assert r.headers["cache-control"] == "public, max-age=300"
    assert r.headers["access-control-allow-origin"] == "*"
    assert r.headers["x-content-type-options"] == "nosniff"


async def test_a_head_request_gets_the_headers_without_a_body(harness: Harness):
    r = await harness.client.head("/.well-known/jwks.json")
    assert r.status_code == 200
    assert r.content == b""
    assert int(r.headers["content-length"]) == len(harness.services.get(KeyRing).jwks_bytes())


async def test_other_methods_still_reach_the_router(harness: Harness):
    r = await harness.client.post("/.well-known/jwks.json")
    assert r.status_code == 405
