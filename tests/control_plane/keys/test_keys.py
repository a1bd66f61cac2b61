"""Signing keys: JWKS contents and caching, encryption at rest, rotation without breaking the
runtime, retired keys dropped after every token they signed has expired."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import select

from control_plane.errors import KeyDecryptionFailed, KeysNotReady
from control_plane.keys.models import SigningKey
from control_plane.keys.service import RETIRED_KEY_LIFETIME, KeyRing, publish_delay
from room_cloud_runtime._jwks import JWKSCache
from room_cloud_runtime._verify import TokenVerifier
from tests.control_plane.conftest import PUBLIC_URL, Harness

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


async def _jwks(h: Harness) -> dict[str, Any]:
    r = await h.client.get("/.well-known/jwks.json")
    assert r.status_code == 200
    data: dict[str, Any] = r.json()
    return data


async def test_the_jwks_publishes_public_keys_only_with_a_max_age(harness: Harness):
    r = await harness.client.get("/.well-known/jwks.json")
    assert r.headers["cache-control"] == "public, max-age=300"
    keys = r.json()["keys"]
    assert len(keys) == 2  # active + next
    for jwk in keys:
        assert PRIVATE_MEMBERS.isdisjoint(jwk), jwk
        assert jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519" and jwk["alg"] == "EdDSA"


def _switch(h: Harness) -> None:
    """Let a rotation take effect (the new key has been published for one JWKS max-age)."""
    h.clock.advance(publish_delay(h.services.core.settings).total_seconds())


async def test_no_private_parameter_appears_in_the_jwks_across_rotations(harness: Harness):
    ring: KeyRing = harness.services.get(KeyRing)
    for _ in range(3):
        async with harness.services.core.session_factory() as db:
            await ring.rotate(db)
        _switch(harness)
        body = (await harness.client.get("/.well-known/jwks.json")).content
        for jwk in json.loads(body)["keys"]:
            assert PRIVATE_MEMBERS.isdisjoint(jwk)


async def test_private_keys_are_encrypted_at_rest(harness: Harness):
    ring: KeyRing = harness.services.get(KeyRing)
    token = ring.sign({"sub": "u"}, audience="quoroom-runtime")
    async with harness.services.core.session_factory() as db:
        rows = (await db.scalars(select(SigningKey))).all()
    for row in rows:
        assert len(row.private_key_ciphertext) == 32 + 16  # key + GCM tag: not the raw key
        assert row.kek_id
    assert jwt.get_unverified_header(token)["kid"] == ring.active_kid


async def test_a_wrong_key_encryption_key_refuses_to_start(harness: Harness, make_settings: Any):
    other = make_settings(key_encryption_key="b" * 43)
    ring = KeyRing(other, harness.services.core.session_factory)
    with pytest.raises(KeyDecryptionFailed):
        await ring.reload()


async def test_a_rotated_in_key_was_published_before_it_signs(harness: Harness):
    ring: KeyRing = harness.services.get(KeyRing)
    before = {k["kid"] for k in (await _jwks(harness))["keys"]}
    async with harness.services.core.session_factory() as db:
        new_active = await ring.rotate(db)
    assert new_active in before
    _switch(harness)
    assert ring.active_kid == new_active


async def test_a_retired_key_stays_published_until_its_tokens_expired(harness: Harness):
    h = harness
    ring: KeyRing = h.services.get(KeyRing)
    old = ring.active_kid
    async with h.services.core.session_factory() as db:
        await ring.rotate(db)
    assert old in {k["kid"] for k in (await _jwks(h))["keys"]}
    _switch(h)  # the old key signs until here, so its lifetime counts from here
    h.clock.advance(RETIRED_KEY_LIFETIME.total_seconds() + 1)
    await ring.reload()
    assert old not in {k["kid"] for k in (await _jwks(h))["keys"]}
    async with h.services.core.session_factory() as db:
        await ring.rotate(db)  # deletes it from the table
        assert await db.get(SigningKey, old) is None


async def test_the_runtime_accepts_tokens_across_a_rotation_without_restart(harness: Harness):
    h = harness
    ring: KeyRing = h.services.get(KeyRing)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=h.app))
    cache = JWKSCache(f"{PUBLIC_URL}/.well-known/jwks.json", client=client, unknown_kid_cooldown=0)
    verifier = TokenVerifier(
        cache, issuer=PUBLIC_URL, instance_id="inst-1", clock=lambda: h.clock.now.timestamp()
    )
    claims = {"sub": "user-1", "instanceId": "inst-1", "role": "owner", "sid": "s1"}
    async with cache:
        # 15 minutes: it must still be valid after the two rotations took effect (2 × 6 min).
        before = ring.sign(claims, audience="quoroom-runtime", ttl=timedelta(minutes=15))
        assert (await verifier.verify(before)).subject == "user-1"
        async with h.services.core.session_factory() as db:
            await ring.rotate(db)
        _switch(h)
        async with h.services.core.session_factory() as db:
            await ring.rotate(db)  # the new active key was never in the runtime's cached set
        _switch(h)
        after = ring.sign(claims, audience="quoroom-runtime", ttl=timedelta(minutes=5))
        assert jwt.get_unverified_header(after)["kid"] != jwt.get_unverified_header(before)["kid"]
        assert (await verifier.verify(after)).subject == "user-1"
        assert (await verifier.verify(before)).subject == "user-1"
    await client.aclose()


async def test_signed_tokens_carry_kid_eddsa_and_at_most_fifteen_minutes(harness: Harness):
    ring: KeyRing = harness.services.get(KeyRing)
    token = ring.sign({"sub": "u"}, audience="quoroom-runtime", ttl=timedelta(hours=2))
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA" and header["kid"] == ring.active_kid
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 900
    assert claims["iss"] == PUBLIC_URL and claims["aud"] == "quoroom-runtime"


async def test_another_process_rotation_is_picked_up_on_reload(harness: Harness):
    h = harness
    ring: KeyRing = h.services.get(KeyRing)
    other = KeyRing(h.services.core.settings, h.services.core.session_factory, clock=h.clock)
    await other.reload()
    async with h.services.core.session_factory() as db:
        new_active = await other.rotate(db)
    assert ring.active_kid != new_active
    await ring.reload()
    _switch(h)
    assert ring.active_kid == new_active


# -- a rotated-in key signs only after one JWKS max-age (issue 12, item 12) ----------------------


def _kid(token: str) -> str:
    kid: str = jwt.get_unverified_header(token)["kid"]
    return kid


async def test_a_rotated_in_key_is_published_at_once_but_signs_only_after_one_max_age(
    harness: Harness,
):
    h = harness
    ring: KeyRing = h.services.get(KeyRing)
    old = ring.active_kid
    async with h.services.core.session_factory() as db:
        new = await ring.rotate(db)
    assert new != old and new in {k["kid"] for k in (await _jwks(h))["keys"]}
    # The next key was published at start-up (now): a runtime may hold a JWKS without it for
    # one max-age, plus the reload interval of the other control-plane processes.
    wait = publish_delay(h.services.core.settings)
    assert wait.total_seconds() >= h.services.core.settings.jwks_max_age_seconds
    assert _kid(ring.sign({"sub": "u"}, audience="quoroom-runtime")) == old
    assert ring.active_kid == old and ring.pending_switch == (new, h.clock.now + wait)
    h.clock.advance(wait.total_seconds() - 1)
    assert _kid(ring.sign({"sub": "u"}, audience="quoroom-runtime")) == old
    h.clock.advance(1)
    assert _kid(ring.sign({"sub": "u"}, audience="quoroom-runtime")) == new
    assert ring.active_kid == new and ring.pending_switch is None
    # The old key stays published until the last token it signed has expired.
    h.clock.advance(RETIRED_KEY_LIFETIME.total_seconds() - 1)
    await ring.reload()
    assert old in {k["kid"] for k in (await _jwks(h))["keys"]}
    h.clock.advance(2)
    await ring.reload()
    assert old not in {k["kid"] for k in (await _jwks(h))["keys"]}


async def test_a_runtime_with_a_cached_jwks_never_sees_an_unknown_signing_key(harness: Harness):
    h = harness
    ring: KeyRing = h.services.get(KeyRing)
    wait = publish_delay(h.services.core.settings)
    max_age = h.services.core.settings.jwks_max_age_seconds
    fetched: list[tuple[float, set[str]]] = []  # (time, kids) of every JWKS a runtime took
    for _ in range(3):
        fetched.append((h.clock.now.timestamp(), {k["kid"] for k in (await _jwks(h))["keys"]}))
        async with h.services.core.session_factory() as db:
            await ring.rotate(db)
        h.clock.advance(10)
        async with h.services.core.session_factory() as db:  # an impatient operator, again
            try:
                await ring.rotate(db)
            except KeysNotReady:
                pass
        for _ in range(int(wait.total_seconds() // 30) + 2):
            now = h.clock.now.timestamp()
            kid = _kid(ring.sign({"sub": "u"}, audience="quoroom-runtime"))
            # Any JWKS still fresh in a runtime's cache (fetched within max-age) has the kid.
            for at, kids in fetched:
                if now - at <= max_age:
                    assert kid in kids, (now - at, kid)
            fetched.append((now, {k["kid"] for k in (await _jwks(h))["keys"]}))
            h.clock.advance(30)


async def test_a_second_rotation_waits_for_the_first_to_take_effect(harness: Harness):
    h = harness
    ring: KeyRing = h.services.get(KeyRing)
    async with h.services.core.session_factory() as db:
        first = await ring.rotate(db)
    async with h.services.core.session_factory() as db:
        with pytest.raises(KeysNotReady) as info:
            await ring.rotate(db)
    assert first in info.value.message
    h.clock.advance(publish_delay(h.services.core.settings).total_seconds())
    async with h.services.core.session_factory() as db:
        second = await ring.rotate(db)
    assert second != first


async def test_another_process_sees_the_scheduled_switch_after_reload(harness: Harness):
    h = harness
    ring: KeyRing = h.services.get(KeyRing)
    other = KeyRing(h.services.core.settings, h.services.core.session_factory, clock=h.clock)
    await other.reload()
    old = other.active_kid
    async with h.services.core.session_factory() as db:
        new = await other.rotate(db)
    await ring.reload()
    assert ring.active_kid == old and ring.pending_switch is not None
    h.clock.advance(publish_delay(h.services.core.settings).total_seconds())
    assert _kid(ring.sign({"sub": "u"}, audience="quoroom-runtime")) == new
