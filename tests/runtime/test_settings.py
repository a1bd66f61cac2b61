"""Settings are parsed once; every bad value names its variable."""

from __future__ import annotations

import pytest

from room_cloud_runtime._errors import ConfigError
from room_cloud_runtime._settings import load_settings

CLOUD = {
    "QUOROOM_DEPLOYMENT_MODE": "cloud",
    "QUOROOM_CLOUD_INSTANCE_ID": "inst-1",
    "QUOROOM_CLOUD_ISSUER": "https://cp.example",
    "QUOROOM_ALLOWED_ORIGINS": "https://app.example, https://cp.example",
}


def test_local_is_the_default_mode() -> None:
    assert load_settings({}).mode == "local"


def test_cloud_settings_parse_and_derive_the_jwks_url_from_the_issuer() -> None:
    s = load_settings(CLOUD)
    assert s.mode == "cloud"
    assert s.allowed_origins == ("https://app.example", "https://cp.example")
    assert s.resolved_jwks_url == "https://cp.example/.well-known/jwks.json"


def test_an_explicit_jwks_url_is_pinned() -> None:
    s = load_settings({**CLOUD, "QUOROOM_CLOUD_JWKS_URL": "https://keys.example/jwks"})
    assert s.resolved_jwks_url == "https://keys.example/jwks"


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"QUOROOM_DEPLOYMENT_MODE": "hybrid"}, "QUOROOM_DEPLOYMENT_MODE"),
        ({**CLOUD, "QUOROOM_CLOUD_INSTANCE_ID": ""}, "QUOROOM_CLOUD_INSTANCE_ID"),
        ({**CLOUD, "QUOROOM_CLOUD_ISSUER": ""}, "QUOROOM_CLOUD_ISSUER"),
        ({**CLOUD, "QUOROOM_CLOUD_ISSUER": "cp.example"}, "QUOROOM_CLOUD_ISSUER"),
        ({**CLOUD, "QUOROOM_CLOUD_JWKS_URL": "ftp://x"}, "QUOROOM_CLOUD_JWKS_URL"),
        ({**CLOUD, "QUOROOM_ALLOWED_ORIGINS": ""}, "QUOROOM_ALLOWED_ORIGINS"),
        ({**CLOUD, "QUOROOM_ALLOWED_ORIGINS": "*"}, "QUOROOM_ALLOWED_ORIGINS"),
        ({**CLOUD, "QUOROOM_ALLOWED_ORIGINS": "https://app.example/"}, "QUOROOM_ALLOWED_ORIGINS"),
        (
            {**CLOUD, "QUOROOM_ALLOWED_ORIGINS": "https://app.example/path"},
            "QUOROOM_ALLOWED_ORIGINS",
        ),
        ({**CLOUD, "QUOROOM_CLOUD_ALGORITHMS": "HS256"}, "QUOROOM_CLOUD_ALGORITHMS"),
        ({**CLOUD, "QUOROOM_CLOUD_ALGORITHMS": "EdDSA,none"}, "QUOROOM_CLOUD_ALGORITHMS"),
        ({**CLOUD, "QUOROOM_CLOUD_LEEWAY_SECONDS": "61"}, "QUOROOM_CLOUD_LEEWAY_SECONDS"),
        ({**CLOUD, "QUOROOM_CLOUD_LEEWAY_SECONDS": "soon"}, "QUOROOM_CLOUD_LEEWAY_SECONDS"),
        ({**CLOUD, "QUOROOM_BEHIND_FLY_PROXY": "maybe"}, "QUOROOM_BEHIND_FLY_PROXY"),
        ({**CLOUD, "QUOROOM_RATE_LIMIT_READ": "lots"}, "QUOROOM_RATE_LIMIT_READ"),
        ({**CLOUD, "QUOROOM_RATE_LIMIT_STORAGE": "memcached://x"}, "QUOROOM_RATE_LIMIT_STORAGE"),
        (
            {**CLOUD, "QUOROOM_RATE_LIMIT_ON_STORAGE_ERROR": "panic"},
            "QUOROOM_RATE_LIMIT_ON_STORAGE_ERROR",
        ),
        ({**CLOUD, "QUOROOM_MAX_BODY_BYTES": "0"}, "QUOROOM_MAX_BODY_BYTES"),
        ({**CLOUD, "QUOROOM_JWKS_TIMEOUT_SECONDS": "-1"}, "QUOROOM_JWKS_TIMEOUT_SECONDS"),
    ],
)
def test_a_bad_setting_is_refused_naming_it(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert info.value.setting == setting
    assert setting in str(info.value)


def test_local_mode_does_not_require_cloud_settings() -> None:
    assert load_settings({"QUOROOM_DEPLOYMENT_MODE": "local"}).issuer is None


@pytest.mark.parametrize("command", ["serve", "gateway"])
def test_an_unknown_log_level_exits_2_naming_the_setting(monkeypatch, capsys, command):
    from room_cloud_runtime.cli import main

    monkeypatch.setenv("QUOROOM_LOG_LEVEL", "trace")
    with pytest.raises(SystemExit) as exited:
        main([command])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "QUOROOM_LOG_LEVEL" in err and "'trace'" in err
    assert "Traceback" not in err
