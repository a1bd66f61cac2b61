"""Production must be explicit (issue 12, item 9): an https PUBLIC_URL without ENV stops start-up;
weak secrets and plain SMTP to a remote host are refused in production; session cookies carry the
``__Host-``/``__Secure-`` prefixes there; the API docs are off unless asked for; the development
database and its folder are private to the user."""

from __future__ import annotations

import base64
import json
import secrets
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from control_plane import cli
from control_plane.app import create_app
from control_plane.billing.catalog import default_catalog
from control_plane.mail import Mailer
from control_plane.settings import Settings
from tests.control_plane.conftest import (
    PASSWORD,
    PG_URL,
    Harness,
    RecordingWakeup,
    signup_and_verify,
)

# Fixed, random-looking values (from os.urandom once): strong enough for every rule.
STRONG_SECRET = "q3V9x-Lr7TzK0bWmY2pH8sDfNc4JgUaE1oRt6iQvXy5Zk"
STRONG_KEK = base64.urlsafe_b64encode(
    bytes.fromhex("9f3c1a7e55d2b0846e19f7a3c28d4b6015e9a7f2c3d84b1e6a0f5c29b7e3d418")
).decode()
PRODUCTION: dict[str, Any] = {
    "env": "production",
    "public_url": "https://cloud.example.com",
    "secret_key": STRONG_SECRET,
    "key_encryption_key": STRONG_KEK,
    "smtp_url": "smtps://mailer:pw@smtp.example.com",
    "stripe_secret_key": "sk_live_" + "a" * 24,
    "stripe_webhook_secret": "whsec_" + "a" * 24,
}


def _refused(variable: str, **change: Any) -> str:
    with pytest.raises(ValidationError) as info:
        Settings(**{**PRODUCTION, **change})
    message = str(info.value)
    assert variable in message, message
    return message


def test_the_strong_production_settings_of_these_tests_are_accepted():
    assert Settings(**PRODUCTION).secure_cookies is True


# -- ENV must be explicit -----------------------------------------------------------------------


def test_an_https_public_url_without_env_is_refused_naming_env():
    with pytest.raises(ValidationError) as info:
        Settings(public_url="https://cloud.example.com")
    assert "QUOROOM_CP_ENV" in str(info.value)


def test_serve_refuses_an_https_public_url_without_env_before_listening(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.delenv("QUOROOM_CP_ENV", raising=False)
    monkeypatch.setenv("QUOROOM_CP_PUBLIC_URL", "https://cloud.example.com")
    cli.get_settings.cache_clear()
    try:
        assert cli.main(["serve", "--port", "1"]) == 2
    finally:
        cli.get_settings.cache_clear()
    err = capsys.readouterr().err
    assert "QUOROOM_CP_ENV" in err and "production" in err


def test_development_on_an_https_url_is_allowed_when_asked_for_explicitly(
    monkeypatch: pytest.MonkeyPatch,
):
    assert Settings(env="development", public_url="https://tunnel.example.com").development
    monkeypatch.setenv("QUOROOM_CP_ENV", "development")
    monkeypatch.setenv("QUOROOM_CP_PUBLIC_URL", "https://tunnel.example.com")
    assert Settings().development


def test_a_loopback_development_url_needs_no_env():
    assert Settings(public_url="http://127.0.0.1:8000").development


# -- weak secrets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weak",
    [
        "a" * 64,  # one character
        "ab" * 32,  # a repeated pattern
        "passwordpassword" * 4,
        "0123456789" * 4,
        "abcdefghijklmnopqrstuvwxyzABCDEF",  # a run: every step is +1
        "ZYXWVUTSRQPONMLKJIHGFEDCBAzyxwvu",
        "Tr0ub4dor&3-correct-horse",  # too short (< 32 bytes)
        "4f9a1c2e7b8d0f3a5c6e9b1d2f4a7c8e",  # 32 hex digits: 128 bits at best, estimate lower
        " " * 40,
    ],
)
def test_a_weak_secret_key_is_refused_in_production_without_echoing_it(weak: str):
    message = _refused("QUOROOM_CP_SECRET_KEY", secret_key=weak)
    assert weak not in message


def test_random_secret_keys_of_the_documented_kinds_are_accepted():
    for _ in range(300):
        Settings(**{**PRODUCTION, "secret_key": secrets.token_urlsafe(32)})
        Settings(**{**PRODUCTION, "secret_key": secrets.token_hex(32)})


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


@pytest.mark.parametrize(
    "weak",
    [
        _b64(bytes(32)),  # all zero
        _b64(b"\xff" * 32),
        _b64(b"k" * 32),
        _b64(bytes(range(4)) * 8),  # a repeated pattern
        _b64(b"my-super-secret-aes-key-12345678"),  # typed text, not random bytes
        _b64(bytes(range(32))),  # a run
        f"{STRONG_KEK},{_b64(bytes(32))}",  # an old KEK in the list is checked too
    ],
)
def test_a_weak_key_encryption_key_is_refused_in_production(weak: str):
    message = _refused("QUOROOM_CP_KEY_ENCRYPTION_KEY", key_encryption_key=weak)
    assert weak not in message


def test_random_key_encryption_keys_are_accepted():
    for _ in range(300):
        Settings(**{**PRODUCTION, "key_encryption_key": _b64(secrets.token_bytes(32))})


def test_development_keeps_accepting_simple_secrets():
    assert Settings(secret_key="s" * 48, key_encryption_key=_b64(bytes(32))).development


# -- SMTP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "smtp://smtp.example.com",
        "smtp://user:pw@smtp.example.com:587",
        "smtp://10.0.0.5",
        "smtp://127.0.0.1.example.com",
        "http://smtp.example.com",  # not a mail scheme at all
        "smtps://",  # no host
    ],
)
def test_plain_smtp_to_a_remote_host_is_refused_in_production(url: str):
    message = _refused("QUOROOM_CP_SMTP_URL", smtp_url=url)
    assert "pw" not in message


@pytest.mark.parametrize(
    "url",
    [
        "smtp://127.0.0.1:25",
        "smtp://localhost",
        "smtp://[::1]:2525",
        "smtp+starttls://user:pw@smtp.example.com",
        "smtps://smtp.example.com:465",
    ],
)
def test_tls_smtp_or_a_loopback_relay_is_accepted_in_production(url: str):
    assert Settings(**{**PRODUCTION, "smtp_url": url}).smtp_url is not None


# -- the API docs -------------------------------------------------------------------------------


def _docs_app(**change: Any) -> Any:
    return create_app(Settings(**{**PRODUCTION, **change}))


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect"])
async def test_the_api_docs_are_off_in_production(path: str):
    transport = httpx.ASGITransport(app=_docs_app())
    async with httpx.AsyncClient(transport=transport, base_url="https://cloud.example.com") as c:
        assert (await c.get(path)).status_code == 404


async def test_a_setting_turns_the_api_docs_on_in_production():
    transport = httpx.ASGITransport(app=_docs_app(api_docs=True))
    async with httpx.AsyncClient(transport=transport, base_url="https://cloud.example.com") as c:
        assert (await c.get("/docs")).status_code == 200
        assert (await c.get("/openapi.json")).json()["info"]["title"]


def test_the_api_docs_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("QUOROOM_CP_API_DOCS", "false")
    assert Settings().docs_enabled is False
    monkeypatch.setenv("QUOROOM_CP_API_DOCS", "maybe")
    with pytest.raises(ValidationError):
        Settings()


# -- cookies ------------------------------------------------------------------------------------


@pytest.fixture
async def production(
    make_settings: Any, tmp_path: Path, clock: Any, outbox: Any
) -> AsyncIterator[Harness]:
    catalog = tmp_path / "catalog.json"
    builtin = default_catalog()
    document = {
        "tiers": [t.model_dump(mode="json") for t in builtin.tiers],
        "regions": [r.model_dump(mode="json") for r in builtin.regions],
    }
    catalog.write_text(json.dumps(document))
    settings = make_settings(**{**PRODUCTION, "catalog_path": catalog})
    wakeup = RecordingWakeup()
    app = create_app(settings, clock=clock, mail_transport=outbox, wakeup=wakeup)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 50000))
        base = settings.public_url
        async with httpx.AsyncClient(transport=transport, base_url=base) as client:
            harness = Harness(app, client, clock, outbox, wakeup)
            yield harness
            await harness.drain()


SESSION_COOKIES = {"access", "csrf", "refresh"}


def _set_cookies(response: httpx.Response) -> dict[str, str]:
    """The session cookies set by ``response`` (others, like the known-device one, left out)."""
    found = {}
    for header in response.headers.get_list("set-cookie"):
        name = header.split("=", 1)[0]
        if name.rsplit("qr_", 1)[-1] in SESSION_COOKIES:
            found[name] = header
    return found


async def test_production_session_cookies_carry_the_host_and_secure_prefixes(
    production: Harness,
):
    h = production
    await signup_and_verify(h, "owner@example.com")
    r = await h.client.post(
        "/api/auth/login", json={"email": "owner@example.com", "password": PASSWORD}
    )
    assert r.status_code == 200, r.text
    cookies = _set_cookies(r)
    assert set(cookies) == {"__Host-qr_access", "__Host-qr_csrf", "__Secure-qr_refresh"}
    for name, header in cookies.items():
        attributes = [part.strip().lower() for part in header.split(";")[1:]]
        assert "secure" in attributes, header
        assert not any(a.startswith("domain") for a in attributes), header
        if name.startswith("__Host-"):
            assert "path=/" in attributes, header
    assert "path=/api/auth" in cookies["__Secure-qr_refresh"].lower()

    # Every reader follows: the pages, a cookie-authenticated call, CSRF, refresh, logout.
    assert (await h.client.get("/app")).status_code == 200
    assert (await h.client.get("/api/auth/me")).status_code == 200
    csrf = h.client.cookies.get("__Host-qr_csrf")
    assert csrf
    assert (await h.client.post("/api/auth/refresh")).status_code == 403  # no CSRF header
    r = await h.client.post("/api/auth/refresh", headers={"x-csrf-token": csrf})
    assert r.status_code == 200, r.text
    assert set(_set_cookies(r)) == {"__Host-qr_access", "__Host-qr_csrf", "__Secure-qr_refresh"}
    csrf = h.client.cookies.get("__Host-qr_csrf")
    r = await h.client.post("/api/auth/logout", headers={"x-csrf-token": csrf})
    assert r.status_code in (200, 204), r.text
    assert (await h.client.get("/api/auth/me")).status_code == 401


async def test_unprefixed_cookies_are_not_read_in_production(production: Harness):
    h = production
    await signup_and_verify(h, "owner@example.com")
    r = await h.client.post(
        "/api/auth/login", json={"email": "owner@example.com", "password": PASSWORD}
    )
    access = h.client.cookies.get("__Host-qr_access")
    assert r.status_code == 200 and access
    h.client.cookies.clear()
    # A sibling subdomain can plant a plain cookie; only the prefixed ones are trusted.
    h.client.cookies.set("qr_access", access, domain="cloud.example.com")
    assert (await h.client.get("/api/auth/me")).status_code == 401


async def test_development_cookies_keep_their_plain_names_over_http(harness: Harness):
    await signup_and_verify(harness, "dev@example.com")
    r = await harness.client.post(
        "/api/auth/login", json={"email": "dev@example.com", "password": PASSWORD}
    )
    cookies = _set_cookies(r)
    assert set(cookies) == {"qr_access", "qr_csrf", "qr_refresh"}
    assert all("secure" not in c.lower().split("; ") for c in cookies.values())


# -- files --------------------------------------------------------------------------------------


def _private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


@pytest.mark.skipif(bool(PG_URL), reason="the development SQLite file")
async def test_the_development_database_and_its_folder_are_private(tmp_path: Path):
    var = tmp_path / "var"
    settings = Settings(var_dir=var, run_worker=False, password_hash_memory_kib=1024)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=settings.public_url
        ) as client:
            await client.post(
                "/api/auth/signup", json={"email": "a@example.com", "password": PASSWORD}
            )
        await app.state.services.get(Mailer).drain()
    assert stat.S_IMODE(var.stat().st_mode) == 0o700
    db = var / "control_plane.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    for sidecar in var.glob("control_plane.db*"):
        assert _private(sidecar), sidecar
    assert _private(var / "dev-secrets.json")


@pytest.mark.skipif(bool(PG_URL), reason="the development SQLite file")
def test_an_existing_world_readable_database_is_made_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    var = tmp_path / "var"
    var.mkdir(mode=0o755)
    var.chmod(0o755)
    db = var / "control_plane.db"
    db.touch()
    db.chmod(0o644)
    monkeypatch.setenv("QUOROOM_CP_VAR_DIR", str(var))
    monkeypatch.delenv("QUOROOM_CP_DATABASE_URL", raising=False)
    monkeypatch.delenv("QUOROOM_CP_ENV", raising=False)
    monkeypatch.delenv("QUOROOM_CP_PUBLIC_URL", raising=False)
    cli.get_settings.cache_clear()
    try:
        assert cli.main(["migrate"]) == 0
    finally:
        cli.get_settings.cache_clear()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(var.stat().st_mode) == 0o700
