"""The client address the rate limiter keys on, and removal of client-sent identity headers.

Where the address comes from:

- ``Fly-Client-IP``, only when ``trust_fly_client_ip`` is set (the runtime sits behind Fly's
  proxy, which overwrites any client-sent value), and only when it parses as an IP address.
  Fly's own health checks arrive without it, so the socket address is the fallback.
- otherwise the socket address, ``scope["client"]``.
- never ``X-Forwarded-For``: Fly keeps and appends to a client-sent one, so its left entry is
  whatever the client wrote (arcjet/arcjet-js#5412). For the same reason uvicorn must not be run
  with ``--forwarded-allow-ips='*'`` (it would rewrite ``scope["client"]`` from that left
  entry); its default (trust only 127.0.0.1) is right.

The key: an IPv4 address as is; an IPv4-mapped IPv6 address as its IPv4 address (one host must
not get two budgets); any other IPv6 address as its /64 network (``2001:db8:1:2::/64``) —
a single subscriber usually holds a whole /64 and can rotate through it at will
(express-rate-limit#502). No ``scope["client"]`` (unix socket, some test clients) gives
``"unknown"``; a non-IP socket host (``"testclient"``) is used as is.

Identity headers: a Room app behind an auth proxy might trust ``X-Forwarded-Email`` or
``X-Forwarded-User``. Nothing in front of the runtime sets them, so any such header came from the
client; they are removed before the app sees them. Python servers fold ``_`` into ``-``
(``X_Forwarded_Email`` reaches a WSGI/ASGI app as ``x-forwarded-email`` in some stacks), which
let clients smuggle them past a proxy that only removed the dashed spelling (CVE-2025-64484,
oauth2-proxy), so every ``-``/``_`` spelling is matched.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Iterable
from typing import Literal

from starlette.types import ASGIApp, Receive, Scope, Send

from ._errors import ConfigError
from ._scope import CLIENT_ADDRESS

UNKNOWN = "unknown"

DEFAULT_STRIP_HEADERS: tuple[str, ...] = (
    # oauth2-proxy and its nginx auth_request variant
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x-forwarded-access-token",
    "x-auth-request-user",
    "x-auth-request-email",
    "x-auth-request-groups",
    "x-auth-request-preferred-username",
    "x-auth-request-access-token",
    # generic "the proxy authenticated this user" headers
    "x-remote-user",
    "remote-user",
    "x-user",
    "x-email",
    # ours: only the stack may ever speak for a user
    "x-quoroom-user",
    "x-quoroom-role",
    "x-quoroom-principal",
    "x-quoroom-instance",
)

_FLY_CLIENT_IP = b"fly-client-ip"
_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
# Cached (raw value → key) entries. A few thousand distinct addresses are live at any moment on
# one instance; beyond that the oldest entry is dropped (FIFO: cheaper than LRU bookkeeping on
# every hit, and a re-parse costs only a few microseconds).
_CACHE_SIZE = 4096


def _spellings(name: str) -> set[bytes]:
    """Every ``-``/``_`` spelling of ``name``, as lowercase bytes (CVE-2025-64484)."""
    parts = re.split(r"[-_]", name)
    seps = itertools.product("-_", repeat=len(parts) - 1)
    return {
        "".join(p + s for p, s in zip(parts, (*combo, ""), strict=True)).encode("ascii")
        for combo in seps
    }


class ClientAddress:
    """Pure ASGI middleware storing the client address key in ``scope["state"]``.

    The key is stored under :data:`room_cloud_runtime._scope.CLIENT_ADDRESS`, for HTTP and
    WebSocket scopes; other scopes (``lifespan``) pass through untouched.

    :param app: the ASGI app to wrap.
    :param trust_fly_client_ip: take the address from ``Fly-Client-IP`` (set this only when the
        runtime is reachable through Fly's proxy alone; anyone reaching it directly could send
        the header).
    :param ipv6_prefix: how many leading bits of an IPv6 address identify one client (1 to 128).
    :param strip_headers: request header names removed before the app sees them, matched in
        every ``-``/``_`` spelling. ``()`` turns stripping off.

    The only state that changes after construction is a bounded parse cache.
    """

    __slots__ = ("_cache", "_prefix", "_strip", "_trust_fly", "app")

    def __init__(
        self,
        app: ASGIApp,
        *,
        trust_fly_client_ip: bool = False,
        ipv6_prefix: int = 64,
        strip_headers: Iterable[str] = DEFAULT_STRIP_HEADERS,
    ) -> None:
        if not isinstance(trust_fly_client_ip, bool):
            raise ConfigError("trust_fly_client_ip", f"must be a bool, got {trust_fly_client_ip!r}")
        if (
            not isinstance(ipv6_prefix, int)
            or isinstance(ipv6_prefix, bool)
            or not 1 <= ipv6_prefix <= 128
        ):
            raise ConfigError(
                "ipv6_prefix", f"must be an integer from 1 to 128, got {ipv6_prefix!r}"
            )
        if isinstance(strip_headers, str | bytes):
            raise ConfigError("strip_headers", "must be a list of header names, not one string")
        strip: set[bytes] = set()
        for name in strip_headers:
            if not isinstance(name, str) or not _NAME.fullmatch(name.lower()):
                raise ConfigError("strip_headers", f"not a header name: {name!r}")
            strip |= _spellings(name.lower())
        if trust_fly_client_ip and _FLY_CLIENT_IP in strip:
            raise ConfigError("strip_headers", "cannot strip Fly-Client-IP while trusting it")
        self.app = app
        self._trust_fly = trust_fly_client_ip
        self._prefix = ipv6_prefix
        self._strip = frozenset(strip)
        # bytes keys are Fly-Client-IP values, str keys socket hosts; they never collide.
        self._cache: dict[bytes | str, str | None] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        strip = self._strip
        fly: bytes | None = None
        dirty = False
        # One pass does both jobs; a Python loop measured cheaper here than set/dict/map tricks
        # for the usual 10 to 15 request headers.
        if self._trust_fly:
            for name, value in headers:
                if name == _FLY_CLIENT_IP:
                    fly = value
                elif name in strip:
                    dirty = True
        elif strip:
            for name, _ in headers:
                if name in strip:
                    dirty = True
                    break
        if dirty:
            scope = {**scope, "headers": [item for item in headers if item[0] not in strip]}
        if fly is None:
            # _key's socket-address path, inlined: the usual case costs two dict look-ups.
            client = scope.get("client")
            if client:
                host = client[0]
                key = self._cache.get(host, False)
                if key is False:
                    key = self._remember(host, host)
                key = key if key is not None else host
            else:
                key = UNKNOWN
        else:
            key = self._key(scope, fly)
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state[CLIENT_ADDRESS] = key
        await self.app(scope, receive, send)

    def _key(self, scope: Scope, fly: bytes | None) -> str:
        cache = self._cache
        # False: not looked at yet; None: looked at, not an IP address.
        key: str | Literal[False] | None
        if fly is not None:
            key = cache.get(fly, False)
            if key is False:
                key = self._remember(fly, fly.decode("latin-1"))
            if key is not None:
                return key
            # Not an IP: fall back to the socket address, as for Fly's health checks.
        client = scope.get("client")
        if not client:
            return UNKNOWN
        host = client[0]
        key = cache.get(host, False)
        if key is False:
            key = self._remember(host, host)
        return key if key is not None else host

    def _remember(self, raw: bytes | str, text: str) -> str | None:
        key = self._parse(text)
        cache = self._cache
        if len(cache) >= _CACHE_SIZE:
            del cache[next(iter(cache))]
        cache[raw] = key
        return key

    def _parse(self, text: str) -> str | None:
        """The limiter key for an address, or None when ``text`` is not an IP address."""
        return client_address_key(text, ipv6_prefix=self._prefix)


def client_address_key(address: str, *, ipv6_prefix: int = 64) -> str | None:
    """The key one client's budget is counted under, or ``None`` when ``address`` is not an IP
    address.

    An IPv4 address as is; an IPv4-mapped IPv6 address as its IPv4 address (one host must not get
    two budgets); any other IPv6 address as its network of ``ipv6_prefix`` bits, zone dropped
    (``2001:db8:1:2::/64``), since one subscriber usually holds a whole /64
    (express-rate-limit#502). Surrounding whitespace is ignored.

    :class:`ClientAddress` keys the runtime's limits with it; the control plane's throttles use it
    so both group addresses the same way.

    :raises ValueError: ``ipv6_prefix`` is not from 1 to 128.
    """
    if not 1 <= ipv6_prefix <= 128:
        raise ValueError(f"ipv6_prefix must be from 1 to 128, got {ipv6_prefix!r}")
    try:
        parsed = ipaddress.ip_address(address.strip())
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv4Address):
        return str(parsed)
    mapped = parsed.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    # Drop any zone ("%eth0") and the host bits.
    shift = 128 - ipv6_prefix
    return str(ipaddress.IPv6Network(((int(parsed) >> shift) << shift, ipv6_prefix)))
