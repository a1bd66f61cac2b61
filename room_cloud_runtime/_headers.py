"""Security headers on every HTTP response, refusals from inner layers included.

The layer sits outermost (DESIGN.md "Runtime pipeline", step 1), so the 401/403/413/429 answers
of the inner layers carry the same headers as the Room app's own responses. A refused WebSocket
upgrade answered with the ASGI ``websocket.http.response`` extension gets them too.

Which headers, and why (docs/runtime.md "Security headers" has the table):

- every response: ``Strict-Transport-Security: max-age=…; includeSubDomains`` (the runtime is only
  ever reached over HTTPS behind Fly's proxy; browsers ignore the header on plain HTTP, so it is
  harmless in local development), ``X-Content-Type-Options: nosniff`` (no MIME sniffing),
  ``Content-Security-Policy: frame-ancestors 'none'`` (no framing, i.e. no clickjacking; only
  added when the app sent no CSP of its own: its policy wins) and ``Referrer-Policy:
  no-referrer`` (not ``strict-origin-when-cross-origin``: launch links may carry a token in the
  URL, and even the origin of an instance is nobody else's business);
- API responses (``/api/`` paths) also get ``Cache-Control: no-store``, replacing whatever the app
  sent: API answers carry tokens, profiles and room data that no shared or browser cache may keep;
- every response also gets ``Cross-Origin-Resource-Policy: same-origin`` (no other site may load
  it in no-cors mode; CORS reads by allowed origins are unaffected);
- everything else (the UI's HTML documents and static assets) also gets ``X-Frame-Options: DENY``,
  ``Cross-Origin-Opener-Policy: same-origin``, ``X-Permitted-Cross-Domain-Policies: none`` and a
  ``Permissions-Policy`` turning off camera, microphone, geolocation, payment and USB;
  ``Cross-Origin-Embedder-Policy: require-corp`` only with ``coep`` (it breaks a UI that loads
  third-party resources without CORP, as the real Room's does). These only mean something for a
  document a browser renders: ``frame-ancestors`` supersedes ``X-Frame-Options`` in every browser
  that implements CSP level 2 (X-Frame-Options is the fallback for older ones), and the opener
  policy governs browsing-context groups, which a JSON answer never creates. Left off the API,
  they save header validations per response in the server (uvicorn checks each header with two
  regular expressions).

A header the app already set is never duplicated (its value wins), except ``Cache-Control`` on
API paths. Everything is prebuilt at construction; per response the layer scans the app's
(usually few) header names once and concatenates two lists.

Inner layers that add response headers of their own (CORS's ``Vary`` and
``Access-Control-Allow-*``) can hand them to this layer's ``send`` through
:meth:`SecuredSend.defer` instead of wrapping ``send`` a second time; used alone they wrap it
themselves.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._errors import ConfigError

Header = tuple[bytes, bytes]
HeaderMerge = Callable[[Sequence[Header], tuple[Header, ...]], list[Header]]
#: What an inner layer defers to :class:`SecuredSend`: (headers to add, names that need merging,
#: merge function). Prebuilt by that layer, so deferring costs one attribute store.
Deferral = tuple[tuple[Header, ...], frozenset[bytes], HeaderMerge]

_CACHE_CONTROL = b"cache-control"
_NO_STORE: Header = (_CACHE_CONTROL, b"no-store")
_NOSNIFF: Header = (b"x-content-type-options", b"nosniff")
_FRAME_ANCESTORS: Header = (b"content-security-policy", b"frame-ancestors 'none'")
_NO_REFERRER: Header = (b"referrer-policy", b"no-referrer")
# No other site may load our responses in no-cors mode (<img>, <script>; Spectre-style reads).
# CORS reads by the allowed origins are not affected: CORP applies to no-cors requests only.
_CORP: Header = (b"cross-origin-resource-policy", b"same-origin")
# For documents only (see the module docstring).
_DOCUMENT_ONLY: tuple[Header, ...] = (
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"x-permitted-cross-domain-policies", b"none"),
    # Powerful features the Room UI never uses; a script injected into it gets none of them.
    (
        b"permissions-policy",
        b"camera=(), microphone=(), geolocation=(), payment=(), usb=(), "
        b"interest-cohort=(), browsing-topics=()",
    ),
)
_COEP: Header = (b"cross-origin-embedder-policy", b"require-corp")


class SecurityHeaders:
    """Pure ASGI middleware adding security headers to HTTP responses and WebSocket denials.

    :param app: the ASGI app to wrap.
    :param hsts_max_age: ``max-age`` of ``Strict-Transport-Security`` in seconds (0 tells browsers
        to forget the policy); ``None`` leaves the header out.
    :param coep: also send ``Cross-Origin-Embedder-Policy: require-corp`` on documents.
    :param api_prefix: path prefix of the JSON API, whose responses get ``Cache-Control:
        no-store`` (and not the document-only headers). The prefix without its trailing slash
        (``/api``) counts too.
    """

    __slots__ = ("_api", "_api_exact", "_api_prefix", "_document", "app")

    def __init__(
        self,
        app: ASGIApp,
        *,
        hsts_max_age: int | None = 31_536_000,
        api_prefix: str = "/api/",
        coep: bool = False,
    ) -> None:
        if hsts_max_age is not None and (
            not isinstance(hsts_max_age, int) or isinstance(hsts_max_age, bool) or hsts_max_age < 0
        ):
            raise ConfigError(
                "hsts_max_age", f"must be a non-negative integer, got {hsts_max_age!r}"
            )
        if not isinstance(api_prefix, str) or not api_prefix.startswith("/"):
            raise ConfigError("api_prefix", f"must be a path starting with '/', got {api_prefix!r}")
        self.app = app
        common: list[Header] = []
        if hsts_max_age is not None:
            common.append(
                (
                    b"strict-transport-security",
                    b"max-age=%d; includeSubDomains" % hsts_max_age,
                )
            )
        common += [_NOSNIFF, _FRAME_ANCESTORS, _NO_REFERRER, _CORP]
        # COEP require-corp breaks a UI that loads cross-origin resources without CORP (the
        # real Room's index.html loads third-party scripts): off unless the operator asks.
        document = (*_DOCUMENT_ONLY, _COEP) if coep else _DOCUMENT_ONLY
        # Per kind of response, everything the layer needs, prebuilt: (the headers it adds,
        # their names, whether it is an API response).
        self._api = _Profile((*common, _NO_STORE), on_api=True)
        self._document = _Profile((*common, *document), on_api=False)
        self._api_prefix = api_prefix
        self._api_exact = api_prefix.rstrip("/") or "/"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            start = "http.response.start"
        elif kind == "websocket":
            # Only a denial (HTTP answer instead of the 101) carries headers worth securing.
            start = "websocket.http.response.start"
        else:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        secured = SecuredSend()
        secured.downstream = send
        secured.start = start
        secured.profile = (
            self._api
            if path.startswith(self._api_prefix) or path == self._api_exact
            else self._document
        )
        secured.deferred = None
        await self.app(scope, receive, secured.send)


class _Profile:
    """The headers added to one kind of response (API or document), prebuilt."""

    __slots__ = ("headers", "names", "on_api")

    def __init__(self, headers: tuple[Header, ...], *, on_api: bool) -> None:
        self.headers = headers
        self.names = frozenset(name for name, _ in headers)
        self.on_api = on_api


class SecuredSend:
    """Per request, what :class:`SecurityHeaders` adds; its bound :meth:`send` is the ``send``
    the layer hands inward.

    An inner layer that wants headers added at the response start may recognise that ``send``
    (``type(getattr(send, "__self__", None)) is SecuredSend``) and :meth:`defer` them to it
    instead of wrapping ``send`` again, which would cost a second wrapper call and a second copy
    of the start message. (A bound method rather than ``__call__``: calling an instance costs
    more than calling a method, measured.)
    """

    __slots__ = ("deferred", "downstream", "profile", "start")

    downstream: Send
    start: str
    profile: _Profile
    deferred: Deferral | None

    def defer(self, deferral: Deferral) -> bool:
        """Add ``deferral``'s headers at the response start, before this layer's own.

        ``deferral`` is ``(headers, names, merge)``: when the app's response already has a
        header named in ``names``, the result is ``merge(app_headers, headers)`` instead of a
        plain concatenation. One inner layer may defer; a second gets ``False`` and must wrap
        ``send`` itself.
        """
        if self.deferred is not None:
            return False
        self.deferred = deferral
        return True

    def send(self, message: Message) -> Awaitable[None]:
        # A plain method handing back send's awaitable, not a coroutine: it saves a coroutine
        # frame per message on the hot path (ASGI only asks that send's result be awaitable).
        if message["type"] == self.start:
            profile = self.profile
            headers = message.get("headers", ())
            names = profile.names
            deferred = self.deferred
            if deferred is None:
                for name, _ in headers:
                    if name in names:  # the app set one of ours (ASGI: lowercase names)
                        merged = _merge(headers, profile)
                        break
                else:
                    merged = [*headers, *profile.headers]
            else:
                added, inner_names, merge = deferred
                for name, _ in headers:
                    if name in names or name in inner_names:
                        merged = _merge(merge(headers, added), profile)
                        break
                else:
                    merged = [*headers, *added, *profile.headers]
            message = {**message, "headers": merged}
        return self.downstream(message)


def _merge(headers: Sequence[Header], profile: _Profile) -> list[Header]:
    """The app's headers plus ours, ours skipped where the app set the same name.

    Names are compared as sent: the ASGI spec requires response header names to be lowercase
    (Starlette and FastAPI comply), and this runs on every response the app set one of ours.
    """
    names = profile.names
    present = {name for name, _ in headers if name in names}
    if not present:
        return [*headers, *profile.headers]
    if profile.on_api and _CACHE_CONTROL in present:
        # Ours replaces the app's: a cached API answer can leak one user's data to another.
        headers = [item for item in headers if item[0] != _CACHE_CONTROL]
        present.discard(_CACHE_CONTROL)
    return [*headers, *(item for item in profile.headers if item[0] not in present)]
