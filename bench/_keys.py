"""Bench-only key material: one Ed25519 key, its JWKS, and tokens for the runtime contract."""

from __future__ import annotations

import base64
import json
import time
import uuid

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

ISSUER = "http://127.0.0.1:9/cp"  # never fetched: the bench hands the JWKS to the cache directly
INSTANCE_ID = "bench-instance"
KID = "bench-key-1"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def jwks_of(key: Ed25519PrivateKey) -> dict:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {
        "keys": [
            {
                "kty": "OKP",
                "crv": "Ed25519",
                "x": _b64(raw),
                "kid": KID,
                "alg": "EdDSA",
                "use": "sig",
            }
        ]
    }


def mint(
    key: Ed25519PrivateKey, *, role: str = "owner", sub: str = "bench-user", ttl: int = 900
) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": "quoroom-runtime",
        "sub": sub,
        "instanceId": INSTANCE_ID,
        "role": role,
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
        "sid": "bench-session",
    }
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": KID})


def jwks_json(key: Ed25519PrivateKey) -> bytes:
    return json.dumps(jwks_of(key)).encode()
