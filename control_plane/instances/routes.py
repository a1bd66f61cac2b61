"""``/api/cloud/instances/*``: instances, members and runtime tokens. Thin routes: parse, one
service call, answer. Authorization is the ``VisibleInstance`` / ``OwnedInstance`` dependency."""

from __future__ import annotations

import hmac
import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.background import BackgroundTask
from starlette.responses import Response

from control_plane.auth.models import User
from control_plane.auth.second_factor import StepUp
from control_plane.deps import CurrentUser, Now, ReadSessionDep, SessionDep
from control_plane.errors import (
    ControlPlaneError,
    InvalidIdempotencyKey,
    InvitesThrottled,
    OwnerRequired,
    RuntimeOriginRefused,
    Throttled,
    error_response,
    response_for,
    status_and_code,
)
from control_plane.instances import access_log, quotas, service, tokens
from control_plane.instances import members as members_
from control_plane.instances.access import (
    MAX_ID_LENGTH,
    OwnedInstance,
    VisibleInstance,
    load_instance,
)
from control_plane.instances.members import InviteLinks
from control_plane.instances.models import CloudInstance, CloudInstanceMember
from control_plane.instances.schemas import (
    IDEMPOTENCY_KEY,
    CheckoutConfirmIn,
    InstanceCreatedOut,
    InstanceCreateIn,
    InstanceOut,
    InstancesOut,
    InvitationOut,
    InvitationsOut,
    InviteAcceptIn,
    MemberIn,
    MemberOut,
    MembersOut,
    RefreshTokenIn,
    RefreshTokenOut,
    RuntimeTokenOut,
    StatusOut,
)
from control_plane.instances.service import InstancesContext
from control_plane.keys.service import KeyRing
from control_plane.mail import Mailer
from control_plane.metrics import metrics_of
from control_plane.schemas import ErrorOut
from control_plane.services import services_of
from control_plane.throttle import Throttle

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 422, 429, 502, 503)
}
router = APIRouter(prefix="/api/cloud", tags=["instances"], responses=_ERRORS)
InstanceId = Annotated[str, Path(max_length=MAX_ID_LENGTH)]


def _context(request: Request) -> InstancesContext:
    return services_of(request).get(InstancesContext)


Ctx = Annotated[InstancesContext, Depends(_context)]


def _invite_links(request: Request) -> InviteLinks:
    return services_of(request).get(InviteLinks)


Links = Annotated[InviteLinks, Depends(_invite_links)]


def _member_out(member: CloudInstanceMember, *, show_email: bool = True) -> MemberOut:
    return MemberOut(
        id=member.id,
        email=member.email if show_email else None,
        status="active" if member.status == "active" else "pending",
        createdAt=member.created_at,
    )


async def _limit_billing(request: Request, ctx: InstancesContext, user_id: str) -> None:
    """The per-user budget of requests that may call Stripe (``billing/limits.py``)."""
    if ctx.billing.enabled:
        await ctx.billing.limit_requests(services_of(request).get(Throttle), user_id)


# -- instances -----------------------------------------------------------------------------------


@router.post(
    "/instances",
    status_code=201,
    summary="Create an instance and start its checkout",
    response_model=InstanceCreatedOut,
)
async def create_instance(
    body: InstanceCreateIn,
    request: Request,
    db: SessionDep,
    user: CurrentUser,
    ctx: Ctx,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> InstanceCreatedOut:
    if idempotency_key is not None and not IDEMPOTENCY_KEY.match(idempotency_key):
        raise InvalidIdempotencyKey()
    user_id = user.id
    await _limit_billing(request, ctx, user_id)

    async def new_checkout() -> None:
        await ctx.billing.limit_checkouts(services_of(request).get(Throttle), user_id)

    instance, checkout_url = await service.create_instance(
        db, ctx, user, body, idempotency_key=idempotency_key, before_new_checkout=new_checkout
    )
    return InstanceCreatedOut(instance=service.to_out(instance, "owner"), checkout_url=checkout_url)


@router.get("/instances", summary="Your instances and those you are a member of")
async def list_instances(db: SessionDep, user: CurrentUser) -> InstancesOut:
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
    request: Request,
    db: SessionDep,
    ctx: Ctx,
    body: CheckoutConfirmIn | None = None,
) -> InstanceOut:
    await _limit_billing(request, ctx, access.user.id)
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
    dependencies=[StepUp],  # a recent second factor, when the account has one (issue 15)
)
async def delete_instance(
    access: OwnedInstance, request: Request, db: SessionDep, ctx: Ctx
) -> InstanceOut:
    await _limit_billing(request, ctx, access.user.id)
    return service.to_out(await service.cancel(db, ctx, access.instance), "owner")


# -- members -------------------------------------------------------------------------------------


@router.get(
    "/instances/{instance_id}/members",
    summary="Members; the owner also sees pending invitations and every address",
)
async def list_members(access: VisibleInstance, db: SessionDep) -> MembersOut:
    if access.role == "owner":
        rows = await members_.list_members(db, access.instance.id)
        return MembersOut(members=[_member_out(m) for m in rows])
    # A member sees who has joined, and no address but their own: the invitees never agreed to
    # share theirs with anyone but the owner (issue 12).
    rows = await members_.list_members(db, access.instance.id, active_only=True)
    return MembersOut(
        members=[_member_out(m, show_email=m.user_id == access.user.id) for m in rows]
    )


async def _throttle_invites(request: Request, access: OwnedInstance) -> None:
    throttle = services_of(request).get(Throttle)
    try:
        await throttle.hit("invite_owner", f"owner:{access.user.id}")
        await throttle.hit("invite_instance", f"instance:{access.instance.id}")
    except Throttled as exc:
        raise InvitesThrottled(exc.retry_after) from exc


@router.post(
    "/instances/{instance_id}/members",
    status_code=202,
    summary="Invite someone by email; they become a member once they accept",
    responses={429: {"model": ErrorOut, "description": "Too many invitations"}},
    dependencies=[StepUp, Depends(_throttle_invites)],
)
async def add_member(
    body: MemberIn,
    access: OwnedInstance,
    db: SessionDep,
    ctx: Ctx,
    links: Links,
    request: Request,
    now: Now,
) -> MemberOut:
    # The same answer (202, the invitation) whatever the address's account state: no account is
    # looked up at all, so neither the answer nor the work can tell (issue 12).
    member, mail_now = await members_.invite(
        db,
        access.instance,
        email=str(body.email),
        owner=access.user,
        settings=ctx.settings,
        now=now,
    )
    out = _member_out(member)
    mail = links.mail(member, access.instance, access.user.email, now) if mail_now else None
    if mail_now:  # a new invitation, or one sent again
        await access_log.record(
            db, access.instance.id, "member_invited", now=now, email=member.email
        )
    await db.commit()
    if mail is not None:
        services_of(request).get(Mailer).enqueue(mail)
    return out


@router.delete(
    "/instances/{instance_id}/members/{member_id}",
    status_code=204,
    summary="Remove a member (the owner, or members removing themselves)",
    dependencies=[StepUp],
)
async def remove_member(
    access: VisibleInstance,
    member_id: Annotated[str, Path(max_length=MAX_ID_LENGTH)],
    db: SessionDep,
    request: Request,
    now: Now,
) -> Response:
    member = await members_.get_member(db, access.instance.id, member_id)
    leaving = member.user_id is not None and member.user_id == access.user.id
    if access.role != "owner" and not leaving:
        raise OwnerRequired()
    await members_.remove_member(db, access.instance.id, member.id, now=now)
    # Where from only when the member acted themselves (the module docstring of access_log).
    await access_log.record(
        db,
        access.instance.id,
        "member_left" if leaving else "member_removed",
        now=now,
        user_id=member.user_id,
        email=member.email,
        info=_client(request) if leaving else access_log.NO_CLIENT,
    )
    await db.commit()
    return Response(status_code=204)


# -- invitations (the invitee's side) ------------------------------------------------------------


def _client(request: Request) -> access_log.ClientInfo:
    return access_log.client_info(request, services_of(request).core.settings)


async def _joined(
    db: AsyncSession, request: Request, instance_id: str, user: User, now: datetime
) -> None:
    await access_log.record(
        db,
        instance_id,
        "member_joined",
        now=now,
        user_id=user.id,
        email=user.email,
        info=_client(request),
    )


def _invitation_out(invitation: members_.Invitation) -> InvitationOut:
    return InvitationOut(
        id=invitation.member.id,
        instanceId=invitation.instance_id,
        instanceName=invitation.instance_name,
        invitedBy=invitation.invited_by,
        createdAt=invitation.member.created_at,
    )


@router.get("/invitations", summary="Your pending invitations (to your verified address)")
async def list_invitations(
    db: SessionDep, user: CurrentUser, links: Links, now: Now
) -> InvitationsOut:
    found = await members_.invitations_for(db, links, user, now=now)
    await db.commit()
    return InvitationsOut(invitations=[_invitation_out(i) for i in found])


@router.post(
    "/invitations/accept",
    summary="Accept the invitation of an emailed link (signed in as its addressee)",
)
async def accept_invitation_link(
    body: InviteAcceptIn,
    db: SessionDep,
    user: CurrentUser,
    links: Links,
    request: Request,
    now: Now,
) -> InstanceOut:
    instance = await members_.accept_by_token(db, links, user, body.token, now=now)
    await _joined(db, request, instance.id, user, now)
    await db.commit()
    return service.to_out(instance, "member")


@router.post("/invitations/{member_id}/accept", summary="Accept one of your invitations")
async def accept_invitation(
    member_id: Annotated[str, Path(max_length=MAX_ID_LENGTH)],
    db: SessionDep,
    user: CurrentUser,
    links: Links,
    request: Request,
    now: Now,
) -> InstanceOut:
    instance = await members_.accept_in_app(db, links, user, member_id, now=now)
    await _joined(db, request, instance.id, user, now)
    await db.commit()
    return service.to_out(instance, "member")


@router.delete(
    "/invitations/{member_id}", status_code=204, summary="Decline one of your invitations"
)
async def decline_invitation(
    member_id: Annotated[str, Path(max_length=MAX_ID_LENGTH)],
    db: SessionDep,
    user: CurrentUser,
    links: Links,
    request: Request,
    now: Now,
) -> Response:
    instance_id = await members_.decline(db, links, user, member_id, now=now)
    await access_log.record(
        db,
        instance_id,
        "invitation_declined",
        now=now,
        user_id=user.id,
        email=user.email,
        info=_client(request),
    )
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
    tokens.ensure_openable(access.instance)
    # RUNTIME_TOKENS_PER_MINUTE per session, grants and refreshes together (quotas.py).
    await quotas.limit_runtime_tokens(services_of(request).get(Throttle), access.session_id)
    issued = tokens.issue(
        services_of(request).get(KeyRing),
        ctx.settings,
        user=access.user,
        instance=access.instance,
        role=access.role,
        session_id=access.session_id,
        now=now,
    )
    await access_log.record(
        db,
        access.instance.id,
        access_log.LAUNCH,
        now=now,
        user_id=access.user.id,
        email=access.user.email,
        info=_client(request),
    )
    await db.commit()
    metrics_of(request).runtime_token("grant")
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
    if not _cross_origin(request):
        return None
    return _origin_for(request, await load_instance(db, instance_id))


def _cross_origin(request: Request) -> bool:
    """An ``Origin`` other than our own dashboard's (same origin: no CORS headers needed)."""
    origin = request.headers.get("origin")
    if origin is None:
        return False
    settings = services_of(request).core.settings
    return not hmac.compare_digest(origin.encode(), settings.public_origin.encode())


def _origin_for(request: Request, instance: CloudInstance | None) -> str | None:
    """The request's ``Origin`` if it is ``instance``'s runtime origin; raises otherwise."""
    origin = request.headers.get("origin")
    if origin is None or not _cross_origin(request):
        return None
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
        if "retry-after" in response.headers:  # a throttled refresh: let the Room UI read it
            response.headers["Access-Control-Expose-Headers"] = "Retry-After"
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
    # One round trip on the way that matters (issue 13): the token is verified first (no I/O),
    # then the instance, the live session and the membership are read together, and the origin
    # is checked against that instance before any other answer is given.
    origin: str | None = None
    ring = services_of(request).get(KeyRing)
    try:
        body = _parse_refresh(await request.body())
        if body is None:
            origin = await _allowed_origin(request, db, instance_id)
            return _cors(
                error_response(422, "invalid_body", "token: a runtime token is required"), origin
            )
        view = await tokens.read_refresh(
            db, ring, instance_id=instance_id, token=body.token, now=now
        )
        origin = _origin_for(request, view.instance)
        grant = tokens.authorize_refresh(view)
        await quotas.limit_runtime_tokens(services_of(request).get(Throttle), grant.session_id)
        issued = tokens.reissue(ring, ctx.settings, grant, now=now)
        # Written after the answer has gone out, in its own transaction: the refresh stays one
        # read on the way that matters (issue 13).
        logged = BackgroundTask(
            access_log.record_later,
            services_of(request).core.session_factory,
            grant.instance.id,
            access_log.REFRESH,
            now=now,
            user_id=grant.user.id,
            email=grant.user.email,
            info=_client(request),
        )
        await db.commit()
    except ControlPlaneError as exc:
        await db.rollback()
        metrics_of(request).refused(status_and_code(exc)[1])
        return _cors(response_for(exc), origin)
    metrics_of(request).runtime_token("refresh")
    answer = JSONResponse(RefreshTokenOut(token=issued.token).model_dump(), background=logged)
    return _cors(answer, origin)


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
