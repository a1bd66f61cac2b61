"""Runtime settings: parsed once from the environment into one frozen, typed object.

Every malformed value raises :class:`ConfigError` naming the variable, so ``quoroom-runtime
serve`` stops at start-up with a message the operator can act on. In cloud mode the settings
that the security of the stack rests on (issuer, instance id, allowed origins) are required.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import urlsplit

from limits import RateLimitItem, parse

from ._errors import ConfigError
from ._refusal_reports import ReportSettings, load_report_settings

DeploymentMode = Literal["local", "cloud"]
StorageFailMode = Literal["local", "open", "closed"]
# The spellings the environment may use, each to its typed value.
_DEPLOYMENT_MODES: Final[Mapping[str, DeploymentMode]] = {"local": "local", "cloud": "cloud"}
_STORAGE_FAIL_MODES: Final[Mapping[str, StorageFailMode]] = {
    "local": "local",
    "open": "open",
    "closed": "closed",
}

AUDIENCE = "quoroom-runtime"
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
SUPPORTED_ALGORITHMS = frozenset({"EdDSA", "ES256"})
MAX_LEEWAY_SECONDS = 60


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    """Everything the stack needs, validated. Build with :func:`load_settings` or directly."""

    mode: DeploymentMode = "local"
    # Cloud identity and trust.
    instance_id: str | None = None
    issuer: str | None = None
    jwks_url: str | None = None
    audience: str = AUDIENCE
    algorithms: tuple[str, ...] = ("EdDSA", "ES256")
    leeway_seconds: int = 30
    max_token_bytes: int = 4096
    verified_cache_size: int = 10_000
    # JWKS cache behaviour.
    jwks_timeout_seconds: float = 3.0
    jwks_min_refresh_seconds: int = 60
    jwks_max_refresh_seconds: int = 3600
    jwks_unknown_kid_cooldown_seconds: int = 30
    jwks_max_staleness_seconds: int = 6 * 3600
    # CORS.
    allowed_origins: tuple[str, ...] = ()
    cors_max_age_seconds: int = 600
    # Client address.
    behind_fly_proxy: bool = False
    # Rate limits (limits' notation, e.g. "300/minute").
    rate_limit_storage: str = "memory://"
    rate_limit_on_storage_error: StorageFailMode = "local"
    address_limit: str = "1200/minute"
    read_limit: str = "300/minute"
    write_limit: str = "120/minute"
    # Request limits.
    max_body_bytes: int = 1024 * 1024
    max_header_bytes: int = 16 * 1024
    max_json_depth: int = 32
    max_ws_message_bytes: int = 1024 * 1024
    body_timeout_seconds: float = 30.0
    head_timeout_seconds: float = 10.0
    max_connections: int = 1000
    # Response headers.
    hsts_max_age_seconds: int = 31_536_000
    coep: bool = False
    # Misc.
    access_log: bool = True
    # Refusal reports to the control plane's access log (issue 15); off when None.
    reports: ReportSettings | None = None
    # Prometheus metrics on their own listener (room_cloud_runtime/_metrics.py); off when None.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    data_dir: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        _check_positive("QUOROOM_MAX_BODY_BYTES", self.max_body_bytes)
        _check_positive("QUOROOM_MAX_HEADER_BYTES", self.max_header_bytes)
        _check_positive("QUOROOM_MAX_JSON_DEPTH", self.max_json_depth)
        _check_positive("QUOROOM_MAX_WS_MESSAGE_BYTES", self.max_ws_message_bytes)
        _check_positive("QUOROOM_MAX_TOKEN_BYTES", self.max_token_bytes)
        _check_positive("QUOROOM_MAX_CONNECTIONS", self.max_connections)
        if not 0 <= self.leeway_seconds <= MAX_LEEWAY_SECONDS:
            raise ConfigError(
                "QUOROOM_CLOUD_LEEWAY_SECONDS", f"must be between 0 and {MAX_LEEWAY_SECONDS}"
            )
        bad = [a for a in self.algorithms if a not in SUPPORTED_ALGORITHMS]
        if bad or not self.algorithms:
            raise ConfigError(
                "QUOROOM_CLOUD_ALGORITHMS",
                f"allowed values are {sorted(SUPPORTED_ALGORITHMS)}, got {list(self.algorithms)}",
            )
        if self.jwks_min_refresh_seconds > self.jwks_max_refresh_seconds:
            raise ConfigError(
                "QUOROOM_JWKS_MIN_REFRESH_SECONDS",
                "must not exceed QUOROOM_JWKS_MAX_REFRESH_SECONDS",
            )
        for name, value in (
            ("QUOROOM_RATE_LIMIT_ADDRESS", self.address_limit),
            ("QUOROOM_RATE_LIMIT_READ", self.read_limit),
            ("QUOROOM_RATE_LIMIT_WRITE", self.write_limit),
        ):
            parse_limit(name, value)
        if not self.rate_limit_storage.startswith(("memory://", "redis://", "rediss://")):
            raise ConfigError(
                "QUOROOM_RATE_LIMIT_STORAGE", "must be memory:// or a redis:// / rediss:// URL"
            )
        for origin in self.allowed_origins:
            _check_origin(origin)
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError("QUOROOM_METRICS_PORT", "must be a port number (0 to 65535)")
        _check_host("QUOROOM_METRICS_HOST", self.metrics_host)
        if self.mode == "cloud":
            self._check_cloud()

    def _check_cloud(self) -> None:
        if not self.instance_id:
            raise ConfigError("QUOROOM_CLOUD_INSTANCE_ID", "is required in cloud mode")
        if not self.issuer:
            raise ConfigError("QUOROOM_CLOUD_ISSUER", "is required in cloud mode")
        _check_url("QUOROOM_CLOUD_ISSUER", self.issuer)
        _check_url("QUOROOM_CLOUD_JWKS_URL", self.resolved_jwks_url)
        if not self.allowed_origins:
            raise ConfigError(
                "QUOROOM_ALLOWED_ORIGINS",
                "is required in cloud mode (comma-separated exact origins, e.g. https://app.quoroom.ai)",
            )

    @property
    def resolved_jwks_url(self) -> str:
        """The pinned JWKS URL: configured, or derived from the issuer (never a token)."""
        if self.jwks_url:
            return self.jwks_url
        return f"{(self.issuer or '').rstrip('/')}/.well-known/jwks.json"


def parse_limit(setting: str, value: str) -> RateLimitItem:
    try:
        return parse(value)
    except ValueError as exc:
        raise ConfigError(setting, f"not a rate limit like '300/minute': {value!r}") from exc


def _check_positive(setting: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(setting, "must be a positive integer")


def _check_host(setting: str, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.fullmatch(value):
            raise ConfigError(
                setting, f"must be an IP address or a host name, got {value!r}"
            ) from None


def _check_url(setting: str, value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ConfigError(setting, f"must be an absolute http(s) URL, got {value!r}")


def _check_origin(origin: str) -> None:
    parts = urlsplit(origin)
    if (
        parts.scheme not in ("https", "http")
        or not parts.hostname
        or parts.path
        or parts.query
        or parts.fragment
        or origin != origin.strip()
        or origin.endswith("/")
    ):
        raise ConfigError(
            "QUOROOM_ALLOWED_ORIGINS",
            f"each entry must be an exact origin like https://app.quoroom.ai, got {origin!r}",
        )
    if "*" in origin:
        raise ConfigError("QUOROOM_ALLOWED_ORIGINS", "wildcards are not allowed")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(name, f"must be true or false, got {raw!r}")


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw.strip())
    except ValueError as exc:
        raise ConfigError(name, f"must be an integer, got {raw!r}") from exc


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError as exc:
        raise ConfigError(name, f"must be a number, got {raw!r}") from exc
    if value <= 0:
        raise ConfigError(name, "must be positive")
    return value


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = env.get(name, "")
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _str(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    return raw.strip() or None if raw is not None else None


def load_settings(environ: Mapping[str, str] | None = None) -> RuntimeSettings:
    """Parse the runtime settings from ``environ`` (default: ``os.environ``)."""
    env = os.environ if environ is None else environ
    mode = _DEPLOYMENT_MODES.get((env.get("QUOROOM_DEPLOYMENT_MODE") or "local").strip().lower())
    if mode is None:
        raise ConfigError(
            "QUOROOM_DEPLOYMENT_MODE",
            f"must be 'local' or 'cloud', got {env['QUOROOM_DEPLOYMENT_MODE']!r}",
        )
    raw_fail_mode = (env.get("QUOROOM_RATE_LIMIT_ON_STORAGE_ERROR") or "local").strip().lower()
    fail_mode = _STORAGE_FAIL_MODES.get(raw_fail_mode)
    if fail_mode is None:
        raise ConfigError(
            "QUOROOM_RATE_LIMIT_ON_STORAGE_ERROR",
            f"must be local, open or closed, got {raw_fail_mode!r}",
        )
    defaults = RuntimeSettings()
    return RuntimeSettings(
        mode=mode,
        instance_id=_str(env, "QUOROOM_CLOUD_INSTANCE_ID"),
        issuer=_str(env, "QUOROOM_CLOUD_ISSUER"),
        jwks_url=_str(env, "QUOROOM_CLOUD_JWKS_URL"),
        algorithms=_list(env, "QUOROOM_CLOUD_ALGORITHMS") or defaults.algorithms,
        leeway_seconds=_int(env, "QUOROOM_CLOUD_LEEWAY_SECONDS", defaults.leeway_seconds),
        max_token_bytes=_int(env, "QUOROOM_MAX_TOKEN_BYTES", defaults.max_token_bytes),
        verified_cache_size=_int(env, "QUOROOM_VERIFIED_CACHE_SIZE", defaults.verified_cache_size),
        jwks_timeout_seconds=_float(
            env, "QUOROOM_JWKS_TIMEOUT_SECONDS", defaults.jwks_timeout_seconds
        ),
        jwks_min_refresh_seconds=_int(
            env, "QUOROOM_JWKS_MIN_REFRESH_SECONDS", defaults.jwks_min_refresh_seconds
        ),
        jwks_max_refresh_seconds=_int(
            env, "QUOROOM_JWKS_MAX_REFRESH_SECONDS", defaults.jwks_max_refresh_seconds
        ),
        jwks_unknown_kid_cooldown_seconds=_int(
            env,
            "QUOROOM_JWKS_UNKNOWN_KID_COOLDOWN_SECONDS",
            defaults.jwks_unknown_kid_cooldown_seconds,
        ),
        jwks_max_staleness_seconds=_int(
            env, "QUOROOM_JWKS_MAX_STALENESS_SECONDS", defaults.jwks_max_staleness_seconds
        ),
        allowed_origins=_list(env, "QUOROOM_ALLOWED_ORIGINS"),
        cors_max_age_seconds=_int(
            env, "QUOROOM_CORS_MAX_AGE_SECONDS", defaults.cors_max_age_seconds
        ),
        behind_fly_proxy=_bool(env, "QUOROOM_BEHIND_FLY_PROXY", defaults.behind_fly_proxy),
        rate_limit_storage=_str(env, "QUOROOM_RATE_LIMIT_STORAGE") or defaults.rate_limit_storage,
        rate_limit_on_storage_error=fail_mode,
        address_limit=_str(env, "QUOROOM_RATE_LIMIT_ADDRESS") or defaults.address_limit,
        read_limit=_str(env, "QUOROOM_RATE_LIMIT_READ") or defaults.read_limit,
        write_limit=_str(env, "QUOROOM_RATE_LIMIT_WRITE") or defaults.write_limit,
        max_body_bytes=_int(env, "QUOROOM_MAX_BODY_BYTES", defaults.max_body_bytes),
        max_header_bytes=_int(env, "QUOROOM_MAX_HEADER_BYTES", defaults.max_header_bytes),
        max_json_depth=_int(env, "QUOROOM_MAX_JSON_DEPTH", defaults.max_json_depth),
        max_ws_message_bytes=_int(
            env, "QUOROOM_MAX_WS_MESSAGE_BYTES", defaults.max_ws_message_bytes
        ),
        head_timeout_seconds=_float(
            env, "QUOROOM_HEAD_TIMEOUT_SECONDS", defaults.head_timeout_seconds
        ),
        max_connections=_int(env, "QUOROOM_MAX_CONNECTIONS", defaults.max_connections),
        body_timeout_seconds=_float(
            env, "QUOROOM_BODY_TIMEOUT_SECONDS", defaults.body_timeout_seconds
        ),
        hsts_max_age_seconds=_int(
            env, "QUOROOM_HSTS_MAX_AGE_SECONDS", defaults.hsts_max_age_seconds
        ),
        coep=_bool(env, "QUOROOM_COEP", defaults.coep),
        access_log=_bool(env, "QUOROOM_ACCESS_LOG", defaults.access_log),
        reports=load_report_settings(env, mode=mode),
        metrics_port=_int(env, "QUOROOM_METRICS_PORT", -1)
        if _str(env, "QUOROOM_METRICS_PORT")
        else None,
        metrics_host=_str(env, "QUOROOM_METRICS_HOST") or defaults.metrics_host,
        data_dir=_str(env, "QUOROOM_DATA_DIR"),
    )
