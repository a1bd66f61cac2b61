"""``/api/cloud/instances/*``: instances, members and runtime tokens. Thin routes: parse, one
service call, answer. Authorization is the ``VisibleInstance`` / ``OwnedInstance`` dependency."""

from __future__ import annotations

import hmac
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.responses import Response

from control_plane.auth.schemas import ErrorOut
from control_plane.deps import CurrentUser, Now, ReadSessionDep, SessionDep
from control_plane.errors import (
    ControlPlaneError,
    InvalidIdempotencyKey,
    OwnerRequired,
    RuntimeOriginRefused,
    error_response,
    response_for,
)
from control_plane.instances import members as members_
from control_plane.instances import service, tokens
from control_plane.instances.access import (
    MAX_ID_LENGTH,
    OwnedInstance,
    VisibleInstance,
    load_instance,
)
from control_plane.instances.models import CloudInstanceMember
from control_plane.instances.schemas import (
    IDEMPOTENCY_KEY,
    CheckoutConfirmIn,
    InstanceCreatedOut,
    InstanceCreateIn,
    InstanceOut,
    InstancesOut,
    MemberIn,
    MemberOut,
    MembersOut,
    RefreshTokenIn,
    RefreshTokenOut,
    RuntimeTokenOut,
    StatusOut,
)
from control_plane.instances.service import InstancesContext

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 422, 502, 503)
}
router = APIRouter(prefix="/api/cloud", tags=["instances"], responses=_ERRORS)
InstanceId = Annotated[str, Path(max_length=MAX_ID_LENGTH)]


def _context(request: Request) -> InstancesContext:
    ctx: InstancesContext = request.app.state.instances
    return ctx


Ctx = Annotated[InstancesContext, Depends(_context)]


def _member_out(member: CloudInstanceMember) -> MemberOut:
    return MemberOut(
        id=member.id,
        email=member.email,
        status="active" if member.status == "active" else "pending",
        createdAt=member.created_at,
    )


# -- instances -----------------------------------------------------------------------------------


@router.post(
    "/instances",
    status_code=201,
    summary="Create an instance and start its checkout",
    response_model=InstanceCreatedOut,
)
async def create_instance(
    body: InstanceCreateIn,
    db: SessionDep,
    user: CurrentUser,
    ctx: Ctx,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> InstanceCreatedOut:
    if idempotency_key is not None and not IDEMPOTENCY_KEY.match(idempotency_key):
        raise InvalidIdempotencyKey()
    instance, checkout_url = await service.create_instance(
        db, ctx, user, body, idempotency_key=idempotency_key
    )
    return InstanceCreatedOut(instance=service.to_out(instance, "owner"), checkout_url=checkout_url)


@router.get("/instances", summary="Your instances and those you are a member of")
async def list_instances(db: SessionDep, user: CurrentUser) -> InstancesOut:
    if await members_.claim_invites(db, user):
        await db.commit()
    rows = await service.list_visible(db, user)
    await db.commit()
    return InstancesOut(instances=[service.to_out(i, role) for i, role in rows])


@router.get("/instances/{instance_id}", summary="One instance")
async def get_instance(access: VisibleInstance) -> InstanceOut:
    return service.to_out(access.instance, access.role)


@router.get("/instances/{instance_id}/status", summary="Status, step and event trail")
async def instance_status(access: VisibleInstance, db: SessionDep) -> StatusOut:
    return await service.status_of(db, access.instance)


@router.post(
    "/instances/{instance_id}/checkout/confirm",
    summary="Fulfil a paid checkout now (the success page may load before the webhook)",
)
async def confirm_checkout(
    access: OwnedInstance,
    db: SessionDep,
    ctx: Ctx,
    body: CheckoutConfirmIn | None = None,
) -> InstanceOut:
    instance = await service.confirm_checkout(
        db, ctx, access.instance, session_id=body.session_id if body else None
    )
    return service.to_out(instance, "owner")


@router.post("/instances/{instance_id}/retry", summary="Retry a failed provisioning")
async def retry_instance(access: OwnedInstance, db: SessionDep, ctx: Ctx) -> InstanceOut:
    return service.to_out(await service.retry(db, ctx, access.instance), "owner")


@router.delete(
    "/instances/{instance_id}",
    status_code=202,
    summary="Cancel: end the subscription, stop, snapshot, destroy after the retention period",
)
async def delete_instance(access: OwnedInstance, db: SessionDep, ctx: Ctx) -> InstanceOut:
    return service.to_out(await service.cancel(db, ctx, access.instance), "owner")


# -- members -------------------------------------------------------------------------------------


@router.get("/instances/{instance_id}/members", summary="Members and pending invites")
async def list_members(access: VisibleInstance, db: SessionDep) -> MembersOut:
    rows = await members_.list_members(db, access.instance.id)
    return MembersOut(members=[_member_out(m) for m in rows])


@router.post(
    "/instances/{instance_id}/members",
    status_code=201,
    summary="Add a member by email (an invite until that address has a verified account)",
    responses={200: {"model": MemberOut, "description": "Already a member"}},
)
async def add_member(
    body: MemberIn, access: OwnedInstance, db: SessionDep, ctx: Ctx, now: Now
) -> Response:
    member, created = await members_.add_member(
        db,
        access.instance,
        email=str(body.email),
        invited_by=access.user.id,
        limit=ctx.settings.max_members_per_instance,
        now=now,
    )
    await db.commit()
    out = _member_out(member)
    return JSONResponse(out.model_dump(mode="json"), status_code=201 if created else 200)


@router.delete(
    "/instances/{instance_id}/members/{member_id}",
    status_code=204,
    summary="Remove a member (the owner, or members removing themselves)",
)
async def remove_member(
    access: VisibleInstance,
    member_id: Annotated[str, Path(max_length=MAX_ID_LENGTH)],
    db: SessionDep,
    now: Now,
) -> Response:
    member = await members_.get_member(db, access.instance.id, member_id)
    if access.role != "owner" and member.user_id != access.user.id:
        raise OwnerRequired()
    await members_.remove_member(db, access.instance.id, member.id, now=now)
    await db.commit()
    return Response(status_code=204)


# -- runtime tokens ------------------------------------------------------------------------------


@router.post(
    "/instances/{instance_id}/runtime-token",
    summary="A short-lived token the Room's runtime accepts (owner or active member)",
)
async def runtime_token(
    access: VisibleInstance, request: Request, db: SessionDep, ctx: Ctx, now: Now
) -> RuntimeTokenOut:
    issued = tokens.issue(
        request.app.state.key_ring,
        ctx.settings,
        user=access.user,
        instance=access.instance,
        role=access.role,
        session_id=access.session_id,
        now=now,
    )
    await db.commit()
    return RuntimeTokenOut(
        token=issued.token,
        expires_at=issued.expires_at,
        runtime_url=issued.runtime_url,
        launch_url=issued.launch_url,
    )


_REFRESH_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": RefreshTokenIn.model_json_schema()}},
    }
}


async def _allowed_origin(request: Request, db: SessionDep, instance_id: str) -> str | None:
    """The CORS origin to echo: the instance's runtime origin. Raises for a foreign origin."""
    origin = request.headers.get("origin")
    if origin is None:
        return None
    settings = request.app.state.settings
    if hmac.compare_digest(origin.encode(), settings.public_origin.encode()):
        return None  # our own dashboard: same origin, no CORS headers needed
    instance = await load_instance(db, instance_id)
    allowed = tokens.runtime_origin(instance.url if instance is not None else None)
    if allowed is None or not hmac.compare_digest(origin.encode(), allowed.encode()):
        raise RuntimeOriginRefused()
    return origin


def _cors(response: Response, origin: str | None) -> Response:
    """CORS for the refresh call. The real Room UI calls it with ``credentials: "include"``, so
    the answer (preflight too) must name the exact origin and allow credentials, or the browser
    hides it. Allowing credentials grants nothing here: the route reads no cookie, the token in
    the body is the only proof."""
    response.headers["Vary"] = "Origin"
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
    return response


@router.post(
    "/instances/{instance_id}/refresh-token",
    summary="Exchange a still-valid runtime token for a new one (called from the Room UI)",
    response_model=RefreshTokenOut,
    openapi_extra=_REFRESH_BODY,
)
async def refresh_token(
    instance_id: InstanceId, request: Request, db: ReadSessionDep, ctx: Ctx, now: Now
) -> Response:
    # No cookie: the runtime token in the body is the proof. Cookies a credentialed call brings
    # along are never read (no session, so no CSRF check either: nothing ambient is used).
    # Errors carry the CORS headers too, so the Room UI on the runtime's origin can read why it
    # was refused.
    origin: str | None = None
    try:
        origin = await _allowed_origin(request, db, instance_id)
        body = _parse_refresh(await request.body())
        if body is None:
            return _cors(
                error_response(422, "invalid_body", "token: a runtime token is required"), origin
            )
        issued = await tokens.refresh(
            db,
            request.app.state.key_ring,
            ctx.settings,
            instance_id=instance_id,
            token=body.token,
            now=now,
        )
        await db.commit()
    except ControlPlaneError as exc:
        await db.rollback()
        return _cors(response_for(exc), origin)
    return _cors(JSONResponse(RefreshTokenOut(token=issued.token).model_dump()), origin)


def _parse_refresh(raw: bytes) -> RefreshTokenIn | None:
    try:
        return RefreshTokenIn.model_validate(json.loads(raw))
    except (ValueError, RecursionError, ValidationError):
        return None


@router.options("/instances/{instance_id}/refresh-token", include_in_schema=False)
async def refresh_token_preflight(
    instance_id: InstanceId, request: Request, db: ReadSessionDep
) -> Response:
    """CORS preflight for the refresh call, answered for the instance's runtime origin only."""
    try:
        origin = await _allowed_origin(request, db, instance_id)
    except RuntimeOriginRefused as exc:
        return _cors(response_for(exc), None)
    finally:
        await db.rollback()
    method = request.headers.get("access-control-request-method", "")
    if origin is None or method.upper() != "POST":
        return _cors(response_for(RuntimeOriginRefused("preflight refused")), None)
    return _cors(
        Response(
            status_code=204,
            headers={
                "Access-Control-Allow-Methods": "POST",
                "Access-Control-Allow-Headers": "Content-Type, Authorization",
                "Access-Control-Max-Age": "600",
            },
        ),
        origin,
    )
