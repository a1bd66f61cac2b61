"""The peer stack (bench/peer.py) really enforces what the comparison credits it with."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from bench import _keys, apps, load
from bench.peer import peer_app


@pytest.fixture(scope="module")
def key():  # type: ignore[no-untyped-def]
    return _keys.new_key()


@pytest.fixture(scope="module")
def jwks_url(key) -> Iterator[str]:  # type: ignore[no-untyped-def]
    with load.jwks_server(_keys.jwks_json(key)) as url:
        yield url


@pytest.fixture
async def client(jwks_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = peer_app(jwks_url, apps.bench_settings(address_limit="5/minute"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
        yield c


def bearer(token: str, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", **extra}


async def test_a_request_without_a_token_is_refused_401(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/rooms")
    assert response.status_code == 401
    assert response.json()["code"] == "unauthenticated"


async def test_a_valid_token_reaches_the_room_as_its_subject(client, key) -> None:  # type: ignore[no-untyped-def]
    response = await client.get("/api/rooms", headers=bearer(_keys.mint(key)))
    assert response.status_code == 200
    created = await client.post(
        "/api/rooms", json={"name": "x"}, headers=bearer(_keys.mint(key, sub="alice"))
    )
    assert created.status_code == 201
    assert created.json()["createdBy"] == "alice"


async def test_forged_and_unknown_kid_tokens_are_refused(client) -> None:  # type: ignore[no-untyped-def]
    other = _keys.new_key()
    assert (await client.get("/api/rooms", headers=bearer(_keys.mint(other)))).status_code == 401
    assert (await client.get("/api/rooms", headers=bearer("not.a.jwt"))).status_code == 401


async def test_members_are_refused_the_owner_only_routes(client, key) -> None:  # type: ignore[no-untyped-def]
    member = bearer(_keys.mint(key, role="member"))
    assert (await client.post("/api/rooms", json={"name": "x"}, headers=member)).status_code == 403
    assert (await client.get("/api/credentials/c1", headers=member)).status_code == 403
    assert (await client.get("/api/rooms/r1", headers=member)).status_code == 200


async def test_cors_headers_only_for_the_allowed_origin(client, key) -> None:  # type: ignore[no-untyped-def]
    token = _keys.mint(key)
    ok = await client.get("/api/rooms", headers=bearer(token, origin=apps.ORIGIN))
    assert ok.headers["access-control-allow-origin"] == apps.ORIGIN
    bad = await client.get("/api/rooms", headers=bearer(token, origin="https://evil.example"))
    assert "access-control-allow-origin" not in bad.headers
    # Starlette's CORSMiddleware lets it reach the app: the weakness the load bench counts.
    assert bad.status_code == 200


async def test_slowapi_refuses_past_the_address_budget(client, key) -> None:  # type: ignore[no-untyped-def]
    token = _keys.mint(key)
    statuses = [
        (await client.get("/api/rooms", headers=bearer(token))).status_code for _ in range(7)
    ]
    assert statuses[:5] == [200] * 5
    assert statuses[5:] == [429, 429]
