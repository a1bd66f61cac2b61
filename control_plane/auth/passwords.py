"""Argon2id password hashing (OWASP parameters), off the event loop and capped in concurrency.

Each hash costs ``memory_cost`` KiB (19 MiB by default) and tens of milliseconds of CPU; hashing
runs in a worker thread and at most ``max_concurrent_hashes`` run at once, so a burst of logins
can neither stall the event loop nor exhaust memory. A dummy hash, computed at start-up with the
same parameters, is verified for unknown accounts so they take as long as a wrong password.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from argon2 import PasswordHasher as _Argon2
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from control_plane.settings import Settings

P = ParamSpec("P")
R = TypeVar("R")


class PasswordHasher:
    def __init__(self, settings: Settings) -> None:
        self._hasher = _Argon2(
            time_cost=settings.password_hash_time_cost,
            memory_cost=settings.password_hash_memory_kib,
            parallelism=1,
            hash_len=32,
            salt_len=16,
            type=Type.ID,
        )
        self._semaphore = asyncio.Semaphore(settings.max_concurrent_hashes)
        self._dummy: str | None = None

    async def _run(self, func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        async with self._semaphore:
            return await asyncio.to_thread(func, *args, **kwargs)

    async def hash(self, password: str) -> str:
        return await self._run(self._hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """True when ``password`` matches. ``None`` (unknown account, Google-only account)
        verifies against the dummy hash and returns False, taking the same time."""
        if password_hash is None:
            await self._run(self._verify, await self._dummy_hash(), password)
            return False
        result = await self._run(self._verify, password_hash, password)
        return result is True

    def needs_rehash(self, password_hash: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def _dummy_hash(self) -> str:
        if self._dummy is None:
            self._dummy = await self.hash(secrets.token_urlsafe(24))
        return self._dummy

    async def warm_up(self) -> None:
        """Compute the dummy hash now (start-up), not on the first unknown-account login."""
        await self._dummy_hash()
