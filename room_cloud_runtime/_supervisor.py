"""Start, watch and restart the Room process behind the gateway (``gateway -- COMMAND``).

- The Room starts in its own process group with the environment the gateway gives it, its output
  read line by line and logged (redacted: the Room prints token prefixes) under
  ``room_cloud_runtime.room``.
- It is *up* once its port accepts connections (Node listens only when its server is ready);
  until then, and while it restarts, the proxy answers 503 ``room_starting`` / ``room_down``.
- When it exits it is restarted after a backoff (doubling, capped). A run that stayed up for
  ``stable_seconds`` resets the count; ``max_restarts`` failures in a row, or a start that never
  comes up within ``start_timeout``, mean it cannot be kept up: the supervisor calls
  ``on_fatal`` (the CLI then stops the gateway with a non-zero status).
- :meth:`stop` sends SIGTERM to the Room's process group, then SIGKILL after ``stop_timeout``.
  On Linux the Room also gets SIGKILL if the gateway itself dies (``PR_SET_PDEATHSIG``), so a
  killed gateway never leaves a Room holding its port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from ._logging import redact

logger = logging.getLogger("room_cloud_runtime.supervisor")
room_log = logging.getLogger("room_cloud_runtime.room")

State = Literal["starting", "up", "down", "failed", "stopped"]
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class RoomSupervisor:
    """Keeps one Room process running; ``state`` is read by the proxy and ``/healthz``."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str],
        host: str,
        port: int,
        start_timeout: float = 60.0,
        stable_seconds: float = 30.0,
        max_restarts: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        stop_timeout: float = 10.0,
        on_fatal: Callable[[], None] = lambda: None,
    ) -> None:
        self.command = list(command)
        self.env = dict(env)
        # Scrubbed from the Room's output verbatim, whatever line it appears in.
        self._secrets = tuple(
            v for k, v in self.env.items() if k == "QUOROOM_CLOUD_JWT_SECRET" and len(v) >= 8
        )
        self.host = host
        self.port = port
        self.start_timeout = start_timeout
        self.stable_seconds = stable_seconds
        self.max_restarts = max_restarts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.stop_timeout = stop_timeout
        self.on_fatal = on_fatal
        self.state: State = "stopped"
        self.restarts = 0
        self.process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def not_ready(self) -> str | None:
        """``None`` when requests may go to the Room, else the 503's reason code."""
        state = self.state
        if state == "up":
            return None
        return "room_starting" if state == "starting" else "room_down"

    async def start(self) -> None:
        self._stopping = False
        self.state = "starting"
        self._task = asyncio.create_task(self._run(), name="room-supervisor")

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            self.state = "starting"
            started = time.monotonic()
            try:
                process = await self._spawn()
            except OSError as exc:
                logger.error("cannot start the Room", extra={"error": str(exc)})
                process = None
            if process is not None:
                up = await self._wait_up(process)
                if up:
                    self.state = "up"
                    logger.info("room up", extra={"pid": process.pid, "restarts": self.restarts})
                    await process.wait()
                elif process.returncode is None:
                    logger.error("room did not come up in time", extra={"pid": process.pid})
                    await self._kill(process)
                if self._stopping:
                    break
                logger.warning("room exited", extra={"returncode": process.returncode})
                stable = up and time.monotonic() - started >= self.stable_seconds
            else:
                stable = False
            failures = 1 if stable else failures + 1
            if failures > self.max_restarts:
                self.state = "failed"
                logger.error("room cannot be kept up, giving up", extra={"failures": failures})
                self.on_fatal()
                return
            self.state = "down"
            delay = min(self.backoff_max, self.backoff_base * 2 ** (failures - 1))
            await asyncio.sleep(delay)
            self.restarts += 1

    async def _spawn(self) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # no threads start between fork and exec
        )
        self.process = process
        asyncio.create_task(_relay_output(process, self._secrets))  # noqa: RUF006 - ends with it
        logger.info("room started", extra={"pid": process.pid})
        return process

    async def _wait_up(self, process: asyncio.subprocess.Process) -> bool:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if process.returncode is not None:
                return False
            if await port_open(self.host, self.port, wait=1.0):
                return process.returncode is None
            await asyncio.sleep(0.1)
        return False

    async def stop(self) -> None:
        self._stopping = True
        process = self.process
        if process is not None and process.returncode is None:
            await self._kill(process)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.state = "stopped" if self.state != "failed" else "failed"

    async def _kill(self, process: asyncio.subprocess.Process) -> None:
        """SIGTERM to the Room's process group, SIGKILL after ``stop_timeout``."""
        for sig, wait in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                await asyncio.wait_for(process.wait(), timeout=wait)
                return
            except TimeoutError:
                continue


async def port_open(host: str, port: int, *, wait: float) -> bool:
    """Does something accept connections on ``host:port``? (The Room's readiness and health.)"""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), wait)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _relay_output(process: asyncio.subprocess.Process, secrets: tuple[str, ...]) -> None:
    stream = process.stdout
    if stream is None:
        return
    while True:
        try:
            line = await stream.readline()
        except (ValueError, asyncio.LimitOverrunError):  # a line over the buffer: skip it
            continue
        if not line:
            return
        text = line.decode("utf-8", "replace").rstrip()
        for secret in secrets:
            text = text.replace(secret, "[redacted]")
        if text:
            room_log.info(redact(text), extra={"pid": process.pid})
