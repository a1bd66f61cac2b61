"""Runtime tokens: what a hosted Room's ``room_cloud_runtime`` accepts (DESIGN.md "Runtime token").

EdDSA with ``kid``, signed by the key ring; claims ``iss`` (the public URL, which the runtime has
as ``QUOROOM_CLOUD_ISSUER``), ``aud`` ``quoroom-runtime``, ``sub``, ``instanceId``, ``role``,
``iat``/``nbf``/``exp`` (TTL from settings, ≤ 15 min), ``jti``, ``sid`` (the control-plane session),
``email``, ``emailVerified`` and ``name``.

A refresh takes the current, still-valid runtime token as its proof (the Room UI runs on the
runtime's origin and has no control-plane cookie). It checks what the runtime checks, and more:
the ``sid`` session must still be live, the caller must still be the owner or an active member,
and the instance must still be open — so a removed member or a signed-out session gets no new
token, and old ones die within their TTL.
"""

from __future__ import annotations

import hmac
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

import jwt
from sqlalchemy import and_, select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.models import User, UserSession
from control_plane.errors import InstanceNotRunning, InvalidRuntimeToken
from control_plane.instances.access import MAX_ID_LENGTH
from control_plane.instances.lifecycle import OPENABLE
from control_plane.instances.models import (
    CloudInstance,
    CloudInstanceMember,
    InstanceStatus,
    MemberStatus,
    Role,
)
from control_plane.keys.service import KeyRing
from control_plane.settings import Settings

RUNTIME_AUDIENCE = "quoroom-runtime"
MAX_TOKEN_LENGTH = 4096
ROLES = frozenset({"owner", "member"})


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_at: datetime
    runtime_url: str
    launch_url: str


def runtime_origin(url: str | None) -> str | None:
    """The exact origin (scheme://host[:port], lower-case, default port dropped) of a URL."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    default = 443 if parts.scheme == "https" else 80
    port = f":{parts.port}" if parts.port not in (None, default) else ""
    return f"{parts.scheme}://{host}{port}"


def launch_url(runtime_url: str, token: str, runtime_kind: str) -> str:
    """Where the browser opens the Room with ``token``, in the style its UI reads.

    The reference Room takes it from the fragment (``#launch=``: never sent to any server). The
    real Room's UI reads ``?token=`` and removes it from the address bar; the query reaches the
    runtime, whose access log never records query strings. Either way no page of ours sends it
    as a Referer (``Referrer-Policy: no-referrer``).
    """
    base, quoted = runtime_url.rstrip("/"), quote(token, safe="")
    if runtime_kind == "quoroom":
        return f"{base}/?token={quoted}"
    return f"{base}/#launch={quoted}"


def ensure_openable(instance: CloudInstance) -> str:
    """The instance's runtime URL, or :class:`InstanceNotRunning`."""
    if InstanceStatus(instance.status) not in OPENABLE or not instance.url:
        raise InstanceNotRunning()
    return instance.url


def issue(
    ring: KeyRing,
    settings: Settings,
    *,
    user: User,
    instance: CloudInstance,
    role: Role,
    session_id: str,
    now: datetime,
) -> IssuedToken:
    """A fresh runtime token (new ``jti``) for ``user`` on an open ``instance``."""
    runtime_url = ensure_openable(instance)
    issued_at = int(now.timestamp())
    expires = issued_at + settings.runtime_token_ttl_seconds
    claims: dict[str, Any] = {
        "iss": settings.issuer,
        "sub": user.id,
        "instanceId": instance.id,
        "role": role,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": expires,
        "jti": uuid.uuid4().hex,
        "sid": session_id,
        "email": user.email,
        "emailVerified": bool(user.email_verified),
    }
    if user.name:
        claims["name"] = user.name
    token = ring.sign(claims, audience=RUNTIME_AUDIENCE)
    return IssuedToken(
        token,
        datetime.fromtimestamp(expires, tz=UTC),
        runtime_url,
        launch_url(runtime_url, token, instance.runtime_kind),
    )


def verify_runtime_token(
    ring: KeyRing, token: str, *, instance_id: str, now: datetime
) -> dict[str, Any]:
    """The claims of a runtime token this control plane issued for ``instance_id`` that has not
    expired yet (no leeway: the clock that checks is the one that signed)."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        raise InvalidRuntimeToken()
    try:
        claims = ring.verify(token, audience=RUNTIME_AUDIENCE)
    except jwt.InvalidTokenError as exc:
        raise InvalidRuntimeToken() from exc
    exp, sub, sid = claims.get("exp"), claims.get("sub"), claims.get("sid")
    token_instance, role = claims.get("instanceId"), claims.get("role")
    if not isinstance(exp, int) or exp <= now.timestamp():
        raise InvalidRuntimeToken("the runtime token has expired; open the Room again")
    if not (isinstance(sub, str) and isinstance(sid, str) and isinstance(token_instance, str)):
        raise InvalidRuntimeToken()
    if not hmac.compare_digest(token_instance.encode(), instance_id.encode()):
        raise InvalidRuntimeToken()
    if role not in ROLES:
        raise InvalidRuntimeToken()
    return claims


@dataclass(frozen=True, slots=True)
class RefreshView:
    """Everything a refresh decides on, read in one round trip to the database."""

    #: The instance named in the path (None: no such instance). The route checks the caller's
    #: origin against its runtime URL before anything else is answered.
    instance: CloudInstance | None
    #: The token's claims, or why the token itself does not hold.
    claims: dict[str, Any] | None
    refused: InvalidRuntimeToken | None
    #: The token's user while its ``sid`` session is live, and whether they are an active member.
    user: User | None
    member: bool


async def read_refresh(
    db: AsyncSession, ring: KeyRing, *, instance_id: str, token: str, now: datetime
) -> RefreshView:
    """Verify ``token`` (no I/O) and read the instance, the live session's user and their active
    membership in one statement: the refresh is the hottest control-plane path (every open Room UI
    calls it each TTL), and four sequential round trips were most of its latency."""
    claims: dict[str, Any] | None = None
    refused: InvalidRuntimeToken | None = None
    try:
        claims = verify_runtime_token(ring, token, instance_id=instance_id, now=now)
    except InvalidRuntimeToken as exc:
        refused = exc
    if not 0 < len(instance_id) <= MAX_ID_LENGTH:
        return RefreshView(None, claims, refused, None, False)
    # With no verified claims the session join matches nothing: only the instance is read.
    sub = claims["sub"] if claims else ""
    sid = claims["sid"] if claims else ""
    live = and_(
        UserSession.id == sid,
        UserSession.user_id == sub,
        UserSession.revoked_at.is_(None),
        UserSession.expires_at > now,
    )
    row = (
        await db.execute(
            select(CloudInstance, User, CloudInstanceMember.id)
            .select_from(CloudInstance)
            .outerjoin(UserSession, live)
            .outerjoin(User, User.id == UserSession.user_id)
            .outerjoin(
                CloudInstanceMember,
                and_(
                    CloudInstanceMember.instance_id == CloudInstance.id,
                    CloudInstanceMember.user_id == User.id,
                    CloudInstanceMember.status == MemberStatus.ACTIVE,
                ),
            )
            .where(CloudInstance.id == instance_id)
            .limit(1)
            .execution_options(populate_existing=True)
        )
    ).first()
    if row is None:
        return RefreshView(None, claims, refused, None, False)
    instance, user, member_id = row
    return RefreshView(instance, claims, refused, user, member_id is not None)


@dataclass(frozen=True, slots=True)
class RefreshGrant:
    """Who a refresh is for, once its token and the access behind it hold."""

    user: User
    instance: CloudInstance
    role: Role
    session_id: str


def authorize_refresh(view: RefreshView) -> RefreshGrant:
    """The grant for the holder of a valid token, if access still holds; raises otherwise."""
    if view.refused is not None or view.claims is None:
        raise view.refused or InvalidRuntimeToken()
    if view.instance is None:
        raise InvalidRuntimeToken("you no longer have access to this Room")
    if view.user is None:
        raise InvalidRuntimeToken("the session has ended; sign in again")
    role: Role | None = (
        "owner" if view.instance.owner_id == view.user.id else "member" if view.member else None
    )
    if role is None:
        raise InvalidRuntimeToken("you no longer have access to this Room")
    return RefreshGrant(view.user, view.instance, role, view.claims["sid"])


def reissue(
    ring: KeyRing, settings: Settings, grant: RefreshGrant, *, now: datetime
) -> IssuedToken:
    """A new token (new ``jti``, same ``sid``) for an authorized refresh."""
    return issue(
        ring,
        settings,
        user=grant.user,
        instance=grant.instance,
        role=grant.role,
        session_id=grant.session_id,
        now=now,
    )
