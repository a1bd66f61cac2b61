"""The innermost app of gateway mode: forward what the stack let through to a Room on loopback.

HTTP goes through ``_upstream_http`` (kept-alive connections, httptools parsing) and WebSockets
through aiohttp's client; both chosen by measurement (``bench/bench_gateway_clients.py``,
bench/RESULTS.md "Gateway"). No HTTP is parsed here by hand.

What the Room receives:

- the request line, with any ``token`` query parameter removed (launch links, WebSocket URLs: the
  client's token never reaches the Room), and the body streamed as it arrives (never buffered
  whole; ``RequestLimits`` outside still counts it);
- the client's headers less the hop-by-hop ones (RFC 9110 section 7.6.1, plus those the
  ``Connection`` header names), less ``Authorization``, ``Expect`` and every
  ``Forwarded``/``X-Forwarded-*``/``X-Real-IP``/``Fly-Client-IP`` the client sent; then the
  gateway's own ``X-Forwarded-For``/``-Proto``/``-Host`` and ``Forwarded``;
- for a request with a principal, ``Authorization: Bearer <the Room's own HS256 token>``
  (``/ws``: ``?token=`` instead, the only place the Room reads it);
- from the principal's own loopback source address (``_upstream_identity``): the Room's
  per-address rate limit stays per user, and no request looks local to it.

What the client receives: the Room's status, headers and body (streamed, bytes untouched:
aiohttp's decompression is off), less hop-by-hop headers and less the headers the stack owns
(CORS, HSTS, Referrer-Policy: the launch URL carries a token, so ``no-referrer`` must win).

Failures, as JSON in the Room's error shape: Room not running or refusing connections → 503
``upstream_unavailable`` with ``Retry-After``; no answer in time → 504 ``upstream_timeout``; a
broken answer (garbage, oversized headers, a connection reset) → 502 ``upstream_error``. Once the
response has started, a broken upstream aborts the client connection instead (a truncated body
must never look complete). A client that goes away mid-stream cancels the upstream request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
from starlette.types import Message, Receive, Scope, Send

from ._logging import request_id
from ._responses import deny_websocket, send_error
from ._scope import Principal, principal_of
from ._upstream_http import (
    UpstreamBroken,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
    request_head,
)
from ._upstream_identity import SourceAddresses, UpstreamTokens

logger = logging.getLogger("room_cloud_runtime.gateway")

Header = tuple[bytes, bytes]

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request headers the client may not pass on: credentials the gateway replaces, proxy facts only
# the gateway may state, and ``Expect`` (the server in front already answered it).
_DROP_REQUEST = _HOP_BY_HOP | {
    b"authorization",
    b"expect",
    b"forwarded",
    b"x-real-ip",
    b"fly-client-ip",
    b"host",
    b"x-request-id",  # the gateway's own (the caller's when well formed): _request_headers
}
# Response headers the stack sets itself (CORSGuard, SecurityHeaders).
_DROP_RESPONSE = _HOP_BY_HOP | {
    b"date",  # the server in front sets its own
    b"strict-transport-security",
    b"referrer-policy",
    b"access-control-allow-origin",
    b"access-control-allow-credentials",
    b"access-control-allow-methods",
    b"access-control-allow-headers",
    b"access-control-expose-headers",
    b"access-control-max-age",
}
# WebSocket handshakes: aiohttp writes its own Sec-WebSocket-* and Upgrade headers.
_WS_PASS = frozenset({b"origin", b"user-agent", b"cookie", b"accept-language"})
_RETRY_AFTER = (b"retry-after", b"2")
_PROTO = {"http": b"http", "https": b"https", "ws": b"http", "wss": b"https"}
_CODES = {
    502: UpstreamBroken.code,
    503: UpstreamUnavailable.code,
    504: UpstreamTimeout.code,
}
_MESSAGES = {
    502: "the Room gave a broken answer",
    503: "the Room is not reachable",
    504: "the Room did not answer in time",
}
_EXPIRED = (b"www-authenticate", b'Bearer realm="quoroom", error="invalid_token"')
# Closing codes an endpoint may not send (RFC 6455 section 7.4.1) and what goes out instead.
_WS_UNSENDABLE = {1005: 1000, 1006: 1011, 1015: 1011}
_INLINE_BODY = 64 * 1024  # answers up to this size are read whole and sent in one message


class _ClientGone(Exception):
    """The client disconnected (or ``RequestLimits`` cut the body off) while we forwarded."""


class RoomUnavailable(Exception):
    """The supervisor says the Room is not up: answer 503 at once instead of trying."""


class UpstreamProxy:
    """Forwards HTTP and WebSocket scopes to ``upstream`` (``http://127.x.y.z:port``).

    :param upstream: the Room's base URL (loopback IPv4, checked by the gateway settings).
    :param tokens: mints the Room's HS256 token for a principal.
    :param sources: the loopback source address of each user.
    :param ready: returns ``None`` when requests may be forwarded, else the reason code of a 503
        (the Room is starting or down). Called per request: a cheap look-up.
    :param trust_fly_client_ip: take ``X-Forwarded-For`` from ``Fly-Client-IP`` (behind Fly's
        proxy) rather than the socket.
    """

    def __init__(
        self,
        upstream: str,
        *,
        tokens: UpstreamTokens,
        sources: SourceAddresses,
        ready: Callable[[], str | None] = lambda: None,
        trust_fly_client_ip: bool = False,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_ws_message_bytes: int = 16 * 1024 * 1024,
        pool_size: int = 32,
    ) -> None:
        parts = urlsplit(upstream)
        self.upstream = f"{parts.scheme}://{parts.netloc}"
        self.ws_upstream = f"ws://{parts.netloc}"
        self.tokens = tokens
        self.sources = sources
        self.ready = ready
        self.trust_fly_client_ip = trust_fly_client_ip
        self.max_ws_message_bytes = max_ws_message_bytes
        self.pool_size = pool_size
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=connect_timeout,
            sock_connect=connect_timeout,
            sock_read=read_timeout,
        )
        self._ws_timeout = aiohttp.ClientWSTimeout(ws_close=5.0)
        self._sessions: dict[str, aiohttp.ClientSession] = {}  # WebSockets only
        self._netloc = parts.netloc.encode("latin-1")
        self._pool = UpstreamPool(
            parts.hostname or "127.0.0.1",
            parts.port or 80,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # Node's http server drops idle keep-alive sockets after 5 s; reusing one it is
            # closing loses the request, so let ours go first.
            keepalive=4.0,
            max_header_bytes=16 * 1024,
        )

    # -- sessions: one connection pool per source address ----------------------------------------

    def _session(self, source: str) -> aiohttp.ClientSession:
        session = self._sessions.get(source)
        if session is None:
            connector = aiohttp.TCPConnector(
                local_addr=(source, 0),
                limit=self.pool_size,
                # Node's http server drops idle keep-alive sockets after 5 s; reusing one it is
                # closing loses the request, so let ours go first.
                keepalive_timeout=4.0,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,  # bytes pass through untouched, Content-Encoding and all
                # Add nothing the client did not send.
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                max_field_size=16 * 1024,
            )
            self._sessions[source] = session
        return session

    async def aclose(self) -> None:
        await self._pool.aclose()
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    # -- ASGI -------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await _lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        reason = self.ready()
        if reason is not None:
            await send_error(send, 503, "the Room is not running yet", reason, (_RETRY_AFTER,))
            return
        principal = principal_of(scope)
        if principal is not None and principal.expires_at <= time.time():
            # Inside the verifier's clock-skew leeway, but the Room (same clock, no leeway)
            # would refuse the token we mint (its exp is the original's): say so clearly.
            await send_error(send, 401, "token expired", "token_expired", (_EXPIRED,))
            return
        raw: list[Header] = scope["headers"]
        has_body = False
        chunked = True
        for name, value in raw:
            if name == b"content-length":
                chunked = False
                has_body = value.strip() not in (b"", b"0")
            elif name == b"transfer-encoding":
                has_body = True
        chunked = chunked and has_body
        headers = self._request_headers(scope, principal)
        if chunked:
            # The client's framing is hop-by-hop (dropped above); ours says how the body comes.
            headers.append((b"transfer-encoding", b"chunked"))
        head = request_head(scope["method"], _target(scope), headers)
        body_done = not has_body
        source = self.sources.for_subject(principal.subject if principal else None)

        async def body() -> AsyncIterator[bytes]:
            nonlocal body_done
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    body_done = True
                    return

        started = False
        try:
            response = await self._pool.request(
                source,
                head,
                body() if has_body else None,
                chunked=chunked,
                head_only=scope["method"] == "HEAD",
            )
            try:
                response_headers = _response_headers(response.headers)
                start: Message = {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": response_headers,
                }
                length = response.content_length()
                if (length is not None and length <= _INLINE_BODY) or response.arrived_whole():
                    # One body message (no disconnect watcher, no chunked framing): most of
                    # the Room's answers are small JSON that came in one piece with the head.
                    payload = await response.read()
                    if (
                        length is None
                        and scope["method"] != "HEAD"
                        and response.status not in (204, 304)
                    ):
                        response_headers.append((b"content-length", b"%d" % len(payload)))
                    started = True
                    await send(start)
                    await send({"type": "http.response.body", "body": payload})
                    return
                started = True
                await send(start)
                await self._stream(response, receive, send, watch=body_done)
            finally:
                response.release()
        except _ClientGone:
            logger.info(
                "client went away, upstream request cancelled", extra={"rid": request_id(scope)}
            )
        except UpstreamError as exc:
            await self._fail(scope, send, started, exc.status, _MESSAGES[exc.status], exc)

    async def _stream(
        self, response: UpstreamResponse, receive: Receive, send: Send, *, watch: bool
    ) -> None:
        """Stream the body; with ``watch``, a client disconnect cancels it (uvicorn drops sends
        to a gone client silently, so without the watch a large download would run on)."""
        task = asyncio.current_task()
        gone = False

        async def watch_disconnect() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            if task is not None:
                task.cancel()

        watcher = asyncio.create_task(watch_disconnect()) if watch else None
        try:
            async for chunk in response.chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except asyncio.CancelledError:
            if not gone or task is None:
                raise
            task.uncancel()
            raise _ClientGone from None
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    async def _fail(
        self,
        scope: Scope,
        send: Send,
        started: bool,
        status: int,
        message: str,
        exc: BaseException,
    ) -> None:
        code = _CODES[status]
        logger.warning(
            "upstream failed",
            extra={"code": code, "error": type(exc).__name__, "rid": request_id(scope)},
        )
        if started:
            # Headers are out: the only honest signal left is to break the connection.
            raise _UpstreamAborted(code) from exc
        extra = (_RETRY_AFTER,) if status == 503 else ()
        await send_error(send, status, message, code, extra)

    def _request_headers(self, scope: Scope, principal: Principal | None) -> list[Header]:
        raw: list[Header] = scope["headers"]
        drop: frozenset[bytes] = _DROP_REQUEST
        host = b""
        fly_ip = b""
        for name, value in raw:
            if name == b"connection":
                drop = drop | {t.strip().lower() for t in value.split(b",")}
            elif name == b"host":
                host = value
            elif name == b"fly-client-ip":
                fly_ip = value.strip()
        out = [
            (name, value)
            for name, value in raw
            if name not in drop and not name.startswith(b"x-forwarded-")
        ]
        if self.trust_fly_client_ip and fly_ip:
            client = fly_ip
        else:
            client = (scope.get("client") or ("unknown", 0))[0].encode("latin-1")
        if self.trust_fly_client_ip:
            proto = b"https"
        else:
            proto = _PROTO.get(scope.get("scheme", "http"), b"http")
        node = b'"[' + client + b']"' if b":" in client else client
        forwarded = b"for=" + node + b";proto=" + proto
        if host:
            forwarded += b';host="' + host + b'"'
        out += [
            (b"host", host or self._netloc),
            (b"x-forwarded-for", client),
            (b"x-forwarded-proto", proto),
            (b"forwarded", forwarded),
        ]
        if host:
            out.append((b"x-forwarded-host", host))
        # The id in the gateway's access line, so the Room's logs can be matched to it.
        out.append((b"x-request-id", request_id(scope).encode()))
        if principal is not None and scope["type"] == "http":
            out.append((b"authorization", b"Bearer " + self.tokens.token_for(principal).encode()))
        return out

    # -- WebSocket --------------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        if first["type"] != "websocket.connect":
            return
        reason = self.ready()
        if reason is not None:
            await deny_websocket(scope, send, 503, "the Room is not running yet", reason)
            return
        principal = principal_of(scope)
        if principal is not None and principal.expires_at <= time.time():
            await deny_websocket(scope, send, 401, "token expired", "token_expired")
            return
        query = _strip_token(scope.get("query_string", b""))
        if principal is not None:
            token = self.tokens.token_for(principal)
            query = f"{query}&token={token}" if query else f"token={token}"
        url = self.ws_upstream + scope["path"] + (f"?{query}" if query else "")
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in self._request_headers(scope, None)
            if k in _WS_PASS
            or k.startswith((b"x-forwarded-", b"forwarded", b"host", b"x-request-id"))
        ]
        session = self._session(self.sources.for_subject(principal.subject if principal else None))
        try:
            upstream = await session.ws_connect(
                url,
                headers=headers,
                protocols=tuple(scope.get("subprotocols") or ()),
                autoping=True,
                max_msg_size=self.max_ws_message_bytes,
                timeout=self._ws_timeout,
            )
        except aiohttp.WSServerHandshakeError as exc:
            code = "upstream_refused" if exc.status in (401, 403) else "upstream_error"
            await deny_websocket(scope, send, 502, "the Room refused the socket", code)
            return
        except (TimeoutError, aiohttp.ClientConnectorError):
            await deny_websocket(
                scope, send, 503, "the Room is not reachable", "upstream_unavailable"
            )
            return
        except aiohttp.ClientError:
            await deny_websocket(
                scope, send, 502, "the Room gave a broken answer", "upstream_error"
            )
            return
        async with upstream:
            await send({"type": "websocket.accept", "subprotocol": upstream.protocol})
            await _pump(upstream, receive, send)


async def _pump(upstream: aiohttp.ClientWebSocketResponse, receive: Receive, send: Send) -> None:
    """Both directions at once; the first side to close closes the other with its code."""

    async def client_to_room() -> None:
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                if text is not None:
                    await upstream.send_str(text)
                else:
                    await upstream.send_bytes(message.get("bytes") or b"")
            elif kind == "websocket.disconnect":
                code = _sendable(message.get("code", 1000))
                await upstream.close(code=code, message=(message.get("reason") or "").encode())
                return

    async def room_to_client() -> None:
        while True:
            message = await upstream.receive()
            if message.type is aiohttp.WSMsgType.TEXT:
                await send({"type": "websocket.send", "text": message.data})
            elif message.type is aiohttp.WSMsgType.BINARY:
                await send({"type": "websocket.send", "bytes": message.data})
            elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING):
                code = _sendable(upstream.close_code or message.data or 1000)
                reason = message.extra if isinstance(message.extra, str) else ""
                await send({"type": "websocket.close", "code": code, "reason": reason})
                return
            else:  # CLOSED, ERROR (e.g. a message over max_msg_size): end the session
                code = 1009 if upstream.close_code == 1009 else 1011
                await send({"type": "websocket.close", "code": code, "reason": "upstream_error"})
                return

    tasks = [asyncio.create_task(client_to_room()), asyncio.create_task(room_to_client())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception) and not isinstance(result, ConnectionError):
            logger.info("websocket relay ended", extra={"error": type(result).__name__})


def _sendable(code: object) -> int:
    code = int(code) if isinstance(code, int) else 1000
    return _WS_UNSENDABLE.get(code, code)


class _UpstreamAborted(Exception):
    """Raised after the response started: the server closes the connection mid-body."""


def _target(scope: Scope) -> str:
    path = scope.get("raw_path") or scope["path"].encode()
    target = path.decode("latin-1")
    query = _strip_token(scope.get("query_string", b""))
    return f"{target}?{query}" if query else target


def _strip_token(query: bytes) -> str:
    text = query.decode("latin-1")
    if "token" not in text:
        return text
    pairs = parse_qsl(text, keep_blank_values=True)
    return urlencode([(k, v) for k, v in pairs if k != "token"])


def _response_headers(raw: list[Header]) -> list[Header]:
    """``raw``: names already lower-case (``_upstream_http``)."""
    drop: frozenset[bytes] = _DROP_RESPONSE
    for name, value in raw:
        if name == b"connection":
            drop = drop | {t.strip().lower() for t in value.split(b",")}
    return [(name, value) for name, value in raw if name not in drop]


async def _lifespan(receive: Receive, send: Send) -> None:
    """Answer the lifespan protocol; the stack starts and stops the gateway's resources."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
