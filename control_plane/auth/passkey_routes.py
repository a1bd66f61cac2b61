"""A signed-in account's passkeys (issue 15, item 2): list, register, rename, remove, and the
step-up with a passkey. Included in ``/api/auth`` (the sign-in routes that take a passkey, which
need the session helpers, are in :mod:`control_plane.auth.routes`). Cookie-authenticated writes
pass the CSRF checks through ``CurrentAuth``.

Registering and removing are step-up actions (item 3: changing credentials): with a factor on
the account, a second factor from the last 10 minutes is needed first (403
``step_up_required``). The first passkey of an account without a factor turns two-step sign-in
on and answers the ten recovery codes, once."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse

from control_plane.auth import passkeys, second_factor
from control_plane.auth.models import UserPasskey
from control_plane.auth.schemas import (
    OkOut,
    PasskeyOut,
    PasskeyRegisteredOut,
    PasskeyRegisterIn,
    PasskeyRenameIn,
    PasskeysOut,
    WebAuthnOptionsOut,
)
from control_plane.deps import AuthDep, CurrentAuth, Now, SessionDep

router = APIRouter(tags=["passkeys"])
NO_STORE = {"Cache-Control": "no-store"}
PasskeyId = Annotated[str, Path(max_length=64)]


def passkey_out(row: UserPasskey) -> PasskeyOut:
    return PasskeyOut(
        id=row.id,
        name=row.name,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        backed_up=row.backed_up,
        counter_regressed_at=row.counter_regressed_at,
    )


def options_response(options: dict[str, object]) -> JSONResponse:
    out = WebAuthnOptionsOut(
        public_key=options, expires_in=int(passkeys.CHALLENGE_TTL.total_seconds())
    )
    return JSONResponse(out.model_dump(mode="json"), headers=NO_STORE)


@router.get("/passkeys", response_model=PasskeysOut, summary="Your passkeys")
async def list_passkeys(db: SessionDep, auth: CurrentAuth) -> PasskeysOut:
    rows = await passkeys.passkeys_of(db, auth.user.id)
    return PasskeysOut(passkeys=[passkey_out(r) for r in rows])


@router.post(
    "/passkeys/options",
    response_model=WebAuthnOptionsOut,
    summary="Start registering a passkey: the options for navigator.credentials.create()",
    dependencies=[second_factor.StepUp],
)
async def registration_options(
    db: SessionDep, ctx: AuthDep, auth: CurrentAuth, now: Now
) -> JSONResponse:
    """The challenge is bound to this session and lives 5 minutes."""
    options = await passkeys.registration_options(db, ctx.settings, auth.user, auth.session_id, now)
    await db.commit()
    return options_response(options)


@router.post(
    "/passkeys",
    status_code=201,
    response_model=PasskeyRegisteredOut,
    summary="Register a passkey with the browser's answer",
    dependencies=[second_factor.StepUp],
)
async def register(
    body: PasskeyRegisterIn, db: SessionDep, ctx: AuthDep, auth: CurrentAuth, now: Now
) -> JSONResponse:
    had_factor = await second_factor.has_second_factor(db, auth.user.id)
    try:
        row = await passkeys.register(
            db,
            ctx.settings,
            auth.user,
            auth.session_id,
            body.credential.as_webauthn(),
            body.name,
            now,
        )
    except passkeys.PasskeyError:
        await db.commit()  # the challenge stays spent
        raise
    codes = None
    if not had_factor:
        codes = await second_factor.replace_recovery_codes(db, auth.user.id, now)
    # Registering proved a passkey in this session, as enrolling TOTP proves a code.
    await second_factor.mark_session_verified(db, auth.session_id, now)
    await db.commit()
    out = PasskeyRegisteredOut(passkey=passkey_out(row), recovery_codes=codes)
    return JSONResponse(out.model_dump(mode="json"), status_code=201, headers=NO_STORE)


@router.patch("/passkeys/{passkey_id}", response_model=PasskeyOut, summary="Rename a passkey")
async def rename(
    passkey_id: PasskeyId, body: PasskeyRenameIn, db: SessionDep, auth: CurrentAuth
) -> PasskeyOut:
    row = await passkeys.owned_passkey(db, auth.user.id, passkey_id)
    row.name = body.name
    await db.commit()
    return passkey_out(row)


@router.delete(
    "/passkeys/{passkey_id}",
    response_model=OkOut,
    summary="Remove a passkey (needs a second factor from the last 10 minutes)",
    dependencies=[second_factor.StepUp],
)
async def remove(passkey_id: PasskeyId, db: SessionDep, auth: CurrentAuth) -> OkOut:
    """Removing the last factor turns two-step sign-in off (the recovery codes go with it)."""
    await passkeys.remove(db, auth.user.id, passkey_id)
    await second_factor.factor_removed(db, auth.user)
    await db.commit()
    return OkOut(message="The passkey was removed.")
