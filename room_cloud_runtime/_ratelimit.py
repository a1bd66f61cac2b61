"""Rate limiting's two pure-ASGI layers; the limiters they use are in :mod:`._limiter`.

The layers: :class:`AddressRateLimit` (by client address, before any crypto; never keyed on
``X-Forwarded-For``, which the client controls, arcjet/arcjet-js#5412) and
:class:`PrincipalRateLimit` (by authenticated principal, read and write budgets apart).

Refusals are ``429 {"error", "code": "rate_limited"}`` with ``Retry-After`` and the IETF draft
``RateLimit-Policy`` / ``RateLimit`` headers (draft-ietf-httpapi-ratelimit-headers-09/10).
Successful responses do **not** carry ``RateLimit`` headers: adding them needs a ``send`` wrapper
on every request (a closure plus a check per message, ~0.6 us in process and more over the network
where the server validates each header, PERF-NOTES.md), which is over the per-layer budget.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable

from limits import RateLimitItem, parse
from starlette.types import ASGIApp, Receive, Scope, Send

from ._errors import ConfigError, StorageUnavailableError
from ._limiter import Limiter
from ._memstore import MAX_LIMIT, Decision, retry_after_seconds
from ._refusal_reports import note_refusal
from ._responses import deny_websocket, error_body, send_json
from ._scope import CLIENT_ADDRESS, PRINCIPAL

__all__ = ["AddressRateLimit", "PrincipalRateLimit", "address_key"]

logger = logging.getLogger("room_cloud_runtime.ratelimit")

#: Read methods for the principal's read budget (RFC 9110 §9.2.1 safe methods).
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


# -- the ASGI layers ---------------------------------------------------------------------------

_REFUSED_BODY = error_body("too many requests; retry later", "rate_limited")
_UNAVAILABLE_MESSAGE = "rate limiting is unavailable"


class _Policy:
    """One named budget, with its draft-standard ``RateLimit-Policy`` header prebuilt."""

    __slots__ = ("header", "item", "name")

    def __init__(self, option: str, name: str, value: str | RateLimitItem) -> None:
        if isinstance(value, RateLimitItem):
            parsed = value
        else:
            try:
                parsed = parse(value)
            except (ValueError, TypeError) as exc:
                raise ConfigError(option, f"not a rate limit like '300/minute': {value!r}") from exc
        if not 0 < parsed.amount <= MAX_LIMIT:
            raise ConfigError(option, f"the amount must be between 1 and {MAX_LIMIT}")
        # Our own namespace per budget: limits' key_for includes it, so "read" and "write" with
        # the same numbers still count apart, in memory and in Redis.
        self.item: RateLimitItem = type(parsed)(parsed.amount, parsed.multiples, namespace=name)
        self.name = name
        # draft-ietf-httpapi-ratelimit-headers-09 §3: a List of sf-strings with q (quota) and
        # w (window seconds) parameters.
        self.header = (
            b"ratelimit-policy",
            f'"{name}";q={parsed.amount};w={parsed.get_expiry()}'.encode(),
        )

    def refusal_headers(self, decision: Decision) -> list[tuple[bytes, bytes]]:
        retry = retry_after_seconds(decision.reset_after)
        remaining = decision.remaining or 0
        return [
            (b"retry-after", str(retry).encode()),
            self.header,
            (b"ratelimit", f'"{self.name}";r={remaining};t={retry}'.encode()),
            (b"cache-control", b"no-store"),
        ]


def _check_limiter(limiter: object) -> Limiter:
    if not isinstance(limiter, Limiter):
        raise ConfigError("limiter", "must be a Limiter (see build_limiter)")
    return limiter


async def _refuse(scope: Scope, send: Send, policy: _Policy, decision: Decision) -> None:
    note_refusal(scope, "rate_limited")  # for the owner's access log (issue 15)
    headers = policy.refusal_headers(decision)
    if scope["type"] == "websocket":
        await deny_websocket(
            scope, send, 429, "too many requests; retry later", "rate_limited", headers
        )
    else:
        await send_json(send, 429, _REFUSED_BODY, headers)


async def _unavailable(scope: Scope, send: Send) -> None:
    # on_storage_error="closed": refuse rather than serve unlimited (fail closed).
    if scope["type"] == "websocket":
        await deny_websocket(scope, send, 503, _UNAVAILABLE_MESSAGE, "rate_limit_unavailable")
    else:
        await send_json(
            send,
            503,
            error_body(_UNAVAILABLE_MESSAGE, "rate_limit_unavailable"),
            [(b"retry-after", b"1"), (b"cache-control", b"no-store")],
        )


def _ipv6_prefix(address: str) -> str:
    """Group an IPv6 address by its /64: one subscriber usually holds a whole /64
    (express-rate-limit#502), so per-address budgets would otherwise be trivially multiplied."""
    try:
        network = ipaddress.IPv6Network(f"{address.split('%', 1)[0]}/64", strict=False)
    except ValueError:
        return address
    return str(network)


def address_key(scope: Scope) -> str:
    """The limiter key for the client of ``scope``.

    Prefers the address the client-address layer stored (it alone decides whether
    ``Fly-Client-IP`` is trusted); otherwise the socket peer, IPv6 grouped by /64. Never a
    forwarding header.
    """
    state = scope.get("state")
    address = state.get(CLIENT_ADDRESS) if state else None
    if not address:
        client = scope.get("client")
        address = client[0] if client else None
        if not address:
            return "a:unknown"
        if ":" in address:
            address = _ipv6_prefix(address)
    return f"a:{address}"


class AddressRateLimit:
    """Rate limit by client address, on HTTP requests and WebSocket upgrades.

    Sits before authentication so a flood of forged tokens is refused before any signature is
    checked (a forged EdDSA token costs ~116 us to refuse; this check ~1-2 us). Paths in
    ``exempt_paths`` (exact matches; default ``/healthz``: Fly's health checks arrive without a
    client address and must not be starved) are not counted.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: Limiter,
        limit: str | RateLimitItem = "1200/minute",
        exempt_paths: Iterable[str] = ("/healthz",),
    ) -> None:
        self.app = app
        self.limiter = _check_limiter(limiter)
        self.policy = _Policy("limit", "address", limit)
        if isinstance(exempt_paths, str):
            raise ConfigError("exempt_paths", "must be a collection of paths, not one string")
        paths = tuple(exempt_paths)
        for path in paths:
            if not isinstance(path, str) or not path.startswith("/"):
                raise ConfigError(
                    "exempt_paths", f"each entry must be a path like /healthz: {path!r}"
                )
        self.exempt_paths = frozenset(paths)
        self._check = self.limiter.checker(self.policy.item)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if (kind != "http" and kind != "websocket") or scope["path"] in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        # The common case inlined from address_key: the client-address layer's key.
        state = scope.get("state")
        address = state.get(CLIENT_ADDRESS) if state else None
        key = f"a:{address}" if address else address_key(scope)
        check = self._check
        if check is not None:  # per-process memory: no coroutine, no Decision when allowed
            refusal = check(key)
        else:
            try:
                decision = await self.limiter.hit(key, self.policy.item)
            except StorageUnavailableError:
                await _unavailable(scope, send)
                return
            refusal = None if decision.allowed else decision
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await _refuse(scope, send, self.policy, refusal)


class PrincipalRateLimit:
    """Rate limit by authenticated principal, with read and write budgets apart.

    Runs after authentication and reads the :class:`~room_cloud_runtime._scope.Principal` it
    stored; requests without one (public paths) pass through, the address limit covers them.
    The key is ``p:<instance_id>:<subject>``. ``GET``/``HEAD``/``OPTIONS`` count against
    ``read_limit``, other methods against ``write_limit``; a WebSocket connect counts as one
    read.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: Limiter,
        read_limit: str | RateLimitItem = "300/minute",
        write_limit: str | RateLimitItem = "120/minute",
    ) -> None:
        self.app = app
        self.limiter = _check_limiter(limiter)
        self.read = _Policy("read_limit", "read", read_limit)
        self.write = _Policy("write_limit", "write", write_limit)
        self._read_check = self.limiter.checker(self.read.item)
        self._write_check = self.limiter.checker(self.write.item)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            read = scope["method"] in READ_METHODS
        elif kind == "websocket":
            read = True
        else:
            await self.app(scope, receive, send)
            return
        state = scope.get("state")
        principal = state.get(PRINCIPAL) if state else None
        if principal is None:
            await self.app(scope, receive, send)
            return
        key = f"p:{principal.instance_id}:{principal.subject}"
        check = self._read_check if read else self._write_check
        if check is not None:  # per-process memory: no coroutine, no Decision when allowed
            refusal = check(key)
        else:
            try:
                decision = await self.limiter.hit(key, (self.read if read else self.write).item)
            except StorageUnavailableError:
                await _unavailable(scope, send)
                return
            refusal = None if decision.allowed else decision
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await _refuse(scope, send, self.read if read else self.write, refusal)
