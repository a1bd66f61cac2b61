"""room_cloud_runtime — the cloud-mode hardening stack a Quoroom Room server loads.

``wrap(app)`` returns the Room wrapped by the layers its settings call for (cloud or local mode);
each layer is also usable alone (pure ASGI, ``Layer(app, *, options)``). See README.md and
docs/runtime.md.
"""

from ._acl import DEFAULT_POLICY, ACLGuard, BadPathError, Policy, Rule, normalize_path
from ._auth import WS_CLOSE_TOKEN_EXPIRED, WS_PROTOCOL, WS_TOKEN_PREFIX, Authenticate
from ._client import ClientAddress, client_address_key
from ._cors import CORSGuard
from ._endpoints import CloudEndpoints
from ._errors import (
    ClaimError,
    CloudRuntimeError,
    ConfigError,
    KeysUnavailableError,
    StorageUnavailableError,
    TokenError,
    UnknownKeyError,
)
from ._headers import SecurityHeaders
from ._jwk import VerificationKey
from ._jwks import JWKSCache
from ._limiter import Limiter, MemoryLimiter, RedisLimiter, build_limiter
from ._limits import RequestLimits
from ._local import LocalGuard
from ._logging import AccessLog, JsonFormatter, RedactingFilter, configure_logging, redact
from ._memstore import Decision
from ._ratelimit import AddressRateLimit, PrincipalRateLimit
from ._scope import Principal, principal_of
from ._settings import RuntimeSettings, load_settings
from ._stack import RuntimeStack, wrap
from ._verify import TokenVerifier

__all__ = [
    "DEFAULT_POLICY",
    "WS_CLOSE_TOKEN_EXPIRED",
    "WS_PROTOCOL",
    "WS_TOKEN_PREFIX",
    "ACLGuard",
    "AccessLog",
    "AddressRateLimit",
    "Authenticate",
    "BadPathError",
    "CORSGuard",
    "ClaimError",
    "ClientAddress",
    "CloudEndpoints",
    "CloudRuntimeError",
    "ConfigError",
    "Decision",
    "JWKSCache",
    "JsonFormatter",
    "KeysUnavailableError",
    "Limiter",
    "LocalGuard",
    "MemoryLimiter",
    "Policy",
    "Principal",
    "PrincipalRateLimit",
    "RedactingFilter",
    "RedisLimiter",
    "RequestLimits",
    "Rule",
    "RuntimeSettings",
    "RuntimeStack",
    "SecurityHeaders",
    "StorageUnavailableError",
    "TokenError",
    "TokenVerifier",
    "UnknownKeyError",
    "VerificationKey",
    "build_limiter",
    "client_address_key",
    "configure_logging",
    "load_settings",
    "normalize_path",
    "principal_of",
    "redact",
    "wrap",
]
