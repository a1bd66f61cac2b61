"""The ``/ws`` protocol: subscribe to rooms, ping, get their events; one writer per socket."""

from __future__ import annotations

import json
from typing import Any, Final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream
from starlette.websockets import WebSocket, WebSocketDisconnect

from .bodies import _reject_constant
from .events import EventHub, _Subscriber
from .store import RoomStore

MAX_WS_MESSAGE_CHARS: Final = 16 * 1024
MAX_SUBSCRIPTIONS: Final = 64
WS_BUFFER: Final = 256


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
