"""Logs are JSON lines and never carry a token, whoever logs it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from collections.abc import Iterator

import pytest

from room_cloud_runtime._logging import (
    FLUSH_LINES,
    FLUSH_SECONDS,
    AccessLines,
    AccessLog,
    JsonFormatter,
    JsonLinesHandler,
    RedactingFilter,
    _flush_all,
    redact,
)

JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ1In0.c2lnbmF0dXJl"


def test_redact_removes_jwts_query_tokens_and_bearer_values() -> None:
    text = f"GET /ws?room=1&token=abc123 Authorization: Bearer xyz {JWT}"
    clean = redact(text)
    assert "abc123" not in clean and "xyz" not in clean and JWT not in clean
    assert "room=1" in clean


def test_stripe_keys_are_redacted() -> None:
    text = "keys sk_live_51HxAbC sk_test_4eC39HqLyjWD rk_live_9zz whsec_ABCdef123 and sk_liveness"
    clean = redact(text)
    assert "51HxAbC" not in clean and "4eC39Hq" not in clean and "ABCdef" not in clean
    assert "9zz" not in clean and "sk_liveness" in clean


def test_a_record_with_a_token_is_written_redacted_as_json() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("test.redaction")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    log.info("got %s", JWT, extra={"path": f"/ws?token={JWT}"})
    entry = json.loads(stream.getvalue())
    assert JWT not in stream.getvalue()
    assert entry["msg"] == "got [redacted]"
    assert entry["level"] == "info"


# -- access lines: written straight to the JSON lines handler, in batches ------------------------


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def access() -> Iterator[tuple[logging.Logger, CountingStream]]:
    """A logger whose records reach one JsonLinesHandler (what configure_logging sets up).

    Its name is new to each test: pytest adds its capture handlers to the non-propagating
    loggers that exist when a test starts, which would make it another set-up.
    """
    stream = CountingStream()
    log = logging.getLogger(f"test.access.{uuid.uuid4().hex}")
    log.propagate = False
    log.setLevel(logging.INFO)
    yield log, stream
    log.handlers[:] = []


def attach(log: logging.Logger, stream: CountingStream) -> None:
    """Attach the handler (now: after pytest has attached its own elsewhere)."""
    handler = JsonLinesHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    log.handlers[:] = [handler]


FIELDS = {"method": "GET", "path": "/api/rooms", "status": 200, "ms": 1.5, "client": "10.0.0.1"}


def test_an_access_line_is_the_line_logging_would_write(
    access: tuple[logging.Logger, CountingStream],
) -> None:
    log, stream = access
    attach(log, stream)
    fields = {**FIELDS, "sub": "user-1"}
    log.info("request", extra=fields)
    lines = AccessLines(log)
    lines.add(fields)  # no running loop: written at once
    via_logging, direct = (json.loads(line) for line in stream.getvalue().splitlines())
    assert abs(via_logging.pop("ts") - direct.pop("ts")) < 1
    assert list(direct.items()) == list(via_logging.items())


def test_access_lines_are_redacted_like_records(
    access: tuple[logging.Logger, CountingStream],
) -> None:
    log, stream = access
    attach(log, stream)
    AccessLines(log).add({**FIELDS, "path": f"/x/{JWT}", "sub": f"token={JWT}"})
    assert JWT not in stream.getvalue()
    entry = json.loads(stream.getvalue())
    assert entry["path"] == "/x/[redacted]" and entry["sub"] == "token=[redacted]"


@pytest.mark.parametrize(
    "value",
    [
        'say "hi" \\ back',
        "tab\tnew\nline\x00bell\x07",
        "café ☕ 𝄞 \u2028",
        "",
        None,
        0,
        -17,
        2**70,
        True,
        1.5,
        1e-7,
        float("nan"),
        float("inf"),
        ["a", 1],
        {"k": "v"},
        object(),
    ],
)
def test_an_access_line_is_the_text_json_dumps_gives(
    access: tuple[logging.Logger, CountingStream], value: object
) -> None:
    # The line is put together from parts (AccessLines._line): it must be what json.dumps of the
    # formatter's entry gives, byte for byte, whatever the values.
    log, stream = access
    attach(log, stream)
    fields = {**FIELDS, "sub": value, "extra field": value}
    AccessLines(log).add(fields)
    line = stream.getvalue().rstrip("\n")
    ts = json.loads(line)["ts"] if "NaN" not in line and "Infinity" not in line else None
    head, _, rest = line.partition(", ")
    entry = {"ts": 0, "level": "info", "logger": log.name, "msg": "request", **fields}
    expected = json.dumps(entry, default=str)
    assert rest == expected.partition(", ")[2]
    assert head.startswith('{"ts": ') and (ts is None or isinstance(ts, float))


def test_a_str_subclass_in_an_access_line_is_redacted_too(
    access: tuple[logging.Logger, CountingStream],
) -> None:
    import enum

    class Kind(enum.StrEnum):
        LEAK = f"token={JWT}"

    log, stream = access
    attach(log, stream)
    AccessLines(log).add({**FIELDS, "sub": Kind.LEAK})
    assert JWT not in stream.getvalue()
    assert json.loads(stream.getvalue())["sub"] == "token=[redacted]"


def test_the_suspect_word_check_misses_nothing_a_case_insensitive_search_finds() -> None:
    # redact() skips its passes unless one of _SUSPECT_WORDS is in the case-folded text; re.I
    # matches some non-ASCII characters to ASCII letters (ſ to s, K to k): casefold() must map
    # each of them onto that letter.
    import re

    from room_cloud_runtime._logging import _SUSPECT_WORDS, _suspect

    everything = "".join(chr(cp) for cp in range(0x80, 0x110000))
    for letter in sorted(set("".join(_SUSPECT_WORDS))):
        for char in set(re.findall(re.escape(letter), everything, re.I)):
            assert letter in char.casefold(), (hex(ord(char)), letter)
    assert _suspect("Authorization: ſecret=1") and _suspect("BEARER x") and _suspect("EYJhbG")
    assert not _suspect("GET /api/rooms 200 10.0.0.1")
    assert redact("ſecret=hunter2") == "ſecret=[redacted]"


async def test_access_lines_are_written_together_within_the_flush_interval(
    access: tuple[logging.Logger, CountingStream],
) -> None:
    log, stream = access
    attach(log, stream)
    lines = AccessLines(log)
    for n in range(3):
        lines.add({**FIELDS, "sub": f"user-{n}"})
    assert stream.getvalue() == ""
    await asyncio.sleep(FLUSH_SECONDS + 0.1)
    written = [json.loads(line)["sub"] for line in stream.getvalue().splitlines()]
    assert written == ["user-0", "user-1", "user-2"]
    assert stream.writes == 1


async def test_a_full_batch_is_written_at_once(
    access: tuple[logging.Logger, CountingStream],
) -> None:
    log, stream = access
    attach(log, stream)
    lines = AccessLines(log)
    for n in range(FLUSH_LINES):
        lines.add({**FIELDS, "sub": f"user-{n}"})
    assert len(stream.getvalue().splitlines()) == FLUSH_LINES
    lines.add(FIELDS)
    assert len(stream.getvalue().splitlines()) == FLUSH_LINES  # the next batch waits again
    _flush_all()  # what runs at exit
    assert len(stream.getvalue().splitlines()) == FLUSH_LINES + 1


async def test_other_logging_setups_get_an_ordinary_record_at_once(
    access: tuple[logging.Logger, CountingStream],
) -> None:
    log, stream = access
    attach(log, stream)
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log.addHandler(Collect())  # two handlers: not the direct path
    AccessLines(log).add({**FIELDS, "sub": "user-1"})
    assert [(r.getMessage(), r.sub) for r in records] == [("request", "user-1")]  # type: ignore[attr-defined]
    assert json.loads(stream.getvalue())["sub"] == "user-1"


async def test_each_access_line_carries_a_request_id(
    access: tuple[logging.Logger, CountingStream],
) -> None:
    """Issue 14, item 2: the caller's (or the edge proxy's) id when well formed, else our own —
    unique per request; the gateway sends the same one to the Room (test_gateway_proxy.py)."""
    log, stream = access
    attach(log, stream)

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    layer = AccessLog(app, logger=log)

    async def call(headers: list[tuple[bytes, bytes]]) -> None:
        scope = {"type": "http", "method": "GET", "path": "/x", "headers": headers}

        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        async def send(message) -> None:
            pass

        await layer(scope, receive, send)

    await call([(b"x-request-id", b"abc-1")])
    await call([(b"fly-request-id", b"01HFLY")])
    await call([(b"x-request-id", b"no\nnewlines please")])
    await call([])
    await call([])
    layer.lines.flush()
    rids = [json.loads(line)["rid"] for line in stream.getvalue().splitlines()]
    assert rids[:2] == ["abc-1", "01HFLY"]
    assert len(set(rids)) == 5 and "newlines" not in "".join(rids)
