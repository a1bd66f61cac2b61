"""The control plane's logs (issue 14, item 2): JSON lines (or a human line on a terminal),
redacted, each with the request id; the id answered in ``X-Request-Id``, stored with the instance
events the request wrote, taken up by the worker and sent to Fly with every call.
(The suite-wide leak check is tests/helpers/leak_watch.py.)"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest
from sqlalchemy import select

from control_plane import cli
from control_plane.instances.models import InstanceEvent
from control_plane.logs import REQUEST_ID, bound, configure_logging, resolve_format
from tests.control_plane.instances.helpers import (  # noqa: F401 (fixtures)
    cloud,
    cloud_settings,
    stripe_fake,
)

JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ1c2VyLTEiLCJpYXQiOjE3MDB9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"


@pytest.fixture
def configured() -> Any:
    """configure_logging on a stream, undone afterwards."""
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    stream = io.StringIO()

    def setup(fmt: str) -> io.StringIO:
        configure_logging(fmt, stream=stream)
        return stream

    yield setup
    root.handlers[:], level = before
    root.setLevel(level)
    logging.getLogger("uvicorn.access").disabled = False


@pytest.mark.logs_secrets  # the JWT and the Stripe key are logged to prove the redaction
def test_json_lines_carry_the_request_id_and_no_secret(configured: Any) -> None:
    stream = configured("json")
    log = logging.getLogger("control_plane.test")
    with bound("req-42"):
        log.warning(
            "refresh %s for %s", JWT, "a@example.com", extra={"key": "sk_test_abcdefgh1234"}
        )
    log.warning("outside any request")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["request_id"] == "req-42" and first["level"] == "warning"
    assert first["logger"] == "control_plane.test"
    assert first["msg"] == "refresh [redacted] for a@example.com"
    assert first["key"] == "[redacted]"
    assert second["request_id"] is None
    assert JWT not in stream.getvalue() and "sk_test_abcdefgh1234" not in stream.getvalue()


def test_a_terminal_gets_a_human_line(configured: Any) -> None:
    stream = configured("console")
    with bound("req-7"):
        logging.getLogger("control_plane.test").warning("hello %s", "there")
    line = stream.getvalue()
    assert "WARNING" in line and "[req-7]" in line and line.rstrip().endswith("hello there")
    assert not line.startswith("{")


def test_auto_is_json_unless_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_format(None, io.StringIO()) == "json"
    assert resolve_format("auto", Tty()) == "console"
    assert resolve_format(" JSON ", Tty()) == "json"


def test_a_bad_format_stops_the_cli_naming_the_variable(monkeypatch, capsys) -> None:
    monkeypatch.setenv("QUOROOM_CP_LOG_FORMAT", "xml")
    assert cli.main(["migrate"]) == 2
    assert "QUOROOM_CP_LOG_FORMAT" in capsys.readouterr().err


def test_an_own_id_is_made_when_the_given_one_is_malformed() -> None:
    for given in (None, "", "has space", "x" * 65, "line\nbreak"):
        with bound(given) as rid:
            assert rid != given and len(rid) == 24 and REQUEST_ID.get() == rid
    assert REQUEST_ID.get() is None
    with bound("a.b:c_d-1") as rid:
        assert rid == "a.b:c_d-1"


async def test_every_answer_names_its_request_id_and_gets_one_access_line(
    cloud: Any,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = cloud.client
    given = await client.get("/api/auth/me", headers={"X-Request-Id": "edge-1"})
    assert given.status_code == 401 and given.headers["x-request-id"] == "edge-1"
    made = await client.get("/api/auth/me?token=secret-in-query", headers={"X-Request-Id": "a b"})
    assert made.headers["x-request-id"] not in ("a b", "edge-1")
    assert len(made.headers["x-request-id"]) == 24
    await client.get("/.well-known/jwks.json")
    await client.get("/healthz")
    lines = [r for r in caplog.records if r.name == "control_plane.access"]
    assert [(r.method, r.path, r.status) for r in lines] == [  # type: ignore[attr-defined]
        ("GET", "/api/auth/me", 401),
        ("GET", "/api/auth/me", 401),
    ]
    assert all("secret-in-query" not in r.getMessage() + str(vars(r)) for r in lines)


async def test_an_event_a_request_writes_stores_its_id(cloud: Any) -> None:  # noqa: F811
    owner = await cloud.user("owner@example.com")
    created = await cloud.client.post(
        "/api/cloud/instances",
        json={"name": "My Room", "tier": "starter", "region": "iad"},
        headers={**owner.headers, "X-Request-Id": "create-1"},
    )
    assert created.status_code == 201, created.text
    async with cloud.h.services.core.session_factory() as db:
        data = (
            (
                await db.execute(
                    select(InstanceEvent.data).where(
                        InstanceEvent.instance_id == created.json()["instance"]["id"]
                    )
                )
            )
            .scalars()
            .all()
        )
    assert data and all(d and d["request_id"] == "create-1" for d in data)
