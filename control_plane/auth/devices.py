"""Known-device cookies: the owner's own browser gets past a lock-out meant for guessers.

OWASP's "device cookie" answer to lock-out (Slow brute force, "Device Cookies"): after a
successful sign-in (or a password reset, which proves control of the mailbox) the browser gets a
signed ``qr_device`` cookie naming a random device id and the accounts that signed in on it. A
request carrying a cookie that names the account it is about is throttled on its own budget (per
account and device) instead of the budgets an attacker shares with the owner (per address, and the
per-account ceiling for unknown devices), so guessing spread over many addresses can no longer
lock the owner out, and others cannot spend the owner's password-reset budget.

The cookie is an itsdangerous signature (HMAC-SHA256 under ``SECRET_KEY``, its own salt; checked
in constant time) over ``{"d": device id, "a": [account tags], "t": issued at}``. Accounts appear
as keyed hashes of the normalized email, never in the clear, so the cookie can be checked before
the database is touched and the same way for accounts that do not exist. It expires
``KNOWN_DEVICE_TTL_SECONDS`` after the last sign-in (by the app's clock, not the browser's), is
HttpOnly, SameSite=Strict, scoped to ``/api/auth``, Secure (and named ``__Secure-qr_device``)
with Secure cookies, and outlives
sign-out (it names the device, not a session). It grants nothing by itself: a password is still
needed, so a stolen cookie buys only a budget of its own for guesses.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from itsdangerous import BadData, URLSafeSerializer
from starlette.requests import HTTPConnection
from starlette.responses import Response

from control_plane.settings import Settings

DEVICE_COOKIE = "qr_device"
#: With Secure cookies (see control_plane.auth.cookies): path-scoped, so ``__Secure-``.
SECURE_DEVICE_COOKIE = "__Secure-qr_device"
DEVICE_COOKIE_PATH = "/api/auth"
#: Accounts remembered per browser (most recent first): a shared family computer, say.
MAX_ACCOUNTS = 5
#: A genuine cookie is about 330 characters; anything far longer is not ours and is not parsed.
MAX_COOKIE_LENGTH = 1024
#: How far in the future an issue time may lie (clocks of several processes).
CLOCK_SKEW_SECONDS = 300


@dataclass(frozen=True, slots=True)
class KnownDevice:
    """A verified cookie: the device's id and the tags of the accounts that signed in on it."""

    id: str
    accounts: tuple[str, ...]

    def knows(self, tag: str) -> bool:
        # Tags are not secret, but compare_digest costs nothing and keeps the habit.
        found = False
        for account in self.accounts:
            found |= hmac.compare_digest(account.encode(), tag.encode())
        return found


class KnownDevices:
    """Issues and reads the known-device cookie (one per app, built from the settings)."""

    def __init__(self, settings: Settings) -> None:
        secret = settings.secret_key_bytes()
        self._serializer = URLSafeSerializer(secret, salt="quoroom-known-device")
        self._tag_key = hmac.new(secret, b"quoroom-known-device-account", hashlib.sha256).digest()
        self.ttl_seconds = settings.known_device_ttl_seconds
        self.secure = settings.secure_cookies
        self.cookie_name = SECURE_DEVICE_COOKIE if self.secure else DEVICE_COOKIE

    def tag(self, email: str) -> str:
        """The account's name in the cookie: a keyed hash of the normalized email."""
        return hmac.new(self._tag_key, email.encode(), hashlib.sha256).hexdigest()[:32]

    def read(self, raw: str | None, now: datetime) -> KnownDevice | None:
        """The device a cookie names; ``None`` for a missing, tampered, expired or foreign one."""
        if not raw or len(raw) > MAX_COOKIE_LENGTH:
            return None
        try:
            data: Any = self._serializer.loads(raw)
        except BadData:
            return None
        if not isinstance(data, dict):
            return None
        device, accounts, issued = data.get("d"), data.get("a"), data.get("t")
        if (
            not isinstance(device, str)
            or not isinstance(accounts, list)
            or not all(isinstance(a, str) for a in accounts)
            or not isinstance(issued, int)
            or isinstance(issued, bool)
        ):
            return None
        age = now.timestamp() - issued
        if age > self.ttl_seconds or age < -CLOCK_SKEW_SECONDS:
            return None
        return KnownDevice(device, tuple(accounts[:MAX_ACCOUNTS]))

    def issue(self, device: KnownDevice | None, email: str, now: datetime) -> str:
        """A fresh cookie value for ``device`` (a new device when ``None``) that also names
        ``email``'s account; the clock restarts."""
        tag = self.tag(email)
        kept = [a for a in (device.accounts if device else ()) if a != tag]
        payload = {
            "d": device.id if device else secrets.token_urlsafe(16),
            "a": [tag, *kept][:MAX_ACCOUNTS],
            "t": int(now.timestamp()),
        }
        return self._serializer.dumps(payload)

    def remember(
        self, response: Response, device: KnownDevice | None, email: str, now: datetime
    ) -> None:
        """Set the cookie on ``response`` after a successful sign-in or reset for ``email``."""
        value = self.issue(device, email, now)
        set_device_cookie(response, value, max_age=self.ttl_seconds, secure=self.secure)

    def from_request(self, request: HTTPConnection, now: datetime) -> KnownDevice | None:
        """The request's known device (its cookie of this deployment's name only)."""
        return self.read(request.cookies.get(self.cookie_name), now)


def set_device_cookie(response: Response, value: str, *, max_age: int, secure: bool) -> None:
    response.set_cookie(
        SECURE_DEVICE_COOKIE if secure else DEVICE_COOKIE,
        value,
        max_age=max_age,
        path=DEVICE_COOKIE_PATH,
        secure=secure,
        httponly=True,
        # Only our own pages call the account API; no cross-site request needs it.
        samesite="strict",
    )
