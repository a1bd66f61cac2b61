"""Refusal reports: what the stack refused, counted per (minute, reason, address) and sent to the
control plane in batches, for the owner's access log (issue 15, item 4).

Off unless configured: only a cloud-mode runtime given its instance's report key
(``QUOROOM_CLOUD_REPORT_KEY``, set by the control plane as an app secret) reports anything, so a
Room embedding the plugin, and local mode, are unaffected.

The hot path stays cheap. A refusal site calls :func:`note_refusal` (after the answer is decided,
never on an allowed request): one global read, and when reporting runs, one dict increment keyed
by the minute, the reason (the refusal's stable ``code``; a token for another instance is
``wrong_instance``) and the client address as the limiter keys it. No I/O, no await.

Memory is bounded: at most ``max_pending`` keys are held. Past that, a refusal is counted under
its reason with the address ``*`` (a few extra keys at most, one per reason and minute), and past
those it is only counted as dropped. A background task takes the counts every ``interval``
seconds and posts them in batches of at most ``max_entries`` entries, each with a fresh
``batchId`` the control plane accepts once. When the control plane cannot be reached or refuses a
batch, the batch is dropped — never queued — and counted (:meth:`RefusalReporter.status`).

The process has one active aggregator (a runtime serves one instance); :func:`note_refusal`
reads it from this module, so the refusal sites need no new constructor option.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Scope

from ._client import UNKNOWN, client_address_key
from ._errors import ConfigError
from ._scope import CLIENT_ADDRESS

__all__ = [
    "MAX_ADDRESS_LENGTH",
    "MAX_BATCH_ENTRIES",
    "REPORT_KEY_ENV",
    "RefusalAggregator",
    "RefusalReporter",
    "ReportSettings",
    "load_report_settings",
    "note_refusal",
]

logger = logging.getLogger("room_cloud_runtime.reports")

REPORT_KEY_ENV = "QUOROOM_CLOUD_REPORT_KEY"
#: The control plane accepts at most 500 entries in one batch (and 48 KiB); the runtime sends
#: fewer, so a batch of the longest addresses and reasons still fits.
MAX_BATCH_ENTRIES = 300
MAX_ADDRESS_LENGTH = 64
#: Refusals counted past the cap go to (minute, reason, "*"): at most this many such keys.
_OVERFLOW_KEYS = 256
OVERFLOW_ADDRESS = "*"
_MIN_KEY_LENGTH = 32
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True, slots=True)
class ReportSettings:
    """How refusal reports are sent. ``key`` is the instance's report credential (never logged)."""

    key: str = field(repr=False)
    url: str | None = None  # default: {issuer}/api/cloud/instances/{instance id}/access-reports
    interval_seconds: float = 30.0
    max_entries: int = 200
    max_pending: int = 4096
    timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        if len(self.key) < _MIN_KEY_LENGTH or not _KEY_PATTERN.match(self.key):
            raise ConfigError(
                REPORT_KEY_ENV, f"must be at least {_MIN_KEY_LENGTH} URL-safe base64 characters"
            )
        if not 1 <= self.interval_seconds <= 3600:
            raise ConfigError("QUOROOM_CLOUD_REPORT_SECONDS", "must be from 1 to 3600 seconds")
        if not 1 <= self.max_entries <= MAX_BATCH_ENTRIES:
            raise ConfigError(
                "QUOROOM_CLOUD_REPORT_MAX_ENTRIES", f"must be from 1 to {MAX_BATCH_ENTRIES}"
            )
        if not 1 <= self.max_pending <= 100_000:
            raise ConfigError("QUOROOM_CLOUD_REPORT_MAX_PENDING", "must be from 1 to 100000")
        if not 0 < self.timeout_seconds <= 60:
            raise ConfigError("QUOROOM_CLOUD_REPORT_TIMEOUT_SECONDS", "must be from 0 to 60")
        if self.url is not None and not self.url.startswith(("https://", "http://")):
            raise ConfigError("QUOROOM_CLOUD_REPORT_URL", "must be an absolute http(s) URL")

    def url_for(self, issuer: str, instance_id: str) -> str:
        if self.url:
            return self.url
        return f"{issuer.rstrip('/')}/api/cloud/instances/{instance_id}/access-reports"


def _number(env: Mapping[str, str], name: str, default: float, kind: type) -> Any:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError as exc:
        raise ConfigError(name, f"must be a number, got {raw!r}") from exc


def load_report_settings(env: Mapping[str, str], *, mode: str) -> ReportSettings | None:
    """The report settings, or ``None`` (reporting off) when no report key is set."""
    key = (env.get(REPORT_KEY_ENV) or "").strip()
    if not key:
        return None
    if mode != "cloud":
        raise ConfigError(REPORT_KEY_ENV, "is only used in cloud mode")
    defaults = ReportSettings(key="x" * _MIN_KEY_LENGTH)
    return ReportSettings(
        key=key,
        url=(env.get("QUOROOM_CLOUD_REPORT_URL") or "").strip() or None,
        interval_seconds=_number(
            env, "QUOROOM_CLOUD_REPORT_SECONDS", defaults.interval_seconds, float
        ),
        max_entries=_number(env, "QUOROOM_CLOUD_REPORT_MAX_ENTRIES", defaults.max_entries, int),
        max_pending=_number(env, "QUOROOM_CLOUD_REPORT_MAX_PENDING", defaults.max_pending, int),
        timeout_seconds=_number(
            env, "QUOROOM_CLOUD_REPORT_TIMEOUT_SECONDS", defaults.timeout_seconds, float
        ),
    )


Key = tuple[int, str, str]  # (minute as epoch seconds, reason, address)


class RefusalAggregator:
    """Refusals counted per (minute, reason, address), at most ``max_pending`` keys (plus a few
    overflow keys); what does not fit is counted in :attr:`dropped`."""

    __slots__ = ("clock", "counts", "dropped", "max_pending", "overflow", "trust_fly")

    def __init__(
        self,
        *,
        max_pending: int,
        trust_fly_client_ip: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.counts: dict[Key, int] = {}
        self.overflow = 0  # overflow keys in ``counts``
        self.dropped = 0
        self.max_pending = max_pending
        self.trust_fly = trust_fly_client_ip
        self.clock = clock

    def add(self, scope: Scope, reason: str) -> None:
        counts = self.counts
        key = (int(self.clock()) // 60 * 60, reason, _address(scope, self.trust_fly))
        count = counts.get(key)
        if count is not None:
            counts[key] = count + 1
        elif len(counts) - self.overflow < self.max_pending:
            counts[key] = 1
        else:
            key = (key[0], reason, OVERFLOW_ADDRESS)
            count = counts.get(key)
            if count is not None:
                counts[key] = count + 1
            elif self.overflow < _OVERFLOW_KEYS:
                counts[key] = 1
                self.overflow += 1
            else:
                self.dropped += 1

    def take(self) -> dict[Key, int]:
        """The counts so far; the aggregator starts again empty."""
        counts, self.counts, self.overflow = self.counts, {}, 0
        return counts


def _address(scope: Scope, trust_fly: bool) -> str:
    state = scope.get("state")
    if state:
        known = state.get(CLIENT_ADDRESS)
        if known:
            return str(known)[:MAX_ADDRESS_LENGTH]
    # Refused before the client-address check ran (CORS): work it out as that check would.
    if trust_fly:
        for name, value in scope.get("headers") or ():
            if name == b"fly-client-ip":
                key = client_address_key(value.decode("latin-1"))
                if key is not None:
                    return key
                break
    client = scope.get("client")
    if not client:
        return UNKNOWN
    host = str(client[0])
    return (client_address_key(host) or host)[:MAX_ADDRESS_LENGTH]


#: The running reporter's aggregator (None: reporting off). Set and cleared by
#: :meth:`RefusalReporter.start` / :meth:`RefusalReporter.aclose`.
_sink: RefusalAggregator | None = None


def note_refusal(scope: Scope, reason: str) -> None:
    """Count one refusal for the access log (a no-op unless reporting runs). Call it where a
    refusal is answered: it does no I/O and never raises."""
    sink = _sink
    if sink is not None:
        sink.add(scope, reason)


class RefusalReporter:
    """Sends the aggregator's counts to the control plane every ``interval`` seconds.

    A stack resource (``start``/``aclose`` with the ASGI lifespan). ``status()`` says how many
    batches were sent and how many refusals were dropped, and why.
    """

    def __init__(
        self,
        settings: ReportSettings,
        *,
        issuer: str,
        instance_id: str,
        trust_fly_client_ip: bool = False,
        transport: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.instance_id = instance_id
        self.url = settings.url_for(issuer, instance_id)
        self.aggregator = RefusalAggregator(
            max_pending=settings.max_pending, trust_fly_client_ip=trust_fly_client_ip, clock=clock
        )
        self._transport = transport
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None
        self.sent_batches = 0
        self.sent_refusals = 0
        self.failed_batches = 0
        #: Refusals never reported: their batch failed, or they did not fit in memory.
        self.dropped_refusals = 0

    def status(self) -> dict[str, int]:
        return {
            "pendingKeys": len(self.aggregator.counts),
            "sentBatches": self.sent_batches,
            "sentRefusals": self.sent_refusals,
            "failedBatches": self.failed_batches,
            "droppedRefusals": self.dropped_refusals + self.aggregator.dropped,
        }

    async def start(self) -> None:
        global _sink
        import httpx  # the runtime's HTTP client (JWKS fetches use it too)

        if _sink is not None and _sink is not self.aggregator:
            logger.warning("another refusal reporter was running in this process; replaced")
        _sink = self.aggregator
        self._client = httpx.AsyncClient(
            timeout=self.settings.timeout_seconds,
            transport=self._transport,
            trust_env=False,
            follow_redirects=False,
        )
        self._task = asyncio.create_task(self._loop(), name="refusal-reports")

    async def aclose(self) -> None:
        global _sink
        if _sink is self.aggregator:
            _sink = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self.flush()  # the last counts, once; dropped if it fails
            await self._client.aclose()
            self._client = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval_seconds)
            try:
                await self.flush()
            except Exception:  # never let the reporter die: the next interval tries again
                logger.exception("refusal report failed")

    async def flush(self) -> int:
        """Send what was counted so far; returns the number of batches sent. Failed batches
        are dropped and counted, never kept for later."""
        counts = self.aggregator.take()
        if not counts:
            return 0
        items = sorted(counts.items())
        size = self.settings.max_entries
        sent = 0
        chunks = [items[start : start + size] for start in range(0, len(items), size)]
        for index, chunk in enumerate(chunks):
            if await self._post(chunk):
                sent += 1
                continue
            # The control plane did not take one: the rest of this round is dropped untried, so
            # an outage costs one timeout per interval, not one per batch.
            for rest in chunks[index + 1 :]:
                self._dropped(rest, "not sent after a failed batch")
            break
        return sent

    def _dropped(self, chunk: list[tuple[Key, int]], why: str) -> None:
        total = sum(count for _, count in chunk)
        self.failed_batches += 1
        self.dropped_refusals += total
        logger.warning(
            "refusal report dropped",
            extra={"reason": why, "refusals": total, "entries": len(chunk)},
        )

    async def _post(self, chunk: list[tuple[Key, int]]) -> bool:
        body = {
            "instanceId": self.instance_id,
            "batchId": uuid.uuid4().hex,
            "entries": [
                {"minute": minute, "reason": reason, "address": address, "count": count}
                for (minute, reason, address), count in chunk
            ],
        }
        try:
            response = await self._client.post(
                self.url,
                content=json.dumps(body, separators=(",", ":")).encode(),
                headers={
                    "authorization": f"Bearer {self.settings.key}",
                    "content-type": "application/json",
                },
            )
            ok = response.status_code == 202
            why = f"HTTP {response.status_code}"
        except Exception as exc:  # unreachable, timed out, reset: the batch is dropped
            ok, why = False, type(exc).__name__
        if ok:
            self.sent_batches += 1
            self.sent_refusals += sum(count for _, count in chunk)
            return True
        self._dropped(chunk, why)
        return False
