"""Request limits: header size, body bytes as they stream, JSON nesting depth, WebSocket messages.

- **Headers**: the sum of the lengths of all request header names and values above
  ``max_header_bytes`` is answered 431 ``headers_too_large`` (uvicorn's httptools parser has no
  such limit of its own).
- **Body**: a ``Content-Length`` above ``max_body_bytes`` is answered 413 ``body_too_large`` at
  once, before anything is read. Otherwise the bytes are counted as they arrive, because a
  ``Content-Length`` check alone is bypassed by chunked bodies and by a length that does not
  match the body (Django GHSA-933h-hp56-hf7m; h11 frames a request carrying both
  ``Transfer-Encoding: chunked`` and ``Content-Length`` as chunked, so the length the app sees
  can be a lie). When the count passes the cap while no response has started, the layer answers
  413 itself (with ``Connection: close``, so the server stops reading the rest) and hands the
  app ``http.disconnect`` from then on: a raw ASGI reader stops, and Starlette's
  ``Request.body()`` raises ``ClientDisconnect``, which is then swallowed here because the client
  already has its answer. If the response had started, the app just sees the disconnect.
- **Lazily.** No body byte is read until the app asks for it: the layer sits outermost, but the
  inner layers (CORS, rate limits, auth, the ACL) refuse a request without reading its body, so
  an unauthenticated upload is never buffered and ``Expect: 100-continue`` gets no ``100`` before
  auth (servers send it on the app's first ``receive()``).
- **Deadline**: the whole body must arrive within ``body_timeout_seconds`` of the app's first
  ``receive()``; a slower one is answered 408 ``body_timeout``.
- **JSON depth**: for ``application/json`` and ``*/*+json`` bodies, the whole (capped) body is
  read when the app first asks for it, its nesting measured, and a body deeper than
  ``max_json_depth`` answered 400 ``json_too_deep`` before the app sees it — ``json.loads``
  would otherwise hit ``RecursionError`` and the client would get a 500. The accepted body is
  replayed to the app as one message. Malformed JSON is left to the app. Bodies of other types are
  never buffered. (Starlette's
  ``Request.json()`` parses whatever the Content-Type says; a Room that does so on non-JSON types
  must guard those itself.)
- **WebSocket messages** larger than ``max_ws_message_bytes`` close the socket with 1009
  (message too big) and the app gets ``websocket.disconnect`` with code 1009. The server has its
  own, separate limit that applies first: uvicorn's ``ws_max_size`` (``--ws-max-size``, 16 MiB
  by default) — set it to the same value so oversized frames are not even buffered.

Requests that cannot have a body (HTTP/1.x without ``Content-Length`` or
``Transfer-Encoding``: most GETs) are passed on with the original ``receive`` and ``send``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from itertools import accumulate

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._errors import ConfigError
from ._responses import deny_websocket, send_error

logger = logging.getLogger("room_cloud_runtime.limits")

WS_CLOSE_MESSAGE_TOO_BIG = 1009

_CONTENT_LENGTH = b"content-length"
_CONTENT_TYPE = b"content-type"
_TRANSFER_ENCODING = b"transfer-encoding"
_BODY_HEADERS = frozenset({_CONTENT_LENGTH, _CONTENT_TYPE, _TRANSFER_ENCODING})
_CLOSE = ((b"connection", b"close"),)
_NO_BODY_VERSIONS = frozenset({"1.0", "1.1"})

# A JSON string, escapes included, possessive so that no input makes it backtrack; the closing
# quote is optional so an unterminated string ends at the end of the body in one linear pass
# instead of being retried from every later quote.
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"?', re.DOTALL)
# After strings are gone: keep only brackets, openers as +1 and closers as -1 (signed bytes).
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_too_deep(body: bytes, max_depth: int) -> bool:
    """Whether the JSON text ``body`` nests arrays/objects deeper than ``max_depth``.

    No Python loop per byte: a body with at most ``max_depth`` opening brackets is accepted on
    two ``count`` calls; otherwise strings are cut out with one regex pass, the rest reduced to
    bracket steps with ``bytes.translate``, and the running depth computed by
    ``itertools.accumulate`` in C, stopping at the first level too deep. Malformed input gives
    an answer too (brackets are counted as they come); the app's parser judges the rest.
    """
    # Upper bound: every nesting level needs an opener (true in UTF-16/32 too, where each
    # bracket character still contains one such byte).
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return False
    # json.loads also accepts UTF-16 and UTF-32 bytes; their code units can contain quote and
    # bracket bytes that are not quotes or brackets, so measure their UTF-8 form instead.
    encoding = json.detect_encoding(body)
    if encoding not in ("utf-8", "utf-8-sig"):
        try:
            body = body.decode(encoding).encode("utf-8", "surrogatepass")
        except UnicodeError:
            return False  # json.loads fails on it without recursing: the app's business
    structure = _JSON_STRING.sub(b"", body)
    if structure.count(b"[") + structure.count(b"{") <= max_depth:
        return False
    steps = memoryview(structure.translate(_BRACKET_STEPS, _NOT_BRACKETS)).cast("b")
    return any(map(max_depth.__lt__, accumulate(steps)))


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.endswith(b"+json") and b"/" in media)


def _positive(setting: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(setting, f"must be a positive integer, got {value!r}")
    return value


class RequestLimits:
    """Pure ASGI middleware enforcing size limits on requests and WebSocket messages.

    :param app: the ASGI app to wrap.
    :param max_body_bytes: largest request body, counted as it streams (413 above).
    :param max_header_bytes: largest sum of request header name and value lengths (431 above).
    :param max_json_depth: deepest array/object nesting in a JSON body (400 above).
    :param max_ws_message_bytes: largest WebSocket message, text measured in UTF-8 (close 1009).
    :param body_timeout_seconds: the whole request body must arrive within this, counted from
        the app's first ``receive()`` (408 after).
    """

    __slots__ = ("_body_timeout", "_max_body", "_max_depth", "_max_headers", "_max_ws", "app")

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int = 1024 * 1024,
        max_header_bytes: int = 16 * 1024,
        max_json_depth: int = 32,
        max_ws_message_bytes: int = 1024 * 1024,
        body_timeout_seconds: float = 30.0,
    ) -> None:
        self.app = app
        if not isinstance(body_timeout_seconds, int | float) or body_timeout_seconds <= 0:
            raise ConfigError(
                "body_timeout_seconds", f"must be a positive number, got {body_timeout_seconds!r}"
            )
        self._body_timeout = float(body_timeout_seconds)
        self._max_body = _positive("max_body_bytes", max_body_bytes)
        self._max_headers = _positive("max_header_bytes", max_header_bytes)
        self._max_depth = _positive("max_json_depth", max_json_depth)
        self._max_ws = _positive("max_ws_message_bytes", max_ws_message_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":  # HTTP inline below: one coroutine frame less per request
            if kind == "websocket":
                await self._websocket(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        size = 0
        length: bytes | None = None
        content_type = b""
        framed = False
        bad_length = False
        # One pass over the headers collects everything this layer needs.
        for name, value in scope["headers"]:
            size += len(name) + len(value)
            if name in _BODY_HEADERS:  # one set lookup per header instead of three compares
                if name == _CONTENT_LENGTH:
                    bad_length |= length is not None and value != length
                    length = value
                elif name == _CONTENT_TYPE:
                    content_type = value
                else:
                    framed = True
        if size > self._max_headers:
            await send_error(send, 431, "request headers too large", "headers_too_large")
            return
        declared = 0
        if length is not None:
            # isdigit() first: int() would also take "+1", " 1", "1_000" and non-ASCII digits.
            if bad_length or not length.isdigit() or not length.isascii():
                await send_error(
                    send, 400, "invalid Content-Length", "invalid_content_length", headers=_CLOSE
                )
                return
            declared = int(length)
            if declared > self._max_body:
                await send_error(send, 413, "request body too large", "body_too_large", _CLOSE)
                return
        if not framed and declared == 0 and scope.get("http_version") in _NO_BODY_VERSIONS:
            # HTTP/1 framing: no Content-Length and no Transfer-Encoding means no body.
            await self.app(scope, receive, send)
            return
        await self._body(
            self.app, scope, receive, send, is_json=bool(content_type) and _is_json(content_type)
        )

    async def _body(
        self, app: ASGIApp, scope: Scope, receive: Receive, send: Send, *, is_json: bool
    ) -> None:
        """Call ``app`` with a ``receive`` that checks the body lazily, when it first asks for it.

        (``app`` is this layer's own app, or in the fused pipeline, ``_fused``, the Room app once
        every check has let the request through.)

        Nothing is read before the inner layers (CORS, the rate limits, auth, the ACL) have let
        the request through: a refused request never has its body read (nor, with ``Expect:
        100-continue``, a ``100`` sent: servers send it on the app's first ``receive()``). Then
        the bytes are counted (413 past the cap), a JSON body is read whole and its depth checked
        (400), and the whole body must arrive within ``body_timeout`` (408).
        """
        cap = self._max_body
        received = 0
        started = False
        refused = False
        answered = False
        complete = False
        deadline: float | None = None

        async def refuse(status: int, message: str, code: str) -> Message:
            nonlocal refused, started, answered
            refused = True
            if not started:
                # Claim the response before awaiting, so a concurrent send from the app is
                # dropped rather than interleaved with our answer.
                started = answered = True
                await send_error(send, status, message, code, _CLOSE)
            return {"type": "http.disconnect"}

        async def next_chunk() -> Message:
            nonlocal deadline
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + self._body_timeout
            async with asyncio.timeout_at(deadline):
                return await receive()

        async def counted_receive() -> Message:
            nonlocal received, complete
            if refused:
                return {"type": "http.disconnect"}
            if complete:
                return await receive()  # after the body: wait for http.disconnect as usual
            chunks: list[bytes] = []
            while True:
                try:
                    message = await next_chunk()
                except TimeoutError:
                    return await refuse(408, "request body too slow", "body_timeout")
                if message["type"] != "http.request":
                    return message
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > cap:
                    return await refuse(413, "request body too large", "body_too_large")
                more = message.get("more_body", False)
                complete = not more
                if not is_json:
                    return message
                chunks.append(chunk)
                if complete:
                    break
            body = b"".join(chunks)
            if json_too_deep(body, self._max_depth):
                return await refuse(
                    400, f"JSON nested deeper than {self._max_depth} levels", "json_too_deep"
                )
            return {"type": "http.request", "body": body, "more_body": False}

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if answered:
                return  # the client has its refusal; whatever the app says now goes nowhere
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await app(scope, counted_receive, tracked_send)
        except Exception:
            if not answered:
                raise
            # The app failed on the disconnect we handed it (Starlette: ClientDisconnect).
            logger.debug("app raised after the body was refused", exc_info=True)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        size = 0
        for name, value in scope["headers"]:
            size += len(name) + len(value)
        if size > self._max_headers:
            await deny_websocket(scope, send, 431, "request headers too large", "headers_too_large")
            return
        cap = self._max_ws
        closed = False

        async def capped_receive() -> Message:
            nonlocal closed
            if closed:
                return {"type": "websocket.disconnect", "code": WS_CLOSE_MESSAGE_TOO_BIG}
            message = await receive()
            if message["type"] == "websocket.receive" and _ws_too_big(message, cap):
                closed = True
                await send(
                    {
                        "type": "websocket.close",
                        "code": WS_CLOSE_MESSAGE_TOO_BIG,
                        "reason": "message too big",
                    }
                )
                return {"type": "websocket.disconnect", "code": WS_CLOSE_MESSAGE_TOO_BIG}
            return message

        async def guarded_send(message: Message) -> None:
            if closed:
                return  # servers raise on a send after close; the app learns from receive()
            await send(message)

        await self.app(scope, capped_receive, guarded_send)


def _ws_too_big(message: Message, cap: int) -> bool:
    data = message.get("bytes")
    if data is not None:
        return len(data) > cap
    text = message.get("text")
    if text is None:
        return False
    # A character is 1 to 4 UTF-8 bytes: only encode when the bounds cannot decide.
    chars = len(text)
    if chars > cap:
        return True
    if chars * 4 <= cap:
        return False
    return len(text.encode("utf-8", "surrogatepass")) > cap
