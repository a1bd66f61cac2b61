"""TOTP (RFC 6238) and recovery codes: the pure parts, no database.

- **Secrets** are 160 random bits (RFC 4226 §4 recommends 160), base32 as authenticator apps
  expect, sealed at rest with the key-encryption keys (AES-256-GCM through the signing keys'
  :class:`KeyCipher`, the associated data binding a blob to its user, so a ciphertext copied onto
  another account does not open). Blob layout as the instance credentials':
  ``0x01 | kek id (16 ASCII bytes) | nonce (12) | ciphertext+tag``.
- **Codes**: 6 digits, 30 s steps, SHA-1 (what every authenticator app implements), one step of
  drift either way. :func:`match_step` answers *which* step a code belongs to, so the caller can
  refuse that step and every earlier one afterwards (RFC 6238 §5.2: no second use).
- **The QR code** is drawn by segno (SVG, no JavaScript), from the ``otpauth://`` URI.
- **Recovery codes**: ten, 80 random bits each, shown as ``xxxx-xxxx-xxxx-xxxx`` (base32,
  lower case). Stored as SHA-256 over the user id and the normalized code, not Argon2id: with 80
  random bits a fast hash cannot be brute-forced from a database copy (2^80 guesses), as with the
  refresh and email tokens (:func:`control_plane.auth.sessions.token_hash`); a slow hash would
  only let whoever holds a password make the server run ten 19 MiB Argon2id verifications per
  attempt (each stored code tried in turn), and an index lookup keeps the check to one row. Not a
  keyed hash either: rotating ``SECRET_KEY`` would then silently void every recovery code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import re
import secrets
from datetime import datetime

import pyotp
import segno

from control_plane.keys.service import BlobCipher
from control_plane.settings import Settings

__all__ = [
    "DIGITS",
    "INTERVAL",
    "RECOVERY_CODE_COUNT",
    "match_step",
    "new_recovery_codes",
    "new_secret",
    "normalize_recovery_code",
    "open_secret",
    "provisioning_uri",
    "qr_data_uri",
    "qr_svg",
    "recovery_code_hash",
    "seal_secret",
]

DIGITS = 6
INTERVAL = 30
#: Steps accepted either side of the current one (clock drift, a code typed as it changed).
DRIFT_STEPS = 1
RECOVERY_CODE_COUNT = 10
ISSUER = "Quoroom"
_CODE_RE = re.compile(r"^[0-9]{6}$")
_RECOVERY_RE = re.compile(r"^[a-z2-7]{16}$")
_AAD_PREFIX = b"quoroom-totp-secret:"


def new_secret() -> str:
    """160 random bits, base32 (32 characters)."""
    return pyotp.random_base32(length=32)


def provisioning_uri(secret: str, email: str) -> str:
    return pyotp.TOTP(secret, digits=DIGITS, interval=INTERVAL).provisioning_uri(
        name=email, issuer_name=ISSUER
    )


def qr_svg(uri: str) -> str:
    """The QR code of ``uri`` as an SVG document (segno; no JavaScript draws it). White behind
    black modules whatever the page's colour scheme, so a camera reads it in dark mode too."""
    out = io.BytesIO()
    segno.make(uri, error="m").save(
        out, kind="svg", xmldecl=False, svgns=True, nl=False, scale=5, dark="#000", light="#fff"
    )
    return out.getvalue().decode("utf-8")


def qr_data_uri(uri: str) -> str:
    """The same SVG as a ``data:`` URI, for an ``<img>`` (the pages' CSP allows ``data:``
    images; an SVG in an ``<img>`` runs nothing)."""
    return str(segno.make(uri, error="m").svg_data_uri(scale=5, dark="#000", light="#fff"))


def step_of(now: datetime) -> int:
    return int(now.timestamp()) // INTERVAL


def match_step(secret: str, code: str, now: datetime, *, after: int | None) -> int | None:
    """The time step ``code`` is valid for (within the drift), if later than ``after``.

    ``None`` for a wrong code and for a right code of a step already used (``<= after``): the
    caller tells those apart with :func:`match_step` ``after=None`` when it wants to. Every
    candidate is compared in constant time."""
    if not _CODE_RE.match(code):
        return None
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=INTERVAL)
    current = step_of(now)
    found: int | None = None
    for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1):
        if hmac.compare_digest(totp.generate_otp(step).encode(), code.encode()) and (
            after is None or step > after
        ):
            found = step
    return found


# -- sealing the secret ------------------------------------------------------------------------


def seal_secret(settings: Settings, user_id: str, secret: str) -> bytes:
    cipher = BlobCipher(settings.key_encryption_keys(), "a TOTP secret")
    return cipher.seal(secret.encode("ascii"), _AAD_PREFIX + user_id.encode())


def open_secret(settings: Settings, user_id: str, blob: bytes) -> str:
    cipher = BlobCipher(settings.key_encryption_keys(), "a TOTP secret")
    return cipher.open(bytes(blob), _AAD_PREFIX + user_id.encode()).decode("ascii")


# -- recovery codes ----------------------------------------------------------------------------


def _new_recovery_code() -> str:
    raw = base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()  # 16 characters
    return "-".join(raw[i : i + 4] for i in range(0, 16, 4))


def new_recovery_codes() -> list[str]:
    return [_new_recovery_code() for _ in range(RECOVERY_CODE_COUNT)]


def normalize_recovery_code(code: str) -> str | None:
    """Lower case, without spaces and dashes; ``None`` when it cannot be one of ours."""
    clean = re.sub(r"[\s-]", "", code).lower()
    return clean if _RECOVERY_RE.match(clean) else None


def recovery_code_hash(user_id: str, normalized: str) -> bytes:
    return hashlib.sha256(f"quoroom-recovery\0{user_id}\0{normalized}".encode()).digest()
