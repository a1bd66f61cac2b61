"""A fake Google OpenID provider served over real HTTP on loopback.

Endpoints: discovery, ``/authorize`` (auto-approves and redirects back with a code), ``/token``
(checks client credentials, redirect URI and the PKCE S256 verifier, returns an RS256 ID token),
``/jwks``. Tests steer it through ``next_identity`` and ``claim_overrides``; :meth:`rotate` signs
with a new key (new ``kid``) while the JWKS keeps publishing the old one, as Google does.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import jwt
import uvicorn
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

CLIENT_ID = "quoroom-test-client.apps.googleusercontent.com"
CLIENT_SECRET = "fake-google-client-secret"


@dataclass
class _Grant:
    client_id: str
    redirect_uri: str
    challenge: str
    nonce: str | None
    identity: dict[str, Any]


@dataclass
class FakeGoogle:
    host: str = "127.0.0.1"
    port: int = 0
    next_identity: dict[str, Any] = field(
        default_factory=lambda: {
            "sub": "google-sub-1",
            "email": "gina@example.com",
            "email_verified": True,
            "name": "Gina",
        }
    )
    #: Applied to the ID token's claims (``None`` removes a claim).
    claim_overrides: dict[str, Any] = field(default_factory=dict)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    #: GET count on ``/jwks``.
    jwks_requests: int = 0

    def __post_init__(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "fake-rsa-1"
        self._initial = (self.kid, self._key)
        self._published: list[tuple[str, rsa.RSAPrivateKey]] = [self._initial]
        self._grants: dict[str, _Grant] = {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- server ----------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def discovery_url(self) -> str:
        return f"{self.base_url}/.well-known/openid-configuration"

    @property
    def issuer(self) -> str:
        return self.base_url

    def start(self) -> FakeGoogle:
        app = Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self._discovery),
                Route("/authorize", self._authorize),
                Route("/token", self._token, methods=["POST"]),
                Route("/jwks", self._jwks),
            ]
        )
        config = uvicorn.Config(
            app, host=self.host, port=0, log_level="warning", lifespan="off", ws="none"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake Google did not start")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def reset(self) -> None:
        self.claim_overrides = {}
        self.token_requests.clear()
        self._grants.clear()
        self.kid, self._key = self._initial
        self._published = [self._initial]
        self.jwks_requests = 0
        self.next_identity = {
            "sub": "google-sub-1",
            "email": "gina@example.com",
            "email_verified": True,
            "name": "Gina",
        }

    # -- token helpers ---------------------------------------------------------------------------

    def rotate(self) -> str:
        """Sign from now on with a new key under a new kid; the JWKS publishes old and new."""
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = f"fake-rsa-{len(self._published) + 1}"
        self._published.append((self.kid, self._key))
        return self.kid

    def sign(self, claims: dict[str, Any], *, kid: str | None = None) -> str:
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": kid or self.kid})

    # -- endpoints -------------------------------------------------------------------------------

    async def _discovery(self, request: Request) -> Response:
        return JSONResponse(
            {
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.base_url}/authorize",
                "token_endpoint": f"{self.base_url}/token",
                "jwks_uri": f"{self.base_url}/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "code_challenge_methods_supported": ["S256", "plain"],
            }
        )

    async def _jwks(self, request: Request) -> Response:
        self.jwks_requests += 1
        keys = []
        for kid, key in self._published:
            jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            jwk.update({"kid": kid, "alg": "RS256", "use": "sig"})
            keys.append(jwk)
        return JSONResponse({"keys": keys}, headers={"Cache-Control": "public, max-age=3600"})

    async def _authorize(self, request: Request) -> Response:
        q = request.query_params
        if q.get("response_type") != "code" or q.get("client_id") != CLIENT_ID:
            return JSONResponse({"error": "invalid_request"}, status_code=400)
        if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
            return JSONResponse({"error": "invalid_request", "detail": "PKCE"}, status_code=400)
        redirect_uri = q.get("redirect_uri", "")
        code = secrets.token_urlsafe(24)
        self._grants[code] = _Grant(
            client_id=CLIENT_ID,
            redirect_uri=redirect_uri,
            challenge=q["code_challenge"],
            nonce=q.get("nonce"),
            identity=dict(self.next_identity),
        )
        params = {"code": code, "state": q.get("state", "")}
        return RedirectResponse(f"{redirect_uri}?{urlencode(params)}", status_code=302)

    async def _token(self, request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        self.token_requests.append(form)
        grant = self._grants.pop(form.get("code", ""), None)
        if (
            grant is None
            or form.get("grant_type") != "authorization_code"
            or form.get("client_id") != CLIENT_ID
            or form.get("client_secret") != CLIENT_SECRET
            or form.get("redirect_uri") != grant.redirect_uri
        ):
            return JSONResponse({"error": "invalid_grant"}, status_code=400)
        verifier = form.get("code_verifier", "")
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .rstrip(b"=")
            .decode()
        )
        if challenge != grant.challenge:
            return JSONResponse({"error": "invalid_grant", "detail": "PKCE"}, status_code=400)
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": CLIENT_ID,
            "azp": CLIENT_ID,
            "iat": now,
            "exp": now + 3600,
            **grant.identity,
        }
        if grant.nonce is not None:
            claims["nonce"] = grant.nonce
        for name, value in self.claim_overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return JSONResponse(
            {
                "access_token": secrets.token_urlsafe(16),
                "token_type": "Bearer",
                "expires_in": 3600,
                "id_token": self.sign(claims),
            }
        )
