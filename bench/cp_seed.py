"""A control plane on loopback, seeded through its public API, for the load bench's refresher.

:func:`seeded_control_plane` starts ``control_plane.app:create_app`` under uvicorn in a subprocess
(settings through ``QUOROOM_CP_*`` variables: development, SQLite in a temporary ``VAR_DIR``, no
Stripe keys so billing is disabled, the in-process worker ON with the ``local`` provider) and
seeds it the way people would, over HTTP:

1. ``users`` accounts sign up (``POST /api/auth/signup``), each verified by the link the mail
   outbox (``VAR_DIR/outbox/*.eml``) received (``POST /api/auth/verify-email``), then sign in with
   ``{"transport": "body"}`` (one session each: the ``sid`` of their runtime tokens);
2. the first creates an instance (``POST /api/cloud/instances``). Billing disabled, it goes
   straight to ``provisioning``; the worker provisions it with the local provider, which starts a
   REAL runtime (``python -m room_cloud_runtime.cli serve`` on a loopback port, issuer and JWKS
   pointing at this control plane) and moves the instance to ``running`` only once that runtime
   answers ``/healthz``. The others are invited as members (``POST …/members``) and each
   accepts (``POST /api/cloud/invitations/{id}/accept``);
3. each user gets a runtime token (``POST …/runtime-token``), and one of them is shown to the
   runtime (``GET {runtime}/api/rooms``) to prove the runtime accepts what the control plane
   issued.

Why the worker and not a row written to ``running`` by hand: it is the honest state (a runtime
that exists, at the URL the tokens name, verifying them against the control plane's JWKS), and it
is cheap here — the local provider boots a runtime in about a second.

Each user signs in from its own address (``Fly-Client-IP``, with ``TRUST_FLY_CLIENT_IP`` on, as
behind Fly's proxy), so the real sign-up and sign-in throttles apply per user, unchanged.
"""

from __future__ import annotations

import base64
import email
import email.policy
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
TIER, REGION = "starter", "iad"  # the built-in development catalog
VERIFY_LINK = re.compile(r"/verify-email#token=([A-Za-z0-9_\-.~%]+)")


class SeedError(RuntimeError):
    """The control plane did not start or the seeding did not reach a running instance."""


@dataclass
class Seeded:
    """What the refresher needs, and how the seeding went."""

    url: str  # the control plane
    instance_id: str
    runtime_url: str
    origin: str  # the runtime's origin (the Room UI's, sent as Origin on a refresh)
    tokens: list[str]  # one runtime token per user (the first the owner's)
    pids: dict[str, int] = field(default_factory=dict)  # "control_plane", "runtime"
    seconds: dict[str, float] = field(default_factory=dict)  # per seeding phase

    def note(self) -> str:
        s = self.seconds
        return (
            f"seeded through the public API in {sum(s.values()):.1f} s: control plane up "
            f"{s.get('start', 0):.1f} s; {len(self.tokens)} sign-ups verified from the outbox "
            f"{s.get('signup', 0):.1f} s; {len(self.tokens)} sign-ins {s.get('login', 0):.1f} s; "
            f"instance created → running (local provider, a real runtime at {self.runtime_url}) "
            f"{s.get('provision', 0):.1f} s; {len(self.tokens) - 1} members and "
            f"{len(self.tokens)} runtime tokens {s.get('tokens', 0):.1f} s."
        )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


#: Set (as for the test suite), the bench's control plane runs on a fresh PostgreSQL database made
#: on that server for the run and dropped after it; unset, on SQLite in its temporary VAR_DIR.
PG_URL = os.environ.get("QUOROOM_TEST_DATABASE_URL")


def store_name() -> str:
    return "PostgreSQL" if PG_URL else "SQLite"


@contextmanager
def _database(var_dir: Path) -> Iterator[str]:
    """The control plane's database URL for one run (see ``PG_URL``)."""
    if not PG_URL:
        yield f"sqlite+aiosqlite:///{var_dir / 'cp.db'}"
        return
    import asyncio
    import uuid

    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine

    async def admin(sql: str) -> None:
        engine = create_async_engine(PG_URL, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                await conn.execute(text(sql))
        finally:
            await engine.dispose()

    name = f"cp_bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def cp_env(var_dir: Path, port: int, database_url: str | None = None) -> dict[str, str]:
    """The control plane's settings as its environment (no inherited ``QUOROOM_CP_*``)."""
    kek = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("QUOROOM_CP_")},
        "QUOROOM_CP_ENV": "development",
        "QUOROOM_CP_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "QUOROOM_CP_VAR_DIR": str(var_dir),
        "QUOROOM_CP_DATABASE_URL": database_url or f"sqlite+aiosqlite:///{var_dir / 'cp.db'}",
        "QUOROOM_CP_AUTO_MIGRATE": "true",
        "QUOROOM_CP_PROVIDER": "local",
        "QUOROOM_CP_RUN_WORKER": "true",
        "QUOROOM_CP_TRUST_FLY_CLIENT_IP": "true",
        # One owner invites every seeded user to one instance (the defaults allow 30 an hour).
        "QUOROOM_CP_THROTTLE_INVITE_OWNER": "100000/hour",
        "QUOROOM_CP_THROTTLE_INVITE_INSTANCE": "100000/hour",
        # Each refresher renews its token every 0.5-1.5 s to make 20 refreshes/s with 20 users,
        # ~60 a minute per session where a real UI makes one per token lifetime: the per-session
        # quota (default 30/minute, issue 14 item 4) is set above that load, as the runtime's
        # budgets are in the other scenarios.
        "QUOROOM_CP_RUNTIME_TOKENS_PER_MINUTE": "10000",
        "QUOROOM_CP_KEY_ENCRYPTION_KEY": kek,
        "QUOROOM_CP_SECRET_KEY": secrets.token_urlsafe(48),
    }


def control_plane_argv(port: int, pin: Sequence[str] = ()) -> list[str]:
    """The control plane under uvicorn (1 worker, httptools + uvloop, no access log) on loopback."""
    return [
        *pin,
        sys.executable,
        "-m",
        "uvicorn",
        "control_plane.app:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
        "--http",
        "httptools",
        "--loop",
        "uvloop",
    ]


@contextmanager
def control_plane(var_dir: Path, pin: Sequence[str] = ()) -> Iterator[tuple[str, int]]:
    """The control plane under uvicorn (1 worker, httptools + uvloop, no access log) on a free
    loopback port; yields ``(url, pid)``; stops it, and the runtimes it started, on exit."""
    with _database(var_dir) as database_url:
        port = _free_port()
        log = open(var_dir / "control_plane.log", "ab")  # closed below
        proc = subprocess.Popen(
            control_plane_argv(port, pin),
            env=cp_env(var_dir, port, database_url),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    response = httpx.get(f"{url}/healthz", timeout=1, trust_env=False)
                    if response.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SeedError(f"the control plane did not start:\n{_tail(var_dir)}")
                time.sleep(0.05)
            yield url, proc.pid
        finally:
            proc.terminate()  # graceful: its lifespan stops the runtimes the local provider started
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            _stop_leftover_runtimes(var_dir)


def _tail(var_dir: Path, size: int = 3000) -> str:
    try:
        return (var_dir / "control_plane.log").read_text(errors="replace")[-size:]
    except OSError:
        return ""


def _stop_leftover_runtimes(var_dir: Path) -> None:
    """Runtimes run in their own session; if the control plane could not stop them (killed),
    stop the ones recorded under this VAR_DIR — by pid, after checking it is that runtime."""
    import json

    for state_file in (var_dir / "instances").glob("*/runtime.json"):
        try:
            state = json.loads(state_file.read_text())
            pid = int(state["pid"])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if b"room_cloud_runtime" in cmdline:
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass


# --- seeding, through the public API -------------------------------------------------------------


def _address(i: int) -> str:
    return f"10.77.{(i >> 8) & 255}.{(i & 255) or 1}" if i else "10.77.0.254"


def _check(response: httpx.Response, *statuses: int) -> dict[str, Any]:
    if response.status_code not in statuses:
        raise SeedError(
            f"{response.request.method} {response.request.url.path}: "
            f"{response.status_code} {response.text[:300]}"
        )
    body: dict[str, Any] = response.json() if response.content else {}
    return body


def _verify_links(outbox: Path, emails: Sequence[str], timeout: float = 30) -> dict[str, str]:
    """``{address: verification token}`` read from the outbox's ``.eml`` files (delivered in the
    background after each sign-up commits)."""
    wanted, found = set(emails), {}
    deadline = time.monotonic() + timeout
    while True:
        for path in outbox.glob("*.eml") if outbox.exists() else ():
            message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            to = str(message["To"])
            if to in wanted and to not in found:
                body = message.get_body(preferencelist=("plain",))
                link = VERIFY_LINK.search(body.get_content() if body else "")
                if link:
                    found[to] = link.group(1)
        if len(found) == len(wanted):
            return found
        if time.monotonic() > deadline:
            raise SeedError(f"no verification mail for {sorted(wanted - set(found))[:3]}…")
        time.sleep(0.05)


def seed(url: str, var_dir: Path, users: int, *, provision_timeout: float = 90) -> Seeded:
    """Accounts, one running instance shared by them (owner + members), one runtime token each."""
    if users < 1:
        raise ValueError("at least one user")
    seconds: dict[str, float] = {}
    emails = [f"bench-{i}@bench.example.com" for i in range(users)]
    password = secrets.token_urlsafe(18)
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as client:
        started = time.perf_counter()
        for i, address in enumerate(emails):
            body = {"email": address, "password": password, "name": f"Bench {i}"}
            headers = {"fly-client-ip": _address(i)}
            _check(client.post("/api/auth/signup", json=body, headers=headers), 202)
        links = _verify_links(Path(var_dir) / "outbox", emails)
        for address in emails:
            _check(client.post("/api/auth/verify-email", json={"token": links[address]}), 200)
        seconds["signup"] = time.perf_counter() - started

        started = time.perf_counter()
        bearers = []
        for i, address in enumerate(emails):
            body = {"email": address, "password": password, "transport": "body"}
            headers = {"fly-client-ip": _address(i)}
            signed = _check(client.post("/api/auth/login", json=body, headers=headers), 200)
            bearers.append({"authorization": f"Bearer {signed['access_token']}"})
        seconds["login"] = time.perf_counter() - started

        started = time.perf_counter()
        owner = bearers[0]
        created = _check(
            client.post(
                "/api/cloud/instances",
                json={"name": "Load bench", "tier": TIER, "region": REGION, "goal": "refreshes"},
                headers={**owner, "idempotency-key": secrets.token_hex(16)},
            ),
            201,
        )
        instance_id = str(created["instance"]["id"])
        deadline = time.monotonic() + provision_timeout
        while True:
            instance = _check(client.get(f"/api/cloud/instances/{instance_id}", headers=owner), 200)
            if instance["status"] == "running" and instance.get("url"):
                break
            if instance["status"] in ("failed", "canceled") or time.monotonic() > deadline:
                raise SeedError(
                    f"instance {instance['status']} (step {instance.get('step')}, "
                    f"error {instance.get('error')}):\n{_tail(Path(var_dir))}"
                )
            time.sleep(0.1)
        runtime_url = str(instance["url"]).rstrip("/")
        seconds["provision"] = time.perf_counter() - started

        started = time.perf_counter()
        for address, bearer in zip(emails[1:], bearers[1:], strict=True):
            member = _check(
                client.post(
                    f"/api/cloud/instances/{instance_id}/members",
                    json={"email": address},
                    headers=owner,
                ),
                202,
            )
            # An invitation: each member accepts it (in the app) before the Room is theirs.
            _check(
                client.post(f"/api/cloud/invitations/{member['id']}/accept", headers=bearer), 200
            )
        tokens = []
        for bearer in bearers:
            issued = _check(
                client.post(f"/api/cloud/instances/{instance_id}/runtime-token", headers=bearer),
                200,
            )
            tokens.append(str(issued["token"]))
        seconds["tokens"] = time.perf_counter() - started
    origin = runtime_origin(runtime_url)
    # The runtime accepts what the control plane issued (its JWKS fetched from the control plane).
    proof = httpx.get(
        f"{runtime_url}/api/rooms",
        headers={"authorization": f"Bearer {tokens[-1]}", "origin": origin},
        timeout=10,
        trust_env=False,
    )
    if proof.status_code != 200:
        raise SeedError(f"the runtime refused a control-plane token: {proof.status_code}")
    return Seeded(url, instance_id, runtime_url, origin, tokens, seconds=seconds)


def runtime_origin(url: str) -> str:
    """``scheme://host[:port]`` of the runtime URL (what the control plane compares Origin to)."""
    parts = httpx.URL(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    port = f":{parts.port}" if parts.port not in (None, default) else ""
    return f"{parts.scheme}://{parts.host}{port}"


def _runtime_pid(var_dir: Path, instance_id: str) -> int | None:
    import json

    try:
        state = json.loads((var_dir / "instances" / instance_id / "runtime.json").read_text())
        return int(state["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextmanager
def seeded_control_plane(users: int, pin: Sequence[str] = ()) -> Iterator[Seeded]:
    """A fresh control plane in a temporary ``VAR_DIR``, seeded (see the module docstring);
    everything stopped and removed on exit."""
    var_dir = Path(tempfile.mkdtemp(prefix="bench-cp-load-"))
    try:
        started = time.perf_counter()
        with control_plane(var_dir, pin) as (url, pid):
            up = time.perf_counter() - started
            seeded = seed(url, var_dir, users)
            seeded.seconds = {"start": up, **seeded.seconds}
            seeded.pids["control_plane"] = pid
            runtime = _runtime_pid(var_dir, seeded.instance_id)
            if runtime is not None:
                seeded.pids["runtime"] = runtime
            yield seeded
    finally:
        shutil.rmtree(var_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.cp_seed [--users N]``: start and seed, print what was seeded, stop."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.cp_seed", description=__doc__)
    parser.add_argument("--users", type=int, default=3)
    args = parser.parse_args(argv)
    with seeded_control_plane(args.users) as seeded:
        print(seeded.note())
        print(f"control plane {seeded.url}, instance {seeded.instance_id}, origin {seeded.origin}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
