"""Drills that need the control plane as a process (uvicorn, as `scripts/bench` runs it): Stripe
webhooks replayed and shuffled, the control plane killed mid-checkout, Redis stopped under load,
and (item 7) two control-plane processes sharing throttles and idempotency."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from bench.cp_seed import REGION, TIER, _verify_links, control_plane_argv
from bench.drills.common import (
    Factory,
    audit,
    cp_values,
    engine_and_factory,
    env_of,
    free_port,
    pg_database,
    spawn_worker,
    wait_until_settled,
)
from bench.drills.provisioning import DrillResult
from control_plane.billing.models import InstanceSubscription, StripeEvent
from control_plane.instances.models import CloudInstance, InstanceEvent
from tests.fakes.fly_machines import FlyMachinesFake
from tests.fakes.stripe_api import (
    DEFAULT_SECRET_KEY,
    DEFAULT_WEBHOOK_SECRET,
    FakeStripe,
    encode_event,
    webhook_headers,
)

PASSWORD = "drill-" + secrets.token_urlsafe(12)


# -- processes ------------------------------------------------------------------------------------


class RedisServer:
    """A private ``redis-server`` on its own port (no persistence), stopped and started at will.
    The shared Redis on 6379 is never touched."""

    def __init__(self, work: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.work = work
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        log = open(self.work / f"redis-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.work),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 10
        import socket

        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError("the private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # a crash, not a shutdown
            self.proc.wait(timeout=10)
        self.proc = None


@dataclass
class ControlPlane:
    """``control_plane.app:create_app`` under uvicorn on a loopback port."""

    values: dict[str, Any]
    work: Path
    name: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        log = open(self.work / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            control_plane_argv(self.port),
            env=env_of(self.values),
            cwd=Path(__file__).resolve().parents[2],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, size: int = 2000) -> str:
        try:
            return (self.work / f"{self.name}.log").read_text(errors="replace")[-size:]
        except OSError:
            return ""


def billing_values(
    url: str, fly_url: str, work: Path, stripe: FakeStripe, port: int, **overrides: Any
) -> dict[str, Any]:
    values: dict[str, Any] = {
        "public_url": f"http://127.0.0.1:{port}",
        "stripe_secret_key": DEFAULT_SECRET_KEY,
        "stripe_webhook_secret": DEFAULT_WEBHOOK_SECRET,
        "stripe_api_base": stripe.url,
        "trust_fly_client_ip": True,
        "mail_outbox": str(work / "outbox"),
        # The drills' owners create many Rooms each.
        "throttle_checkout_user": "1000/hour",
        "instance_quota": 1000,
    }
    values.update(overrides)
    return cp_values(url, fly_url, work, **values)


@contextlib.contextmanager
def running(*planes: ControlPlane) -> Iterator[None]:
    try:
        for plane in planes:
            plane.start()
        yield
    finally:
        for plane in planes:
            plane.stop()


# -- users and checkouts through the public API --------------------------------------------------


@dataclass
class Owner:
    email: str
    address: str
    headers: dict[str, str]


def _address(n: int) -> str:
    return f"10.88.{(n >> 8) & 255}.{(n & 255) or 1}"


async def seed_owners(client: httpx.AsyncClient, work: Path, count: int, tag: str) -> list[Owner]:
    emails = [f"{tag}-{i}-{secrets.token_hex(3)}@drill.example.com" for i in range(count)]
    for i, address in enumerate(emails):
        r = await client.post(
            "/api/auth/signup",
            json={"email": address, "password": PASSWORD, "name": f"Drill {i}"},
            headers={"fly-client-ip": _address(i)},
        )
        if r.status_code != 202:
            raise RuntimeError(f"signup: {r.status_code} {r.text[:200]}")
    links = await asyncio.to_thread(_verify_links, work / "outbox", emails)
    owners = []
    for i, address in enumerate(emails):
        r = await client.post("/api/auth/verify-email", json={"token": links[address]})
        if r.status_code != 200:
            raise RuntimeError(f"verify: {r.status_code} {r.text[:200]}")
        r = await client.post(
            "/api/auth/login",
            json={"email": address, "password": PASSWORD, "transport": "body"},
            headers={"fly-client-ip": _address(i)},
        )
        if r.status_code != 200:
            raise RuntimeError(f"login: {r.status_code} {r.text[:200]}")
        owners.append(
            Owner(
                address,
                _address(i),
                {"authorization": f"Bearer {r.json()['access_token']}"},
            )
        )
    return owners


async def create_instance(
    client: httpx.AsyncClient, owner: Owner, key: str | None = None, base: str | None = None
) -> httpx.Response:
    return await client.post(
        f"{base or ''}/api/cloud/instances",
        json={"name": "Drill Room", "tier": TIER, "region": REGION},
        headers={**owner.headers, "idempotency-key": key or secrets.token_hex(16)},
    )


def session_of(stripe: FakeStripe, instance_id: str) -> list[dict[str, Any]]:
    return [
        s
        for s in stripe.sessions
        if s.get("client_reference_id") == instance_id
        or (s.get("metadata") or {}).get("instance_id") == instance_id
    ]


async def post_event(client: httpx.AsyncClient, base: str, event: dict[str, Any]) -> int | None:
    payload = encode_event(event)
    try:
        r = await client.post(
            f"{base}/api/billing/stripe/webhook",
            content=payload,
            headers=webhook_headers(payload, DEFAULT_WEBHOOK_SECRET),
        )
    except httpx.HTTPError:
        return None
    return r.status_code


# -- the billing audit ----------------------------------------------------------------------------


@dataclass
class BillingAudit:
    lost: int = 0
    doubled: int = 0
    incomplete: int = 0
    problems: list[str] = field(default_factory=list)


async def billing_audit(
    factory: Factory,
    stripe: FakeStripe,
    expected: dict[str, str],
    *,
    events_sent: Sequence[str] = (),
) -> BillingAudit:
    """Each instance at its expected status with one subscription and one checkout session at
    Stripe, no transition recorded twice, the trail from ``draft``; every distinct event
    recorded once."""
    report = BillingAudit()
    ids = list(expected)
    async with factory() as session:
        insts = {
            i.id: i
            for i in (
                await session.scalars(select(CloudInstance).where(CloudInstance.id.in_(ids)))
            ).all()
        }
        subs = {
            s.instance_id: s
            for s in (
                await session.scalars(
                    select(InstanceSubscription).where(InstanceSubscription.instance_id.in_(ids))
                )
            ).all()
        }
        trail: dict[str, list[tuple[str | None, str | None]]] = {}
        for e in (
            await session.scalars(
                select(InstanceEvent)
                .where(InstanceEvent.instance_id.in_(ids), InstanceEvent.to_status.is_not(None))
                .order_by(InstanceEvent.id)
            )
        ).all():
            trail.setdefault(e.instance_id, []).append((e.from_status, e.to_status))
        recorded = int(await session.scalar(select(func.count()).select_from(StripeEvent)) or 0)
    for iid, want in expected.items():
        inst = insts.get(iid)
        if inst is None or str(inst.status) != want:
            report.lost += 1
            report.problems.append(f"{iid}: {inst.status if inst else 'missing'}, want {want}")
        sessions = session_of(stripe, iid)
        if len(sessions) != 1:
            report.doubled += 1
            report.problems.append(f"{iid}: {len(sessions)} checkout sessions at Stripe")
        moves = trail.get(iid, [])
        if len(set(moves)) != len(moves):
            report.doubled += 1
            report.problems.append(f"{iid}: a transition recorded twice: {moves}")
        current: str | None = "draft"
        for before, after in moves:
            if before != current:
                report.incomplete += 1
                report.problems.append(f"{iid}: trail {moves}")
                break
            current = after
        else:
            if inst is not None and current != str(inst.status):
                report.incomplete += 1
                report.problems.append(f"{iid}: trail ends at {current}")
        if want != "awaiting_payment" and iid not in subs:
            report.lost += 1
            report.problems.append(f"{iid}: no subscription recorded")
    distinct = len(set(events_sent))
    if events_sent and recorded != distinct:
        report.doubled += abs(recorded - distinct)
        report.problems.append(f"{recorded} Stripe events recorded for {distinct} distinct ones")
    return report


@contextlib.asynccontextmanager
async def billing_stack(
    tag: str, work: Path, *, redis: bool = True, planes: int = 1, **overrides: Any
) -> AsyncIterator[tuple[list[ControlPlane], FakeStripe, FlyMachinesFake, str, RedisServer | None]]:
    with FakeStripe() as stripe, FlyMachinesFake() as fly:
        async with pg_database(tag) as url:
            server = RedisServer(work) if redis else None
            if server is not None:
                server.start()
            try:
                ports = [free_port() for _ in range(planes)]
                cps = [
                    ControlPlane(
                        billing_values(
                            url,
                            fly.url,
                            work,
                            stripe,
                            ports[0],
                            redis_url=server.url if server else None,
                            **overrides,
                        ),
                        work,
                        f"cp-{tag}-{n}",
                        port=port,
                    )
                    for n, port in enumerate(ports)
                ]
                with running(*cps):
                    yield cps, stripe, fly, url, server
            finally:
                if server is not None:
                    server.stop()


# -- webhooks replayed three times and shuffled ---------------------------------------------------


async def webhooks_replayed(quick: bool, work: Path) -> DrillResult:
    started = time.monotonic()
    count = 3 if quick else 8
    rows: list[dict[str, Any]] = []
    async with billing_stack("hooks", work, redis=False) as (cps, stripe, _fly, url, _r):
        cp = cps[0]
        async with httpx.AsyncClient(base_url=cp.url, timeout=30, trust_env=False) as client:
            owners = await seed_owners(client, work, count, "hooks")
            events: list[dict[str, Any]] = []
            expected: dict[str, str] = {}
            for n, owner in enumerate(owners):
                r = await create_instance(client, owner)
                if r.status_code != 201:
                    raise RuntimeError(f"create: {r.status_code} {r.text[:300]}")
                iid = r.json()["instance"]["id"]
                [session] = session_of(stripe, iid)
                events += stripe.complete_checkout(session["id"])
                expected[iid] = "provisioning"
                sub_id = stripe.session(session["id"])["subscription"]
                if n % 3 == 1:  # a failed renewal, then paid
                    events += stripe.fail_invoice(sub_id)
                    events += stripe.pay_invoice(sub_id)
                elif n % 3 == 2 and n == 2:  # a subscription deleted: the Room is canceled
                    events += stripe.delete_subscription(sub_id)
                    expected[iid] = "canceled"
            deliveries = [e for e in events for _ in range(3)]
            random.Random(14).shuffle(deliveries)
            statuses: dict[int | None, int] = {}
            sem = asyncio.Semaphore(6)

            async def send(event: dict[str, Any]) -> None:
                async with sem:
                    code = await post_event(client, "", event)
                    statuses[code] = statuses.get(code, 0) + 1

            await asyncio.gather(*(send(e) for e in deliveries))
            engine, factory = engine_and_factory(url)
            try:
                result = await billing_audit(
                    factory, stripe, expected, events_sent=[e["id"] for e in events]
                )
            finally:
                await engine.dispose()
    rows.append(
        {
            "instances": count,
            "distinct events": len(events),
            "deliveries (×3, shuffled, 6 at once)": len(deliveries),
            "answers": ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=str)),
            "lost/doubled": f"{result.lost}/{result.doubled}",
        }
    )
    ok = not (result.lost or result.doubled or result.incomplete) and set(statuses) == {200}
    return DrillResult(
        "webhooks-replayed",
        "Stripe webhooks replayed three times and shuffled",
        ok=ok,
        figures={
            "instances": count,
            "lost": result.lost,
            "doubled": result.doubled,
            "orphans": 0,
            "incomplete trails": result.incomplete,
            "non-200 answers": sum(v for k, v in statuses.items() if k != 200),
        },
        rows=rows,
        notes=[
            "Owners sign up and create Rooms through the API of a control-plane process; the "
            "Stripe fake completes each checkout (`checkout.session.completed`, `invoice.paid`), "
            "a third also fail a renewal and then pay it, one has its subscription deleted. "
            "Every event is delivered three times, signed as Stripe signs, in a shuffled order, "
            "six at a time. Checked: each Room at its expected status, one subscription, one "
            "Checkout Session, no transition recorded twice, one `stripe_events` row per "
            "distinct event.",
        ],
        problems=result.problems,
        seconds=time.monotonic() - started,
    )


# -- the control plane restarted mid-checkout -----------------------------------------------------


async def cp_restarted_mid_checkout(quick: bool, work: Path) -> DrillResult:
    started = time.monotonic()
    rounds = 2 if quick else 4
    rows: list[dict[str, Any]] = []
    async with billing_stack("cprestart", work, redis=False) as (cps, stripe, fly, url, _r):
        cp = cps[0]
        stripe.webhook_url = f"{cp.url}/api/billing/stripe/webhook"
        worker = spawn_worker({**cp.values, "public_url": cp.url}, work / "cp-worker.log")
        expected: dict[str, str] = {}
        try:
            # No keep-alive: the process behind the port is killed and restarted.
            async with httpx.AsyncClient(
                base_url=cp.url,
                timeout=30,
                trust_env=False,
                limits=httpx.Limits(max_keepalive_connections=0),
            ) as client:
                owners = await seed_owners(client, work, rounds, "restart")
                for n, owner in enumerate(owners):
                    key = secrets.token_hex(16)
                    # 1. Killed while the create is in flight; the page retries with its key.
                    pending = asyncio.create_task(create_instance(client, owner, key))
                    await asyncio.sleep(random.Random(n).uniform(0.0, 0.08))
                    cp.kill()
                    with contextlib.suppress(httpx.HTTPError):
                        await pending
                    cp.start()
                    r = await create_instance(client, owner, key)
                    again = await create_instance(client, owner, key)
                    if (
                        r.status_code != 201
                        or again.json()["instance"]["id"] != r.json()["instance"]["id"]
                    ):
                        raise RuntimeError(f"create after restart: {r.status_code} {r.text[:200]}")
                    iid = r.json()["instance"]["id"]
                    expected[iid] = "running"
                    [session] = session_of(stripe, iid)
                    # 2. The customer pays while the control plane is down: Stripe's delivery
                    # fails; the success page's confirm and Stripe's retry come after restart.
                    cp.kill()
                    before = len(stripe.events)
                    pay = await asyncio.to_thread(
                        httpx.post, f"{stripe.url}/pay/{session['id']}", timeout=10
                    )
                    await asyncio.sleep(0.3)  # the fake's own delivery attempt, refused
                    cp.start()
                    events = list(stripe.events[before:])
                    # 3. Killed while the confirm and the redelivered webhook are in flight.
                    racing = asyncio.gather(
                        client.post(
                            f"/api/cloud/instances/{iid}/checkout/confirm",
                            json={"session_id": session["id"]},
                            headers=owner.headers,
                        ),
                        post_event(client, "", events[0]),
                        return_exceptions=True,
                    )
                    await asyncio.sleep(random.Random(n).uniform(0.0, 0.05))
                    cp.kill()
                    answers = await racing
                    cp.start()
                    # Stripe retries every event until it gets a 2xx.
                    retried = [await post_event(client, "", e) for e in events]
                    rows.append(
                        {
                            "round": n + 1,
                            "pay page": pay.status_code,
                            "fake's own deliveries failed": sum(
                                1 for d in stripe.deliveries if d.status is None
                            ),
                            "confirm / webhook, killed 0-50 ms in": ", ".join(
                                str(getattr(a, "status_code", None) or type(a).__name__)
                                for a in answers
                            ),
                            "redelivered": ", ".join(str(c) for c in retried),
                        }
                    )
            engine, factory = engine_and_factory(url)
            try:
                await wait_until_settled(
                    factory, list(expected), rest=frozenset({"running", "failed"}), timeout=60
                )
            finally:
                await engine.dispose()
        finally:
            worker.stop()
        engine, factory = engine_and_factory(url)
        try:
            await asyncio.sleep(0.2)
            result = await billing_audit(
                factory,
                stripe,
                expected,
                events_sent=[e["id"] for e in stripe.events],
            )
            fleet = await audit(factory, fly, list(expected), first_status=None)
        finally:
            await engine.dispose()
    lost = result.lost
    doubled = result.doubled + fleet.doubled
    ok = not (lost or doubled or result.incomplete or fleet.orphans or fleet.incomplete)
    return DrillResult(
        "cp-restarted",
        "The control plane killed (SIGKILL) and restarted mid-checkout",
        ok=ok,
        figures={
            "instances": len(expected),
            "control-plane kills": 3 * len(expected),
            "lost": lost,
            "doubled": doubled,
            "orphans": fleet.orphans,
            "incomplete trails": result.incomplete + fleet.incomplete,
            **{f"status {k}": v for k, v in fleet.by_status.items()},
        },
        rows=rows,
        notes=[
            "Per round, one owner: (1) the control plane is SIGKILLed 0-80 ms into `POST "
            "/api/cloud/instances`, restarted, and the create retried twice with the same "
            "`Idempotency-Key` (one Room, one Checkout Session); (2) it is killed again, the "
            "customer pays on the Stripe fake's page while it is down (the fake's webhook "
            "delivery is refused), it restarts; (3) the success page's `/checkout/confirm` and "
            "the redelivered webhook race, the process is killed right after, restarted, and "
            "every event of the session redelivered (Stripe retries until a 2xx). A worker "
            "process provisions the paid Rooms on the Fly fake. Checked: every Room `running`, "
            "one Checkout Session and one subscription each, no transition twice, trails from "
            "`draft`, nothing orphaned at the Fly fake.",
        ],
        problems=result.problems + fleet.problems,
        seconds=time.monotonic() - started,
    )


# -- Redis stopped under load ---------------------------------------------------------------------


async def redis_stopped(quick: bool, work: Path) -> DrillResult:
    started = time.monotonic()
    phase = 2.0 if quick else 4.0
    async with billing_stack("redis", work, redis=True) as (cps, _stripe, _fly, _url, server):
        assert server is not None
        cp = cps[0]
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(
            base_url=cp.url, timeout=10, trust_env=False, limits=limits
        ) as client:
            [owner] = await seed_owners(client, work, 1, "redis")
            windows: dict[str, dict[str, dict[str, int]]] = {}

            async def load(window: str, seconds: float) -> None:
                counts = windows.setdefault(window, {})
                stop = time.monotonic() + seconds
                n = 0

                def note(kind: str, r: httpx.Response | None) -> None:
                    if r is None:
                        code = "transport error"
                    else:
                        try:
                            code = f"{r.status_code} {r.json().get('code', '')}".strip()
                        except ValueError:
                            code = str(r.status_code)
                    bucket = counts.setdefault(kind, {})
                    bucket[code] = bucket.get(code, 0) + 1

                async def one(kind: str, coro: Any) -> None:
                    try:
                        note(kind, await coro)
                    except httpx.HTTPError:
                        note(kind, None)

                while time.monotonic() < stop:
                    n += 1
                    ip = f"10.99.{n % 200}.{n % 250 + 1}"
                    await asyncio.gather(
                        one("healthz", client.get("/healthz")),
                        one(
                            "sign-in, wrong password",
                            client.post(
                                "/api/auth/login",
                                json={
                                    "email": f"nobody{n % 50}@drill.example.com",
                                    "password": "wrong-password-1",
                                    "transport": "body",
                                },
                                headers={"fly-client-ip": ip},
                            ),
                        ),
                        one(
                            "sign-in, right password",
                            client.post(
                                "/api/auth/login",
                                json={
                                    "email": owner.email,
                                    "password": PASSWORD,
                                    "transport": "body",
                                },
                                headers={"fly-client-ip": owner.address},
                            ),
                        ),
                        one(
                            "signed-in read",
                            client.get("/api/cloud/instances", headers=owner.headers),
                        ),
                        one("checkout (billing limit)", create_instance(client, owner)),
                    )

            await load("Redis up", phase)
            server.stop()
            await load("Redis down", phase)
            server.start()
            await asyncio.sleep(2.5)  # the pool's reconnect
            await load("Redis back", phase)
    checks = {
        "health checks answer 200 throughout": all(
            set(w.get("healthz", {})) <= {"200"} for w in windows.values()
        ),
        "no 5xx other than 503 throttle_unavailable, ever": all(
            not (c.startswith("5") and c != "503 throttle_unavailable")
            for w in windows.values()
            for kind in w.values()
            for c in kind
        ),
        "sign-in fails closed while Redis is down (503 throttle_unavailable, no password "
        "checked)": set(windows["Redis down"].get("sign-in, wrong password", {}))
        == {"503 throttle_unavailable"}
        and set(windows["Redis down"].get("sign-in, right password", {}))
        == {"503 throttle_unavailable"},
        "checkouts go on while Redis is down (billing limit fails open)": set(
            windows["Redis down"].get("checkout (billing limit)", {})
        )
        <= {"201"},
        "signed-in reads go on while Redis is down": set(
            windows["Redis down"].get("signed-in read", {})
        )
        <= {"200"},
        "sign-in works again once Redis is back": "200"
        in windows["Redis back"].get("sign-in, right password", {}),
    }
    rows = [
        {"window": w, "request": kind, "answers": ", ".join(f"{c} ×{n}" for c, n in codes.items())}
        for w, kinds in windows.items()
        for kind, codes in kinds.items()
    ]
    return DrillResult(
        "redis-stopped",
        "Redis stopped (killed) under load, then started again",
        ok=all(checks.values()),
        figures={**{k: ("yes" if v else "**NO**") for k, v in checks.items()}},
        rows=rows,
        notes=[
            f"A control-plane process with `REDIS_URL` on a private `redis-server` (its own "
            f"port, no persistence; the shared one is not touched), under a closed loop of five "
            f"concurrent requests (health, a wrong and a right sign-in, a signed-in read, a "
            f"checkout) for {phase:g} s with Redis up, {phase:g} s after it is SIGKILLed, and "
            f"{phase:g} s after it is started again. The documented mode "
            "(docs/operations.md section 2): the account limits fail closed (503 "
            "`throttle_unavailable`), the billing limits fail open (logged), everything else "
            "goes on. Counters restart from zero with an empty Redis: a Redis without "
            "persistence forgets budgets in flight.",
        ],
        problems=[k for k, v in checks.items() if not v],
        seconds=time.monotonic() - started,
    )


# -- item 7: two control-plane processes behind one address --------------------------------------


async def two_control_planes(quick: bool, work: Path) -> DrillResult:
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    # A small per-address sign-in budget makes the shared count easy to read.
    budget = 6
    quota = 3  # the default QUOROOM_CP_INSTANCE_QUOTA
    async with billing_stack(
        "twocp",
        work,
        redis=True,
        planes=2,
        throttle_login_account_address=f"{budget}/minute",
        instance_quota=quota,
    ) as (cps, stripe, _fly, url, _server):
        a, b = cps
        bases = [a.url, b.url]
        async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
            client.base_url = httpx.URL(a.url)
            owners = await seed_owners(client, work, 3, "twocp")
            # 1. A throttle counted across both: wrong passwords alternating between them.
            allowed = 0
            answers: list[int] = []
            for n in range(budget * 2 + 2):
                r = await client.post(
                    f"{bases[n % 2]}/api/auth/login",
                    json={
                        "email": owners[0].email,
                        "password": "wrong-password-1",
                        "transport": "body",
                    },
                    headers={"fly-client-ip": owners[0].address},
                )
                answers.append(r.status_code)
                allowed += r.status_code == 401
            rows.append(
                {
                    "check": f"wrong passwords for one account from one address, alternating "
                    f"A/B (budget {budget}/minute)",
                    "result": f"{allowed} checked, then "
                    f"{sum(1 for c in answers if c == 429)} × 429",
                    "held": allowed == budget,
                }
            )
            # 2. One Idempotency-Key sent to both at once: one Room, one Checkout Session.
            key = secrets.token_hex(16)
            owner = owners[1]
            pair = await asyncio.gather(
                *(create_instance(client, owner, key, base=base) for base in bases)
            )
            ids = {r.json()["instance"]["id"] for r in pair if r.status_code == 201}
            iid = next(iter(ids)) if ids else ""
            sessions = session_of(stripe, iid) if iid else []
            rows.append(
                {
                    "check": "the same create (one Idempotency-Key) sent to A and B at once",
                    "result": f"answers {[r.status_code for r in pair]}, {len(ids)} Room, "
                    f"{len(sessions)} Checkout Session",
                    "held": len(ids) == 1 and len(sessions) == 1,
                }
            )
            # 3. The checkout's events to both, three times each, with the confirm on A.
            events = stripe.complete_checkout(sessions[0]["id"]) if sessions else []
            jobs = [post_event(client, base, e) for e in events for base in bases for _ in range(3)]
            jobs.append(
                client.post(
                    f"{a.url}/api/cloud/instances/{iid}/checkout/confirm",
                    json={"session_id": sessions[0]["id"] if sessions else ""},
                    headers=owner.headers,
                )
            )
            got = await asyncio.gather(*jobs, return_exceptions=True)
            engine, factory = engine_and_factory(url)
            try:
                result = await billing_audit(
                    factory, stripe, {iid: "provisioning"}, events_sent=[e["id"] for e in events]
                )
            finally:
                await engine.dispose()
            rows.append(
                {
                    "check": "the paid checkout's events delivered 3× to each process, racing "
                    "a confirm on A",
                    "result": f"answers {sorted(str(getattr(g, 'status_code', g)) for g in got)}"
                    f"; lost {result.lost}, doubled {result.doubled}",
                    "held": not (result.lost or result.doubled or result.incomplete),
                }
            )
            problems += result.problems
            # 4. The per-user Room quota, counted in PostgreSQL: creates on both at once.
            burst = await asyncio.gather(
                *(create_instance(client, owners[2], base=bases[n % 2]) for n in range(quota * 2))
            )
            codes = sorted(r.status_code for r in burst)
            rows.append(
                {
                    "check": f"{quota * 2} creates at once (distinct keys) by one owner, "
                    f"alternating A/B, quota {quota}",
                    "result": f"answers {codes}",
                    "held": codes == [201] * quota + [409] * quota,
                }
            )
            # 5. Capacity: sign-ins (Argon2id) and signed-in reads, one process then both.
            if not quick:
                capacity = await _capacity(client, a.url, b.url, owners[2], work)
    if not quick:
        # The same throttle check with each process counting alone (no REDIS_URL): what an
        # operator gets by adding processes without Redis.
        async with billing_stack(
            "twocpmem",
            work,
            redis=False,
            planes=2,
            throttle_login_account_address=f"{budget}/minute",
        ) as (cps, _stripe, _fly, _url, _server):
            async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
                client.base_url = httpx.URL(cps[0].url)
                [lone] = await seed_owners(client, work, 1, "twocpmem")
                checked = 0
                for n in range(budget * 2 + 2):
                    r = await client.post(
                        f"{cps[n % 2].url}/api/auth/login",
                        json={
                            "email": lone.email,
                            "password": "wrong-password-1",
                            "transport": "body",
                        },
                        headers={"fly-client-ip": lone.address},
                    )
                    checked += r.status_code == 401
        rows.append(
            {
                "check": "the same, without REDIS_URL (each process counts alone; not a target)",
                "result": f"{checked} checked: the budget is multiplied by the processes",
                "held": True,
            }
        )
    ok = all(r["held"] for r in rows)
    return DrillResult(
        "two-control-planes",
        "Two control-plane processes behind one address (PostgreSQL + Redis shared)",
        ok=ok,
        figures={
            "lost": sum(1 for r in rows if not r["held"] and "Room" in r["check"]),
            "doubled": 0 if ok else sum(1 for r in rows if not r["held"]),
            "orphans": 0,
            "checks held": f"{sum(1 for r in rows if r['held'])}/{len(rows)}",
        },
        rows=rows + ([] if quick else capacity),
        notes=[
            "Two `uvicorn control_plane.app:create_app` processes (A and B, two ports used "
            "alternately as a round-robin proxy would) on one PostgreSQL database and one "
            "private Redis, with the same secrets. Capacity rows: 5 s of load each, first on A "
            "alone, then spread over A and B; the load generator (httpx for sign-ins, `wrk` "
            "for reads) runs on the same two cores, so the two-process figures understate "
            "what two machines would serve.",
        ],
        problems=problems + [r["check"] for r in rows if not r["held"]],
        seconds=time.monotonic() - started,
    )


async def _capacity(
    client: httpx.AsyncClient, a: str, b: str, owner: Owner, work: Path
) -> list[dict[str, Any]]:
    """Sign-ins per second (each one an Argon2id hash) and signed-in reads per second, on A alone
    and on A and B together."""
    rows: list[dict[str, Any]] = []
    for label, bases in (("A alone", [a]), ("A and B", [a, b])):
        rate, refused = await _sign_in_rate(client, bases, owner)
        rows.append(
            {
                "check": f"capacity: sign-ins/s, {label} (12 clients)",
                "result": f"{rate:.1f}/s" + (f", refused {refused}" if refused else ""),
                "held": True,
            }
        )
    wrk = shutil.which("wrk")
    if wrk is None:
        rows.append({"check": "capacity: reads", "result": "wrk not installed", "held": True})
        return rows
    token = owner.headers["authorization"]
    for label, bases in (("A alone", [a]), ("A and B", [a, b])):
        procs = [
            await asyncio.create_subprocess_exec(
                wrk,
                "-t1",
                f"-c{32 // len(bases)}",
                "-d5s",
                "-H",
                f"authorization: {token}",
                f"{base}/api/cloud/instances",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            for base in bases
        ]
        outputs = [(await p.communicate())[0].decode() for p in procs]
        total = 0.0
        non2xx = 0
        for out in outputs:
            for line in out.splitlines():
                if line.startswith("Requests/sec:"):
                    total += float(line.split()[1])
                if "Non-2xx" in line:
                    non2xx += int(line.split()[-1])
        (work / f"wrk-{len(bases)}.txt").write_text("\n".join(outputs))
        rows.append(
            {
                "check": f"capacity: signed-in reads/s (`GET /api/cloud/instances`), {label}",
                "result": f"{total:.0f}/s" + (f", {non2xx} non-2xx" if non2xx else ""),
                "held": True,
            }
        )
    return rows


async def _sign_in_rate(
    client: httpx.AsyncClient, bases: list[str], owner: Owner, seconds: float = 5.0
) -> tuple[float, dict[int, int]]:
    done = 0
    refused: dict[int, int] = {}
    stop = time.monotonic() + seconds
    counter = iter(range(10**9))

    async def signer() -> None:
        nonlocal done
        while time.monotonic() < stop:
            n = next(counter)
            # A fresh address each time: the per-address budget is not what is measured.
            address = f"10.{66 + n // 62500}.{n // 250 % 250}.{n % 250 + 1}"
            r = await client.post(
                f"{bases[n % len(bases)]}/api/auth/login",
                json={"email": owner.email, "password": PASSWORD, "transport": "body"},
                headers={"fly-client-ip": address},
            )
            if r.status_code == 200:
                done += 1
            else:
                refused[r.status_code] = refused.get(r.status_code, 0) + 1

    started = time.monotonic()
    await asyncio.gather(*(signer() for _ in range(12)))
    return done / (time.monotonic() - started), refused
