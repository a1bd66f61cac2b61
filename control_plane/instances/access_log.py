"""The access log per Room (issue 15, item 4): who opened it, what changed in its membership, and
what its runtime refused.

What is written, and where:

- ``launch`` — a runtime token granted to the owner or a member (``POST .../runtime-token``);
  ``refresh`` — a runtime token renewed from the Room UI (``POST .../refresh-token``, written
  after the answer has gone out: the refresh is the hottest path and stays one read).
  Each with who, when, the coarse location and the user agent.
- ``member_invited``, ``member_joined``, ``member_removed``, ``member_left``,
  ``invitation_declined`` — membership changes (the lifecycle trail in ``instance_events`` keeps
  its own lines, as before). The location and user agent are recorded only when the person
  concerned acted themselves, so a member never sees where their owner was.
- ``refused`` — what the runtime refused (bad, expired or foreign tokens, disallowed origins,
  rate limits), reported in batches with the instance's own report key and aggregated here per
  minute, reason and address (:func:`ingest`).

Coarse location: there is no GeoIP database, so the log says what the address itself says —
its network, the /24 of an IPv4 address or the /48 of an IPv6 one (never the address) — plus the
edge region of Fly's proxy (``Fly-Region``) when the control plane is configured to trust Fly's
headers (``TRUST_FLY_CLIENT_IP``): the region nearest the client, not their country. Refusals
keep the address as the runtime's limiter keyed it (IPv6 by /64): they are attempts against the
owner's Room, and the address is what an owner would block.

The owner sees every entry; a member only the entries about themselves. Entries older than
``ACCESS_LOG_RETENTION_DAYS`` are deleted by :func:`prune` (the reconciler's pass).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import Request
from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.errors import (
    InvalidReport,
    InvalidReportCredential,
    ReportInstanceMismatch,
    ReportReplayed,
    ReportTooOld,
)
from control_plane.instances.models import AccessLogEntry, AccessReportBatch
from control_plane.settings import Settings
from control_plane.throttle import client_address

__all__ = [
    "CATEGORIES",
    "KINDS",
    "MAX_REPORT_BYTES",
    "MAX_REPORT_ENTRIES",
    "REPORT_KEY_ENV",
    "ClientInfo",
    "Report",
    "check_report_key",
    "client_info",
    "coarse_network",
    "ingest",
    "page",
    "parse_report",
    "prune",
    "record",
    "record_later",
    "report_key",
    "to_csv",
]

logger = logging.getLogger(__name__)

#: The runtime's environment variable for its report key (room_cloud_runtime/_refusal_reports.py).
REPORT_KEY_ENV = "QUOROOM_CLOUD_REPORT_KEY"
_KEY_CONTEXT = b"quoroom-access-report-key:v1:"

LAUNCH, REFRESH, REFUSED = "launch", "refresh", "refused"
MEMBER_KINDS = (
    "member_invited",
    "member_joined",
    "member_removed",
    "member_left",
    "invitation_declined",
)
KINDS = (LAUNCH, REFRESH, *MEMBER_KINDS, REFUSED)
#: The page's and the API's filter: a category is a set of kinds.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "access": (LAUNCH, REFRESH),
    "members": MEMBER_KINDS,
    "refused": (REFUSED,),
}

# Reports (the runtime sends at most 300 entries, ~35 KiB at the longest values).
MAX_REPORT_BYTES = 48 * 1024
MAX_REPORT_ENTRIES = 500
MAX_REPORT_COUNT = 1_000_000
#: A report's minutes must be this recent: the runtime sends every 30 s and never resends, so an
#: older minute is a replay of a batch whose id has been forgotten (ids are kept a day).
MAX_REPORT_AGE = timedelta(hours=2)
MAX_REPORT_SKEW = timedelta(minutes=5)
BATCH_ID_TTL = timedelta(days=1)
_BATCH_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_REASON = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_ADDRESS = re.compile(r"^[0-9A-Za-z.:/*_%-]{1,64}$")
_REGION = re.compile(r"^[a-z0-9]{2,8}$")
MAX_USER_AGENT = 256

PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
MAX_EXPORT_ROWS = 10_000
_PRUNE_CHUNK = 5_000


# -- the report key ------------------------------------------------------------------------------


def _derive(kek: bytes, instance_id: str) -> str:
    mac = hmac.new(kek, _KEY_CONTEXT + instance_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def report_key(settings: Settings, instance_id: str) -> str:
    """The instance's report key: an HMAC of its id under the first key-encryption key. Nothing
    is stored; the provisioning worker hands it to the runtime as an app secret."""
    return _derive(settings.key_encryption_keys()[0], instance_id)


def check_report_key(settings: Settings, instance_id: str, presented: str | None) -> None:
    """Raise :class:`InvalidReportCredential` unless ``presented`` is ``instance_id``'s key under
    any configured KEK (so rotating the KEKs does not cut off runtimes provisioned before)."""
    if not presented or len(presented) > 128:
        raise InvalidReportCredential()
    given = presented.encode()
    ok = False
    for kek in settings.key_encryption_keys():
        ok |= hmac.compare_digest(given, _derive(kek, instance_id).encode())
    if not ok:
        raise InvalidReportCredential()


# -- who and where -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientInfo:
    network: str | None
    region: str | None
    user_agent: str | None


NO_CLIENT = ClientInfo(None, None, None)


def coarse_network(address: str | None) -> str | None:
    """The /24 of an IPv4 address, the /48 of an IPv6 address or network; ``None`` otherwise."""
    if not address:
        return None
    try:
        if "/" in address:
            net = ipaddress.ip_network(address, strict=False)
            head = net.network_address
        else:
            head = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(head, ipaddress.IPv6Address) and head.ipv4_mapped is not None:
        head = head.ipv4_mapped
    prefix = 24 if head.version == 4 else 48
    return str(ipaddress.ip_network(f"{head}/{prefix}", strict=False))


def client_info(request: Request, settings: Settings) -> ClientInfo:
    """The coarse location and user agent of ``request`` (see the module docstring)."""
    region = None
    if settings.trust_fly_client_ip:
        raw = (request.headers.get("fly-region") or "").strip().lower()
        region = raw if _REGION.match(raw) else None
    agent = request.headers.get("user-agent")
    if agent is not None:
        agent = "".join(ch for ch in agent if ch.isprintable())[:MAX_USER_AGENT] or None
    return ClientInfo(coarse_network(client_address(request, settings)), region, agent)


# -- writing -------------------------------------------------------------------------------------


async def record(
    db: AsyncSession,
    instance_id: str,
    kind: str,
    *,
    now: datetime,
    user_id: str | None = None,
    email: str | None = None,
    info: ClientInfo = NO_CLIENT,
) -> None:
    """One entry, in the caller's transaction."""
    assert kind in KINDS and kind != REFUSED
    db.add(
        AccessLogEntry(
            instance_id=instance_id,
            kind=kind,
            at=now,
            user_id=user_id,
            email=email,
            network=info.network,
            region=info.region,
            user_agent=info.user_agent,
            count=1,
        )
    )


async def record_later(
    factory: async_sessionmaker[AsyncSession],
    instance_id: str,
    kind: str,
    *,
    now: datetime,
    user_id: str,
    email: str | None,
    info: ClientInfo,
) -> None:
    """One entry in a transaction of its own (a background task after the answer). A failure is
    logged, never raised: the access log must not fail the request it describes."""
    try:
        async with factory() as db:
            await record(db, instance_id, kind, now=now, user_id=user_id, email=email, info=info)
            await db.commit()
    except Exception:
        logger.exception("access log: %s entry for %s not written", kind, instance_id)


# -- refusal reports -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Report:
    batch_id: str
    #: ``(minute, reason, address) -> count``, duplicates already summed.
    entries: dict[tuple[datetime, str, str], int]


def parse_report(raw: bytes, *, instance_id: str, now: datetime) -> Report:
    """A report body checked field by field; raises :class:`InvalidReport` (422, naming the
    field), :class:`ReportInstanceMismatch` (403) or :class:`ReportTooOld` (422)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidReport("the report is not JSON") from exc
    if not isinstance(body, dict):
        raise InvalidReport("the report must be a JSON object")
    if body.get("instanceId") != instance_id:
        raise ReportInstanceMismatch()
    batch_id = body.get("batchId")
    if not isinstance(batch_id, str) or not _BATCH_ID.match(batch_id):
        raise InvalidReport("batchId: 8 to 64 letters, digits, '-' or '_'")
    items = body.get("entries")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_REPORT_ENTRIES:
        raise InvalidReport(f"entries: a list of 1 to {MAX_REPORT_ENTRIES} entries")
    oldest, newest = now - MAX_REPORT_AGE, now + MAX_REPORT_SKEW
    entries: dict[tuple[datetime, str, str], int] = {}
    for index, item in enumerate(items):
        where = f"entries[{index}]"
        if not isinstance(item, dict):
            raise InvalidReport(f"{where}: must be an object")
        minute, reason = item.get("minute"), item.get("reason")
        address, count = item.get("address"), item.get("count")
        if type(minute) is not int or minute % 60 or not 0 < minute < 2**40:
            raise InvalidReport(f"{where}.minute: a Unix time on a whole minute")
        if not isinstance(reason, str) or not _REASON.match(reason):
            raise InvalidReport(f"{where}.reason: a lower-case code")
        if not isinstance(address, str) or not _ADDRESS.match(address):
            raise InvalidReport(f"{where}.address: an address of at most 64 characters")
        if type(count) is not int or not 1 <= count <= MAX_REPORT_COUNT:
            raise InvalidReport(f"{where}.count: 1 to {MAX_REPORT_COUNT}")
        at = datetime.fromtimestamp(minute, tz=UTC)
        if at > newest:
            raise InvalidReport(f"{where}.minute: in the future")
        if at < oldest:
            raise ReportTooOld()
        key = (at, reason, address)
        entries[key] = min(entries.get(key, 0) + count, MAX_REPORT_COUNT)
    return Report(batch_id, entries)


async def ingest(db: AsyncSession, instance_id: str, report: Report, *, now: datetime) -> int:
    """Record ``report`` once (:class:`ReportReplayed` for a batch id seen before) and add its
    counts to the per-minute refusal rows. The caller commits."""
    try:
        async with db.begin_nested():
            db.add(
                AccessReportBatch(
                    instance_id=instance_id, batch_id=report.batch_id, received_at=now
                )
            )
    except IntegrityError as exc:
        raise ReportReplayed() from exc
    rows = [
        {
            "instance_id": instance_id,
            "kind": REFUSED,
            "at": at,
            "reason": reason,
            "address": address,
            "network": coarse_network(address),
            "count": count,
        }
        for (at, reason, address), count in report.entries.items()
    ]
    await db.execute(upsert_refusals(db.get_bind().dialect.name, rows))
    return sum(report.entries.values())


def upsert_refusals(dialect: str, rows: list[dict[str, Any]]) -> Any:
    """One ``INSERT … ON CONFLICT (the refusal key) DO UPDATE SET count = count + excluded.count``
    (PostgreSQL and SQLite spell it the same)."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(AccessLogEntry).values(rows)
    return stmt.on_conflict_do_update(
        index_elements=["instance_id", "kind", "at", "reason", "address"],
        set_={"count": AccessLogEntry.count + stmt.excluded.count},
    )


# -- reading -------------------------------------------------------------------------------------


def _query(instance_id: str, *, user_id: str | None, category: str | None) -> Any:
    query = select(AccessLogEntry).where(AccessLogEntry.instance_id == instance_id)
    if user_id is not None:  # a member: their own entries only
        query = query.where(AccessLogEntry.user_id == user_id)
    if category is not None:
        query = query.where(AccessLogEntry.kind.in_(CATEGORIES[category]))
    return query


async def page(
    db: AsyncSession,
    instance_id: str,
    *,
    user_id: str | None,
    category: str | None = None,
    before: int | None = None,
    limit: int = PAGE_SIZE,
) -> tuple[list[AccessLogEntry], int | None]:
    """Newest first, ``limit`` entries older than the ``before`` cursor (an entry id), and the
    cursor of the next page (``None``: this was the last). ``user_id``: a member's own only."""
    query = _query(instance_id, user_id=user_id, category=category)
    if before is not None:
        query = query.where(AccessLogEntry.id < before)
    rows = list(await db.scalars(query.order_by(AccessLogEntry.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more and rows else None)


async def export_rows(
    db: AsyncSession, instance_id: str, *, user_id: str | None, category: str | None
) -> tuple[list[AccessLogEntry], bool]:
    """At most :data:`MAX_EXPORT_ROWS` entries, newest first, and whether there were more."""
    query = _query(instance_id, user_id=user_id, category=category)
    rows = list(
        await db.scalars(query.order_by(AccessLogEntry.id.desc()).limit(MAX_EXPORT_ROWS + 1))
    )
    return rows[:MAX_EXPORT_ROWS], len(rows) > MAX_EXPORT_ROWS


CSV_COLUMNS = (
    "time",
    "kind",
    "who",
    "network",
    "region",
    "user_agent",
    "reason",
    "address",
    "count",
)
# A cell a spreadsheet would read as a formula (OWASP "CSV injection"): prefixed with "'".
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def to_csv(rows: Iterable[AccessLogEntry]) -> str:
    """RFC 4180 CSV (quoted where needed, CRLF line ends), formula-looking cells neutralised."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(
            [
                _cell(value)
                for value in (
                    row.at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
                    row.kind,
                    row.email,
                    row.network,
                    row.region,
                    row.user_agent,
                    row.reason,
                    row.address,
                    row.count,
                )
            ]
        )
    return out.getvalue()


# -- retention -----------------------------------------------------------------------------------


async def prune(
    factory: async_sessionmaker[AsyncSession], *, now: datetime, retention_days: int
) -> int:
    """Delete entries older than ``retention_days`` (in chunks, each its own transaction) and
    batch ids older than a day. Returns how many entries went."""
    cutoff = now - timedelta(days=retention_days)
    removed = 0
    while True:
        async with factory() as db:
            ids: Sequence[int] = (
                await db.scalars(
                    select(AccessLogEntry.id).where(AccessLogEntry.at < cutoff).limit(_PRUNE_CHUNK)
                )
            ).all()
            if ids:
                await db.execute(
                    delete(AccessLogEntry)
                    .where(AccessLogEntry.id.in_(ids))
                    .execution_options(synchronize_session=False)
                )
                await db.commit()
        removed += len(ids)
        if len(ids) < _PRUNE_CHUNK:
            break
    async with factory() as db:
        await db.execute(
            delete(AccessReportBatch)
            .where(AccessReportBatch.received_at < now - BATCH_ID_TTL)
            .execution_options(synchronize_session=False)
        )
        await db.commit()
    return removed
