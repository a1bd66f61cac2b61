"""The one exception root of the runtime plugin and its subclasses.

Third-party errors (PyJWT, httpx, redis, limits) are translated into these at one boundary
each, with ``raise ... from exc`` so the cause stays visible in tracebacks.
"""

from __future__ import annotations


class CloudRuntimeError(Exception):
    """Root of every error the runtime plugin raises on purpose."""


class ConfigError(CloudRuntimeError, ValueError):
    """A setting or constructor option is missing or malformed.

    ``setting`` names the environment variable or option so the operator knows what to fix.
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


class TokenError(CloudRuntimeError):
    """A presented token is refused. ``code`` is the stable machine code sent to the client.

    ``status`` is the HTTP status to answer with (401 for anything the client can fix by
    signing in again).
    """

    status = 401

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class UnknownKeyError(TokenError):
    """The token's ``kid`` is not in the pinned JWKS, even after an allowed refetch."""

    def __init__(self, kid: str) -> None:
        super().__init__("unknown_key", "token signed by an unknown key")
        self.kid = kid


class ClaimError(TokenError):
    """A claim is missing or has a value the contract does not allow."""

    def __init__(self, claim: str, message: str) -> None:
        super().__init__("invalid_claim", message)
        self.claim = claim


class KeysUnavailableError(CloudRuntimeError):
    """No usable verification keys: the JWKS was never fetched or is staler than allowed.

    Auth fails closed on this (503), it never lets a request through.
    """

    status = 503
    code = "keys_unavailable"


class StorageUnavailableError(CloudRuntimeError):
    """The rate-limit storage (Redis) could not be reached."""
