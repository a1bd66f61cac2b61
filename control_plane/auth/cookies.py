"""The names of the control plane's cookies, which depend on the deployment.

With Secure cookies (production, or any https ``PUBLIC_URL``) the names carry the cookie name
prefixes of RFC 6265bis §4.1.3: a browser accepts a ``__Host-`` cookie only if it is Secure, set
from a secure origin, with ``Path=/`` and no ``Domain`` — so a sibling subdomain (or a plain-http
man in the middle) can neither plant nor overwrite it ("cookie tossing"). The path-scoped cookies
(the refresh token on ``/api/auth``, the Google state on ``/api/auth/google``) cannot be
``__Host-`` without being sent on every request, so they get ``__Secure-`` (Secure, set from a
secure origin) and keep their narrow path; a tossed one would only be an attacker's own token,
and the CSRF check binds every cookie-authenticated write to the ``__Host-`` CSRF cookie.

Development over plain http (``http://127.0.0.1:8000``) keeps the unprefixed names: a prefixed
cookie needs ``Secure``, which a browser does not send over http to every loopback name.
Readers look up the one name of their deployment only: an unprefixed cookie in production is
ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from control_plane.settings import Settings

__all__ = ["CookieNames", "cookie_names"]


@dataclass(frozen=True, slots=True)
class CookieNames:
    access: str
    refresh: str
    csrf: str
    google_state: str


_PLAIN = CookieNames("qr_access", "qr_refresh", "qr_csrf", "qr_oauth")
_PREFIXED = CookieNames(
    access="__Host-qr_access",
    refresh="__Secure-qr_refresh",
    csrf="__Host-qr_csrf",
    google_state="__Secure-qr_oauth",
)


def cookie_names(settings: Settings) -> CookieNames:
    """The cookie names of this deployment (prefixed exactly when cookies are Secure)."""
    return _PREFIXED if settings.secure_cookies else _PLAIN
