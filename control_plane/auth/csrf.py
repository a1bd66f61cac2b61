"""CSRF defence for cookie-authenticated unsafe requests.

Two checks, both required (OWASP CSRF cheat sheet):

1. **Origin**: a browser sends ``Origin`` on every cross-origin and same-origin POST; when present
   it must be exactly the public URL's origin. ``Sec-Fetch-Site: cross-site`` is refused too. This
   check also runs on the unauthenticated account endpoints (login CSRF).
2. **Signed double submit**: the ``qr_csrf`` cookie (readable by the page's JavaScript) holds an
   itsdangerous signature over the session id; the request must echo it in ``X-CSRF-Token``. An
   attacker can neither read the cookie nor forge a token bound to the victim's session.

Requests authenticated by ``Authorization: Bearer`` (or a refresh token in the body) carry no
ambient credential and need neither.
"""

from __future__ import annotations

import hmac

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import HTTPConnection

from control_plane.auth.cookies import cookie_names
from control_plane.errors import CsrfFailed, OriginMismatch
from control_plane.settings import Settings

CSRF_COOKIE = "qr_csrf"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
MAX_TOKEN_LENGTH = 256


class CsrfProtector:
    def __init__(self, settings: Settings) -> None:
        self._serializer = URLSafeTimedSerializer(settings.secret_key_bytes(), salt="quoroom-csrf")
        self._origin = settings.public_origin
        self._max_age = settings.session_ttl_seconds
        self._cookie = cookie_names(settings).csrf

    def issue(self, session_id: str) -> str:
        return self._serializer.dumps(session_id)

    def check_origin(self, request: HTTPConnection) -> None:
        origin = request.headers.get("origin")
        if origin is not None and not hmac.compare_digest(origin.encode(), self._origin.encode()):
            raise OriginMismatch()
        if request.headers.get("sec-fetch-site") == "cross-site":
            raise OriginMismatch()

    def check(self, request: HTTPConnection, session_id: str) -> None:
        """Both checks for a cookie-authenticated unsafe request bound to ``session_id``."""
        self.check_origin(request)
        header = request.headers.get(CSRF_HEADER, "")
        cookie = request.cookies.get(self._cookie, "")
        if (
            not header
            or len(header) > MAX_TOKEN_LENGTH
            or not hmac.compare_digest(header.encode(), cookie.encode())
        ):
            raise CsrfFailed()
        try:
            bound = self._serializer.loads(header, max_age=self._max_age)
        except BadSignature as exc:
            raise CsrfFailed() from exc
        if not isinstance(bound, str) or not hmac.compare_digest(
            bound.encode(), session_id.encode()
        ):
            raise CsrfFailed()
