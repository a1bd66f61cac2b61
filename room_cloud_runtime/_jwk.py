"""JSON Web Keys (RFC 7517/7518/8037) → public keys bound to one algorithm each.

Parsing only: :mod:`._jwks` fetches and caches the set. Every key is bound to the one algorithm
its type allows (OKP/Ed25519 ↔ EdDSA, EC/P-256 ↔ ES256, RSA ↔ RS256), which blocks algorithm
confusion; keys with private members, a ``use`` other than ``sig`` or ``key_ops`` without
``verify`` are refused; an RSA modulus must be 2048..8192 bits and the public exponent odd with
2^16 < e < 2^256 (RFC 7518 §3.3, NIST FIPS 186-5 §5.4); an EC point must be on the curve.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ._settings import SUPPORTED_ALGORITHMS

__all__ = [
    "KEY_ALGORITHMS",
    "MAX_KEYS",
    "MAX_KID_LENGTH",
    "JWKSetError",
    "PublicKey",
    "VerificationKey",
    "parse_jwk",
    "parse_jwk_set",
]

logger = logging.getLogger("room_cloud_runtime.jwks")

PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey

#: What a cache may be configured with: the runtime's algorithms plus RS256, which only a caller
#: that asks for it gets (Google signs ID tokens with RS256; the runtime's settings refuse it).
KEY_ALGORITHMS = SUPPORTED_ALGORITHMS | frozenset({"RS256"})

#: More keys than this in one set is not a key set we publish; refuse the whole response.
MAX_KEYS = 64
MAX_KID_LENGTH = 128

# Which JWK shape each algorithm needs: (kty, crv, coordinate byte length); RSA has no curve.
_KEY_SHAPES: dict[str, tuple[str, str | None, int]] = {
    "EdDSA": ("OKP", "Ed25519", 32),
    "ES256": ("EC", "P-256", 32),
    "RS256": ("RSA", None, 0),
}
#: RSA modulus bounds in bits: below 2048 is breakable in practice (RFC 7518 §3.3 requires
#: 2048); above 8192 only makes each verification slow (a cheap DoS for a hostile key set).
RSA_MIN_BITS = 2048
RSA_MAX_BITS = 8192
# Members that only a private JWK has (RFC 7518 §6.2.2 / §6.3.2, RFC 8037 §2).
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_B64URL_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key from the JWKS, bound to the single algorithm it may verify."""

    kid: str
    algorithm: str
    key: PublicKey


class JWKSetError(ValueError):
    """The whole JWK set is unusable (not JSON, no keys list, too many keys, no usable key)."""


def parse_jwk_set(body: bytes, algorithms: Iterable[str]) -> dict[str, VerificationKey]:
    """A JWK set's bytes → its usable keys by ``kid``, or :class:`JWKSetError` saying why the
    whole set is refused. Unusable entries are skipped and logged; a ``kid`` that appears twice
    is dropped (we could not tell which key a token means)."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise JWKSetError("response is not JSON") from exc
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JWKSetError('response is not a JWK set (no "keys" list)')
    entries = document["keys"]
    if len(entries) > MAX_KEYS:
        raise JWKSetError(f"more than {MAX_KEYS} keys")
    keys: dict[str, VerificationKey] = {}
    duplicates: set[str] = set()
    for index, jwk in enumerate(entries):
        try:
            key = parse_jwk(jwk, algorithms)
        except ValueError as exc:
            logger.warning(
                "JWKS entry %d ignored: %s",
                index,
                exc,
                extra={"event": "jwks_key_ignored", "index": index, "reason": str(exc)},
            )
            continue
        if key.kid in keys or key.kid in duplicates:
            # Two keys under one kid: we cannot tell which one a token means. Fail closed.
            duplicates.add(key.kid)
            keys.pop(key.kid, None)
            logger.warning(
                "JWKS kid %r appears more than once; ignoring it",
                key.kid,
                extra={"event": "jwks_duplicate_kid", "kid": key.kid},
            )
            continue
        keys[key.kid] = key
    if not keys:
        raise JWKSetError("no usable keys in the JWK set")
    return keys


def parse_jwk(jwk: object, algorithms: Iterable[str]) -> VerificationKey:
    """One JWK → a bound public key, or ``ValueError`` saying why it is not usable."""
    if not isinstance(jwk, dict):
        raise ValueError("not a JSON object")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH:
        raise ValueError("missing or invalid kid")
    private = _PRIVATE_MEMBERS.intersection(jwk)
    if private:
        # The control plane must never publish private material; a key that leaked is not
        # one we should trust either. Log the member names only, never their values.
        logger.error(
            "JWKS key %r contains private members %s; ignored",
            kid,
            sorted(private),
            extra={"event": "jwks_private_key_published", "kid": kid},
        )
        raise ValueError("contains private key members")
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise ValueError(f"use is {use!r}, not 'sig'")
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise ValueError("key_ops does not allow 'verify'")
    kty, crv = jwk.get("kty"), jwk.get("crv")
    algorithm = next((a for a, (t, c, _) in _KEY_SHAPES.items() if t == kty and c == crv), None)
    if algorithm is None:
        raise ValueError(f"unsupported key type kty={kty!r} crv={crv!r}")
    if algorithm not in algorithms:
        raise ValueError(f"algorithm {algorithm} is not allowed")
    alg = jwk.get("alg")
    if alg is not None and alg != algorithm:
        # The key-type ↔ alg binding is what stops algorithm confusion: a key is used with
        # exactly one algorithm, whatever a token's header claims (an RSA key is RS256 only,
        # never PS256 or HS256 keyed with its public bytes).
        shape = kty if crv is None else f"{kty}/{crv}"
        raise ValueError(f"alg {alg!r} does not match key type {shape}")
    key: PublicKey
    if algorithm == "RS256":
        key = _rsa_public_key(jwk.get("n"), jwk.get("e"))
        return VerificationKey(kid=kid, algorithm=algorithm, key=key)
    size = _KEY_SHAPES[algorithm][2]
    x = _b64url_coordinate(jwk.get("x"), size, "x")
    if algorithm == "EdDSA":
        key = Ed25519PublicKey.from_public_bytes(x)
    else:
        y = _b64url_coordinate(jwk.get("y"), size, "y")
        # public_key() checks that the point is on the curve (invalid-curve attacks).
        key = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
        ).public_key()
    return VerificationKey(kid=kid, algorithm=algorithm, key=key)


def _b64url_coordinate(value: object, size: int, name: str) -> bytes:
    raw = _b64url_decode(value, name)
    if len(raw) != size:
        raise ValueError(f"{name} must be {size} bytes")
    return raw


def _b64url_decode(value: object, name: str, max_chars: int = 4096) -> bytes:
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= max_chars
        or not _B64URL_ALPHABET.issuperset(value)
    ):
        raise ValueError(f"{name} is not base64url")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{name} is not base64url") from exc


def _rsa_public_key(n_value: object, e_value: object) -> rsa.RSAPublicKey:
    """An RSA public key from JWK ``n``/``e`` (RFC 7518 §6.3.1), or ``ValueError``."""
    # 8192 bits is 1024 bytes, 1366 base64url characters; a leading zero octet is tolerated.
    n = int.from_bytes(_b64url_decode(n_value, "n", max_chars=1368), "big")
    e = int.from_bytes(_b64url_decode(e_value, "e", max_chars=44), "big")
    bits = n.bit_length()
    if bits < RSA_MIN_BITS:
        raise ValueError(f"RSA modulus is {bits} bits, less than {RSA_MIN_BITS}")
    if bits > RSA_MAX_BITS:
        raise ValueError(f"RSA modulus is {bits} bits, more than {RSA_MAX_BITS}")
    if n % 2 == 0:
        raise ValueError("RSA modulus is even")
    # FIPS 186-5 §5.4: e odd and 2^16 < e < 2^256. Rules out e = 1 (signature = message) and
    # e = 3 (Bleichenbacher's 2006 forgery against lax PKCS#1 v1.5 parsers).
    if e % 2 == 0 or not 2**16 < e < 2**256:
        raise ValueError("RSA public exponent is not an odd value between 2^16 and 2^256")
    return rsa.RSAPublicNumbers(e, n).public_key()
