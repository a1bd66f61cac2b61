"""The access log per Room (issue 15, item 4): read it (JSON, paginated), export it (CSV), and
the runtime's refusal reports coming in. Thin routes over ``access_log.py``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from control_plane.deps import Now, SessionDep, SettingsDep
from control_plane.errors import InstanceNotFound, ReportTooLarge
from control_plane.instances import access_log
from control_plane.instances.access import VisibleInstance, load_instance
from control_plane.instances.models import AccessLogEntry
from control_plane.instances.routes import InstanceId
from control_plane.instances.schemas import AccessLogEntryOut, AccessLogOut, ReportAcceptedOut
from control_plane.schemas import ErrorOut

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 422)
}
router = APIRouter(prefix="/api/cloud", tags=["access log"], responses=_ERRORS)
Category = Literal["access", "members", "refused"]


def _out(row: AccessLogEntry) -> AccessLogEntryOut:
    return AccessLogEntryOut(
        id=row.id,
        at=row.at,
        kind=row.kind,
        who=row.email,
        network=row.network,
        region=row.region,
        user_agent=row.user_agent,
        reason=row.reason,
        address=row.address,
        count=row.count,
    )


@router.get(
    "/instances/{instance_id}/access-log",
    summary="The Room's access log, newest first (a member sees their own entries only)",
)
async def read_access_log(
    access: VisibleInstance,
    db: SessionDep,
    settings: SettingsDep,
    category: Category | None = None,
    before: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=access_log.MAX_PAGE_SIZE)] = access_log.PAGE_SIZE,
) -> AccessLogOut:
    rows, cursor = await access_log.page(
        db,
        access.instance.id,
        user_id=None if access.role == "owner" else access.user.id,
        category=category,
        before=before,
        limit=limit,
    )
    return AccessLogOut(
        entries=[_out(r) for r in rows],
        next=cursor,
        retention_days=settings.access_log_retention_days,
    )


@router.get(
    "/instances/{instance_id}/access-log.csv",
    summary="The access log as CSV (the newest 10,000 entries the caller may see)",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}},
)
async def export_access_log(
    access: VisibleInstance, db: SessionDep, category: Category | None = None
) -> Response:
    rows, truncated = await access_log.export_rows(
        db,
        access.instance.id,
        user_id=None if access.role == "owner" else access.user.id,
        category=category,
    )
    headers = {
        "Content-Disposition": f'attachment; filename="access-log-{access.instance.id}.csv"',
        "Cache-Control": "no-store",
    }
    if truncated:
        headers["X-Access-Log-Truncated"] = "true"
    return Response(access_log.to_csv(rows), media_type="text/csv; charset=utf-8", headers=headers)


async def _bounded_body(request: Request) -> bytes:
    """The body, refused with 413 ``report_too_large`` past :data:`MAX_REPORT_BYTES` (counted
    as it streams, not only from ``Content-Length``)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > access_log.MAX_REPORT_BYTES:
        raise ReportTooLarge()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > access_log.MAX_REPORT_BYTES:
            raise ReportTooLarge()
    return bytes(body)


@router.post(
    "/instances/{instance_id}/access-reports",
    status_code=202,
    summary="A runtime reports the refusals it counted (its instance's report key as Bearer)",
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}}
    },
)
async def receive_report(
    instance_id: InstanceId, request: Request, db: SessionDep, settings: SettingsDep, now: Now
) -> ReportAcceptedOut:
    # The credential first (an HMAC, no I/O): a caller without it learns nothing, not even
    # whether the instance exists. No cookie is read; no CSRF check applies.
    scheme, _, presented = (request.headers.get("authorization") or "").partition(" ")
    access_log.check_report_key(
        settings, instance_id, presented.strip() if scheme.lower() == "bearer" else None
    )
    report = access_log.parse_report(await _bounded_body(request), instance_id=instance_id, now=now)
    if await load_instance(db, instance_id) is None:
        raise InstanceNotFound()
    accepted = await access_log.ingest(db, instance_id, report, now=now)
    await db.commit()
    return ReportAcceptedOut(accepted=accepted)
