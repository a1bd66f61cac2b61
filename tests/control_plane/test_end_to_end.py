"""Issue 4, end to end, as a user does it, over real HTTP only.

The control plane runs under uvicorn on a loopback port that is also its PUBLIC_URL (the issuer
the runtime fetches the JWKS from), with Stripe pointed at the loopback FakeStripe and the
in-process provisioning worker on the ``local`` provider (a real ``quoroom-runtime serve``
subprocess per instance).

sign up → open the verification link → sign in (bearer) → create an instance (tier and region
from the catalog) → pay (signed ``checkout.session.completed``, delivered three times) → the
worker provisions → ``running`` → runtime token → the runtime says ``owner`` and takes a write;
a member invited before signing up accepts the mailed invitation once signed up and verified, and
gets a member token the runtime refuses a write (403) and allows a vote (one invited after signing
up accepts in the app); the member token refreshes from the runtime's
origin; a removed member gets neither a refresh nor a token; cancel → the runtime stops and the
instance waits out its retention in ``destroying``; a second room paid on the hosted page
(FakeStripe delivers the webhook itself) is still running at shutdown, and shutdown stops it.
Runs on SQLite, and on PostgreSQL with QUOROOM_TEST_DATABASE_URL.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn

from control_plane.app import create_app
from control_plane.provisioning.local import _pid_running
from control_plane.provisioning.provider import app_name
from control_plane.settings import Settings
from tests.control_plane.conftest import PASSWORD, RecordingTransport
from tests.fakes.stripe_api import (
    DEFAULT_SECRET_KEY,
    DEFAULT_WEBHOOK_SECRET,
    FakeStripe,
    adeliver,
)

pytestmark = pytest.mark.slow

WEBHOOK_PATH = "/api/billing/stripe/webhook"
#: Bounds, generous against the targets (payment → running ≤ 3 s) so a loaded CI box passes.
RUNNING_WITHIN = 30.0
STOPPED_WITHIN = 20.0
_GENEROUS = "1000/minute"


# -- the control plane on a real loopback port ---------------------------------------------------


@contextmanager
def control_plane(build: Callable[[str], Settings], outbox: RecordingTransport) -> Iterator[str]:
    """Serve the app under uvicorn on 127.0.0.1 with PUBLIC_URL set to its own address.

    The socket is bound before the settings are built (the port is part of the issuer), then
    handed to uvicorn: no window in which another process could take the port. On exit the
    lifespan shutdown has finished (the worker and the runtimes it started are stopped).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = create_app(build(base_url), mail_transport=outbox)
    config = uvicorn.Config(
        app, lifespan="on", ws="none", http="h11", log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="control-plane", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 30
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the control plane did not start")
            time.sleep(0.01)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
        assert not thread.is_alive(), "the control plane did not shut down"


# -- a user's view --------------------------------------------------------------------------------


@dataclass
class Account:
    email: str
    headers: dict[str, str]
    user_id: str


async def eventually(
    probe: Callable[[], Awaitable[Any]], *, within: float, every: float = 0.02, what: str
) -> Any:
    """``probe()``'s first truthy answer, polling until ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"{what}: not within {within:g}s (last: {last!r})")


async def sign_up_and_verify(
    client: httpx.AsyncClient, outbox: RecordingTransport, base_url: str, email: str
) -> None:
    r = await client.post("/api/auth/signup", json={"email": email, "password": PASSWORD})
    assert r.status_code == 202, r.text

    async def mailed() -> str | None:
        links = [m.link for m in outbox.to(email) if m.link and "/verify-email#token=" in m.link]
        return links[-1] if links else None

    link: str = await eventually(mailed, within=10, what=f"the verification mail to {email}")
    # The link opens the control plane's page; its script posts the token from the fragment.
    assert link.startswith(f"{base_url}/"), link
    page, token = link.split("#token=", 1)
    assert (await client.get(page)).status_code == 200
    r = await client.post("/api/auth/verify-email", json={"token": token})
    assert r.status_code == 200, r.text


async def sign_in(client: httpx.AsyncClient, email: str) -> Account:
    r = await client.post(
        "/api/auth/login", json={"email": email, "password": PASSWORD, "transport": "body"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    return Account(email, {"Authorization": f"Bearer {body['access_token']}"}, body["user"]["id"])


async def runtime_token(
    client: httpx.AsyncClient, account: Account, instance_id: str
) -> httpx.Response:
    return await client.post(
        f"/api/cloud/instances/{instance_id}/runtime-token", headers=account.headers
    )


def runtime_state(var_dir: Path, instance_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (var_dir / "instances" / instance_id / "runtime.json").read_text()
    )
    return data


def listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def print_trail(trail: list[tuple[str, str | None, str | None, str]]) -> None:
    for kind, frm, to, message in trail:
        print(f"[e2e]     {kind:<10} {frm or '-':>16} → {to or '-':<16} {message}")


def _breakdown(events: list[dict[str, Any]]) -> str:
    """Payment recorded → runtime spawned (control plane) → healthy and ``running`` (runtime
    start-up, health polling and the final write), from the events' own timestamps."""

    def at(match: Callable[[dict[str, Any]], bool]) -> datetime:
        return datetime.fromisoformat(next(e for e in events if match(e))["at"])

    paid = at(lambda e: e["to"] == "provisioning")
    spawned = at(lambda e: e["kind"] == "step" and e["message"].startswith("machine "))
    running = at(lambda e: e["to"] == "running")
    return (
        f"paid → runtime spawned {(spawned - paid).total_seconds():.3f} s, "
        f"spawned → running {(running - spawned).total_seconds():.3f} s, "
        f"paid → running {(running - paid).total_seconds():.3f} s"
    )


def runtimes_under(root: Path) -> list[int]:
    """Live (not zombie) runtime servers whose working directory is under ``root``: the
    ``quoroom-runtime`` processes, less granian's worker under each (a child of its server; a
    worker whose server is gone is listed, as the leftover it is)."""
    found: dict[int, int] = {}  # pid → parent pid
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = os.readlink(proc / "cwd")
            argv = (proc / "cmdline").read_bytes()
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"room_cloud_runtime.cli" in argv and cwd.startswith(str(root)):
            if _pid_running(int(proc.name)):
                found[int(proc.name)] = parent
    return sorted(pid for pid, parent in found.items() if parent not in found)


# -- the test -------------------------------------------------------------------------------------


async def test_sign_up_pay_provision_open_share_and_cancel_over_real_http(
    make_settings: Callable[..., Settings], outbox: RecordingTransport, tmp_path: Path
) -> None:
    var_dir = tmp_path / "var"

    with FakeStripe() as stripe:

        def build(public_url: str) -> Settings:
            stripe.webhook_url = f"{public_url}{WEBHOOK_PATH}"  # the hosted page's deliveries
            return make_settings(
                public_url=public_url,
                var_dir=var_dir,
                provider="local",
                run_worker=True,
                # Only the wake-up after a payment or a cancel makes the worker prompt.
                worker_poll_seconds=60,
                reconcile_seconds=3600,
                runtime_health_timeout_seconds=RUNNING_WITHIN,
                stripe_secret_key=DEFAULT_SECRET_KEY,
                stripe_webhook_secret=DEFAULT_WEBHOOK_SECRET,
                stripe_api_base=stripe.url,
                throttle_signup_address=_GENEROUS,
                throttle_signup_account=_GENEROUS,
                throttle_login_address=_GENEROUS,
                throttle_email_address=_GENEROUS,
            )

        try:
            with control_plane(build, outbox) as base_url:
                async with httpx.AsyncClient(
                    base_url=base_url, timeout=15.0, trust_env=False
                ) as client:
                    await _journey(client, stripe, outbox, base_url, var_dir)
        finally:
            # Shutdown (or a failure) leaves no runtime process behind.
            leftover = runtimes_under(var_dir)
            assert leftover == [], f"runtime processes left after shutdown: {leftover}"


async def _journey(
    client: httpx.AsyncClient,
    stripe: FakeStripe,
    outbox: RecordingTransport,
    base_url: str,
    var_dir: Path,
) -> None:
    owner_email, member_email, late_email = (
        "owner@example.com",
        "member@example.com",
        "late@example.com",
    )

    # -- sign up, verify, sign in --------------------------------------------------------------
    await sign_up_and_verify(client, outbox, base_url, owner_email)
    owner = await sign_in(client, owner_email)

    # -- create: tier and region from the catalog ----------------------------------------------
    catalog = (await client.get("/api/cloud/catalog")).json()
    assert catalog["billingEnabled"] is True
    tier, region = catalog["tiers"][0]["id"], catalog["regions"][0]["id"]
    r = await client.post(
        "/api/cloud/instances",
        json={"name": "Research lab", "tier": tier, "region": region},
        headers={**owner.headers, "Idempotency-Key": "create-research-lab-1"},
    )
    assert r.status_code == 201, r.text
    created = r.json()
    instance_id: str = created["instance"]["id"]
    assert created["instance"]["status"] == "awaiting_payment", created
    checkout_url: str = created["checkout_url"]
    assert checkout_url.startswith(f"{stripe.url}/pay/cs_test_"), checkout_url
    session_id = checkout_url.rsplit("/", 1)[1]
    session = stripe.session(session_id)
    assert session["client_reference_id"] == instance_id
    assert session["metadata"]["instance_id"] == instance_id

    # -- pay: the signed webhook to the control plane's real URL, delivered three times --------
    completed, invoice_paid = stripe.complete_checkout(session_id)
    assert completed["type"] == "checkout.session.completed"
    webhook_url = f"{base_url}{WEBHOOK_PATH}"
    paid_at = time.monotonic()
    first = await adeliver(completed, webhook_url, DEFAULT_WEBHOOK_SECRET)
    assert first.status_code == 200, first.text
    assert not first.json().get("duplicate"), first.json()
    for _ in range(2):  # Stripe redelivers: each effect happens once
        again = await adeliver(completed, webhook_url, DEFAULT_WEBHOOK_SECRET)
        assert again.status_code == 200, again.text
        assert again.json().get("duplicate") is True, again.json()
    r = await adeliver(invoice_paid, webhook_url, DEFAULT_WEBHOOK_SECRET)
    assert r.status_code == 200, r.text

    # -- the worker provisions with the local provider ------------------------------------------
    async def status() -> dict[str, Any]:
        r = await client.get(f"/api/cloud/instances/{instance_id}/status", headers=owner.headers)
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()
        assert data["status"] in ("provisioning", "running"), data
        return data

    async def running() -> dict[str, Any] | None:
        data = await status()
        return data if data["status"] == "running" else None

    state = await eventually(running, within=RUNNING_WITHIN, what="running")
    payment_to_running = time.monotonic() - paid_at
    runtime_url: str = state["url"]
    events = state["events"]
    trail = [(e["kind"], e["from"], e["to"], e["message"]) for e in events]
    # The whole trail, in order; the first invoice's ``invoice.paid`` lands wherever it lands.
    assert trail.count(("billing", None, None, "invoice paid")) == 1, trail
    assert [t for t in trail if t[3] != "invoice paid"] == [
        ("created", None, None, f"{tier} in {region}"),
        ("billing", "draft", "awaiting_payment", "checkout started"),
        # Once: the two duplicate deliveries left no trace.
        ("billing", "awaiting_payment", "provisioning", "payment received (webhook)"),
        ("step", None, None, f"app {app_name(instance_id, 'qr')} ready"),
        ("step", None, None, "0 secret(s) set"),
        ("step", None, None, "volume data ready in local"),
        ("step", None, None, f"machine rt-{instance_id[:8]} created in local"),
        ("transition", "provisioning", "running", f"running at {runtime_url}"),
    ], trail
    assert [s["status"] for s in stripe.subscriptions] == ["active"]  # one subscription

    pid = runtime_state(var_dir, instance_id)["pid"]
    port = urlsplit(runtime_url).port
    assert runtime_url == f"http://127.0.0.1:{port}" and port is not None
    assert _pid_running(pid) and listening(port)
    print(f"\n[e2e] payment → running: {payment_to_running:.3f} s (webhook sent → /status running)")
    print(f"[e2e]   from the event trail: {_breakdown(events)}")
    print_trail(trail)

    # -- open the Room as the owner ------------------------------------------------------------
    origin = {"Origin": runtime_url}  # the Room UI runs on the runtime's origin
    r = await runtime_token(client, owner, instance_id)
    assert r.status_code == 200, r.text
    issued = r.json()
    assert issued["runtime_url"] == runtime_url
    owner_token = {"Authorization": f"Bearer {issued['token']}"}
    async with httpx.AsyncClient(base_url=runtime_url, timeout=15.0, trust_env=False) as room:
        # Refused by the runtime: counted, and reported to the access log (issue 15).
        for _ in range(2):
            r = await room.get("/api/rooms", headers={"Authorization": "Bearer not.a.token"})
            assert r.status_code == 401 and r.json()["code"] == "token_malformed", r.text
        r = await room.get("/api/auth/verify", headers=owner_token)
        assert r.status_code == 200, r.text
        verified = r.json()
        assert verified["ok"] is True and verified["role"] == "owner", verified
        assert verified["profile"]["email"] == owner_email
        assert verified["profile"]["id"] == owner.user_id
        r = await room.post(
            "/api/rooms", json={"name": "Owner's room"}, headers={**owner_token, **origin}
        )
        assert r.status_code == 201, r.text
        assert r.json()["createdBy"] == owner.user_id

        # -- share: a member invited before they have an account ---------------------------
        r = await client.post(
            f"/api/cloud/instances/{instance_id}/members",
            json={"email": member_email},
            headers=owner.headers,
        )
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "pending"
        member_id = r.json()["id"]

        async def invited() -> str | None:
            links = [m.link for m in outbox.to(member_email) if "/accept-invite#" in (m.link or "")]
            return links[-1] if links else None

        invite_link: str = await eventually(invited, within=10, what="the invitation mail")
        await sign_up_and_verify(client, outbox, base_url, member_email)
        member = await sign_in(client, member_email)
        # Signing up made no member: the invitee accepts (the page posts the link's token).
        assert (await client.get("/api/cloud/instances", headers=member.headers)).json() == {
            "instances": []
        }
        page, invite_token = invite_link.split("#token=", 1)
        assert page == f"{base_url}/accept-invite"
        assert (await client.get(page)).status_code == 200
        r = await client.post(
            "/api/cloud/invitations/accept", json={"token": invite_token}, headers=member.headers
        )
        assert r.status_code == 200, r.text
        members = await client.get(
            f"/api/cloud/instances/{instance_id}/members", headers=owner.headers
        )
        assert [(m["email"], m["status"]) for m in members.json()["members"]] == [
            (member_email, "active")
        ]
        mine = (await client.get("/api/cloud/instances", headers=member.headers)).json()
        assert [(i["id"], i["role"]) for i in mine["instances"]] == [(instance_id, "member")]

        r = await runtime_token(client, member, instance_id)
        assert r.status_code == 200, r.text
        member_token = r.json()["token"]
        as_member = {"Authorization": f"Bearer {member_token}"}
        r = await room.get("/api/auth/verify", headers=as_member)
        assert r.status_code == 200 and r.json()["role"] == "member", r.text
        # A member may not create a room (a write) but may vote.
        r = await room.post("/api/rooms", json={"name": "Mine"}, headers={**as_member, **origin})
        assert r.status_code == 403, r.text
        assert r.json()["code"] == "forbidden", r.text
        r = await room.post(
            "/api/decisions/d1/vote", json={"vote": "yes"}, headers={**as_member, **origin}
        )
        assert r.status_code == 200, r.text
        assert r.json()["votes"] == {member.user_id: "yes"}, r.text

        # -- the Room UI refreshes the member's token from the runtime's origin -------------
        r = await client.post(
            f"/api/cloud/instances/{instance_id}/refresh-token",
            json={"token": member_token},
            headers=origin,
        )
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == runtime_url
        refreshed = r.json()["token"]
        assert refreshed != member_token
        r = await room.get("/api/auth/verify", headers={"Authorization": f"Bearer {refreshed}"})
        assert r.status_code == 200 and r.json()["role"] == "member", r.text

        # -- a member invited after signing up accepts in the app -----------------------------
        await sign_up_and_verify(client, outbox, base_url, late_email)
        late = await sign_in(client, late_email)
        r = await client.post(
            f"/api/cloud/instances/{instance_id}/members",
            json={"email": late_email},
            headers=owner.headers,
        )
        assert r.status_code == 202 and r.json()["status"] == "pending", r.text
        r = await runtime_token(client, late, instance_id)
        assert r.status_code == 404, r.text
        [invitation] = (await client.get("/api/cloud/invitations", headers=late.headers)).json()[
            "invitations"
        ]
        assert invitation["instanceId"] == instance_id
        r = await client.post(
            f"/api/cloud/invitations/{invitation['id']}/accept", headers=late.headers
        )
        assert r.status_code == 200, r.text
        r = await runtime_token(client, late, instance_id)
        assert r.status_code == 200, r.text
        r = await room.get(
            "/api/auth/verify", headers={"Authorization": f"Bearer {r.json()['token']}"}
        )
        assert r.status_code == 200 and r.json()["role"] == "member", r.text

    # -- removing the member stops refreshes and new tokens at once ------------------------
    r = await client.delete(
        f"/api/cloud/instances/{instance_id}/members/{member_id}", headers=owner.headers
    )
    assert r.status_code == 204, r.text
    r = await client.post(
        f"/api/cloud/instances/{instance_id}/refresh-token",
        json={"token": refreshed},
        headers=origin,
    )
    assert r.status_code == 401, r.text
    assert r.json()["code"] == "invalid_token"
    assert r.headers["access-control-allow-origin"] == runtime_url  # the UI can read why
    r = await runtime_token(client, member, instance_id)
    assert r.status_code == 404, r.text
    r = await client.get(f"/api/cloud/instances/{instance_id}/status", headers=member.headers)
    assert r.status_code == 404, r.text

    # -- a second room, paid on the hosted page (Stripe delivers the webhook itself) ------------
    r = await client.post(
        "/api/cloud/instances",
        json={"name": "Launch desk", "tier": tier, "region": region},
        headers=owner.headers,
    )
    assert r.status_code == 201, r.text
    second_id: str = r.json()["instance"]["id"]
    async with httpx.AsyncClient(timeout=15.0, trust_env=False) as browser:
        page = await browser.get(r.json()["checkout_url"])
        assert page.status_code == 200 and 'id="pay"' in page.text
        paid = await browser.post(r.json()["checkout_url"])
        assert paid.status_code == 303, paid.text

    async def second_running() -> bool:
        r = await client.get(f"/api/cloud/instances/{second_id}", headers=owner.headers)
        return bool(r.json()["status"] == "running")

    await eventually(second_running, within=RUNNING_WITHIN, what="the second room running")

    async def delivered(count: int) -> list[int | None] | None:
        statuses = [d.status for d in stripe.deliveries]
        return statuses if len(statuses) >= count else None

    # checkout.session.completed and invoice.paid, both accepted.
    assert await eventually(lambda: delivered(2), within=10, what="deliveries") == [200, 200]
    second_pid = runtime_state(var_dir, second_id)["pid"]
    assert _pid_running(second_pid)

    # -- cancel the first: the worker stops the runtime, the instance waits out retention -------
    canceled_at = time.monotonic()
    r = await client.delete(f"/api/cloud/instances/{instance_id}", headers=owner.headers)
    assert r.status_code == 202, r.text
    assert r.json()["status"] in ("canceled", "destroying"), r.json()

    async def wound_down() -> dict[str, Any] | None:
        r = await client.get(f"/api/cloud/instances/{instance_id}/status", headers=owner.headers)
        data: dict[str, Any] = r.json()
        return data if data["status"] == "destroying" else None

    state = await eventually(wound_down, within=STOPPED_WITHIN, what="destroying")
    print(f"[e2e] DELETE → destroying, runtime stopped: {time.monotonic() - canceled_at:.3f} s")
    assert not _pid_running(pid), "the runtime process still runs after cancel"
    assert not listening(port), f"something still listens on the runtime's port {port}"
    # The runtime sent what it had counted as it stopped, with its instance's report key: the
    # owner's access log has the refusals, beside the launches, the refresh and the members.
    r = await client.get(f"/api/cloud/instances/{instance_id}/access-log", headers=owner.headers)
    assert r.status_code == 200, r.text
    entries = r.json()["entries"]
    refused = [(e["reason"], e["address"], e["count"]) for e in entries if e["kind"] == "refused"]
    assert refused == [("token_malformed", "127.0.0.1", 2)], entries
    opened = sorted((e["kind"], e["who"]) for e in entries if e["kind"] in ("launch", "refresh"))
    assert opened == [
        ("launch", late_email),
        ("launch", member_email),
        ("launch", owner_email),
        ("refresh", member_email),
    ], entries
    assert {"member_invited", "member_joined", "member_removed"} <= {e["kind"] for e in entries}
    # Cancelling at Stripe makes it send customer.subscription.deleted: accepted, no effect.
    statuses = await eventually(lambda: delivered(3), within=10, what="the deletion webhook")
    assert statuses == [200, 200, 200], statuses
    assert stripe.events[-1]["type"] == "customer.subscription.deleted"
    subscription_id = stripe.session(session_id)["subscription"]
    assert stripe.subscription(subscription_id)["status"] == "canceled"
    r = await client.get(f"/api/cloud/instances/{instance_id}/status", headers=owner.headers)
    trail = [(e["kind"], e["from"], e["to"], e["message"]) for e in r.json()["events"]]
    print_trail(trail[-7:])
    tail = [t for t in trail if t[0] != "member"][-4:]
    assert tail[0][1:3] == ("running", "canceled"), trail
    assert tail[1:3] == [
        ("step", None, None, "machine stopped"),
        ("step", None, None, tail[2][3]),
    ] and tail[2][3].startswith("volume snapshot "), trail
    assert tail[3][1:3] == ("canceled", "destroying"), trail
    assert r.json()["status"] == "destroying"
    r = await runtime_token(client, owner, instance_id)
    assert r.status_code == 409 and r.json()["code"] == "instance_not_running", r.text
    r = await client.post(
        f"/api/cloud/instances/{instance_id}/refresh-token",
        json={"token": issued["token"]},
        headers=origin,
    )
    assert r.status_code == 409 and r.json()["code"] == "instance_not_running", r.text

    # The second room is still up: shutting the control plane down must stop it.
    assert _pid_running(second_pid) and runtimes_under(var_dir) == [second_pid]
