"""Request input: JSON bodies read with a cap, parsed strictly, checked field by field."""

from __future__ import annotations

import json
from typing import Any, Final, NoReturn

from starlette.requests import Request

from .store import ApiError, _invalid

MAX_BODY_BYTES: Final = 64 * 1024
VOTES: Final = ("yes", "no", "abstain")


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


async def _json_object(request: Request, allowed: frozenset[str]) -> dict[str, Any]:
    """Read the body with a size cap, parse it strictly, and refuse unknown fields."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, "body_too_large", f"body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise ApiError(400, "invalid_json", "request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise _invalid("body", "must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _invalid(unknown[0], "is not an accepted field")
    return body


def _text(body: dict[str, Any], field: str, *, max_len: int, required: bool = True) -> str | None:
    value = body.get(field)
    if value is None:
        if required:
            raise _invalid(field, "is required")
        return None
    if not isinstance(value, str):
        raise _invalid(field, "must be a string")
    value = value.strip()
    if required and not value:
        raise _invalid(field, "must not be blank")
    if len(value) > max_len:
        raise _invalid(field, f"must be at most {max_len} characters")
    return value or None


def _vote(body: dict[str, Any]) -> str:
    value = body.get("vote")
    if value is None:
        raise _invalid("vote", "is required")
    if not isinstance(value, str) or value not in VOTES:
        raise _invalid("vote", f"must be one of {', '.join(VOTES)}")
    return value
