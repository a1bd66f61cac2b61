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
from collections.abc import Mapping
from typing import Protocol

from control_plane.errors import KeyDecryptionFailed
from control_plane.keys.service import BlobCipher
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


def _cipher(settings: Settings) -> BlobCipher:
    return BlobCipher(settings.key_encryption_keys(), "instance credentials")


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
