"""The key ring: Ed25519 signing keys, encrypted at rest, held decrypted in memory.

Lifecycle (``next → active → retired → deleted``): the ``next`` key is published in the JWKS
before it ever signs, so verifiers that cached the JWKS already know it when a rotation makes it
``active``. A rotation never lets a key sign before it has been published for
:func:`publish_delay` (one JWKS max-age plus the key reload interval): it sets the new key's
``activated_at`` — the moment it starts signing — to ``max(now, created_at + delay)`` and the old
key's ``retired_at`` to the same moment; until then the old key goes on signing. A second rotation
while one is pending is refused. A ``retired`` key stays published until every token it signed has
expired (max token TTL + leeway after ``retired_at``) and is then deleted.

Signing and JWKS serving use memory only; the ring reloads from the database at start-up, after a
rotation in this process, and every ``key_reload_seconds`` (to pick up a ``keys rotate`` run in
another process).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.db import utcnow
from control_plane.errors import KeyDecryptionFailed, KeysNotReady
from control_plane.keys.models import SigningKey
from control_plane.settings import MAX_TOKEN_TTL_SECONDS, TOKEN_LEEWAY_SECONDS, Settings

logger = logging.getLogger("control_plane.keys")

ALGORITHM = "EdDSA"
#: A retired key is published this long after retirement, then deleted.
RETIRED_KEY_LIFETIME = timedelta(seconds=MAX_TOKEN_TTL_SECONDS + TOKEN_LEEWAY_SECONDS)
_AAD_PREFIX = b"quoroom-signing-key:"
#: The runtime caches the JWKS at least this long whatever max-age says
#: (``QUOROOM_JWKS_MIN_REFRESH_SECONDS``'s default).
RUNTIME_MIN_JWKS_REFRESH_SECONDS = 60


def publish_delay(settings: Settings) -> timedelta:
    """How long a key must have been published before it may sign.

    A runtime that fetched the JWKS just before the key appeared keeps that copy for one
    max-age (never less than its own 60 s floor); and the other control-plane processes serve
    the JWKS from memory, reloaded every ``KEY_RELOAD_SECONDS``, so the key appears there up to
    that much later.
    """
    max_age = max(settings.jwks_max_age_seconds, RUNTIME_MIN_JWKS_REFRESH_SECONDS)
    return timedelta(seconds=max_age + settings.key_reload_seconds)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def kek_id(kek: bytes) -> str:
    """A stable, non-secret name for a key-encryption key (so rotated KEKs can be found)."""
    return hashlib.sha256(b"quoroom-kek-id:" + kek).hexdigest()[:16]


def thumbprint_kid(public_raw: bytes) -> str:
    """RFC 7638 JWK thumbprint of the OKP key: a kid that names the key material itself."""
    canonical = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": _b64url(public_raw)}, separators=(",", ":")
    )
    return _b64url(hashlib.sha256(canonical.encode()).digest())


def public_jwk(kid: str, public_raw: bytes) -> dict[str, str]:
    """The public JWK (RFC 8037): never any private member."""
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": _b64url(public_raw),
        "kid": kid,
        "alg": ALGORITHM,
        "use": "sig",
    }


class KeyCipher:
    """AES-256-GCM encryption of private keys with the configured KEKs (first one encrypts)."""

    def __init__(self, keks: list[bytes]) -> None:
        if not keks:
            raise ValueError("at least one key-encryption key is required")
        self._keks = {kek_id(k): AESGCM(k) for k in keks}
        self.current_id = kek_id(keks[0])

    def encrypt(self, kid: str, private_raw: bytes) -> tuple[bytes, bytes, str]:
        nonce = secrets.token_bytes(12)
        ciphertext = self._keks[self.current_id].encrypt(
            nonce, private_raw, _AAD_PREFIX + kid.encode()
        )
        return ciphertext, nonce, self.current_id

    def decrypt(self, row: SigningKey) -> bytes:
        aead = self._keks.get(row.kek_id)
        if aead is None:
            raise KeyDecryptionFailed(
                f"signing key {row.kid} was encrypted with KEK {row.kek_id}, "
                "which is not configured"
            )
        try:
            return aead.decrypt(
                row.nonce, row.private_key_ciphertext, _AAD_PREFIX + row.kid.encode()
            )
        except InvalidTag as exc:
            raise KeyDecryptionFailed(f"signing key {row.kid} failed to decrypt") from exc


class BlobCipher(KeyCipher):
    """The same KEKs sealing arbitrary bytes into one self-describing blob, bound to a context
    (AES-GCM associated data): version byte, KEK id, nonce, ciphertext. For secrets kept in a
    column of their own (instance credentials, TOTP secrets); ``what`` names them in errors."""

    _VERSION = b"\x01"
    _KEK_ID_LENGTH = 16
    _NONCE_LENGTH = 12

    def __init__(self, keks: list[bytes], what: str) -> None:
        super().__init__(keks)
        self.what = what

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        nonce = secrets.token_bytes(self._NONCE_LENGTH)
        ciphertext = self._keks[self.current_id].encrypt(nonce, plaintext, context)
        return self._VERSION + self.current_id.encode("ascii") + nonce + ciphertext

    def open(self, blob: bytes, context: bytes) -> bytes:
        head = 1 + self._KEK_ID_LENGTH + self._NONCE_LENGTH
        if len(blob) <= head or blob[:1] != self._VERSION:
            raise KeyDecryptionFailed(f"{self.what}: not in a known format")
        kek = blob[1 : 1 + self._KEK_ID_LENGTH].decode("ascii", errors="replace")
        aead = self._keks.get(kek)
        if aead is None:
            raise KeyDecryptionFailed(
                f"{self.what}: sealed with KEK {kek}, which is not configured"
            )
        try:
            return aead.decrypt(blob[1 + self._KEK_ID_LENGTH : head], blob[head:], context)
        except InvalidTag as exc:
            raise KeyDecryptionFailed(f"{self.what}: failed to decrypt") from exc


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """An immutable view of the ring, swapped atomically on reload.

    ``active_*`` is the ``active`` row; while its ``activated_at`` (``switch_at``) is in the
    future, ``previous_*`` (the key it replaces) signs instead.
    """

    active_kid: str | None
    active_key: Ed25519PrivateKey | None
    public_keys: Mapping[str, Ed25519PublicKey]
    jwks: bytes
    switch_at: datetime | None = None
    previous_kid: str | None = None
    previous_key: Ed25519PrivateKey | None = None

    def signer(self, now: datetime) -> tuple[str | None, Ed25519PrivateKey | None]:
        if self.switch_at is not None and now < self.switch_at and self.previous_key is not None:
            return self.previous_kid, self.previous_key
        return self.active_kid, self.active_key


class KeyRing:
    """Signs tokens with the active key and serves the JWKS, all from memory."""

    def __init__(
        self,
        settings: Settings,
        session_factory: async_sessionmaker[AsyncSession],
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._settings = settings
        self._factory = session_factory
        self._cipher = KeyCipher(settings.key_encryption_keys())
        self._clock = clock
        self._snapshot = _Snapshot(None, None, {}, b'{"keys":[]}')
        #: What every JWKS answer carries: caches may keep it for max-age; any origin may read it.
        self.jwks_headers: dict[str, str] = {
            "Cache-Control": f"public, max-age={settings.jwks_max_age_seconds}",
            "Access-Control-Allow-Origin": "*",
        }
        self._reloader: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, *, bootstrap: bool = True) -> None:
        """Load the keys (creating the first active and next keys if none) and start reloading."""
        if bootstrap:
            await self.ensure_keys()
        else:
            await self.reload()
        if self._reloader is None:
            self._reloader = asyncio.get_running_loop().create_task(
                self._reload_loop(), name="control_plane.keys.reload"
            )

    async def aclose(self) -> None:
        task, self._reloader = self._reloader, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.key_reload_seconds)
            try:
                await self.reload()
            except Exception:  # keep the last good ring; a DB blip must not stop signing
                logger.exception("signing key reload failed; keeping the current keys")

    # -- database --------------------------------------------------------------------------------

    async def ensure_keys(self) -> None:
        """Create an active and a next key when missing (idempotent across processes)."""
        for status in ("active", "next"):
            async with self._factory() as session:
                exists = await session.scalar(
                    select(SigningKey.kid).where(SigningKey.status == status)
                )
                if exists is None:
                    session.add(self._new_key(status))
                    try:
                        await session.commit()
                    except IntegrityError:  # another process created it first
                        await session.rollback()
        await self.reload()

    async def reload(self) -> None:
        async with self._factory() as session:
            rows = (await session.scalars(select(SigningKey))).all()
        self._snapshot = self._build(list(rows))

    async def rotate(self, session: AsyncSession) -> str:
        """``next → active``, ``active → retired``, a new ``next``; expired retired keys deleted.

        The new active key signs from ``max(now, its publication + publish_delay)``; the old one
        signs until then (see the module docstring). Commits ``session`` and reloads this ring.
        Returns the new active kid; :attr:`pending_switch` tells when it starts signing.
        """
        now = self._clock()
        active = await session.scalar(select(SigningKey).where(SigningKey.status == "active"))
        if active is not None and active.activated_at is not None and active.activated_at > now:
            raise KeysNotReady(
                f"a rotation is pending: key {active.kid} signs from "
                f"{active.activated_at.isoformat()}; rotate again after that"
            )
        upcoming = await session.scalar(select(SigningKey).where(SigningKey.status == "next"))
        next_kid = upcoming.kid if upcoming is not None else None
        if upcoming is None or next_kid is None:
            # A ring without a published next key: create one and publish it first. Rotating to
            # a key no verifier has seen would break every runtime until its JWKS refetch.
            session.add(self._new_key("next"))
            await session.commit()
            raise KeysNotReady("there was no next key; one was created - rotate again later")
        # Published at creation (in this process; the others within KEY_RELOAD_SECONDS).
        switch_at = max(now, upcoming.created_at + publish_delay(self._settings))
        await session.execute(
            update(SigningKey)
            .where(SigningKey.status == "active")
            .values(status="retired", retired_at=switch_at)
        )
        await session.execute(
            update(SigningKey)
            .where(SigningKey.kid == next_kid, SigningKey.status == "next")
            .values(status="active", activated_at=switch_at)
        )
        session.add(self._new_key("next"))
        await session.execute(
            delete(SigningKey).where(
                SigningKey.status == "retired",
                SigningKey.retired_at < now - RETIRED_KEY_LIFETIME,
            )
        )
        await session.commit()
        await self.reload()
        logger.info("signing keys rotated; key %s signs from %s", next_kid, switch_at.isoformat())
        return next_kid

    def _new_key(self, status: str) -> SigningKey:
        private = Ed25519PrivateKey.generate()
        private_raw = private.private_bytes_raw()
        public_raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        kid = thumbprint_kid(public_raw)
        ciphertext, nonce, kek = self._cipher.encrypt(kid, private_raw)
        now = self._clock()
        return SigningKey(
            kid=kid,
            status=status,
            algorithm=ALGORITHM,
            public_key=public_raw,
            private_key_ciphertext=ciphertext,
            nonce=nonce,
            kek_id=kek,
            created_at=now,
            activated_at=now if status == "active" else None,
        )

    def _build(self, rows: list[SigningKey]) -> _Snapshot:
        now = self._clock()
        active_kid: str | None = None
        active_key: Ed25519PrivateKey | None = None
        switch_at: datetime | None = None
        previous: SigningKey | None = None
        public: dict[str, Ed25519PublicKey] = {}
        jwks: list[dict[str, str]] = []
        order = {"active": 0, "next": 1, "retired": 2}
        for row in sorted(
            rows, key=lambda r: (order.get(r.status, 3), r.created_at), reverse=False
        ):
            if row.status == "retired" and (
                row.retired_at is None or row.retired_at < now - RETIRED_KEY_LIFETIME
            ):
                continue  # every token it signed has expired
            if row.status == "active":
                active_kid = row.kid
                active_key = Ed25519PrivateKey.from_private_bytes(self._cipher.decrypt(row))
                if row.activated_at is not None and row.activated_at > now:
                    switch_at = row.activated_at
            elif row.status == "retired" and row.retired_at is not None and row.retired_at > now:
                # Retired by a pending rotation: it signs until the switch.
                if previous is None or row.retired_at > (previous.retired_at or row.retired_at):
                    previous = row
            public[row.kid] = Ed25519PublicKey.from_public_bytes(row.public_key)
            jwks.append(public_jwk(row.kid, row.public_key))
        body = json.dumps({"keys": jwks}, separators=(",", ":")).encode()
        if switch_at is None or previous is None:
            return _Snapshot(active_kid, active_key, public, body)
        previous_key = Ed25519PrivateKey.from_private_bytes(self._cipher.decrypt(previous))
        return _Snapshot(
            active_kid, active_key, public, body, switch_at, previous.kid, previous_key
        )

    # -- request path (memory only) --------------------------------------------------------------

    @property
    def active_kid(self) -> str | None:
        """The kid that signs now."""
        return self._snapshot.signer(self._clock())[0]

    @property
    def pending_switch(self) -> tuple[str, datetime] | None:
        """``(kid, when)`` while a rotated-in key waits to sign, else ``None``."""
        snap = self._snapshot
        if snap.switch_at is None or snap.active_kid is None or snap.previous_key is None:
            return None
        if self._clock() >= snap.switch_at:
            return None
        return snap.active_kid, snap.switch_at

    def jwks_bytes(self) -> bytes:
        """The prebuilt JWKS document (public members only)."""
        return self._snapshot.jwks

    def sign(
        self, claims: Mapping[str, Any], *, audience: str, ttl: timedelta | None = None
    ) -> str:
        """A compact JWS (alg EdDSA, ``kid`` header) over ``claims``.

        Fills ``iss`` (the public URL), ``aud``, ``iat``, ``nbf``, ``exp`` (``ttl``, default the
        access-token TTL, capped at 15 minutes) and ``jti`` unless the caller set them.
        """
        current = self._clock()
        kid, key = self._snapshot.signer(current)
        if key is None or kid is None:
            raise KeysNotReady()
        lifetime = ttl or timedelta(seconds=self._settings.access_token_ttl_seconds)
        lifetime = min(lifetime, timedelta(seconds=MAX_TOKEN_TTL_SECONDS))
        now = int(current.timestamp())
        payload: dict[str, Any] = {
            "iss": self._settings.issuer,
            "iat": now,
            "nbf": now,
            "exp": now + int(lifetime.total_seconds()),
            "jti": uuid.uuid4().hex,
            **claims,
            "aud": audience,
        }
        return jwt.encode(payload, key, algorithm=ALGORITHM, headers={"kid": kid})

    def verify(self, token: str, *, audience: str) -> dict[str, Any]:
        """Claims of a token this ring signed (any published key); raises ``jwt.InvalidTokenError``.

        The algorithm list is fixed here, never read from the token; ``kid`` picks the key.
        """
        header = jwt.get_unverified_header(token)
        kid = header.get("kid")
        key = self._snapshot.public_keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise jwt.InvalidTokenError("unknown kid")
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=audience,
            issuer=self._settings.issuer,
            # Time claims are checked below on the ring's clock (the one that signed).
            options={
                "require": ["exp", "iat", "sub", "aud", "iss"],
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
        now = self._clock().timestamp()
        exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat"))
        if not isinstance(exp, int) or isinstance(exp, bool) or exp + TOKEN_LEEWAY_SECONDS <= now:
            raise jwt.ExpiredSignatureError("token expired")
        if not isinstance(nbf, int) or isinstance(nbf, bool) or nbf - TOKEN_LEEWAY_SECONDS > now:
            raise jwt.ImmatureSignatureError("token not yet valid")
        return claims
