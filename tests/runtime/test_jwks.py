"""JWKSCache against a real JWKS endpoint on loopback (uvicorn in a thread)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from room_cloud_runtime._errors import ConfigError, KeysUnavailableError, UnknownKeyError
from room_cloud_runtime._jwks import JWKSCache
from room_cloud_runtime._settings import RuntimeSettings
from tests.helpers.jwks_server import JWKSServer
from tests.helpers.tokens import SigningKey, TokenFactory, b64url


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 10_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def factory() -> TokenFactory:
    return TokenFactory(issuer="http://issuer.test", instance_id="inst-1")


@pytest.fixture
def server(factory: TokenFactory) -> Iterator[JWKSServer]:
    with JWKSServer(factory.jwks(), max_age=300) as srv:
        yield srv


@pytest.fixture
async def cache(server: JWKSServer, clock: FakeClock) -> AsyncIterator[JWKSCache]:
    jwks = JWKSCache(server.url, clock=clock, timeout=1.0)
    yield jwks
    await jwks.aclose()


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


# -- fetch and cache ---------------------------------------------------------------------------


async def test_start_fetches_the_keys_once_and_get_key_serves_them_from_memory(
    cache: JWKSCache, server: JWKSServer, factory: TokenFactory
) -> None:
    await cache.start()
    keys = [cache.get_key(factory.key.kid) for _ in range(20)]
    key = keys[0]
    assert key is not None and all(k is key for k in keys)
    assert key.algorithm == "EdDSA"
    assert key.kid == factory.key.kid
    assert server.requests == 1
    assert cache.loaded


async def test_an_es256_key_is_bound_to_es256(server: JWKSServer, clock: FakeClock) -> None:
    es = SigningKey("ES256")
    server.jwks = {"keys": [es.public_jwk()]}
    async with JWKSCache(server.url, clock=clock) as cache:
        key = cache.get_key(es.kid)
    assert key is not None
    assert key.algorithm == "ES256"


async def test_get_key_returns_none_for_an_unknown_kid(cache: JWKSCache) -> None:
    await cache.start()
    assert cache.get_key("nope") is None


async def test_usable_as_an_async_context_manager_that_stops_its_refresh_task(
    server: JWKSServer, factory: TokenFactory
) -> None:
    async with JWKSCache(server.url, min_refresh=0.05, max_refresh=0.05) as cache:
        assert cache.get_key(factory.key.kid) is not None
    seen = server.requests
    await asyncio.sleep(0.2)
    assert server.requests == seen


async def test_a_caller_supplied_client_is_used_and_left_open(
    server: JWKSServer, factory: TokenFactory
) -> None:
    async with httpx.AsyncClient() as client:
        async with JWKSCache(server.url, client=client) as cache:
            assert cache.get_key(factory.key.kid) is not None
        assert not client.is_closed


# -- refresh schedule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_age", "expected"),
    [(120, 120.0), (5, 60.0), (999_999, 3600.0), (None, 300.0)],
)
async def test_the_next_refresh_follows_max_age_clamped_to_the_configured_bounds(
    server: JWKSServer, clock: FakeClock, max_age: int | None, expected: float
) -> None:
    server.max_age = max_age
    async with JWKSCache(server.url, clock=clock, min_refresh=60, max_refresh=3600) as cache:
        assert cache.next_refresh_in == expected


async def test_the_background_task_refetches_when_max_age_runs_out(server: JWKSServer) -> None:
    server.max_age = 3600
    async with JWKSCache(server.url, min_refresh=0.05, max_refresh=0.1):
        await wait_for(lambda: server.requests >= 3)


async def test_a_failed_fetch_is_retried_sooner_than_the_normal_refresh(
    server: JWKSServer, clock: FakeClock
) -> None:
    async with JWKSCache(server.url, clock=clock, min_refresh=60) as cache:
        assert cache.next_refresh_in == 300
        server.fail_with(500)
        assert not await cache.refresh()
        first = cache.next_refresh_in
        assert not await cache.refresh()
        assert first <= 1.0
        assert first < cache.next_refresh_in <= 2.0


# -- single flight -----------------------------------------------------------------------------


async def test_many_concurrent_resolves_share_one_fetch(
    server: JWKSServer, clock: FakeClock, factory: TokenFactory
) -> None:
    server.delay = 0.3  # keep the fetch in flight while everyone arrives
    cache = JWKSCache(server.url, clock=clock)  # not started: the first resolve must fetch
    try:
        keys = await asyncio.gather(*(cache.resolve(factory.key.kid) for _ in range(50)))
    finally:
        await cache.aclose()
    assert {k.kid for k in keys} == {factory.key.kid}
    assert server.requests == 1


async def test_concurrent_refreshes_share_one_fetch(cache: JWKSCache, server: JWKSServer) -> None:
    server.delay = 0.2
    results = await asyncio.gather(*(cache.refresh() for _ in range(20)))
    assert all(results)
    assert server.requests == 1


# -- unknown kid -------------------------------------------------------------------------------


async def test_an_unknown_kid_triggers_exactly_one_refetch_per_cooldown(
    cache: JWKSCache, server: JWKSServer, clock: FakeClock
) -> None:
    await cache.start()
    assert server.requests == 1

    with pytest.raises(UnknownKeyError) as info:
        await cache.resolve("forged-1")
    assert info.value.kid == "forged-1"
    assert info.value.code == "unknown_key"
    assert server.requests == 2

    # The same kid again, and a flood of other random kids, within the cooldown: no fetch.
    for kid in ["forged-1", *(f"random-{i}" for i in range(100))]:
        with pytest.raises(UnknownKeyError):
            await cache.resolve(kid)
    assert server.requests == 2

    clock.advance(30)
    with pytest.raises(UnknownKeyError):
        await cache.resolve("forged-2")
    assert server.requests == 3
    with pytest.raises(UnknownKeyError):
        await cache.resolve("forged-1")  # remembered as unknown, and the global cooldown holds
    assert server.requests == 3


async def test_a_concurrent_flood_of_unknown_kids_makes_one_refetch(
    cache: JWKSCache, server: JWKSServer
) -> None:
    await cache.start()
    server.delay = 0.2
    results = await asyncio.gather(
        *(cache.resolve(f"random-{i}") for i in range(100)), return_exceptions=True
    )
    assert all(isinstance(r, UnknownKeyError) for r in results)
    assert server.requests == 2


# -- rotation ----------------------------------------------------------------------------------


async def test_a_rotated_key_is_found_by_the_unknown_kid_refetch_without_restart(
    cache: JWKSCache, server: JWKSServer, factory: TokenFactory
) -> None:
    await cache.start()
    new = factory.rotate()
    server.jwks = factory.jwks()
    key = await cache.resolve(new.kid)
    assert key.kid == new.kid
    assert cache.get_key(factory.keys[0].kid) is not None
    assert server.requests == 2


async def test_a_rotated_key_is_picked_up_by_the_background_refresh(
    server: JWKSServer, factory: TokenFactory
) -> None:
    async with JWKSCache(server.url, min_refresh=0.05, max_refresh=0.1) as cache:
        old = factory.key
        new = factory.rotate()
        server.jwks = {"keys": [new.public_jwk()]}  # old key retired
        await wait_for(lambda: cache.get_key(new.kid) is not None)
        assert cache.get_key(old.kid) is None


# -- control plane unreachable -----------------------------------------------------------------


async def test_jwks_down_at_start_fails_closed_then_recovers(
    server: JWKSServer, clock: FakeClock, factory: TokenFactory
) -> None:
    server.go_down()
    cache = JWKSCache(server.url, clock=clock, timeout=1.0)
    try:
        await cache.start()  # must not raise: the runtime boots while the control plane is down
        assert not cache.loaded
        assert cache.status() == {
            "keysLoaded": False,
            "keyCount": 0,
            "lastRefreshAgeSeconds": None,
            "stale": True,
        }
        with pytest.raises(KeysUnavailableError):
            cache.get_key(factory.key.kid)
        with pytest.raises(KeysUnavailableError):
            await cache.resolve(factory.key.kid)

        server.come_back()
        clock.advance(30)  # past the cooldown of the recovery attempt made by resolve()
        key = await cache.resolve(factory.key.kid)
        assert key.kid == factory.key.kid
        assert cache.loaded
    finally:
        await cache.aclose()


async def test_jwks_down_at_start_recovers_through_the_background_retry(
    server: JWKSServer, factory: TokenFactory
) -> None:
    server.go_down()
    async with JWKSCache(server.url, timeout=0.5, min_refresh=0.2, max_refresh=1) as cache:
        assert not cache.loaded
        server.come_back()
        await wait_for(lambda: cache.loaded)
        assert cache.get_key(factory.key.kid) is not None


async def test_jwks_down_later_keeps_the_last_keys_until_max_staleness(
    server: JWKSServer, clock: FakeClock, factory: TokenFactory
) -> None:
    async with JWKSCache(server.url, clock=clock, max_staleness=3600, timeout=1.0) as cache:
        server.go_down()
        clock.advance(3000)
        assert not await cache.refresh()
        assert cache.get_key(factory.key.kid) is not None
        assert cache.status()["stale"] is False

        clock.advance(601)
        with pytest.raises(KeysUnavailableError):
            cache.get_key(factory.key.kid)
        assert not cache.loaded
        status = cache.status()
        assert status["stale"] is True
        # Auth answers 503 now: /api/status must not say the keys are loaded (issue 12, item 4).
        assert status["keysLoaded"] is False
        assert status["lastRefreshAgeSeconds"] == pytest.approx(3601)


@pytest.mark.parametrize(
    "break_server",
    [
        pytest.param(lambda s: s.fail_with(500), id="http-500"),
        pytest.param(lambda s: s.fail_with(404), id="http-404"),
        pytest.param(lambda s: s.hang(), id="timeout"),
        pytest.param(lambda s: s.go_down(), id="connection-refused"),
        pytest.param(lambda s: setattr(s, "body", b"{not json"), id="bad-json"),
        pytest.param(lambda s: setattr(s, "body", b"[1, 2]"), id="not-a-jwk-set"),
        pytest.param(lambda s: setattr(s, "jwks", {"keys": []}), id="no-keys"),
        pytest.param(
            lambda s: setattr(s, "jwks", {"keys": [{"kty": "RSA", "kid": "r", "n": "x"}]}),
            id="no-usable-keys",
        ),
    ],
)
async def test_a_failed_fetch_keeps_the_last_good_keys(
    server: JWKSServer, clock: FakeClock, factory: TokenFactory, break_server
) -> None:
    async with JWKSCache(server.url, clock=clock, timeout=0.3) as cache:
        break_server(server)
        assert not await cache.refresh()
        assert cache.get_key(factory.key.kid) is not None
        assert cache.status()["keyCount"] == 1


# -- validation of what the control plane publishes --------------------------------------------


async def test_a_private_jwk_is_ignored_and_logged_without_its_secret(
    server: JWKSServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    leaked, good = SigningKey(), SigningKey()
    private = leaked.private_jwk()
    server.jwks = {"keys": [private, good.public_jwk()]}
    with caplog.at_level(logging.INFO, logger="room_cloud_runtime.jwks"):
        async with JWKSCache(server.url, clock=clock) as cache:
            assert cache.get_key(leaked.kid) is None
            assert cache.get_key(good.kid) is not None
    assert "private" in caplog.text
    assert private["d"] not in caplog.text
    assert private["x"] not in caplog.text


async def test_a_set_with_only_a_private_jwk_loads_nothing(
    server: JWKSServer, clock: FakeClock
) -> None:
    server.jwks = {"keys": [SigningKey().private_jwk()]}
    async with JWKSCache(server.url, clock=clock) as cache:
        assert not cache.loaded


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda j: j.update(use="enc"), "use other than sig"),
        (lambda j: j.pop("kid"), "no kid"),
        (lambda j: j.update(kid=""), "empty kid"),
        (lambda j: j.update(alg="ES256"), "alg does not match the key type"),
        (lambda j: j.update(alg="HS256"), "symmetric alg"),
        (lambda j: j.update(crv="Ed448"), "curve we do not accept"),
        (lambda j: j.update(kty="oct", k="c2VjcmV0"), "symmetric key"),
        (lambda j: j.update(x="AAAA"), "wrong key length"),
        (lambda j: j.update(x="***"), "not base64url"),
        (lambda j: j.update(key_ops=["encrypt"]), "key_ops without verify"),
    ],
)
async def test_an_unusable_jwk_is_ignored_while_the_good_ones_load(
    server: JWKSServer, clock: FakeClock, mutate, reason: str
) -> None:
    bad, good = SigningKey(kid="bad"), SigningKey(kid="good")
    jwk = bad.public_jwk()
    mutate(jwk)
    server.jwks = {"keys": [jwk, good.public_jwk()]}
    async with JWKSCache(server.url, clock=clock) as cache:
        assert cache.get_key("bad") is None, reason
        assert cache.get_key("good") is not None


async def test_an_ec_point_off_the_curve_is_ignored(server: JWKSServer, clock: FakeClock) -> None:
    bad, good = SigningKey("ES256", kid="bad"), SigningKey(kid="good")
    jwk = bad.public_jwk()
    jwk["y"] = jwk["x"]  # (x, x) is not on P-256: an invalid-curve key
    server.jwks = {"keys": [jwk, good.public_jwk()]}
    async with JWKSCache(server.url, clock=clock) as cache:
        assert cache.get_key("bad") is None
        assert cache.get_key("good") is not None


async def test_a_key_type_outside_the_configured_algorithms_is_ignored(
    server: JWKSServer, clock: FakeClock
) -> None:
    es, ed = SigningKey("ES256"), SigningKey("EdDSA")
    server.jwks = {"keys": [es.public_jwk(), ed.public_jwk()]}
    async with JWKSCache(server.url, clock=clock, algorithms=("EdDSA",)) as cache:
        assert cache.get_key(es.kid) is None
        assert cache.get_key(ed.kid) is not None


async def test_a_kid_published_twice_is_dropped(server: JWKSServer, clock: FakeClock) -> None:
    a, b, good = SigningKey(kid="dup"), SigningKey(kid="dup"), SigningKey(kid="good")
    server.jwks = {"keys": [a.public_jwk(), b.public_jwk(), good.public_jwk()]}
    async with JWKSCache(server.url, clock=clock) as cache:
        assert cache.get_key("dup") is None
        assert cache.get_key("good") is not None


async def test_an_oversize_response_is_refused_before_parsing(
    server: JWKSServer, clock: FakeClock, factory: TokenFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async with JWKSCache(server.url, clock=clock) as cache:
        rotated = factory.rotate()
        server.jwks = {**factory.jwks(), "padding": "x" * (64 * 1024)}
        with caplog.at_level(logging.WARNING, logger="room_cloud_runtime.jwks"):
            assert not await cache.refresh()
        assert "larger than" in caplog.text
        assert cache.get_key(rotated.kid) is None
        assert cache.get_key(factory.keys[0].kid) is not None


# -- RSA keys (RS256, only when a caller asks for it: the control plane's Google sign-in) ----------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def rsa_jwk(key: rsa.RSAPrivateKey | rsa.RSAPublicKey, kid: str = "rsa-1") -> dict[str, object]:
    jwk: dict[str, object] = RSAAlgorithm.to_jwk(key, as_dict=True)
    jwk.update(kid=kid, alg="RS256", use="sig")
    return jwk


async def test_an_rsa_key_is_used_only_when_rs256_is_configured(
    server: JWKSServer, clock: FakeClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    ed = SigningKey("EdDSA")
    server.jwks = {"keys": [rsa_jwk(rsa_key.public_key()), ed.public_jwk()]}
    async with JWKSCache(server.url, clock=clock) as default:
        assert default.algorithms == {"EdDSA", "ES256"}  # the runtime's default is unchanged
        assert default.get_key("rsa-1") is None
        assert default.get_key(ed.kid) is not None
    async with JWKSCache(server.url, clock=clock, algorithms=("RS256",)) as google:
        key = google.get_key("rsa-1")
        assert google.get_key(ed.kid) is None
    assert key is not None
    assert key.algorithm == "RS256"
    assert isinstance(key.key, rsa.RSAPublicKey)
    assert key.key.public_numbers() == rsa_key.public_key().public_numbers()


async def test_an_rsa_key_shorter_than_2048_bits_is_refused(
    server: JWKSServer, clock: FakeClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    server.jwks = {"keys": [rsa_jwk(weak.public_key(), "weak"), rsa_jwk(rsa_key.public_key())]}
    async with JWKSCache(server.url, clock=clock, algorithms=("RS256",)) as cache:
        assert cache.get_key("weak") is None
        assert cache.get_key("rsa-1") is not None


async def test_an_rsa_jwk_with_private_members_is_ignored(
    server: JWKSServer,
    clock: FakeClock,
    rsa_key: rsa.RSAPrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    leaked = rsa_jwk(rsa_key, "leaked")
    assert "d" in leaked and "p" in leaked
    good = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server.jwks = {"keys": [leaked, rsa_jwk(good.public_key(), "good")]}
    with caplog.at_level(logging.INFO, logger="room_cloud_runtime.jwks"):
        async with JWKSCache(server.url, clock=clock, algorithms=("RS256",)) as cache:
            assert cache.get_key("leaked") is None
            assert cache.get_key("good") is not None
    assert "private" in caplog.text
    assert str(leaked["d"]) not in caplog.text


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda j: j.update(alg="PS256"), "alg other than the RSA key's RS256"),
        (lambda j: j.update(alg="ES256"), "alg of another key type"),
        (lambda j: j.update(e=b64url((3).to_bytes(1, "big"))), "exponent 3"),
        (lambda j: j.update(e=b64url((1).to_bytes(1, "big"))), "exponent 1"),
        (lambda j: j.update(e=b64url((65536).to_bytes(3, "big"))), "even exponent"),
        (lambda j: j.update(n=b64url((2**2048 - 2).to_bytes(256, "big"))), "even modulus"),
        (lambda j: j.update(n=b64url((2**8200 - 1).to_bytes(1025, "big"))), "modulus too large"),
        (lambda j: j.pop("n"), "no modulus"),
        (lambda j: j.update(n="***"), "modulus not base64url"),
        (lambda j: j.update(crv="P-256"), "a curve on an RSA key"),
    ],
)
async def test_an_unusable_rsa_jwk_is_ignored(
    server: JWKSServer, clock: FakeClock, rsa_key: rsa.RSAPrivateKey, mutate, reason: str
) -> None:
    jwk = rsa_jwk(rsa_key.public_key(), "bad")
    mutate(jwk)
    good = SigningKey("ES256", kid="good")
    server.jwks = {"keys": [jwk, good.public_jwk()]}
    async with JWKSCache(server.url, clock=clock, algorithms=("RS256", "ES256")) as cache:
        assert cache.get_key("bad") is None, reason
        assert cache.get_key("good") is not None


async def test_a_token_whose_header_alg_differs_from_the_keys_bound_alg_is_refused(
    server: JWKSServer, clock: FakeClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    """Verifying with ``algorithms=[key.algorithm]`` (as the verifiers do) pins the key's one
    algorithm: even a genuine signature by the same RSA key under PS256 does not pass."""
    server.jwks = {"keys": [rsa_jwk(rsa_key.public_key())]}
    claims = {"sub": "user-1"}
    async with JWKSCache(server.url, clock=clock, algorithms=("RS256",)) as cache:
        key = await cache.resolve("rsa-1")
    assert key.algorithm == "RS256"
    good = jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    assert jwt.decode(good, key.key, algorithms=[key.algorithm]) == claims
    confused = jwt.encode(claims, rsa_key, algorithm="PS256", headers={"kid": "rsa-1"})
    assert jwt.get_unverified_header(confused)["alg"] != key.algorithm
    with pytest.raises(jwt.InvalidAlgorithmError):
        jwt.decode(confused, key.key, algorithms=[key.algorithm])


# -- status and configuration ------------------------------------------------------------------


async def test_status_reports_health_without_key_material(
    cache: JWKSCache, clock: FakeClock, factory: TokenFactory
) -> None:
    await cache.start()
    clock.advance(12.5)
    status = cache.status()
    assert status == {
        "keysLoaded": True,
        "keyCount": 1,
        "lastRefreshAgeSeconds": pytest.approx(12.5),
        "stale": False,
    }
    assert factory.key.public_jwk()["x"] not in json.dumps(status)


async def test_from_settings_pins_the_configured_jwks_url() -> None:
    settings = RuntimeSettings(
        mode="cloud",
        instance_id="inst-1",
        issuer="https://cloud.example",
        allowed_origins=("https://app.example",),
    )
    cache = JWKSCache.from_settings(settings)
    assert cache.url == "https://cloud.example/.well-known/jwks.json"
    await cache.aclose()


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"url": "file:///etc/passwd"}, "url"),
        ({"algorithms": ("HS256",)}, "algorithms"),
        ({"algorithms": ("PS256",)}, "algorithms"),
        ({"algorithms": ()}, "algorithms"),
        ({"min_refresh": 100, "max_refresh": 10}, "min_refresh"),
        ({"timeout": 0}, "timeout"),
        ({"unknown_kid_cooldown": -1}, "unknown_kid_cooldown"),
    ],
)
def test_bad_options_raise_a_config_error_naming_the_option(kwargs, setting: str) -> None:
    options = {"url": "https://cloud.example/.well-known/jwks.json", **kwargs}
    url = options.pop("url")
    with pytest.raises(ConfigError) as info:
        JWKSCache(url, **options)
    assert info.value.setting == setting


# --- issue 12, item 4: no decompression bombs ---------------------------------------------------


async def test_a_compressed_jwks_is_refused_not_decoded_and_identity_is_asked_for(
    factory: TokenFactory,
) -> None:
    import gzip

    from tests.helpers.live_server import live_server

    bomb = gzip.compress(b'{"keys": [' + b" " * (64 << 20) + b"]}", compresslevel=9)
    seen: list[dict[bytes, bytes]] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        seen.append(dict(scope["headers"]))
        headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
        headers.append((b"content-length", str(len(bomb)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": bomb})

    with live_server(app, lifespan="off") as base:
        cache = JWKSCache(base + "/.well-known/jwks.json", timeout=2.0)
        try:
            assert not await cache.refresh()
        finally:
            await cache.aclose()
    assert len(bomb) < 200_000
    assert seen and seen[0][b"accept-encoding"] == b"identity"
    assert cache.status()["keysLoaded"] is False
