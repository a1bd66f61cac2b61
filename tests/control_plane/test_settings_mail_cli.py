"""Settings refuse insecure production values; development secrets persist; mail goes through a
real SMTP server on loopback after commit; the command line migrates and rotates keys."""

from __future__ import annotations

import asyncio
import base64
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from pydantic import ValidationError

from control_plane import cli
from control_plane.mail import Mailer
from control_plane.migrations import head_revision
from control_plane.settings import Settings
from tests.control_plane.conftest import PASSWORD, PG_URL

# Random-looking: production refuses regular secrets (see test_production_settings.py).
STRONG = "Zt4-Qm9vR2xLp7NcW0aYe8KdHs3Uf6JgBi1oXw5T"
KEK = base64.urlsafe_b64encode(
    bytes.fromhex("3b8e61f0a9d2c47e15b6f8039ae2d7c4601fb59e8c2a7d3f4e90b1c6a58d7e2f")
).decode()
PRODUCTION: dict[str, Any] = {
    "env": "production",
    "public_url": "https://app.quoroom.ai",
    "secret_key": STRONG,
    "key_encryption_key": KEK,
    "smtp_url": "smtp+starttls://mailer:pw@smtp.example.com",
    "stripe_secret_key": "sk_live_" + "a" * 24,
    "stripe_webhook_secret": "whsec_" + "a" * 24,
}


def test_complete_production_settings_are_accepted():
    assert Settings(**PRODUCTION).secure_cookies is True


@pytest.mark.parametrize(
    ("change", "variable"),
    [
        ({"public_url": "http://app.quoroom.ai"}, "QUOROOM_CP_PUBLIC_URL"),
        ({"secret_key": None}, "QUOROOM_CP_SECRET_KEY"),
        ({"secret_key": "changeme"}, "QUOROOM_CP_SECRET_KEY"),
        ({"key_encryption_key": None}, "QUOROOM_CP_KEY_ENCRYPTION_KEY"),
        ({"key_encryption_key": "short"}, "QUOROOM_CP_KEY_ENCRYPTION_KEY"),
        ({"smtp_url": None}, "QUOROOM_CP_SMTP_URL"),
        ({"stripe_webhook_secret": None}, "QUOROOM_CP_STRIPE_WEBHOOK_SECRET"),
        ({"provider": "fly"}, "QUOROOM_CP_FLY_API_TOKEN"),
        ({"google_client_id": "id"}, "QUOROOM_CP_GOOGLE_CLIENT_SECRET"),
    ],
)
def test_production_refuses_missing_or_insecure_settings_naming_the_variable(
    change: dict[str, Any], variable: str
):
    with pytest.raises(ValidationError) as info:
        Settings(**{**PRODUCTION, **change})
    assert variable in str(info.value)


def test_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("QUOROOM_CP_PUBLIC_URL", "http://example.test:9000/")
    monkeypatch.setenv("QUOROOM_CP_ACCESS_TOKEN_TTL_SECONDS", "600")
    s = Settings()
    assert s.public_url == "http://example.test:9000" and s.access_token_ttl_seconds == 600


@pytest.mark.parametrize(
    "change",
    [
        {"access_token_ttl_seconds": 3600},
        {"refresh_reuse_grace_seconds": 30},
        {"public_url": "ftp://x"},
        {"throttle_login_account": "lots"},
        {"env": "staging"},
    ],
)
def test_out_of_range_settings_are_refused(change: dict[str, Any]):
    with pytest.raises(ValidationError):
        Settings(**change)


def test_the_runtime_kind_of_new_instances_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
):
    assert Settings().runtime_kind == "reference"
    monkeypatch.setenv("QUOROOM_CP_RUNTIME_KIND", "quoroom")
    monkeypatch.setenv("QUOROOM_CP_QUOROOM_ROOM_CLI", "/opt/room/cli.js")
    s = Settings()
    assert s.runtime_kind == "quoroom" and s.quoroom_room_cli == Path("/opt/room/cli.js")


@pytest.mark.parametrize("kind", ["node", "", "reference,quoroom", "QUOROOM_X"])
def test_an_unknown_runtime_kind_is_refused_naming_the_variable(
    kind: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(ValidationError) as info:
        Settings(runtime_kind=kind)
    assert "QUOROOM_CP_RUNTIME_KIND must be one of reference, quoroom" in str(info.value)
    monkeypatch.setenv("QUOROOM_CP_RUNTIME_KIND", kind)
    cli.get_settings.cache_clear()
    try:
        assert cli.main(["migrate"]) == 2
    finally:
        cli.get_settings.cache_clear()
    assert "QUOROOM_CP_RUNTIME_KIND" in capsys.readouterr().err


def test_development_secrets_are_generated_once_and_kept(tmp_path: Path):
    first = Settings(var_dir=tmp_path).with_dev_secrets()
    second = Settings(var_dir=tmp_path).with_dev_secrets()
    assert first.secret_key is not None and second.secret_key is not None
    assert first.secret_key.get_secret_value() == second.secret_key.get_secret_value()
    assert len(first.key_encryption_keys()[0]) == 32
    assert (tmp_path / "dev-secrets.json").stat().st_mode & 0o777 == 0o600


def test_secrets_never_appear_in_the_settings_repr():
    assert STRONG not in repr(Settings(**PRODUCTION))


# -- SMTP ---------------------------------------------------------------------------------------


class _Sink:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope.content)
        return "250 OK"


@pytest.fixture
def smtp_server() -> Any:
    import socket

    with socket.socket() as probe:  # aiosmtpd's start() needs a concrete port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink = _Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    yield controller, sink
    controller.stop()


async def test_verification_mail_goes_through_smtp_after_commit(
    make_settings: Any, smtp_server: Any
):
    from contextlib import asynccontextmanager

    import httpx

    from control_plane.app import create_app

    controller, sink = smtp_server
    port = controller.port
    settings = make_settings(smtp_url=f"smtp://127.0.0.1:{port}")

    @asynccontextmanager
    async def running() -> Any:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://cp.test") as c:
                yield app, c

    async with running() as (app, client):
        r = await client.post(
            "/api/auth/signup", json={"email": "smtp@example.com", "password": PASSWORD}
        )
        assert r.status_code == 202
        await app.state.services.get(Mailer).drain()
    assert len(sink.messages) == 1
    message = message_from_bytes(sink.messages[0])
    assert message["To"] == "smtp@example.com"
    body = message.get_payload(decode=True).decode()
    assert "http://cp.test/verify-email#token=" in body


async def test_development_outbox_writes_eml_and_prints_the_link(
    make_harness: Any, make_settings: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from control_plane.app import create_app

    settings = make_settings(mail_outbox=tmp_path / "outbox")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        import httpx

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cp.test") as c:
            await c.post("/api/auth/forgot-password", json={"email": "nobody@example.com"})
            await c.post(
                "/api/auth/signup", json={"email": "dev@example.com", "password": PASSWORD}
            )
        await app.state.services.get(Mailer).drain()
    files = list((tmp_path / "outbox").glob("*.eml"))
    assert len(files) == 1
    assert "verify-email#token=" in capsys.readouterr().out


# -- CLI ----------------------------------------------------------------------------------------


@pytest.mark.skipif(bool(PG_URL), reason="uses its own SQLite file")
def test_the_cli_migrates_and_rotates_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setenv("QUOROOM_CP_VAR_DIR", str(tmp_path))
    monkeypatch.delenv("QUOROOM_CP_DATABASE_URL", raising=False)
    cli.get_settings.cache_clear()
    try:
        assert cli.main(["migrate"]) == 0
        assert cli.main(["keys", "rotate"]) == 0
    finally:
        cli.get_settings.cache_clear()
    out = capsys.readouterr().out
    # The next key made at start-up was just published: it signs one JWKS max-age later.
    assert f"revision {head_revision()}" in out and "becomes the active signing key at" in out
    assert (tmp_path / "control_plane.db").exists()


@pytest.mark.skipif(bool(PG_URL), reason="uses its own SQLite file")
def test_keys_rotate_refuses_a_second_rotation_while_one_is_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setenv("QUOROOM_CP_VAR_DIR", str(tmp_path))
    monkeypatch.delenv("QUOROOM_CP_DATABASE_URL", raising=False)
    cli.get_settings.cache_clear()
    try:
        assert cli.main(["migrate"]) == 0
        assert cli.main(["keys", "rotate"]) == 0
        assert cli.main(["keys", "rotate"]) == 1
    finally:
        cli.get_settings.cache_clear()
    assert "a rotation is pending" in capsys.readouterr().err


def test_the_cli_reports_configuration_errors_by_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setenv("QUOROOM_CP_ENV", "production")
    cli.get_settings.cache_clear()
    try:
        assert cli.main(["migrate"]) == 2
    finally:
        cli.get_settings.cache_clear()
    assert "QUOROOM_CP_PUBLIC_URL" in capsys.readouterr().err


def test_the_cli_has_the_documented_subcommands():
    parser = cli.build_parser()
    assert parser.parse_args(["serve", "--host", "0.0.0.0", "--port", "9"]).port == 9
    with pytest.raises(SystemExit):
        parser.parse_args(["keys"])
    asyncio.get_event_loop_policy()  # parser building needs no loop
