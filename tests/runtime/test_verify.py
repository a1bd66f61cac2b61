"""TokenVerifier: the runtime-token contract and the JWT attack corpus, keys over real HTTP."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from room_cloud_runtime import _verify
from room_cloud_runtime._errors import (
    ClaimError,
    ConfigError,
    KeysUnavailableError,
    TokenError,
    UnknownKeyError,
)
from room_cloud_runtime._jwks import JWKSCache
from room_cloud_runtime._scope import Principal
from room_cloud_runtime._settings import RuntimeSettings
from tests.helpers.jwks_server import JWKSServer
from tests.helpers.tokens import OMIT, SigningKey, TokenFactory, b64url, craft, sign_compact

INSTANCE = "inst-1"


class Clock:
    """The verifier's wall clock: real time unless the test pins it with ``.now``."""

    def __init__(self) -> None:
        self.now: float | None = None

    def __call__(self) -> float:
        return time.time() if self.now is None else self.now


class Monotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    server: JWKSServer
    factory: TokenFactory
    jwks: JWKSCache
    verifier: _verify.TokenVerifier
    clock: Clock
    monotonic: Monotonic


async def refused(env: Env, token: Any, code: str) -> TokenError:
    with pytest.raises(TokenError) as info:
        await env.verifier.verify(token)
    assert info.value.code == code, info.value.message
    return info.value


@pytest.fixture
def server() -> Iterator[JWKSServer]:
    with JWKSServer() as srv:
        yield srv


@pytest.fixture
async def env(server: JWKSServer) -> AsyncIterator[Env]:
    factory = TokenFactory(issuer=server.issuer, instance_id=INSTANCE)
    es = SigningKey("ES256")
    factory.keys.insert(0, es)  # an ES256 key is published too; the EdDSA key signs by default
    server.jwks = factory.jwks()
    clock, monotonic = Clock(), Monotonic()
    jwks = JWKSCache(server.url, clock=monotonic, timeout=1.0)
    await jwks.start()
    verifier = _verify.TokenVerifier(jwks, issuer=server.issuer, instance_id=INSTANCE, clock=clock)
    yield Env(server, factory, jwks, verifier, clock, monotonic)
    await jwks.aclose()


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts every signature verification (PyJWT decode) the verifier makes."""
    calls: list[str] = []
    real = _verify.jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(_verify.jwt, "decode", counting)
    return calls


def es_key(env: Env) -> SigningKey:
    return env.factory.keys[0]


# -- accepted tokens ---------------------------------------------------------------------------


async def test_a_valid_owner_token_gives_a_principal_with_the_contract_claims(env: Env) -> None:
    token = env.factory.mint(role="owner", sub="user-42", ttl=600)
    principal = await env.verifier.verify(token)
    claims = env.factory.claims()  # same shape, for reference
    assert isinstance(principal, Principal)
    assert principal.subject == "user-42"
    assert principal.role == "owner"
    assert principal.instance_id == INSTANCE
    assert principal.session_id == "session-1"
    assert principal.token_id
    assert principal.email == claims["email"]
    assert principal.email_verified is True
    assert principal.name == "Test User"
    assert principal.claims["instanceId"] == INSTANCE


async def test_the_principal_carries_exp_as_expires_at(env: Env) -> None:
    now = int(time.time())
    principal = await env.verifier.verify(env.factory.mint(now=now, ttl=300))
    assert principal.expires_at == float(now + 300)


async def test_the_principal_claims_are_read_only(env: Env) -> None:
    principal = await env.verifier.verify(env.factory.mint())
    with pytest.raises(TypeError):
        principal.claims["role"] = "owner"  # type: ignore[index]


async def test_a_member_token_is_accepted_as_member(env: Env) -> None:
    principal = await env.verifier.verify(env.factory.mint(role="member"))
    assert principal.role == "member"


async def test_an_es256_token_is_accepted(env: Env) -> None:
    principal = await env.verifier.verify(env.factory.mint(key=es_key(env)))
    assert principal.subject == "user-1"


async def test_optional_profile_claims_may_be_absent(env: Env) -> None:
    token = env.factory.mint(email=OMIT, emailVerified=OMIT, name=OMIT)
    principal = await env.verifier.verify(token)
    assert (principal.email, principal.email_verified, principal.name) == (None, False, None)


async def test_an_audience_list_containing_ours_is_accepted(env: Env) -> None:
    token = env.factory.mint(aud=["other-service", "quoroom-runtime"])
    assert (await env.verifier.verify(token)).subject == "user-1"


async def test_a_token_expired_within_the_leeway_is_accepted(env: Env) -> None:
    now = int(time.time())
    token = env.factory.mint(now=now - 310, ttl=300)  # expired 10 s ago, leeway 30 s
    assert (await env.verifier.verify(token)).subject == "user-1"


async def test_a_ttl_of_exactly_fifteen_minutes_is_accepted(env: Env) -> None:
    assert await env.verifier.verify(env.factory.mint(ttl=900))


async def test_a_token_signed_with_a_rotated_key_is_accepted_without_restart(env: Env) -> None:
    await env.verifier.verify(env.factory.mint())
    new = env.factory.rotate()
    env.server.jwks = env.factory.jwks()
    principal = await env.verifier.verify(env.factory.mint(key=new))
    assert principal.subject == "user-1"


# -- the attack corpus: refused before any crypto ----------------------------------------------


async def test_alg_none_without_a_signature_is_malformed(env: Env) -> None:
    header = {"alg": "none", "typ": "JWT", "kid": env.factory.key.kid}
    token = craft(header, env.factory.claims()).rsplit(".", 1)[0] + "."
    await refused(env, token, "token_malformed")


async def test_alg_none_with_a_signature_is_an_unsupported_algorithm(
    env: Env, decode_calls: list[str]
) -> None:
    for alg in ("none", "None", "NONE"):
        header = {"alg": alg, "typ": "JWT", "kid": env.factory.key.kid}
        await refused(env, craft(header, env.factory.claims()), "unsupported_algorithm")
    assert decode_calls == []


@pytest.mark.parametrize("secret", ["pem", "jwk-json", "jwk-x"])
async def test_hs256_signed_with_the_public_key_bytes_is_refused(env: Env, secret: str) -> None:
    # The classic confusion attack: a verifier that lets the token pick HMAC would check the
    # MAC with the public key as the secret, which the attacker knows.
    key = env.factory.key
    material = {
        "pem": key.public_bytes(),
        "jwk-json": json.dumps(key.public_jwk()).encode(),
        "jwk-x": key.public_jwk()["x"].encode(),
    }[secret]
    header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
    signing_input = craft(header, env.factory.claims()).rsplit(".", 1)[0]
    signature = hmac.new(material, signing_input.encode(), hashlib.sha256).digest()
    await refused(env, f"{signing_input}.{b64url(signature)}", "unsupported_algorithm")


@pytest.mark.parametrize("alg", ["RS256", "ES384", "EdDSA ", "Ed25519", ""])
async def test_an_algorithm_outside_the_configured_list_is_refused(env: Env, alg: str) -> None:
    header = {"alg": alg, "kid": env.factory.key.kid}
    await refused(env, craft(header, env.factory.claims()), "unsupported_algorithm")


async def test_an_algorithm_that_is_not_a_string_is_refused(env: Env) -> None:
    header = {"alg": ["EdDSA"], "kid": env.factory.key.kid}
    await refused(env, craft(header, env.factory.claims()), "unsupported_algorithm")


async def test_an_algorithm_allowed_by_settings_only_is_refused_when_not_configured(
    env: Env,
) -> None:
    verifier = _verify.TokenVerifier(
        env.jwks, issuer=env.server.issuer, instance_id=INSTANCE, algorithms=("EdDSA",)
    )
    with pytest.raises(TokenError) as info:
        await verifier.verify(env.factory.mint(key=es_key(env)))
    assert info.value.code == "unsupported_algorithm"


@pytest.mark.parametrize(
    "header",
    [
        {"jku": "https://attacker.example/jwks.json"},
        {"x5u": "https://attacker.example/cert.pem"},
        {"jwk": {"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}},
        {"x5c": ["MIIB..."]},
    ],
    ids=["jku", "x5u", "jwk", "x5c"],
)
async def test_key_locating_header_parameters_are_refused(
    env: Env, header: dict[str, Any], decode_calls: list[str]
) -> None:
    # Signed with a genuine key: the refusal is about the header, not the signature.
    token = env.factory.mint(headers=header)
    await refused(env, token, "unsupported_header")
    assert decode_calls == []
    assert env.server.requests == 1  # and the URLs in them are never fetched


async def test_an_attacker_embedded_jwk_never_replaces_the_pinned_key(env: Env) -> None:
    attacker = SigningKey(kid=env.factory.key.kid)
    token = env.factory.mint(key=attacker, headers={"jwk": attacker.public_jwk()})
    await refused(env, token, "unsupported_header")


async def test_an_unknown_crit_extension_is_refused(env: Env) -> None:
    key = env.factory.key
    header = {"alg": "EdDSA", "kid": key.kid, "crit": ["exp"], "exp": 1}
    await refused(env, sign_compact(key, header, env.factory.claims()), "unsupported_header")


async def test_b64_false_unencoded_payload_is_refused(env: Env) -> None:
    key = env.factory.key
    header = {"alg": "EdDSA", "kid": key.kid, "b64": False, "crit": ["b64"]}
    await refused(env, sign_compact(key, header, env.factory.claims()), "unsupported_header")
    header = {"alg": "EdDSA", "kid": key.kid, "b64": False}
    await refused(env, sign_compact(key, header, env.factory.claims()), "unsupported_header")


async def test_an_oversized_token_is_refused_before_parsing(env: Env) -> None:
    token = env.factory.mint(name="x" * 5000)
    await refused(env, token, "token_too_large")


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda t: t.rsplit(".", 1)[0], id="two-segments"),
        pytest.param(lambda t: t + ".AAAA", id="four-segments"),
        pytest.param(lambda t: "." + t.split(".", 1)[1], id="empty-header"),
        pytest.param(lambda t: t.replace(".", "..", 1), id="empty-segment"),
        pytest.param(lambda t: "*" + t[1:], id="bad-base64-character"),
        pytest.param(lambda t: "eyJ=" + t[4:], id="base64-padding"),
        pytest.param(lambda t: "A." + t.split(".", 1)[1], id="base64-impossible-length"),
        pytest.param(lambda t: f" {t}", id="leading-space"),
        pytest.param(lambda t: "", id="empty"),
        pytest.param(lambda t: t.replace("e", "é", 1), id="non-ascii"),
    ],
)
async def test_a_token_that_is_not_a_compact_jws_is_malformed(env: Env, mangle) -> None:
    await refused(env, mangle(env.factory.mint()), "token_malformed")


@pytest.mark.parametrize(
    "header_segment",
    [
        pytest.param(b64url(b"not json"), id="not-json"),
        pytest.param(b64url(b'["alg","EdDSA"]'), id="json-array"),
        pytest.param(b64url(b'"EdDSA"'), id="json-string"),
        pytest.param(b64url(b"\xff\xfe"), id="not-utf8"),
        pytest.param(b64url(b"[" * 5000)[:2000], id="deep-nesting"),
    ],
)
async def test_a_header_that_is_not_a_json_object_is_malformed(
    env: Env, header_segment: str
) -> None:
    token = header_segment + "." + env.factory.mint().split(".", 1)[1]
    await refused(env, token, "token_malformed")


@pytest.mark.parametrize("kid", [OMIT, 7, "", "k" * 129, None])
async def test_a_missing_or_invalid_kid_is_malformed(env: Env, kid: Any) -> None:
    header: dict[str, Any] = {"alg": "EdDSA"}
    if kid is not OMIT:
        header["kid"] = kid
    await refused(env, craft(header, env.factory.claims()), "token_malformed")


async def test_a_token_that_is_not_a_string_is_malformed(env: Env) -> None:
    await refused(env, b"a.b.c", "token_malformed")


# -- refused at the key lookup -----------------------------------------------------------------


async def test_an_unknown_kid_is_refused_with_the_kid(env: Env) -> None:
    stranger = SigningKey(kid="not-published")
    error = await refused(env, env.factory.mint(key=stranger), "unknown_key")
    assert isinstance(error, UnknownKeyError)
    assert error.kid == "not-published"


async def test_an_es256_token_naming_an_ed25519_kid_is_an_algorithm_mismatch(
    env: Env, decode_calls: list[str]
) -> None:
    token = env.factory.mint(key=es_key(env), headers={"kid": env.factory.key.kid})
    await refused(env, token, "algorithm_mismatch")
    assert decode_calls == []


async def test_an_eddsa_token_naming_an_es256_kid_is_an_algorithm_mismatch(env: Env) -> None:
    token = env.factory.mint(headers={"kid": es_key(env).kid})
    await refused(env, token, "algorithm_mismatch")


async def test_keys_never_loaded_fail_closed_and_are_not_cached_as_a_refusal(
    server: JWKSServer,
) -> None:
    factory = TokenFactory(issuer=server.issuer, instance_id=INSTANCE)
    server.jwks = factory.jwks()
    server.go_down()
    monotonic = Monotonic()
    jwks = JWKSCache(server.url, clock=monotonic, timeout=1.0)
    try:
        await jwks.start()
        verifier = _verify.TokenVerifier(jwks, issuer=server.issuer, instance_id=INSTANCE)
        token = factory.mint()
        with pytest.raises(KeysUnavailableError) as info:
            await verifier.verify(token)
        assert info.value.code == "keys_unavailable"
        assert info.value.status == 503

        server.come_back()
        monotonic.now += 60
        assert (await verifier.verify(token)).subject == "user-1"
    finally:
        await jwks.aclose()


# -- refused by the signature ------------------------------------------------------------------


async def test_a_tampered_payload_is_a_bad_signature(env: Env) -> None:
    header, _, signature = env.factory.mint(role="member").split(".")
    forged_claims = env.factory.claims(role="owner")
    payload = b64url(json.dumps(forged_claims).encode())
    await refused(env, f"{header}.{payload}.{signature}", "bad_signature")


async def test_a_token_signed_by_another_key_under_our_kid_is_a_bad_signature(env: Env) -> None:
    impostor = SigningKey(kid=env.factory.key.kid)
    await refused(env, env.factory.mint(key=impostor), "bad_signature")


async def test_a_signed_payload_that_is_not_json_is_malformed(env: Env) -> None:
    key = env.factory.key
    token = sign_compact(key, {"alg": "EdDSA", "kid": key.kid}, b"not json")
    await refused(env, token, "token_malformed")


# -- refused by the claims ---------------------------------------------------------------------


async def test_an_expired_token_is_refused(env: Env) -> None:
    now = int(time.time())
    await refused(env, env.factory.mint(now=now - 400, ttl=300), "token_expired")


async def test_a_token_with_a_future_nbf_is_not_yet_valid(env: Env) -> None:
    now = int(time.time())
    await refused(env, env.factory.mint(nbf=now + 120), "token_not_yet_valid")


async def test_a_token_issued_in_the_future_is_refused(env: Env) -> None:
    now = int(time.time())
    error = await refused(env, env.factory.mint(iat=now + 120, exp=now + 300), "invalid_claim")
    assert isinstance(error, ClaimError)
    assert error.claim == "iat"


@pytest.mark.parametrize(
    "claim", ["exp", "iat", "nbf", "sub", "jti", "sid", "iss", "aud", "instanceId", "role"]
)
async def test_a_token_missing_a_required_claim_is_refused_naming_it(env: Env, claim: str) -> None:
    omitted: dict[str, Any] = {claim: OMIT}
    error = await refused(env, env.factory.mint(**omitted), "invalid_claim")
    assert isinstance(error, ClaimError)
    assert error.claim == claim


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("iss", "https://evil.example"),
        ("iss", "http://127.0.0.1"),  # a prefix of ours is not ours
        ("aud", "other-service"),
        ("aud", ["other-service", "another"]),
        ("aud", ["quoroom-runtime-2"]),
        ("instanceId", "inst-2"),
        ("instanceId", ["inst-1"]),
        ("role", "admin"),
        ("role", "Owner"),
        ("role", "owner "),
        ("role", ""),
        ("role", ["owner"]),
        ("sub", ""),
        ("sub", 42),
        ("sid", ""),
        ("sid", 7),
        ("jti", ""),
        ("jti", 1.5),
        ("exp", "9999999999"),
        ("exp", True),
        ("exp", 10**400),
        ("iat", "now"),
        ("nbf", False),
        ("email", 5),
        ("emailVerified", "yes"),
        ("name", {"first": "a"}),
    ],
)
async def test_a_claim_with_a_value_the_contract_forbids_is_refused_naming_it(
    env: Env, claim: str, value: Any
) -> None:
    error = await refused(env, env.factory.mint(**{claim: value}), "invalid_claim")
    assert isinstance(error, ClaimError)
    assert error.claim == claim


async def test_a_nan_expiry_is_refused(env: Env) -> None:
    key = env.factory.key
    claims = env.factory.claims()
    claims["exp"] = float("nan")  # json.dumps writes NaN, which json.loads accepts
    token = sign_compact(key, {"alg": "EdDSA", "kid": key.kid}, claims)
    error = await refused(env, token, "invalid_claim")
    assert isinstance(error, ClaimError)
    assert error.claim == "exp"


async def test_a_lifetime_over_fifteen_minutes_is_refused(env: Env) -> None:
    error = await refused(env, env.factory.mint(ttl=901), "invalid_claim")
    assert isinstance(error, ClaimError)
    assert error.claim == "exp"


async def test_an_expiry_before_issue_is_refused(env: Env) -> None:
    now = int(time.time())
    token = env.factory.mint(now=now, iat=now + 10, exp=now + 5)
    error = await refused(env, token, "invalid_claim")
    assert isinstance(error, ClaimError)
    assert error.claim == "exp"


# -- the verified-claims cache -----------------------------------------------------------------


async def test_a_cached_token_is_returned_without_crypto(env: Env, decode_calls: list[str]) -> None:
    token = env.factory.mint()
    first = await env.verifier.verify(token)
    for _ in range(10):
        assert await env.verifier.verify(token) is first
    assert decode_calls == [token]


async def test_a_cached_token_is_refused_after_its_expiry(
    env: Env, decode_calls: list[str]
) -> None:
    now = int(time.time())
    token = env.factory.mint(now=now, ttl=60)
    await env.verifier.verify(token)
    env.clock.now = now + 60 + 29  # still within the 30 s leeway
    assert await env.verifier.verify(token)
    env.clock.now = now + 60 + 30
    await refused(env, token, "token_expired")
    assert decode_calls == [token]
    assert env.verifier.cached_count == 0


async def test_a_cached_token_fails_closed_when_the_keys_go_stale(env: Env) -> None:
    token = env.factory.mint()
    await env.verifier.verify(token)
    env.monotonic.now += 6 * 3600 + 1
    with pytest.raises(KeysUnavailableError):
        await env.verifier.verify(token)


async def test_a_cached_token_stops_working_when_its_key_is_retired(env: Env) -> None:
    old = env.factory.key
    token = env.factory.mint()
    await env.verifier.verify(token)
    new = env.factory.rotate()
    env.server.jwks = {"keys": [new.public_jwk()]}
    assert await env.jwks.refresh()
    error = await refused(env, token, "unknown_key")
    assert isinstance(error, UnknownKeyError)
    assert error.kid == old.kid


async def test_the_synchronous_cache_look_up_answers_only_what_verify_would_accept(
    env: Env,
) -> None:
    now = int(time.time())
    token = env.factory.mint(now=now, ttl=60)
    assert env.verifier.cached(token) is None  # never verified: verify() decides
    first = await env.verifier.verify(token)
    assert env.verifier.cached(token) is first
    env.clock.now = now + 60 + 29  # within the leeway
    assert env.verifier.cached(token) is first
    env.clock.now = now + 60 + 30  # expired: not answered from the cache
    assert env.verifier.cached(token) is None
    await refused(env, token, "token_expired")

    env.clock.now = None
    fresh = env.factory.mint()
    await env.verifier.verify(fresh)
    env.monotonic.now += 6 * 3600 + 1  # keys too stale: fail closed, cached or not
    with pytest.raises(KeysUnavailableError):
        env.verifier.cached(fresh)


async def test_the_synchronous_cache_look_up_drops_a_token_whose_key_was_retired(
    env: Env,
) -> None:
    token = env.factory.mint()
    await env.verifier.verify(token)
    new = env.factory.rotate()
    env.server.jwks = {"keys": [new.public_jwk()]}
    assert await env.jwks.refresh()
    assert env.verifier.cached(token) is None
    await refused(env, token, "unknown_key")


async def test_the_cache_is_bounded_and_evicts_the_oldest_token(
    env: Env, decode_calls: list[str]
) -> None:
    verifier = _verify.TokenVerifier(
        env.jwks, issuer=env.server.issuer, instance_id=INSTANCE, cache_size=2
    )
    tokens = [env.factory.mint(sub=f"user-{i}") for i in range(3)]
    for token in tokens:
        await verifier.verify(token)
    assert verifier.cached_count == 2
    await verifier.verify(tokens[2])
    assert len(decode_calls) == 3  # newest still cached
    await verifier.verify(tokens[0])
    assert len(decode_calls) == 4  # oldest was evicted


async def test_a_replayed_forged_token_is_refused_from_the_negative_cache(
    env: Env, decode_calls: list[str]
) -> None:
    impostor = SigningKey(kid=env.factory.key.kid)
    token = env.factory.mint(key=impostor)
    for _ in range(5):
        await refused(env, token, "bad_signature")
    assert decode_calls == [token]


async def test_a_replayed_refusal_keeps_its_code_and_claim(
    env: Env, decode_calls: list[str]
) -> None:
    token = env.factory.mint(role="admin")
    for _ in range(3):
        error = await refused(env, token, "invalid_claim")
        assert isinstance(error, ClaimError)
        assert error.claim == "role"
    assert decode_calls == [token]


async def test_a_token_refused_for_an_unknown_kid_works_once_its_key_is_published(
    env: Env,
) -> None:
    # Not remembered as refused: the JWKS cooldown alone decides when the kid is looked up again.
    early = SigningKey()
    token = env.factory.mint(key=early)
    await refused(env, token, "unknown_key")
    env.factory.keys.append(early)
    env.server.jwks = env.factory.jwks()
    env.monotonic.now += 30  # the unknown-kid cooldown
    assert (await env.verifier.verify(token)).subject == "user-1"


async def test_a_token_not_yet_valid_is_accepted_once_its_time_comes(env: Env) -> None:
    now = int(time.time())
    token = env.factory.mint(now=now, nbf=now + 60)
    await refused(env, token, "token_not_yet_valid")
    env.clock.now = now + 30
    assert (await env.verifier.verify(token)).subject == "user-1"


async def test_a_cached_token_survives_a_refresh_that_republishes_its_key(
    env: Env, decode_calls: list[str]
) -> None:
    token = env.factory.mint()
    await env.verifier.verify(token)
    assert await env.jwks.refresh()
    await env.verifier.verify(token)
    assert decode_calls == [token]


# -- configuration -----------------------------------------------------------------------------


async def test_from_settings_uses_the_configured_issuer_instance_and_limits(env: Env) -> None:
    settings = RuntimeSettings(
        mode="cloud",
        instance_id=INSTANCE,
        issuer=env.server.issuer,
        allowed_origins=("https://app.example",),
        max_token_bytes=2048,
    )
    verifier = _verify.TokenVerifier.from_settings(settings, env.jwks)
    assert (await verifier.verify(env.factory.mint())).instance_id == INSTANCE
    with pytest.raises(TokenError) as info:
        await verifier.verify(env.factory.mint(name="x" * 2100))
    assert info.value.code == "token_too_large"


def test_from_settings_requires_issuer_and_instance_id() -> None:
    jwks = JWKSCache("https://cloud.example/.well-known/jwks.json")
    with pytest.raises(ConfigError) as info:
        _verify.TokenVerifier.from_settings(RuntimeSettings(), jwks)
    assert info.value.setting == "QUOROOM_CLOUD_ISSUER"


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"issuer": ""}, "issuer"),
        ({"instance_id": ""}, "instance_id"),
        ({"algorithms": ("HS256",)}, "algorithms"),
        ({"algorithms": ("none",)}, "algorithms"),
        ({"leeway": 61}, "leeway"),
        ({"max_ttl": 0}, "max_ttl"),
        ({"max_token_bytes": 0}, "max_token_bytes"),
    ],
)
def test_bad_options_raise_a_config_error_naming_the_option(
    kwargs: dict[str, Any], setting: str
) -> None:
    jwks = JWKSCache("https://cloud.example/.well-known/jwks.json")
    options: dict[str, Any] = {"issuer": "https://cloud.example", "instance_id": INSTANCE}
    options.update(kwargs)
    with pytest.raises(ConfigError) as info:
        _verify.TokenVerifier(jwks, **options)
    assert info.value.setting == setting
