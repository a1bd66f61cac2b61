"""The control plane's logs (issue 14, item 2): one JSON line per event, a request id on each.

- **Format.** ``QUOROOM_CP_LOG_FORMAT``: ``json`` (one object per line: ``ts``, ``level``,
  ``logger``, ``msg``, ``request_id`` and the record's extra fields — the runtime's
  :class:`~room_cloud_runtime.JsonFormatter`, so Rooms and control plane read alike), ``console``
  (a human line) or ``auto`` (the default: ``console`` when stderr is a terminal, else ``json``).
- **Redaction.** The runtime's :class:`~room_cloud_runtime.RedactingFilter` on the handler: what
  is shaped like a JWT, a ``token=``/``password=`` value, a ``Bearer`` value or a Stripe key is
  scrubbed, whatever logged it. Code never logs secrets on purpose; this is the last line.
- **Request ids.** :class:`RequestIds` (the outermost middleware) takes a well-formed
  ``X-Request-Id`` from the caller (an edge proxy's) or makes one, answers it in ``X-Request-Id``,
  and holds it in :data:`REQUEST_ID` for the request's task: every record logged meanwhile
  carries it, every instance event written meanwhile stores it (``data.request_id``), the worker
  takes it up again from the event that queued its work (:func:`bound`), and provider calls send it
  on (``X-Request-Id`` to Fly, whose answers then match our logs).
- **Access lines.** One ``request`` line per answer on ``control_plane.access`` (method, path
  without the query, status, ms) instead of uvicorn's access log, which prints query strings
  (e-mail links carry tokens there). The JWKS and ``/healthz`` are not logged: the Rooms and the
  health checks poll them.
"""

from __future__ import annotations

import logging
import re
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal, TextIO

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from room_cloud_runtime import JsonFormatter, RedactingFilter

LogFormat = Literal["auto", "json", "console"]

#: The request id of the work in progress (a request, or a worker job it caused).
REQUEST_ID: ContextVar[str | None] = ContextVar("quoroom_request_id", default=None)

HEADER = b"x-request-id"
# What a caller's id may look like: short and printable, so it can go into a log line and a header
# as it is. Anything else is replaced by our own.
_WELL_FORMED = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_QUIET_PATHS = frozenset({"/.well-known/jwks.json", "/healthz"})

access_logger = logging.getLogger("control_plane.access")


def new_request_id() -> str:
    return secrets.token_hex(12)


def well_formed(value: str | None) -> str | None:
    return value if value is not None and _WELL_FORMED.fullmatch(value) else None


@contextmanager
def bound(request_id: str | None) -> Iterator[str]:
    """Run a block with ``request_id`` (or a new one) as the current request id."""
    value = well_formed(request_id) or new_request_id()
    reset = REQUEST_ID.set(value)
    try:
        yield value
    finally:
        REQUEST_ID.reset(reset)


class RequestIds:
    """Outermost ASGI middleware: the request id in, in the context, and out; the access line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope["headers"]:
            if name == HEADER:
                given = value.decode("latin-1")
                break
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (HEADER, rid.encode())]
            await send(message)

        with bound(given) as rid:
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                path = scope["path"]
                if path not in _QUIET_PATHS and scope["type"] == "http":
                    access_logger.info(
                        "request",
                        extra={
                            "method": scope["method"],
                            "path": path,
                            "status": status,
                            "ms": round((time.perf_counter() - started) * 1000, 2),
                        },
                    )


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure_logging` installs (so a second call can find it)."""


_CONSOLE = "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s"
#: The loggers whose records this set-up formats (all of them propagate to the root otherwise).
_OURS = ("control_plane", "uvicorn", "uvicorn.error", "room_cloud_runtime", "alembic", "stripe")


def resolve_format(value: str | None, stream: TextIO) -> Literal["json", "console"]:
    fmt = (value or "auto").strip().lower()
    if fmt == "auto":
        return "console" if stream.isatty() else "json"
    if fmt in ("json", "console"):
        return fmt  # type: ignore[return-value]
    raise ValueError(f"must be auto, json or console, got {value!r}")


def configure_logging(
    fmt: str | None = None, *, level: int | str = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """Route the root logger (and so every library's records) to one redacting handler on
    ``stream`` (stderr) in ``fmt``; the request id on every record. Returns the handler."""
    out = stream or sys.stderr
    handler = _Handler(out)
    if resolve_format(fmt, out) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(_CONSOLE))
    handler.addFilter(_RequestIdFilter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    # Replaces the handler an earlier call installed, and only that: a host's own handlers (an
    # embedding app's, pytest's log capture) stay.
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in _OURS:
        log = logging.getLogger(name)
        log.handlers[:] = []
        log.propagate = True
    # uvicorn's access log prints query strings: RequestIds writes the access lines instead.
    logging.getLogger("uvicorn.access").disabled = True
    return handler
