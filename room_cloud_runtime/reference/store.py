"""The reference Room's state: seeded records, ``ApiError``, and the ``room.json`` snapshot."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, TypedDict, cast

import anyio

from .._errors import CloudRuntimeError, ConfigError

SNAPSHOT_NAME: Final = "room.json"
SNAPSHOT_FORMAT: Final = 1

# One record as the API answers it: JSON, so its values are as varied as the Room's own.
Record = dict[str, Any]
Collection = Literal["rooms", "decisions", "messages", "escalations", "credentials"]


class Snapshot(TypedDict):
    """``room.json``: what the store holds and saves."""

    format: int
    counters: dict[str, int]
    rooms: dict[str, Record]
    decisions: dict[str, Record]
    messages: dict[str, Record]
    escalations: dict[str, Record]
    credentials: dict[str, Record]


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


def _seed() -> Snapshot:
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


def _room(rid: str, name: str, goal: str | None, at: str, by: str = "system") -> Record:
    return {
        "id": rid,
        "name": name,
        "goal": goal,
        "status": "active",
        "createdAt": at,
        "createdBy": by,
    }


def _decision(did: str, room_id: str, proposal: str, at: str) -> Record:
    return {
        "id": did,
        "roomId": room_id,
        "proposal": proposal,
        "status": "voting",
        "votes": {},
        "keeperVote": None,
        "createdAt": at,
    }


def _message(mid: str, room_id: str, sender: str, text: str, at: str) -> Record:
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


def _escalation(eid: str, room_id: str, question: str, at: str) -> Record:
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


def _credential(cid: str, room_id: str, name: str, kind: str, at: str) -> Record:
    # Never a real secret: the record only ever holds the mask the Room answers with.
    return {
        "id": cid,
        "roomId": room_id,
        "name": name,
        "type": kind,
        "valueEncrypted": "***",
        "createdAt": at,
    }


_COLLECTIONS: Final[tuple[Collection, ...]] = (
    "rooms",
    "decisions",
    "messages",
    "escalations",
    "credentials",
)


def _check_snapshot(data: object) -> Snapshot:
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
    # Checked above, key by key, as far as the store relies on it.
    return cast(Snapshot, data)


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

    def _load(self) -> Snapshot:
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

    def collection(self, name: Collection) -> dict[str, Record]:
        return self.data[name]

    def get(self, name: Collection, key: str, what: str) -> Record:
        record = self.data[name].get(key)
        if record is None:
            raise _not_found(what)
        return record

    def next_id(self, prefix: str) -> str:
        counters = self.data["counters"]
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
