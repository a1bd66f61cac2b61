"""The reference Room's routes, error handlers and ``create_room_app``."""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any, Final

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from .._errors import ConfigError
from .._scope import principal_of
from .bodies import VOTES, _json_object, _text, _vote
from .dashboard import _APP_JS, _INDEX_HTML
from .events import EventHub
from .local_auth import _LOOPBACK_NAMES, _hostname, _is_loopback_ip, _is_loopback_origin, _LocalAuth
from .store import ApiError, RoomStore, _not_found, _now, _room
from .ws_protocol import _serve_socket

MAX_ROOMS: Final = 1000
MAX_REPLIES: Final = 1000


def _version() -> str:
    try:
        return metadata.version("quoroom-cloud")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+source"


VERSION: Final = _version()


def _actor(request: Request | WebSocket) -> str:
    principal = principal_of(request.scope)
    return principal.subject if principal is not None else "local"


def _tally(decision: dict[str, Any]) -> dict[str, Any]:
    counts = dict.fromkeys(VOTES, 0)
    for vote in decision["votes"].values():
        counts[vote] += 1
    return {**decision, "tally": counts}


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

    def voter(keeper: bool) -> Callable[[Request], Awaitable[Response]]:
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
