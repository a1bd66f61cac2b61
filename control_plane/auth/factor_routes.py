"""The second factor's routes for a signed-in account (issue 15, items 1 and 3): its state,
TOTP enrolment, new recovery codes, step-up and removal, and the password change (a step-up
action). Included in ``/api/auth`` (the sign-in's second step, which needs the session helpers,
is in :mod:`control_plane.auth.routes`). Cookie-authenticated writes pass the CSRF checks through
``CurrentAuth``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from control_plane.auth import passkeys, second_factor, service
from control_plane.auth.devices import KnownDevice
from control_plane.auth.models import UserSession
from control_plane.auth.passkey_routes import options_response
from control_plane.auth.schemas import (
    ChangePasswordIn,
    OkOut,
    PasskeyAssertionIn,
    ProofIn,
    RecoveryCodesOut,
    SecondFactorStatusOut,
    TotpConfirmIn,
    TotpSetupOut,
)
from control_plane.auth.service import AuthContext
from control_plane.deps import AuthDep, ClientAddress, CurrentAuth, Now, SessionDep
from control_plane.services import services_of

router = APIRouter(tags=["second factor"])
NO_STORE = {"Cache-Control": "no-store"}


def _known_device(request: Request) -> KnownDevice | None:
    services = services_of(request)
    return services.get(AuthContext).devices.from_request(request, services.core.clock())


Device = Annotated[KnownDevice | None, Depends(_known_device)]


async def _status(db: SessionDep, auth: CurrentAuth) -> SecondFactorStatusOut:
    enabled = await second_factor.has_second_factor(db, auth.user.id)
    session = await db.get(UserSession, auth.session_id)
    verified_at = session.second_factor_at if session is not None and enabled else None
    return SecondFactorStatusOut(
        totp_enabled=await second_factor.confirmed_totp(db, auth.user.id) is not None,
        recovery_codes_left=await second_factor.recovery_codes_left(db, auth.user.id),
        verified_at=verified_at,
        step_up_until=verified_at + second_factor.STEP_UP_WINDOW if verified_at else None,
    )


@router.get(
    "/second-factor", response_model=SecondFactorStatusOut, summary="Your second factor's state"
)
async def status(db: SessionDep, auth: CurrentAuth) -> SecondFactorStatusOut:
    return await _status(db, auth)


@router.post(
    "/totp/setup",
    response_model=TotpSetupOut,
    summary="Start TOTP enrolment: a new secret, as a QR code and as text",
    # Adding a factor changes the account's credentials: with a passkey already, it is proved
    # first (an account without a factor passes).
    dependencies=[second_factor.StepUp],
)
async def totp_setup(db: SessionDep, ctx: AuthDep, auth: CurrentAuth, now: Now) -> JSONResponse:
    """Replaces a set-up not yet confirmed. Refused (409) once TOTP is on: the secret is never
    shown again after confirmation."""
    setup = await second_factor.begin_setup(db, ctx, auth.user, now)
    await db.commit()
    out = TotpSetupOut(
        secret=setup.secret, otpauth_uri=setup.uri, qr_svg=setup.svg, qr_data_uri=setup.data_uri
    )
    return JSONResponse(out.model_dump(), headers=NO_STORE)


@router.post(
    "/totp/confirm",
    response_model=RecoveryCodesOut,
    summary="Turn TOTP on with a first code; answers the ten recovery codes, once",
)
async def totp_confirm(
    body: TotpConfirmIn, db: SessionDep, ctx: AuthDep, auth: CurrentAuth, now: Now
) -> JSONResponse:
    codes = await second_factor.confirm_setup(db, ctx, auth.user, auth.session_id, body.code, now)
    await db.commit()
    return JSONResponse(RecoveryCodesOut(recovery_codes=codes).model_dump(), headers=NO_STORE)


@router.post(
    "/second-factor/verify",
    response_model=SecondFactorStatusOut,
    summary="Step-up: prove the second factor for this session (sensitive actions, 10 minutes)",
)
async def verify(
    body: ProofIn,
    db: SessionDep,
    ctx: AuthDep,
    auth: CurrentAuth,
    now: Now,
    address: ClientAddress,
    device: Device,
) -> SecondFactorStatusOut:
    """Throttled as sign-ins are: a wrong or reused code counts as a failed sign-in."""
    proof = second_factor.Proof(code=body.code, recovery_code=body.recovery_code)
    spent_recovery_code = await second_factor.check_proof(
        db, ctx, auth.user, proof, now=now, address=address, device=device
    )
    await second_factor.mark_session_verified(db, auth.session_id, now)
    notice = (
        [await second_factor.recovery_code_notice(db, ctx.settings, auth.user)]
        if spent_recovery_code
        else []
    )
    await db.commit()
    ctx.mailer.enqueue(*notice)
    return await _status(db, auth)


@router.post(
    "/second-factor/verify/passkey/options",
    summary="Step-up with a passkey: the options for navigator.credentials.get()",
)
async def verify_passkey_options(
    db: SessionDep, ctx: AuthDep, auth: CurrentAuth, now: Now
) -> JSONResponse:
    """The account's passkeys are the allow list; the challenge is bound to this session."""
    options = await passkeys.authentication_options(
        db,
        ctx.settings,
        purpose=passkeys.STEP_UP,
        binding=passkeys.bind_session(auth.session_id),
        user=auth.user,
        now=now,
    )
    await db.commit()
    return options_response(options)


@router.post(
    "/second-factor/verify/passkey",
    response_model=SecondFactorStatusOut,
    summary="Step-up: prove a passkey for this session (sensitive actions, 10 minutes)",
)
async def verify_passkey(
    body: PasskeyAssertionIn,
    db: SessionDep,
    ctx: AuthDep,
    auth: CurrentAuth,
    now: Now,
    address: ClientAddress,
    device: Device,
) -> SecondFactorStatusOut:
    """Throttled as sign-ins are: a refused assertion counts as a failed sign-in."""
    try:
        await passkeys.verify_for_user(
            db,
            ctx,
            auth.user,
            body.credential.as_webauthn(),
            purpose=passkeys.STEP_UP,
            binding=passkeys.bind_session(auth.session_id),
            now=now,
            who=passkeys.Caller(address, device),
        )
    except passkeys.PasskeyError:
        await db.commit()  # the spent challenge and a counter regression stay recorded
        raise
    await second_factor.mark_session_verified(db, auth.session_id, now)
    await db.commit()
    return await _status(db, auth)


@router.post(
    "/totp/recovery-codes",
    response_model=RecoveryCodesOut,
    summary="Replace the recovery codes (needs a second factor from the last 10 minutes)",
    dependencies=[second_factor.StepUp],
)
async def recovery_codes(db: SessionDep, auth: CurrentAuth, now: Now) -> JSONResponse:
    codes = await second_factor.new_recovery_codes(db, auth.user, now)
    await db.commit()
    return JSONResponse(RecoveryCodesOut(recovery_codes=codes).model_dump(), headers=NO_STORE)


@router.post(
    "/totp/disable",
    response_model=OkOut,
    summary="Turn TOTP off (with a code or a recovery code given now)",
)
async def totp_disable(
    body: ProofIn,
    db: SessionDep,
    ctx: AuthDep,
    auth: CurrentAuth,
    now: Now,
    address: ClientAddress,
    device: Device,
) -> OkOut:
    """Disabling a factor needs a fresh one: a code in this very request (stricter than the
    10-minute step-up window), checked and throttled as at sign-in."""
    proof = second_factor.Proof(code=body.code, recovery_code=body.recovery_code)
    spent_recovery_code = await second_factor.check_proof(
        db, ctx, auth.user, proof, now=now, address=address, device=device
    )
    await second_factor.disable(db, auth.user)
    notice = (
        [await second_factor.recovery_code_notice(db, ctx.settings, auth.user)]
        if spent_recovery_code
        else []
    )  # counted after the codes may have gone with the factor
    await db.commit()
    ctx.mailer.enqueue(*notice)
    return OkOut(message="Two-step sign-in is off.")


@router.post(
    "/password",
    response_model=OkOut,
    summary="Change your password (a second factor from the last 10 minutes, if you have one)",
    dependencies=[second_factor.StepUp],
)
async def change_password(
    body: ChangePasswordIn,
    db: SessionDep,
    ctx: AuthDep,
    auth: CurrentAuth,
    now: Now,
    address: ClientAddress,
    device: Device,
) -> OkOut:
    """Changing credentials is a step-up action (issue 15, item 3). Every other session is
    signed out; this one stays."""
    mails = await service.change_password(
        db,
        ctx,
        auth.user,
        session_id=auth.session_id,
        current_password=body.current_password,
        password=body.password,
        now=now,
        address=address,
        device=device,
    )
    await db.commit()
    ctx.mailer.enqueue(*mails)
    return OkOut(message="Your password was changed; other devices were signed out.")
