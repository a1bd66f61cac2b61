"""The access log per Room (issue 15, item 4): launches and refreshes, membership changes and the
refusals a runtime reports, as the owner sees them (and a member, their own only), exported as
CSV, pruned past the retention; and every bad report refused with its own code."""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import func, select

from control_plane.instances import access_log
from control_plane.instances.access_log import coarse_network, report_key
from control_plane.instances.models import AccessLogEntry, AccessReportBatch
from control_plane.provisioning.fly import check_secret_names
from control_plane.provisioning.provider import ProviderError
from control_plane.settings import Settings
from room_cloud_runtime import RuntimeSettings, RuntimeStack
from room_cloud_runtime.reference import create_room_app
from tests.control_plane.conftest import PUBLIC_URL
from tests.control_plane.instances.helpers import RUNTIME_URL, Cloud, User

UA = "Mozilla/5.0 (X11; Linux x86_64) Test/1.0"


def _url(instance_id: str, tail: str) -> str:
    return f"/api/cloud/instances/{instance_id}/{tail}"


def _from(cloud: Cloud, address: str) -> httpx.AsyncClient:
    """A client of the same app that comes from ``address``."""
    transport = httpx.ASGITransport(app=cloud.h.app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url=PUBLIC_URL)


async def _log(cloud: Cloud, user: User, instance_id: str, **params: Any) -> dict[str, Any]:
    r = await cloud.client.get(_url(instance_id, "access-log"), headers=user.headers, params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _kinds(body: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in body["entries"]]


async def _owner_member(cloud: Cloud) -> tuple[User, User, str]:
    owner = await cloud.user("owner@example.com")
    member = await cloud.user("member@example.com")
    instance_id = await cloud.paid_and_running(owner)
    await cloud.invite_and_accept(owner, instance_id, member)
    return owner, member, instance_id


def _report(instance_id: str, entries: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"instanceId": instance_id, "batchId": uuid.uuid4().hex, "entries": entries, **extra}


def _minute(cloud: Cloud, minutes_ago: int = 0) -> int:
    now = int(cloud.h.clock.now.timestamp())
    return now - now % 60 - 60 * minutes_ago


async def _post_report(
    cloud: Cloud, instance_id: str, body: Any, *, key: str | None = None, raw: bytes | None = None
) -> httpx.Response:
    settings: Settings = cloud.h.services.core.settings
    key = key if key is not None else report_key(settings, instance_id)
    content = raw if raw is not None else json.dumps(body).encode()
    return await cloud.client.post(
        _url(instance_id, "access-reports"),
        content=content,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )


async def _launch(cloud: Cloud, user: User, instance_id: str) -> None:
    r = await cloud.client.post(_url(instance_id, "runtime-token"), headers=user.headers)
    assert r.status_code == 200, r.text


# -- launches, refreshes, members ----------------------------------------------------------------


async def test_launches_and_refreshes_say_who_when_where_and_with_what(cloud: Cloud) -> None:
    owner, member, instance_id = await _owner_member(cloud)
    async with _from(cloud, "203.0.113.77") as there:
        r = await there.post(
            _url(instance_id, "runtime-token"), headers={**owner.headers, "user-agent": UA}
        )
        assert r.status_code == 200
        token = r.json()["token"]
        cloud.h.clock.advance(60)
        r = await there.post(
            _url(instance_id, "refresh-token"),
            json={"token": token},
            headers={"origin": RUNTIME_URL, "user-agent": UA},
        )
        assert r.status_code == 200, r.text
    async with _from(cloud, "2001:db8:aa:bb::5") as v6:
        r = await v6.post(_url(instance_id, "runtime-token"), headers=member.headers)
        assert r.status_code == 200
    body = await _log(cloud, owner, instance_id, category="access")
    assert _kinds(body) == ["launch", "refresh", "launch"]
    launch_member, refresh, launch = body["entries"]
    assert launch["who"] == "owner@example.com"
    assert launch["network"] == "203.0.113.0/24"  # the /24, never the address
    assert launch["userAgent"] == UA
    assert refresh["who"] == "owner@example.com" and refresh["network"] == "203.0.113.0/24"
    assert datetime.fromisoformat(refresh["at"]) > datetime.fromisoformat(launch["at"])
    assert launch_member["who"] == "member@example.com"
    assert launch_member["network"] == "2001:db8:aa::/48"
    assert body["retentionDays"] == 90
    assert "203.0.113.77" not in json.dumps(body)


async def test_membership_changes_are_logged(cloud: Cloud) -> None:
    owner, member, instance_id = await _owner_member(cloud)
    other = await cloud.user("other@example.com")
    r = await cloud.client.post(
        _url(instance_id, "members"), json={"email": other.email}, headers=owner.headers
    )
    invitation = r.json()["id"]
    assert (
        await cloud.client.delete(f"/api/cloud/invitations/{invitation}", headers=other.headers)
    ).status_code == 204
    third = await cloud.user("third@example.com")
    third_id = await cloud.invite_and_accept(owner, instance_id, third)
    assert (
        await cloud.client.delete(_url(instance_id, f"members/{third_id}"), headers=owner.headers)
    ).status_code == 204
    members = (await cloud.client.get(_url(instance_id, "members"), headers=owner.headers)).json()
    mine = next(m["id"] for m in members["members"] if m["email"] == member.email)
    assert (
        await cloud.client.delete(_url(instance_id, f"members/{mine}"), headers=member.headers)
    ).status_code == 204
    body = await _log(cloud, owner, instance_id, category="members")
    seen = [(e["kind"], e["who"]) for e in reversed(body["entries"])]
    assert seen == [
        ("member_invited", "member@example.com"),
        ("member_joined", "member@example.com"),
        ("member_invited", "other@example.com"),
        ("invitation_declined", "other@example.com"),
        ("member_invited", "third@example.com"),
        ("member_joined", "third@example.com"),
        ("member_removed", "third@example.com"),
        ("member_left", "member@example.com"),
    ]
    by_kind = {e["kind"]: e for e in body["entries"]}
    # Where from only when the person concerned acted: the owner's removal carries nothing.
    assert by_kind["member_removed"]["network"] is None
    assert by_kind["member_removed"]["userAgent"] is None
    assert by_kind["member_left"]["network"] is not None


async def test_a_member_sees_only_their_own_entries(cloud: Cloud) -> None:
    owner, member, instance_id = await _owner_member(cloud)
    await _launch(cloud, owner, instance_id)
    await _launch(cloud, member, instance_id)
    entry = {"minute": _minute(cloud), **_GOOD}
    r = await _post_report(cloud, instance_id, _report(instance_id, [entry]))
    assert r.status_code == 202, r.text
    mine = await _log(cloud, member, instance_id)
    assert {e["who"] for e in mine["entries"]} == {"member@example.com"}
    assert sorted(_kinds(mine)) == ["launch", "member_joined"]
    assert (await _log(cloud, member, instance_id, category="refused"))["entries"] == []
    everything = await _log(cloud, owner, instance_id)
    assert sorted(_kinds(everything)) == [
        "launch", "launch", "member_invited", "member_joined", "refused",
    ]  # fmt: skip
    csv_rows = await _csv(cloud, member, instance_id)
    assert {row["who"] for row in csv_rows} == {"member@example.com"}
    # Someone without access sees nothing at all, not even that the Room exists.
    stranger = await cloud.user("stranger@example.com")
    r = await cloud.client.get(_url(instance_id, "access-log"), headers=stranger.headers)
    assert r.status_code == 404


async def test_the_log_is_paginated_newest_first(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    for _ in range(5):
        await _launch(cloud, owner, instance_id)
    first = await _log(cloud, owner, instance_id, limit=2)
    assert len(first["entries"]) == 2 and first["next"] is not None
    second = await _log(cloud, owner, instance_id, limit=2, before=first["next"])
    third = await _log(cloud, owner, instance_id, limit=2, before=second["next"])
    ids = [e["id"] for page in (first, second, third) for e in page["entries"]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 5
    assert third["next"] is None
    for bad in ({"limit": 0}, {"limit": 1000}, {"before": "x"}, {"category": "secrets"}):
        r = await cloud.client.get(
            _url(instance_id, "access-log"), headers=owner.headers, params=bad
        )
        assert r.status_code == 422 and r.json()["code"] == "invalid_body"


# -- refusal reports -----------------------------------------------------------------------------


async def test_reported_refusals_are_aggregated_per_minute_reason_and_address(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    minute = _minute(cloud, 1)
    entries = [
        {"minute": minute, "reason": "token_expired", "address": "192.0.2.1", "count": 2},
        {"minute": minute, "reason": "rate_limited", "address": "2001:db8:1:2::/64", "count": 40},
    ]
    r = await _post_report(cloud, instance_id, _report(instance_id, entries))
    assert r.status_code == 202 and r.json() == {"ok": True, "accepted": 42}
    again = [{"minute": minute, "reason": "token_expired", "address": "192.0.2.1", "count": 5}]
    assert (await _post_report(cloud, instance_id, _report(instance_id, again))).status_code == 202
    body = await _log(cloud, owner, instance_id, category="refused")
    rows = {(e["reason"], e["address"]): e for e in body["entries"]}
    assert rows[("token_expired", "192.0.2.1")]["count"] == 7
    assert rows[("token_expired", "192.0.2.1")]["network"] == "192.0.2.0/24"
    assert rows[("rate_limited", "2001:db8:1:2::/64")]["count"] == 40
    assert rows[("rate_limited", "2001:db8:1:2::/64")]["network"] == "2001:db8:1::/48"
    at = datetime.fromisoformat(rows[("token_expired", "192.0.2.1")]["at"])
    assert at.timestamp() == minute


async def test_an_oversized_report_is_refused_with_413(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    entry = {
        "minute": _minute(cloud),
        "reason": "token_expired",
        "address": "192.0.2.1",
        "count": 1,
    }
    big = json.dumps(_report(instance_id, [entry], padding="x" * 60_000)).encode()
    r = await _post_report(cloud, instance_id, None, raw=big)
    assert r.status_code == 413 and r.json()["code"] == "report_too_large"

    # Streamed without a Content-Length: counted as it arrives.
    async def chunks() -> Any:
        for _ in range(100):
            yield b" " * 1024

    settings: Settings = cloud.h.services.core.settings
    r = await cloud.client.post(
        _url(instance_id, "access-reports"),
        content=chunks(),
        headers={"authorization": f"Bearer {report_key(settings, instance_id)}"},
    )
    assert r.status_code == 413 and r.json()["code"] == "report_too_large"
    # Too many entries, each fine.
    many = [dict(entry, address=f"192.0.2.{i % 250}", reason=f"r{i}") for i in range(501)]
    r = await _post_report(cloud, instance_id, _report(instance_id, many))
    assert r.status_code in (413, 422)
    assert r.json()["code"] in ("report_too_large", "invalid_report")


async def test_a_report_with_another_instances_key_or_for_another_instance_is_refused(
    cloud: Cloud,
) -> None:
    owner = await cloud.user("owner@example.com")
    a = await cloud.paid_and_running(owner)
    b = await cloud.paid_and_running(owner)
    settings: Settings = cloud.h.services.core.settings
    entry = {
        "minute": _minute(cloud),
        "reason": "token_expired",
        "address": "192.0.2.1",
        "count": 1,
    }
    # A's key, posting to B's endpoint (about B).
    r = await _post_report(cloud, b, _report(b, [entry]), key=report_key(settings, a))
    assert r.status_code == 401 and r.json()["code"] == "invalid_report_credential"
    # A's key at A's endpoint, with a body about B.
    r = await _post_report(cloud, a, _report(b, [entry]))
    assert r.status_code == 403 and r.json()["code"] == "report_wrong_instance"
    # No key, a wrong scheme, a made-up key.
    for headers in ({}, {"authorization": "Basic eDp5"}, {"authorization": "Bearer " + "A" * 43}):
        r = await cloud.client.post(
            _url(a, "access-reports"), json=_report(a, [entry]), headers=headers
        )
        assert r.status_code == 401 and r.json()["code"] == "invalid_report_credential"
    # An instance that does not exist, with the key derived for that id.
    r = await _post_report(cloud, "no-such-instance", _report("no-such-instance", [entry]))
    assert r.status_code == 404
    async with cloud.h.services.core.session_factory() as db:
        refused = select(func.count()).where(AccessLogEntry.kind == "refused")
        assert await db.scalar(refused.select_from(AccessLogEntry)) == 0


async def test_a_replayed_report_is_refused_and_counted_once(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    entry = {
        "minute": _minute(cloud),
        "reason": "token_expired",
        "address": "192.0.2.1",
        "count": 4,
    }
    report = _report(instance_id, [entry])
    assert (await _post_report(cloud, instance_id, report)).status_code == 202
    r = await _post_report(cloud, instance_id, report)
    assert r.status_code == 409 and r.json()["code"] == "report_replayed"
    body = await _log(cloud, owner, instance_id, category="refused")
    assert [e["count"] for e in body["entries"]] == [4]
    # Once its id is forgotten (a day), its minutes are too old to be taken again.
    cloud.h.clock.advance(3 * 3600)
    r = await _post_report(cloud, instance_id, report)
    assert r.status_code == 422 and r.json()["code"] == "report_too_old"


_GOOD = {"reason": "token_expired", "address": "192.0.2.1", "count": 1}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (b"not json", "JSON"),
        (b"[]", "object"),
        ({"batchId": "x"}, "batchId"),
        ({"entries": []}, "entries"),
        ({"entries": [1]}, "entries[0]"),
        ({"entry": {"minute": 61}}, "minute"),
        ({"entry": {"minute": "soon"}}, "minute"),
        ({"entry": {"reason": "Bad Reason"}}, "reason"),
        ({"entry": {"address": "a b"}}, "address"),
        ({"entry": {"address": "x" * 65}}, "address"),
        ({"entry": {"count": 0}}, "count"),
        ({"entry": {"count": True}}, "count"),
        ({"entry": {"minute": "FUTURE"}}, "future"),
    ],
)
async def test_a_malformed_report_is_refused_naming_what_is_wrong(
    cloud: Cloud, change: bytes | dict[str, Any], field: str
) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    if isinstance(change, bytes):
        r = await _post_report(cloud, instance_id, None, raw=change)
    else:
        entry = {"minute": _minute(cloud), **_GOOD, **change.pop("entry", {})}
        if entry["minute"] == "FUTURE":
            entry["minute"] = _minute(cloud) + 3600
        r = await _post_report(cloud, instance_id, {**_report(instance_id, [entry]), **change})
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_report"
    assert field in r.json()["error"]


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_refusals_are_added_to_the_row_of_their_minute_on_either_database(dialect: str) -> None:
    from sqlalchemy.dialects import postgresql, sqlite

    rows = [
        {
            "instance_id": "i",
            "kind": "refused",
            "at": datetime(2026, 12, 6, tzinfo=UTC),
            "reason": "token_expired",
            "address": "192.0.2.1",
            "network": "192.0.2.0/24",
            "count": 2,
        }
    ]
    statement = access_log.upsert_refusals(dialect, rows)
    sql = str(
        statement.compile(dialect=(postgresql if dialect == "postgresql" else sqlite).dialect())
    )
    assert "ON CONFLICT (instance_id, kind, at, reason, address) DO UPDATE" in sql
    assert "count = (access_log_entries.count + excluded.count)" in sql


# -- CSV -----------------------------------------------------------------------------------------


async def _csv(cloud: Cloud, user: User, instance_id: str) -> list[dict[str, str]]:
    r = await cloud.client.get(_url(instance_id, "access-log.csv"), headers=user.headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/csv; charset=utf-8"
    assert r.headers["content-disposition"].startswith("attachment;")
    return list(csv.DictReader(io.StringIO(r.text)))


async def test_the_csv_export_escapes_and_neutralises_formulas(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    nasty = [
        'Agent "quoted", with comma',
        '=HYPERLINK("http://evil","click")',
        "+1+2",
        "-2+3",
        "@SUM(A1)",
    ]
    for agent in nasty:
        r = await cloud.client.post(
            _url(instance_id, "runtime-token"), headers={**owner.headers, "user-agent": agent}
        )
        assert r.status_code == 200
    r = await cloud.client.get(_url(instance_id, "access-log.csv"), headers=owner.headers)
    text = r.text
    assert text.splitlines()[0] == "time,kind,who,network,region,user_agent,reason,address,count"
    assert '"Agent ""quoted"", with comma"' in text  # RFC 4180 quoting
    assert "\r\n" in text
    rows = await _csv(cloud, owner, instance_id)
    agents = [row["user_agent"] for row in rows]
    assert agents == [
        "'@SUM(A1)",
        "'-2+3",
        "'+1+2",
        '\'=HYPERLINK("http://evil","click")',
        'Agent "quoted", with comma',
    ]
    assert all(row["kind"] == "launch" and row["who"] == owner.email for row in rows)
    assert all(row["time"].endswith("Z") for row in rows)


def test_cells_that_look_like_formulas_are_prefixed() -> None:
    row = AccessLogEntry(
        id=1,
        instance_id="i",
        kind="refused",
        at=datetime(2026, 12, 6, tzinfo=UTC),
        reason="=cmd|' /C calc'!A0",
        address="-1",
        email="@evil",
        user_agent="\tTAB",
        count=3,
    )
    out = list(csv.reader(io.StringIO(access_log.to_csv([row]))))
    assert out[1] == [
        "2026-12-06T00:00:00Z", "refused", "'@evil", "", "", "'\tTAB", "'=cmd|' /C calc'!A0",
        "'-1", "3",
    ]  # fmt: skip


# -- retention -----------------------------------------------------------------------------------


async def test_entries_past_the_retention_are_pruned(cloud: Cloud) -> None:
    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    await _launch(cloud, owner, instance_id)
    entry = {
        "minute": _minute(cloud),
        "reason": "token_expired",
        "address": "192.0.2.1",
        "count": 1,
    }
    assert (
        await _post_report(cloud, instance_id, _report(instance_id, [entry]))
    ).status_code == 202
    factory = cloud.h.services.core.session_factory
    now = cloud.h.clock.now
    async with factory() as db:  # an old entry, and one just inside the retention
        for days in (91, 89):
            db.add(
                AccessLogEntry(
                    instance_id=instance_id, kind="launch", at=now - timedelta(days=days), count=1
                )
            )
        await db.commit()
    removed = await access_log.prune(factory, now=now, retention_days=90)
    assert removed == 1
    async with factory() as db:
        ats = (await db.scalars(select(AccessLogEntry.at))).all()
        assert all(at > now - timedelta(days=90) for at in ats) and len(ats) == 3
        assert await db.scalar(select(func.count()).select_from(AccessReportBatch)) == 1
    # The batch ids go after a day; the entries after the retention, as the reconciler runs it.
    from control_plane.provisioning.reconciler import Reconciler

    settings: Settings = cloud.h.services.core.settings
    later = now + timedelta(days=2)
    reconciler = Reconciler(
        settings.model_copy(update={"access_log_retention_days": 1}),
        factory,
        provider=cast(Any, None),  # the prune step touches no provider
        clock=lambda: later,
    )
    await reconciler.prune_access_log()
    async with factory() as db:
        assert await db.scalar(select(func.count()).select_from(AccessLogEntry)) == 0
        assert await db.scalar(select(func.count()).select_from(AccessReportBatch)) == 0


def test_the_retention_setting_is_validated(make_settings: Any) -> None:
    assert make_settings(access_log_retention_days=30).access_log_retention_days == 30
    for bad in (0, -1, 4000):
        with pytest.raises(ValidationError, match="access_log_retention_days"):
            make_settings(access_log_retention_days=bad)


# -- the report key ------------------------------------------------------------------------------


def test_the_report_key_is_per_instance_and_survives_a_kek_rotation(make_settings: Any) -> None:
    import base64

    settings: Settings = make_settings()
    a, b = report_key(settings, "inst-a"), report_key(settings, "inst-b")
    assert a != b and len(a) >= 43
    access_log.check_report_key(settings, "inst-a", a)
    new_kek = base64.urlsafe_b64encode(b"n" * 32).decode()
    old_kek = settings.key_encryption_key.get_secret_value()  # type: ignore[union-attr]
    rotated: Settings = make_settings(key_encryption_key=f"{new_kek},{old_kek}")
    assert report_key(rotated, "inst-a") != a
    access_log.check_report_key(rotated, "inst-a", a)  # a runtime provisioned before still reports


def test_the_report_key_may_be_set_as_a_secret_but_no_owner_credential_may_take_its_name() -> None:
    check_secret_names({access_log.REPORT_KEY_ENV: "x", "OPENAI_API_KEY": "y"})
    with pytest.raises(ProviderError):
        check_secret_names({"QUOROOM_CLOUD_ISSUER": "https://evil"})
    from room_cloud_runtime._refusal_reports import REPORT_KEY_ENV

    assert access_log.REPORT_KEY_ENV == REPORT_KEY_ENV


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("203.0.113.77", "203.0.113.0/24"),
        ("2001:db8:aa:bb::5", "2001:db8:aa::/48"),
        ("2001:db8:1:2::/64", "2001:db8:1::/48"),
        ("::ffff:198.51.100.3", "198.51.100.0/24"),
        ("unknown", None),
        ("*", None),
        (None, None),
    ],
)
def test_the_coarse_location_is_the_network(address: str | None, network: str | None) -> None:
    assert coarse_network(address) == network


# -- end to end ----------------------------------------------------------------------------------


async def test_a_runtime_refusal_reaches_the_owners_access_log(cloud: Cloud) -> None:
    """A real runtime stack (the reference Room, in-process) configured as the worker configures
    it: it refuses a bad token, reports it with its instance's key, and the owner sees it."""
    from room_cloud_runtime._refusal_reports import ReportSettings

    owner = await cloud.user("owner@example.com")
    instance_id = await cloud.paid_and_running(owner)
    settings: Settings = cloud.h.services.core.settings
    runtime_settings = RuntimeSettings(
        mode="cloud",
        instance_id=instance_id,
        issuer=PUBLIC_URL,
        allowed_origins=(RUNTIME_URL,),
        access_log=False,
        reports=ReportSettings(key=report_key(settings, instance_id), interval_seconds=3600),
    )
    stack = RuntimeStack(create_room_app(), runtime_settings)
    assert stack.reports is not None
    stack.reports._transport = httpx.ASGITransport(app=cloud.h.app)
    stack.reports.aggregator.clock = lambda: cloud.h.clock.now.timestamp()
    transport = httpx.ASGITransport(app=stack, client=("198.51.100.20", 40000))
    async with (
        stack.running(),
        httpx.AsyncClient(transport=transport, base_url=RUNTIME_URL) as room,
    ):
        for _ in range(3):
            r = await room.get("/api/rooms", headers={"authorization": "Bearer bad.token.here"})
            assert r.status_code == 401
        r = await room.get("/api/rooms", headers={"origin": "https://evil.example"})
        assert r.status_code == 403
        assert await stack.reports.flush() == 1
    assert stack.reports.status()["droppedRefusals"] == 0
    body = await _log(cloud, owner, instance_id, category="refused")
    rows = {(e["reason"], e["address"]): e["count"] for e in body["entries"]}
    assert rows == {
        ("token_malformed", "198.51.100.20"): 3,
        ("origin_not_allowed", "198.51.100.20"): 1,
    }
