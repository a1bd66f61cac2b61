"""An asyncio JWKS cache for a pinned key set: the control plane's, or an identity provider's.

Why not PyJWT's ``PyJWKClient``: it fetches with blocking ``urllib`` (stalls the event loop,
pyjwt#1120), refetches on every unknown ``kid`` with no lock or cooldown, and on a failed fetch
stores ``None`` and so wipes the keys it had (pyjwt#1162). This cache instead:

* fetches with ``httpx`` (async, short total deadline, response size capped before parsing);
* keeps one fetch in flight at a time (concurrent callers await the same fetch);
* refreshes in the background at the response's ``Cache-Control: max-age`` (clamped), and sooner
  with backoff after a failure;
* refetches for an unknown ``kid`` at most once per cooldown, with a per-``kid`` negative cache, so
  a flood of random ``kid`` values cannot make us hammer the control plane (unlike go-oidc, which
  refetches on every miss) while a rotated key is still picked up without a restart (unlike
  Envoy, which never refetches on a miss);
* keeps the last good keys when a fetch fails, up to ``max_staleness``; after that, and before the
  first good fetch, :meth:`JWKSCache.get_key` raises :class:`KeysUnavailableError` and auth fails
  closed;
* binds every key to the one algorithm its type allows (OKP/Ed25519 ↔ EdDSA, EC/P-256 ↔ ES256,
  RSA ↔ RS256), which blocks algorithm-confusion attacks. RSA keys are accepted only when a
  caller configures ``RS256`` (the control plane verifying Google ID tokens); the runtime's
  default stays EdDSA/ES256 and its settings refuse RS256. An RSA modulus must be 2048..8192 bits
  and the public exponent odd with 2^16 < e < 2^256 (RFC 7518 §3.3, NIST FIPS 186-5 §5.4).

Parsing and the key/algorithm binding are in :mod:`._jwk`; this module fetches and caches.

The URL is always configured (pinned), never derived from a token: Pomerium's SDK derived it from
the unverified ``iss`` and let an attacker plant keys.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from ._errors import ConfigError, KeysUnavailableError, UnknownKeyError
from ._jwk import KEY_ALGORITHMS, JWKSetError, VerificationKey, parse_jwk_set

if TYPE_CHECKING:
    from ._settings import RuntimeSettings

__all__ = ["JWKSCache"]

logger = logging.getLogger("room_cloud_runtime.jwks")

#: Responses larger than this are refused before JSON parsing (a JWKS of a few keys is ~1 KiB).
MAX_RESPONSE_BYTES = 64 * 1024
#: Refresh interval when the response carries no usable ``max-age``.
DEFAULT_REFRESH_SECONDS = 300.0
#: First retry delay after a failed fetch; doubles per failure up to ``min_refresh``.
RETRY_BASE_SECONDS = 1.0
#: Bound on the per-kid negative cache so random kids cannot grow memory without limit.
MAX_NEGATIVE_KIDS = 4096

_RANDOM = secrets.SystemRandom()


# Accept-Encoding: identity, so that the size cap counts what is parsed (see _fetch).
_FETCH_HEADERS = {"Accept": "application/json", "Accept-Encoding": "identity"}


class _FetchError(Exception):
    """Internal: why a fetch produced no usable key set (logged, never raised to callers)."""


class JWKSCache:
    """Async cache of the control plane's JWKS. See the module docstring for the behaviour.

    ``clock`` is a monotonic clock used for staleness, cooldowns and status; tests inject one.
    All durations are in seconds.
    """

    def __init__(
        self,
        url: str,
        *,
        algorithms: Iterable[str] = ("EdDSA", "ES256"),
        timeout: float = 3.0,
        min_refresh: float = 60,
        max_refresh: float = 3600,
        unknown_kid_cooldown: float = 30,
        max_staleness: float = 21600,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise ConfigError("url", f"must be an absolute http(s) URL, got {url!r}")
        algs = tuple(algorithms)
        bad = [a for a in algs if a not in KEY_ALGORITHMS]
        if bad or not algs:
            raise ConfigError(
                "algorithms", f"allowed values are {sorted(KEY_ALGORITHMS)}, got {list(algs)}"
            )
        for name, value in (
            ("timeout", timeout),
            ("min_refresh", min_refresh),
            ("max_refresh", max_refresh),
            ("max_staleness", max_staleness),
            ("max_response_bytes", max_response_bytes),
        ):
            if not value > 0:
                raise ConfigError(name, "must be positive")
        if unknown_kid_cooldown < 0:
            raise ConfigError("unknown_kid_cooldown", "must not be negative")
        if min_refresh > max_refresh:
            raise ConfigError("min_refresh", "must not exceed max_refresh")

        self.url = url
        self.algorithms = frozenset(algs)
        self._timeout = float(timeout)
        self._min_refresh = float(min_refresh)
        self._max_refresh = float(max_refresh)
        self._cooldown = float(unknown_kid_cooldown)
        self._max_staleness = float(max_staleness)
        self._max_bytes = int(max_response_bytes)
        self._clock = clock
        self._owns_client = client is None
        # Our own client is made on first use, so building a cache allocates no connections.
        self._client: httpx.AsyncClient | None = client

        self._keys: dict[str, VerificationKey] = {}
        self._loaded_at: float | None = None  # clock() of the last good fetch
        self._failures = 0  # consecutive failed fetches
        self._next_delay = self._min_refresh
        self._inflight: asyncio.Task[bool] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._last_miss_fetch: float | None = None  # clock() of the last unknown-kid refetch
        self._missed: dict[str, float] = {}  # kid -> clock() when it was last found unknown
        self._closed = False

    @classmethod
    def from_settings(
        cls, settings: RuntimeSettings, *, client: httpx.AsyncClient | None = None
    ) -> JWKSCache:
        """Build the cache from the runtime settings (the pinned, resolved JWKS URL)."""
        if not settings.issuer and not settings.jwks_url:
            raise ConfigError("QUOROOM_CLOUD_ISSUER", "is required to locate the JWKS")
        return cls(
            settings.resolved_jwks_url,
            algorithms=settings.algorithms,
            timeout=settings.jwks_timeout_seconds,
            min_refresh=settings.jwks_min_refresh_seconds,
            max_refresh=settings.jwks_max_refresh_seconds,
            unknown_kid_cooldown=settings.jwks_unknown_kid_cooldown_seconds,
            max_staleness=settings.jwks_max_staleness_seconds,
            client=client,
        )

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Fetch once and start the background refresh.

        A failed first fetch is logged, not raised: the runtime must boot while the control plane
        is down; until keys arrive, auth fails closed with :class:`KeysUnavailableError`.
        """
        if self._closed:
            raise RuntimeError("JWKSCache is closed")
        if self._refresher is not None:
            return
        await self.refresh()
        self._refresher = asyncio.get_running_loop().create_task(
            self._refresh_loop(), name="room_cloud_runtime.jwks.refresh"
        )

    async def aclose(self) -> None:
        """Stop the background refresh and any fetch in flight; close the client if we made it."""
        self._closed = True
        for task in (self._refresher, self._inflight):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._refresher, self._inflight):
            if task is not None:
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._refresher = None
        self._inflight = None
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> JWKSCache:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- request path ----------------------------------------------------------------------------

    def get_key(self, kid: str) -> VerificationKey | None:
        """The key for ``kid`` from memory, no I/O; ``None`` when the kid is unknown.

        Raises :class:`KeysUnavailableError` when no key set was ever loaded or the last good one
        is older than ``max_staleness`` (fail closed rather than trust keys that may be revoked).
        """
        loaded_at = self._loaded_at
        if loaded_at is None:
            raise KeysUnavailableError("verification keys have not been loaded yet")
        if self._clock() - loaded_at > self._max_staleness:
            raise KeysUnavailableError("verification keys are stale")
        return self._keys.get(kid)

    async def resolve(self, kid: str) -> VerificationKey:
        """The key for ``kid``, refetching the JWKS for an unknown kid at most once per cooldown.

        Raises :class:`UnknownKeyError` when the kid stays unknown and
        :class:`KeysUnavailableError` when there are no usable keys.
        """
        try:
            key = self.get_key(kid)
        except KeysUnavailableError:
            # Not loaded or stale: one recovery attempt per cooldown, shared by all callers;
            # everyone else fails closed at once instead of queueing behind a dead control plane.
            if self._inflight is not None or self._may_refetch():
                await self._refetch_for_miss()
            key = self.get_key(kid)  # raises KeysUnavailableError again if still unusable
        if key is not None:
            return key

        now = self._clock()
        missed_at = self._missed.get(kid)
        if missed_at is not None and now - missed_at < self._cooldown:
            raise UnknownKeyError(kid)
        if self._inflight is not None or self._may_refetch():
            # A fetch already in flight is free to wait for; otherwise this is the one refetch
            # the global cooldown allows.
            await self._refetch_for_miss()
            key = self.get_key(kid)
            if key is not None:
                self._missed.pop(kid, None)
                return key
        self._remember_miss(kid)
        # debug, not info: unknown kids are attacker-chosen and arrive in floods; the auth layer
        # logs each refusal once already.
        logger.debug(
            "token kid %r is not in the JWKS",
            kid,
            extra={"event": "jwks_unknown_kid", "kid": kid},
        )
        raise UnknownKeyError(kid)

    def _may_refetch(self) -> bool:
        last = self._last_miss_fetch
        return last is None or self._clock() - last >= self._cooldown

    async def _refetch_for_miss(self) -> None:
        if self._inflight is None:
            self._last_miss_fetch = self._clock()
        await self.refresh()

    def _remember_miss(self, kid: str) -> None:
        missed = self._missed
        missed.pop(kid, None)
        missed[kid] = self._clock()
        while len(missed) > MAX_NEGATIVE_KIDS:
            del missed[next(iter(missed))]

    # -- status ----------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """True when a key set is loaded and not staler than ``max_staleness``."""
        loaded_at = self._loaded_at
        return loaded_at is not None and self._clock() - loaded_at <= self._max_staleness

    @property
    def next_refresh_in(self) -> float:
        """Seconds the background task waits before its next fetch (from the last fetch)."""
        return self._next_delay

    def status(self) -> dict[str, Any]:
        """Health facts for ``/api/status``; no key material."""
        loaded_at = self._loaded_at
        age = None if loaded_at is None else max(0.0, self._clock() - loaded_at)
        return {
            # Not "loaded" once past max_staleness: auth answers 503 then, and status must agree.
            "keysLoaded": age is not None and age <= self._max_staleness,
            "keyCount": len(self._keys),
            "lastRefreshAgeSeconds": age,
            "stale": age is None or age > self._max_staleness,
        }

    # -- fetching --------------------------------------------------------------------------------

    async def refresh(self) -> bool:
        """Fetch the JWKS now (joining a fetch already in flight). True when keys were updated.

        Never raises for fetch problems: a failure is logged and the last good keys are kept.
        """
        if self._closed:
            return False
        task = self._inflight
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._fetch_and_store(), name="room_cloud_runtime.jwks.fetch"
            )
            self._inflight = task
        # shield: a caller that is cancelled (client went away) must not cancel the fetch the
        # other callers are waiting for.
        return await asyncio.shield(task)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._next_delay)
            await self.refresh()

    async def _fetch_and_store(self) -> bool:
        started = time.perf_counter()
        try:
            keys, max_age = await self._fetch()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure keeps the last good keys (pyjwt#1162)
            self._failures += 1
            self._next_delay = self._retry_delay()
            logger.warning(
                "JWKS fetch from %s failed (%s); keeping %d last good keys, retry in %.1fs",
                self.url,
                _describe(exc),
                len(self._keys),
                self._next_delay,
                extra={
                    "event": "jwks_fetch_failed",
                    "jwks_url": self.url,
                    "reason": _describe(exc),
                    "failures": self._failures,
                },
            )
            return False
        finally:
            self._inflight = None
        # Keep the very same objects for keys that did not change, so callers that remember a
        # key (the verifier's cache compares by identity) are not invalidated by every refresh.
        old = self._keys
        self._keys = {kid: old[kid] if old.get(kid) == key else key for kid, key in keys.items()}
        self._loaded_at = self._clock()
        self._failures = 0
        self._next_delay = self._refresh_delay(max_age)
        # Keys that just arrived are no longer "known unknown".
        for kid in keys:
            self._missed.pop(kid, None)
        logger.info(
            "JWKS loaded from %s: %d keys, next refresh in %.0fs",
            self.url,
            len(keys),
            self._next_delay,
            extra={
                "event": "jwks_loaded",
                "jwks_url": self.url,
                "kids": sorted(keys),
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
        return True

    def _refresh_delay(self, max_age: float | None) -> float:
        delay = DEFAULT_REFRESH_SECONDS if max_age is None else max_age
        return min(max(delay, self._min_refresh), self._max_refresh)

    def _retry_delay(self) -> float:
        # Exponential backoff with jitter, never slower than the normal refresh floor, so an
        # outage recovers quickly without every runtime retrying in lockstep.
        base = RETRY_BASE_SECONDS * 2.0 ** min(self._failures - 1, 16)
        return min(base, self._min_refresh) * _RANDOM.uniform(0.8, 1.0)

    async def _fetch(self) -> tuple[dict[str, VerificationKey], float | None]:
        # One total deadline: httpx's timeout is per read, so a server that drips a byte at a
        # time would otherwise hold the fetch (and every waiter) far longer.
        async with asyncio.timeout(self._timeout):
            async with self._http().stream("GET", self.url, headers=_FETCH_HEADERS) as response:
                if response.status_code != 200:
                    raise _FetchError(f"HTTP {response.status_code}")
                # The size cap counts bytes on the wire: a compressed body (a 60 KB gzip peaked
                # at 137 MiB decoded) is refused, not decoded, even if the server ignored
                # our Accept-Encoding: identity.
                encoding = response.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise _FetchError(f"compressed response ({encoding}) refused")
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > self._max_bytes:
                    raise _FetchError(f"response larger than {self._max_bytes} bytes")
                body = bytearray()
                async for chunk in response.aiter_bytes():  # no decoding: identity only
                    body += chunk
                    if len(body) > self._max_bytes:
                        raise _FetchError(f"response larger than {self._max_bytes} bytes")
                max_age = _max_age(response.headers.get_list("cache-control"))
        try:
            return parse_jwk_set(bytes(body), self.algorithms), max_age
        except JWKSetError as exc:
            raise _FetchError(str(exc)) from exc

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            # Redirects are not followed: the URL is pinned, and a redirect is either a
            # misconfiguration or an attempt to move where our keys come from.
            self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
        return self._client


def _max_age(values: Iterable[str]) -> float | None:
    """``max-age`` from Cache-Control header values; 0 for no-store/no-cache; None if absent."""
    max_age: float | None = None
    for value in values:
        for directive in value.split(","):
            name, _, arg = directive.strip().partition("=")
            name = name.strip().lower()
            if name in ("no-store", "no-cache"):
                return 0.0
            if name == "max-age":
                arg = arg.strip().strip('"')
                if arg.isdigit():
                    max_age = float(arg)
    if max_age is not None and not math.isfinite(max_age):
        return None
    return max_age


def _describe(exc: BaseException) -> str:
    """A short reason for logs: our own message, or the exception type for library errors."""
    if isinstance(exc, _FetchError):
        return str(exc)
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.HTTPError):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__
