"""Runtime tokens: issued to the owner and active members of an open instance, exactly per the
token contract, accepted by ``room_cloud_runtime`` (through this control plane's real JWKS), and
refreshed with the current token as proof — under the instance's runtime origin only."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import jwt
import pytest
from pydantic import ValidationError
from sqlalchemy import event

from control_plane.keys.service import KeyRing
from room_cloud_runtime import JWKSCache, RuntimeSettings, RuntimeStack, TokenVerifier
from room_cloud_runtime.reference import create_room_app
from tests.control_plane.conftest import PUBLIC_URL, login_cookie
from tests.control_plane.instances.helpers import RUNTIME_URL, Cloud, S, User
from tests.helpers.tokens import TokenFactory


def _url(instance_id: str, tail: str) -> str:
    return f"/api/cloud/instances/{instance_id}/{tail}"


async def _token(cloud: Cloud, user: User, instance_id: str) -> Any:
    return await cloud.client.post(_url(instance_id, "runtime-token"), headers=user.headers)


async def _refresh(cloud: Cloud, instance_id: str, token: Any, **headers: str) -> Any:
    return await cloud.client.post(
        _url(instance_id, "refresh-token"), json={"token": token}, headers=headers
    )


def _claims(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


async def _with_member(cloud: Cloud) -> tuple[User, User, str]:
    owner = await cloud.user("owner@example.com")
    member = await cloud.user("member@example.com")
    instance_id = await cloud.paid_and_running(owner)
    await cloud.invite_and_accept(owner, instance_id, member)
    return owner, member, instance_id


@asynccontextmanager
async def runtime(cloud: Cloud, instance_id: str) -> AsyncIterator[httpx.AsyncClient]:
    """The reference Room wrapped by the runtime stack in cloud mode, its JWKS cache fetching
    this control plane's real ``/.well-known/jwks.json`` (over ASGI, no network)."""
    settings = RuntimeSettings(
        mode="cloud",
        instance_id=instance_id,
        issuer=PUBLIC_URL,
        allowed_origins=(RUNTIME_URL,),
        jwks_unknown_kid_cooldown_seconds=0,
        access_log=False,
    )
    jwks_client = httpx.AsyncClient(transport=httpx.ASGITransport(app=cloud.h.app))
    cache = JWKSCache(settings.resolved_jwks_url, client=jwks_client, unknown_kid_cooldown=0)
    stack = RuntimeStack(create_room_app(), settings, jwks=cache)
    transport = httpx.ASGITransport(app=stack, client=("198.51.100.20", 40000))
    try:
        async with (
            stack.running(),
            httpx.AsyncClient(transport=transport, base_url=RUNTIME_URL) as room,
        ):
            yield room
    finally:
        await jwks_client.aclose()


# -- issuing -------------------------------------------------------------------------------------


async def test_the_token_carries_exactly_the_contracted_claims(cloud: Cloud) -> None:
    owner, member, instance_id = await _with_member(cloud)
    r = await _token(cloud, owner, instance_id)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"token", "expires_at", "runtime_url", "launch_url"}
    assert body["runtime_url"] == RUNTIME_URL
    ring: KeyRing = cloud.h.services.get(KeyRing)
    header = jwt.get_unverified_header(body["token"])
    assert header["alg"] == "EdDSA" and header["kid"] == ring.active_kid
    claims = _claims(body["token"])
    assert set(claims) == {
        "iss", "aud", "sub", "instanceId", "role", "iat", "nbf", "exp", "jti", "sid", "email",
        "emailVerified",
    }  # fmt: skip
    now = int(cloud.h.clock.now.timestamp())
    assert claims["iss"] == PUBLIC_URL and claims["aud"] == "quoroom-runtime"
    assert claims["sub"] == owner.user_id and claims["instanceId"] == instance_id
    assert claims["role"] == "owner" and claims["sid"] == owner.session_id
    assert claims["iat"] == claims["nbf"] == now and claims["exp"] == now + 600
    assert claims["email"] == "owner@example.com" and claims["emailVerified"] is True
    expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
    assert expires == cloud.h.clock.now.replace(microsecond=0) + timedelta(seconds=600)
    member_claims = _claims((await _token(cloud, member, instance_id)).json()["token"])
    assert member_claims["role"] == "member" and member_claims["sub"] == member.user_id
    again = _claims((await _token(cloud, owner, instance_id)).json()["token"])
    assert again["jti"] != claims["jti"]


async def test_a_reference_room_is_launched_with_the_token_in_the_fragment(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner, url=RUNTIME_URL + "/")
    grant = (await _token(cloud, owner, instance_id)).json()
    assert grant["launch_url"] == f"{RUNTIME_URL}/#launch={quote(grant['token'], safe='')}"


async def test_a_quoroom_room_is_launched_with_the_token_in_the_query_its_ui_reads(
    make_cloud: Any,
) -> None:
    async with make_cloud(runtime_kind="quoroom") as c:
        owner = await c.user("owner@example.com")
        instance_id = await c.paid_and_running(owner)
        grant = (await _token(c, owner, instance_id)).json()
    target = urlsplit(grant["launch_url"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == f"{RUNTIME_URL}/"
    assert parse_qs(target.query, strict_parsing=True) == {"token": [grant["token"]]}
    assert target.fragment == ""
    assert grant["runtime_url"] == RUNTIME_URL


async def test_the_control_plane_never_logs_a_runtime_token(
    make_cloud: Any, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """A quoroom launch end to end (grant, the open page, refreshes good and bad), every logger
    at DEBUG: no token and no token signature in any record or on the console."""
    caplog.set_level(logging.DEBUG)
    async with make_cloud(runtime_kind="quoroom") as c:
        owner = await c.user("owner@example.com")
        instance_id = await c.paid_and_running(owner)
        grant = (await _token(c, owner, instance_id)).json()
        page = await c.client.get(f"/app/instances/{instance_id}/open")
        assert page.headers["referrer-policy"] == "no-referrer"
        refreshed = await _refresh(c, instance_id, grant["token"], Origin=RUNTIME_URL)
        assert refreshed.status_code == 200
        head, payload, signature = grant["token"].split(".")
        tampered = f"{head}.{payload}.{signature[:-4]}AAAA"
        assert (await _refresh(c, instance_id, tampered)).status_code == 401
        foreign = await _refresh(c, instance_id, grant["token"], Origin="https://evil.example")
        assert foreign.status_code == 403
        c.h.clock.advance(601)
        assert (await _refresh(c, instance_id, grant["token"])).status_code == 401
    assert caplog.records, "nothing was logged: the check would prove nothing"
    out, err = capfd.readouterr()
    logged = "\n".join([caplog.text, out, err, *(str(r.args) for r in caplog.records)])
    for secret in (grant["token"], signature, refreshed.json()["token"], tampered):
        assert secret not in logged
        assert quote(secret, safe="") not in logged


async def test_the_name_claim_is_sent_when_the_user_has_a_name(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    from control_plane.auth.models import User as UserRow

    async with cloud.h.services.core.session_factory() as db:
        row = await db.get(UserRow, owner.user_id)
        assert row is not None
        row.name = "Ada"
        await db.commit()
    claims = _claims((await _token(cloud, owner, instance_id)).json()["token"])
    assert claims["name"] == "Ada"


async def test_the_ttl_comes_from_settings_and_is_at_most_fifteen_minutes(
    make_cloud: Any, make_settings: Any
) -> None:
    with pytest.raises(ValidationError):
        make_settings(runtime_token_ttl_seconds=901)
    async with make_cloud(runtime_token_ttl_seconds=120) as c:
        owner = await c.user("owner@example.com")
        instance_id = await c.paid_and_running(owner)
        claims = _claims((await _token(c, owner, instance_id)).json()["token"])
        assert claims["exp"] - claims["iat"] == 120


@pytest.mark.parametrize(
    "moves",
    [
        [],  # awaiting payment
        [(S.PROVISIONING, S.FAILED)],
        [(S.PROVISIONING, S.RUNNING), (S.RUNNING, S.PAST_DUE), (S.PAST_DUE, S.SUSPENDED)],
        [(S.PROVISIONING, S.CANCELED)],
    ],
)
async def test_no_token_while_the_instance_is_not_open(
    cloud: Cloud, moves: list[tuple[S, S]]
) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = (await cloud.created(owner))["instance"]["id"]
    if moves:
        assert cloud.stripe is not None
        session_id = (await cloud.instance(instance_id)).checkout_session_id or ""
        for event in cloud.stripe.complete_checkout(session_id):
            await cloud.deliver(event)
    for expected, to in moves:
        await cloud.worker(instance_id, expected, to, url=RUNTIME_URL)
    r = await _token(cloud, owner, instance_id)
    assert r.status_code == 409 and r.json()["code"] == "instance_not_running"


async def test_a_token_needs_a_signed_in_owner_or_member(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    stranger = await cloud.user("stranger@example.com")
    instance_id = await cloud.paid_and_running(owner)
    assert (await cloud.client.post(_url(instance_id, "runtime-token"))).status_code == 401
    r = await _token(cloud, stranger, instance_id)
    assert r.status_code == 404 and r.json()["code"] == "not_found"


async def test_a_pending_invite_gets_no_token(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    await cloud.client.post(
        _url(instance_id, "members"), json={"email": "invitee@example.com"}, headers=owner.headers
    )
    from control_plane.auth.models import User as UserRow

    async with cloud.h.services.core.session_factory() as db:  # an account, address unproven
        db.add(UserRow(email="invitee2@example.com", email_verified=False))
        await db.commit()
    stranger = await cloud.user("someone@example.com")
    assert (await _token(cloud, stranger, instance_id)).status_code == 404


# -- accepted by the runtime ---------------------------------------------------------------------


async def test_the_runtime_accepts_the_owners_token_and_says_owner(cloud: Cloud) -> None:
    owner, _, instance_id = await _with_member(cloud)
    token = (await _token(cloud, owner, instance_id)).json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    async with runtime(cloud, instance_id) as room:
        verify = await room.get("/api/auth/verify", headers=auth)
        assert verify.status_code == 200, verify.text
        assert verify.json()["ok"] is True and verify.json()["role"] == "owner"
        created = await room.post("/api/rooms", json={"name": "Launch"}, headers=auth)
        assert created.status_code == 201, created.text
        listed = await room.get("/api/rooms", headers=auth)
        assert listed.status_code == 200


async def test_the_runtime_refuses_a_members_write_and_allows_a_vote(cloud: Cloud) -> None:
    _, member, instance_id = await _with_member(cloud)
    token = (await _token(cloud, member, instance_id)).json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    async with runtime(cloud, instance_id) as room:
        verify = await room.get("/api/auth/verify", headers=auth)
        assert verify.json()["role"] == "member"
        write = await room.post("/api/rooms", json={"name": "Mine"}, headers=auth)
        assert write.status_code == 403, write.text
        vote = await room.post("/api/decisions/d1/vote", json={"vote": "yes"}, headers=auth)
        assert vote.status_code == 200, vote.text
        assert (await room.get("/api/rooms", headers=auth)).status_code == 200


async def test_the_runtime_refuses_a_token_for_another_instance(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    first = await cloud.paid_and_running(owner)
    second = await cloud.paid_and_running(owner, url="https://room-2.quoroom.test")
    token = (await _token(cloud, owner, second)).json()["token"]
    async with runtime(cloud, first) as room:
        r = await room.get("/api/auth/verify", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401


async def test_the_token_verifier_accepts_it_from_the_jwks_bytes(cloud: Cloud) -> None:
    """The same check without the stack: the verifier against the served JWKS document."""
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    token = (await _token(cloud, owner, instance_id)).json()["token"]
    jwks = await cloud.client.get("/.well-known/jwks.json")
    served = httpx.MockTransport(
        lambda _: httpx.Response(200, content=jwks.content, headers={"Cache-Control": "max-age=60"})
    )
    async with httpx.AsyncClient(transport=served) as client:
        cache = JWKSCache(f"{PUBLIC_URL}/.well-known/jwks.json", client=client)
        verifier = TokenVerifier(cache, issuer=PUBLIC_URL, instance_id=instance_id)
        async with cache:
            principal = await verifier.verify(token)
    assert principal.role == "owner" and principal.subject == owner.user_id
    assert principal.session_id == owner.session_id


# -- refresh -------------------------------------------------------------------------------------


async def test_a_valid_token_is_exchanged_for_a_new_one(cloud: Cloud) -> None:
    owner, member, instance_id = await _with_member(cloud)
    for user, role in ((owner, "owner"), (member, "member")):
        old = (await _token(cloud, user, instance_id)).json()["token"]
        r = await _refresh(cloud, instance_id, old)
        assert r.status_code == 200, r.text
        assert set(r.json()) == {"ok", "token"} and r.json()["ok"] is True
        new, before = _claims(r.json()["token"]), _claims(old)
        assert new["jti"] != before["jti"] and new["sid"] == before["sid"]
        assert new["role"] == role and new["exp"] >= before["exp"]
        # The new token works at the runtime.
        async with runtime(cloud, instance_id) as room:
            verify = await room.get(
                "/api/auth/verify", headers={"Authorization": f"Bearer {r.json()['token']}"}
            )
            assert verify.json()["role"] == role


@asynccontextmanager
async def _statements(cloud: Cloud) -> AsyncIterator[list[str]]:
    """The SQL statements the control plane sends while the block runs."""
    seen: list[str] = []
    engine = cloud.h.services.core.engine.sync_engine

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


@pytest.mark.parametrize("role", ["owner", "member"])
async def test_a_refresh_reads_the_database_once(cloud: Cloud, role: str) -> None:
    owner, member, instance_id = await _with_member(cloud)
    old = (await _token(cloud, owner if role == "owner" else member, instance_id)).json()["token"]
    async with _statements(cloud) as seen:  # from the Room UI's origin, the way it really calls
        r = await _refresh(cloud, instance_id, old, Origin=RUNTIME_URL)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == RUNTIME_URL
    queries = [s for s in seen if s.lstrip().upper().startswith(("SELECT", "WITH"))]
    assert len(queries) == 1, seen
    # A foreign origin is still refused before anything else, from that same one read.
    async with _statements(cloud) as seen:
        refused = await _refresh(cloud, instance_id, old, Origin="https://evil.example")
    assert refused.status_code == 403
    assert len([s for s in seen if s.lstrip().upper().startswith("SELECT")]) == 1


async def test_a_token_near_the_end_of_its_life_is_refreshed(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    old = (await _token(cloud, owner, instance_id)).json()["token"]
    cloud.h.clock.advance(599)  # the UI refreshes at 80 % of the life; this is the last second
    r = await _refresh(cloud, instance_id, old)
    assert r.status_code == 200
    assert _claims(r.json()["token"])["exp"] == _claims(old)["exp"] + 599


async def test_an_expired_token_cannot_be_refreshed(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    old = (await _token(cloud, owner, instance_id)).json()["token"]
    cloud.h.clock.advance(601)
    r = await _refresh(cloud, instance_id, old)
    assert r.status_code == 401 and r.json()["code"] == "invalid_token"


async def test_a_token_of_a_revoked_session_cannot_be_refreshed(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    old = (await _token(cloud, owner, instance_id)).json()["token"]
    out = await cloud.client.post("/api/auth/logout", headers=owner.headers)
    assert out.status_code == 200
    r = await _refresh(cloud, instance_id, old)
    assert r.status_code == 401 and "session" in r.json()["error"]


async def test_a_token_is_refreshed_only_for_its_own_instance(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    first = await cloud.paid_and_running(owner)
    second = await cloud.paid_and_running(owner, url="https://room-2.quoroom.test")
    token = (await _token(cloud, owner, first)).json()["token"]
    r = await _refresh(cloud, second, token)
    assert r.status_code == 401 and r.json()["code"] == "invalid_token"


async def test_a_suspended_instance_gives_no_new_token(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    old = (await _token(cloud, owner, instance_id)).json()["token"]
    await cloud.worker(instance_id, S.RUNNING, S.PAST_DUE)
    assert (await _refresh(cloud, instance_id, old)).status_code == 200
    await cloud.worker(instance_id, S.PAST_DUE, S.SUSPENDED)
    r = await _refresh(cloud, instance_id, old)
    assert r.status_code == 409 and r.json()["code"] == "instance_not_running"


async def test_forged_and_foreign_tokens_are_refused(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    good = (await _token(cloud, owner, instance_id)).json()["token"]
    head, payload, signature = good.split(".")
    other_key = TokenFactory(PUBLIC_URL, instance_id).mint(sub=owner.user_id, sid=owner.session_id)
    for token in (
        f"{head}.{payload}.{signature[:-4]}AAAA",  # bad signature
        f"{head}.{payload[:-2]}xx.{signature}",  # tampered payload
        other_key,  # signed by a key this control plane never published
        owner.access_token,  # a control-plane access token: another audience
        "not.a.token",
        "x" * 5000,
    ):
        r = await _refresh(cloud, instance_id, token)
        assert r.status_code in (401, 422), r.text
        assert r.json()["code"] in ("invalid_token", "invalid_body")


@pytest.mark.parametrize(
    "body", [b"", b"not json", b"{}", b'{"token": 42}', b'{"token": ""}', b"[]"]
)
async def test_a_malformed_refresh_body_is_refused(cloud: Cloud, body: bytes) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    r = await cloud.client.post(
        _url(instance_id, "refresh-token"),
        content=body,
        headers={"Content-Type": "application/json", "Origin": RUNTIME_URL},
    )
    assert r.status_code == 422 and r.json()["code"] == "invalid_body"
    assert r.headers["access-control-allow-origin"] == RUNTIME_URL


# -- CORS on the refresh endpoint ----------------------------------------------------------------


async def _preflight(cloud: Cloud, instance_id: str, origin: str, method: str = "POST") -> Any:
    return await cloud.client.options(
        _url(instance_id, "refresh-token"),
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "content-type",
        },
    )


async def test_the_runtime_origin_may_call_the_refresh_endpoint(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    pre = await _preflight(cloud, instance_id, RUNTIME_URL)
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == RUNTIME_URL
    # The real Room UI calls with credentials: "include"; without this the browser hides the
    # answer (the preflight's too).
    assert pre.headers["access-control-allow-credentials"] == "true"
    assert pre.headers["access-control-allow-methods"] == "POST"
    allowed = {h.strip() for h in pre.headers["access-control-allow-headers"].lower().split(",")}
    assert allowed == {"content-type", "authorization"}
    assert pre.headers["vary"] == "Origin"
    old = (await _token(cloud, owner, instance_id)).json()["token"]
    r = await _refresh(cloud, instance_id, old, Origin=RUNTIME_URL)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == RUNTIME_URL
    assert r.headers["access-control-allow-credentials"] == "true"
    assert r.headers["vary"] == "Origin"
    # A refusal is readable by the Room UI too.
    cloud.h.clock.advance(601)
    refused = await _refresh(cloud, instance_id, old, Origin=RUNTIME_URL)
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == RUNTIME_URL
    assert refused.headers["access-control-allow-credentials"] == "true"
    assert refused.headers["vary"] == "Origin"


async def test_a_credentialed_refresh_that_carries_session_cookies_needs_only_the_token(
    cloud: Cloud,
) -> None:
    """The browser sends the control plane's cookies along (same-site in development): no CSRF
    header is needed, and the cookies grant nothing — the token alone decides, for its holder."""
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    old = (await _token(cloud, owner, instance_id)).json()["token"]
    stranger = await cloud.user("stranger@example.com")
    await login_cookie(cloud.h, stranger.email)  # the client's jar now holds a session
    assert cloud.client.cookies.get("qr_access") and cloud.client.cookies.get("qr_csrf")
    browser = {"Origin": RUNTIME_URL, "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}
    r = await _refresh(cloud, instance_id, old, **browser)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-credentials"] == "true"
    # The new token is for the old one's holder, not for whoever the cookies belong to.
    assert _claims(r.json()["token"])["sub"] == owner.user_id
    head, payload, signature = old.split(".")
    for body in ({"token": f"{head}.{payload}.{signature[:-4]}AAAA"}, {}):
        refused = await cloud.client.post(
            _url(instance_id, "refresh-token"), json=body, headers=browser
        )
        assert refused.status_code in (401, 422), refused.text
        assert refused.json()["code"] in ("invalid_token", "invalid_body")


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "https://room-2.quoroom.test",  # another instance's runtime
        "http://room-1.quoroom.test",  # same host, other scheme
        "https://room-1.quoroom.test:8443",  # other port
        "null",
    ],
)
async def test_other_origins_are_refused(cloud: Cloud, origin: str) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    await cloud.paid_and_running(owner, url="https://room-2.quoroom.test")
    pre = await _preflight(cloud, instance_id, origin)
    assert pre.status_code == 403 and pre.json()["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in pre.headers
    assert "access-control-allow-credentials" not in pre.headers
    assert pre.headers["vary"] == "Origin"
    old = (await _token(cloud, owner, instance_id)).json()["token"]
    r = await _refresh(cloud, instance_id, old, Origin=origin)
    assert r.status_code == 403 and r.json()["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-credentials" not in r.headers
    assert r.headers["vary"] == "Origin"


async def test_a_preflight_for_another_method_or_a_stopped_instance_is_refused(
    cloud: Cloud,
) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    assert (await _preflight(cloud, instance_id, RUNTIME_URL, "DELETE")).status_code == 403
    unknown = await _preflight(cloud, "00000000-0000-0000-0000-000000000000", RUNTIME_URL)
    assert unknown.status_code == 403


async def test_no_other_cloud_endpoint_answers_cross_origin_requests(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    r = await cloud.client.options(
        _url(instance_id, "runtime-token"),
        headers={"Origin": RUNTIME_URL, "Access-Control-Request-Method": "POST"},
    )
    assert r.status_code == 405
    assert "access-control-allow-origin" not in r.headers
    got = await cloud.client.get(
        f"/api/cloud/instances/{instance_id}", headers={**owner.headers, "Origin": RUNTIME_URL}
    )
    assert "access-control-allow-origin" not in got.headers


async def test_the_dashboard_origin_may_refresh_without_cors_headers(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    old = (await _token(cloud, owner, instance_id)).json()["token"]
    r = await _refresh(cloud, instance_id, old, Origin=PUBLIC_URL)
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-credentials" not in r.headers
