"""Google sign-in: OpenID Connect authorization code flow with PKCE (S256), state and nonce.

* ``state`` is bound to the browser by a signed, short-lived, HttpOnly cookie that also carries
  the nonce and the PKCE verifier (fastapi-users CVE-2025-68481: state not bound to the browser
  let an attacker log a victim into the attacker's account).
* The ID token is verified against the provider's JWKS: signature (RS256 only, fixed here; the
  key is picked by ``kid`` and bound to its one algorithm), ``iss``, ``aud``, ``exp``/``iat``,
  ``nonce``; the caller then requires ``email_verified``.
* All endpoints come from the discovery document at ``GOOGLE_DISCOVERY_URL`` (configurable so
  tests use a fake provider on loopback). The JWKS URL is the discovery document's ``jwks_uri``,
  never anything a token says.
* The keys live in the runtime's :class:`room_cloud_runtime.JWKSCache` configured for RS256: one
  fetch in flight, last good keys kept when a fetch fails, an unknown ``kid`` (Google rotated)
  refetched at most once per cooldown, background refresh at the JWKS ``max-age``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import jwt
from itsdangerous import BadSignature, URLSafeTimedSerializer

from control_plane.errors import (
    InvalidIdToken,
    OAuthNotConfigured,
    OAuthProviderError,
    OAuthProviderUnavailable,
    OAuthStateMismatch,
)
from control_plane.settings import TOKEN_LEEWAY_SECONDS, Settings
from room_cloud_runtime import ConfigError, JWKSCache, KeysUnavailableError, UnknownKeyError

STATE_COOKIE = "qr_oauth"
STATE_COOKIE_PATH = "/api/auth/google"
STATE_MAX_AGE = 600
ID_TOKEN_ALGORITHMS = ("RS256",)  # what Google signs ID tokens with
MAX_RESPONSE_BYTES = 256 * 1024
DISCOVERY_TTL = 3600.0
UNKNOWN_KID_COOLDOWN = 30.0
_GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")


@dataclass(frozen=True, slots=True)
class GoogleIdentity:
    subject: str
    email: str
    email_verified: bool
    name: str | None


@dataclass(frozen=True, slots=True)
class PendingLogin:
    """What the state cookie remembers between the redirect and the callback."""

    state: str
    nonce: str
    verifier: str
    next_path: str


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 S256: BASE64URL(SHA256(verifier))."""
    return _b64url(hashlib.sha256(verifier.encode()).digest())


def safe_next_path(value: str | None) -> str:
    """A same-site relative path to return to after sign-in; anything else becomes ``/``.

    Refuses absolute URLs, scheme-relative ``//host`` and backslash tricks (open redirect).
    """
    if not value or len(value) > 512 or not value.startswith("/") or value.startswith("//"):
        return "/"
    if "\\" in value or any(ord(c) < 0x20 for c in value):
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


class StateCookie:
    """The signed state cookie (itsdangerous, timestamped, 10 minutes)."""

    def __init__(self, secret: bytes) -> None:
        self._serializer = URLSafeTimedSerializer(secret, salt="quoroom-google-state")

    def new(self, next_path: str) -> tuple[PendingLogin, str]:
        pending = PendingLogin(
            state=secrets.token_urlsafe(32),
            nonce=secrets.token_urlsafe(32),
            verifier=secrets.token_urlsafe(64),  # 86 chars: within RFC 7636's 43..128
            next_path=safe_next_path(next_path),
        )
        value = self._serializer.dumps(
            {"s": pending.state, "n": pending.nonce, "v": pending.verifier, "r": pending.next_path}
        )
        return pending, value

    def open(self, cookie: str | None, state: str | None) -> PendingLogin:
        if not cookie or not state or len(cookie) > 2048 or len(state) > 256:
            raise OAuthStateMismatch()
        try:
            data = self._serializer.loads(cookie, max_age=STATE_MAX_AGE)
        except BadSignature as exc:
            raise OAuthStateMismatch() from exc
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), str) for k in ("s", "n", "v", "r")
        ):
            raise OAuthStateMismatch()
        if not hmac.compare_digest(data["s"].encode(), state.encode()):
            raise OAuthStateMismatch()
        return PendingLogin(data["s"], data["n"], data["v"], safe_next_path(data["r"]))


class GoogleClient:
    """Discovery, token exchange and ID-token verification over httpx."""

    def __init__(
        self,
        settings: Settings,
        *,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not settings.google_client_id or settings.google_client_secret is None:
            raise OAuthNotConfigured()
        self.client_id = settings.google_client_id
        self._client_secret = settings.google_client_secret.get_secret_value()
        self.discovery_url = settings.google_discovery_url
        self.redirect_uri = f"{settings.public_url}/api/auth/google/callback"
        self._http = client or httpx.AsyncClient(
            timeout=settings.google_http_timeout_seconds, follow_redirects=False
        )
        self._owns_http = client is None
        self._clock = clock
        self._http_timeout = settings.google_http_timeout_seconds
        self._lock = asyncio.Lock()
        self._discovery: dict[str, Any] | None = None
        self._discovery_at = 0.0
        # Made and started with the first discovery document (the JWKS URL comes from it);
        # closed by aclose().
        self._jwks: JWKSCache | None = None
        self._closed = False

    async def aclose(self) -> None:
        async with self._lock:
            self._closed = True
            if self._jwks is not None:
                await self._jwks.aclose()
                self._jwks = None
        if self._owns_http:
            await self._http.aclose()

    # -- HTTP helpers ----------------------------------------------------------------------------

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            response = await self._http.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise OAuthProviderUnavailable() from exc
        return self._json(response)

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        if len(response.content) > MAX_RESPONSE_BYTES:
            raise OAuthProviderUnavailable("the identity provider's answer is too large")
        try:
            data = json.loads(response.content)
        except (ValueError, RecursionError) as exc:
            raise OAuthProviderUnavailable(
                "the identity provider answered with invalid JSON"
            ) from exc
        if not isinstance(data, dict):
            raise OAuthProviderUnavailable("the identity provider answered with invalid JSON")
        if response.status_code >= 500:
            raise OAuthProviderUnavailable()
        return data

    async def discovery(self) -> dict[str, Any]:
        now = self._clock()
        if self._discovery is not None and now - self._discovery_at < DISCOVERY_TTL:
            return self._discovery
        async with self._lock:
            if self._discovery is not None and self._clock() - self._discovery_at < DISCOVERY_TTL:
                return self._discovery
            doc = await self._get_json(self.discovery_url)
            for name in ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri"):
                value = doc.get(name)
                if not isinstance(value, str) or urlsplit(value).scheme not in ("https", "http"):
                    raise OAuthProviderUnavailable(f"discovery document has no valid {name}")
            await self._pin_jwks(doc["jwks_uri"])
            self._discovery, self._discovery_at = doc, self._clock()
            return doc

    async def _pin_jwks(self, jwks_uri: str) -> None:
        """Start the JWKS cache for ``jwks_uri`` (under ``_lock``), replacing one for another URL.

        Its first fetch failing is not an error here: the cache retries in the background and
        verification answers "provider unavailable" until keys arrive.
        """
        if self._closed:  # shutting down: start no new background task
            raise OAuthProviderUnavailable()
        if self._jwks is not None and self._jwks.url == jwks_uri:
            return
        try:
            cache = JWKSCache(
                jwks_uri,
                algorithms=ID_TOKEN_ALGORITHMS,
                timeout=self._http_timeout,
                unknown_kid_cooldown=UNKNOWN_KID_COOLDOWN,
                client=self._http,
            )
        except ConfigError as exc:
            raise OAuthProviderUnavailable("discovery document has no valid jwks_uri") from exc
        await cache.start()
        old, self._jwks = self._jwks, cache
        if old is not None:
            await old.aclose()

    # -- the flow --------------------------------------------------------------------------------

    async def authorization_url(self, pending: PendingLogin) -> str:
        doc = await self.discovery()
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.client_id,
                "redirect_uri": self.redirect_uri,
                "scope": "openid email profile",
                "state": pending.state,
                "nonce": pending.nonce,
                "code_challenge": pkce_challenge(pending.verifier),
                "code_challenge_method": "S256",
                "prompt": "select_account",
            }
        )
        endpoint = doc["authorization_endpoint"]
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}"

    async def exchange(self, code: str, pending: PendingLogin) -> GoogleIdentity:
        doc = await self.discovery()
        try:
            response = await self._http.post(
                doc["token_endpoint"],
                data={
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": self.redirect_uri,
                    "client_id": self.client_id,
                    "client_secret": self._client_secret,
                    "code_verifier": pending.verifier,
                },
                headers={"Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise OAuthProviderUnavailable() from exc
        data = self._json(response)
        if response.status_code != 200:
            raise OAuthProviderError()
        id_token = data.get("id_token")
        if not isinstance(id_token, str) or len(id_token) > 16384:
            raise InvalidIdToken("the identity provider returned no ID token")
        return await self.verify_id_token(id_token, nonce=pending.nonce)

    async def verify_id_token(self, id_token: str, *, nonce: str) -> GoogleIdentity:
        doc = await self.discovery()
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.InvalidTokenError as exc:
            raise InvalidIdToken() from exc
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ID_TOKEN_ALGORITHMS or not isinstance(kid, str):
            raise InvalidIdToken()
        jwks = self._jwks
        if jwks is None:  # discovery() pins it; None only once aclose() ran
            raise OAuthProviderUnavailable()
        try:
            key = await jwks.resolve(kid)
        except UnknownKeyError as exc:
            raise InvalidIdToken("the ID token was signed by an unknown key") from exc
        except KeysUnavailableError as exc:
            raise OAuthProviderUnavailable() from exc
        if key.algorithm != alg:  # a key is used with exactly one algorithm (algorithm confusion)
            raise InvalidIdToken()
        issuer = doc["issuer"]
        try:
            claims = jwt.decode(
                id_token,
                key.key,
                algorithms=[key.algorithm],
                audience=self.client_id,
                leeway=TOKEN_LEEWAY_SECONDS,
                options={"require": ["iss", "aud", "exp", "iat", "sub"], "verify_iss": False},
            )
        except jwt.InvalidTokenError as exc:
            raise InvalidIdToken() from exc
        issuers = _GOOGLE_ISSUERS if issuer in _GOOGLE_ISSUERS else (issuer,)
        if claims.get("iss") not in issuers:
            raise InvalidIdToken()
        token_nonce = claims.get("nonce")
        if not isinstance(token_nonce, str) or not hmac.compare_digest(
            token_nonce.encode(), nonce.encode()
        ):
            raise InvalidIdToken("the sign-in response does not match this request (nonce)")
        azp = claims.get("azp")
        if azp is not None and azp != self.client_id:
            raise InvalidIdToken()
        subject, email = claims.get("sub"), claims.get("email")
        if not isinstance(subject, str) or not subject or len(subject) > 255:
            raise InvalidIdToken()
        if not isinstance(email, str) or not email or len(email) > 254 or "@" not in email:
            raise InvalidIdToken("the Google account has no email address")
        verified = claims.get("email_verified")
        name = claims.get("name")
        return GoogleIdentity(
            subject=subject,
            email=email,
            email_verified=verified is True or verified == "true",
            name=name[:100] if isinstance(name, str) and name else None,
        )
