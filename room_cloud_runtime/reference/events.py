"""Live events: each WebSocket's bounded outbox, and the hub that fans events out by room."""

from __future__ import annotations

from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from .store import _now


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
