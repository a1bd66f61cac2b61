"""Verification of the control plane's runtime tokens (compact JWS, EdDSA or ES256).

Order of work, cheapest first, because a well-formed forged token costs ~116 µs of crypto before
PyJWT refuses it (PERF-NOTES "JWT"):

1. verified-claims cache (a dict lookup and an expiry check, no crypto) and a small cache of
   recently refused tokens (replaying one forged token costs a dict lookup);
2. size cap, shape (three non-empty base64url segments), header decoded by hand (2 µs, where
   ``jwt.get_unverified_header`` costs 21 µs), ``alg`` from the configured list only, ``kid``
   required, refused header parameters (``crit``, ``b64``, ``jku``, ``x5u``, ``jwk``, ``x5c``);
3. key from the pinned JWKS by ``kid``, bound to one algorithm (blocks algorithm confusion);
4. signature and ``iss``/``aud`` and required claims by PyJWT, its errors mapped to ours here;
5. the contract's own claims: time window and TTL on our clock, ``instanceId``, ``role``, types.

Decision on ``jku``/``x5u``/``jwk``/``x5c``: the contract says they are ignored (never used to find
a key), and we go one step further and *refuse* a token that carries any of them. The control
plane never sets them, so their presence means a forgery attempt or a misconfigured issuer;
refusing costs nothing for genuine tokens and leaves no room for a future library version to act
on them. ``b64`` is refused for the same reason (RFC 7797 unencoded payloads are not our format).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
from collections.abc import Callable, Iterable
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, NoReturn

import jwt
from jwt import exceptions as jwt_errors

from ._errors import ClaimError, ConfigError, KeysUnavailableError, TokenError
from ._jwk import MAX_KID_LENGTH, VerificationKey
from ._jwks import JWKSCache
from ._scope import ROLES, Principal
from ._settings import AUDIENCE, MAX_LEEWAY_SECONDS, SUPPORTED_ALGORITHMS

if TYPE_CHECKING:
    from jwt.types import Options

    from ._settings import RuntimeSettings

__all__ = ["REQUIRED_CLAIMS", "TokenVerifier"]

#: Claims every runtime token must carry (DESIGN.md "Runtime token"). PyJWT's ``exp`` is not
#: required unless listed (PITFALLS "Tokens and JWKS").
REQUIRED_CLAIMS: Final = ("exp", "iat", "nbf", "iss", "aud", "sub", "jti", "sid")
#: Header parameters whose presence refuses the token; see the module docstring.
REFUSED_HEADERS: Final = frozenset({"crit", "b64", "jku", "x5u", "jwk", "x5c"})
MAX_ID_LENGTH: Final = 256
MAX_EMAIL_LENGTH: Final = 320
MAX_NAME_LENGTH: Final = 256
#: How long a refused token stays in the negative cache. Short, because some refusals
#: (unknown key, not yet valid) can turn into acceptance later.
NEGATIVE_TTL_SECONDS: Final = 30.0
NEGATIVE_CACHE_SIZE: Final = 1024

_MAX_SECONDS = 2**53

# One pass checks shape (exactly three non-empty segments) and the base64url alphabet.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")

# (until, code, message, claim): enough to rebuild the same refusal without the traceback and
# cause of the first one (re-raising one stored instance would grow its traceback).
_Refusal = tuple[float, str, str, str | None]
# Refusals that time or a key rotation can turn into acceptance are not remembered: the JWKS
# cache's own cooldown decides when an unknown kid is looked up again, and a token that is not
# valid yet must work as soon as it is.
_NOT_REMEMBERED = frozenset({"unknown_key", "token_not_yet_valid"})


def _malformed(message: str) -> TokenError:
    return TokenError("token_malformed", message)


class TokenVerifier:
    """Verifies runtime tokens against the pinned JWKS and returns a :class:`Principal`.

    ``clock`` is the wall clock (epoch seconds) used for every time check, cached or not, so the
    cache and a fresh verification always agree; tests inject one.
    """

    def __init__(
        self,
        jwks: JWKSCache,
        *,
        issuer: str,
        audience: str = AUDIENCE,
        instance_id: str,
        algorithms: Iterable[str] = ("EdDSA", "ES256"),
        leeway: int = 30,
        max_token_bytes: int = 4096,
        max_ttl: int = 900,
        cache_size: int = 10_000,
        negative_cache_size: int = NEGATIVE_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(issuer, str) or not issuer:
            raise ConfigError("issuer", "is required")
        if not isinstance(audience, str) or not audience:
            raise ConfigError("audience", "is required")
        if not isinstance(instance_id, str) or not instance_id:
            raise ConfigError("instance_id", "is required")
        algs = tuple(algorithms)
        bad = [a for a in algs if a not in SUPPORTED_ALGORITHMS]
        if bad or not algs:
            raise ConfigError(
                "algorithms", f"allowed values are {sorted(SUPPORTED_ALGORITHMS)}, got {list(algs)}"
            )
        if not 0 <= leeway <= MAX_LEEWAY_SECONDS:
            raise ConfigError("leeway", f"must be between 0 and {MAX_LEEWAY_SECONDS}")
        if max_token_bytes <= 0:
            raise ConfigError("max_token_bytes", "must be positive")
        if max_ttl <= 0:
            raise ConfigError("max_ttl", "must be positive")
        if cache_size < 0 or negative_cache_size < 0:
            raise ConfigError("cache_size", "must not be negative")

        self._jwks = jwks
        self.issuer = issuer
        self.audience = audience
        self.instance_id = instance_id
        self.algorithms = frozenset(algs)
        self._leeway = float(leeway)
        self._max_bytes = max_token_bytes
        self._max_ttl = float(max_ttl)
        self._cache_size = cache_size
        self._negative_size = negative_cache_size
        self._clock = clock
        # token -> (expiry + leeway, principal, key it was verified with). Insertion-ordered
        # dict: the oldest entry is evicted first when full. The key is kept so that a token
        # stops working as soon as its key leaves the JWKS (revocation by rotation) or the keys
        # go stale.
        self._cache: dict[str, tuple[float, Principal, VerificationKey]] = {}
        self._refused: dict[str, _Refusal] = {}
        # Time claims are checked below on our clock (strict types, one clock for cache and
        # fresh verification); PyJWT checks the signature, iss, aud and presence.
        self._options: Options = {
            "require": list(REQUIRED_CLAIMS),
            "verify_signature": True,
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": True,
            "verify_iss": True,
            "verify_sub": True,
            "verify_jti": True,
        }

    @classmethod
    def from_settings(cls, settings: RuntimeSettings, jwks: JWKSCache) -> TokenVerifier:
        """Build the verifier from the runtime settings (cloud mode)."""
        if not settings.issuer:
            raise ConfigError("QUOROOM_CLOUD_ISSUER", "is required in cloud mode")
        if not settings.instance_id:
            raise ConfigError("QUOROOM_CLOUD_INSTANCE_ID", "is required in cloud mode")
        return cls(
            jwks,
            issuer=settings.issuer,
            audience=settings.audience,
            instance_id=settings.instance_id,
            algorithms=settings.algorithms,
            leeway=settings.leeway_seconds,
            max_token_bytes=settings.max_token_bytes,
            cache_size=settings.verified_cache_size,
        )

    @property
    def cached_count(self) -> int:
        """Number of verified tokens held in the cache."""
        return len(self._cache)

    async def verify(self, token: str) -> Principal:
        """Verify ``token`` and return who it speaks for.

        Raises :class:`TokenError` (``.code`` says why; :class:`ClaimError` carries ``.claim``,
        :class:`UnknownKeyError` ``.kid``) or :class:`KeysUnavailableError` (fail closed, 503).
        """
        if not isinstance(token, str):
            raise _malformed("token must be a string")
        entry = self._cache.get(token)
        if entry is not None:
            deadline, principal, key = entry
            # get_key raises KeysUnavailableError when the keys went stale: fail closed even for
            # tokens verified earlier.
            if self._clock() < deadline and self._jwks.get_key(key.kid) is key:
                return principal
            del self._cache[token]
            if self._clock() >= deadline:
                raise TokenError("token_expired", "token has expired")
            # The key was rotated out (or replaced): verify again from scratch below.

        refusal = self._refused.get(token)
        if refusal is not None:
            if self._clock() < refusal[0]:
                _raise_refusal(refusal)
            del self._refused[token]

        if len(token) > self._max_bytes:
            raise TokenError("token_too_large", f"token exceeds {self._max_bytes} bytes")
        if not _COMPACT_JWS.fullmatch(token):
            raise _malformed("token is not a compact JWS (three base64url segments)")
        header = _decode_header(token[: token.index(".")])
        alg, kid = self._check_header(header)

        try:
            key = await self._jwks.resolve(kid)
            if key.algorithm != alg:
                # The key's type fixes its algorithm; a header asking for another one is an
                # algorithm-confusion attempt (e.g. ES256 header with an Ed25519 kid).
                raise TokenError(
                    "algorithm_mismatch", "token algorithm does not match its signing key"
                )
            principal = self._verify_signed(token, key)
        except KeysUnavailableError:
            raise  # transient, never cached as a refusal
        except TokenError as exc:
            self._remember_refusal(token, exc)
            raise
        self._store(token, principal, key)
        return principal

    def cached(self, token: str) -> Principal | None:
        """The principal of a token verified earlier and still good, without a coroutine;
        ``None`` when :meth:`verify` has to decide (not cached, expired, key rotated out).

        The same checks as :meth:`verify`'s cache hit: within ``exp`` + leeway on the verifier's
        clock, and the key it was verified with still the JWKS's key for its ``kid``. Raises
        :class:`KeysUnavailableError` when the keys went stale (fail closed).
        """
        entry = self._cache.get(token)
        if entry is not None:
            key = entry[2]
            if self._clock() < entry[0] and self._jwks.get_key(key.kid) is key:
                return entry[1]
        return None

    # -- steps -----------------------------------------------------------------------------------

    def _check_header(self, header: dict[str, Any]) -> tuple[str, str]:
        alg = header.get("alg")
        # The allowed list is ours, never the token's: "none", HS256 (signed with the public key
        # bytes) and anything else not configured stop here (RFC 8725 §2.1, §3.1).
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise TokenError("unsupported_algorithm", "token algorithm is not accepted")
        refused = REFUSED_HEADERS.intersection(header)
        if refused:
            # crit: we understand no extension, so any critical one must be refused
            # (RFC 7515 §4.1.11); this also covers b64=false (RFC 7797). Key-locating headers:
            # keys come only from the pinned JWKS (see module docstring).
            raise TokenError(
                "unsupported_header",
                f"token header parameter not accepted: {', '.join(sorted(refused))}",
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH:
            raise _malformed("token header needs a kid")
        return alg, kid

    def _verify_signed(self, token: str, key: VerificationKey) -> Principal:
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self._leeway,
                options=self._options,
            )
        except jwt.PyJWTError as exc:
            _raise_mapped(exc)
        return self._principal(claims)

    def _principal(self, claims: dict[str, Any]) -> Principal:
        now = self._clock()
        leeway = self._leeway
        exp = _number(claims, "exp")
        iat = _number(claims, "iat")
        nbf = _number(claims, "nbf")
        if now >= exp + leeway:
            raise TokenError("token_expired", "token has expired")
        if nbf > now + leeway:
            raise TokenError("token_not_yet_valid", "token is not valid yet")
        if iat > now + leeway:
            raise ClaimError("iat", "token was issued in the future")
        if exp <= iat:
            raise ClaimError("exp", "token expires before it was issued")
        # exp and iat come from the same issuer clock, so no leeway on the lifetime itself.
        if exp - iat > self._max_ttl:
            raise ClaimError("exp", f"token lifetime exceeds {int(self._max_ttl)} seconds")

        instance_id = claims.get("instanceId")
        if instance_id != self.instance_id:
            raise ClaimError("instanceId", "token is for another instance")
        role = claims.get("role")
        # Exact match only: the Room promotes an unknown or missing role to full control, we
        # never do (PITFALLS "Tokens and JWKS"). "Owner" and "admin" are refused too.
        if not isinstance(role, str) or role not in ROLES:
            raise ClaimError("role", "token role is not accepted")

        subject = _identifier(claims, "sub")
        session_id = _identifier(claims, "sid")
        token_id = _identifier(claims, "jti")
        email = _optional_str(claims, "email", MAX_EMAIL_LENGTH)
        email_verified = claims.get("emailVerified", False)
        if not isinstance(email_verified, bool):
            raise ClaimError("emailVerified", "emailVerified must be a boolean")
        name = _optional_str(claims, "name", MAX_NAME_LENGTH)
        return Principal(
            subject=subject,
            role=role,
            instance_id=instance_id,
            session_id=session_id,
            token_id=token_id,
            expires_at=float(exp),
            email=email,
            email_verified=email_verified,
            name=name,
            claims=MappingProxyType(claims),
        )

    # -- caches ----------------------------------------------------------------------------------

    def _store(self, token: str, principal: Principal, key: VerificationKey) -> None:
        if self._cache_size == 0:
            return
        cache = self._cache
        while len(cache) >= self._cache_size:
            del cache[next(iter(cache))]
        cache[token] = (principal.expires_at + self._leeway, principal, key)

    def _remember_refusal(self, token: str, exc: TokenError) -> None:
        if self._negative_size == 0 or exc.code in _NOT_REMEMBERED:
            return
        claim = getattr(exc, "claim", None)
        if claim == "iat":  # issued in the future: time-dependent too
            return
        refused = self._refused
        while len(refused) >= self._negative_size:
            del refused[next(iter(refused))]
        refused[token] = (
            self._clock() + NEGATIVE_TTL_SECONDS,
            exc.code,
            exc.message,
            claim,
        )


def _decode_header(segment: str) -> dict[str, Any]:
    # Plain base64url + json (2 µs) instead of jwt.get_unverified_header (21 µs): this runs for
    # every uncached token, forged ones included (PERF-NOTES "JWT"). The alphabet was checked.
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        header = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError) as exc:
        raise _malformed("token header is not base64url-encoded JSON") from exc
    if not isinstance(header, dict):
        raise _malformed("token header is not a JSON object")
    return header


def _raise_mapped(exc: jwt.PyJWTError) -> NoReturn:
    """Translate PyJWT's errors into ours: the one boundary where that happens."""
    if isinstance(exc, jwt.InvalidSignatureError):
        raise TokenError("bad_signature", "token signature is invalid") from exc
    if isinstance(exc, jwt.MissingRequiredClaimError):
        raise ClaimError(exc.claim, f"token has no {exc.claim} claim") from exc
    if isinstance(exc, jwt.InvalidAudienceError):
        raise ClaimError("aud", "token is for another audience") from exc
    if isinstance(exc, jwt.InvalidIssuerError):
        raise ClaimError("iss", "token is from another issuer") from exc
    if isinstance(exc, jwt_errors.InvalidSubjectError):
        raise ClaimError("sub", "sub must be a string") from exc
    if isinstance(exc, jwt_errors.InvalidJTIError):
        raise ClaimError("jti", "jti must be a string") from exc
    if isinstance(exc, jwt.ExpiredSignatureError):
        raise TokenError("token_expired", "token has expired") from exc
    if isinstance(exc, jwt.ImmatureSignatureError):
        raise TokenError("token_not_yet_valid", "token is not valid yet") from exc
    if isinstance(exc, jwt.InvalidAlgorithmError):
        raise TokenError("unsupported_algorithm", "token algorithm is not accepted") from exc
    if isinstance(exc, jwt.InvalidKeyError):
        raise TokenError("bad_signature", "token cannot be verified with its key") from exc
    # DecodeError (payload not JSON, bad padding) and any other InvalidTokenError.
    raise _malformed("token could not be decoded") from exc


def _raise_refusal(refusal: _Refusal) -> NoReturn:
    _, code, message, claim = refusal
    if claim is not None:
        raise ClaimError(claim, message)
    raise TokenError(code, message)


def _number(claims: dict[str, Any], name: str) -> float:
    value = claims.get(name)
    # bool is an int subclass and json accepts NaN/Infinity: refuse both.
    # Bounded so float() cannot overflow on a huge integer.
    if (type(value) is int and abs(value) < _MAX_SECONDS) or (
        type(value) is float and math.isfinite(value) and abs(value) < _MAX_SECONDS
    ):
        return float(value)
    raise ClaimError(name, f"{name} must be a number of seconds")


def _identifier(claims: dict[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
        raise ClaimError(name, f"{name} must be a non-empty string")
    return value


def _optional_str(claims: dict[str, Any], name: str, limit: int) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise ClaimError(name, f"{name} must be a string of at most {limit} characters")
    return value
