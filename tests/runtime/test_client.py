"""ClientAddress: the rate-limit key comes from the socket or a trusted Fly-Client-IP only."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from room_cloud_runtime import client_address_key
from room_cloud_runtime._client import ClientAddress
from room_cloud_runtime._errors import ConfigError
from room_cloud_runtime._scope import CLIENT_ADDRESS


async def whoami(request: Request) -> Response:
    return JSONResponse(
        {
            "address": request.scope["state"][CLIENT_ADDRESS],
            "headers": sorted({name.decode() for name, _ in request.scope["headers"]}),
        }
    )


def room() -> Starlette:
    return Starlette(routes=[Route("/api/whoami", whoami)])


async def ask(
    app: Any, headers: dict[str, str] | None = None, client: tuple[str, int] = ("203.0.113.7", 5000)
) -> dict[str, Any]:
    transport = httpx.ASGITransport(app=app, client=client)
    async with httpx.AsyncClient(transport=transport, base_url="http://room") as http:
        response = await http.get("/api/whoami", headers=headers)
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


async def test_the_socket_address_is_the_key_by_default() -> None:
    assert (await ask(ClientAddress(room())))["address"] == "203.0.113.7"


async def test_x_forwarded_for_is_never_trusted() -> None:
    for trust in (False, True):
        answer = await ask(
            ClientAddress(room(), trust_fly_client_ip=trust),
            headers={"x-forwarded-for": "198.51.100.1, 203.0.113.7"},
        )
        assert answer["address"] == "203.0.113.7"


async def test_fly_client_ip_is_ignored_unless_configured() -> None:
    answer = await ask(ClientAddress(room()), headers={"fly-client-ip": "198.51.100.1"})
    assert answer["address"] == "203.0.113.7"


async def test_fly_client_ip_is_the_key_when_configured() -> None:
    answer = await ask(
        ClientAddress(room(), trust_fly_client_ip=True), headers={"fly-client-ip": "198.51.100.1"}
    )
    assert answer["address"] == "198.51.100.1"


async def test_without_fly_client_ip_the_socket_address_is_used_as_for_health_checks() -> None:
    answer = await ask(ClientAddress(room(), trust_fly_client_ip=True), client=("fdaa::3", 1))
    assert answer["address"] == "fdaa::/64"


@pytest.mark.parametrize("value", ["not-an-ip", "1.2.3.4.5", "", "1.2.3.4, 5.6.7.8", "::g"])
async def test_an_invalid_fly_client_ip_falls_back_to_the_socket_address(value: str) -> None:
    app = ClientAddress(room(), trust_fly_client_ip=True)
    for _ in range(2):  # the second time through the parse cache
        answer = await ask(app, headers={"fly-client-ip": value})
        assert answer["address"] == "203.0.113.7"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:192.0.2.9", "192.0.2.9"),
        ("192.0.2.9", "192.0.2.9"),
        ("fe80::1%eth0", "fe80::/64"),
    ],
)
async def test_ipv6_is_grouped_by_64_and_mapped_ipv4_unwrapped(raw: str, key: str) -> None:
    via_fly = await ask(
        ClientAddress(room(), trust_fly_client_ip=True), headers={"fly-client-ip": raw}
    )
    via_socket = await ask(ClientAddress(room()), client=(raw, 1))
    assert via_fly["address"] == via_socket["address"] == key
    assert client_address_key(raw) == key  # the public helper the control plane's throttles use


@pytest.mark.parametrize("raw", ["testclient", "", "192.0.2.9.1", "2001:db8::/64"])
def test_the_public_helper_gives_none_for_what_is_not_an_ip_address(raw: str) -> None:
    assert client_address_key(raw) is None
    assert client_address_key("2001:db8:1:2::1", ipv6_prefix=48) == "2001:db8:1::/48"
    with pytest.raises(ValueError, match="ipv6_prefix"):
        client_address_key("192.0.2.9", ipv6_prefix=0)


async def test_the_ipv6_prefix_is_configurable() -> None:
    answer = await ask(ClientAddress(room(), ipv6_prefix=48), client=("2001:db8:1:2::1", 1))
    assert answer["address"] == "2001:db8:1::/48"


async def test_a_missing_client_gives_unknown() -> None:
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.update(scope["state"])

    await ClientAddress(app)({"type": "http", "headers": []}, None, None)  # type: ignore[arg-type]
    assert seen[CLIENT_ADDRESS] == "unknown"


async def test_websocket_scopes_get_the_key_and_lifespan_passes_through() -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope.get("state", {}).get(CLIENT_ADDRESS, scope["type"]))

    layer = ClientAddress(app)
    await layer({"type": "websocket", "headers": [], "client": ("192.0.2.1", 1)}, None, None)  # type: ignore[arg-type]
    await layer({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == ["192.0.2.1", "lifespan"]


@pytest.mark.parametrize(
    "name",
    [
        "X-Forwarded-Email",
        "X_Forwarded_Email",
        "x-forwarded_email",
        "X-Forwarded-User",
        "x-quoroom-user",
    ],
)
async def test_client_sent_identity_headers_are_removed_in_every_spelling(name: str) -> None:
    # httpx sends the name as written; the ASGI transport lowercases it as servers do.
    answer = await ask(ClientAddress(room()), headers={name: "admin@quoroom.ai", "x-keep": "1"})
    assert not any(
        h.replace("_", "-") in {"x-forwarded-email", "x-forwarded-user", "x-quoroom-user"}
        for h in answer["headers"]
    )
    assert "x-keep" in answer["headers"]


async def test_stripping_can_be_turned_off() -> None:
    answer = await ask(
        ClientAddress(room(), strip_headers=()), headers={"x-forwarded-email": "a@b"}
    )
    assert "x-forwarded-email" in answer["headers"]


async def test_the_parse_cache_stays_bounded() -> None:
    scope_base: dict[str, Any] = {"type": "http", "headers": []}

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        pass

    layer = ClientAddress(inner)
    for i in range(5000):
        await layer({**scope_base, "client": (f"10.0.{i // 256}.{i % 256}", 1)}, None, None)  # type: ignore[arg-type]
    assert len(layer._cache) <= 4096


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"trust_fly_client_ip": "yes"}, "trust_fly_client_ip"),
        ({"ipv6_prefix": 0}, "ipv6_prefix"),
        ({"ipv6_prefix": 129}, "ipv6_prefix"),
        ({"ipv6_prefix": True}, "ipv6_prefix"),
        ({"strip_headers": "x-forwarded-email"}, "strip_headers"),
        ({"strip_headers": ["bad header"]}, "strip_headers"),
        ({"strip_headers": ["fly-client-ip"], "trust_fly_client_ip": True}, "strip_headers"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ClientAddress(room(), **options)
    assert caught.value.setting == setting
