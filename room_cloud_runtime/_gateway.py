"""Gateway mode: the same stack in front of a Room that is not a Python app (the Node ``quoroom``).

``quoroom-runtime gateway --upstream http://127.0.0.1:U [-- COMMAND ...]`` builds
:func:`build_gateway`: the runtime stack of ``wrap()``, with the same settings, order and refusals,
around :class:`~room_cloud_runtime._proxy.UpstreamProxy` instead of an ASGI Room. Differences from
``serve``, all because the Room is a separate process (docs/gateway.md):

- the ACL also refuses ``/api/server/restart`` and ``/api/server/update-restart`` to everybody:
  the Room answers them to "local" callers without a token, and a gateway's callers must never be
  able to restart it (the proxy's source addresses already keep them from looking local);
- the Room's routes that take ``?token=`` from a browser navigation (the installer download and
  the on-ramp redirects) are authenticated from the query too, like ``/ws``;
- ``/healthz`` reports the Room as well: 200 when it is up, 503 ``room_down``/``room_starting``
  (gateway up, Room not) otherwise;
- with a command, :class:`~room_cloud_runtime._supervisor.RoomSupervisor` starts the Room with
  its cloud settings (the HS256 secret, instance id, bind host, allowed origins) and keeps it up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ._acl import DEFAULT_POLICY, Policy, Rule
from ._errors import ConfigError
from ._proxy import UpstreamProxy
from ._refusal_reports import REPORT_KEY_ENV
from ._responses import json_body
from ._settings import RuntimeSettings, _float, _int, _str
from ._stack import RuntimeStack
from ._supervisor import RoomSupervisor, port_open
from ._upstream_identity import (
    SourceAddresses,
    UpstreamTokens,
    check_secret,
    check_source_binding,
    new_secret,
)

SECRET_ENV = "QUOROOM_GATEWAY_UPSTREAM_SECRET"  # noqa: S105 - a variable name

#: The Room's loopback-only routes: nobody reaches them through the gateway.
GATEWAY_POLICY = Policy(
    [
        *DEFAULT_POLICY.rules,
        Rule("*", "/api/server/restart", None),
        Rule("*", "/api/server/update-restart", None),
    ]
)

_QUERY_TOKEN_EXACT = frozenset({"/api/status/update/download"})
_QUERY_TOKEN_SUFFIX = "/onramp-redirect"  # noqa: S105 - a path


def query_token_route(method: str, path: str) -> bool:
    """Routes the Room itself authenticates from ``?token=`` (browser navigations, not fetch)."""
    return method == "GET" and (path in _QUERY_TOKEN_EXACT or path.endswith(_QUERY_TOKEN_SUFFIX))


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """What gateway mode adds to :class:`RuntimeSettings` (see :func:`load_gateway_settings`)."""

    upstream: str
    secret: str = field(repr=False)
    command: tuple[str, ...] = ()
    read_timeout_seconds: float = 60.0
    connect_timeout_seconds: float = 5.0
    start_timeout_seconds: float = 60.0
    max_restarts: int = 5

    def __post_init__(self) -> None:
        check_upstream(self.upstream)
        check_secret(SECRET_ENV, self.secret)
        if self.max_restarts < 0:
            raise ConfigError("QUOROOM_GATEWAY_MAX_RESTARTS", "must be 0 or more")

    @property
    def upstream_host(self) -> str:
        return urlsplit(self.upstream).hostname or "127.0.0.1"

    @property
    def upstream_port(self) -> int:
        return urlsplit(self.upstream).port or 80


def check_upstream(upstream: str) -> None:
    """The upstream must be plain HTTP on an IPv4 loopback address with a port: the Room is on
    this machine, and per-user source addresses exist only in 127.0.0.0/8."""
    try:
        parts = urlsplit(upstream)
        port = parts.port
        host = ipaddress.ip_address(parts.hostname or "")
    except ValueError as exc:
        raise ConfigError(
            "--upstream", f"must look like http://127.0.0.1:3700, got {upstream!r}"
        ) from exc
    if (
        parts.scheme != "http"
        or port is None
        or not isinstance(host, ipaddress.IPv4Address)
        or not host.is_loopback
        or parts.path not in ("", "/")
        or parts.query
        or parts.username
    ):
        raise ConfigError(
            "--upstream",
            f"must be http:// on an IPv4 loopback address with a port, like http://127.0.0.1:3700, "
            f"got {upstream!r}",
        )


def load_gateway_settings(
    upstream: str | None,
    command: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> GatewaySettings:
    env = os.environ if environ is None else environ
    upstream = upstream or _str(env, "QUOROOM_GATEWAY_UPSTREAM")
    if not upstream:
        raise ConfigError("--upstream", "is required (or QUOROOM_GATEWAY_UPSTREAM)")
    return GatewaySettings(
        upstream=upstream.rstrip("/"),
        secret=_str(env, SECRET_ENV) or new_secret(),
        command=tuple(command),
        read_timeout_seconds=_float(env, "QUOROOM_GATEWAY_UPSTREAM_TIMEOUT_SECONDS", 60.0),
        start_timeout_seconds=_float(env, "QUOROOM_GATEWAY_START_TIMEOUT_SECONDS", 60.0),
        max_restarts=_int(env, "QUOROOM_GATEWAY_MAX_RESTARTS", 5),
    )


def room_environment(
    settings: RuntimeSettings, gateway: GatewaySettings, base: Mapping[str, str]
) -> dict[str, str]:
    """The Room's environment: the gateway's own, less its secret setting and the report key
    (the Room has no use for it), plus the Room's cloud-mode settings
    (../shared/quoroom-room/README.md)."""
    env = {k: v for k, v in base.items() if k not in (SECRET_ENV, REPORT_KEY_ENV)}
    env.update(
        {
            "QUOROOM_DEPLOYMENT_MODE": "cloud",
            "QUOROOM_CLOUD_JWT_SECRET": gateway.secret,
            "QUOROOM_CLOUD_INSTANCE_ID": settings.instance_id or "",
            "QUOROOM_BIND_HOST": gateway.upstream_host,
            "QUOROOM_ALLOWED_ORIGINS": ",".join(settings.allowed_origins),
            "QUOROOM_SKIP_MCP_REGISTER": "1",
            "QUOROOM_NO_AUTO_OPEN": "1",
        }
    )
    return env


class UpstreamMonitor:
    """Without a command the gateway does not own the Room: probe its port for ``/healthz``."""

    def __init__(self, host: str, port: int, interval: float = 2.0) -> None:
        self.host, self.port, self.interval = host, port, interval
        self.state = "starting"
        self._task: asyncio.Task[None] | None = None

    def not_ready(self) -> str | None:
        return None  # requests are always tried; a refused connection answers 503 by itself

    async def probe(self) -> None:
        self.state = "up" if await port_open(self.host, self.port, wait=2.0) else "down"

    async def start(self) -> None:
        await self.probe()
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.probe()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class Gateway:
    """The gateway's resources (proxy pools, supervisor or monitor), started with the stack."""

    def __init__(
        self,
        settings: RuntimeSettings,
        gateway: GatewaySettings,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.failed = False
        self.watcher: RoomSupervisor | UpstreamMonitor
        if gateway.command:
            self.watcher = RoomSupervisor(
                gateway.command,
                env=room_environment(settings, gateway, os.environ if environ is None else environ),
                host=gateway.upstream_host,
                port=gateway.upstream_port,
                start_timeout=gateway.start_timeout_seconds,
                max_restarts=gateway.max_restarts,
                on_fatal=self._fatal,
            )
        else:
            self.watcher = UpstreamMonitor(gateway.upstream_host, gateway.upstream_port)
        assert settings.instance_id  # cloud mode, checked by RuntimeSettings
        self.proxy = UpstreamProxy(
            gateway.upstream,
            tokens=UpstreamTokens(
                gateway.secret,
                instance_id=settings.instance_id,
                cache_size=settings.verified_cache_size,
            ),
            sources=SourceAddresses(),
            ready=self.watcher.not_ready,
            trust_fly_client_ip=settings.behind_fly_proxy,
            connect_timeout=gateway.connect_timeout_seconds,
            read_timeout=gateway.read_timeout_seconds,
        )
        self.on_fatal: list[Callable[[], None]] = []

    def _fatal(self) -> None:
        self.failed = True
        for callback in self.on_fatal:
            callback()

    def health(self) -> tuple[int, bytes]:
        room = self.watcher.state
        if room == "up":
            return 200, json_body({"ok": True, "gateway": "up", "room": "up"})
        code = "room_starting" if room == "starting" else "room_down"
        return 503, json_body(
            {
                "ok": False,
                "gateway": "up",
                "room": room,
                "error": "the Room is not up",
                "code": code,
            }
        )

    async def start(self) -> None:
        await self.watcher.start()

    async def aclose(self) -> None:
        await self.watcher.stop()
        await self.proxy.aclose()


def build_gateway(
    settings: RuntimeSettings,
    gateway: GatewaySettings,
    *,
    environ: Mapping[str, str] | None = None,
) -> tuple[RuntimeStack, Gateway]:
    """The stack in front of the upstream Room, and the gateway it drives."""
    if settings.mode != "cloud":
        raise ConfigError("QUOROOM_DEPLOYMENT_MODE", "gateway mode needs cloud mode")
    check_source_binding()
    resources = Gateway(settings, gateway, environ=environ)
    stack = RuntimeStack(
        resources.proxy,
        settings,
        policy=GATEWAY_POLICY,
        health=resources.health,
        query_token_route=query_token_route,
        resources=(resources,),
    )
    return stack, resources
