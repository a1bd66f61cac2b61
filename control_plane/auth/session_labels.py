"""What the sessions list on ``/app/security`` shows of a session (issue 15, item 5): a short
name for the device from its User-Agent, and the network it signed in from rather than the
exact address (an IPv4 /24, an IPv6 /48: enough to tell home from elsewhere; the exact address is
still in ``ip_address`` for the account's owner).

A User-Agent is whatever the client says: the label is a hint for the owner, never evidence."""

from __future__ import annotations

import ipaddress
import re

#: Checked in order: Edge and Opera also say "Chrome", Chrome also says "Safari".
_BROWSERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("Edge", re.compile(r"\bEdg(?:e|A|iOS)?/")),
    ("Opera", re.compile(r"\bOPR/")),
    ("Samsung Internet", re.compile(r"\bSamsungBrowser/")),
    ("Firefox", re.compile(r"\b(?:Firefox|FxiOS)/")),
    ("Chrome", re.compile(r"\b(?:Chrome|CriOS|HeadlessChrome|Chromium)/")),
    ("Safari", re.compile(r"\bVersion/[\d.]+.*\bSafari/")),
)
_SYSTEMS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("iPhone", re.compile(r"\biPhone\b")),
    ("iPad", re.compile(r"\biPad\b")),
    ("Android", re.compile(r"\bAndroid\b")),
    ("ChromeOS", re.compile(r"\bCrOS\b")),
    ("Windows", re.compile(r"\bWindows\b")),
    ("macOS", re.compile(r"\bMac OS X\b|\bMacintosh\b")),
    ("Linux", re.compile(r"\bLinux\b")),
)
_PRODUCT = re.compile(r"^([A-Za-z][\w.-]{0,39})(?:/[\w.-]{1,20})?")


def device_label(user_agent: str | None) -> str:
    """``"Chrome on Linux"``, ``"Safari on iPhone"``; a non-browser client by its product name
    (``"python-httpx"``); ``"Unknown device"`` when nothing is said."""
    ua = (user_agent or "").strip()[:255]
    if not ua:
        return "Unknown device"
    browser = next((name for name, pattern in _BROWSERS if pattern.search(ua)), None)
    system = next((name for name, pattern in _SYSTEMS if pattern.search(ua)), None)
    if browser and system:
        return f"{browser} on {system}"
    if browser or system:
        return browser or f"A browser on {system}"
    product = _PRODUCT.match(ua)
    return product.group(1) if product else "Unknown device"


def network_label(address: str | None) -> str | None:
    """The network of ``address``: ``"203.0.113.0/24"``, ``"2001:db8:1::/48"``."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
