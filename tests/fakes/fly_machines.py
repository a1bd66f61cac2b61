"""A stateful fake of the Fly Machines API: a real HTTP server on loopback (uvicorn in a thread).

Routing comes from the OpenAPI description itself (``fly-machines-openapi.json`` beside this file,
a verbatim copy of superfly/docs ``api/machines/openapi.json``): every request is matched to its
``operationId`` and its JSON body validated against the operation's request schema before any
handler runs; an invalid body gets a 400 with the validation errors. Validation is *strict* by
default: objects may not carry properties the schema does not declare (a typo such as
``internal_Port`` would otherwise be silently ignored by Fly and by us).

Behaviour mirrors the documented pitfalls (PITFALLS.md, "Fly Machines API"):

- ``/wait`` takes ``timeout`` 1..60 and answers 408 when it expires; waiting for ``stopped``
  without ``version``/``instance_id`` is a 400 (superfly/flyctl#1751).
- ``/stop`` without a body is a 400 (superfly/docs#2187).
- App names are global: 422 ``name_taken``; ``idempotency_key`` makes Create App safe to resend.
- A volume pins a region/host: a machine mounting it must be created in the volume's region.
- Deleting an app deletes its machines, volumes and snapshots (memoetapp/memoet#57).
- Volumes take a snapshot daily (``auto_backup_enabled``, default true) kept
  ``snapshot_retention`` days (1-60, default 5: fly.io/docs/volumes/snapshots; a 400 outside);
  Update Volume changes both, for new snapshots only. :meth:`FlyMachinesFake.run_daily_snapshots`
  stands in for the schedule. A volume created with ``snapshot_id`` must be in an app that holds
  that snapshot and at least the snapshot's volume size; it records it as ``restored_from``.
- ``started`` is not healthy: the checks of a machine turn ``passing`` a little after it starts,
  never for an image or machine marked unhealthy.

Assumptions where the public description is silent (documented so tests don't over-trust them):
machine names are unique per app (409 on a duplicate); deleting a started machine without
``force`` is a 412; writes to a leased machine without its nonce are a 409.

Fault injection (Python methods, thread-safe): :meth:`FlyMachinesFake.fail_next` answers the
next N calls of an operation with a status (5xx, 409, 412, 408 on wait, 429...) *without* doing
anything; :meth:`drop_next` performs the action and then cuts the connection before the reply
(the "lost response"); :meth:`set_start_delay` makes machines slow to start;
:meth:`mark_image_unhealthy` / :meth:`mark_machine_unhealthy` make checks fail forever.
:meth:`set_latency` makes every call of an operation take a random time (the drills' realistic
Fly, ``bench/drills``); :meth:`pause_next` holds the next call of an operation, before or after
its action, until the caller releases it (a worker killed mid-call). Every call is logged in
:attr:`calls`.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import random
import re
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import pytest
import uvicorn
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

SPEC_PATH = Path(__file__).with_name("fly-machines-openapi.json")
_SPEC_URI = "urn:fly-machines-openapi"
DEFAULT_TOKEN = "fake-fly-api-token"
DEFAULT_ORG = "quoroom-test"

_APP_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_VOLUME_NAME_RE = re.compile(r"^[a-z0-9_]{1,30}$")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


# --------------------------------------------------------------------------------------------
# OpenAPI 3.0 → JSON Schema 2020-12
# --------------------------------------------------------------------------------------------


def _convert(schema: Any, *, strict: bool) -> Any:
    """Convert one OpenAPI 3.0 schema object (structurally, keyword by keyword)."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("example", "nullable", "x-enum-varnames", "discriminator", "xml"):
            continue
        if key.startswith("x-"):
            continue
        if key == "properties":
            out[key] = {name: _convert(sub, strict=strict) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = _convert(value, strict=strict)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_convert(sub, strict=strict) for sub in value]
        else:
            out[key] = value
    if schema.get("nullable"):
        # OpenAPI 3.0 ``nullable: true`` → JSON Schema's type union with "null".
        if "type" in out:
            types = out["type"] if isinstance(out["type"], list) else [out["type"]]
            out["type"] = [*types, "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if (
        strict
        and "properties" in out
        and "additionalProperties" not in out
        and not any(k in out for k in ("allOf", "anyOf", "oneOf"))
    ):
        out["additionalProperties"] = False
    return out


class OpenAPISpec:
    """The Machines API description: routes by operationId and request-body validators."""

    def __init__(self, path: Path = SPEC_PATH, *, strict: bool = True) -> None:
        self.document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        schemas = self.document["components"]["schemas"]
        root = {
            "$id": _SPEC_URI,
            "components": {
                "schemas": {name: _convert(s, strict=strict) for name, s in schemas.items()}
            },
        }
        self._registry: Registry = Registry().with_resource(
            _SPEC_URI, DRAFT202012.create_resource(root)
        )
        self._validators: dict[str, Draft202012Validator] = {}
        self.routes: list[tuple[str, re.Pattern[str], str, dict[str, Any]]] = []
        for template, ops in self.document["paths"].items():
            pattern = re.compile(
                "^" + re.sub(r"\\{([^}]+)\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$"
            )
            # Path-parameter names like ``metadata.{key}`` are query params; templates here only
            # use identifiers, which is what (?P<name>) needs.
            for method, op in ops.items():
                if method == "parameters":
                    continue
                self.routes.append((method.upper(), pattern, op["operationId"], op))
        # Literal segments win over templated ones (".../certificates/acme" vs "/{hostname}").
        self.routes.sort(key=lambda r: r[1].pattern.count("(?P<"))

    def match(self, method: str, path: str) -> tuple[str, dict[str, str], dict[str, Any]] | None:
        for route_method, pattern, op_id, op in self.routes:
            if route_method != method:
                continue
            found = pattern.match(path)
            if found:
                return op_id, found.groupdict(), op
        return None

    def validator(self, schema_name: str) -> Draft202012Validator:
        if schema_name not in self._validators:
            ref = {"$ref": f"{_SPEC_URI}#/components/schemas/{schema_name}"}
            self._validators[schema_name] = Draft202012Validator(ref, registry=self._registry)
        return self._validators[schema_name]

    def errors(self, schema_name: str, instance: Any) -> list[str]:
        """Validation errors of ``instance`` against ``components.schemas[schema_name]``."""
        errors = sorted(self.validator(schema_name).iter_errors(instance), key=lambda e: e.path)
        return [f"{'/'.join(map(str, e.absolute_path)) or '<body>'}: {e.message}" for e in errors]

    @staticmethod
    def request_schema_name(op: Mapping[str, Any]) -> str | None:
        body = op.get("requestBody") or {}
        schema = body.get("content", {}).get("application/json", {}).get("schema", {})
        ref = schema.get("$ref", "")
        return ref.rsplit("/", 1)[-1] if ref else None


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


@dataclass
class Call:
    method: str
    path: str
    operation: str
    query: dict[str, str]
    body: Any
    status: int | None = None  # None: the connection was dropped
    request_id: str | None = None  # the X-Request-Id the client sent (control_plane/logs.py)


@dataclass
class _Fault:
    status: int | None  # None: perform, then drop the connection
    remaining: int
    fly_status: str | None = None
    message: str | None = None
    retry_after: float | None = None


class Pause:
    """A held call (:meth:`FlyMachinesFake.pause_next`): ``reached`` is set when the call
    arrives (``after``: once its action is done); :meth:`release` lets it go on. A call held
    *before* its action is then answered 503 without acting (its client is gone: the request
    never got through); one held *after* gets its normal reply (to a client that may be gone)."""

    def __init__(self, operation: str, *, after: bool) -> None:
        self.operation = operation
        self.after = after
        self.reached = threading.Event()
        self._released = threading.Event()

    def release(self) -> None:
        self._released.set()

    async def hold(self) -> None:
        self.reached.set()
        while not self._released.is_set():
            await asyncio.sleep(0.005)


@dataclass
class FakeApp:
    id: str
    name: str
    org_slug: str
    network: str | None = None
    idempotency_key: str | None = None
    visible: bool = True
    secrets: dict[str, str] = field(default_factory=dict)
    secrets_version: int = 0
    ips: list[dict[str, Any]] = field(default_factory=list)
    snapshots: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # by volume id


@dataclass
class FakeVolume:
    id: str
    name: str
    app: str
    region: str
    zone: str
    size_gb: int
    encrypted: bool
    compute: dict[str, Any] | None
    created_at: str
    state: str = "created"
    attached_machine_id: str | None = None
    snapshot_retention: int = 5
    auto_backup_enabled: bool = True
    restored_from: str | None = None  # the snapshot it was created from (not in the API)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "region": self.region,
            "zone": self.zone,
            "size_gb": self.size_gb,
            "encrypted": self.encrypted,
            "state": self.state,
            "attached_machine_id": self.attached_machine_id,
            "created_at": self.created_at,
            "fstype": "ext4",
            "type": "local",
            "host_status": "ok",
            "snapshot_retention": self.snapshot_retention,
            "auto_backup_enabled": self.auto_backup_enabled,
        }


@dataclass
class FakeMachine:
    id: str
    name: str
    app: str
    region: str
    config: dict[str, Any]
    version: str
    created_at: str
    state: str = "created"
    pending: tuple[str, float] | None = None
    started_at: float | None = None
    lease: dict[str, Any] | None = None
    versions: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _now_iso_ms() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def _ulid() -> str:
    return "".join(secrets.choice(_CROCKFORD) for _ in range(26))


def _hex(n: int) -> str:
    return secrets.token_hex(n)


class _Drop(Exception):
    """Perform the action, then close the connection without a complete reply."""


class _HTTPError(Exception):
    def __init__(self, status: int, error: str, fly_status: str | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.fly_status = fly_status


Handler = Callable[[Request, dict[str, str], Any], Awaitable[tuple[int, Any]]]


# --------------------------------------------------------------------------------------------
# The fake
# --------------------------------------------------------------------------------------------


class FlyMachinesFake:
    """The fake Machines API. Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        org_slug: str = DEFAULT_ORG,
        start_delay: float = 0.05,
        stop_delay: float = 0.05,
        check_delay: float = 0.05,
        default_region: str = "iad",
        strict: bool = True,
        spec: OpenAPISpec | None = None,
    ) -> None:
        self.token = token
        self.org_slug = org_slug
        self.start_delay = start_delay
        self.stop_delay = stop_delay
        self.check_delay = check_delay
        self.default_region = default_region
        self.spec = spec or OpenAPISpec(strict=strict)
        self.calls: list[Call] = []
        self.apps: dict[str, FakeApp] = {}
        self.volumes: dict[str, FakeVolume] = {}
        self.machines: dict[str, FakeMachine] = {}
        self._faults: dict[str, list[_Fault]] = {}
        self._latency: dict[str, tuple[float, float]] = {}
        self._pauses: dict[str, list[Pause]] = {}
        self._machine_start_delay: dict[str, float] = {}
        self._unhealthy_images: set[str] = set()
        self._unhealthy_machines: set[tuple[str, str | None]] = set()
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        self._handlers: dict[str, Handler] = {
            "Apps_create": self._apps_create,
            "Apps_show": self._apps_show,
            "Apps_list": self._apps_list,
            "Apps_delete": self._apps_delete,
            "Secrets_update": self._secrets_update,
            "Secrets_list": self._secrets_list,
            "App_IPAssignments_create": self._ips_create,
            "App_IPAssignments_list": self._ips_list,
            "Volumes_create": self._volumes_create,
            "Volumes_list": self._volumes_list,
            "Volumes_get_by_id": self._volumes_show,
            "Volumes_update": self._volumes_update,
            "Volume_delete": self._volumes_delete,
            "createVolumeSnapshot": self._snapshots_create,
            "Volumes_list_snapshots": self._snapshots_list,
            "Machines_create": self._machines_create,
            "Machines_list": self._machines_list,
            "Machines_show": self._machines_show,
            "Machines_update": self._machines_update,
            "Machines_delete": self._machines_delete,
            "Machines_start": self._machines_start,
            "Machines_stop": self._machines_stop,
            "Machines_wait": self._machines_wait,
            "Machines_create_lease": self._lease_create,
            "Machines_release_lease": self._lease_release,
            "Machines_show_lease": self._lease_show,
        }

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("the fake is not running")
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self,
            log_config=None,
            lifespan="off",
            ws="none",
            http="h11",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="fly-fake", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake Machines API did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- fault injection

    def fail_next(
        self,
        operation: str,
        status: int = 503,
        *,
        times: int = 1,
        fly_status: str | None = None,
        message: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        """Answer the next ``times`` calls of ``operation`` (an operationId such as
        ``Machines_create``) with ``status`` and do nothing else."""
        self._check_operation(operation)
        with self._lock:
            self._faults.setdefault(operation, []).append(
                _Fault(status, times, fly_status, message, retry_after)
            )

    def drop_next(self, operation: str, *, times: int = 1) -> None:
        """Perform the next ``times`` calls of ``operation``, then cut the connection before
        the reply is complete (the client sees a transport error; the effect happened)."""
        self._check_operation(operation)
        with self._lock:
            self._faults.setdefault(operation, []).append(_Fault(None, times))

    def set_latency(self, operation: str, low: float, high: float | None = None) -> None:
        """Every later call of ``operation`` waits a uniformly random ``low``..``high`` seconds
        (``low`` when no ``high``) before it is handled; other calls go on meanwhile. 0 removes
        it."""
        self._check_operation(operation)
        with self._lock:
            if low <= 0 and not high:
                self._latency.pop(operation, None)
            else:
                self._latency[operation] = (low, low if high is None else high)

    def pause_next(self, operation: str, *, after: bool = True) -> Pause:
        """Hold the next call of ``operation`` until :meth:`Pause.release` (see :class:`Pause`)."""
        self._check_operation(operation)
        pause = Pause(operation, after=after)
        with self._lock:
            self._pauses.setdefault(operation, []).append(pause)
        return pause

    def set_start_delay(self, seconds: float, *, machine_id: str | None = None) -> None:
        """Machines (or one machine) take ``seconds`` to go from starting to started."""
        with self._lock:
            if machine_id is None:
                self.start_delay = seconds
            else:
                self._machine_start_delay[machine_id] = seconds

    def mark_image_unhealthy(self, image: str) -> None:
        """Machines running ``image`` start but their checks never pass."""
        with self._lock:
            self._unhealthy_images.add(image)

    def mark_machine_unhealthy(
        self, machine_id: str, *, image: str | None = None, unhealthy: bool = True
    ) -> None:
        """The machine's checks never pass (only while it runs ``image``, when given)."""
        with self._lock:
            if unhealthy:
                self._unhealthy_machines.add((machine_id, image))
            else:
                self._unhealthy_machines.discard((machine_id, image))

    def add_foreign_app(self, name: str, *, org_slug: str, visible: bool = True) -> None:
        """An app of another organization that holds a (global) name."""
        with self._lock:
            self.apps[name] = FakeApp(
                id=f"app_{_hex(6)}", name=name, org_slug=org_slug, visible=visible
            )

    def run_daily_snapshots(self) -> list[str]:
        """Fly's schedule, run now: a snapshot of every volume with ``auto_backup_enabled``;
        returns their ids."""
        with self._lock:
            return [
                self._take_snapshot(volume)["id"]
                for volume in list(self.volumes.values())
                if volume.auto_backup_enabled and volume.app in self.apps
            ]

    def calls_to(self, operation: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.operation == operation]

    def live_machines(self, app: str | None = None) -> list[FakeMachine]:
        with self._lock:
            for machine in self.machines.values():
                self._advance(machine)
            return [
                m
                for m in self.machines.values()
                if m.state != "destroyed" and (app is None or m.app == app)
            ]

    def _check_operation(self, operation: str) -> None:
        if operation not in self._handlers:
            raise ValueError(f"unknown or unimplemented operation {operation!r}")

    # ---------------------------------------------------------------- ASGI entry point

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        call = Call(
            method=request.method,
            path=request.url.path,
            operation="?",
            query=dict(request.query_params),
            body=None,
            request_id=request.headers.get("x-request-id"),
        )
        try:
            response = await self._dispatch(request, call)
        except _Drop:
            call.status = None
            # Start a reply that promises a body, then return without it: uvicorn closes the
            # connection ("ASGI callable returned without completing response").
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"64")],
                }
            )
            return
        call.status = response.status_code
        await response(scope, receive, send)

    async def _dispatch(self, request: Request, call: Call) -> Response:
        matched = self.spec.match(request.method, request.url.path)
        if matched is None:
            return _error(404, f"no route for {request.method} {request.url.path}")
        op_id, params, op = matched
        call.operation = op_id
        with self._lock:
            self.calls.append(call)
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return _error(401, "unauthorized")
        raw = await request.body()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                return _error(400, "request body is not valid JSON")
        call.body = body
        schema_name = OpenAPISpec.request_schema_name(op)
        if raw and schema_name is None:
            return _error(400, f"{op_id} takes no request body")
        if schema_name is not None:
            required = (op.get("requestBody") or {}).get("required", False)
            if body is None and (required or op_id == "Machines_stop"):
                # superfly/docs#2187: /stop with no body answers 400.
                return _error(400, f"{op_id}: a JSON body is required")
            if body is not None:
                problems = self.spec.errors(schema_name, body)
                if problems:
                    return _error(400, f"invalid {schema_name}: " + "; ".join(problems[:10]))
        with self._lock:
            latency = self._latency.get(op_id)
            queued = self._pauses.get(op_id)
            pause = queued.pop(0) if queued else None
        if latency is not None:
            await asyncio.sleep(random.uniform(*latency))
        if pause is not None and not pause.after:
            await pause.hold()
            return _error(503, "injected: the request never got through")
        fault = self._take_fault(op_id)
        if fault is not None and fault.status is not None:
            headers = {"retry-after": f"{fault.retry_after:g}"} if fault.retry_after else None
            message = fault.message or f"injected {fault.status}"
            return _error(fault.status, message, fault.fly_status, headers=headers)
        handler = self._handlers.get(op_id)
        if handler is None:
            return _error(501, f"{op_id} is not implemented by the fake")
        try:
            status, payload = await handler(request, params, body)
        except _HTTPError as exc:
            return _error(exc.status, exc.error, exc.fly_status)
        finally:
            if pause is not None:
                await pause.hold()
        if fault is not None:  # a drop fault: the action happened, the reply is lost
            raise _Drop
        if payload is None:
            return Response(status_code=status)
        return JSONResponse(payload, status_code=status)

    def _take_fault(self, op_id: str) -> _Fault | None:
        with self._lock:
            queue = self._faults.get(op_id)
            if not queue:
                return None
            fault = queue[0]
            fault.remaining -= 1
            if fault.remaining <= 0:
                queue.pop(0)
            return fault

    # ---------------------------------------------------------------- helpers

    def _app(self, name: str) -> FakeApp:
        """An app this token can see: ours, or another org's marked visible."""
        app = self.apps.get(name)
        if app is None or (app.org_slug != self.org_slug and not app.visible):
            raise _HTTPError(404, f"app {name} not found")
        return app

    def _own_app(self, name: str) -> FakeApp:
        app = self._app(name)
        if app.org_slug != self.org_slug:
            raise _HTTPError(404, f"app {name} not found")
        return app

    def _machine(self, app: str, machine_id: str) -> FakeMachine:
        self._own_app(app)
        machine = self.machines.get(machine_id)
        if machine is None or machine.app != app:
            raise _HTTPError(404, f"machine {machine_id} not found")
        self._advance(machine)
        return machine

    def _advance(self, machine: FakeMachine) -> None:
        if machine.pending and time.monotonic() >= machine.pending[1]:
            machine.state = machine.pending[0]
            machine.pending = None
            if machine.state == "started":
                machine.started_at = time.monotonic()
            machine.events.append({"type": machine.state, "timestamp": int(time.time() * 1000)})

    def _schedule(self, machine: FakeMachine, transitional: str, final: str, delay: float) -> None:
        machine.state = transitional
        machine.started_at = None
        machine.pending = (final, time.monotonic() + delay)
        self._advance(machine)

    def _launch(self, machine: FakeMachine) -> None:
        delay = self._machine_start_delay.get(machine.id, self.start_delay)
        self._schedule(machine, "starting", "started", delay)

    def _check_lease(self, machine: FakeMachine, request: Request) -> None:
        lease = machine.lease
        if lease and lease["expires_at"] > time.time():
            if request.headers.get("fly-machine-lease-nonce") != lease["nonce"]:
                raise _HTTPError(409, f"machine {machine.id} is leased by another client")

    def _checks(self, machine: FakeMachine) -> list[dict[str, Any]]:
        names = list((machine.config.get("checks") or {}).keys())
        for i, service in enumerate(machine.config.get("services") or []):
            for j, _ in enumerate(service.get("checks") or []):
                names.append(f"servicecheck-{i:02d}-{j:02d}")
        if not names or machine.state != "started":
            return []
        image = machine.config.get("image")
        unhealthy = (
            (machine.id, None) in self._unhealthy_machines
            or (machine.id, image) in self._unhealthy_machines
            or image in self._unhealthy_images
        )
        if unhealthy:
            status, output = "critical", "GET /healthz: connection refused"
        elif machine.started_at is not None and (
            time.monotonic() >= machine.started_at + self.check_delay
        ):
            status, output = "passing", "200 OK"
        else:
            status, output = "warning", "waiting for the first check"
        return [
            {"name": n, "status": status, "output": output, "updated_at": _now_iso()} for n in names
        ]

    def _machine_json(self, machine: FakeMachine) -> dict[str, Any]:
        return {
            "id": machine.id,
            "name": machine.name,
            "state": machine.state,
            "region": machine.region,
            "instance_id": machine.version,
            "version": machine.version,
            "private_ip": f"fdaa:0:1:a7b:1::{int(machine.id[-4:], 16):x}",
            "config": copy.deepcopy(machine.config),
            "image_ref": {"repository": str(machine.config.get("image", "")).split("@")[0]},
            "checks": self._checks(machine),
            "created_at": machine.created_at,
            "updated_at": _now_iso(),
            "host_status": "ok",
            "events": list(reversed(machine.events[-5:])),
        }

    # ---------------------------------------------------------------- apps

    async def _apps_create(self, request: Request, params: dict[str, str], body: Any):
        name = body.get("name")
        org = body.get("org_slug")
        key = body.get("idempotency_key")
        if not name or not _APP_NAME_RE.match(name):
            raise _HTTPError(400, "name is required: lowercase letters, digits and dashes")
        if not org:
            raise _HTTPError(400, "org_slug is required")
        if org != self.org_slug:
            raise _HTTPError(404, f"organization {org} not found")
        with self._lock:
            if key:
                for app in self.apps.values():
                    if app.idempotency_key == key and app.name != name:
                        raise _HTTPError(422, "idempotency_key was used with a different name")
            existing = self.apps.get(name)
            if existing is not None:
                if key and existing.idempotency_key == key:
                    return 201, {"id": existing.id, "created_at": 0}
                raise _HTTPError(422, f"app name {name} is already taken", "name_taken")
            app = FakeApp(
                id=f"app_{_hex(6)}",
                name=name,
                org_slug=org,
                network=body.get("network"),
                idempotency_key=key,
            )
            self.apps[name] = app
            return 201, {"id": app.id, "created_at": int(time.time() * 1000)}

    def _app_json(self, app: FakeApp) -> dict[str, Any]:
        machines = [m for m in self.machines.values() if m.app == app.name]
        return {
            "id": app.id,
            "name": app.name,
            "status": "deployed" if machines else "pending",
            "organization": {"slug": app.org_slug, "name": app.org_slug},
            "machine_count": len([m for m in machines if m.state != "destroyed"]),
            "volume_count": len([v for v in self.volumes.values() if v.app == app.name]),
            "network": app.network or "default",
        }

    async def _apps_show(self, request: Request, params: dict[str, str], body: Any):
        with self._lock:
            return 200, self._app_json(self._app(params["app_name"]))

    async def _apps_list(self, request: Request, params: dict[str, str], body: Any):
        org = request.query_params.get("org_slug")
        if not org:
            raise _HTTPError(400, "org_slug is required")
        with self._lock:
            apps = [self._app_json(a) for a in self.apps.values() if a.org_slug == org]
        return 200, {"apps": apps, "total_apps": len(apps)}

    async def _apps_delete(self, request: Request, params: dict[str, str], body: Any):
        with self._lock:
            app = self._own_app(params["app_name"])
            # memoetapp/memoet#57: the app takes its machines, volumes and snapshots with it.
            for machine in self.machines.values():
                if machine.app == app.name:
                    machine.state, machine.pending = "destroyed", None
            for vol_id in [v.id for v in self.volumes.values() if v.app == app.name]:
                del self.volumes[vol_id]
            del self.apps[app.name]
        return 202, None

    # ---------------------------------------------------------------- secrets and IPs

    async def _secrets_update(self, request: Request, params: dict[str, str], body: Any):
        values = body.get("values") or {}
        with self._lock:
            app = self._own_app(params["app_name"])
            for key, value in values.items():
                app.secrets[key] = value
            app.secrets_version += 1
            names = [{"name": n, "digest": _hex(8)} for n in sorted(app.secrets)]
            return 200, {"version": app.secrets_version, "secrets": names}

    async def _secrets_list(self, request: Request, params: dict[str, str], body: Any):
        with self._lock:
            app = self._own_app(params["app_name"])
            return 200, {"secrets": [{"name": n, "digest": _hex(8)} for n in sorted(app.secrets)]}

    async def _ips_create(self, request: Request, params: dict[str, str], body: Any):
        ip_type = body.get("type") or "v6"
        with self._lock:
            app = self._own_app(params["app_name"])
            n = next(self._ids)
            ip = f"66.241.{n // 250}.{n % 250}" if "v4" in ip_type else f"2a09:8280:1::{n:x}"
            entry = {
                "ip": ip,
                "region": body.get("region") or "global",
                "shared": ip_type == "shared_v4",
                "service_name": body.get("service_name") or "",
                "created_at": _now_iso(),
            }
            app.ips.append(entry)
            return 200, entry

    async def _ips_list(self, request: Request, params: dict[str, str], body: Any):
        with self._lock:
            return 200, {"ips": list(self._own_app(params["app_name"]).ips)}

    # ---------------------------------------------------------------- volumes

    async def _volumes_create(self, request: Request, params: dict[str, str], body: Any):
        name, region, size = body.get("name"), body.get("region"), body.get("size_gb")
        if not name or not _VOLUME_NAME_RE.match(name):
            raise _HTTPError(400, "name: up to 30 lowercase letters, digits and underscores")
        if not region:
            raise _HTTPError(400, "region is required")
        if not isinstance(size, int) or size < 1:
            raise _HTTPError(400, "size_gb must be at least 1")
        retention = _check_retention(body.get("snapshot_retention", 5))
        with self._lock:
            app = self._own_app(params["app_name"])
            snapshot_id = body.get("snapshot_id")
            if snapshot_id:
                found = [s for snaps in app.snapshots.values() for s in snaps]
                snapshot = next((s for s in found if s["id"] == snapshot_id), None)
                if snapshot is None:
                    raise _HTTPError(404, f"snapshot {snapshot_id} not found")
                if size * 1024**3 < snapshot["volume_size"]:
                    raise _HTTPError(
                        400, f"size_gb {size} is smaller than snapshot {snapshot_id}'s volume"
                    )
            volume = FakeVolume(
                id=f"vol_{_hex(8)}",
                name=name,
                app=app.name,
                region=region,
                zone=_hex(2),  # the host the volume is pinned to
                size_gb=size,
                encrypted=body.get("encrypted", True),
                compute=body.get("compute"),
                created_at=_now_iso(),
                snapshot_retention=retention,
                auto_backup_enabled=body.get("auto_backup_enabled", True),
                restored_from=snapshot_id or None,
            )
            self.volumes[volume.id] = volume
            return 200, volume.to_json()

    async def _volumes_update(self, request: Request, params: dict[str, str], body: Any):
        with self._lock:
            volume = self._volume(params["app_name"], params["volume_id"])
            if "snapshot_retention" in body:
                volume.snapshot_retention = _check_retention(body["snapshot_retention"])
            if "auto_backup_enabled" in body:
                volume.auto_backup_enabled = bool(body["auto_backup_enabled"])
            return 200, volume.to_json()

    def _volume(self, app: str, volume_id: str) -> FakeVolume:
        self._own_app(app)
        volume = self.volumes.get(volume_id)
        if volume is None or volume.app != app:
            raise _HTTPError(404, f"volume {volume_id} not found")
        return volume

    async def _volumes_list(self, request: Request, params: dict[str, str], body: Any):
        with self._lock:
            app = self._own_app(params["app_name"])
            return 200, [v.to_json() for v in self.volumes.values() if v.app == app.name]

    async def _volumes_show(self, request: Request, params: dict[str, str], body: Any):
        with self._lock:
            return 200, self._volume(params["app_name"], params["volume_id"]).to_json()

    async def _volumes_delete(self, request: Request, params: dict[str, str], body: Any):
        with self._lock:
            volume = self._volume(params["app_name"], params["volume_id"])
            attached = self.machines.get(volume.attached_machine_id or "")
            if attached is not None and attached.state != "destroyed":
                raise _HTTPError(
                    412, f"failed_precondition: volume {volume.id} is attached to {attached.id}"
                )
            del self.volumes[volume.id]
            volume.state = "destroyed"
            return 200, volume.to_json()

    def _take_snapshot(self, volume: FakeVolume) -> dict[str, Any]:
        snapshot = {
            "id": f"vs_{_hex(8)}",
            "status": "created",
            "created_at": _now_iso_ms(),
            "size": volume.size_gb * 1024**3 // 10,
            "volume_size": volume.size_gb * 1024**3,
            "digest": _hex(16),
            # The volume's retention when it was taken (a later update leaves it alone).
            "retention_days": volume.snapshot_retention,
        }
        self.apps[volume.app].snapshots.setdefault(volume.id, []).append(snapshot)
        return snapshot

    async def _snapshots_create(self, request: Request, params: dict[str, str], body: Any):
        with self._lock:
            self._take_snapshot(self._volume(params["app_name"], params["volume_id"]))
        return 200, None

    async def _snapshots_list(self, request: Request, params: dict[str, str], body: Any):
        with self._lock:
            app = self._own_app(params["app_name"])
            volume_id = params["volume_id"]
            if volume_id not in self.volumes and volume_id not in app.snapshots:
                raise _HTTPError(404, f"volume {volume_id} not found")
            return 200, list(app.snapshots.get(volume_id, []))

    # ---------------------------------------------------------------- machines

    async def _machines_create(self, request: Request, params: dict[str, str], body: Any):
        config = copy.deepcopy(body.get("config") or {})
        if not config.get("image"):
            raise _HTTPError(400, "config.image is required")
        region = body.get("region") or self.default_region
        with self._lock:
            app = self._own_app(params["app_name"])
            name = body.get("name") or f"machine-{_hex(4)}"
            for other in self.machines.values():
                if other.app == app.name and other.name == name and other.state != "destroyed":
                    raise _HTTPError(409, f"a machine named {name} already exists")
            volumes = []
            for mount in config.get("mounts") or []:
                volume = self.volumes.get(mount.get("volume", ""))
                if volume is None or volume.app != app.name:
                    raise _HTTPError(404, f"volume {mount.get('volume')} not found")
                if volume.region != region:
                    # Kilo-Org/cloud#388: the volume pins the host; the machine must follow it.
                    raise _HTTPError(
                        400, f"volume {volume.id} is in region {volume.region}, not {region}"
                    )
                attached = self.machines.get(volume.attached_machine_id or "")
                if attached is not None and attached.state != "destroyed":
                    raise _HTTPError(409, f"volume {volume.id} is attached to {attached.id}")
                volumes.append(volume)
            machine = FakeMachine(
                # 14 hex digits like Fly's; the last 4 are a counter (used for the private IP)
                id=f"{_hex(5)}{next(self._ids) % 0x10000:04x}",
                name=name,
                app=app.name,
                region=region,
                config=config,
                version=_ulid(),
                created_at=_now_iso(),
            )
            for volume in volumes:
                volume.attached_machine_id = machine.id
            machine.versions.append({"version": machine.version, "user_config": config})
            self.machines[machine.id] = machine
            if not body.get("skip_launch"):
                self._launch(machine)
            reply = self._machine_json(machine)
            reply["state"] = "created"  # the create reply always says created
            return 200, reply

    async def _machines_list(self, request: Request, params: dict[str, str], body: Any):
        query = request.query_params
        wanted_meta = {
            k[len("metadata.") :]: v for k, v in query.items() if k.startswith("metadata.")
        }
        states = {s for s in (query.get("state") or "").split(",") if s}
        include_deleted = query.get("include_deleted") == "true"
        region = query.get("region")
        with self._lock:
            app = self._own_app(params["app_name"])
            out = []
            for machine in self.machines.values():
                if machine.app != app.name:
                    continue
                self._advance(machine)
                if machine.state == "destroyed" and not include_deleted:
                    continue
                if states and machine.state not in states:
                    continue
                if region and machine.region != region:
                    continue
                meta = machine.config.get("metadata") or {}
                if any(meta.get(k) != v for k, v in wanted_meta.items()):
                    continue
                out.append(self._machine_json(machine))
            return 200, out

    async def _machines_show(self, request: Request, params: dict[str, str], body: Any):
        with self._lock:
            return 200, self._machine_json(self._machine(params["app_name"], params["machine_id"]))

    async def _machines_update(self, request: Request, params: dict[str, str], body: Any):
        with self._lock:
            machine = self._machine(params["app_name"], params["machine_id"])
            self._check_lease(machine, request)
            if machine.state in ("destroyed", "destroying"):
                raise _HTTPError(412, f"failed_precondition: machine {machine.id} is destroyed")
            current = body.get("current_version")
            if current and current != machine.version:
                raise _HTTPError(409, f"current_version {current} does not match {machine.version}")
            config = copy.deepcopy(body.get("config") or {})
            if not config.get("image"):
                raise _HTTPError(400, "config.image is required")
            machine.config = config
            machine.version = _ulid()
            machine.versions.append({"version": machine.version, "user_config": config})
            if body.get("skip_launch"):
                if machine.state in ("started", "starting", "replacing"):
                    self._schedule(machine, "stopping", "stopped", self.stop_delay)
            else:
                delay = self._machine_start_delay.get(machine.id, self.start_delay)
                self._schedule(machine, "replacing", "started", delay)
            return 200, self._machine_json(machine)

    async def _machines_delete(self, request: Request, params: dict[str, str], body: Any):
        force = request.query_params.get("force") == "true"
        with self._lock:
            machine = self._machine(params["app_name"], params["machine_id"])
            self._check_lease(machine, request)
            if machine.state in ("started", "starting", "replacing") and not force:
                raise _HTTPError(
                    412, f"failed_precondition: machine {machine.id} is {machine.state}; stop it"
                )
            machine.state, machine.pending, machine.started_at = "destroyed", None, None
            for volume in self.volumes.values():
                if volume.attached_machine_id == machine.id:
                    volume.attached_machine_id = None
            return 200, {"ok": True}

    async def _machines_start(self, request: Request, params: dict[str, str], body: Any):
        with self._lock:
            machine = self._machine(params["app_name"], params["machine_id"])
            self._check_lease(machine, request)
            previous = machine.state
            if previous == "destroyed":
                raise _HTTPError(412, f"failed_precondition: machine {machine.id} is destroyed")
            if previous in ("created", "stopped", "suspended", "stopping"):
                self._launch(machine)
            return 200, {"previous_state": previous}

    async def _machines_stop(self, request: Request, params: dict[str, str], body: Any):
        with self._lock:
            machine = self._machine(params["app_name"], params["machine_id"])
            self._check_lease(machine, request)
            if machine.state == "destroyed":
                raise _HTTPError(412, f"failed_precondition: machine {machine.id} is destroyed")
            if machine.state in ("started", "starting", "replacing", "created"):
                self._schedule(machine, "stopping", "stopped", self.stop_delay)
            return 200, {"ok": True}

    async def _machines_wait(self, request: Request, params: dict[str, str], body: Any):
        query = request.query_params
        state = query.get("state") or "started"
        allowed = {"started", "stopped", "suspended", "destroyed", "failed", "settled"}
        if state not in allowed:
            raise _HTTPError(400, f"state must be one of {sorted(allowed)}")
        try:
            timeout = int(query.get("timeout") or 60)
        except ValueError as exc:
            raise _HTTPError(400, "timeout must be an integer number of seconds") from exc
        if not 1 <= timeout <= 60:
            raise _HTTPError(400, "timeout must be between 1 and 60 seconds")
        version = query.get("version") or query.get("instance_id")
        if state == "stopped" and not version:
            # superfly/flyctl#1751: waiting for stopped needs the version (instance_id).
            raise _HTTPError(400, "version (instance_id) is required to wait for stopped")
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                machine = self._machine(params["app_name"], params["machine_id"])
                if machine.state == state:
                    return 200, {"ok": True, "state": state, "version": machine.version}
            if time.monotonic() >= deadline:
                raise _HTTPError(408, f"deadline_exceeded: machine did not reach {state}")
            await asyncio.sleep(0.01)

    # ---------------------------------------------------------------- leases

    async def _lease_create(self, request: Request, params: dict[str, str], body: Any):
        with self._lock:
            machine = self._machine(params["app_name"], params["machine_id"])
            lease = machine.lease
            nonce = request.headers.get("fly-machine-lease-nonce")
            if lease and lease["expires_at"] > time.time() and lease["nonce"] != nonce:
                raise _HTTPError(409, f"machine {machine.id} already has a lease")
            machine.lease = {
                "nonce": _hex(8),
                "expires_at": int(time.time()) + int(body.get("ttl") or 30),
                "owner": "fake@quoroom.test",
                "description": body.get("description") or "",
                "version": machine.version,
            }
            return 201, {"status": "success", "data": dict(machine.lease)}

    async def _lease_release(self, request: Request, params: dict[str, str], body: Any):
        with self._lock:
            machine = self._machine(params["app_name"], params["machine_id"])
            nonce = request.headers.get("fly-machine-lease-nonce")
            if machine.lease and machine.lease["nonce"] != nonce:
                raise _HTTPError(409, "lease nonce does not match")
            machine.lease = None
            return 200, {"ok": True}

    async def _lease_show(self, request: Request, params: dict[str, str], body: Any):
        with self._lock:
            machine = self._machine(params["app_name"], params["machine_id"])
            if not machine.lease or machine.lease["expires_at"] <= time.time():
                raise _HTTPError(404, "no active lease")
            return 200, {"status": "success", "data": dict(machine.lease)}


def _check_retention(value: Any) -> int:
    """``snapshot_retention``: whole days, 1-60 (fly.io/docs/volumes/snapshots)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 60:
        raise _HTTPError(400, f"snapshot_retention must be 1-60 days, got {value!r}")
    return value


def _error(
    status: int,
    message: str,
    fly_status: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    payload: dict[str, Any] = {"error": message}
    if fly_status:
        payload["status"] = fly_status
    return JSONResponse(payload, status_code=status, headers=dict(headers or {}))


@pytest.fixture
def fly_machines_fake() -> Iterator[FlyMachinesFake]:
    """A running fake Machines API (token :data:`DEFAULT_TOKEN`, org :data:`DEFAULT_ORG`).

    Import it into a conftest: ``from tests.fakes.fly_machines import fly_machines_fake``.
    """
    with FlyMachinesFake() as fake:
        yield fake
