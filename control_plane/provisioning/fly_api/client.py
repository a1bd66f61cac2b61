"""The Fly Machines API client: one method per endpoint the control plane uses, every reply
parsed into a model from :mod:`.models`, every failure translated at one boundary
(:meth:`FlyMachinesClient._request`, with :func:`_error_from` as the status-code table) into an
error from :mod:`.errors`. The package docstring lists the rules it follows.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from control_plane.logs import REQUEST_ID
from control_plane.provisioning.fly_api.errors import (
    FlyAuthError,
    FlyBadRequest,
    FlyCapacity,
    FlyConflict,
    FlyError,
    FlyNameTaken,
    FlyNotFound,
    FlyPreconditionFailed,
    FlyProtocolError,
    FlyRateLimited,
    FlyServerError,
    FlyTimeout,
    FlyUnavailable,
    FlyUnhealthy,
    FlyUnprocessable,
)
from control_plane.provisioning.fly_api.models import (
    FlyApp,
    FlyIPAssignment,
    FlyLease,
    FlyMachine,
    FlySnapshot,
    FlyVolume,
    FlyWaitResult,
    _AppList,
    _CreateAppReply,
    _ErrorBody,
    _IPList,
    _LeaseReply,
    _Org,
    _SecretsReply,
)

__all__ = ["DEFAULT_BASE_URL", "MAX_WAIT_SECONDS", "FlyMachinesClient", "WaitState"]

# The name the client logged under when it was one module, kept so log filters still match.
logger = logging.getLogger("control_plane.provisioning.fly_api")

DEFAULT_BASE_URL = "https://api.machines.dev"
MAX_WAIT_SECONDS = 60  # the /wait endpoint's ceiling (superfly/flyctl#1751)
LEASE_HEADER = "fly-machine-lease-nonce"
_CAPACITY_STATUSES = frozenset({"insufficient_capacity", "volume_placement_capacity"})

WaitState = Literal["started", "stopped", "suspended", "destroyed", "failed", "settled"]

M = TypeVar("M", bound=BaseModel)


class FlyMachinesClient:
    """Async client for one Fly organization.

    ``token`` is a Fly API token (``fly tokens create org``); a ``FlyV1 ...`` macaroon is sent as
    is, anything else as ``Bearer``. ``transport`` lets tests point the client anywhere (the
    fake Machines API is a real server; a transport is only needed for in-process tests).
    """

    def __init__(
        self,
        token: str,
        *,
        org_slug: str,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_read_attempts: int = 3,
        retry_backoff: float = 0.5,
        max_retry_after: float = 30.0,
    ) -> None:
        if not token or not token.strip():
            raise ValueError("a Fly API token is required (QUOROOM_CP_FLY_API_TOKEN)")
        if not org_slug:
            raise ValueError("org_slug is required (QUOROOM_CP_FLY_ORG)")
        if max_read_attempts < 1:
            raise ValueError("max_read_attempts must be at least 1")
        token = token.strip()
        auth = token if token.startswith("FlyV1 ") else f"Bearer {token}"
        self.org_slug = org_slug
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._max_read_attempts = max_read_attempts
        self._retry_backoff = retry_backoff
        self._max_retry_after = max_retry_after
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={
                "Authorization": auth,
                "Accept": "application/json",
                "User-Agent": "quoroom-cloud/0.1 (+fly-machines)",
            },
            timeout=httpx.Timeout(timeout),
            transport=transport,
            follow_redirects=False,
            event_hooks={"request": [_send_request_id]},
        )

    def __repr__(self) -> str:  # never the token
        return f"FlyMachinesClient(base_url={self.base_url!r}, org_slug={self.org_slug!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---------------------------------------------------------------- apps

    async def create_app(
        self,
        name: str,
        *,
        idempotency_key: str | None = None,
        network: str | None = None,
        enable_subdomains: bool | None = None,
    ) -> FlyApp:
        """Create app ``name`` in our org, or return it if it already exists and is ours.

        With ``idempotency_key`` the create is safe to resend (the spec's Create App contract), so
        a lost reply is retried once with the same key. App names are global: on 422
        ``name_taken`` the app is fetched and accepted only if it sits in our organization;
        otherwise :class:`FlyNameTaken` is raised (pick another deterministic name).
        """
        body: dict[str, Any] = {"name": name, "org_slug": self.org_slug}
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        if network:
            body["network"] = network
        if enable_subdomains is not None:
            body["enable_subdomains"] = enable_subdomains
        attempts = 2 if idempotency_key else 1
        for attempt in range(1, attempts + 1):
            try:
                reply = await self._request("POST", "/v1/apps", json=body)
                created = self._parse(_CreateAppReply, reply, "POST", "/v1/apps")
                return FlyApp(id=created.id, name=name, organization=_Org(slug=self.org_slug))
            except FlyNameTaken:
                return await self._existing_app_if_ours(name)
            except (FlyUnavailable, FlyTimeout, FlyServerError) as exc:
                # Only safe because Create App honours idempotency_key (PITFALLS.md).
                if attempt >= attempts or getattr(exc, "maybe_applied", True) is False:
                    raise
                logger.warning(
                    "create app %s: %s; resending with the same idempotency key", name, exc
                )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _existing_app_if_ours(self, name: str) -> FlyApp:
        try:
            app = await self.get_app(name)
        except FlyNotFound as exc:  # taken by an org this token cannot see
            raise FlyNameTaken(
                f"app name {name!r} is taken by another organization",
                status_code=422,
                fly_status="name_taken",
                method="POST",
                path="/v1/apps",
            ) from exc
        if app.name != name or app.org_slug != self.org_slug:
            raise FlyNameTaken(
                f"app name {name!r} is taken (organization {app.org_slug!r}, not ours)",
                status_code=422,
                fly_status="name_taken",
                method="POST",
                path="/v1/apps",
            )
        logger.info("create app %s: name taken by our own org, reusing it", name)
        return app

    async def get_app(self, name: str) -> FlyApp:
        path = f"/v1/apps/{_seg(name)}"
        return self._parse(FlyApp, await self._request("GET", path), "GET", path)

    async def list_apps(self) -> list[FlyApp]:
        """Every app of our organization (for the reconciler's orphan sweep)."""
        apps: list[FlyApp] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"org_slug": self.org_slug}
            if cursor:
                params.update(limit=500, cursor=cursor)
            page = self._parse(
                _AppList, await self._request("GET", "/v1/apps", params=params), "GET", "/v1/apps"
            )
            apps.extend(page.apps)
            if not page.next_cursor or page.next_cursor == cursor:
                return apps
            cursor = page.next_cursor

    async def delete_app(self, name: str) -> None:
        """Destroy an app. Fly deletes its volumes *and their snapshots* with it
        (memoetapp/memoet#57): keep the app until the data retention period ends."""
        await self._request("DELETE", f"/v1/apps/{_seg(name)}")

    # ---------------------------------------------------------------- secrets and IPs

    async def set_secrets(self, app: str, values: Mapping[str, str]) -> int:
        """Set app secrets; returns the secrets version to pass as ``min_secrets_version``.

        Values never appear in logs or errors (errors carry Fly's message, never our body).
        """
        path = f"/v1/apps/{_seg(app)}/secrets"
        reply = await self._request("POST", path, json={"values": dict(values)})
        return self._parse(_SecretsReply, reply, "POST", path).version

    async def allocate_ip(
        self, app: str, *, ip_type: str = "shared_v4", region: str | None = None
    ) -> FlyIPAssignment:
        """Assign a public address (``shared_v4`` is free; ``v6`` for a dedicated IPv6)."""
        path = f"/v1/apps/{_seg(app)}/ip_assignments"
        body: dict[str, Any] = {"type": ip_type}
        if region:
            body["region"] = region
        return self._parse(
            FlyIPAssignment, await self._request("POST", path, json=body), "POST", path
        )

    async def list_ips(self, app: str) -> list[FlyIPAssignment]:
        path = f"/v1/apps/{_seg(app)}/ip_assignments"
        return self._parse(_IPList, await self._request("GET", path), "GET", path).ips

    # ---------------------------------------------------------------- volumes

    async def create_volume(
        self,
        app: str,
        *,
        name: str,
        region: str,
        size_gb: int,
        compute: Mapping[str, Any] | None = None,
        encrypted: bool = True,
        snapshot_retention: int | None = None,
        auto_backup_enabled: bool | None = None,
        snapshot_id: str | None = None,
        require_unique_zone: bool | None = None,
    ) -> FlyVolume:
        """Create a volume. Pass the machine's ``guest`` as ``compute`` so Fly picks a host that
        can also run the machine: a volume pins its host (Kilo-Org/cloud#388,
        fastagent-sh/fastagent#538). ``snapshot_retention``: days each daily snapshot is kept
        (1-60); ``snapshot_id``: restore that snapshot into the new volume (``size_gb`` at
        least the snapshot's volume size). Sent once: never retried blindly."""
        path = f"/v1/apps/{_seg(app)}/volumes"
        body: dict[str, Any] = {
            "name": name,
            "region": region,
            "size_gb": size_gb,
            "encrypted": encrypted,
        }
        if compute:
            body["compute"] = dict(compute)
        if snapshot_retention is not None:
            body["snapshot_retention"] = snapshot_retention
        if auto_backup_enabled is not None:
            body["auto_backup_enabled"] = auto_backup_enabled
        if snapshot_id:
            body["snapshot_id"] = snapshot_id
        if require_unique_zone is not None:
            body["require_unique_zone"] = require_unique_zone
        return self._parse(FlyVolume, await self._request("POST", path, json=body), "POST", path)

    async def get_volume(self, app: str, volume_id: str) -> FlyVolume:
        path = f"/v1/apps/{_seg(app)}/volumes/{_seg(volume_id)}"
        return self._parse(FlyVolume, await self._request("GET", path), "GET", path)

    async def list_volumes(self, app: str) -> list[FlyVolume]:
        path = f"/v1/apps/{_seg(app)}/volumes"
        return self._parse_list(FlyVolume, await self._request("GET", path), "GET", path)

    async def update_volume(
        self,
        app: str,
        volume_id: str,
        *,
        snapshot_retention: int | None = None,
        auto_backup_enabled: bool | None = None,
    ) -> FlyVolume:
        """Change a volume's daily snapshots (Update Volume). A new retention applies to new
        snapshots only; existing ones keep theirs. Setting the same values again is harmless."""
        path = f"/v1/apps/{_seg(app)}/volumes/{_seg(volume_id)}"
        body: dict[str, Any] = {}
        if snapshot_retention is not None:
            body["snapshot_retention"] = snapshot_retention
        if auto_backup_enabled is not None:
            body["auto_backup_enabled"] = auto_backup_enabled
        return self._parse(FlyVolume, await self._request("PUT", path, json=body), "PUT", path)

    async def delete_volume(self, app: str, volume_id: str) -> None:
        await self._request("DELETE", f"/v1/apps/{_seg(app)}/volumes/{_seg(volume_id)}")

    async def create_volume_snapshot(self, app: str, volume_id: str) -> None:
        """Request a snapshot (the reply has no body: list snapshots to see it)."""
        await self._request("POST", f"/v1/apps/{_seg(app)}/volumes/{_seg(volume_id)}/snapshots")

    async def list_volume_snapshots(self, app: str, volume_id: str) -> list[FlySnapshot]:
        path = f"/v1/apps/{_seg(app)}/volumes/{_seg(volume_id)}/snapshots"
        return self._parse_list(FlySnapshot, await self._request("GET", path), "GET", path)

    # ---------------------------------------------------------------- machines

    async def create_machine(
        self,
        app: str,
        *,
        config: Mapping[str, Any],
        region: str,
        name: str | None = None,
        min_secrets_version: int | None = None,
        skip_launch: bool = False,
        lease_ttl: int | None = None,
    ) -> FlyMachine:
        """Create (and by default launch) a machine. Sent exactly once: on a lost reply
        (:class:`FlyUnavailable` / :class:`FlyTimeout` with ``maybe_applied``) or a 5xx, look the
        machine up with :meth:`list_machines` by its metadata before creating another."""
        path = f"/v1/apps/{_seg(app)}/machines"
        body: dict[str, Any] = {"config": dict(config), "region": region}
        if name:
            body["name"] = name
        if min_secrets_version is not None:
            body["min_secrets_version"] = min_secrets_version
        if skip_launch:
            body["skip_launch"] = True
        if lease_ttl is not None:
            body["lease_ttl"] = lease_ttl
        return self._machine(await self._request("POST", path, json=body), "POST", path)

    async def get_machine(self, app: str, machine_id: str) -> FlyMachine:
        path = f"/v1/apps/{_seg(app)}/machines/{_seg(machine_id)}"
        return self._machine(await self._request("GET", path), "GET", path)

    async def list_machines(
        self,
        app: str,
        *,
        metadata: Mapping[str, str] | None = None,
        state: Sequence[str] | None = None,
        region: str | None = None,
        include_deleted: bool = False,
    ) -> list[FlyMachine]:
        """Machines of ``app``, filtered server-side by exact ``metadata`` matches (all must
        match), states and region. Follows ``fly-next-cursor`` when Fly paginates."""
        path = f"/v1/apps/{_seg(app)}/machines"
        base: dict[str, Any] = {}
        for key, value in (metadata or {}).items():
            base[f"metadata.{key}"] = value
        if state:
            base["state"] = ",".join(state)
        if region:
            base["region"] = region
        if include_deleted:
            base["include_deleted"] = "true"
        machines: list[FlyMachine] = []
        cursor: str | None = None
        while True:
            params = dict(base)
            if cursor:
                params.update(limit=1000, cursor=cursor)
            response = await self._request("GET", path, params=params)
            for item in self._json_list(response, "GET", path):
                machines.append(self._machine_from(item, "GET", path))
            next_cursor = response.headers.get("fly-next-cursor")
            if not next_cursor or next_cursor == cursor:
                break
            cursor = next_cursor
        # Belt and braces: a server that ignored the filter must not make us adopt a stranger.
        wanted = dict(metadata or {})
        return [m for m in machines if all(m.metadata.get(k) == v for k, v in wanted.items())]

    async def update_machine(
        self,
        app: str,
        machine_id: str,
        *,
        config: Mapping[str, Any],
        current_version: str | None = None,
        region: str | None = None,
        skip_launch: bool | None = None,
        min_secrets_version: int | None = None,
        lease_nonce: str | None = None,
    ) -> FlyMachine:
        """Replace the machine's config. With ``current_version`` the update is rejected with
        :class:`FlyConflict` (409) if the machine changed since that version (optimistic
        concurrency, per the spec's UpdateMachineRequest)."""
        path = f"/v1/apps/{_seg(app)}/machines/{_seg(machine_id)}"
        body: dict[str, Any] = {"config": dict(config)}
        if current_version:
            body["current_version"] = current_version
        if region:
            body["region"] = region
        if skip_launch is not None:
            body["skip_launch"] = skip_launch
        if min_secrets_version is not None:
            body["min_secrets_version"] = min_secrets_version
        reply = await self._request("POST", path, json=body, lease_nonce=lease_nonce)
        return self._machine(reply, "POST", path)

    async def start_machine(
        self, app: str, machine_id: str, *, lease_nonce: str | None = None
    ) -> None:
        path = f"/v1/apps/{_seg(app)}/machines/{_seg(machine_id)}/start"
        await self._request("POST", path, lease_nonce=lease_nonce)

    async def stop_machine(
        self,
        app: str,
        machine_id: str,
        *,
        signal: str | None = None,
        stop_timeout: str | None = None,
        lease_nonce: str | None = None,
    ) -> None:
        """Stop a machine. Always sends a JSON body: none can give a 400 (superfly/docs#2187)."""
        path = f"/v1/apps/{_seg(app)}/machines/{_seg(machine_id)}/stop"
        body: dict[str, Any] = {}
        if signal:
            body["signal"] = signal
        if stop_timeout:
            body["timeout"] = stop_timeout
        await self._request("POST", path, json=body, lease_nonce=lease_nonce)

    async def delete_machine(
        self, app: str, machine_id: str, *, force: bool = False, lease_nonce: str | None = None
    ) -> None:
        path = f"/v1/apps/{_seg(app)}/machines/{_seg(machine_id)}"
        params = {"force": "true"} if force else None
        await self._request("DELETE", path, params=params, lease_nonce=lease_nonce)

    async def wait(
        self,
        app: str,
        machine_id: str,
        state: WaitState = "started",
        *,
        version: str | None = None,
        timeout_total: float = 300.0,
        per_request_timeout: int = MAX_WAIT_SECONDS,
    ) -> FlyWaitResult:
        """Block until the machine reaches ``state`` or ``timeout_total`` seconds pass.

        ``/wait`` blocks at most 60 s and answers 408 on expiry, which here means "keep
        waiting" (superfly/flyctl#1751); raises :class:`FlyTimeout` at the overall deadline.
        Waiting for ``stopped`` requires ``version`` (the same issue).
        """
        if state == "stopped" and not version:
            raise ValueError("waiting for 'stopped' needs the machine version (flyctl#1751)")
        if not 1 <= per_request_timeout <= MAX_WAIT_SECONDS:
            raise ValueError(f"per_request_timeout must be within 1..{MAX_WAIT_SECONDS} seconds")
        path = f"/v1/apps/{_seg(app)}/machines/{_seg(machine_id)}/wait"
        deadline = time.monotonic() + timeout_total
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FlyTimeout(
                    f"machine {machine_id} did not reach {state!r} within {timeout_total:g}s",
                    method="GET",
                    path=path,
                    maybe_applied=False,
                )
            step = max(1, min(per_request_timeout, math.ceil(remaining)))
            params: dict[str, Any] = {"state": state, "timeout": step}
            if version:
                params["version"] = version
            response = await self._request(
                "GET", path, params=params, request_timeout=step + 10.0, ok_statuses=(408,)
            )
            if response.status_code == 408:
                continue  # the server-side wait expired: not an error, wait again
            return self._parse(FlyWaitResult, response, "GET", path)

    async def wait_healthy(
        self,
        app: str,
        machine_id: str,
        *,
        version: str | None = None,
        timeout_total: float = 120.0,
        poll_interval: float = 1.0,
    ) -> FlyMachine:
        """Wait until the machine is ``started`` and every check reports ``passing``.

        ``started`` is not ready (PITFALLS.md): the checks from the config must pass too. With
        ``version``, the machine must also be at that version (the update has landed). Raises
        :class:`FlyUnhealthy` with the last check statuses at the deadline.
        """
        path = f"/v1/apps/{_seg(app)}/machines/{_seg(machine_id)}"
        deadline = time.monotonic() + timeout_total
        while True:
            last = await self.get_machine(app, machine_id)
            at_version = version is None or last.current_version == version
            if at_version and last.healthy:
                return last
            if last.state in ("destroyed", "destroying", "failed"):
                break
            if time.monotonic() + poll_interval > deadline:
                break
            await asyncio.sleep(poll_interval)
        detail = ", ".join(f"{c.name}={c.status}" for c in last.checks) or "no check results"
        raise FlyUnhealthy(
            f"machine {machine_id} not healthy within {timeout_total:g}s "
            f"(state {last.state}, {detail})",
            checks=last.checks,
            method="GET",
            path=path,
        )

    # ---------------------------------------------------------------- leases

    async def acquire_lease(
        self, app: str, machine_id: str, *, ttl: int = 60, description: str = "quoroom-cloud"
    ) -> FlyLease:
        """Take the machine's lease. Every later write must carry the nonce (``lease_nonce=``)
        and the lease must be released (superfly/flyctl#4100)."""
        path = f"/v1/apps/{_seg(app)}/machines/{_seg(machine_id)}/lease"
        reply = self._parse(
            _LeaseReply,
            await self._request("POST", path, json={"ttl": ttl, "description": description}),
            "POST",
            path,
        )
        if reply.data is not None:
            return reply.data
        if not reply.nonce:
            raise FlyProtocolError("lease reply has no nonce", method="POST", path=path)
        return FlyLease(
            nonce=reply.nonce, expires_at=reply.expires_at, owner=reply.owner, version=reply.version
        )

    async def release_lease(self, app: str, machine_id: str, nonce: str) -> None:
        path = f"/v1/apps/{_seg(app)}/machines/{_seg(machine_id)}/lease"
        await self._request("DELETE", path, lease_nonce=nonce)

    # ---------------------------------------------------------------- the one boundary

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        lease_nonce: str | None = None,
        request_timeout: float | None = None,
        ok_statuses: tuple[int, ...] = (),
    ) -> httpx.Response:
        """Send one request; translate every failure into a :class:`FlyError`.

        Reads (GET) retry on 5xx, 429 and transport errors with bounded backoff; writes are sent
        exactly once.
        """
        headers = {LEASE_HEADER: lease_nonce} if lease_nonce else None
        attempts = self._max_read_attempts if method == "GET" else 1
        for attempt in range(1, attempts + 1):
            try:
                response = await self._send(method, path, json, params, headers, request_timeout)
                if response.is_success or response.status_code in ok_statuses:
                    return response
                raise _error_from(response, method, path)
            except (FlyServerError, FlyRateLimited, FlyUnavailable, FlyTimeout) as exc:
                if attempt >= attempts:
                    raise
                delay = self._retry_backoff * (2 ** (attempt - 1))
                if isinstance(exc, FlyRateLimited) and exc.retry_after is not None:
                    delay = min(max(delay, exc.retry_after), self._max_retry_after)
                logger.info(
                    "%s %s failed (%s); retry %d in %.2fs", method, path, exc, attempt, delay
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(
        self,
        method: str,
        path: str,
        json: Any,
        params: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
        request_timeout: float | None,
    ) -> httpx.Response:
        kwargs: dict[str, Any] = {"params": params, "headers": headers}
        if json is not None:
            kwargs["json"] = json
        if request_timeout is not None:
            kwargs["timeout"] = httpx.Timeout(request_timeout)
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.ConnectTimeout as exc:
            raise FlyTimeout(
                "timed out connecting to the Machines API",
                method=method,
                path=path,
                maybe_applied=False,
            ) from exc
        except httpx.TimeoutException as exc:
            raise FlyTimeout(
                "the Machines API did not answer in time", method=method, path=path
            ) from exc
        except httpx.ConnectError as exc:
            raise FlyUnavailable(
                "could not connect to the Machines API",
                method=method,
                path=path,
                maybe_applied=False,
            ) from exc
        except httpx.TransportError as exc:
            # Sent, then the connection broke before a complete reply: the "lost response".
            raise FlyUnavailable(
                f"connection lost before a complete reply ({type(exc).__name__})",
                method=method,
                path=path,
            ) from exc

    # ---------------------------------------------------------------- reply parsing

    def _parse(self, model: type[M], response: httpx.Response, method: str, path: str) -> M:
        try:
            return model.model_validate(response.json())
        except (ValueError, ValidationError) as exc:  # JSONDecodeError is a ValueError
            raise FlyProtocolError(
                f"unexpected reply for {model.__name__}: {_short(exc)}",
                status_code=response.status_code,
                method=method,
                path=path,
            ) from exc

    def _json_list(self, response: httpx.Response, method: str, path: str) -> list[Any]:
        try:
            data = response.json()
        except ValueError as exc:
            raise FlyProtocolError(
                "reply is not JSON", status_code=response.status_code, method=method, path=path
            ) from exc
        if not isinstance(data, list):
            raise FlyProtocolError(
                "expected a JSON array", status_code=response.status_code, method=method, path=path
            )
        return data

    def _parse_list(
        self, model: type[M], response: httpx.Response, method: str, path: str
    ) -> list[M]:
        items = self._json_list(response, method, path)
        try:
            return [model.model_validate(item) for item in items]
        except ValidationError as exc:
            raise FlyProtocolError(
                f"unexpected item in {model.__name__} list: {_short(exc)}",
                status_code=response.status_code,
                method=method,
                path=path,
            ) from exc

    def _machine(self, response: httpx.Response, method: str, path: str) -> FlyMachine:
        try:
            data = response.json()
        except ValueError as exc:
            raise FlyProtocolError("reply is not JSON", method=method, path=path) from exc
        return self._machine_from(data, method, path)

    def _machine_from(self, data: Any, method: str, path: str) -> FlyMachine:
        try:
            machine = FlyMachine.model_validate(data)
        except ValidationError as exc:
            raise FlyProtocolError(
                f"unexpected machine reply: {_short(exc)}", method=method, path=path
            ) from exc
        if not (machine.version or machine.instance_id):
            raise FlyProtocolError("machine reply has no version", method=method, path=path)
        return machine


# --------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------


def _seg(value: str) -> str:
    """A path segment. Ids and names from Fly are [a-z0-9_-]; refuse anything that could
    escape the path (``/``, ``..``, ``?``) rather than quoting it."""
    if not value or any(ch in value for ch in "/?#%\\") or value in (".", ".."):
        raise ValueError(f"invalid Fly identifier {value!r}")
    return value


def _short(exc: Exception, limit: int = 300) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_from(response: httpx.Response, method: str, path: str) -> FlyError:
    """Map a non-2xx reply to the error class. The message is Fly's ``error`` text (bounded);
    request headers and bodies are never included."""
    fly_status: str | None = None
    message = response.reason_phrase or "error"
    try:
        body = _ErrorBody.model_validate(response.json())
        fly_status = body.status
        if body.error:
            message = _short(Exception(body.error))
    except (ValueError, ValidationError):
        text = response.text.strip()
        if text:
            message = _short(Exception(text))
    code = response.status_code
    kw: dict[str, Any] = {
        "status_code": code,
        "fly_status": fly_status,
        "method": method,
        "path": path,
    }
    if fly_status in _CAPACITY_STATUSES:
        return FlyCapacity(message, **kw)
    if code == 412:
        if message.startswith("failed_precondition"):
            return FlyPreconditionFailed(message, **kw)
        return FlyCapacity(message, **kw)
    if code == 400:
        return FlyBadRequest(message, **kw)
    if code in (401, 403):
        return FlyAuthError(message, **kw)
    if code == 404:
        return FlyNotFound(message, **kw)
    if code == 408:
        return FlyTimeout(message, **kw)
    if code == 409:
        return FlyConflict(message, **kw)
    if code == 422:
        if fly_status == "name_taken":
            return FlyNameTaken(message, **kw)
        return FlyUnprocessable(message, **kw)
    if code == 429:
        return FlyRateLimited(message, retry_after=_retry_after(response), **kw)
    if code >= 500:
        return FlyServerError(message, **kw)
    return FlyError(message, **kw)


async def _send_request_id(request: httpx.Request) -> None:
    """The work's request id (control_plane/logs.py) on every call, to match Fly's side to ours."""
    request_id = REQUEST_ID.get()
    if request_id is not None:
        request.headers["X-Request-Id"] = request_id
