"""Structured (JSON lines) logging for the runtime, with a last line of defence for secrets.

Layers never put a token, an Authorization header or a query string into a log record; the
redacting filter still scrubs anything shaped like a JWT or a ``token=`` parameter, in case a
library (or the Room app) does.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import json
import logging
import math
import re
import secrets
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any, TextIO

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._metrics import RequestCounts
from ._scope import CLIENT_ADDRESS, PRINCIPAL, REQUEST_ID, state_of

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")
_QUERY_TOKEN = re.compile(r"((?:^|[?&\s])(?:token|access_token|refresh_token)=)[^&\s\"']+", re.I)
_BEARER = re.compile(r"(bearer\s+)[^\s\"']+", re.I)
# "Auth token: 189321c7..." and the like: the Room prints a prefix of its token at start-up.
_LABELLED = re.compile(r"\b((?:token|secret|password)s?\s*[:=]\s*)[^\s\"',&]+", re.I)
# Stripe secret and restricted keys, webhook signing secrets (the control plane shares this filter).
_STRIPE = re.compile(r"\b(?:(?:sk|rk)_(?:live|test)|whsec)_[A-Za-z0-9]+")
_REDACTED = "[redacted]"
# Every pattern above needs one of these words (in any case): most lines have none and skip the
# passes. Looked for with ``in`` in the case-folded text, not with one case-insensitive regex:
# 0.6 µs against 5.5 for a 50-character line, 1.8 against 29 for 250 (sre tries every
# alternative at every position under re.I). casefold() maps every character re.I would match to
# one of these letters onto it (checked over all of Unicode: tests/runtime/test_logging.py).
_SUSPECT_WORDS = ("eyj", "token", "secret", "password", "bearer", "sk_", "rk_", "whsec_")


def _suspect(text: str) -> bool:
    folded = text.casefold()
    for word in _SUSPECT_WORDS:
        if word in folded:
            return True
    return False


# LogRecord attributes that are not "extra" fields.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def redact(text: str) -> str:
    if not _suspect(text):
        return text
    text = _JWT.sub(_REDACTED, text)
    text = _QUERY_TOKEN.sub(lambda m: m.group(1) + _REDACTED, text)
    text = _LABELLED.sub(lambda m: m.group(1) + _REDACTED, text)
    text = _STRIPE.sub(_REDACTED, text)
    return _BEARER.sub(lambda m: m.group(1) + _REDACTED, text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        fields = vars(record)
        for key in fields.keys() - _STANDARD:
            value = fields[key]
            if isinstance(value, str):
                fields[key] = redact(value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class _DropSpuriousHandshakeError(logging.Filter):
    """uvicorn's websockets-sansio protocol logs "ASGI callable returned without completing
    handshake." after every upgrade refused through the ``websocket.http.response`` extension
    (Kludex/uvicorn#3138), although the client got its 401/403: an abuser could flood the error
    log with it. Every refusal of this stack goes through that extension, so the line is noise.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name == "uvicorn.error"
            and record.msg == "ASGI callable returned without completing handshake."
        )


class JsonLinesHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure_logging` installs: one JSON line per record on a stream.

    :class:`AccessLines` hands it the access log's lines ready-made, several per write.
    """

    def write_lines(self, text: str) -> None:
        self.acquire()
        try:
            self.stream.write(text)
            self.flush()
        finally:
            self.release()


def configure_logging(level: str | int = "INFO", stream: TextIO | None = None) -> None:
    """Send ``room_cloud_runtime``'s, uvicorn's and granian's logs as JSON lines to ``stream``
    (``_granian`` is granian's logger, named after its Rust module)."""
    handler = JsonLinesHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    handler.addFilter(_DropSpuriousHandshakeError())
    for name in ("room_cloud_runtime", "uvicorn.error", "_granian", "quoroom"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level)
        log.propagate = False


# A batch of access lines is written this long after its first line, or once it has this many.
FLUSH_SECONDS = 0.25
FLUSH_LINES = 256


_LIVE: weakref.WeakSet[AccessLines] = weakref.WeakSet()

# json.dumps's own escaper for a str (the C one, ensure_ascii), and the ", "key": " part of a line
# per field name (a handful of names: bounded all the same).
_escape: Callable[[str], str] = json.encoder.encode_basestring_ascii
_KEYS: dict[str, str] = {}


@atexit.register
def _flush_all() -> None:
    for lines in list(_LIVE):
        lines.flush()


class AccessLines:
    """Where :class:`AccessLog` puts its lines: straight into the JSON lines handler, in batches.

    Why not ``logger.info`` per request: in the gateway a line through ``logging`` (a LogRecord,
    the redacting filter, the formatter, one ``write`` and flush each) cost ~50 µs of user and
    ~14 µs of system CPU per request, a third of the gateway's whole cost per request (measured
    2026-12-05, bench/RESULTS.md "Gateway"). Here the line is built once, in the formatter's
    layout with the filter's redaction, and lines are written together at most
    :data:`FLUSH_SECONDS` later (and at shutdown and exit).

    Only when the logger's records would reach exactly one :class:`JsonLinesHandler` (what
    :func:`configure_logging` sets up). Any other logging set-up (an embedding app's handlers,
    pytest's ``caplog``) gets an ordinary ``logger.info`` record per request, at once.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._pending: list[str] = []
        self._handler: JsonLinesHandler | None = None
        self._timer: asyncio.TimerHandle | None = None
        # What follows "ts" in every line, up to the fields.
        self._head = f', "level": "info", "logger": {_escape(logger.name)}, "msg": "request"'
        _LIVE.add(self)

    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def _direct_handler(self) -> JsonLinesHandler | None:
        handlers: list[logging.Handler] = []
        node: logging.Logger | None = self.logger
        while node is not None:
            handlers.extend(node.handlers)
            if not node.propagate:
                break
            node = node.parent
        if self.logger.filters or len(handlers) != 1:
            return None
        (handler,) = handlers
        if not isinstance(handler, JsonLinesHandler) or handler.level > logging.INFO:
            return None
        return handler

    def add(self, fields: dict[str, Any]) -> None:
        """One request's line (``fields``: the line's extra fields, in order)."""
        if not self._pending:
            self._handler = self._direct_handler()
        handler = self._handler
        if handler is None:
            self.logger.info("request", extra=fields)
            return
        self._pending.append(self._line(fields))
        if len(self._pending) >= FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop to come back on: write it now
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_SECONDS, self.flush)

    def _line(self, fields: dict[str, Any]) -> str:
        """The JSON text ``json.dumps`` gives for the formatter's entry (``ts``, ``level``,
        ``logger``, ``msg``, then ``fields``), redacted as the filter would, put together from
        its parts. Strings go through the C escaper ``json.dumps`` itself uses; anything not a
        plain str, int, finite float or None goes through ``json.dumps``. One look for the
        suspect words covers all the strings; only a line that has one is redacted field by
        field. Building the dict, dumping it and a case-insensitive regex search per string cost
        15 µs of CPU per line; this costs 5.5 (2026-12-07, a loop of 20,000 gateway lines, best
        of 5; medians 23 and 8 on that busy host).
        """
        strings = [value for value in fields.values() if isinstance(value, str)]
        suspect = _suspect("\n".join(strings)) if strings else False
        parts = ['{"ts": ', repr(round(time.time(), 3)), self._head]
        for key, value in fields.items():
            name = _KEYS.get(key)
            if name is None:
                name = f", {_escape(key)}: "
                if len(_KEYS) < 64:
                    _KEYS[key] = name
            kind = type(value)
            if isinstance(value, str):  # subclasses too (an enum's value): redacted all the same
                text = _escape(redact(value) if suspect else value)
            elif value is None:
                text = "null"
            elif kind is int:
                text = int.__repr__(value)
            elif kind is float and math.isfinite(value):
                text = float.__repr__(value)
            else:
                text = json.dumps(value, default=str)
            parts.append(name)
            parts.append(text)
        parts.append("}")
        return "".join(parts)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        if pending and self._handler is not None:
            self._handler.write_lines("\n".join(pending) + "\n")


class AccessLog:
    """One structured line per request: method, path (never the query), status, duration.

    uvicorn's own access log prints the query string — where a WebSocket token may be — so
    the CLI turns it off and this layer takes its place. Disabled loggers cost one check.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.perf_counter,
        counts: RequestCounts | None = None,
    ) -> None:
        self.app = app
        self.logger = logger or logging.getLogger("room_cloud_runtime.access")
        self.lines = AccessLines(self.logger)
        self.clock = clock
        #: The metrics' request counts (None: metrics off); kept whether or not lines are logged.
        self.counts = counts

    def active(self) -> bool:
        return self.counts is not None or self.lines.enabled()

    def record(
        self, kind: str, status: int, seconds: float, fields: Callable[[], dict[str, Any]]
    ) -> None:
        """One finished request: counted for the metrics, logged when the logger is on
        (``fields`` builds the line's fields only then)."""
        if self.counts is not None:
            self.counts.observe(kind, status, seconds)
        if self.lines.enabled():
            self.lines.add(fields())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.active():
            await self.app(scope, receive, send)
            return
        started = self.clock()
        status = 0
        # Created here so that what inner layers record is visible to this one.
        state = state_of(scope)

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                status = message["status"]
            elif kind == "websocket.accept":
                status = 101
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = self.clock() - started
            kind = "http" if scope["type"] == "http" else "ws"
            self.record(kind, status, elapsed, lambda: line_fields(scope, state, status, elapsed))


# Request ids (issue 14, item 2): a caller's (an edge proxy's: Fly sets Fly-Request-Id) when it is
# short and printable, else this process's own — a random prefix per boot and a counter, unique
# without a random draw per request.
_GIVEN_IDS = (b"x-request-id", b"fly-request-id")
_WELL_FORMED_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
_BOOT = secrets.token_hex(4)
_SEQUENCE = itertools.count(1)


def request_id(scope: Scope) -> str:
    """The request's id: the access line's ``rid`` and, in the gateway, the Room's
    ``X-Request-Id``. Decided once per request (kept in the scope's state)."""
    state = state_of(scope)
    rid: str | None = state.get(REQUEST_ID)
    if rid is None:
        for name, value in scope["headers"]:
            if name in _GIVEN_IDS and _WELL_FORMED_ID.fullmatch(value):
                rid = value.decode("ascii")
                break
        else:
            rid = f"{_BOOT}-{next(_SEQUENCE):x}"
        state[REQUEST_ID] = rid
    return rid


def line_fields(scope: Scope, state: dict[str, Any], status: int, seconds: float) -> dict[str, Any]:
    """An access line's fields, in order (the layered :class:`AccessLog` and the fused pass)."""
    principal = state.get(PRINCIPAL)
    return {
        "method": scope.get("method", "WS"),
        "path": scope["path"],
        "status": status,
        "ms": round(seconds * 1000, 2),
        "client": state.get(CLIENT_ADDRESS),
        "sub": principal.subject if principal else None,
        "rid": request_id(scope),
    }
