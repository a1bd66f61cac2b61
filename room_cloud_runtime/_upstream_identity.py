"""Who a forwarded request speaks for, in the upstream Room's own terms (gateway mode).

The real Room (npm ``quoroom``) checks its own HS256 tokens (``iss quoroom-cloud``, ``aud
quoroom-runtime``, ``instanceId``, ``sub``, ``role``, ``exp``; ../shared/quoroom-room/README.md)
and knows nothing of the control plane's EdDSA tokens. The gateway verifies the client's token
exactly as the stack always does, then hands the Room a short HS256 token for the same principal,
signed with a secret only the gateway and the Room hold. The client's token never reaches the
Room, and the Room's secret never leaves the machine.

Two facts per principal, both cached so the hot path does no crypto and no allocation:

- :class:`UpstreamTokens` — the HS256 token, minted once per verified token (keyed by the
  principal's ``jti``), expiring no later than the original;
- :class:`SourceAddresses` — the loopback address the gateway connects *from* for this user.
  The Room rate-limits per socket address (300 reads / 120 writes a minute) and treats exactly
  ``127.0.0.1``, ``::1`` and ``::ffff:127.0.0.1`` as "local" (``POST /api/server/restart`` with
  no token). Every address in 127.0.0.0/8 is loopback on Linux, so each user gets one of their
  own from 127.77.0.0/16: the Room's budget stays per user, and nothing forwarded ever looks
  local to it.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Callable

import jwt

from ._errors import ConfigError
from ._scope import Principal

UPSTREAM_ISSUER = "quoroom-cloud"
UPSTREAM_AUDIENCE = "quoroom-runtime"
MIN_SECRET_BYTES = 32

# 127.77.0.0/16 less .0 and .255 host parts: 254 * 256 addresses, far above a Room's members.
_SOURCE_NET = "127.77"
#: The source address of requests without a principal (the static UI). Not 127.0.0.1 either.
ANONYMOUS_SOURCE = f"{_SOURCE_NET}.0.1"


def new_secret() -> str:
    """A fresh per-boot secret for the Room's HS256 tokens (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def check_secret(setting: str, secret: str) -> str:
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(setting, f"must be at least {MIN_SECRET_BYTES} bytes of random data")
    return secret


class UpstreamTokens:
    """Mint (and cache) the Room's HS256 token for a verified principal.

    :param secret: the HS256 key the Room is started with (``QUOROOM_CLOUD_JWT_SECRET``).
    :param instance_id: the Room's ``QUOROOM_CLOUD_INSTANCE_ID``.
    :param cache_size: tokens kept; one per live verified token is enough.
    """

    __slots__ = ("_cache", "_clock", "_instance_id", "_key", "_size")

    def __init__(
        self,
        secret: str,
        *,
        instance_id: str,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = check_secret("QUOROOM_GATEWAY_UPSTREAM_SECRET", secret).encode()
        self._instance_id = instance_id
        self._size = cache_size
        self._clock = clock
        self._cache: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def token_for(self, principal: Principal) -> str:
        """The Room's token for ``principal``; minted on first use of each verified token."""
        key = principal.token_id or f"{principal.subject}:{principal.expires_at}"
        hit = self._cache.get(key)
        if hit is not None and hit[1] > self._clock():
            return hit[0]
        token = self._mint(principal)
        self._cache[key] = (token, principal.expires_at)
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return token

    def _mint(self, principal: Principal) -> str:
        now = int(self._clock())
        claims = {
            "iss": UPSTREAM_ISSUER,
            "aud": UPSTREAM_AUDIENCE,
            "sub": principal.subject,
            "instanceId": self._instance_id,
            "role": principal.role,
            "email": principal.email,
            "emailVerified": principal.email_verified,
            "name": principal.name,
            "iat": now,
            # Never later than the client's own token: the Room must not outlive it.
            "exp": int(principal.expires_at),
        }
        return jwt.encode(claims, self._key, algorithm="HS256")


class SourceAddresses:
    """One loopback source address per user, handed out in order and kept while in use.

    The map is bounded (LRU): past ``capacity`` users the least recently seen one gives its
    address up. A Room has a few dozen members at most, so in practice nobody ever shares.
    """

    __slots__ = ("_capacity", "_free", "_map")

    def __init__(self, capacity: int = 4096) -> None:
        if not 1 <= capacity <= 254 * 255:
            raise ConfigError("capacity", f"must be from 1 to {254 * 255}")
        self._capacity = capacity
        self._map: OrderedDict[str, str] = OrderedDict()
        # index 0 is ANONYMOUS_SOURCE; users start at 1.
        self._free = [_address(i) for i in range(capacity, 0, -1)]

    def for_subject(self, subject: str | None) -> str:
        if subject is None:
            return ANONYMOUS_SOURCE
        address = self._map.get(subject)
        if address is not None:
            self._map.move_to_end(subject)
            return address
        if self._free:
            address = self._free.pop()
        else:
            _, address = self._map.popitem(last=False)
        self._map[subject] = address
        return address


def _address(index: int) -> str:
    high, low = divmod(index, 254)
    return f"{_SOURCE_NET}.{high}.{low + 1}"


def check_source_binding() -> None:
    """Fail start-up clearly where the OS cannot bind 127.77.x.y (Linux can; macOS cannot)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((ANONYMOUS_SOURCE, 0))
        except OSError as exc:
            raise ConfigError(
                "gateway",
                f"cannot bind the loopback source address {ANONYMOUS_SOURCE} ({exc}); gateway "
                "mode needs the whole 127.0.0.0/8 on the loopback interface (Linux)",
            ) from exc
