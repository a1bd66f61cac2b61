"""Structured (JSON lines) logging for the runtime, with a last line of defence for secrets.

Layers never put a token, an Authorization header or a query string into a log record; the
redacting filter still scrubs anything shaped like a JWT or a ``token=`` parameter, in case a
library (or the Room app) does.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._scope import CLIENT_ADDRESS, PRINCIPAL, state_of

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")
_QUERY_TOKEN = re.compile(r"((?:^|[?&\s])(?:token|access_token|refresh_token)=)[^&\s\"']+", re.I)
_BEARER = re.compile(r"(bearer\s+)[^\s\"']+", re.I)
# "Auth token: 189321c7..." and the like: the Room prints a prefix of its token at start-up.
_LABELLED = re.compile(r"\b((?:token|secret|password)s?\s*[:=]\s*)[^\s\"',&]+", re.I)
_REDACTED = "[redacted]"
# Every pattern above needs one of these words: most lines have none and skip the four passes.
_SUSPECT = re.compile(r"eyJ|token|secret|password|bearer", re.I)

# LogRecord attributes that are not "extra" fields.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def redact(text: str) -> str:
    if _SUSPECT.search(text) is None:
        return text
    text = _JWT.sub(_REDACTED, text)
    text = _QUERY_TOKEN.sub(lambda m: m.group(1) + _REDACTED, text)
    text = _LABELLED.sub(lambda m: m.group(1) + _REDACTED, text)
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


def configure_logging(level: str | int = "INFO", stream: TextIO | None = None) -> None:
    """Send ``room_cloud_runtime`` and uvicorn's error logs as JSON lines to ``stream``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    handler.addFilter(_DropSpuriousHandshakeError())
    for name in ("room_cloud_runtime", "uvicorn.error", "quoroom"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level)
        log.propagate = False


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
    ) -> None:
        self.app = app
        self.logger = logger or logging.getLogger("room_cloud_runtime.access")
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.logger.isEnabledFor(logging.INFO):
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
            principal = state.get(PRINCIPAL)
            self.logger.info(
                "request",
                extra={
                    "method": scope.get("method", "WS"),
                    "path": scope["path"],
                    "status": status,
                    "ms": round((self.clock() - started) * 1000, 2),
                    "client": state.get(CLIENT_ADDRESS),
                    "sub": principal.subject if principal else None,
                },
            )
