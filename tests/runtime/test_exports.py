"""The public API is small and explicit: this list changes only on purpose."""

import room_cloud_runtime

EXPECTED = {
    "DEFAULT_POLICY", "WS_CLOSE_TOKEN_EXPIRED", "WS_PROTOCOL", "WS_TOKEN_PREFIX", "ACLGuard",
    "AccessLog", "AddressRateLimit", "Authenticate", "BadPathError", "CORSGuard", "ClaimError",
    "ClientAddress", "CloudEndpoints", "CloudRuntimeError", "ConfigError", "Decision", "JWKSCache",
    "KeysUnavailableError", "Limiter", "LocalGuard", "MemoryLimiter", "Policy", "Principal",
    "PrincipalRateLimit", "RedisLimiter", "RequestLimits", "Rule", "RuntimeSettings",
    "RuntimeStack", "SecurityHeaders", "StorageUnavailableError", "TokenError", "TokenVerifier",
    "UnknownKeyError", "VerificationKey", "build_limiter", "client_address_key",
    "configure_logging", "load_settings", "normalize_path", "principal_of", "wrap",
    # the JSON lines and the redaction, which the control plane's logs share (issue 14, item 2)
    "JsonFormatter", "RedactingFilter", "redact",
}  # fmt: skip


def test_the_public_names_are_exactly_the_documented_ones() -> None:
    assert set(room_cloud_runtime.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(room_cloud_runtime, name) is not None


def test_every_error_derives_from_the_one_root() -> None:
    for name in ("ConfigError", "TokenError", "ClaimError", "UnknownKeyError",
                 "KeysUnavailableError", "StorageUnavailableError", "BadPathError"):  # fmt: skip
        assert issubclass(getattr(room_cloud_runtime, name), room_cloud_runtime.CloudRuntimeError)


def test_the_package_ships_type_information() -> None:
    from importlib.resources import files

    assert files("room_cloud_runtime").joinpath("py.typed").is_file()
