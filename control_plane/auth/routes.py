"""``/api/auth/*``: thin routes. Parse → throttle → one service call → commit → mail → cookies."""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import partial
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.responses import Response

from control_plane.auth import lockout, passkeys, second_factor, service, session_labels
from control_plane.auth import sessions as sessions_
from control_plane.auth.cookies import cookie_names
from control_plane.auth.devices import KnownDevice
from control_plane.auth.factor_routes import router as factor_router
from control_plane.auth.google import STATE_COOKIE_PATH, STATE_MAX_AGE, GoogleClient
from control_plane.auth.models import SecondFactorChallenge, User
from control_plane.auth.passkey_routes import options_response
from control_plane.auth.passkey_routes import router as passkey_router
from control_plane.auth.schemas import (
    EmailIn,
    LoginIn,
    LogoutIn,
    OkOut,
    PasskeyAssertionIn,
    PendingIn,
    RefreshIn,
    ResetPasswordIn,
    RevokedOut,
    SecondFactorIn,
    SecondFactorRequiredOut,
    SessionOut,
    SessionsOut,
    SignupIn,
    TokenIn,
    TokensOut,
    Transport,
    UserOut,
)
from control_plane.auth.service import AuthContext, SignedIn
from control_plane.deps import (
    AuthDep,
    ClientAddress,
    CurrentAuth,
    CurrentUser,
    Now,
    SessionDep,
    authenticate_request,
)
from control_plane.errors import (
    ControlPlaneError,
    InvalidRefreshToken,
    NotAuthenticated,
    OAuthNotConfigured,
    OAuthProviderError,
    OAuthStateMismatch,
    RefreshTokenReused,
    SessionNotFound,
    status_and_code,
)
from control_plane.metrics import metrics_of
from control_plane.schemas import ErrorOut
from control_plane.services import services_of

REFRESH_COOKIE_PATH = "/api/auth"
ACCEPTED = "If the address can receive mail, a message is on its way."


def _origin_guard(request: Request) -> None:
    """Every unsafe account request from a browser must come from our own origin (login CSRF)."""
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        services_of(request).get(AuthContext).csrf.check_origin(request)


_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 422, 429, 502, 503)
}
router = APIRouter(
    prefix="/api/auth", tags=["auth"], dependencies=[Depends(_origin_guard)], responses=_ERRORS
)


# -- helpers ------------------------------------------------------------------------------------


async def _user_out(db: SessionDep, user: User) -> UserOut:
    return UserOut(
        id=user.id,
        email=user.email,
        email_verified=user.email_verified,
        name=user.name,
        created_at=user.created_at,
        has_password=user.password_hash is not None,
        identities=await service.identities_of(db, user.id),
    )


def _set_session_cookies(response: Response, ctx: AuthContext, signed: SignedIn) -> str:
    settings = ctx.settings
    secure = settings.secure_cookies
    names = cookie_names(settings)  # __Host-/__Secure- prefixed with Secure cookies
    remaining = int((signed.session.expires_at - signed.session.last_used_at).total_seconds())
    csrf_token = ctx.csrf.issue(signed.session.id)
    response.set_cookie(
        names.access,
        signed.access_token,
        max_age=settings.access_token_ttl_seconds,
        path="/",
        secure=secure,
        httponly=True,
        samesite="lax",
    )
    response.set_cookie(
        names.refresh,
        signed.refresh_token,
        max_age=max(remaining, 0),
        path=REFRESH_COOKIE_PATH,
        secure=secure,
        httponly=True,
        samesite="lax",
    )
    # Readable by the page's JavaScript on purpose: it echoes it in X-CSRF-Token.
    response.set_cookie(
        names.csrf,
        csrf_token,
        max_age=max(remaining, 0),
        path="/",
        secure=secure,
        httponly=False,
        samesite="lax",
    )
    return csrf_token


def _clear_session_cookies(response: Response, ctx: AuthContext) -> None:
    secure = ctx.settings.secure_cookies
    names = cookie_names(ctx.settings)
    for name, path in (
        (names.access, "/"),
        (names.refresh, REFRESH_COOKIE_PATH),
        (names.csrf, "/"),
    ):
        response.delete_cookie(name, path=path, secure=secure, httponly=name != names.csrf)


async def _signed_in_response(
    db: SessionDep, ctx: AuthContext, signed: SignedIn, transport: Transport, status: int = 200
) -> JSONResponse:
    body = TokensOut(
        user=await _user_out(db, signed.user),
        session_id=signed.session.id,
        expires_in=ctx.settings.access_token_ttl_seconds,
    )
    response = JSONResponse({}, status_code=status, headers={"Cache-Control": "no-store"})
    if transport == "body":
        body.access_token = signed.access_token
        body.refresh_token = signed.refresh_token
    else:
        body.csrf_token = _set_session_cookies(response, ctx, signed)
    response.body = response.render(body.model_dump(mode="json"))
    response.headers["content-length"] = str(len(response.body))
    return response


def _second_factor_required(
    ctx: AuthContext, raw: str, transport: Transport, methods: list[str]
) -> JSONResponse:
    """The first step's answer for an account with a second factor: no session yet."""
    body = SecondFactorRequiredOut(
        methods=methods,
        expires_in=int(second_factor.PENDING_TTL.total_seconds()),
        second_factor_token=raw if transport == "body" else None,
    )
    response = JSONResponse(
        body.model_dump(mode="json", exclude_none=True), headers={"Cache-Control": "no-store"}
    )
    if transport == "cookie":
        second_factor.set_pending_cookie(response, ctx.settings, raw)
    return response


def _accepted() -> JSONResponse:
    return JSONResponse(OkOut(message=ACCEPTED).model_dump(), status_code=202)


def _session_factory(request: Request) -> async_sessionmaker[AsyncSession]:
    return services_of(request).core.session_factory


def _known_device(request: Request) -> KnownDevice | None:
    """The browser's known-device cookie, verified; ``None`` when missing or not valid."""
    services = services_of(request)
    return services.get(AuthContext).devices.from_request(request, services.core.clock())


#: Opens a session for work done after the answer (``SessionDep``'s closes with the request).
SessionFactory = Annotated[async_sessionmaker[AsyncSession], Depends(_session_factory)]
Device = Annotated[KnownDevice | None, Depends(_known_device)]


async def _mail_budget(ctx: AuthContext, email: str, address: str, device: Device) -> None:
    who = lockout.requester(ctx.devices, service.normalize_email(email), address, device)
    await lockout.before_mail(ctx.throttle, who)


# -- sign-up and verification -------------------------------------------------------------------


@router.post("/signup", status_code=202, response_model=OkOut, summary="Create an account")
async def signup(
    body: SignupIn, factory: SessionFactory, ctx: AuthDep, now: Now, address: ClientAddress
) -> JSONResponse:
    """Answers 202 whether or not the address already has an account, after the same work
    (no enumeration, by answer or by timing); the account is written in the background and is
    usable after the emailed link is followed."""
    await ctx.throttle.hit("signup_address", address)
    await ctx.throttle.hit("signup_account", service.normalize_email(body.email))
    password_hash = await service.new_password_hash(ctx, email=body.email, password=body.password)
    job = partial(
        service.signup,
        ctx=ctx,
        email=body.email,
        password_hash=password_hash,
        name=body.name,
        now=now,
    )
    service.in_background(ctx, factory, job, what="sign-up")
    return _accepted()


@router.post("/verify-email", response_model=OkOut, summary="Confirm an email address")
async def verify_email(body: TokenIn, db: SessionDep, now: Now) -> OkOut:
    await service.verify_email(db, token=body.token, now=now)
    await db.commit()
    return OkOut(message="Your email address is confirmed.")


@router.post(
    "/resend-verification", status_code=202, response_model=OkOut, summary="Send the link again"
)
async def resend_verification(
    body: EmailIn,
    factory: SessionFactory,
    ctx: AuthDep,
    now: Now,
    address: ClientAddress,
    device: Device,
) -> JSONResponse:
    """Same answer, same work for every address; the link is made and sent in the background."""
    await _mail_budget(ctx, body.email, address, device)
    job = partial(service.resend_verification, ctx=ctx, email=body.email, now=now)
    service.in_background(ctx, factory, job, what="resend-verification")
    return _accepted()


# -- password sign-in, refresh, sign-out --------------------------------------------------------


@router.post(
    "/login",
    response_model=TokensOut | SecondFactorRequiredOut,
    summary="Sign in with email and password",
)
async def login(
    body: LoginIn,
    request: Request,
    db: SessionDep,
    ctx: AuthDep,
    now: Now,
    address: ClientAddress,
    device: Device,
) -> JSONResponse:
    """Throttled per account and address (or known device); see ``docs/control-plane-accounts.md``.
    A successful sign-in makes the browser a known device for the account. For an account with a
    second factor the answer is ``second_factor_required`` (no session yet): the sign-in goes on
    at ``POST /api/auth/second-factor``."""
    user = await service.authenticate(
        db, ctx, email=body.email, password=body.password, now=now, address=address, device=device
    )
    if await second_factor.has_second_factor(db, user.id):
        raw = await second_factor.open_challenge(
            db, user, method="password", transport=body.transport, now=now
        )
        methods = await second_factor.methods_of(db, user.id)
        await db.commit()
        return _second_factor_required(ctx, raw, body.transport, methods)
    signed = await service.start_session(
        db,
        ctx,
        user,
        method="password",
        now=now,
        user_agent=request.headers.get("user-agent"),
        ip_address=address,
    )
    await db.commit()
    response = await _signed_in_response(db, ctx, signed, body.transport)
    ctx.devices.remember(response, device, user.email, now)
    metrics_of(request).auth_event("login_ok")
    return response


@router.post(
    "/second-factor",
    response_model=TokensOut,
    summary="Finish a sign-in with a TOTP code or a recovery code",
)
async def second_factor_sign_in(
    body: SecondFactorIn,
    request: Request,
    db: SessionDep,
    ctx: AuthDep,
    now: Now,
    address: ClientAddress,
    device: Device,
) -> JSONResponse:
    """The pending sign-in comes from the HttpOnly cookie the first step set (or the body's
    ``second_factor_token``); the session, its refresh token and the known-device cookie are made
    only now. Wrong and reused codes count as failed sign-ins; a pending sign-in allows
    ``MAX_ATTEMPTS`` codes and lives ``PENDING_TTL``."""
    raw = body.second_factor_token or second_factor.pending_token_of(request, ctx.settings)
    challenge, user = await second_factor.find_challenge(db, raw, now)
    proof = second_factor.Proof(code=body.code, recovery_code=body.recovery_code)
    try:
        spent_recovery_code = await second_factor.check_proof(
            db, ctx, user, proof, now=now, address=address, device=device
        )
    except (second_factor.InvalidSecondFactor, second_factor.SecondFactorReused):
        await second_factor.count_attempt(db, challenge)
        await db.commit()
        raise
    notice = (
        await second_factor.recovery_code_notice(db, ctx.settings, user)
        if spent_recovery_code
        else None
    )
    response = await _finish_two_steps(request, db, ctx, challenge, user, now, address, device)
    if notice is not None:
        ctx.mailer.enqueue(notice)  # after _finish_two_steps committed the spent code
    return response


async def _finish_two_steps(
    request: Request,
    db: AsyncSession,
    ctx: AuthContext,
    challenge: SecondFactorChallenge,
    user: User,
    now: datetime,
    address: str,
    device: KnownDevice | None,
) -> JSONResponse:
    """Both factors proved: spend the pending sign-in and open the session (which counts as
    having proved the second factor just now, for step-up)."""
    await second_factor.close_challenge(db, challenge, now)
    signed = await service.start_session(
        db,
        ctx,
        user,
        method=challenge.method,
        now=now,
        user_agent=request.headers.get("user-agent"),
        ip_address=address,
    )
    signed.session.second_factor_at = now
    await db.commit()
    transport: Transport = "body" if challenge.transport == "body" else "cookie"
    response = await _signed_in_response(db, ctx, signed, transport)
    ctx.devices.remember(response, device, user.email, now)
    second_factor.clear_pending_cookie(response, ctx.settings)
    metrics_of(request).auth_event("login_ok")
    return response


@router.post(
    "/second-factor/passkey/options",
    summary="The second step with a passkey: the options for navigator.credentials.get()",
)
async def second_factor_passkey_options(
    request: Request,
    db: SessionDep,
    ctx: AuthDep,
    now: Now,
    address: ClientAddress,
    body: PendingIn | None = None,
) -> JSONResponse:
    """The account's passkeys are the allow list; the challenge is bound to the pending
    sign-in (its HttpOnly cookie, or ``second_factor_token``), so no other browser can use it.
    Each request spends the address's ``THROTTLE_LOGIN_ADDRESS`` budget (every one writes a
    challenge)."""
    await ctx.throttle.hit("login_address", address)
    raw = (body.second_factor_token if body else None) or second_factor.pending_token_of(
        request, ctx.settings
    )
    challenge, user = await second_factor.find_challenge(db, raw, now)
    options = await passkeys.authentication_options(
        db,
        ctx.settings,
        purpose=passkeys.SECOND_FACTOR,
        binding=passkeys.bind_pending(challenge.id),
        user=user,
        now=now,
    )
    await db.commit()
    return options_response(options)


@router.post(
    "/second-factor/passkey",
    response_model=TokensOut,
    summary="Finish a sign-in with a passkey",
)
async def second_factor_passkey(
    body: PasskeyAssertionIn,
    request: Request,
    db: SessionDep,
    ctx: AuthDep,
    now: Now,
    address: ClientAddress,
    device: Device,
) -> JSONResponse:
    """As ``POST /api/auth/second-factor`` with an assertion instead of a code: throttled the
    same way, and a refused assertion is one of the pending sign-in's attempts."""
    raw = body.second_factor_token or second_factor.pending_token_of(request, ctx.settings)
    challenge, user = await second_factor.find_challenge(db, raw, now)
    try:
        await passkeys.verify_for_user(
            db,
            ctx,
            user,
            body.credential.as_webauthn(),
            purpose=passkeys.SECOND_FACTOR,
            binding=passkeys.bind_pending(challenge.id),
            now=now,
            who=passkeys.Caller(address, device),
        )
    except passkeys.PasskeyError:
        await second_factor.count_attempt(db, challenge)
        await db.commit()
        raise
    return await _finish_two_steps(request, db, ctx, challenge, user, now, address, device)


# -- passwordless sign-in with a passkey --------------------------------------------------------


@router.post(
    "/passkey/options",
    summary="Passwordless sign-in: the options for navigator.credentials.get()",
)
async def passkey_sign_in_options(
    ctx: AuthDep, db: SessionDep, now: Now, address: ClientAddress
) -> JSONResponse:
    """No allow list (the browser offers the discoverable passkeys it holds for this site) and
    user verification required. The challenge is bound to this browser by an HttpOnly,
    SameSite=Strict cookie (``qr_passkey``, 5 minutes). Anyone may ask, so each request spends
    the address's ``THROTTLE_LOGIN_ADDRESS`` budget (every one writes a challenge)."""
    await ctx.throttle.hit("login_address", address)
    token = passkeys.new_browser_token()
    options = await passkeys.authentication_options(
        db,
        ctx.settings,
        purpose=passkeys.SIGN_IN,
        binding=passkeys.bind_browser(token),
        user=None,
        now=now,
    )
    await db.commit()
    response = options_response(options)
    passkeys.set_browser_cookie(response, ctx.settings, token)
    return response


@router.post("/passkey/sign-in", response_model=TokensOut, summary="Sign in with a passkey")
async def passkey_sign_in(
    body: PasskeyAssertionIn,
    request: Request,
    db: SessionDep,
    ctx: AuthDep,
    now: Now,
    address: ClientAddress,
    device: Device,
) -> JSONResponse:
    """A passkey with user verification is both factors: the session opens at once (method
    ``passkey``) and counts as a fresh second factor for step-up. Throttled as sign-ins."""
    token = passkeys.browser_token_of(request, ctx.settings) or ""
    try:
        _, user = await passkeys.verify_passwordless(
            db,
            ctx,
            body.credential.as_webauthn(),
            binding=passkeys.bind_browser(token),
            now=now,
            who=passkeys.Caller(address, device),
        )
    except passkeys.PasskeyError:
        await db.commit()  # the spent challenge and a counter regression stay recorded
        raise
    signed = await service.start_session(
        db,
        ctx,
        user,
        method="passkey",
        now=now,
        user_agent=request.headers.get("user-agent"),
        ip_address=address,
    )
    signed.session.second_factor_at = now
    await db.commit()
    response = await _signed_in_response(db, ctx, signed, "cookie")
    ctx.devices.remember(response, device, user.email, now)
    passkeys.clear_browser_cookie(response, ctx.settings)
    metrics_of(request).auth_event("login_ok")
    return response


@router.post("/refresh", response_model=TokensOut, summary="Exchange a refresh token")
async def refresh(
    request: Request, db: SessionDep, ctx: AuthDep, now: Now, body: RefreshIn | None = None
) -> JSONResponse:
    """Rotates the refresh token. With ``refresh_token`` in the body the answer carries the new
    tokens; otherwise the ``qr_refresh`` cookie is used (CSRF-checked) and cookies are renewed."""
    raw = body.refresh_token if body is not None else None
    transport: Transport = "body"
    if raw is None:
        raw = request.cookies.get(cookie_names(ctx.settings).refresh)
        transport = "cookie"
        if not raw:
            raise NotAuthenticated()
        found = await sessions_.find_refresh(db, raw)
        if found is None:
            raise InvalidRefreshToken()
        ctx.csrf.check(request, found[1].id)
    grace = timedelta(seconds=ctx.settings.refresh_reuse_grace_seconds)
    try:
        rotation = await sessions_.rotate(db, raw, now=now, grace=grace)
    except sessions_.RefreshReuse as reuse:
        await db.rollback()
        await sessions_.revoke_session(db, reuse.session_id, reason="refresh_reuse", now=now)
        await db.commit()
        raise RefreshTokenReused() from None
    await db.commit()
    signed = SignedIn(
        rotation.user,
        rotation.session,
        rotation.refresh_token,
        service.issue_access_token(ctx, rotation.user, rotation.session.id),
    )
    return await _signed_in_response(db, ctx, signed, transport)


@router.post("/logout", response_model=OkOut, summary="Sign out this session")
async def logout(
    request: Request, db: SessionDep, ctx: AuthDep, now: Now, body: LogoutIn | None = None
) -> JSONResponse:
    """Revokes only the calling session (supabase/auth-js#75), found from the refresh token in the
    body, the access token (bearer or cookie), or the refresh cookie."""
    session_id: str | None = None
    if body is not None and body.refresh_token:
        found = await sessions_.find_refresh(db, body.refresh_token)
        if found is None:
            raise InvalidRefreshToken()
        session_id = found[1].id
    else:
        auth = None
        names = cookie_names(ctx.settings)
        if request.headers.get("authorization") or request.cookies.get(names.access):
            auth = await authenticate_request(request, db, ctx, now)
        if auth is not None:
            session_id = auth.session_id
        elif raw := request.cookies.get(names.refresh):
            found = await sessions_.find_refresh(db, raw)
            if found is None:
                raise InvalidRefreshToken()
            ctx.csrf.check(request, found[1].id)
            session_id = found[1].id
    if session_id is None:
        raise NotAuthenticated()
    await sessions_.revoke_session(db, session_id, reason="logout", now=now)
    await db.commit()
    response = JSONResponse(OkOut(message="Signed out.").model_dump())
    _clear_session_cookies(response, ctx)
    return response


# -- password reset -----------------------------------------------------------------------------


@router.post("/forgot-password", status_code=202, response_model=OkOut, summary="Mail a reset link")
async def forgot_password(
    body: EmailIn,
    factory: SessionFactory,
    ctx: AuthDep,
    now: Now,
    address: ClientAddress,
    device: Device,
) -> JSONResponse:
    """Same answer, same work before answering for known and unknown addresses: the link is
    made and mailed in the background. Budgets per account and address (or known device), so
    nobody else can spend the owner's."""
    await _mail_budget(ctx, body.email, address, device)
    job = partial(service.forgot_password, ctx=ctx, email=body.email, now=now)
    service.in_background(ctx, factory, job, what="forgot-password")
    return _accepted()


@router.post("/reset-password", response_model=OkOut, summary="Set a new password")
async def reset_password(
    body: ResetPasswordIn, db: SessionDep, ctx: AuthDep, now: Now, device: Device
) -> JSONResponse:
    """Sets the password, signs every session out and mails a notice. Following the emailed
    link proves control of the mailbox, so the browser becomes a known device for the account
    (the owner's way past a lock-out of unknown devices)."""
    user, mails = await service.reset_password(
        db, ctx, token=body.token, password=body.password, now=now
    )
    await db.commit()
    ctx.mailer.enqueue(*mails)
    response = JSONResponse(OkOut(message="Your password was changed; sign in again.").model_dump())
    _clear_session_cookies(response, ctx)
    ctx.devices.remember(response, device, user.email, now)
    return response


# -- the account and its sessions ---------------------------------------------------------------


@router.get("/me", response_model=UserOut, summary="The signed-in account")
async def me(user: CurrentUser, db: SessionDep) -> UserOut:
    return await _user_out(db, user)


@router.get("/sessions", response_model=SessionsOut, summary="Signed-in sessions")
async def list_sessions(auth: CurrentAuth, db: SessionDep, now: Now) -> SessionsOut:
    rows = await sessions_.live_sessions(db, auth.user.id, now)
    return SessionsOut(
        sessions=[
            SessionOut(
                id=s.id,
                created_at=s.created_at,
                last_used_at=s.last_used_at,
                expires_at=s.expires_at,
                method=s.method,
                user_agent=s.user_agent,
                ip_address=s.ip_address,
                device=session_labels.device_label(s.user_agent),
                network=session_labels.network_label(s.ip_address),
                current=s.id == auth.session_id,
            )
            for s in rows
        ]
    )


@router.delete("/sessions/{session_id}", response_model=OkOut, summary="Revoke one session")
async def revoke_session(
    session_id: Annotated[str, Path(max_length=64)],
    auth: CurrentAuth,
    db: SessionDep,
    ctx: AuthDep,
    now: Now,
) -> JSONResponse:
    if not await sessions_.revoke_session(
        db, session_id, reason="revoked", now=now, user_id=auth.user.id
    ):
        raise SessionNotFound()
    await db.commit()
    response = JSONResponse(OkOut(message="Session revoked.").model_dump())
    if session_id == auth.session_id:
        _clear_session_cookies(response, ctx)
    return response


@router.post("/sessions/revoke-all", response_model=RevokedOut, summary="Sign out everywhere")
async def revoke_all(auth: CurrentAuth, db: SessionDep, ctx: AuthDep, now: Now) -> JSONResponse:
    count = await sessions_.revoke_all_sessions(db, auth.user.id, reason="revoke_all", now=now)
    await db.commit()
    response = JSONResponse(RevokedOut(revoked=count).model_dump())
    _clear_session_cookies(response, ctx)
    return response


# -- Google -------------------------------------------------------------------------------------


def _google(request: Request) -> GoogleClient:
    client = services_of(request).find(GoogleClient)
    if client is None:
        raise OAuthNotConfigured()
    return client


GoogleDep = Annotated[GoogleClient, Depends(_google)]


@router.get(
    "/google",
    status_code=302,
    response_class=RedirectResponse,
    summary="Start Google sign-in",
    responses={302: {"description": "Redirect to Google"}},
)
async def google_start(
    google: GoogleDep,
    ctx: AuthDep,
    next_path: Annotated[str | None, Query(alias="next", max_length=512)] = None,
) -> RedirectResponse:
    pending, cookie = ctx.google_state.new(next_path or "/")
    response = RedirectResponse(await google.authorization_url(pending), status_code=302)
    response.set_cookie(
        cookie_names(ctx.settings).google_state,
        cookie,
        max_age=STATE_MAX_AGE,
        path=STATE_COOKIE_PATH,
        secure=ctx.settings.secure_cookies,
        httponly=True,
        # Lax: the callback is a top-level GET navigation from the provider.
        samesite="lax",
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get(
    "/google/callback",
    status_code=303,
    response_class=RedirectResponse,
    summary="Google sign-in callback",
    responses={303: {"description": "Signed in; redirect into the app"}},
)
async def google_callback(
    request: Request,
    google: GoogleDep,
    db: SessionDep,
    ctx: AuthDep,
    now: Now,
    address: ClientAddress,
    code: Annotated[str | None, Query(max_length=2048)] = None,
    state: Annotated[str | None, Query(max_length=256)] = None,
    error: Annotated[str | None, Query(max_length=256)] = None,
) -> RedirectResponse:
    try:
        return await _google_sign_in(request, google, db, ctx, now, address, code, state, error)
    except ControlPlaneError as exc:
        if "text/html" not in request.headers.get("accept", ""):
            raise  # an API client: the JSON error
        # A person's browser landed here from Google: back to the sign-in page, which says what
        # went wrong (the code only; the page maps known codes to text, never echoing input).
        await db.rollback()
        _, code_ = status_and_code(exc)
        response = RedirectResponse(
            f"{ctx.settings.public_url}/signin?error={code_}", status_code=303
        )
        response.delete_cookie(
            cookie_names(ctx.settings).google_state,
            path=STATE_COOKIE_PATH,
            secure=ctx.settings.secure_cookies,
            httponly=True,
        )
        return response


async def _google_sign_in(
    request: Request,
    google: GoogleClient,
    db: AsyncSession,
    ctx: AuthContext,
    now: datetime,
    address: str,
    code: str | None,
    state: str | None,
    error: str | None,
) -> RedirectResponse:
    cookie = request.cookies.get(cookie_names(ctx.settings).google_state)
    pending = ctx.google_state.open(cookie, state)
    if error is not None:
        raise OAuthProviderError()
    if not code:
        raise OAuthStateMismatch("the sign-in response has no authorization code")
    identity = await google.exchange(code, pending)
    user = await service.user_for_google(
        db,
        subject=identity.subject,
        email=identity.email,
        email_verified=identity.email_verified,
        name=identity.name,
        now=now,
    )
    if await second_factor.has_second_factor(db, user.id):
        # No session yet: the second factor first, on the page that asks for it.
        raw = await second_factor.open_challenge(
            db, user, method="google", transport="cookie", now=now
        )
        await db.commit()
        target = f"/signin/second-factor?next={quote(pending.next_path, safe='/')}"
        response = RedirectResponse(f"{ctx.settings.public_url}{target}", status_code=303)
        second_factor.set_pending_cookie(response, ctx.settings, raw)
        _delete_google_state(response, ctx)
        response.headers["Cache-Control"] = "no-store"
        return response
    signed = await service.start_session(
        db,
        ctx,
        user,
        method="google",
        now=now,
        user_agent=request.headers.get("user-agent"),
        ip_address=address,
    )
    await db.commit()
    metrics_of(request).auth_event("login_ok")
    response = RedirectResponse(f"{ctx.settings.public_url}{pending.next_path}", status_code=303)
    _set_session_cookies(response, ctx, signed)
    ctx.devices.remember(response, ctx.devices.from_request(request, now), user.email, now)
    _delete_google_state(response, ctx)
    response.headers["Cache-Control"] = "no-store"
    return response


def _delete_google_state(response: Response, ctx: AuthContext) -> None:
    response.delete_cookie(
        cookie_names(ctx.settings).google_state,
        path=STATE_COOKIE_PATH,
        secure=ctx.settings.secure_cookies,
        httponly=True,
    )


# The second factor's own routes (enrolment, step-up, removal) and the account's passkeys, under
# the same prefix and guard.
router.include_router(factor_router)
router.include_router(passkey_router)
