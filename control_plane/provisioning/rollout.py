"""Rolling update: move running Room machines to a new runtime image, one machine at a time.

For each target: read the machine (its version and config), update it with the same config and
only the image changed, guarded by ``current_version`` (a machine changed by someone else meanwhile
is a 409, not an overwrite), wait for ``started`` at the new version and then for its checks to
pass (``started`` is not ready: PITFALLS.md). If it does not become healthy, put the previous
config back and wait for that to be healthy. After ``max_failures`` failed machines the rollout
stops and the rest are reported as skipped: a bad image harms at most that many Rooms.

``quoroom-cloud ops update-image IMAGE`` calls :func:`run_update_image`.
"""

from __future__ import annotations

import copy
import enum
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from control_plane.provisioning.fly_api import (
    DEFAULT_BASE_URL,
    FlyError,
    FlyMachine,
    FlyMachinesClient,
)
from fly_image.config import check_image_reference

__all__ = [
    "EventCallback",
    "InstanceResult",
    "Outcome",
    "RolloutReport",
    "RolloutTarget",
    "format_report",
    "rolling_update",
    "run_update_image",
]

logger = logging.getLogger(__name__)

# on_event(instance_id, kind, detail): the control plane writes these as instance_events rows.
EventCallback = Callable[[str, str, Mapping[str, Any]], Awaitable[None] | None]


class Outcome(enum.StrEnum):
    UPDATED = "updated"  # on the new image and healthy
    ROLLED_BACK = "rolled_back"  # the new image failed; the previous config is back and healthy
    FAILED = "failed"  # the update or the rollback failed: needs an operator
    SKIPPED = "skipped"  # not touched (already on the image, not running, or rollout stopped)


@dataclass(frozen=True, slots=True)
class RolloutTarget:
    instance_id: str
    app_name: str
    machine_id: str


@dataclass(slots=True)
class InstanceResult:
    instance_id: str
    app_name: str
    machine_id: str
    outcome: Outcome
    detail: str
    previous_image: str | None = None
    version: str | None = None


@dataclass(slots=True)
class RolloutReport:
    image: str
    results: list[InstanceResult] = field(default_factory=list)
    stopped_early: bool = False

    def by_outcome(self, outcome: Outcome) -> list[InstanceResult]:
        return [r for r in self.results if r.outcome is outcome]

    @property
    def failures(self) -> int:
        return len(self.by_outcome(Outcome.ROLLED_BACK)) + len(self.by_outcome(Outcome.FAILED))

    @property
    def ok(self) -> bool:
        """True when nothing failed and the rollout ran to the end."""
        return self.failures == 0 and not self.stopped_early


async def rolling_update(
    client: FlyMachinesClient,
    targets: Iterable[RolloutTarget],
    image: str,
    *,
    max_failures: int = 1,
    wait_timeout: float = 180.0,
    health_timeout: float = 120.0,
    poll_interval: float = 1.0,
    on_event: EventCallback | None = None,
) -> RolloutReport:
    """Update ``targets`` to ``image`` one at a time; see the module docstring.

    ``image`` must be pinned by digest. ``on_event(instance_id, kind, detail)`` is called (and
    awaited if it returns an awaitable) with kinds ``image_update_started``, ``image_updated``,
    ``image_update_failed``, ``image_rolled_back``, ``image_rollback_failed`` and
    ``image_update_skipped``.
    """
    check_image_reference(image)
    if max_failures < 1:
        raise ValueError("max_failures must be at least 1")
    report = RolloutReport(image=image)
    roll = _Rollout(client, image, wait_timeout, health_timeout, poll_interval, on_event)
    for target in targets:
        if report.failures >= max_failures:
            report.stopped_early = True
            result = _result(
                target,
                Outcome.SKIPPED,
                f"rollout stopped after {report.failures} failure(s)",
            )
            await roll.emit(target, "image_update_skipped", result)
        else:
            result = await roll.update_one(target)
        report.results.append(result)
    return report


class _Rollout:
    def __init__(
        self,
        client: FlyMachinesClient,
        image: str,
        wait_timeout: float,
        health_timeout: float,
        poll_interval: float,
        on_event: EventCallback | None,
    ) -> None:
        self.client = client
        self.image = image
        self.wait_timeout = wait_timeout
        self.health_timeout = health_timeout
        self.poll_interval = poll_interval
        self.on_event = on_event

    async def emit(self, target: RolloutTarget, kind: str, result: InstanceResult) -> None:
        if self.on_event is None:
            return
        detail = {
            "machine_id": target.machine_id,
            "app": target.app_name,
            "image": self.image,
            "previous_image": result.previous_image,
            "detail": result.detail,
        }
        try:
            maybe = self.on_event(target.instance_id, kind, detail)
            if maybe is not None:
                await maybe
        except Exception:  # a failing recorder must not leave a machine half-updated
            logger.exception("on_event failed for %s (%s)", target.instance_id, kind)

    async def update_one(self, target: RolloutTarget) -> InstanceResult:
        app, machine_id = target.app_name, target.machine_id
        try:
            machine = await self.client.get_machine(app, machine_id)
        except FlyError as exc:
            result = _result(target, Outcome.FAILED, f"could not read the machine: {exc}")
            await self.emit(target, "image_update_failed", result)
            return result
        previous_image = machine.image
        if previous_image == self.image:
            result = _result(target, Outcome.SKIPPED, "already on this image", previous_image)
            await self.emit(target, "image_update_skipped", result)
            return result
        if machine.state != "started":
            result = _result(
                target, Outcome.SKIPPED, f"machine is {machine.state}, not started", previous_image
            )
            await self.emit(target, "image_update_skipped", result)
            return result

        old_config = copy.deepcopy(machine.config)
        new_config = copy.deepcopy(machine.config)
        new_config["image"] = self.image  # only the image changes
        started = _result(target, Outcome.SKIPPED, "updating", previous_image)
        await self.emit(target, "image_update_started", started)
        try:
            updated = await self.client.update_machine(
                app, machine_id, config=new_config, current_version=machine.current_version
            )
        except FlyError as exc:
            # Nothing changed (409: someone else updated it; 4xx/5xx: refused) or the outcome is
            # unknown (lost reply): either way the machine must be looked at, not retried blindly.
            result = _result(target, Outcome.FAILED, f"update refused: {exc}", previous_image)
            await self.emit(target, "image_update_failed", result)
            return result

        problem = await self._healthy(app, machine_id, updated.current_version)
        if problem is None:
            result = _result(
                target, Outcome.UPDATED, "healthy", previous_image, updated.current_version
            )
            await self.emit(target, "image_updated", result)
            return result

        logger.warning("instance %s unhealthy on %s: %s", target.instance_id, self.image, problem)
        return await self._roll_back(target, old_config, updated, previous_image, problem)

    async def _roll_back(
        self,
        target: RolloutTarget,
        old_config: dict[str, Any],
        updated: FlyMachine,
        previous_image: str | None,
        problem: str,
    ) -> InstanceResult:
        app, machine_id = target.app_name, target.machine_id
        try:
            current = await self.client.get_machine(app, machine_id)
            restored = await self.client.update_machine(
                app, machine_id, config=old_config, current_version=current.current_version
            )
        except FlyError as exc:
            result = _result(
                target,
                Outcome.FAILED,
                f"unhealthy on the new image ({problem}); rollback refused: {exc}",
                previous_image,
                updated.current_version,
            )
            await self.emit(target, "image_rollback_failed", result)
            return result
        again = await self._healthy(app, machine_id, restored.current_version)
        if again is not None:
            result = _result(
                target,
                Outcome.FAILED,
                f"unhealthy on the new image ({problem}); unhealthy after rollback ({again})",
                previous_image,
                restored.current_version,
            )
            await self.emit(target, "image_rollback_failed", result)
            return result
        result = _result(
            target,
            Outcome.ROLLED_BACK,
            f"unhealthy on the new image ({problem}); previous image restored",
            previous_image,
            restored.current_version,
        )
        await self.emit(target, "image_rolled_back", result)
        return result

    async def _healthy(self, app: str, machine_id: str, version: str) -> str | None:
        """None when started at ``version`` with every check passing, else what went wrong."""
        try:
            await self.client.wait(
                app, machine_id, "started", version=version, timeout_total=self.wait_timeout
            )
            await self.client.wait_healthy(
                app,
                machine_id,
                version=version,
                timeout_total=self.health_timeout,
                poll_interval=self.poll_interval,
            )
        except FlyError as exc:
            return str(exc)
        return None


def _result(
    target: RolloutTarget,
    outcome: Outcome,
    detail: str,
    previous_image: str | None = None,
    version: str | None = None,
) -> InstanceResult:
    return InstanceResult(
        instance_id=target.instance_id,
        app_name=target.app_name,
        machine_id=target.machine_id,
        outcome=outcome,
        detail=detail,
        previous_image=previous_image,
        version=version,
    )


async def run_update_image(
    image: str,
    *,
    targets: Iterable[RolloutTarget],
    token: str,
    org_slug: str,
    base_url: str = DEFAULT_BASE_URL,
    max_failures: int = 1,
    wait_timeout: float = 180.0,
    health_timeout: float = 120.0,
    poll_interval: float = 1.0,
    on_event: EventCallback | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> RolloutReport:
    """Entry point for ``quoroom-cloud ops update-image IMAGE``.

    The CLI loads the running instances (``cloud_instances`` with status ``running`` and their
    ``fly_app`` / ``machine_id``) as ``targets``, passes ``QUOROOM_CP_FLY_API_TOKEN`` and
    ``QUOROOM_CP_FLY_ORG`` from the settings, records each ``on_event`` call as an
    ``instance_events`` row, prints :func:`format_report` and exits non-zero unless
    ``report.ok``. Afterwards it should set ``QUOROOM_CP_RUNTIME_IMAGE`` to ``image`` so new
    instances start on it too.
    """
    check_image_reference(image)
    async with FlyMachinesClient(
        token, org_slug=org_slug, base_url=base_url, transport=transport
    ) as client:
        return await rolling_update(
            client,
            list(targets),
            image,
            max_failures=max_failures,
            wait_timeout=wait_timeout,
            health_timeout=health_timeout,
            poll_interval=poll_interval,
            on_event=on_event,
        )


def format_report(report: RolloutReport) -> str:
    """A plain-text table of the rollout for the CLI."""
    lines = [f"image: {report.image}"]
    for r in report.results:
        lines.append(f"  {r.instance_id:<28} {r.outcome.value:<12} {r.machine_id:<16} {r.detail}")
    counts = ", ".join(
        f"{len(report.by_outcome(o))} {o.value}" for o in Outcome if report.by_outcome(o)
    )
    lines.append(f"total: {counts or 'nothing to do'}")
    if report.stopped_early:
        lines.append("rollout stopped early: too many failures")
    return "\n".join(lines)
