"""The cloud-mode stack as one ASGI callable: every layer's check, in their order, in one pass.

Why (issue 13): ten pure-ASGI layers cost ten coroutine frames, ten header scans and a ``send``
wrapper per layer that adds headers; through uvicorn that shape alone kept ~85 % of the bare
Room's rate before any check ran. :class:`FusedStack` runs the same checks over one parsed view of
the scope:

- the request headers are scanned once; each header any check needs (``Origin``,
  ``Authorization``, ``Content-Length``, ``Content-Type``, ``Transfer-Encoding``,
  ``Fly-Client-IP``, the client-sent identity headers to strip, the preflight's two) is picked
  up in that scan, their sizes summed in the same loop;
- the checks run in the documented order (SecurityHeaders → CORSGuard → RequestLimits →
  ClientAddress → AddressRateLimit → Authenticate → CloudEndpoints → PrincipalRateLimit →
  ACLGuard), so when several would refuse, the same one answers as in the layered composition;
- one ``send`` wrapper (:class:`_Out`) adds the response headers, prebuilt per (kind of response,
  CORS answer) as one tuple; the access log's status is recorded by the same object;
- nothing per request that a constant or a cache can replace: the verified token is found from
  the raw ``Authorization`` bytes through a bounded memo (no parsing, and the token string's hash
  is cached by Python), the memory limiter is checked synchronously without allocating when it
  allows, the ACL's verdict is the layer's own memo.

It is built from the layer instances :class:`~room_cloud_runtime._stack.RuntimeStack` composes
(they validate the options and prebuild their tables; caches are shared with them), and it reuses
their code for everything off the hot path: preflight answers, request bodies (counted and
checked lazily by :class:`RequestLimits`), the ``/api/status`` merge, and WebSocket upgrades,
which go through the layered composition (one per connection, whose per-socket objects, the
expiry timer and the message cap, exist either way). Each layer stays usable alone;
tests/runtime/test_fused_parity.py holds the two shapes to the same statuses, headers and bodies.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._acl import _BAD_PATH, _MEMO_MAX_PATH, _MEMO_SIZE, _UNPROTECTED, ACLGuard
from ._auth import (
    _RETRY_SOON,
    _WWW_AUTHENTICATE,
    _WWW_AUTHENTICATE_INVALID,
    Authenticate,
    _log_refusal,
    _take_websocket_token,
)
from ._client import UNKNOWN, ClientAddress
from ._cors import _SAFE_METHODS, _VARY_ONLY, _VARY_ORIGIN, CORSGuard
from ._endpoints import STATUS_PATH, CloudEndpoints, merge_status
from ._errors import KeysUnavailableError, StorageUnavailableError, TokenError
from ._headers import Deferral, Header, SecurityHeaders, _merge, _Profile
from ._limits import _CLOSE, _NO_BODY_VERSIONS, RequestLimits, _is_json
from ._logging import AccessLog, line_fields
from ._ratelimit import (
    READ_METHODS,
    AddressRateLimit,
    PrincipalRateLimit,
    _refuse,
    _unavailable,
    address_key,
)
from ._refusal_reports import note_refusal
from ._responses import json_body, send_error, send_json
from ._scope import CLIENT_ADDRESS, PRINCIPAL, ROLE_RANK, Principal

__all__ = ["FusedStack"]

_START = "http.response.start"

# What the one header scan picks up, by name. Small ints, compared with ``is``-cheap ``==``.
_ORIGIN, _AUTH, _LENGTH, _TYPE, _FRAMED, _FLY, _STRIP, _ACRM, _ACRH = range(9)

# The raw ``Authorization`` value → token memo, filled only with tokens that verified (so a
# flood of forged values never fills it) and bounded in entries (cleared when full, like the
# ACL's memo). Values past the verifier's token-size cap never verify, so keys stay small.
_TOKEN_MEMO_SIZE = 4096
# Address → limiter key ("a:<address>"), subject → "p:<instance>:<subject>": bounded the same way.
_KEY_MEMO_SIZE = 4096


class _Plan:
    """The response headers of one (kind of response, CORS answer), prebuilt.

    ``headers`` is what is appended when the app set none of ``names``; otherwise the exact
    merge :class:`SecurityHeaders` and :class:`CORSGuard` do together (their ``_merge`` and
    ``_with_cors``), so the result is the layered composition's.
    """

    __slots__ = ("added", "cors_merge", "headers", "names", "profile")

    def __init__(self, profile: _Profile, deferral: Deferral | None) -> None:
        self.profile = profile
        if deferral is None:
            self.added: tuple[Header, ...] = ()
            self.cors_merge = None
            self.names = profile.names
        else:
            added, inner_names, merge = deferral
            self.added = added
            self.cors_merge = merge
            self.names = profile.names | inner_names
        self.headers = (*self.added, *profile.headers)

    def merged(self, headers: Sequence[Header]) -> list[Header]:
        if self.cors_merge is not None:
            return _merge(self.cors_merge(headers, self.added), self.profile)
        return _merge(headers, self.profile)


class _Out:
    """The one ``send`` wrapper of a request: adds its :class:`_Plan`'s headers at the start.

    Its bound :meth:`send` is what every check's refusal and the Room app are handed. A plain
    method handing back the downstream awaitable: no coroutine frame per message.
    """

    __slots__ = ("downstream", "plan", "status")

    def __init__(self, downstream: Send, plan: _Plan) -> None:
        self.downstream = downstream
        self.plan = plan
        self.status = 0

    def send(self, message: Message) -> Awaitable[None]:
        if message["type"] == _START:
            plan = self.plan
            self.status = message["status"]
            headers = message.get("headers", ())
            names = plan.names
            for name, _ in headers:
                if name in names:  # the app set one of ours (ASGI: lowercase names)
                    merged = plan.merged(headers)
                    break
            else:
                merged = [*headers, *plan.headers]
            message = {**message, "headers": merged}
        return self.downstream(message)


class FusedStack:
    """One ASGI callable running the cloud stack's checks (see the module docstring).

    :param layered: the same layers composed (the outermost one), used for WebSocket upgrades
        and any scope that is not HTTP.
    :param app: the Room app the last layer (the ACL) calls.
    """

    __slots__ = (
        "_access",
        "_acl",
        "_acl_instance",
        "_acl_memo",
        "_address",
        "_address_check",
        "_address_keys",
        "_answered",
        "_api_exact",
        "_api_prefix",
        "_app",
        "_auth",
        "_cached",
        "_client",
        "_client_cache",
        "_cors",
        "_endpoints",
        "_exempt",
        "_guarded",
        "_layered",
        "_limits",
        "_max_body",
        "_max_headers",
        "_origin_plans",
        "_own_plans",
        "_principal",
        "_principal_keys",
        "_protected",
        "_public_paths",
        "_query_token_route",
        "_read_check",
        "_strip",
        "_tokens",
        "_trust_fly",
        "_vary_plans",
        "_wanted",
        "_write_check",
        "_ws_paths",
    )

    def __init__(
        self,
        layered: ASGIApp,
        app: ASGIApp,
        *,
        access_log: AccessLog | None,
        headers: SecurityHeaders,
        cors: CORSGuard,
        limits: RequestLimits,
        client: ClientAddress,
        address: AddressRateLimit,
        auth: Authenticate,
        endpoints: CloudEndpoints,
        principal: PrincipalRateLimit,
        acl: ACLGuard,
    ) -> None:
        self._layered = layered
        self._app = app
        self._access = access_log
        # SecurityHeaders and CORS: every combination of their response headers, prebuilt.
        self._api_prefix = headers._api_prefix
        self._api_exact = headers._api_exact
        # Indexed by "is an API path" (False 0, True 1): no key tuple built per request.
        profiles = (headers._document, headers._api)
        self._vary_plans = tuple(_Plan(profile, _VARY_ONLY) for profile in profiles)
        self._own_plans = tuple(_Plan(profile, None) for profile in profiles)  # stack's answers
        self._origin_plans = tuple(
            {origin: _Plan(profile, deferral) for origin, deferral in cors._simple.items()}
            for profile in profiles
        )
        self._cors = cors
        self._guarded = cors._guarded
        # RequestLimits.
        self._limits = limits
        self._max_headers = limits._max_headers
        self._max_body = limits._max_body
        # ClientAddress: its parse cache is shared (one dict, bounded by the layer).
        self._client = client
        self._client_cache = client._cache
        self._trust_fly = client._trust_fly
        self._strip = client._strip
        # The rate limits.
        self._address = address
        self._address_check = address._check
        self._exempt = address.exempt_paths
        self._address_keys: dict[str, str] = {}
        self._principal = principal
        self._principal_keys: dict[str, str] = {}  # subject → "p:<instance>:<subject>"
        self._read_check = principal._read_check
        self._write_check = principal._write_check
        # Authenticate.
        self._auth = auth
        self._cached = auth._cached
        self._protected = auth.protected_prefixes
        self._ws_paths = auth.websocket_paths
        self._public_paths = auth.public_paths
        self._query_token_route = auth.query_token_route
        self._tokens: dict[bytes, str] = {}
        # CloudEndpoints and the ACL (its verdict memo is shared).
        self._endpoints = endpoints
        self._answered = endpoints._answered
        self._acl = acl
        self._acl_memo = acl._memo
        self._acl_instance = acl.instance_id
        # The one header scan's table. Names the address layer strips are looked for too; a
        # stripped name can never be one the later checks read (the stack strips identity
        # headers only), which the scan relies on.
        wanted: dict[bytes, int] = {name: _STRIP for name in self._strip}
        if wanted.keys() & {b"authorization", b"origin", b"content-length", b"content-type"}:
            raise ValueError("the fused stack cannot strip a header its checks read")
        wanted.update(
            {
                b"origin": _ORIGIN,
                b"authorization": _AUTH,
                b"content-length": _LENGTH,
                b"content-type": _TYPE,
                b"transfer-encoding": _FRAMED,
                b"access-control-request-method": _ACRM,
                b"access-control-request-headers": _ACRH,
            }
        )
        if self._trust_fly:
            wanted[b"fly-client-ip"] = _FLY
        self._wanted = wanted

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # A plain method handing back the coroutine that does the work: one frame per request.
        if scope["type"] != "http":
            return self._layered(scope, receive, send)
        access = self._access
        if access is not None and access.active():
            return self._logged(access, scope, receive, send)
        return self._http(scope, receive, send, None)

    async def _logged(self, access: AccessLog, scope: Scope, receive: Receive, send: Send) -> None:
        """:class:`AccessLog`'s line around the pass: the same fields, the status from
        :class:`_Out`."""
        started = access.clock()
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        out: list[_Out] = []
        try:
            await self._http(scope, receive, send, out)
        finally:
            status = out[0].status if out else 0
            elapsed = access.clock() - started
            access.record(
                "http", status, elapsed, lambda: line_fields(scope, state, status, elapsed)
            )

    async def _http(
        self, scope: Scope, receive: Receive, send: Send, log: list[_Out] | None
    ) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        # -- the one header scan -----------------------------------------------------------
        size = 0
        origin: bytes | None = None
        authorization: bytes | None = None
        length: bytes | None = None
        content_type = b""
        framed = bad_length = dirty = False
        fly: bytes | None = None
        acrm: bytes | None = None
        wanted = self._wanted.get
        for name, value in scope["headers"]:
            size += len(name) + len(value)
            code = wanted(name)
            if code is None:
                continue
            if code == _AUTH:
                if authorization is None:
                    authorization = value
            elif code == _ORIGIN:
                if origin is None:
                    origin = value
            elif code == _LENGTH:
                bad_length |= length is not None and value != length
                length = value
            elif code == _TYPE:
                content_type = value
            elif code == _FRAMED:
                framed = True
            elif code == _FLY:
                fly = value
            elif code == _STRIP:
                dirty = True
            elif code == _ACRM:
                if acrm is None:
                    acrm = value

        # -- SecurityHeaders and CORSGuard ---------------------------------------------------
        on_api = path.startswith(self._api_prefix) or path == self._api_exact
        if origin is None:
            plan = self._vary_plans[on_api]
        else:
            if method == "OPTIONS" and acrm is not None:
                out = _Out(send, self._own_plans[on_api])
                if log is not None:
                    log.append(out)
                await self._cors._answer_preflight(scope, out.send, origin, acrm)
                return
            allowed = self._origin_plans[on_api].get(origin)
            if allowed is not None:
                plan = allowed
            elif path.startswith(self._guarded) or method not in _SAFE_METHODS:
                out = _Out(send, self._own_plans[on_api])
                if log is not None:
                    log.append(out)
                note_refusal(scope, "origin_not_allowed")
                await send_error(
                    out.send, 403, "origin not allowed", "origin_not_allowed", (_VARY_ORIGIN,)
                )
                return
            else:
                plan = self._vary_plans[on_api]
        out = _Out(send, plan)
        if log is not None:
            log.append(out)
        reply = out.send

        # -- RequestLimits ------------------------------------------------------------------
        if size > self._max_headers:
            await send_error(reply, 431, "request headers too large", "headers_too_large")
            return
        declared = 0
        if length is not None:
            if bad_length or not length.isdigit() or not length.isascii():
                await send_error(
                    reply, 400, "invalid Content-Length", "invalid_content_length", _CLOSE
                )
                return
            declared = int(length)
            if declared > self._max_body:
                await send_error(reply, 413, "request body too large", "body_too_large", _CLOSE)
                return
        has_body = framed or declared != 0 or scope.get("http_version") not in _NO_BODY_VERSIONS

        # -- ClientAddress --------------------------------------------------------------------
        if dirty:
            strip = self._strip
            scope = {
                **scope,
                "headers": [item for item in scope["headers"] if item[0] not in strip],
            }
        address: str
        if fly is None:
            client = scope.get("client")
            if client:
                host: str = client[0]
                parsed = self._client_cache.get(host, False)
                if parsed is False:
                    parsed = self._client._remember(host, host)
                address = parsed if isinstance(parsed, str) else host
            else:
                address = UNKNOWN
        else:
            address = self._client._key(scope, fly)
        state: dict[str, Any] | None = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state[CLIENT_ADDRESS] = address

        # -- AddressRateLimit -----------------------------------------------------------------
        if path not in self._exempt:
            keys = self._address_keys
            key = keys.get(address) if address else None
            if key is None:
                key = f"a:{address}" if address else address_key(scope)
                if address:
                    if len(keys) >= _KEY_MEMO_SIZE:
                        keys.clear()
                    keys[address] = key
            check = self._address_check
            if check is not None:  # per-process memory: no coroutine, no Decision when allowed
                refusal = check(key)
            else:
                limiter = self._address
                try:
                    decision = await limiter.limiter.hit(key, limiter.policy.item)
                except StorageUnavailableError:
                    await _unavailable(scope, reply)
                    return
                refusal = None if decision.allowed else decision
            if refusal is not None:
                await _refuse(scope, reply, self._address.policy, refusal)
                return

        # -- Authenticate ---------------------------------------------------------------------
        if path.startswith(self._protected) or path in self._ws_paths:
            token: str | None = None
            fresh = False  # parsed here, not from the memo
            if authorization is not None:
                token = self._tokens.get(authorization)
                if token is None:
                    token = _bearer(authorization)
                    fresh = token is not None
            if (
                token is None
                and self._query_token_route is not None
                and self._query_token_route(method, path)
            ):
                scope, token, _ = _take_websocket_token(scope)
            if token is None:
                if path not in self._public_paths:
                    _log_refusal(scope, "missing_token")
                    await send_error(
                        reply, 401, "authentication required", "missing_token", (_WWW_AUTHENTICATE,)
                    )
                    return
            else:
                cached = self._cached
                try:
                    principal = cached(token) if cached is not None else None
                    if principal is None:
                        principal = await self._auth.verifier.verify(token)
                except TokenError as exc:
                    _log_refusal(scope, exc.code, exc)
                    await send_error(
                        reply, exc.status, exc.message, exc.code, (_WWW_AUTHENTICATE_INVALID,)
                    )
                    return
                except KeysUnavailableError:
                    _log_refusal(scope, KeysUnavailableError.code)
                    await send_error(
                        reply,
                        503,
                        "token keys are unavailable, try again shortly",
                        KeysUnavailableError.code,
                        (_RETRY_SOON,),
                    )
                    return
                state[PRINCIPAL] = principal
                if fresh:
                    # Memoised once verified: forged and garbage values never fill the memo.
                    tokens = self._tokens
                    if len(tokens) >= _TOKEN_MEMO_SIZE:
                        tokens.clear()
                    tokens[authorization] = token  # type: ignore[index]

        # -- CloudEndpoints -------------------------------------------------------------------
        extra: dict[str, Any] | None = None
        if path in self._answered:
            extra = await self._endpoint(scope, path, method, state, reply)
            if extra is None:
                return  # answered
            extra = extra or None  # empty: nothing to merge, the request goes on as is

        # -- PrincipalRateLimit ---------------------------------------------------------------
        principal = state.get(PRINCIPAL)
        if principal is not None:
            limit = self._principal
            read = method in READ_METHODS
            subject = principal.subject
            if principal.instance_id == self._acl_instance:  # always, with the stack's verifier
                key = self._principal_keys.get(subject)
                if key is None:
                    key = f"p:{principal.instance_id}:{subject}"
                    keys = self._principal_keys
                    if len(keys) >= _KEY_MEMO_SIZE:
                        keys.clear()
                    keys[subject] = key
            else:
                key = f"p:{principal.instance_id}:{subject}"
            check = self._read_check if read else self._write_check
            if check is not None:
                refusal = check(key)
            else:
                try:
                    decision = await limit.limiter.hit(
                        key, (limit.read if read else limit.write).item
                    )
                except StorageUnavailableError:
                    await _unavailable(scope, reply)
                    return
                refusal = None if decision.allowed else decision
            if refusal is not None:
                await _refuse(scope, reply, limit.read if read else limit.write, refusal)
                return

        # -- ACLGuard -------------------------------------------------------------------------
        raw_path = scope.get("raw_path")
        memo_key = (method, path, raw_path)
        verdict = self._acl_memo.get(memo_key)
        if verdict is None:
            verdict = self._acl._judge(method, path, raw_path)
            if len(path) <= _MEMO_MAX_PATH and (
                raw_path is None or len(raw_path) <= _MEMO_MAX_PATH
            ):
                memo = self._acl_memo
                if len(memo) >= _MEMO_SIZE:
                    memo.clear()
                memo[memo_key] = verdict
        if verdict is not _UNPROTECTED:
            # The usual protected request inline (a principal of this instance with the rank the
            # rule asks for); anything else (a bad path too: its rank of -1 would pass) is judged,
            # and refused, by _acl_refusal.
            if (
                verdict is _BAD_PATH
                or principal is None
                or principal.instance_id != self._acl_instance
                or ROLE_RANK.get(principal.role, 0) < verdict[0]
            ) and await self._acl_refusal(principal, verdict, method, reply):
                return

        # -- the Room app ---------------------------------------------------------------------
        app = self._app
        if extra is not None:
            app = _StatusMerge(app, extra)
        if has_body:
            await self._limits._body(
                app,
                scope,
                receive,
                reply,
                is_json=bool(content_type) and _is_json(content_type),
            )
        else:
            await app(scope, receive, reply)

    async def _endpoint(
        self, scope: Scope, path: str, method: str, state: dict[str, Any], reply: Send
    ) -> dict[str, Any] | None:
        """:class:`CloudEndpoints`' answers. ``None`` when answered here; otherwise what to
        merge into the app's ``/api/status`` (empty: nothing, the request goes on as is)."""
        endpoints = self._endpoints
        if path == endpoints.healthz_path:
            if endpoints.health is None:
                await send_json(reply, 200, b'{"ok":true}')
            else:
                await send_json(reply, *endpoints.health())
            return None
        principal: Principal | None = state.get(PRINCIPAL)
        if path == "/api/auth/handshake":
            await send_error(
                reply, 403, "the local handshake is disabled in cloud mode", "handshake_disabled"
            )
            return None
        if path == "/api/auth/verify":
            if principal is None:
                await send_error(reply, 401, "authentication required", "missing_token")
                return None
            body = {"ok": True, "role": principal.role, "profile": principal.profile()}
            await send_json(reply, 200, json_body(body))
            return None
        if path == STATUS_PATH and method in ("GET", "HEAD"):
            extra = {"deploymentMode": "cloud", "cloud": endpoints.capabilities()}
            if principal is None:
                await send_json(reply, 200, json_body(extra))
                return None
            return extra
        return {}

    async def _acl_refusal(
        self, principal: Principal | None, verdict: tuple[int, bool], method: str, reply: Send
    ) -> bool:
        """:class:`ACLGuard`'s checks for a protected path; ``True`` when it refused."""
        if verdict is _BAD_PATH:
            await send_error(reply, 400, "malformed request path", "bad_path")
            return True
        least_rank, public = verdict
        if principal is None:
            if public and (method == "GET" or method == "HEAD"):
                return False
            await send_error(
                reply,
                401,
                "authentication required",
                "unauthenticated",
                [(b"www-authenticate", b'Bearer realm="quoroom-runtime"')],
            )
            return True
        if principal.instance_id != self._acl_instance:
            await send_error(reply, 403, "token was issued for another instance", "wrong_instance")
            return True
        if ROLE_RANK.get(principal.role, 0) < least_rank:
            await send_error(reply, 403, "your role may not do this", "forbidden")
            return True
        return False


class _StatusMerge:
    """The Room app with :class:`CloudEndpoints`' report merged into its ``/api/status``."""

    __slots__ = ("app", "extra")

    def __init__(self, app: ASGIApp, extra: dict[str, Any]) -> None:
        self.app = app
        self.extra = extra

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.extra:
            await merge_status(self.app, scope, receive, send, self.extra)
        else:
            await self.app(scope, receive, send)


def _bearer(value: bytes) -> str | None:
    """The token of an ``Authorization`` value, as :class:`Authenticate` reads it."""
    scheme, _, token = value.partition(b" ")
    if scheme.lower() == b"bearer" and token.strip():
        return token.strip().decode("latin-1")
    return None
