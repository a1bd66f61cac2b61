"""Provider credentials of an instance (API keys the Room hands to its agents), sealed at rest.

AES-256-GCM under the configured key-encryption keys, through the same :class:`KeyCipher` that
seals signing keys (the first KEK seals; any configured KEK opens, so KEKs can be rotated). The
associated data binds a blob to its instance, so a ciphertext copied onto another row does not
open. Blob layout: ``0x01 | kek id (16 ASCII bytes) | nonce (12) | ciphertext+tag``.

The plaintext is only ever produced by :func:`decrypt_credentials`, for the provisioning code that
sets it as app secrets on the runtime. It is never returned by the API, never logged, and the
repr of every object holding it is redacted.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from typing import Protocol

from cryptography.exceptions import InvalidTag

from control_plane.errors import KeyDecryptionFailed
from control_plane.keys.service import KeyCipher
from control_plane.settings import Settings

__all__ = [
    "MAX_CREDENTIALS",
    "MAX_SECRET_LENGTH",
    "PROVIDER_PATTERN",
    "decrypt_credentials",
    "encrypt_credentials",
    "validate_credentials",
]

MAX_CREDENTIALS = 16
MAX_SECRET_LENGTH = 512
PROVIDER_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_SECRET_PATTERN = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces
_VERSION = b"\x01"
_KEK_ID_LENGTH = 16
_NONCE_LENGTH = 12
_AAD_PREFIX = b"quoroom-instance-credentials:"


class _Sealable(Protocol):
    id: str
    credentials_encrypted: bytes | None


def validate_credentials(value: Mapping[str, object]) -> dict[str, str]:
    """Bounded ``{provider: api_key}``; raises ``ValueError`` naming the provider, never the key."""
    if len(value) > MAX_CREDENTIALS:
        raise ValueError(f"at most {MAX_CREDENTIALS} providers")
    clean: dict[str, str] = {}
    for provider, secret in value.items():
        if not isinstance(provider, str) or not PROVIDER_PATTERN.match(provider):
            raise ValueError("provider names are 1-32 lower-case letters, digits, '-' or '_'")
        if not isinstance(secret, str) or not 1 <= len(secret) <= MAX_SECRET_LENGTH:
            raise ValueError(f"{provider}: must be a string of 1-{MAX_SECRET_LENGTH} characters")
        if not _SECRET_PATTERN.match(secret):
            raise ValueError(f"{provider}: must be printable ASCII without spaces")
        clean[provider] = secret
    return clean


class _CredentialCipher(KeyCipher):
    """The signing-key cipher, sealing arbitrary bytes under an explicit context."""

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_LENGTH)
        ciphertext = self._keks[self.current_id].encrypt(nonce, plaintext, context)
        return _VERSION + self.current_id.encode("ascii") + nonce + ciphertext

    def open(self, blob: bytes, context: bytes) -> bytes:
        head = 1 + _KEK_ID_LENGTH + _NONCE_LENGTH
        if len(blob) <= head or blob[:1] != _VERSION:
            raise KeyDecryptionFailed("instance credentials are not in a known format")
        kek = blob[1 : 1 + _KEK_ID_LENGTH].decode("ascii", errors="replace")
        aead = self._keks.get(kek)
        if aead is None:
            raise KeyDecryptionFailed(
                f"instance credentials were sealed with KEK {kek}, which is not configured"
            )
        try:
            return aead.decrypt(blob[1 + _KEK_ID_LENGTH : head], blob[head:], context)
        except InvalidTag as exc:
            raise KeyDecryptionFailed("instance credentials failed to decrypt") from exc


def _cipher(settings: Settings) -> _CredentialCipher:
    return _CredentialCipher(settings.key_encryption_keys())


def encrypt_credentials(
    settings: Settings, instance_id: str, credentials: Mapping[str, str]
) -> bytes | None:
    """The sealed blob for ``credentials`` (``None`` when there are none)."""
    if not credentials:
        return None
    plain = json.dumps(dict(credentials), separators=(",", ":"), sort_keys=True).encode()
    return _cipher(settings).seal(plain, _AAD_PREFIX + instance_id.encode())


def decrypt_credentials(settings: Settings, instance: _Sealable) -> dict[str, str]:
    """The instance's ``{provider: api_key}`` (empty when none were given).

    For the provisioning code only (it sets them as app secrets on the runtime). Raises
    :class:`KeyDecryptionFailed` when the blob does not open with the configured KEKs.
    """
    blob = instance.credentials_encrypted
    if not blob:
        return {}
    plain = _cipher(settings).open(bytes(blob), _AAD_PREFIX + instance.id.encode())
    data = json.loads(plain)
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise KeyDecryptionFailed("instance credentials are not a provider → key object")
    return data
