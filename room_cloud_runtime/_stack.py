"""Compose the layers into the runtime stack, from settings parsed once.

Cloud mode, outermost first (DESIGN.md "Runtime pipeline"):

    AccessLog → SecurityHeaders → CORSGuard → RequestLimits → ClientAddress → AddressRateLimit
    → Authenticate → CloudEndpoints → PrincipalRateLimit → ACLGuard → the Room app

Each layer is built as its own object (it validates its options and prebuilds its tables), and
in cloud mode the request path is one :class:`~room_cloud_runtime._fused.FusedStack` pass over
them in this order (issue 13: one header scan, one ``send`` wrapper, no frame per layer);
``RuntimeStack(..., fused=False)`` composes them one inside the other instead, which the parity
tests hold to the same answers.

Local mode: ``LocalGuard`` only — the Room's own handshake and token flow stay as they are.

The stack owns two resources with a life of their own, the JWKS cache (background refresh) and
the rate-limit storage; they start and stop with the ASGI ``lifespan`` (or explicitly through
:meth:`RuntimeStack.startup` / :meth:`RuntimeStack.shutdown`, e.g. in tests).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._acl import DEFAULT_POLICY, ACLGuard, Policy
from ._auth import WS_TOKEN_PREFIX, Authenticate
from ._client import ClientAddress
from ._cors import CORSGuard
from ._endpoints import CloudEndpoints
from ._fused import FusedStack
from ._headers import SecurityHeaders
from ._jwks import JWKSCache
from ._limiter import Limiter, build_limiter
from ._limits import RequestLimits
from ._local import LocalGuard
from ._logging import AccessLog
from ._metrics import MetricsListener, RequestCounts, runtime_listener
from ._ratelimit import AddressRateLimit, PrincipalRateLimit
from ._refusal_reports import RefusalReporter
from ._settings import RuntimeSettings, load_settings
from ._verify import TokenVerifier

logger = logging.getLogger("room_cloud_runtime")


class Resource(Protocol):
    """Something with a life of its own started and stopped with the stack (the gateway)."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class RuntimeStack:
    """An ASGI app: ``app`` wrapped by the layers its settings call for.

    Build with :func:`wrap`. ``jwks``, ``verifier`` and ``limiter`` are exposed (None in local
    mode) for status reporting and tests.

    In cloud mode the request path is one :class:`~room_cloud_runtime._fused.FusedStack` pass
    over the layers built here (issue 13); ``fused=False`` serves the same layers composed one
    inside the other instead (``layered``; the parity tests compare the two).
    """

    def __init__(
        self,
        app: ASGIApp,
        settings: RuntimeSettings,
        *,
        policy: Policy = DEFAULT_POLICY,
        jwks: JWKSCache | None = None,
        limiter: Limiter | None = None,
        health: Callable[[], tuple[int, bytes]] | None = None,
        query_token_route: Callable[[str, str], bool] | None = None,
        resources: Sequence[Resource] = (),
        fused: bool = True,
    ) -> None:
        self.settings = settings
        self.resources = tuple(resources)
        self.inner = app
        self.jwks: JWKSCache | None = None
        self.verifier: TokenVerifier | None = None
        self.limiter: Limiter | None = None
        #: The layers composed one inside the other (cloud mode: what the fused pass reproduces
        #: and hands WebSocket upgrades to).
        self.layered: ASGIApp
        self.access_log: AccessLog | None = None
        #: Refusal reports to the control plane (cloud mode with a report key), a resource.
        self.reports: RefusalReporter | None = None
        #: The Prometheus listener (cloud mode, QUOROOM_METRICS_PORT set), started with the stack.
        self.metrics: MetricsListener | None = None
        self.counts: RequestCounts | None = None
        self._started = False
        #: Set by the CLI, whose process serves this stack alone: once started, freeze the heap
        #: (``_server.settle_heap``; off for a program that embeds the stack).
        self.settle_heap = False
        if settings.mode == "local":
            self.app: ASGIApp = LocalGuard(app)
            self.layered = self.app
            return
        assert settings.issuer and settings.instance_id  # checked by RuntimeSettings
        self.jwks = jwks or JWKSCache(
            settings.resolved_jwks_url,
            algorithms=settings.algorithms,
            timeout=settings.jwks_timeout_seconds,
            min_refresh=settings.jwks_min_refresh_seconds,
            max_refresh=settings.jwks_max_refresh_seconds,
            unknown_kid_cooldown=settings.jwks_unknown_kid_cooldown_seconds,
            max_staleness=settings.jwks_max_staleness_seconds,
        )
        self.verifier = TokenVerifier(
            self.jwks,
            issuer=settings.issuer,
            audience=settings.audience,
            instance_id=settings.instance_id,
            algorithms=settings.algorithms,
            leeway=settings.leeway_seconds,
            max_token_bytes=settings.max_token_bytes,
            cache_size=settings.verified_cache_size,
        )
        self.limiter = limiter or build_limiter(
            settings.rate_limit_storage, on_storage_error=settings.rate_limit_on_storage_error
        )
        if settings.reports is not None:
            self.reports = RefusalReporter(
                settings.reports,
                issuer=settings.issuer,
                instance_id=settings.instance_id,
                trust_fly_client_ip=settings.behind_fly_proxy,
            )
            self.resources = (*self.resources, self.reports)
        acl = ACLGuard(app, policy=policy, instance_id=settings.instance_id)
        principal = PrincipalRateLimit(
            acl,
            limiter=self.limiter,
            read_limit=settings.read_limit,
            write_limit=settings.write_limit,
        )
        endpoints = CloudEndpoints(principal, capabilities=self.capabilities, health=health)
        auth = Authenticate(endpoints, verifier=self.verifier, query_token_route=query_token_route)
        address = AddressRateLimit(auth, limiter=self.limiter, limit=settings.address_limit)
        client = ClientAddress(address, trust_fly_client_ip=settings.behind_fly_proxy)
        # Inside CORS (not outside, as DESIGN.md first had it): the limits' own refusals (413,
        # 400, 408, 431) must carry the CORS headers, or a page sees a network error instead of
        # the reason. Bodies are read lazily, so nothing is read before auth either way.
        limits = RequestLimits(
            client,
            max_body_bytes=settings.max_body_bytes,
            max_header_bytes=settings.max_header_bytes,
            max_json_depth=settings.max_json_depth,
            max_ws_message_bytes=settings.max_ws_message_bytes,
            body_timeout_seconds=settings.body_timeout_seconds,
        )
        cors = CORSGuard(
            limits, allowed_origins=settings.allowed_origins, max_age=settings.cors_max_age_seconds
        )
        headers = SecurityHeaders(
            cors, hsts_max_age=settings.hsts_max_age_seconds, coep=settings.coep
        )
        self.counts = RequestCounts() if settings.metrics_port is not None else None
        access_log = self.access_log = (
            AccessLog(headers, counts=self.counts)
            if settings.access_log or self.counts is not None
            else None
        )
        if self.counts is not None:
            assert settings.metrics_port is not None
            self.metrics = runtime_listener(
                self.counts,
                host=settings.metrics_host,
                port=settings.metrics_port,
                mode=settings.mode,
                instance=settings.instance_id,
                jwks=self.jwks,
                room_up=(lambda: health()[0] == 200) if health is not None else (lambda: True),
            )
        self.layered = access_log if access_log is not None else headers
        if not fused:
            self.app = self.layered
            return
        self.app = FusedStack(
            self.layered,
            app,
            access_log=access_log,
            headers=headers,
            cors=cors,
            limits=limits,
            client=client,
            address=address,
            auth=auth,
            endpoints=endpoints,
            principal=principal,
            acl=acl,
        )

    def capabilities(self) -> dict[str, Any]:
        """What ``/api/status`` tells any caller about cloud auth. No secrets, no key material."""
        s = self.settings
        jwks_status = self.jwks.status() if self.jwks is not None else {}
        return {
            "instanceId": s.instance_id,
            "issuer": s.issuer,
            "audience": s.audience,
            "algorithms": list(s.algorithms),
            "keysLoaded": bool(jwks_status.get("keysLoaded")),
            "tokenTransports": [
                "authorization-bearer",
                f"websocket-protocol:{WS_TOKEN_PREFIX}",
                "websocket-query",
            ],
            "refreshPath": f"/api/cloud/instances/{s.instance_id}/refresh-token",
        }

    async def startup(self) -> None:
        if self._started:
            return
        self._started = True
        if self.jwks is not None:
            await self.jwks.start()
        for resource in self.resources:
            await resource.start()
        if self.metrics is not None:
            self.metrics.start()
        if self.settle_heap:
            from ._server import settle_heap

            settle_heap()
        logger.info(
            "runtime stack started",
            extra={"mode": self.settings.mode, "instance": self.settings.instance_id},
        )

    async def shutdown(self) -> None:
        if not self._started:
            return
        self._started = False
        if self.metrics is not None:
            await self.metrics.aclose()
        for resource in reversed(self.resources):
            await resource.aclose()
        if self.jwks is not None:
            await self.jwks.aclose()
        if self.limiter is not None:
            await self.limiter.aclose()
        if self.access_log is not None:
            self.access_log.lines.flush()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RuntimeStack]:
        """``async with stack.running():`` — startup and shutdown around a block (tests)."""
        await self.startup()
        try:
            yield self
        finally:
            await self.shutdown()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
            return message

        await self.app(scope, lifespan_receive, send)


def wrap(
    app: ASGIApp,
    settings: RuntimeSettings | None = None,
    *,
    policy: Policy = DEFAULT_POLICY,
) -> RuntimeStack:
    """Wrap a Room ASGI app in the stack that ``settings`` (default: the environment) call for."""
    return RuntimeStack(app, settings if settings is not None else load_settings(), policy=policy)
