"""The sessions list on /app/security names each session's device and network (issue 15, item
5): a short name from the User-Agent, the /24 or /48 rather than the address."""

from __future__ import annotations

import pytest

from control_plane.auth.session_labels import device_label, network_label
from tests.control_plane.conftest import PASSWORD, Harness, signup_and_verify

CHROME_LINUX = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/156.0.0.0 Safari/537.36"
)
EDGE_WINDOWS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/140.0.0.0 Safari/537.36 Edg/140.0.0.0"
)
SAFARI_IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_0 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/18.0 Mobile/15E148 Safari/604.1"
)
FIREFOX_MAC = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14.5; rv:140.0) Gecko/20100101 Firefox/140.0"
CHROME_ANDROID = (
    "Mozilla/5.0 (Linux; Android 15; Pixel 9) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/140.0.0.0 Mobile Safari/537.36"
)


@pytest.mark.parametrize(
    ("agent", "label"),
    [
        (CHROME_LINUX, "Chrome on Linux"),
        (EDGE_WINDOWS, "Edge on Windows"),
        (SAFARI_IPHONE, "Safari on iPhone"),
        (FIREFOX_MAC, "Firefox on macOS"),
        (CHROME_ANDROID, "Chrome on Android"),
        ("python-httpx/0.28.1", "python-httpx"),
        ("", "Unknown device"),
        (None, "Unknown device"),
        ("<script>", "Unknown device"),
    ],
)
def test_the_device_is_named_from_the_user_agent(agent: str | None, label: str) -> None:
    assert device_label(agent) == label


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("203.0.113.7", "203.0.113.0/24"),
        ("2001:db8:1:2::5", "2001:db8:1::/48"),
        ("::ffff:198.51.100.9", "198.51.100.0/24"),
        ("not an address", None),
        (None, None),
    ],
)
def test_the_network_not_the_address(address: str | None, network: str | None) -> None:
    assert network_label(address) == network


async def test_the_sessions_api_names_device_and_network(harness: Harness):
    h = harness
    await signup_and_verify(h, "owner@example.com")
    await h.client.post(
        "/api/auth/login",
        json={"email": "owner@example.com", "password": PASSWORD},
        headers={"User-Agent": CHROME_LINUX},
    )
    sessions = (await h.client.get("/api/auth/sessions")).json()["sessions"]
    assert [(s["device"], s["network"], s["current"]) for s in sessions] == [
        ("Chrome on Linux", "203.0.113.0/24", True)
    ]
