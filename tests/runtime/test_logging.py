"""Logs are JSON lines and never carry a token, whoever logs it."""

from __future__ import annotations

import io
import json
import logging

from room_cloud_runtime._logging import JsonFormatter, RedactingFilter, redact

JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ1In0.c2lnbmF0dXJl"


def test_redact_removes_jwts_query_tokens_and_bearer_values() -> None:
    text = f"GET /ws?room=1&token=abc123 Authorization: Bearer xyz {JWT}"
    clean = redact(text)
    assert "abc123" not in clean and "xyz" not in clean and JWT not in clean
    assert "room=1" in clean


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
