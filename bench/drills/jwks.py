"""The JWKS unreachable for an hour of simulated time, for the runtime's verifier.

The runtime's :class:`~room_cloud_runtime.JWKSCache` and :class:`~room_cloud_runtime.TokenVerifier`
run with their default settings and two fake clocks (the cache's monotonic one and the verifier's
wall clock) advanced together in steps of 10 s; the JWKS is fetched through an httpx mock
transport that answers with the key set (``Cache-Control: max-age=300``, as the control plane
sends it) while the control plane is up and refuses the connection while it is down. The cache's
background refresh is driven by the simulation at the times the cache asks for
(:attr:`JWKSCache.next_refresh_in`).
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import httpx

from bench.drills.provisioning import DrillResult
from room_cloud_runtime import JWKSCache, KeysUnavailableError, TokenError, TokenVerifier
from tests.helpers.tokens import SigningKey, TokenFactory, craft

ISSUER = "https://cloud.quoroom.test"
INSTANCE = "inst-drill"
STEP = 10.0
TTL = 900  # the control plane's runtime-token lifetime (≤ 15 min)
REFRESH_AT = 0.8  # the Room UI refreshes at 80 % of a token's life


class _Sim:
    def __init__(self, start: float) -> None:
        self.wall = start
        self.mono = 1000.0
        self.up = True
        self.fetches = 0
        self.failed_fetches = 0
        self.jwks: dict[str, Any] = {"keys": []}

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.fetches += 1
        if not self.up:
            self.failed_fetches += 1
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(
            200,
            content=json.dumps(self.jwks).encode(),
            headers={"content-type": "application/json", "cache-control": "public, max-age=300"},
        )


async def jwks_outage(quick: bool, work: Path) -> DrillResult:
    started = time.monotonic()
    users = 5 if quick else 30
    sim = _Sim(start=float(int(time.time())))
    factory = TokenFactory(ISSUER, INSTANCE)
    current, upcoming = factory.key, SigningKey()
    # The key rotation publishes the next key before it signs (control_plane/keys): the runtime
    # already holds it when the outage begins.
    sim.jwks = {"keys": [current.public_jwk(), upcoming.public_jwk()]}
    client = httpx.AsyncClient(transport=httpx.MockTransport(sim.handler))
    cache = JWKSCache(f"{ISSUER}/.well-known/jwks.json", client=client, clock=lambda: sim.mono)
    verifier = TokenVerifier(cache, issuer=ISSUER, instance_id=INSTANCE, clock=lambda: sim.wall)
    stranger = SigningKey(kid=current.kid)  # same kid, another key: a forgery
    other = TokenFactory(ISSUER, "another-instance", key=current)

    counts = {
        "valid checked": 0,
        "valid refused": 0,
        "invalid checked": 0,
        "invalid accepted": 0,
    }
    refusal_codes: dict[str, int] = {}
    tokens: dict[int, tuple[str, float]] = {}

    def signer_at(t: float) -> SigningKey:
        return upcoming if t >= rotate_at else current

    def mint(user: int) -> str:
        key = signer_at(sim.wall)
        return factory.mint(sub=f"user-{user}", ttl=TTL, key=key, now=sim.wall)

    def invalid_tokens() -> list[str]:
        now = sim.wall
        good = signer_at(now)
        return [
            factory.mint(key=stranger, now=now, ttl=TTL),  # forged: right kid, wrong key
            factory.mint(key=SigningKey(), now=now, ttl=TTL),  # unknown kid
            factory.mint(key=good, now=now - 2 * TTL, ttl=TTL),  # expired
            other.mint(key=good, now=now, ttl=TTL),  # another instance's
            factory.mint(key=good, now=now, ttl=TTL, aud="someone-else"),
            factory.mint(key=good, now=now, ttl=TTL, role="admin"),
            factory.mint(key=good, now=now, ttl=7200),  # a lifetime past 15 min
            craft({"alg": "none", "kid": good.kid}, factory.claims(now=now), b""),
            craft(
                {"alg": "EdDSA", "kid": good.kid}, factory.claims(now=now), secrets.token_bytes(64)
            ),
        ]

    async def tick(valid_expected: bool, window: dict[str, int]) -> None:
        for user in range(users):
            token, issued = tokens.get(user, ("", -1e18))
            if sim.wall - issued >= TTL * REFRESH_AT:
                token, issued = mint(user), sim.wall
                tokens[user] = (token, issued)
            window["valid checked"] += 1
            try:
                await verifier.verify(token)
            except (TokenError, KeysUnavailableError) as exc:
                window["valid refused"] += 1
                code = getattr(exc, "code", type(exc).__name__)
                refusal_codes[code] = refusal_codes.get(code, 0) + 1
        for token in invalid_tokens():
            window["invalid checked"] += 1
            try:
                await verifier.verify(token)
                window["invalid accepted"] += 1
            except (TokenError, KeysUnavailableError):
                pass

    next_fetch = 0.0

    async def background() -> None:
        nonlocal next_fetch
        if sim.mono >= next_fetch:
            await cache.refresh()
            next_fetch = sim.mono + cache.next_refresh_in

    # Up for 10 minutes, then down for an hour (the CP rotates to the published key mid-way).
    await background()
    warmup = {k: 0 for k in counts}
    hour = dict(counts)
    beyond = {k: 0 for k in counts}
    after = {k: 0 for k in counts}
    outage_start = sim.wall + 600
    rotate_at = outage_start + 1800
    while sim.wall < outage_start:
        await tick(True, warmup)
        sim.advance(STEP)
        await background()
    sim.up = False
    fetches_before = sim.fetches
    while sim.wall < outage_start + 3600:
        await tick(True, hour)
        sim.advance(STEP)
        await background()
    outage_fetches = sim.fetches - fetches_before
    codes_in_hour = dict(refusal_codes)
    # The documented bound: past JWKS_MAX_STALENESS (6 h) the runtime fails closed (503).
    beyond_hours = 0.0 if quick else 5.5
    if beyond_hours:
        step = 60.0
        while sim.wall < outage_start + 3600 + beyond_hours * 3600:
            sim.advance(step)
            await background()
        await tick(False, beyond)
    stale = not cache.loaded
    # The control plane comes back: how long until valid tokens are accepted again.
    sim.up = True
    back_at = sim.wall
    recovered_after: float | None = None
    while sim.wall < back_at + 600:
        probe = {k: 0 for k in counts}
        await tick(True, probe)
        after = {k: after[k] + probe[k] for k in after}
        if probe["valid refused"] == 0:
            recovered_after = sim.wall - back_at
            break
        sim.advance(STEP)
        await background()
    await cache.aclose()
    await client.aclose()
    ok = hour["valid refused"] == 0 and all(
        w["invalid accepted"] == 0 for w in (warmup, hour, beyond, after)
    )
    figures: dict[str, Any] = {
        "lost": "-",
        "simulated users": users,
        "valid tokens checked during the hour": hour["valid checked"],
        "valid tokens refused during the hour": hour["valid refused"],
        "invalid tokens checked during the hour": hour["invalid checked"],
        "invalid tokens accepted (whole run)": sum(
            w["invalid accepted"] for w in (warmup, hour, beyond, after)
        ),
        "JWKS fetch attempts during the hour": outage_fetches,
    }
    if beyond_hours:
        figures["after 6.5 h without the JWKS: valid refused / checked"] = (
            f"{beyond['valid refused']}/{beyond['valid checked']} (keys stale: {stale})"
        )
        figures["valid accepted again after the control plane is back (simulated s)"] = (
            recovered_after
        )
    figures.pop("lost")
    return DrillResult(
        "jwks-outage",
        "The JWKS unreachable for an hour of simulated time (the runtime's verifier)",
        ok=ok,
        figures=figures,
        notes=[
            f"{users} users each present their current token every {STEP:g} s (tokens of "
            f"{TTL // 60} min, renewed at 80 % of their life, as the Room UI does), with nine "
            "invalid tokens each step (forged signature under the real kid, unknown kid, "
            "expired, another instance's, wrong audience, role `admin`, a 2-hour lifetime, "
            "`alg: none`, random signature). The JWKS goes down after 10 minutes; 30 minutes "
            "into the outage the control plane starts signing with the key its rotation had "
            "published before (the runtime holds it: accepted). Default settings: refresh at "
            "max-age (300 s), retry backoff from 1 s up to JWKS_MIN_REFRESH (60 s), "
            "JWKS_MAX_STALENESS 6 h. Past that bound the runtime refuses every token (503 "
            "`keys_unavailable`, fail closed, docs/operations.md) — shown on its own line, "
            "not a target miss — and accepts them again at the first fetch once the "
            "control plane answers.",
            "The fetch attempts during the hour are the background retries (backoff capped at "
            "60 s: ~60 an hour) plus the refetches the unknown-kid and stale-key paths allow "
            "(at most one per 30 s cooldown, whatever the number of such tokens: ~120 an "
            "hour): the control plane is not hammered while it is down.",
            f"Refusal codes of valid tokens: {codes_in_hour or 'none in the hour'}; "
            f"after the bound: {_diff(refusal_codes, codes_in_hour) or '-'}.",
        ],
        problems=[] if ok else [f"hour: {hour}", f"warmup: {warmup}"],
        seconds=time.monotonic() - started,
    )


def _diff(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0)}
