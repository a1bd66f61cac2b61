"""Locust users for the load bench: legitimate owners, members and WebSocket subscribers, a
token refresher against the control plane, and abusers whose refusals are the expected outcome.

Run through ``python -m bench.load`` (which mints the tokens, starts the servers and picks the
classes per scenario). Configuration comes from the environment:

- ``BENCH_TOKENS``: a JSON file ``{"owner": [...], "member": [...], "abuser": [...],
  "forged": [...], "unknown_kid": [...]}``; each simulated user takes the next token of its role
  (one token, one subject, one budget per user).
- ``BENCH_STACK``: ``ours`` | ``peer`` | ``bare`` (bare: the Room's local token, no roles, so
  members skip the writes only an owner may make).
- ``BENCH_ORIGIN`` (the allowed origin), ``BENCH_FLOOD_RPS`` (per flooder user),
  ``BENCH_CATEGORIES_CSV`` (where the per-category summary is written at the end),
  ``BENCH_ADDRESS_BASE`` (the first client address's number: the driver runs the abusers in a
  second process whose addresses start past the legitimate users').
- ``BENCH_PHASE_EPOCH`` (a ``time.time()``), ``BENCH_PHASE_SECONDS`` and ``BENCH_PHASE_ROLE``
  (``legit`` | ``abusers``): interleaved abuse. Counted in phases from the epoch, the abusers
  send in the odd phases only, and the legitimate users' requests are filed under ``legit``
  (abusers off), ``legit_abused`` (on) or ``legit_edge`` (within ``PHASE_GUARD`` of a switch,
  judged under neither).
- ``BENCH_CP_URL``, ``BENCH_CP_ORIGIN``, ``BENCH_INSTANCE_ID`` and a ``control_plane`` pool in
  ``BENCH_TOKENS``: the token refresher (the driver seeds a control plane for it, bench/cp_seed.py);
  ``BENCH_RUNTIME_URL`` (optional): the runtime the tokens are for, shown each refreshed token;
  ``BENCH_REFRESH_WAIT`` (``"min,max"`` seconds between a refresher's refreshes, default ``2,5``).

Every simulated user has its own client address, sent as ``Fly-Client-IP`` (our stack is set up
as behind Fly's proxy) and ``X-Forwarded-For`` (uvicorn rewrites the peer's client address from
it, trusting 127.0.0.1): on loopback all sockets come from 127.0.0.1, and per-address budgets
would otherwise lump 500 users into one.

Requests carry a ``category`` in their context (``legit``, ``ws``, ``refresh``, ``runtime``,
``flood``, ``abuse``; ``legit`` split by phase as above); a listener keeps response times and
status codes per category and writes them to ``BENCH_CATEGORIES_CSV`` so the driver judges
legitimate traffic alone, apart from abuse.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import socket
import time
from collections import Counter, defaultdict
from typing import Any

import gevent
import websocket
from locust import FastHttpUser, User, between, constant_throughput, events, task
from locust.env import Environment

STACK = os.environ.get("BENCH_STACK", "ours")
ORIGIN = os.environ.get("BENCH_ORIGIN", "https://app.bench.example")
BAD_ORIGIN = "https://evil.example"
FLOOD_RPS = float(os.environ.get("BENCH_FLOOD_RPS", "100"))
CATEGORIES_CSV = os.environ.get("BENCH_CATEGORIES_CSV", "")
CP_URL = os.environ.get("BENCH_CP_URL", "")
CP_ORIGIN = os.environ.get("BENCH_CP_ORIGIN", "")
INSTANCE_ID = os.environ.get("BENCH_INSTANCE_ID", "bench-instance")
RUNTIME_URL = os.environ.get("BENCH_RUNTIME_URL", "")
ROOMS = ("r1", "r2")
DECISIONS = ("d1", "d2", "d3")
MESSAGES = (("r1", "m1"), ("r1", "m2"), ("r2", "m3"))
BODY_CAP = 1024 * 1024  # the stack's max_body_bytes; the Room's own cap is 64 KiB
SETTLE_SECONDS = 3.0  # after the last user started: each has sent its first request (waits ≤ 2.5 s)
PHASE_EPOCH = float(os.environ.get("BENCH_PHASE_EPOCH") or 0)
PHASE_SECONDS = float(os.environ.get("BENCH_PHASE_SECONDS") or 0)
PHASE_ROLE = os.environ.get("BENCH_PHASE_ROLE", "legit")
# Seconds either side of a switch: legitimate requests started there count for neither phase.
PHASE_GUARD = 0.25


def _load_tokens() -> dict[str, list[str]]:
    path = os.environ.get("BENCH_TOKENS")
    if not path:
        return {}
    with open(path) as handle:
        return json.load(handle)


TOKENS = _load_tokens()
_next: defaultdict[str, itertools.count[int]] = defaultdict(itertools.count)  # role -> pool index
# Where this process's client addresses start (``BENCH_ADDRESS_BASE``): the abusers' process
# starts far from the legitimate users' so that no two users of either share an address budget.
_addresses = itertools.count(int(os.environ.get("BENCH_ADDRESS_BASE", "1")))


def take_token(role: str) -> str:
    pool = TOKENS.get(role) or [""]
    return pool[next(_next[role]) % len(pool)]


def refresh_wait() -> tuple[float, float]:
    """``BENCH_REFRESH_WAIT`` (``"min,max"`` seconds), default 2-5 s."""
    low, _, high = os.environ.get("BENCH_REFRESH_WAIT", "2,5").partition(",")
    return float(low), float(high or low)


def new_address() -> str:
    n = next(_addresses)
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def expect(response: Any, *statuses: int) -> None:
    """Mark a ``catch_response`` response: success iff its status is one of ``statuses``."""
    if response.status_code in statuses:
        response.success()
    else:
        response.failure(f"expected {'/'.join(map(str, statuses))}, got {response.status_code}")


# --- interleaved abuse phases ----------------------------------------------------------------
#
# Why: on this VM one scenario's p99 moved 2-3x from one run to the next (the host's other
# tenants), so a p99 with the abusers from one run against a p99 without them from another
# measured the host more than the abuse. Interleaved phases of a few seconds in one run put
# both under the same host conditions and the same server process.


def abusers_on(t: float) -> bool:
    """Whether the abusers send at wall time ``t`` (always, without phases)."""
    if not PHASE_SECONDS:
        return True
    return int((t - PHASE_EPOCH) // PHASE_SECONDS) % 2 == 1


def near_switch(t: float) -> bool:
    into = (t - PHASE_EPOCH) % PHASE_SECONDS
    return into < PHASE_GUARD or into > PHASE_SECONDS - PHASE_GUARD


def until_abuse(t: float) -> float:
    """Seconds from ``t`` to the abusers' next phase (0 inside one)."""
    if abusers_on(t):
        return 0.0
    return PHASE_SECONDS - (t - PHASE_EPOCH) % PHASE_SECONDS


def abuse_seconds(start: float, end: float) -> float:
    """Wall seconds of ``[start, end]`` that fall in the abusers' phases."""
    if not PHASE_SECONDS:
        return end - start
    total, k = 0.0, int((start - PHASE_EPOCH) // PHASE_SECONDS)
    while (low := PHASE_EPOCH + k * PHASE_SECONDS) < end:
        if k % 2 == 1:
            total += max(0.0, min(low + PHASE_SECONDS, end) - max(low, start))
        k += 1
    return total


def phase_category(category: str, response_ms: float) -> str:
    """``legit`` filed by the phase it started in (no change without phases or for others).

    By its start alone: filing by where it ended too would send slow requests, more likely to
    cross a switch, to ``legit_edge`` and flatter both phases' tails."""
    if not PHASE_SECONDS or category != "legit":
        return category
    start = time.time() - response_ms / 1000
    if near_switch(start):
        return "legit_edge"
    return "legit_abused" if abusers_on(start) else "legit"


def paced_by_phase(pace: Any) -> Any:
    """A ``wait_time`` for abusers: ``pace``'s wait, stretched past any phase without abuse."""

    def wait_time(user: Any) -> float:
        wait = pace(user)
        return wait + until_abuse(time.time() + wait)

    return wait_time


# --- per-category accounting -----------------------------------------------------------------


class Categories:
    """Response times and status codes per category, apart from locust's per-name stats."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self.failures: Counter[str] = Counter()
        self.statuses: dict[str, Counter[str]] = defaultdict(Counter)
        self.failed_statuses: dict[str, Counter[str]] = defaultdict(Counter)
        self.counts: Counter[str] = Counter()  # events that are not requests (WS pushes)
        self.started = time.monotonic()
        self.started_wall = time.time()

    def _seconds(self, category: str, elapsed: float) -> float:
        """What a category's rate is taken over: with phases, the abusers' categories and
        ``legit_abused`` over the abusers' phases, ``legit`` over the others."""
        if not PHASE_SECONDS:
            return elapsed
        now = time.time()
        on = abuse_seconds(self.started_wall, now)
        if PHASE_ROLE == "abusers":
            return on
        clear = 1 - 2 * PHASE_GUARD / PHASE_SECONDS  # the share of a phase not at its edges
        if category == "legit_abused":
            return on * clear
        if category == "legit":
            return ((now - self.started_wall) - on) * clear
        return elapsed

    def record(self, category: str, ms: float, status: str, failed: bool) -> None:
        self.times[category].append(ms)
        self.statuses[category][status] += 1
        if failed:
            self.failures[category] += 1
            self.failed_statuses[category][status] += 1

    def rows(self) -> list[dict[str, Any]]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rows = []
        for category in sorted(set(self.times) | set(self.counts)):
            times = sorted(self.times.get(category, []))
            seconds = max(self._seconds(category, elapsed), 1e-9)
            rows.append(
                {
                    "category": category,
                    "requests": len(times),
                    "failures": self.failures[category],
                    "rps": round(len(times) / seconds, 1),
                    "p50_ms": round(percentile(times, 50), 2),
                    "p95_ms": round(percentile(times, 95), 2),
                    "p99_ms": round(percentile(times, 99), 2),
                    "max_ms": round(times[-1], 2) if times else 0.0,
                    "statuses": " ".join(
                        f"{k}:{v}" for k, v in sorted(self.statuses[category].items())
                    ),
                    "failed_statuses": " ".join(
                        f"{k}:{v}" for k, v in sorted(self.failed_statuses[category].items())
                    ),
                    "events": self.counts[category],
                    "seconds": round(seconds, 1),
                    "wall_seconds": round(elapsed, 1),
                }
            )
        return rows

    def write(self, path: str) -> None:
        rows = self.rows()
        fields = list(rows[0]) if rows else ["category"]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile (the value below which ``pct`` % of the samples fall)."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * pct // 100))  # ceil
    return sorted_values[int(rank) - 1]


CATEGORIES = Categories()


@events.request.add_listener
def _on_request(
    request_type: str,
    name: str,
    response_time: float,
    response_length: int,
    exception: BaseException | None = None,
    context: dict[str, Any] | None = None,
    response: Any = None,
    **_: Any,
) -> None:
    context = context or {}
    category = phase_category(context.get("category", "other"), response_time)
    status = getattr(response, "status_code", None) or context.get("status")
    label = str(status) if status else ("error" if exception else "ok")
    CATEGORIES.record(category, response_time, label, exception is not None)


@events.spawning_complete.add_listener
def _on_spawned(user_count: int, **_: Any) -> None:
    # Measure the steady state, from SETTLE_SECONDS after the last user started. Locust starts
    # its users in batches, one a second (100 at a time for 500 users), and each new user sends
    # its first request at once: reset at spawning_complete, the last batch's ~90 simultaneous
    # requests (80-120 ms each) were ~0.8 % of a scenario's samples, so they alone set its p99
    # (2026-12-06: every sample over 30 ms but a few came from that one burst).
    gevent.spawn_later(SETTLE_SECONDS, CATEGORIES.reset)


@events.quitting.add_listener
def _on_quit(environment: Environment, **_: Any) -> None:
    if CATEGORIES_CSV:
        CATEGORIES.write(CATEGORIES_CSV)


def fire(
    environment: Environment,
    category: str,
    kind: str,
    name: str,
    started: float,
    exception: BaseException | None = None,
    status: int | None = None,
) -> None:
    """Report a non-HTTP action (WebSocket, raw socket) to locust as a request event."""
    environment.events.request.fire(
        request_type=kind,
        name=name,
        response_time=(time.perf_counter() - started) * 1000,
        response_length=0,
        exception=exception,
        context={"category": category, "status": status},
    )


# --- legitimate users ------------------------------------------------------------------------


class _RoomUser(FastHttpUser):
    abstract = True
    role = "owner"
    category = "legit"
    wait_time = between(0.5, 2.5)

    def on_start(self) -> None:
        self.token = take_token(self.role)
        self.address = new_address()
        self.headers = {
            "authorization": f"Bearer {self.token}",
            "origin": ORIGIN,
            "fly-client-ip": self.address,
            "x-forwarded-for": self.address,
        }

    def context(self) -> dict[str, Any]:
        return {"category": self.category}

    def get(self, path: str, name: str | None = None) -> None:
        with self.client.get(path, headers=self.headers, name=name, catch_response=True) as r:
            expect(r, 200)

    def post(self, path: str, body: dict[str, Any], name: str, *statuses: int) -> None:
        with self.client.post(
            path, json=body, headers=self.headers, name=name, catch_response=True
        ) as r:
            expect(r, *statuses)

    @task(40)
    def list_rooms(self) -> None:
        self.get("/api/rooms")

    @task(30)
    def get_room(self) -> None:
        self.get(f"/api/rooms/{random.choice(ROOMS)}", name="/api/rooms/{id}")

    @task(8)
    def vote(self) -> None:
        body = {"vote": random.choice(("yes", "no", "abstain"))}
        decision = random.choice(DECISIONS)
        self.post(f"/api/decisions/{decision}/vote", body, "/api/decisions/{id}/vote", 200)

    @task(4)
    def mark_read(self) -> None:
        room, message = random.choice(MESSAGES)
        self.post(
            f"/api/rooms/{room}/messages/{message}/read",
            {},
            "/api/rooms/{id}/messages/{mid}/read",
            200,
        )


class OwnerUser(_RoomUser):
    """Reads most of the time, votes, marks messages read, now and then creates a room."""

    weight = 4
    role = "owner"

    @task(1)
    def create_room(self) -> None:
        body = {"name": f"load {random.randrange(1 << 30)}", "goal": "measure the stack"}
        self.post("/api/rooms", body, "/api/rooms [POST]", 201)


class MemberUser(_RoomUser):
    """Reads and votes; the owner-only writes it tries are refused (403 is the intended outcome)."""

    weight = 4
    role = "member"

    @task(1)
    def create_room_refused(self) -> None:
        if STACK == "bare":  # no roles without a stack: the Room would accept it
            return
        body = {"name": "not mine to create"}
        self.post("/api/rooms", body, "/api/rooms [POST, member: 403]", 403)

    @task(1)
    def read_credentials_refused(self) -> None:
        if STACK == "bare":
            return
        with self.client.get(
            "/api/credentials/c1",
            headers=self.headers,
            name="/api/credentials/{id} [member: 403]",
            catch_response=True,
        ) as r:
            expect(r, 403)


class WebSocketUser(User):
    """Connects to /ws with the subprotocol token, subscribes to a room and receives its events.

    Reported to locust as custom events: ``WS connect`` (handshake), ``WS subscribe`` (until the
    ``subscribed`` reply) and ``WS ping`` (a ping/pong round trip on the open socket, after
    draining pushed events). Pushed events are counted (``events`` in the category summary).
    """

    weight = 2
    wait_time = between(1.0, 3.0)

    def on_start(self) -> None:
        self.token = take_token("member" if random.random() < 0.5 else "owner")
        self.address = new_address()
        self.ws: websocket.WebSocket | None = None
        self.connect()

    def _url(self) -> str:
        return str(self.host).replace("http://", "ws://", 1).rstrip("/") + "/ws"

    def connect(self) -> None:
        started = time.perf_counter()
        protocols = ["quoroom", f"quoroom.bearer.{self.token}"]
        headers = [f"Fly-Client-IP: {self.address}", f"X-Forwarded-For: {self.address}"]
        url = self._url()
        if STACK == "bare":
            # The bare Room takes ?token= and picks no subprotocol (a client offering one
            # would then refuse the handshake).
            protocols, url = [], f"{url}?token={self.token}"
        try:
            self.ws = websocket.create_connection(
                url, subprotocols=protocols, origin=ORIGIN, header=headers, timeout=10
            )
        except Exception as exc:
            fire(self.environment, "ws", "WS", "connect", started, exc)
            self.ws = None
            return
        fire(self.environment, "ws", "WS", "connect", started)
        started = time.perf_counter()
        try:
            self.ws.send(json.dumps({"type": "subscribe", "roomId": random.choice(ROOMS)}))
            self._until("subscribed")
        except Exception as exc:
            fire(self.environment, "ws", "WS", "subscribe", started, exc)
            self._close()
            return
        fire(self.environment, "ws", "WS", "subscribe", started)

    def _until(self, kind: str) -> None:
        assert self.ws is not None
        while True:
            message = json.loads(self.ws.recv())
            if message.get("type") == kind:
                return
            if message.get("type") == "error":
                raise RuntimeError(f"WS error: {message}")
            CATEGORIES.counts["ws"] += 1

    def _drain(self) -> None:
        assert self.ws is not None
        self.ws.settimeout(0.0001)
        try:
            while True:
                self.ws.recv()
                CATEGORIES.counts["ws"] += 1
        except (websocket.WebSocketTimeoutException, BlockingIOError, TimeoutError):
            pass
        finally:
            self.ws.settimeout(10)

    @task
    def ping(self) -> None:
        if self.ws is None:
            self.connect()
            return
        started = time.perf_counter()
        try:
            self._drain()
            started = time.perf_counter()
            self.ws.send('{"type":"ping"}')
            self._until("pong")
        except Exception as exc:
            fire(self.environment, "ws", "WS", "ping", started, exc)
            self._close()
            return
        fire(self.environment, "ws", "WS", "ping", started)

    def _close(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:
                pass
            self.ws = None

    def on_stop(self) -> None:
        self._close()


# --- the token refresher (control plane) -----------------------------------------------------


class TokenRefresherUser(FastHttpUser):
    """Refreshes its runtime token as the Room UI does (at 80 % of its life, compressed here):
    ``POST {control}/api/cloud/instances/{id}/refresh-token {token}`` → ``{ok, token}``, with the
    runtime's origin as ``Origin`` (the Room UI runs there). Counted under ``refresh``.

    With ``BENCH_RUNTIME_URL``, each new token is then used at the runtime it is for
    (``GET /api/rooms``): counted under ``runtime``, so a refreshed token the runtime refuses is
    an error, while the refresh latency stays the control plane's alone.

    Only runs when the driver gives a control plane (``BENCH_CP_URL`` and a ``control_plane``
    pool of runtime tokens the control plane itself issued): weight 0 otherwise.
    """

    weight = 1 if CP_URL and TOKENS.get("control_plane") else 0
    wait_time = between(*refresh_wait())

    def on_start(self) -> None:
        self.token = take_token("control_plane")
        # Start at a random phase of the interval, as Room UIs opened at different times do.
        # Spawned together, all refreshers would fire their first refresh in the same instant: a
        # burst of 20 queued behind one another (~5 ms each) that set the run's p99 (80-140 ms)
        # while the steady state's was ~16 ms (measured 2026-12-05, bench/README.md).
        gevent.sleep(random.uniform(0, refresh_wait()[1]))

    def context(self) -> dict[str, Any]:
        return {"category": "refresh"}

    @task
    def refresh(self) -> None:
        url = f"{CP_URL.rstrip('/')}/api/cloud/instances/{INSTANCE_ID}/refresh-token"
        with self.client.post(
            url,
            json={"token": self.token},
            # The token in the body is the proof. A browser on the runtime's origin sends that
            # origin, which the control plane checks against the instance (BENCH_CP_ORIGIN).
            headers={"origin": CP_ORIGIN} if CP_ORIGIN else {},
            name="/api/cloud/instances/{id}/refresh-token",
            catch_response=True,
        ) as r:
            body = r.json() if r.status_code == 200 else {}
            if r.status_code == 200 and body.get("ok") and body.get("token"):
                self.token = body["token"]
                r.success()
            else:
                r.failure(f"refresh failed: {r.status_code}")
                return
        if RUNTIME_URL:
            self.use_at_runtime()

    def use_at_runtime(self) -> None:
        headers = {"authorization": f"Bearer {self.token}"}
        if CP_ORIGIN:
            headers["origin"] = CP_ORIGIN
        with self.client.get(
            f"{RUNTIME_URL.rstrip('/')}/api/rooms",
            headers=headers,
            name="runtime /api/rooms [refreshed token]",
            context={"category": "runtime"},
            catch_response=True,
        ) as r:
            expect(r, 200)


# --- abusers ---------------------------------------------------------------------------------


class FloodUser(FastHttpUser):
    """A valid token hammering GET /api/rooms from one address at ``BENCH_FLOOD_RPS`` per user.

    The driver runs several of these sharing one address and one token, so together they send
    20x the address budget. A 200 (inside the budget) and a 429 are both expected outcomes;
    anything else is a failure. Counted under the ``flood`` category.
    """

    fixed_count = 4
    weight = 0
    wait_time = paced_by_phase(constant_throughput(FLOOD_RPS))
    _shared: dict[str, str] = {}

    def on_start(self) -> None:
        gevent.sleep(until_abuse(time.time()))
        if not FloodUser._shared:
            FloodUser._shared.update(token=take_token("abuser"), address=new_address())
        address = FloodUser._shared["address"]
        self.headers = {
            "authorization": f"Bearer {FloodUser._shared['token']}",
            "fly-client-ip": address,
            "x-forwarded-for": address,
        }

    def context(self) -> dict[str, Any]:
        return {"category": "flood"}

    @task
    def flood(self) -> None:
        with self.client.get(
            "/api/rooms", headers=self.headers, name="flood /api/rooms", catch_response=True
        ) as r:
            expect(r, 200, 429)


class AbuserUser(FastHttpUser):
    """No token, forged tokens, unknown kids, oversized and chunked bodies, disallowed origins.

    Each attempt's refusal (401/403/413, or 429 once its address budget is spent) is the expected
    outcome and marked success; one that gets through is a failure named after the attack.
    """

    fixed_count = 1
    weight = 0
    wait_time = paced_by_phase(constant_throughput(5))

    def on_start(self) -> None:
        gevent.sleep(until_abuse(time.time()))
        self.address = new_address()
        self.base = {"fly-client-ip": self.address, "x-forwarded-for": self.address}

    def context(self) -> dict[str, Any]:
        return {"category": "abuse"}

    def _get(self, name: str, headers: dict[str, str], *statuses: int) -> None:
        with self.client.get(
            "/api/rooms", headers={**self.base, **headers}, name=name, catch_response=True
        ) as r:
            expect(r, *statuses, 429)

    @task
    def no_token(self) -> None:
        self._get("abuse: no token", {}, 401)

    @task
    def garbage_token(self) -> None:
        self._get("abuse: garbage token", {"authorization": "Bearer not.a.jwt"}, 401)

    @task
    def forged_token(self) -> None:
        token = take_token("forged")
        self._get("abuse: forged signature", {"authorization": f"Bearer {token}"}, 401)

    @task
    def unknown_kid(self) -> None:
        token = take_token("unknown_kid")
        self._get("abuse: unknown kid", {"authorization": f"Bearer {token}"}, 401)

    @task
    def disallowed_origin(self) -> None:
        headers = {"authorization": f"Bearer {take_token('abuser')}", "origin": BAD_ORIGIN}
        self._get("abuse: disallowed origin", headers, 403)

    @task
    def oversized_body(self) -> None:
        self._raw_post("abuse: oversized body (content-length)", chunked=False)

    @task
    def chunked_body(self) -> None:
        self._raw_post("abuse: oversized body (chunked)", chunked=True)

    @task
    def websocket_bad_origin(self) -> None:
        started = time.perf_counter()
        url = str(self.host).replace("http://", "ws://", 1).rstrip("/") + "/ws"
        token = take_token("abuser")
        headers = [f"{k}: {v}" for k, v in self.base.items()]
        try:
            ws = websocket.create_connection(
                url,
                subprotocols=["quoroom", f"quoroom.bearer.{token}"],
                origin=BAD_ORIGIN,
                header=headers,
                timeout=5,
            )
        except websocket.WebSocketBadStatusException as exc:
            ok = exc.status_code in (403, 429)
            fire(
                self.environment,
                "abuse",
                "WS",
                "abuse: WS disallowed origin",
                started,
                None if ok else exc,
                exc.status_code,
            )
            return
        except Exception as exc:
            fire(self.environment, "abuse", "WS", "abuse: WS disallowed origin", started, exc)
            return
        ws.close()
        fire(
            self.environment,
            "abuse",
            "WS",
            "abuse: WS disallowed origin",
            started,
            RuntimeError("upgrade from a disallowed origin was accepted"),
            101,
        )

    def _raw_post(self, name: str, *, chunked: bool) -> None:
        """A body over the cap, sent on a raw socket so the early refusal can be read."""
        host, _, port = str(self.host).removeprefix("http://").rstrip("/").partition(":")
        size = BODY_CAP + 512 * 1024
        token = take_token("abuser")
        head = [
            "POST /api/rooms HTTP/1.1",
            f"Host: {host}:{port}",
            f"Authorization: Bearer {token}",
            "Content-Type: application/json",
            *(f"{k}: {v}" for k, v in self.base.items()),
            "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}",
        ]
        started = time.perf_counter()
        status = 0
        exc: BaseException | None = None
        try:
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
                chunk = b"[" * (64 * 1024)
                try:
                    for _ in range(size // len(chunk)):
                        if chunked:
                            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        else:
                            sock.sendall(chunk)
                    if chunked:
                        sock.sendall(b"0\r\n\r\n")
                except OSError:
                    pass  # refused mid-body and closed: read what was answered
                reply = sock.recv(4096)
                status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0
        except (OSError, ValueError, IndexError) as error:
            exc = error
        if exc is None and status not in (413, 429):
            exc = RuntimeError(f"expected 413, got {status or 'no answer'}")
        fire(self.environment, "abuse", "HTTP", name, started, exc, status or None)
