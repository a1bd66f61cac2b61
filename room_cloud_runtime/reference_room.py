"""A small ASGI app shaped like the Room's API: for tests, the demo, benchmarks and the Fly image.

It is not the Room. It answers the routes the runtime stack and the dashboard care about with
the Room's shapes (``{"error", "code"}`` errors, the local handshake, ``/ws`` live events), keeps
its state in memory and, given ``data_dir``, in an atomically written ``room.json`` so a Fly
volume keeps it across restarts.

Two ways in, as in the Room:

- **local mode** (no principal in ``scope["state"]``): a loopback client learns the local token
  from ``GET /api/auth/handshake``; every other ``/api/`` route but ``/api/status`` and ``/ws``
  need it as ``Authorization: Bearer`` (``/ws`` also takes ``?token=``, since browsers cannot
  set headers on a WebSocket).
- **behind the cloud stack**: the stack has authenticated and authorised the request and put a
  :class:`~room_cloud_runtime._scope.Principal` in the scope; the app trusts it, records its
  subject on writes and refuses the handshake.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from ._errors import CloudRuntimeError, ConfigError
from ._responses import deny_websocket, send_error
from ._scope import principal_of

__all__ = ["SNAPSHOT_NAME", "ApiError", "create_room_app"]

SNAPSHOT_NAME: Final = "room.json"
SNAPSHOT_FORMAT: Final = 1
MAX_BODY_BYTES: Final = 64 * 1024
MAX_WS_MESSAGE_CHARS: Final = 16 * 1024
MAX_SUBSCRIPTIONS: Final = 64
WS_BUFFER: Final = 256
MAX_ROOMS: Final = 1000
MAX_REPLIES: Final = 1000
VOTES: Final = ("yes", "no", "abstain")
# Routes a local client may call without the local token, as in the Room.
_PUBLIC_API: Final = frozenset({"/api/status", "/api/auth/handshake"})
_LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})

try:
    VERSION: Final = metadata.version("quoroom-cloud")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0.0.0+source"  # type: ignore[misc]


class ApiError(CloudRuntimeError):
    """An error the API answers as ``{"error": message, "code": code}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _invalid(field: str, problem: str) -> ApiError:
    return ApiError(422, "invalid_body", f"{field}: {problem}")


def _not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- state and persistence -------------------------------------------------------------------


def _seed() -> dict[str, Any]:
    """A couple of rooms with open decisions, unread messages and an escalation."""
    at = _now()
    return {
        "format": SNAPSHOT_FORMAT,
        "counters": {"r": 2, "d": 3, "m": 3, "e": 2, "c": 2},
        "rooms": {
            "r1": _room("r1", "Research lab", "Find three grant programmes we qualify for", at),
            "r2": _room("r2", "Launch desk", "Ship the landing page by Friday", at),
        },
        "decisions": {
            "d1": _decision("d1", "r1", "Apply to the NLnet fund", at),
            "d2": _decision("d2", "r1", "Hire a second researcher worker", at),
            "d3": _decision("d3", "r2", "Use the dark theme for launch", at),
        },
        "messages": {
            "m1": _message("m1", "r1", "queen", "Two candidate funds found; see decision d1.", at),
            "m2": _message("m2", "r1", "worker:scout", "Deadline for NLnet is the 1st.", at),
            "m3": _message("m3", "r2", "queen", "Copy draft is ready for review.", at),
        },
        "escalations": {
            "e1": _escalation("e1", "r1", "May I spend $20 on a dataset?", at),
            "e2": _escalation("e2", "r2", "Which domain should the page use?", at),
        },
        "credentials": {
            "c1": _credential("c1", "r1", "openai_api_key", "api_key", at),
            "c2": _credential("c2", "r2", "anthropic_api_key", "api_key", at),
        },
    }


def _room(rid: str, name: str, goal: str | None, at: str, by: str = "system") -> dict[str, Any]:
    return {
        "id": rid,
        "name": name,
        "goal": goal,
        "status": "active",
        "createdAt": at,
        "createdBy": by,
    }


def _decision(did: str, room_id: str, proposal: str, at: str) -> dict[str, Any]:
    return {
        "id": did,
        "roomId": room_id,
        "proposal": proposal,
        "status": "voting",
        "votes": {},
        "keeperVote": None,
        "createdAt": at,
    }


def _message(mid: str, room_id: str, sender: str, text: str, at: str) -> dict[str, Any]:
    return {
        "id": mid,
        "roomId": room_id,
        "from": sender,
        "text": text,
        "createdAt": at,
        "readAt": None,
        "readBy": None,
        "replies": [],
    }


def _escalation(eid: str, room_id: str, question: str, at: str) -> dict[str, Any]:
    return {
        "id": eid,
        "roomId": room_id,
        "question": question,
        "status": "open",
        "resolution": None,
        "resolvedBy": None,
        "resolvedAt": None,
        "createdAt": at,
    }


def _credential(cid: str, room_id: str, name: str, kind: str, at: str) -> dict[str, Any]:
    # Never a real secret: the record only ever holds the mask the Room answers with.
    return {
        "id": cid,
        "roomId": room_id,
        "name": name,
        "type": kind,
        "valueEncrypted": "***",
        "createdAt": at,
    }


_COLLECTIONS: Final = ("rooms", "decisions", "messages", "escalations", "credentials")


def _check_snapshot(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"expected an object with format {SNAPSHOT_FORMAT}")
    counters = data.get("counters")
    if not isinstance(counters, dict) or not all(isinstance(v, int) for v in counters.values()):
        raise ValueError("counters must be an object of integers")
    for name in _COLLECTIONS:
        collection = data.get(name)
        if not isinstance(collection, dict) or not all(
            isinstance(v, dict) for v in collection.values()
        ):
            raise ValueError(f"{name} must be an object of records")
    return data


def _write_atomically(path: Path, payload: bytes) -> None:
    """Temp file in the same directory, fsync, os.replace: a crash leaves old or new, not half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable (POSIX); not possible on every platform.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class RoomStore:
    """The app's state: plain dicts mutated on the event loop, snapshotted after each write.

    Mutations happen between awaits, so each is atomic with respect to other requests. Saves
    run in a worker thread; a version counter makes a slow older save never overwrite a newer
    one.
    """

    def __init__(self, data_dir: str | None) -> None:
        self.path = Path(data_dir, SNAPSHOT_NAME) if data_dir else None
        self.data = self._load()
        self._version = 0
        self._saved_version = 0
        self._save_lock = anyio.Lock()

    def _load(self) -> dict[str, Any]:
        if self.path is None:
            return _seed()
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return _seed()
        except OSError as exc:
            raise ConfigError("data_dir", f"cannot read {self.path}: {exc}") from exc
        try:
            return _check_snapshot(json.loads(raw))
        except ValueError as exc:
            # Refuse to start rather than overwrite the operator's data with a fresh seed.
            raise ConfigError("data_dir", f"{self.path} is not a valid snapshot: {exc}") from exc

    def collection(self, name: str) -> dict[str, dict[str, Any]]:
        return self.data[name]

    def get(self, name: str, key: str, what: str) -> dict[str, Any]:
        record = self.data[name].get(key)
        if record is None:
            raise _not_found(what)
        return record

    def next_id(self, prefix: str) -> str:
        counters: dict[str, int] = self.data["counters"]
        counters[prefix] = counters.get(prefix, 0) + 1
        return f"{prefix}{counters[prefix]}"

    async def commit(self) -> None:
        """Persist the current state (no-op in memory mode). Call after every mutation."""
        if self.path is None:
            return
        self._version += 1
        version = self._version
        # Serialised on the loop, so the snapshot is consistent; written off it.
        payload = json.dumps(self.data, separators=(",", ":"), sort_keys=True).encode()
        async with self._save_lock:
            if version <= self._saved_version:
                return
            await anyio.to_thread.run_sync(_write_atomically, self.path, payload)
            self._saved_version = version


# --- live events -----------------------------------------------------------------------------


class _Subscriber:
    __slots__ = ("outbox", "overflowed", "rooms")

    def __init__(self, outbox: MemoryObjectSendStream[dict[str, Any]]) -> None:
        self.outbox = outbox
        self.rooms: set[str] = set()
        self.overflowed = False

    def offer(self, message: dict[str, Any]) -> bool:
        """Queue without waiting. A client too slow to drain its buffer is cut off (the writer
        closes it with 1013) rather than letting its queue grow without bound."""
        try:
            self.outbox.send_nowait(message)
        except anyio.WouldBlock:
            self.overflowed = True
            self.outbox.close()
            return False
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        return True


class EventHub:
    """Fans events out to the WebSockets subscribed to their room (or to ``"*"``)."""

    def __init__(self) -> None:
        self._subscribers: set[_Subscriber] = set()

    def add(self, subscriber: _Subscriber) -> None:
        self._subscribers.add(subscriber)

    def discard(self, subscriber: _Subscriber) -> None:
        self._subscribers.discard(subscriber)

    def publish(self, room_id: str, event: dict[str, Any]) -> None:
        message = {**event, "roomId": room_id, "at": event.get("at") or _now()}
        for subscriber in tuple(self._subscribers):
            if room_id in subscriber.rooms or "*" in subscriber.rooms:
                subscriber.offer(message)


# --- request helpers -------------------------------------------------------------------------


def _actor(request: Request | WebSocket) -> str:
    principal = principal_of(request.scope)
    return principal.subject if principal is not None else "local"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _json_object(request: Request, allowed: frozenset[str]) -> dict[str, Any]:
    """Read the body with a size cap, parse it strictly, and refuse unknown fields."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, "body_too_large", f"body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise ApiError(400, "invalid_json", "request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise _invalid("body", "must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _invalid(unknown[0], "is not an accepted field")
    return body


def _text(body: dict[str, Any], field: str, *, max_len: int, required: bool = True) -> str | None:
    value = body.get(field)
    if value is None:
        if required:
            raise _invalid(field, "is required")
        return None
    if not isinstance(value, str):
        raise _invalid(field, "must be a string")
    value = value.strip()
    if required and not value:
        raise _invalid(field, "must not be blank")
    if len(value) > max_len:
        raise _invalid(field, f"must be at most {max_len} characters")
    return value or None


def _vote(body: dict[str, Any]) -> str:
    value = body.get("vote")
    if value is None:
        raise _invalid("vote", "is required")
    if not isinstance(value, str) or value not in VOTES:
        raise _invalid("vote", f"must be one of {', '.join(VOTES)}")
    return value


def _tally(decision: dict[str, Any]) -> dict[str, Any]:
    counts = dict.fromkeys(VOTES, 0)
    for vote in decision["votes"].values():
        counts[vote] += 1
    return {**decision, "tally": counts}


def _is_loopback_ip(host: str | None) -> bool:
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


def _hostname(authority: str) -> str:
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1 : authority.find("]")] if "]" in authority else ""
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def _is_loopback_origin(origin: str) -> bool:
    scheme, sep, rest = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and _hostname(rest) in _LOOPBACK_NAMES


# --- local auth ------------------------------------------------------------------------------


class _LocalAuth:
    """Local mode's token check, as pure ASGI so a refusal never reaches a route.

    Skipped when an outer stack has put a principal in the scope: that stack has already
    authenticated and authorised the request.
    """

    def __init__(self, app: ASGIApp, *, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or principal_of(scope) is not None:
            await self.app(scope, receive, send)
            return
        # Lower-cased and without a trailing slash, so /API/Rooms/ is not a way around this.
        path = scope["path"].lower().rstrip("/") or "/"
        needs_token = kind == "websocket" or (
            (path == "/api" or path.startswith("/api/")) and path not in _PUBLIC_API
        )
        if not needs_token or self._presented_ok(scope):
            await self.app(scope, receive, send)
            return
        if kind == "websocket":
            await deny_websocket(scope, send, 401, "local token required", "unauthenticated")
        else:
            await send_error(
                send,
                401,
                "local token required",
                "unauthenticated",
                [(b"www-authenticate", b'Bearer realm="quoroom-room"')],
            )

    def _presented_ok(self, scope: Scope) -> bool:
        presented: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    presented = credentials.strip()
                break
        if presented is None and scope["type"] == "websocket":
            # Browsers cannot set headers on a WebSocket; the Room takes ?token= (never logged).
            for pair in scope.get("query_string", b"").split(b"&"):
                key, _, value = pair.partition(b"=")
                if key == b"token":
                    presented = value
                    break
        # compare_digest: no timing side channel on how much of the token matched.
        return presented is not None and hmac.compare_digest(presented, self._token)


# --- the app ---------------------------------------------------------------------------------

_INDEX_HTML: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>Quoroom Room</title>
<script src="/assets/app.js" defer></script>
<style>
body { font: 16px/1.5 system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2430; }
main { max-width: 48rem; margin: 0 auto; padding: 1.25rem; }
.bar { display: flex; gap: .75rem; align-items: center; flex-wrap: wrap; }
.role { border-radius: 999px; padding: .1rem .7rem; background: #e8ebff; color: #3a4fd8;
  font-weight: 700; }
#rooms { list-style: none; padding: 0; display: grid; gap: .75rem; }
#rooms li { background: #fff; border: 1px solid #d9dee5; border-radius: 10px; padding: 1rem; }
#rooms h2 { font-size: 1.1rem; margin: 0 0 .25rem; }
.muted { color: #5b6573; }
[data-state=error] { color: #b3261e; }
</style>
</head>
<body>
<main>
<div class="bar">
<h1>Quoroom Room</h1>
<span id="role" class="role" hidden></span>
</div>
<p id="who" class="muted" hidden></p>
<p id="status" role="status">Connecting&hellip;</p>
<ul id="rooms" aria-label="Rooms"></ul>
</main>
</body>
</html>
"""

_APP_JS: Final = """// Placeholder dashboard (the real UI is the Room bundle).
// Cloud mode: the control plane opens this page as /#launch=<runtime token>. The token is taken
// out of the address bar at once (history.replaceState), kept in sessionStorage for this tab,
// sent as Authorization: Bearer, and refreshed at 80 % of its life through the control plane
// (the token's iss, trusted once /api/auth/verify has accepted the token).
(() => {
  const KEY = "quoroom.runtimeToken";
  const statusEl = document.getElementById("status");
  const roleEl = document.getElementById("role");
  const whoEl = document.getElementById("who");
  const roomsEl = document.getElementById("rooms");
  let refreshTimer = null;

  function show(text, state) {
    statusEl.textContent = text;
    statusEl.dataset.state = state;
  }

  function takeLaunchToken() {
    const params = new URLSearchParams(location.hash.slice(1));
    const launched = params.get("launch");
    if (launched) {
      sessionStorage.setItem(KEY, launched);
      history.replaceState(null, "", location.pathname + location.search);
    }
    return sessionStorage.getItem(KEY);
  }

  function claimsOf(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const padded = part + "===".slice((part.length + 3) % 4);
      return JSON.parse(atob(padded));
    } catch (err) {
      return null;
    }
  }

  async function call(path, token) {
    const res = await fetch(path, {
      headers: { accept: "application/json", authorization: `Bearer ${token}` },
      cache: "no-store",
    });
    const body = await res.json().catch(() => ({}));
    return { res, body };
  }

  function controlPlane(claims) {
    return String(claims.iss || "").replace(/\\/+$/, "");
  }

  function signedOut(claims, why) {
    sessionStorage.removeItem(KEY);
    clearTimeout(refreshTimer);
    show(why, "error");
    const cp = claims && controlPlane(claims);
    if (cp && /^https?:\\/\\//.test(cp)) {
      const link = document.createElement("a");
      link.href = `${cp}/app`;
      link.textContent = " Open it again from your Rooms.";
      statusEl.append(link);
    }
  }

  async function refresh(token) {
    const claims = claimsOf(token);
    const url = `${controlPlane(claims)}/api/cloud/instances/${encodeURIComponent(
      claims.instanceId
    )}/refresh-token`;
    try {
      const res = await fetch(url, {
        method: "POST",
        headers: { "content-type": "application/json", accept: "application/json" },
        body: JSON.stringify({ token }),
        credentials: "omit",
        cache: "no-store",
      });
      const body = await res.json().catch(() => ({}));
      if (res.ok && body.ok && body.token) {
        sessionStorage.setItem(KEY, body.token);
        schedule(body.token);
        return body.token;
      }
      signedOut(claims, `Your access ended (${body.error || res.status}).`);
    } catch (err) {
      refreshTimer = setTimeout(() => refresh(token), 5000); // the control plane is unreachable
    }
    return null;
  }

  function schedule(token) {
    const claims = claimsOf(token);
    if (!claims || !claims.exp) return;
    const issued = claims.iat || claims.nbf || Math.floor(Date.now() / 1000);
    const at = (issued + 0.8 * (claims.exp - issued)) * 1000;
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(() => refresh(token), Math.max(1000, at - Date.now()));
  }

  function renderRooms(rooms) {
    roomsEl.replaceChildren();
    for (const room of rooms) {
      const item = document.createElement("li");
      item.dataset.id = room.id;
      const title = document.createElement("h2");
      title.textContent = room.name;
      const goal = document.createElement("p");
      goal.className = "muted";
      goal.textContent = room.goal || "";
      item.append(title, goal);
      roomsEl.append(item);
    }
  }

  async function cloud(token) {
    let { res, body } = await call("/api/auth/verify", token);
    if (res.status === 401) {
      // Expired while the tab slept: refresh needs a still-valid token, so this usually ends.
      signedOut(claimsOf(token), "Your session in this Room has expired.");
      return;
    }
    if (!res.ok || !body.ok) {
      show(`Error: ${body.error || res.status}`, "error");
      return;
    }
    roleEl.textContent = body.role;
    roleEl.dataset.role = body.role;
    roleEl.hidden = false;
    const profile = body.profile || {};
    const who = profile.name || profile.email;
    if (who) {
      whoEl.textContent = `Signed in as ${who}`;
      whoEl.hidden = false;
    }
    schedule(token);
    ({ res, body } = await call("/api/rooms", sessionStorage.getItem(KEY) || token));
    if (!res.ok) {
      show(`Error: ${body.error || res.status}`, "error");
      return;
    }
    renderRooms(body);
    show(`${body.length} room${body.length === 1 ? "" : "s"}`, "ok");
  }

  async function local() {
    const res = await fetch("/api/status", { headers: { accept: "application/json" } });
    const body = await res.json();
    if (!res.ok) {
      show(`Error: ${body.error}`, "error");
    } else if (body.deploymentMode === "cloud") {
      show("Open this Room from the control plane to sign in.", "signed-out");
    } else {
      show(`Room ${body.version}: ${body.rooms} rooms, up ${body.uptimeSeconds}s`, "ok");
    }
  }

  const token = takeLaunchToken();
  (token ? cloud(token) : local()).catch(() => show("Room unreachable", "error"));
})();
"""


def create_room_app(*, data_dir: str | None = None, local_token: str | None = None) -> Starlette:
    """Build the reference Room.

    ``data_dir``: where ``room.json`` lives (created if missing); ``None`` keeps state in memory
    only. ``local_token``: the local-mode bearer token; random when not given. The store, the
    event hub and the token are on ``app.state`` (``room_store``, ``events``, ``local_token``).
    A corrupt snapshot raises :class:`ConfigError` instead of being overwritten.
    """
    if local_token is not None and (not isinstance(local_token, str) or len(local_token) < 16):
        raise ConfigError("local_token", "must be a string of at least 16 characters")
    token = local_token or secrets.token_urlsafe(32)
    store = RoomStore(data_dir)
    hub = EventHub()
    started = time.monotonic()

    async def status(request: Request) -> Response:
        return JSONResponse(
            {
                "ok": True,
                "version": VERSION,
                "rooms": len(store.collection("rooms")),
                "uptimeSeconds": int(time.monotonic() - started),
            }
        )

    async def handshake(request: Request) -> Response:
        # The Room hands its token only to the machine it runs on. Host and Origin are checked
        # too: DNS rebinding lets a web page reach 127.0.0.1 under its own host name.
        client = request.client
        origin = request.headers.get("origin")
        if (
            principal_of(request.scope) is not None
            or not _is_loopback_ip(client.host if client else None)
            or _hostname(request.headers.get("host", "")) not in _LOOPBACK_NAMES
            or (origin is not None and not _is_loopback_origin(origin))
        ):
            raise ApiError(
                403, "handshake_forbidden", "the handshake is only answered on this machine"
            )
        return JSONResponse({"token": token}, headers={"cache-control": "no-store"})

    async def list_rooms(request: Request) -> Response:
        return JSONResponse(list(store.collection("rooms").values()))

    async def create_room(request: Request) -> Response:
        body = await _json_object(request, frozenset({"name", "goal"}))
        name = _text(body, "name", max_len=100)
        goal = _text(body, "goal", max_len=2000, required=False)
        rooms = store.collection("rooms")
        if len(rooms) >= MAX_ROOMS:
            raise ApiError(409, "limit_reached", f"at most {MAX_ROOMS} rooms")
        rid = store.next_id("r")
        room = rooms[rid] = _room(rid, name or "", goal, _now(), _actor(request))
        await store.commit()
        hub.publish(rid, {"type": "room.created", "room": room})
        return JSONResponse(room, status_code=201)

    async def get_room(request: Request) -> Response:
        rid = request.path_params["room_id"]
        room = store.get("rooms", rid, "room")
        related = {
            name: [r for r in store.collection(name).values() if r["roomId"] == rid]
            for name in ("decisions", "messages", "escalations")
        }
        related["decisions"] = [_tally(d) for d in related["decisions"]]
        return JSONResponse({**room, **related})

    def voter(keeper: bool) -> Callable[[Request], Any]:
        async def vote(request: Request) -> Response:
            decision = store.get("decisions", request.path_params["decision_id"], "decision")
            choice = _vote(await _json_object(request, frozenset({"vote"})))
            if decision["status"] != "voting":
                raise ApiError(409, "decision_closed", "voting on this decision has ended")
            actor, at = _actor(request), _now()
            if keeper:
                decision["keeperVote"] = {"vote": choice, "by": actor, "at": at}
            else:
                decision["votes"][actor] = choice
            await store.commit()
            hub.publish(
                decision["roomId"],
                {
                    "type": "vote",
                    "decisionId": decision["id"],
                    "vote": choice,
                    "keeper": keeper,
                    "by": actor,
                    "at": at,
                },
            )
            return JSONResponse(_tally(decision))

        return vote

    async def mark_read(request: Request) -> Response:
        rid = request.path_params["room_id"]
        store.get("rooms", rid, "room")
        message = store.get("messages", request.path_params["message_id"], "message")
        if message["roomId"] != rid:
            raise _not_found("message")
        if message["readAt"] is None:
            message["readAt"], message["readBy"] = _now(), _actor(request)
            await store.commit()
            hub.publish(
                rid, {"type": "message.read", "messageId": message["id"], "by": message["readBy"]}
            )
        return JSONResponse(message)

    async def reply(request: Request) -> Response:
        message = store.get("messages", request.path_params["message_id"], "message")
        text = _text(await _json_object(request, frozenset({"text"})), "text", max_len=10_000)
        if len(message["replies"]) >= MAX_REPLIES:
            raise ApiError(409, "limit_reached", f"at most {MAX_REPLIES} replies")
        entry = {"id": store.next_id("p"), "text": text, "by": _actor(request), "at": _now()}
        message["replies"].append(entry)
        await store.commit()
        hub.publish(
            message["roomId"], {"type": "message.reply", "messageId": message["id"], **entry}
        )
        return JSONResponse(entry, status_code=201)

    async def resolve(request: Request) -> Response:
        escalation = store.get("escalations", request.path_params["escalation_id"], "escalation")
        body = await _json_object(request, frozenset({"resolution"}))
        resolution = _text(body, "resolution", max_len=2000, required=False)
        if escalation["status"] != "open":
            raise ApiError(409, "already_resolved", "this escalation is already resolved")
        escalation.update(
            status="resolved", resolution=resolution, resolvedBy=_actor(request), resolvedAt=_now()
        )
        await store.commit()
        hub.publish(
            escalation["roomId"],
            {
                "type": "escalation.resolved",
                "escalationId": escalation["id"],
                "by": escalation["resolvedBy"],
            },
        )
        return JSONResponse(escalation)

    async def get_credential(request: Request) -> Response:
        return JSONResponse(
            store.get("credentials", request.path_params["credential_id"], "credential")
        )

    async def index(request: Request) -> Response:
        return HTMLResponse(_INDEX_HTML)

    async def app_js(request: Request) -> Response:
        return Response(
            _APP_JS,
            media_type="text/javascript; charset=utf-8",
            headers={"cache-control": "no-cache"},
        )

    async def live(websocket: WebSocket) -> None:
        await _serve_socket(websocket, store, hub)

    routes = [
        Route("/", index),
        Route("/assets/app.js", app_js),
        Route("/api/status", status),
        Route("/api/auth/handshake", handshake),
        Route("/api/rooms", list_rooms),
        Route("/api/rooms", create_room, methods=["POST"]),
        Route("/api/rooms/{room_id}", get_room),
        Route("/api/rooms/{room_id}/messages/{message_id}/read", mark_read, methods=["POST"]),
        Route("/api/decisions/{decision_id}/vote", voter(keeper=False), methods=["POST"]),
        Route("/api/decisions/{decision_id}/keeper-vote", voter(keeper=True), methods=["POST"]),
        Route("/api/messages/{message_id}/reply", reply, methods=["POST"]),
        Route("/api/escalations/{escalation_id}/resolve", resolve, methods=["POST"]),
        Route("/api/credentials/{credential_id}", get_credential),
        WebSocketRoute("/ws", live),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_LocalAuth, token=token)],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error},
    )
    app.state.room_store = store
    app.state.events = hub
    app.state.local_token = token
    return app


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse({"error": exc.message, "code": exc.code}, status_code=exc.status)


_HTTP_CODES: Final = {404: "not_found", 405: "method_not_allowed"}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return JSONResponse(
        {"error": str(exc.detail), "code": code}, status_code=exc.status_code, headers=exc.headers
    )


# --- WebSocket protocol ----------------------------------------------------------------------


def _ws_error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "error": message}


def _handle_ws_message(text: str, subscriber: _Subscriber, store: RoomStore) -> dict[str, Any]:
    """One client message in, one reply out. Bad input is answered, never raised."""
    if len(text) > MAX_WS_MESSAGE_CHARS:
        return _ws_error("message_too_large", f"messages are at most {MAX_WS_MESSAGE_CHARS} chars")
    try:
        message = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return _ws_error("invalid_json", "message is not valid JSON")
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return _ws_error("invalid_message", "message must be an object with a string type")
    kind = message["type"]
    if kind == "ping":
        return {"type": "pong"}
    if kind in ("subscribe", "unsubscribe"):
        room_id = message.get("roomId")
        if not isinstance(room_id, str) or not 0 < len(room_id) <= 64:
            return _ws_error("invalid_message", "roomId: must be a room id or '*'")
        if kind == "unsubscribe":
            subscriber.rooms.discard(room_id)
            return {"type": "unsubscribed", "roomId": room_id}
        if room_id != "*" and room_id not in store.collection("rooms"):
            return _ws_error("not_found", "room not found")
        if room_id not in subscriber.rooms and len(subscriber.rooms) >= MAX_SUBSCRIPTIONS:
            return _ws_error("too_many_subscriptions", f"at most {MAX_SUBSCRIPTIONS} rooms")
        subscriber.rooms.add(room_id)
        return {"type": "subscribed", "roomId": room_id}
    return _ws_error("unknown_type", "unknown message type")


async def _serve_socket(websocket: WebSocket, store: RoomStore, hub: EventHub) -> None:
    await websocket.accept()
    send_stream, receive_stream = anyio.create_memory_object_stream[dict[str, Any]](WS_BUFFER)
    subscriber = _Subscriber(send_stream)
    hub.add(subscriber)
    try:
        async with anyio.create_task_group() as tg:
            # One writer owns the socket's send side; replies and events share its queue, so
            # they are never interleaved mid-frame and a slow client is detected in one place.
            tg.start_soon(_write_socket, websocket, receive_stream, subscriber, tg.cancel_scope)
            await _read_socket(websocket, subscriber, store)
            tg.cancel_scope.cancel()
    finally:
        hub.discard(subscriber)
        send_stream.close()
        receive_stream.close()


async def _read_socket(websocket: WebSocket, subscriber: _Subscriber, store: RoomStore) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None:
            try:
                text = (message.get("bytes") or b"").decode()
            except UnicodeDecodeError:
                text = "\ufffd"  # answered as invalid JSON
        if not subscriber.offer(_handle_ws_message(text, subscriber, store)):
            return  # cut off as too slow: the writer closes the socket


async def _write_socket(
    websocket: WebSocket,
    outbox: MemoryObjectReceiveStream[dict[str, Any]],
    subscriber: _Subscriber,
    cancel_scope: anyio.CancelScope,
) -> None:
    try:
        async for message in outbox:
            await websocket.send_text(json.dumps(message, separators=(",", ":")))
        if subscriber.overflowed:
            await websocket.close(code=1013, reason="client too slow")
    except (WebSocketDisconnect, OSError):
        pass  # the client went away; the reader sees the disconnect
    finally:
        cancel_scope.cancel()
