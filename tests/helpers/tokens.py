"""Signing keys and runtime-token minting for tests, as the control plane signs them.

Usage::

    factory = TokenFactory(issuer="http://127.0.0.1:8000", instance_id="inst-1")
    token = factory.mint(role="member")               # EdDSA, kid of the current key
    token = factory.mint(exp=OMIT)                    # claim removed (None removes it too)
    token = factory.mint(headers={"jku": "https://evil"})
    new_key = factory.rotate()                         # a second key; mint() now uses it
    jwks_document = factory.jwks()                     # {"keys": [public JWKs]}

``craft(header, payload, signature)`` builds a compact JWS by hand for attacks PyJWT would not
produce (``alg: none``, bad segments); ``sign_compact(key, header, payload)`` really signs any
header and payload (``crit``, ``b64: false``, a payload that is not JSON).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from jwt.api_jws import PyJWS

AUDIENCE: Final = "quoroom-runtime"


class _Omit:
    def __repr__(self) -> str:
        return "OMIT"


#: Pass as a claim override to remove the claim from the token (``None`` does the same).
OMIT: Final = _Omit()


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JWS uses."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"sig") -> str:
    """A compact JWS assembled by hand (no signing): for malformed and unsigned attack tokens."""
    return ".".join(
        (
            b64url(json.dumps(header, separators=(",", ":")).encode()),
            b64url(json.dumps(payload, separators=(",", ":")).encode()),
            b64url(signature),
        )
    )


def sign_compact(key: SigningKey, header: dict[str, Any], payload: dict[str, Any] | bytes) -> str:
    """A compact JWS over any header and payload, really signed with ``key``.

    For tokens PyJWT refuses to produce or would rewrite (``crit``, ``b64: false``, a payload
    that is not JSON): the signature is genuine, so a refusal proves the header check worked.
    """
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = (
        b64url(json.dumps(header, separators=(",", ":")).encode()) + "." + b64url(raw)
    ).encode()
    algorithm = PyJWS().get_algorithm_by_name(key.algorithm)
    signature = algorithm.sign(signing_input, key.private_key)
    return signing_input.decode() + "." + b64url(signature)


def _int_b64(value: int, size: int) -> str:
    return b64url(value.to_bytes(size, "big"))


class SigningKey:
    """A key pair the way the control plane holds one: Ed25519 (``EdDSA``) or P-256 (``ES256``)."""

    def __init__(self, algorithm: str = "EdDSA", kid: str | None = None) -> None:
        if algorithm not in ("EdDSA", "ES256"):
            raise ValueError(f"unsupported algorithm {algorithm!r}")
        self.algorithm = algorithm
        self.kid = kid or f"key-{secrets.token_hex(6)}"
        self.private_key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey
        if algorithm == "EdDSA":
            self.private_key = Ed25519PrivateKey.generate()
        else:
            self.private_key = ec.generate_private_key(ec.SECP256R1())

    @property
    def public_key(self) -> Any:
        return self.private_key.public_key()

    def public_bytes(self) -> bytes:
        """The public key as PEM (what an attacker would use as an HS256 secret)."""
        return self.public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)

    def public_jwk(self) -> dict[str, Any]:
        """The public JWK as the control plane publishes it (with kid, use and alg)."""
        jwk: dict[str, Any] = {"kid": self.kid, "use": "sig", "alg": self.algorithm}
        if isinstance(self.private_key, Ed25519PrivateKey):
            raw = self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            jwk.update(kty="OKP", crv="Ed25519", x=b64url(raw))
        else:
            numbers = self.private_key.public_key().public_numbers()
            jwk.update(kty="EC", crv="P-256", x=_int_b64(numbers.x, 32), y=_int_b64(numbers.y, 32))
        return jwk

    def private_jwk(self) -> dict[str, Any]:
        """The JWK with its private member ``d`` (which must never be published)."""
        jwk = self.public_jwk()
        if isinstance(self.private_key, Ed25519PrivateKey):
            raw = self.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
            jwk["d"] = b64url(raw)
        else:
            jwk["d"] = _int_b64(self.private_key.private_numbers().private_value, 32)
        return jwk


class TokenFactory:
    """Mints runtime tokens for one issuer and instance. The last key in ``keys`` signs."""

    def __init__(
        self,
        issuer: str,
        instance_id: str,
        key: SigningKey | None = None,
        audience: str | list[str] = AUDIENCE,
    ) -> None:
        self.issuer = issuer
        self.instance_id = instance_id
        self.audience = audience
        self.keys: list[SigningKey] = [key or SigningKey()]

    @property
    def key(self) -> SigningKey:
        """The current signing key."""
        return self.keys[-1]

    def jwks(self) -> dict[str, Any]:
        """The JWK set of every key's public half."""
        return {"keys": [k.public_jwk() for k in self.keys]}

    def rotate(self, algorithm: str = "EdDSA") -> SigningKey:
        """Add a new key; later tokens are signed with it. Old keys stay in ``keys``."""
        new = SigningKey(algorithm)
        self.keys.append(new)
        return new

    def claims(
        self,
        role: Any = "owner",
        sub: Any = "user-1",
        ttl: float = 300,
        now: float | None = None,
        **claim_overrides: Any,
    ) -> dict[str, Any]:
        """The claim set ``mint`` would sign (overrides of ``None``/``OMIT`` remove a claim)."""
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": sub,
            "instanceId": self.instance_id,
            "role": role,
            "iat": issued,
            "nbf": issued,
            "exp": int(issued + ttl),
            "jti": secrets.token_hex(8),
            "sid": "session-1",
            "email": "user@example.com",
            "emailVerified": True,
            "name": "Test User",
        }
        claims.update(claim_overrides)
        return {k: v for k, v in claims.items() if v is not None and v is not OMIT}

    def mint(
        self,
        role: Any = "owner",
        sub: Any = "user-1",
        ttl: float = 300,
        headers: dict[str, Any] | None = None,
        key: SigningKey | None = None,
        now: float | None = None,
        **claim_overrides: Any,
    ) -> str:
        """A signed token. ``headers`` are merged into the JOSE header (``kid`` may be overridden
        to test a key/algorithm mismatch); ``now`` sets ``iat``/``nbf`` (default: wall clock)."""
        signer = key or self.key
        header: dict[str, Any] = {"kid": signer.kid}
        header.update(headers or {})
        claims = self.claims(role=role, sub=sub, ttl=ttl, now=now, **claim_overrides)
        return jwt.encode(claims, signer.private_key, algorithm=signer.algorithm, headers=header)
