"""Control-plane settings: one typed object parsed once from ``QUOROOM_CP_*`` variables.

Outside development the settings refuse insecure or missing secrets with a message that names the
variable. In development, missing secrets (``SECRET_KEY``, ``KEY_ENCRYPTION_KEY``) are generated
once and kept in ``{VAR_DIR}/dev-secrets.json`` (mode 0600) so a restart keeps sessions and keys.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import itertools
import json
import math
import os
import re
import secrets
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from limits import parse_many
from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from control_plane.runtime_kinds import DEFAULT_RUNTIME_KIND, RUNTIME_KINDS, RuntimeKind

ENV_PREFIX = "QUOROOM_CP_"
#: Access tokens and runtime tokens live at most this long (DESIGN.md: TTL ≤ 15 min).
MAX_TOKEN_TTL_SECONDS = 900
#: Verifiers may accept this much clock skew; retired keys stay published for TTL + this.
TOKEN_LEEWAY_SECONDS = 60
_WEAK_SECRETS = frozenset({"secret", "changeme", "change-me", "dev", "development", "password"})
#: SECRET_KEY in production: at least this many bytes and this many estimated bits (see
#: :func:`entropy_bits`). ``secrets.token_urlsafe(32)`` or ``openssl rand -hex 32`` pass.
SECRET_KEY_MIN_BYTES = 32
SECRET_KEY_MIN_BITS = 128
#: A key-encryption key in production must have at least this many distinct byte values (32
#: random bytes have about 30; an all-zero or short repeated pattern has few).
KEK_MIN_DISTINCT_BYTES = 16
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})
#: The largest room capacity a setting may name (ROOMS_TOTAL, ROOMS_PER_REGION).
MAX_ROOMS = 1_000_000
_REGION_ID = re.compile(r"^[a-z]{3}$")  # the catalog's region ids (billing/catalog.py)


class SettingsError(ValueError):
    """A setting is missing or insecure; ``variable`` is the full environment variable name."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


def _var(name: str) -> str:
    return ENV_PREFIX + name.upper()


class Settings(BaseSettings):
    """Every control-plane setting. Build with ``Settings()`` (environment) or keyword arguments."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, validate_default=True
    )

    env: Literal["development", "production"] = "development"
    public_url: str = "http://127.0.0.1:8000"
    var_dir: Path = Path("./var")
    database_url: str = ""  # default: sqlite+aiosqlite under VAR_DIR (see resolved_database_url)
    auto_migrate: bool | None = None  # default: on in development, off in production
    redis_url: str | None = None
    provider: Literal["local", "fly"] = "local"

    # Mail: SMTP when SMTP_URL is set (smtp://, smtp+starttls://, smtps://), else the outbox.
    smtp_url: SecretStr | None = None
    mail_outbox: Path | None = None  # default: VAR_DIR/outbox
    mail_from: str = "Quoroom <no-reply@localhost>"

    # Secrets.
    secret_key: SecretStr | None = None  # itsdangerous: CSRF tokens, OAuth state cookie
    key_encryption_key: SecretStr | None = None  # base64url 32-byte AES key(s), comma-separated
    stripe_secret_key: SecretStr | None = None
    stripe_webhook_secret: SecretStr | None = None
    fly_api_token: SecretStr | None = None
    fly_org: str | None = None
    runtime_image: str | None = None

    # Google (OpenID Connect). Base URLs are configurable so tests point at a fake provider.
    google_client_id: str | None = None
    google_client_secret: SecretStr | None = None
    google_discovery_url: str = "https://accounts.google.com/.well-known/openid-configuration"
    google_http_timeout_seconds: float = Field(default=5.0, gt=0, le=60)

    # /docs, /redoc and /openapi.json: default on in development, off in production.
    api_docs: bool | None = None

    # Tokens and sessions.
    access_token_ttl_seconds: int = Field(default=MAX_TOKEN_TTL_SECONDS, ge=60)
    session_ttl_seconds: int = Field(default=30 * 24 * 3600, ge=3600)
    refresh_reuse_grace_seconds: int = Field(default=10, ge=0, le=10)
    verify_token_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    reset_token_ttl_seconds: int = Field(default=3600, ge=60)
    jwks_max_age_seconds: int = Field(default=300, ge=0, le=3600)
    key_reload_seconds: float = Field(default=60, gt=0)

    # Passwords.
    password_min_length: int = Field(default=10, ge=8)
    password_max_length: int = Field(default=128, ge=64, le=1024)
    max_concurrent_hashes: int = Field(default=4, ge=1, le=64)
    password_hash_memory_kib: int = Field(default=19456, ge=8)  # OWASP: 19 MiB, t=2, p=1
    password_hash_time_cost: int = Field(default=2, ge=1)

    # Throttling (limits' notation; ";"-separated tiers act as backoff: short, then longer waits).
    trust_fly_client_ip: bool = False
    # Issue 12 (lock-out): budgets an attacker could share with the owner (per address, and the
    # per-account ceilings) apply to unknown devices only; a known-device cookie for the account
    # swaps them for a budget of its own. See docs/control-plane-accounts.md, "Sign-in throttling".
    throttle_login_address: str = "20/minute;200/hour"  # every attempt, unknown devices
    throttle_login_account_address: str = "5/minute;20/hour;100/day"  # failed, per address/device
    throttle_login_account: str = "30/hour;100/day"  # failed, unknown devices, all addresses
    throttle_signup_address: str = "5/minute;20/hour"
    throttle_signup_account: str = "3/hour;10/day"
    throttle_email_address: str = "5/minute;20/hour"  # forgot-password, resend-verification
    throttle_email_account_address: str = "3/15minutes;10/day"  # per address or known device
    throttle_email_account: str = "10/hour;30/day"  # unknown devices, all addresses together
    known_device_ttl_seconds: int = Field(default=180 * 24 * 3600, ge=3600, le=400 * 24 * 3600)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)

    # Instances, members and billing (issue 4).
    catalog_path: Path | None = None  # JSON/TOML catalog; required outside development
    stripe_api_base: str | None = None  # another Stripe API base (tests: the loopback fake)
    grace_period_hours: int = Field(default=72, ge=1, le=60 * 24)
    retention_days: int = Field(default=7, ge=0, le=365)
    # Stripe-calling routes, per user (issue 12, item 8; docs/billing.md): every call that may
    # reach Stripe (create, confirm, delete, billing changes), and new Checkout Sessions (a
    # create that is not a replay of its Idempotency-Key).
    throttle_billing_user: str = "30/minute;300/hour"
    throttle_checkout_user: str = "10/hour;30/day"

    @field_validator("throttle_billing_user", "throttle_checkout_user")
    @classmethod
    def _billing_throttle(cls, value: str) -> str:
        try:
            parse_many(value)
        except ValueError as exc:
            raise ValueError(f"not a rate limit ({value!r}): {exc}") from exc
        return value

    # An instance still awaiting payment this long after it was created is canceled by the
    # reconciler: Stripe Checkout Sessions expire after 24 h, so no payment can come any more,
    # and the abandoned instance would otherwise hold a quota slot forever.
    checkout_abandon_hours: int = Field(default=25, ge=1, le=24 * 30)
    instance_quota: int = Field(default=3, ge=0, le=1000)
    max_members_per_instance: int = Field(default=50, ge=1, le=1000)
    # Invitations (issue 12, item 6): how long an invitation (its emailed link, and accepting it
    # in /app) stays good, and how many an owner may send in all and to one instance (limits'
    # notation, ";"-tiers; re-sending to the same address counts: each one mails someone).
    invite_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60, le=30 * 24 * 3600)
    throttle_invite_owner: str = "30/hour;100/day"
    throttle_invite_instance: str = "30/hour;60/day"
    runtime_token_ttl_seconds: int = Field(default=600, ge=60, le=MAX_TOKEN_TTL_SECONDS)
    # The access log per Room (issue 15, item 4): entries older than this many days are pruned
    # by the reconciler (control_plane/instances/access_log.py).
    access_log_retention_days: int = Field(default=90, ge=1, le=3650)

    # Quotas and abuse limits (issue 14, item 4; control_plane/instances/quotas.py says where each
    # is enforced, docs/billing.md "Quotas" what the client sees). Capacity: live Rooms (any state
    # but canceled, destroying, destroyed) per region and in all, checked before any checkout;
    # unset = no limit. ROOMS_PER_REGION is one number for every region, or ``region=N`` pairs
    # with ``*=N`` for the regions not named ("iad=200,fra=100,*=50").
    rooms_per_region: str = ""
    rooms_total: int | None = None
    # Invitation mails (new and sent again) per inviting owner in any 24 hours, counted in the
    # database (holds across processes whatever the throttle storage).
    invitations_per_day: int = 100
    # Runtime tokens (grants and refreshes) per control-plane session per minute.
    runtime_tokens_per_minute: int = 30

    @field_validator("invitations_per_day", "runtime_tokens_per_minute", mode="before")
    @classmethod
    def _per_period(cls, value: object, info: ValidationInfo) -> object:
        text = str(value).strip()
        if isinstance(value, bool) or not text.isdigit() or not 1 <= int(text) <= 10_000:
            raise ValueError(
                f"{_var(str(info.field_name))} must be a whole number 1-10000, got {value!r}"
            )
        return int(text)

    @field_validator("rooms_per_region", mode="before")
    @classmethod
    def _rooms_per_region(cls, value: object) -> object:
        text = "" if value is None else str(value).strip()
        parse_region_capacities(text)  # raises naming the variable
        return text

    @field_validator("rooms_total", mode="before")
    @classmethod
    def _rooms_total(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        text = str(value).strip()
        if isinstance(value, bool) or not text.isdigit() or int(text) > MAX_ROOMS:
            raise ValueError(
                f"{_var('rooms_total')} must be a whole number 0-{MAX_ROOMS} (live Rooms in all "
                f"regions together; 0 stops new Rooms), or unset for no limit; got {value!r}"
            )
        return int(text)

    # Provisioning (issue 4): the worker, the reconciler and the providers.
    run_worker: bool | None = None  # the worker inside the app process; default: in development
    app_prefix: str = Field(default="qr", pattern=r"^[a-z][a-z0-9]{0,11}$")  # app names: qr-<id>
    fly_api_base_url: str = "https://api.machines.dev"
    worker_poll_seconds: float = Field(default=5.0, gt=0, le=300)
    worker_concurrency: int = Field(default=4, ge=1, le=64)
    worker_lease_seconds: int = Field(default=900, ge=30)  # longer than any one provider step
    worker_max_attempts: int = Field(default=8, ge=1, le=100)
    worker_retry_base_seconds: float = Field(default=2.0, gt=0)
    worker_retry_max_seconds: float = Field(default=300.0, gt=0)
    provision_deadline_seconds: int = Field(default=1800, ge=10)
    reconcile_seconds: float = Field(default=300.0, gt=0)
    runtime_health_timeout_seconds: float = Field(default=180.0, gt=0)
    # Backups (issue 14, item 3): Fly takes a snapshot of every Room volume daily and keeps each
    # for this many days (the volume's ``snapshot_retention``, 1-60 on Fly; its default is 5).
    snapshot_retention_days: int = 5

    @field_validator("snapshot_retention_days", mode="before")
    @classmethod
    def _snapshot_retention_days(cls, value: object) -> object:
        text = str(value).strip()
        if isinstance(value, bool) or not text.isdigit() or not 1 <= int(text) <= 60:
            raise ValueError(
                f"{_var('snapshot_retention_days')} must be a whole number of days from 1 to 60 "
                f"(how long Fly keeps each daily volume snapshot); got {value!r}"
            )
        return int(text)

    # Runtimes (issue 11): what NEW instances run — the reference Room, or the real (Node) Room
    # behind the gateway — and where the real Room comes from for each provider.
    runtime_kind: RuntimeKind = DEFAULT_RUNTIME_KIND
    quoroom_room_cli: Path | None = None  # local provider: the real Room's cli.js
    quoroom_runtime_image: str | None = None  # fly provider: the gateway image, pinned by digest

    # Metrics (issue 14): Prometheus exposition on 127.0.0.1:METRICS_PORT, a listener of its own
    # per process (serve, worker, dev), off when unset; never on the public port.
    metrics_port: int | None = None

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _metrics_port(cls, value: object) -> object:
        if value is None or value == "":
            return None
        text = str(value).strip()
        if isinstance(value, bool) or not text.isdigit() or not 1 <= int(text) <= 65535:
            raise ValueError(
                f"{_var('metrics_port')} must be a port number 1-65535 (a loopback listener for "
                f"/metrics), or unset to turn metrics off; got {value!r}"
            )
        return int(text)

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{_var('public_url')} must be an absolute http(s) URL")
        if parts.query or parts.fragment:
            raise ValueError(f"{_var('public_url')} must not have a query or fragment")
        return value.rstrip("/")

    @field_validator("runtime_kind", mode="before")
    @classmethod
    def _runtime_kind(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in RUNTIME_KINDS:
            return value.strip().lower()
        raise ValueError(
            f"{_var('runtime_kind')} must be one of {', '.join(RUNTIME_KINDS)}, got {value!r}"
        )

    @field_validator(
        "throttle_login_address",
        "throttle_login_account_address",
        "throttle_login_account",
        "throttle_signup_address",
        "throttle_signup_account",
        "throttle_email_address",
        "throttle_email_account_address",
        "throttle_email_account",
    )
    @classmethod
    def _throttle(cls, value: str) -> str:
        try:
            parse_many(value)
        except ValueError as exc:
            raise ValueError(f"not a rate limit ({value!r}): {exc}") from exc
        return value

    @field_validator("access_token_ttl_seconds")
    @classmethod
    def _ttl(cls, value: int) -> int:
        if value > MAX_TOKEN_TTL_SECONDS:
            raise ValueError(f"must be at most {MAX_TOKEN_TTL_SECONDS} seconds")
        return value

    @field_validator("throttle_invite_owner", "throttle_invite_instance")
    @classmethod
    def _invite_throttle(cls, value: str) -> str:
        try:
            parse_many(value)
        except ValueError as exc:
            raise ValueError(f"not a rate limit ({value!r}): {exc}") from exc
        return value

    @model_validator(mode="after")
    def _secure_outside_development(self) -> Settings:
        # Production must be explicit (issue 12): an https PUBLIC_URL is a public deployment,
        # and silently running it as development gives free Rooms, self-made secrets and
        # non-Secure cookies. Development there is allowed only when ENV says so.
        if "env" not in self.model_fields_set and urlsplit(self.public_url).scheme == "https":
            raise SettingsError(
                _var("env"),
                "must be set explicitly when PUBLIC_URL is https:// (production for a public "
                "deployment; development only on purpose, e.g. behind a tunnel)",
            )
        if self.env == "production":
            self.check_production()
        return self

    # -- derived ---------------------------------------------------------------------------------

    @property
    def development(self) -> bool:
        return self.env == "development"

    @property
    def public_origin(self) -> str:
        parts = urlsplit(self.public_url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def issuer(self) -> str:
        return self.public_url

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.var_dir / 'control_plane.db').as_posix()}"

    @property
    def should_auto_migrate(self) -> bool:
        return self.development if self.auto_migrate is None else self.auto_migrate

    @property
    def outbox_dir(self) -> Path:
        return self.mail_outbox or self.var_dir / "outbox"

    @property
    def secure_cookies(self) -> bool:
        """Secure, ``__Host-``/``__Secure-``-prefixed cookies: production, or any https URL."""
        return not self.development or urlsplit(self.public_url).scheme == "https"

    @property
    def docs_enabled(self) -> bool:
        return self.development if self.api_docs is None else self.api_docs

    @property
    def google_enabled(self) -> bool:
        return bool(self.google_client_id)

    @property
    def region_capacities(self) -> dict[str, int]:
        """``ROOMS_PER_REGION`` parsed (``"*"``: the regions not named); ``{}`` = no limit."""
        return parse_region_capacities(self.rooms_per_region)

    def region_capacity(self, region: str) -> int | None:
        """How many live Rooms ``region`` may hold; ``None``: no limit."""
        capacities = self.region_capacities
        return capacities.get(region, capacities.get("*"))

    def check_production(self) -> None:
        """Raise :class:`SettingsError` naming the first insecure or missing setting."""
        if urlsplit(self.public_url).scheme != "https":
            raise SettingsError(_var("public_url"), "must be an https:// URL in production")
        _strong_secret("secret_key", self.secret_key, min_length=SECRET_KEY_MIN_BYTES)
        _check_secret_entropy("secret_key", self.secret_key)
        for kek in _kek_list("key_encryption_key", self.key_encryption_key):
            _check_kek(kek)
        if self.smtp_url is None:
            raise SettingsError(_var("smtp_url"), "is required in production (mail must go out)")
        _check_smtp_url(self.smtp_url.get_secret_value())
        for name in ("stripe_secret_key", "stripe_webhook_secret"):
            _strong_secret(name, getattr(self, name), min_length=16)
        if self.provider == "fly":
            _strong_secret("fly_api_token", self.fly_api_token, min_length=16)
            if not self.fly_org:
                raise SettingsError(_var("fly_org"), "is required when PROVIDER=fly")
        if self.google_client_id and not self.google_client_secret:
            raise SettingsError(_var("google_client_secret"), "is required with GOOGLE_CLIENT_ID")

    # -- secrets ---------------------------------------------------------------------------------

    def with_dev_secrets(self) -> Settings:
        """In development, fill missing secrets from ``VAR_DIR/dev-secrets.json`` (created once)."""
        if not self.development or (self.secret_key and self.key_encryption_key):
            return self
        path = self.var_dir / "dev-secrets.json"
        stored = _load_or_create_dev_secrets(path)
        update: dict[str, SecretStr] = {}
        if not self.secret_key:
            update["secret_key"] = SecretStr(stored["secret_key"])
        if not self.key_encryption_key:
            update["key_encryption_key"] = SecretStr(stored["key_encryption_key"])
        return self.model_copy(update=update)

    def secret_key_bytes(self) -> bytes:
        if self.secret_key is None:
            raise SettingsError(_var("secret_key"), "is not set")
        return self.secret_key.get_secret_value().encode()

    def key_encryption_keys(self) -> list[bytes]:
        """The KEK list, newest (used for encryption) first."""
        return _kek_list("key_encryption_key", self.key_encryption_key)


def _strong_secret(name: str, value: SecretStr | None, *, min_length: int = 32) -> None:
    if value is None or not value.get_secret_value():
        raise SettingsError(_var(name), "is required in production")
    raw = value.get_secret_value()
    if len(raw) < min_length or raw.lower() in _WEAK_SECRETS:
        raise SettingsError(_var(name), f"is too weak (use at least {min_length} random chars)")


def entropy_bits(text: str) -> float:
    """A conservative estimate of the randomness in ``text``, in bits.

    The empirical Shannon entropy per character, times the length, computed twice: over the
    characters and over the differences between neighbours; the smaller counts. Repeats
    (``aaaa``, ``abab``, ``passwordpassword``) score low on the first, runs (``abcdef``,
    ``0123456789``) on the second. Random text scores close to its true entropy (a little
    under, for short strings).
    """
    if len(text) < 2:
        return 0.0
    period = _period(text)
    if period < len(text):  # ``passwordpassword…`` holds no more than one ``password``
        return entropy_bits(text[:period])
    deltas = [ord(b) - ord(a) for a, b in itertools.pairwise(text)]
    return min(_shannon(list(text)) * len(text), _shannon(deltas) * len(deltas))


def _period(text: str) -> int:
    """The shortest p such that ``text`` repeats its first p characters (len(text) if none)."""
    for p in range(1, min(len(text) // 2, 512) + 1):
        if all(text[i] == text[i - p] for i in range(p, len(text))):
            return p
    return len(text)


def _shannon(items: Sequence[object]) -> float:
    total = len(items)
    return -sum(n / total * math.log2(n / total) for n in Counter(items).values())


def _check_secret_entropy(name: str, value: SecretStr | None) -> None:
    raw = value.get_secret_value() if value is not None else ""
    if entropy_bits(raw) < SECRET_KEY_MIN_BITS:
        # The message never carries the value (it ends up in logs and terminals).
        raise SettingsError(
            _var(name),
            f"looks too regular to be random (estimated under {SECRET_KEY_MIN_BITS} bits); "
            "generate one, e.g. python -c 'import secrets; print(secrets.token_urlsafe(48))'",
        )


def _check_kek(kek: bytes) -> None:
    distinct = len(set(kek))
    deltas = {(b - a) % 256 for a, b in itertools.pairwise(kek)}
    # 32 random bytes being all printable ASCII: (95/256)^32 ≈ 2e-14 — such a key was typed.
    typed = all(0x20 <= b < 0x7F for b in kek)
    if distinct < KEK_MIN_DISTINCT_BYTES or len(deltas) < KEK_MIN_DISTINCT_BYTES or typed:
        raise SettingsError(
            _var("key_encryption_key"),
            "a key is not random (all-zero, a repeated pattern, a run or typed text); generate "
            "one, e.g. python -c 'import base64, os; "
            "print(base64.urlsafe_b64encode(os.urandom(32)).decode())'",
        )


def _check_smtp_url(url: str) -> None:
    """TLS to the relay, unless the relay is on this machine (a local MTA or a sidecar)."""
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtp+starttls", "smtps") or not parts.hostname:
        raise SettingsError(_var("smtp_url"), "must be smtps://, smtp+starttls:// or smtp://")
    if parts.scheme == "smtp" and not _is_loopback(parts.hostname):
        raise SettingsError(
            _var("smtp_url"),
            "plain smtp:// is allowed only to a loopback relay in production; use smtps:// "
            "(implicit TLS) or smtp+starttls:// (STARTTLS required)",
        )


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _kek_list(name: str, value: SecretStr | None) -> list[bytes]:
    if value is None or not value.get_secret_value().strip():
        raise SettingsError(_var(name), "is required (base64url-encoded 32-byte key)")
    keys = []
    for item in value.get_secret_value().split(","):
        item = item.strip()
        try:
            raw = base64.urlsafe_b64decode(item + "=" * (-len(item) % 4))
        except (binascii.Error, ValueError) as exc:
            raise SettingsError(_var(name), "must be base64url-encoded 32-byte keys") from exc
        if len(raw) != 32:
            raise SettingsError(_var(name), "each key must decode to exactly 32 bytes")
        keys.append(raw)
    return keys


def _load_or_create_dev_secrets(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and all(
            isinstance(data.get(k), str) for k in ("secret_key", "key_encryption_key")
        ):
            return data
    except FileNotFoundError:
        pass
    except ValueError as exc:
        raise SettingsError(str(path), "is not valid JSON; delete it to regenerate") from exc
    data = {
        "secret_key": secrets.token_urlsafe(48),
        "key_encryption_key": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
    }
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)
    return data


def parse_region_capacities(text: str) -> dict[str, int]:
    """``ROOMS_PER_REGION`` as ``{region: capacity}`` (``"*"``: every region not named); ``{}``
    when unset. A bare number is ``{"*": N}``. Raises ``ValueError`` naming the variable."""
    name = _var("rooms_per_region")
    if not text:
        return {}
    if text.isdigit():
        pairs = [("*", text)]
    else:
        pairs = []
        for item in text.split(","):
            region, sep, number = (part.strip() for part in item.partition("="))
            if not sep:
                raise ValueError(
                    f"{name} must be a number, or region=N pairs separated by commas "
                    f"(*=N for the others), e.g. iad=200,fra=100,*=50; got {item.strip()!r}"
                )
            pairs.append((region.lower(), number))
    capacities: dict[str, int] = {}
    for region, number in pairs:
        if region != "*" and not _REGION_ID.match(region):
            raise ValueError(f"{name}: {region!r} is not a region id (three letters, e.g. iad)")
        if region in capacities:
            raise ValueError(f"{name}: {region!r} is given twice")
        if not number.isdigit() or int(number) > MAX_ROOMS:
            raise ValueError(
                f"{name}: the capacity of {region!r} must be a whole number 0-{MAX_ROOMS}, "
                f"got {number!r}"
            )
        capacities[region] = int(number)
    return capacities


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings from the environment, parsed once (development secrets filled in)."""
    return Settings().with_dev_secrets()
