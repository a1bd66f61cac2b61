"""CORS with an exact-origin allowlist that refuses, rather than merely omits headers.

Starlette's ``CORSMiddleware`` lets a request from a disallowed origin reach the app (it only
leaves the ``Access-Control-Allow-Origin`` header out), passes WebSocket scopes through with no
Origin check, and with ``*`` plus credentials echoes any origin (PITFALLS.md "CORS, headers,
WebSockets"; starlette PR #3137). This layer instead:

- compares the ``Origin`` header byte for byte with origins normalised at construction
  (lowercase scheme and host, default port dropped). Browsers always send that serialised form,
  so anything else — ``null``, ``http`` for ``https``, another port, ``app.quoroom.ai.evil.com``,
  ``evilapp.quoroom.ai``, upper case, a trailing dot — is simply not in the set. No prefix,
  suffix or pattern matching is ever done;
- refuses a disallowed origin on guarded paths (``/api/`` by default) with 403
  ``origin_not_allowed`` without calling the app, and refuses any non-safe method (``POST``,
  ``PUT``…) from a disallowed origin on every path: static UI assets are only ever read;
- answers preflights itself (204, or 403 ``cors_preflight_refused``);
- refuses a WebSocket upgrade whose ``Origin`` is present and not allowed, before it is accepted
  (cross-site WebSocket hijacking: browsers let any page open a socket to any host, and the only
  thing that tells the server who opened it is ``Origin``). A WebSocket *without* ``Origin`` is
  let through: browsers always send one, so its absence means a non-browser client, which the
  runtime token still has to authenticate;
- sends ``Vary: Origin`` on every guarded response and every response whose headers depend on
  ``Origin``, merged into the app's ``Vary``, so caches never mix origins.

A request without ``Origin`` (same-origin navigations and GETs, curl, health checks) passes.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._errors import ConfigError
from ._headers import Deferral, SecuredSend
from ._refusal_reports import note_refusal
from ._responses import deny_websocket, send_error

Header = tuple[bytes, bytes]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Methods a page may send cross-origin without a preflight that never change state.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_VARY = b"vary"
_VARY_ORIGIN: Header = (_VARY, b"Origin")
_ACAO = b"access-control-allow-origin"
_ACAC = b"access-control-allow-credentials"
_ORIGIN = b"origin"
_ACRM = b"access-control-request-method"
_ACRH = b"access-control-request-headers"
_MERGED = frozenset({_VARY, _ACAO, _ACAC})
_ONLY_VARY: tuple[Header, ...] = (_VARY_ORIGIN,)


def normalise_origin(origin: str, *, setting: str = "allowed_origins") -> str:
    """The serialised form a browser sends for ``origin``: ``scheme://host[:port]``, lowercase.

    Raises :class:`ConfigError` naming ``setting`` for anything that is not exactly an origin:
    wildcards, ``null``, paths, queries, fragments, credentials, non-HTTP schemes, non-ASCII
    hosts (give the punycode form), trailing dots.
    """
    if not isinstance(origin, str):
        raise ConfigError(setting, f"each origin must be a string, got {origin!r}")
    if "*" in origin:
        raise ConfigError(setting, f"wildcards are not allowed, got {origin!r}")
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(setting, f"not an origin: {origin!r}") from exc
    host = parts.hostname
    scheme = parts.scheme.lower()
    if (
        scheme not in _DEFAULT_PORTS
        or not host
        or parts.username is not None
        or parts.path
        or port == 0
        or parts.query
        or parts.fragment
        or origin != origin.strip()
        or "#" in origin
        or "?" in origin
    ):
        raise ConfigError(
            setting,
            f"each entry must be an exact origin like https://app.quoroom.ai, got {origin!r}",
        )
    if not host.isascii():
        raise ConfigError(setting, f"give internationalised hosts in punycode, got {origin!r}")
    if host.endswith("."):
        raise ConfigError(setting, f"trailing dot in host, got {origin!r}")
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def _tokens(setting: str, values: Iterable[str], *, upper: bool) -> tuple[str, ...]:
    if isinstance(values, str | bytes):
        raise ConfigError(setting, "must be a list of names, not a single string")
    out: list[str] = []
    for value in values:
        if not isinstance(value, str) or not _TOKEN.fullmatch(value) or value == "*":
            raise ConfigError(setting, f"not an HTTP token (wildcards are not allowed): {value!r}")
        value = value.upper() if upper else value.lower()
        if value not in out:
            out.append(value)
    return tuple(out)


def _prefixes(setting: str, values: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str | bytes):
        raise ConfigError(setting, "must be a list of path prefixes, not a single string")
    out = tuple(values)
    for value in out:
        if not isinstance(value, str) or not value.startswith("/"):
            raise ConfigError(setting, f"each prefix must start with '/', got {value!r}")
    return out


class CORSGuard:
    """Pure ASGI middleware: exact-origin CORS that refuses disallowed origins (see module doc).

    :param app: the ASGI app to wrap.
    :param allowed_origins: exact origins (``https://app.quoroom.ai``); normalised and checked
        here, wildcards refused. Empty means no cross-origin access at all.
    :param allow_methods: methods a preflight may ask for (case-sensitive, as in HTTP).
    :param allow_headers: request headers a preflight may ask for (case-insensitive).
    :param expose_headers: response headers the page may read.
    :param max_age: seconds a browser may cache a preflight answer (browsers cap it: Chromium at
        7200).
    :param allow_credentials: send ``Access-Control-Allow-Credentials: true``. The runtime uses
        bearer tokens, not cookies, so this stays off unless a Room needs cookies.
    :param guarded_prefixes: path prefixes (``/api/``) where a disallowed origin is refused with
        403; elsewhere (static UI assets) a disallowed origin may still read (GET/HEAD) but gets
        no CORS headers.
    :param websocket_paths: path prefixes of the Room's WebSocket endpoints. Plain HTTP requests
        to them are guarded like ``guarded_prefixes``. WebSocket upgrades are Origin-checked on
        *every* path regardless: narrowing that check would reopen cross-site WebSocket
        hijacking for any socket the app adds later.
    """

    __slots__ = (
        "_allowed",
        "_guarded",
        "_methods",
        "_preflight",
        "_request_headers",
        "_simple",
        "app",
    )

    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_origins: Iterable[str],
        allow_methods: Iterable[str] = ("GET", "POST", "PUT", "PATCH", "DELETE"),
        allow_headers: Iterable[str] = ("authorization", "content-type"),
        expose_headers: Iterable[str] = ("retry-after", "ratelimit", "ratelimit-policy"),
        max_age: int = 600,
        allow_credentials: bool = False,
        guarded_prefixes: Iterable[str] = ("/api/",),
        websocket_paths: Iterable[str] = ("/ws",),
    ) -> None:
        if isinstance(allowed_origins, str | bytes):
            raise ConfigError(
                "allowed_origins",
                "must be a list of origins, not a single (comma-separated?) string",
            )
        origins: list[str] = []
        for origin in allowed_origins:
            normalised = normalise_origin(origin)
            if normalised not in origins:
                origins.append(normalised)
        methods = _tokens("allow_methods", allow_methods, upper=True)
        request_headers = _tokens("allow_headers", allow_headers, upper=False)
        exposed = _tokens("expose_headers", expose_headers, upper=False)
        if not isinstance(max_age, int) or isinstance(max_age, bool) or not 0 <= max_age <= 86_400:
            raise ConfigError("max_age", f"must be an integer between 0 and 86400, got {max_age!r}")
        if not isinstance(allow_credentials, bool):
            raise ConfigError("allow_credentials", f"must be a bool, got {allow_credentials!r}")
        guarded = _prefixes("guarded_prefixes", guarded_prefixes) + _prefixes(
            "websocket_paths", websocket_paths
        )

        self.app = app
        self._guarded = guarded
        # HEAD is CORS-safelisted (Fetch standard): a preflight asking for it is always fine.
        self._methods = frozenset(methods) | {"HEAD"}
        self._request_headers = frozenset(request_headers)
        # Per allowed origin, the headers of an actual response and of a preflight answer, as
        # bytes, so a request only does a dict lookup. Keys are the exact bytes a browser sends.
        credentials: tuple[Header, ...] = ((_ACAC, b"true"),) if allow_credentials else ()
        expose: tuple[Header, ...] = (
            ((b"access-control-expose-headers", ", ".join(exposed).encode()),) if exposed else ()
        )
        self._simple: dict[bytes, Deferral] = {}
        self._preflight: dict[bytes, list[Header]] = {}
        for origin in origins:
            raw = origin.encode("ascii")
            simple = (_VARY_ORIGIN, (_ACAO, raw), *credentials, *expose)
            self._simple[raw] = (simple, _MERGED, _with_cors)
            self._preflight[raw] = [
                (_ACAO, raw),
                *credentials,
                (b"access-control-allow-methods", ", ".join(methods).encode()),
                (b"access-control-allow-headers", ", ".join(request_headers).encode()),
                (b"access-control-max-age", str(max_age).encode()),
                (_VARY, b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
            ]
        self._allowed = frozenset(self._simple)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":  # HTTP inline below: one coroutine frame less per request
            if kind == "websocket":
                origin = _header(scope, _ORIGIN)
                if origin is not None and origin not in self._allowed:
                    note_refusal(scope, "origin_not_allowed")
                    await deny_websocket(
                        scope, send, 403, "origin not allowed", "origin_not_allowed"
                    )
                    return
            await self.app(scope, receive, send)
            return
        origin = None
        for name, value in scope["headers"]:  # _header, inlined: this runs on every request
            if name == _ORIGIN:
                origin = value
                break
        guarded = scope["path"].startswith(self._guarded)
        if origin is None:
            # Vary: Origin on every path: an allowed origin gets CORS headers here too, so a
            # cache must not serve this answer to it (or the reverse).
            await self.app(scope, receive, _vary_sender(send, _VARY_ONLY))
            return
        method = scope["method"]
        if method == "OPTIONS":
            requested = _header(scope, _ACRM)
            if requested is not None:
                await self._answer_preflight(scope, send, origin, requested)
                return
        cors = self._simple.get(origin)
        if cors is not None:
            await self.app(scope, receive, _vary_sender(send, cors))
        elif guarded or method not in _SAFE_METHODS:
            note_refusal(scope, "origin_not_allowed")
            await send_error(
                send, 403, "origin not allowed", "origin_not_allowed", headers=(_VARY_ORIGIN,)
            )
        else:
            # A foreign page may embed the UI's static assets; it gets no CORS headers, so it
            # cannot read them from script.
            await self.app(scope, receive, _vary_sender(send, _VARY_ONLY))

    async def _answer_preflight(
        self, scope: Scope, send: Send, origin: bytes, requested: bytes
    ) -> None:
        headers = self._preflight.get(origin)
        if headers is not None and self._preflight_allowed(scope, requested):
            await send({"type": "http.response.start", "status": 204, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        note_refusal(scope, "cors_preflight_refused")
        await send_error(
            send,
            403,
            "CORS preflight refused",
            "cors_preflight_refused",
            headers=(
                (_VARY, b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
            ),
        )

    def _preflight_allowed(self, scope: Scope, requested: bytes) -> bool:
        # Methods are case-sensitive (RFC 9110 §9.1); browsers upper-case only the standard six,
        # so a page asking for "patch" gets refused, as its request would not match anyway.
        if requested.decode("latin-1") not in self._methods:
            return False
        asked = _header(scope, _ACRH)
        if asked is None:
            return True
        names = {name.strip().lower() for name in asked.decode("latin-1").split(",")}
        names.discard("")
        return names <= self._request_headers


def _header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of request header ``name`` (ASGI servers give lowercase names)."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for key, value in headers:
        if key == name:
            return value
    return None


def _vary_sender(send: Send, deferral: Deferral) -> Send:
    """A ``send`` that adds ``deferral``'s headers (``Vary: Origin`` first) at the response start.

    Behind :class:`~room_cloud_runtime._headers.SecurityHeaders` (its ``send`` arrives here
    unwrapped on the usual body-less request), the headers are handed to it to add along with
    its own: same result, one wrapper and one copy of the start message less.
    """
    owner = getattr(send, "__self__", None)
    if type(owner) is SecuredSend and owner.defer(deferral):
        return send
    added = deferral[0]

    # A plain function handing back send's awaitable: no coroutine frame per message.
    def send_with_cors(message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            headers = message.get("headers", ())
            for name, _ in headers:
                if name in _MERGED:  # ASGI requires lowercase response header names
                    merged = _with_cors(headers, added)
                    break
            else:
                merged = [*headers, *added]
            message = {**message, "headers": merged}
        return send(message)

    return send_with_cors


def _with_cors(headers: Iterable[Header], added: tuple[Header, ...]) -> list[Header]:
    """The app's headers with ``Origin`` merged into its ``Vary``, and our CORS headers added.

    ``added`` is ``Vary: Origin`` followed by the CORS headers of an allowed origin (if any).
    When we send CORS headers, the app's own ``Access-Control-Allow-Origin`` and ``-Credentials``
    are dropped: a second, different value (``*`` from a permissive app) makes browsers refuse
    the response or, worse, trust the app's wildcard.
    """
    extra = added[1:]
    out: list[Header] = []
    vary_at = -1
    varies = False
    for item in headers:
        name = item[0]
        if name == _VARY:
            tokens = {token.strip().lower() for token in item[1].split(b",")}
            if b"origin" in tokens or b"*" in tokens:
                varies = True
            if vary_at < 0:
                vary_at = len(out)
        elif extra and (name == _ACAO or name == _ACAC):
            continue
        out.append(item)
    if not varies:
        if vary_at < 0:
            out.append(_VARY_ORIGIN)
        else:
            name, value = out[vary_at]
            out[vary_at] = (name, value + b", Origin" if value.strip() else b"Origin")
    out.extend(extra)
    return out


_VARY_ONLY: Deferral = (_ONLY_VARY, _MERGED, _with_cors)
