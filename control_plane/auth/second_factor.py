"""The second factor (issue 15, items 1 and 3): TOTP enrolment, the two-step sign-in, recovery
codes and the step-up rule. The pure parts (codes, sealing, the QR code) are in
:mod:`control_plane.auth.totp`; the flows are described in ``docs/control-plane-accounts.md``.

- **Two-step sign-in.** A password (or Google) that is right for an account with a confirmed
  TOTP factor opens no session: it makes a :class:`SecondFactorChallenge` (256-bit token, stored
  hashed, ``PENDING_TTL`` long, ``MAX_ATTEMPTS`` tries, single use), whose token goes to the
  browser in an HttpOnly, SameSite=Strict cookie scoped to ``/api/auth`` (or in the body for
  ``transport: body`` clients). A TOTP code or a recovery code then spends it and opens the
  session; the session, its refresh token and the known-device cookie exist only after both.
- **Throttling**: second-factor failures count on the sign-in budgets, per account and requester
  (known device or address) and on the per-account ceiling for unknown devices
  (:mod:`control_plane.auth.lockout`), exactly as wrong passwords do, and the same budgets are
  checked before a code is.
- **Replay**: a code is accepted only for a time step later than the last one accepted
  (``user_totp.last_used_step``, advanced by one guarded UPDATE, so two concurrent uses of one
  code cannot both pass).
- **Step-up**: the session records when it last proved the factor (``second_factor_at``: at
  sign-in, enrolment or ``POST /api/auth/second-factor/verify``). Sensitive actions of an account
  with a factor need that within ``STEP_UP_WINDOW``, else 403 ``step_up_required``.
- **Passkeys** (item 2, :mod:`control_plane.auth.passkeys`) are second factors too: an account
  "has a second factor" when it has a confirmed TOTP factor or at least one passkey. The
  recovery codes belong to the account's second factor as a whole: made when the first factor
  is turned on, kept while any factor is left, dropped with the last one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import Depends
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import HTTPConnection
from starlette.responses import Response

from control_plane.auth import lockout, passkeys, totp
from control_plane.auth import sessions as sessions_
from control_plane.auth.devices import KnownDevice
from control_plane.auth.models import (
    RecoveryCode,
    SecondFactorChallenge,
    User,
    UserSession,
    UserTotp,
)
from control_plane.auth.service import AuthContext
from control_plane.db import new_id, rowcount
from control_plane.deps import CurrentAuth, Now, SessionDep
from control_plane.errors import ERROR_TABLE, ControlPlaneError
from control_plane.mail import Mail
from control_plane.settings import Settings

#: How long a sign-in may wait for its second factor.
PENDING_TTL = timedelta(minutes=5)
#: Codes tried against one pending sign-in before it is spent (then: the password again).
MAX_ATTEMPTS = 5
#: How recent the second factor must be for a sensitive action (issue 15, item 3).
STEP_UP_WINDOW = timedelta(minutes=10)
#: The pending sign-in's cookie: HttpOnly, SameSite=Strict, on ``/api/auth`` only (so
#: ``__Secure-``, not ``__Host-``, with Secure cookies; see control_plane/auth/cookies.py).
PENDING_COOKIE = "qr_2fa"
SECURE_PENDING_COOKIE = "__Secure-qr_2fa"
PENDING_COOKIE_PATH = "/api/auth"


# -- errors (their rows join the one table in control_plane/errors.py) --------------------------


class SecondFactorExpired(ControlPlaneError):
    message = "this sign-in expired or was started in another browser; sign in again"


class InvalidSecondFactor(ControlPlaneError):
    message = "invalid code"


class SecondFactorReused(ControlPlaneError):
    message = "this code was already used; wait for the next one"


class StepUpRequired(ControlPlaneError):
    message = "confirm it is you: use a passkey, or enter a code from your authenticator app"


class TotpAlreadyEnabled(ControlPlaneError):
    message = "two-step sign-in is already on; turn it off first to set up a new authenticator"


class TotpNotEnabled(ControlPlaneError):
    message = "two-step sign-in is not on"


class TotpSetupMissing(ControlPlaneError):
    message = "start the set-up first"


ERROR_TABLE.update(
    {
        SecondFactorExpired: (401, "second_factor_expired"),
        InvalidSecondFactor: (401, "invalid_code"),
        SecondFactorReused: (401, "code_reused"),
        StepUpRequired: (403, "step_up_required"),
        TotpAlreadyEnabled: (409, "totp_already_enabled"),
        TotpNotEnabled: (409, "totp_not_enabled"),
        TotpSetupMissing: (409, "totp_setup_missing"),
    }
)


# -- reading the factor ------------------------------------------------------------------------


async def confirmed_totp(db: AsyncSession, user_id: str) -> UserTotp | None:
    return await db.scalar(
        select(UserTotp).where(UserTotp.user_id == user_id, UserTotp.confirmed_at.is_not(None))
    )


async def has_second_factor(db: AsyncSession, user_id: str) -> bool:
    """A confirmed TOTP factor or a passkey (one refused for a counter regression included: a
    cloned passkey must not turn the second factor off)."""
    if await confirmed_totp(db, user_id) is not None:
        return True
    return await passkeys.count_passkeys(db, user_id) > 0


async def methods_of(db: AsyncSession, user_id: str) -> list[str]:
    """What the second step of a sign-in accepts for this account."""
    methods = ["totp"] if await confirmed_totp(db, user_id) is not None else []
    if await passkeys.count_passkeys(db, user_id) > 0:
        methods.append("passkey")
    return [*methods, "recovery_code"]


async def recovery_codes_left(db: AsyncSession, user_id: str) -> int:
    count = await db.scalar(
        select(func.count())
        .select_from(RecoveryCode)
        .where(RecoveryCode.user_id == user_id, RecoveryCode.used_at.is_(None))
    )
    return int(count or 0)


# -- checking a code ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Proof:
    """What the person typed: a TOTP code or a recovery code (exactly one)."""

    code: str | None = None
    recovery_code: str | None = None


async def _spend_totp(
    db: AsyncSession, ctx: AuthContext, row: UserTotp, code: str, now: datetime
) -> None:
    secret = totp.open_secret(ctx.settings, row.user_id, row.secret_ciphertext)
    step = totp.match_step(secret, code, now, after=row.last_used_step)
    if step is None:
        if totp.match_step(secret, code, now, after=None) is not None:
            raise SecondFactorReused()
        raise InvalidSecondFactor()
    # One guarded UPDATE: of two requests with the same code, one advances the step.
    claimed = await db.execute(
        update(UserTotp)
        .where(
            UserTotp.user_id == row.user_id,
            or_(UserTotp.last_used_step.is_(None), UserTotp.last_used_step < step),
        )
        .values(last_used_step=step)
        .execution_options(synchronize_session=False)
    )
    if rowcount(claimed) != 1:
        raise SecondFactorReused()


async def _spend_recovery_code(db: AsyncSession, user_id: str, code: str, now: datetime) -> None:
    normalized = totp.normalize_recovery_code(code)
    if normalized is None:
        raise InvalidSecondFactor()
    spent = await db.execute(
        update(RecoveryCode)
        .where(
            RecoveryCode.user_id == user_id,
            RecoveryCode.code_hash == totp.recovery_code_hash(user_id, normalized),
            RecoveryCode.used_at.is_(None),
        )
        .values(used_at=now)
        .execution_options(synchronize_session=False)
    )
    if rowcount(spent) != 1:
        raise InvalidSecondFactor()


async def check_proof(
    db: AsyncSession,
    ctx: AuthContext,
    user: User,
    proof: Proof,
    *,
    now: datetime,
    address: str,
    device: KnownDevice | None,
) -> bool:
    """Spend ``proof`` for ``user`` or raise. Throttled on the sign-in budgets: checked before,
    and a failure counts as a failed sign-in (per account and requester, and the per-account
    ceiling for unknown devices).

    Returns whether a recovery code was spent: the caller then sends
    :func:`recovery_code_notice` once its changes are in (someone holding one of the codes can
    get past the second factor; the owner hears of it as of a password change)."""
    row = await confirmed_totp(db, user.id)
    if row is None and (proof.code is not None or not await has_second_factor(db, user.id)):
        raise TotpNotEnabled()
    who = lockout.requester(ctx.devices, user.email, address, device)
    await lockout.before_sign_in(ctx.throttle, who)
    try:
        if proof.code is not None:
            assert row is not None
            await _spend_totp(db, ctx, row, proof.code, now)
        elif proof.recovery_code is not None:
            await _spend_recovery_code(db, user.id, proof.recovery_code, now)
        else:  # pragma: no cover - the request schemas require one
            raise InvalidSecondFactor()
    except (InvalidSecondFactor, SecondFactorReused):
        await lockout.failed_sign_in(ctx.throttle, who)
        raise
    return proof.recovery_code is not None


async def recovery_code_notice(db: AsyncSession, settings: Settings, user: User) -> Mail:
    """The mail telling ``user`` a recovery code was spent, with how many are left now."""
    left = await recovery_codes_left(db, user.id)
    link = f"{settings.public_url}/app/security"
    codes = "1 recovery code is" if left == 1 else f"{left} recovery codes are"
    return Mail(
        to=user.email,
        subject="A recovery code was used on your account",
        text=(
            "One of the recovery codes of your Quoroom account was just used in place of your "
            f"second factor. {codes} left.\n\nIf this was not you, sign in, change your "
            "password, make new recovery codes and sign out everywhere:\n\n"
            f"{link}\n"
        ),
        link=link,
    )


# -- the pending sign-in -----------------------------------------------------------------------


def pending_cookie_name(settings: Settings) -> str:
    return SECURE_PENDING_COOKIE if settings.secure_cookies else PENDING_COOKIE


def pending_token_of(request: HTTPConnection, settings: Settings) -> str | None:
    return request.cookies.get(pending_cookie_name(settings)) or None


def set_pending_cookie(response: Response, settings: Settings, raw: str) -> None:
    response.set_cookie(
        pending_cookie_name(settings),
        raw,
        max_age=int(PENDING_TTL.total_seconds()),
        path=PENDING_COOKIE_PATH,
        secure=settings.secure_cookies,
        httponly=True,
        samesite="strict",
    )


def clear_pending_cookie(response: Response, settings: Settings) -> None:
    response.delete_cookie(
        pending_cookie_name(settings),
        path=PENDING_COOKIE_PATH,
        secure=settings.secure_cookies,
        httponly=True,
        samesite="strict",
    )


async def open_challenge(
    db: AsyncSession, user: User, *, method: str, transport: str, now: datetime
) -> str:
    """A sign-in waiting for its second factor; returns its token (stored hashed)."""
    # The account's older pending sign-ins that ended are dropped here (bounded table).
    await db.execute(
        delete(SecondFactorChallenge)
        .where(
            SecondFactorChallenge.user_id == user.id,
            or_(
                SecondFactorChallenge.expires_at <= now,
                SecondFactorChallenge.used_at.is_not(None),
            ),
        )
        .execution_options(synchronize_session=False)
    )
    raw = sessions_.new_token()
    db.add(
        SecondFactorChallenge(
            id=new_id(),
            user_id=user.id,
            token_hash=sessions_.token_hash(raw),
            method=method,
            transport=transport,
            created_at=now,
            expires_at=now + PENDING_TTL,
            attempts=0,
        )
    )
    await db.flush()
    return raw


async def find_challenge(
    db: AsyncSession, raw: str | None, now: datetime
) -> tuple[SecondFactorChallenge, User]:
    """The live pending sign-in of ``raw``; :class:`SecondFactorExpired` for a missing, unknown,
    expired, spent or exhausted one (one answer for all: nothing to learn from it)."""
    if not raw or len(raw) > sessions_.MAX_TOKEN_LENGTH:
        raise SecondFactorExpired()
    row = (
        await db.execute(
            select(SecondFactorChallenge, User)
            .join(User, User.id == SecondFactorChallenge.user_id)
            .where(
                SecondFactorChallenge.token_hash == sessions_.token_hash(raw),
                SecondFactorChallenge.used_at.is_(None),
                SecondFactorChallenge.expires_at > now,
                SecondFactorChallenge.attempts < MAX_ATTEMPTS,
            )
        )
    ).first()
    if row is None:
        raise SecondFactorExpired()
    return row[0], row[1]


async def count_attempt(db: AsyncSession, challenge: SecondFactorChallenge) -> None:
    await db.execute(
        update(SecondFactorChallenge)
        .where(SecondFactorChallenge.id == challenge.id)
        .values(attempts=SecondFactorChallenge.attempts + 1)
        .execution_options(synchronize_session=False)
    )


async def close_challenge(
    db: AsyncSession, challenge: SecondFactorChallenge, now: datetime
) -> None:
    """Spend the pending sign-in (one guarded UPDATE: single use under concurrency)."""
    spent = await db.execute(
        update(SecondFactorChallenge)
        .where(SecondFactorChallenge.id == challenge.id, SecondFactorChallenge.used_at.is_(None))
        .values(used_at=now)
        .execution_options(synchronize_session=False)
    )
    if rowcount(spent) != 1:
        raise SecondFactorExpired()


# -- enrolment and removal ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setup:
    secret: str
    uri: str
    svg: str
    data_uri: str


async def begin_setup(db: AsyncSession, ctx: AuthContext, user: User, now: datetime) -> Setup:
    """A new secret waiting for its first code (replacing an unconfirmed one)."""
    existing = await db.get(UserTotp, user.id)
    if existing is not None and existing.confirmed_at is not None:
        raise TotpAlreadyEnabled()
    secret = totp.new_secret()
    sealed = totp.seal_secret(ctx.settings, user.id, secret)
    if existing is None:
        db.add(UserTotp(user_id=user.id, secret_ciphertext=sealed, created_at=now))
    else:
        existing.secret_ciphertext = sealed
        existing.created_at = now
        existing.last_used_step = None
    await db.flush()
    uri = totp.provisioning_uri(secret, user.email)
    return Setup(secret, uri, totp.qr_svg(uri), totp.qr_data_uri(uri))


async def replace_recovery_codes(db: AsyncSession, user_id: str, now: datetime) -> list[str]:
    await db.execute(
        delete(RecoveryCode)
        .where(RecoveryCode.user_id == user_id)
        .execution_options(synchronize_session=False)
    )
    codes = totp.new_recovery_codes()
    for code in codes:
        normalized = totp.normalize_recovery_code(code)
        assert normalized is not None
        db.add(
            RecoveryCode(
                id=new_id(),
                user_id=user_id,
                code_hash=totp.recovery_code_hash(user_id, normalized),
                created_at=now,
            )
        )
    await db.flush()
    return codes


async def confirm_setup(
    db: AsyncSession, ctx: AuthContext, user: User, session_id: str, code: str, now: datetime
) -> list[str]:
    """Turn the factor on with its first code; returns the ten recovery codes (shown once).

    The session that confirmed has just proved the factor (it counts for step-up)."""
    row = await db.get(UserTotp, user.id)
    if row is None:
        raise TotpSetupMissing()
    if row.confirmed_at is not None:
        raise TotpAlreadyEnabled()
    await _spend_totp(db, ctx, row, code, now)
    row.confirmed_at = now
    codes = await replace_recovery_codes(db, user.id, now)
    await mark_session_verified(db, session_id, now)
    return codes


async def new_recovery_codes(db: AsyncSession, user: User, now: datetime) -> list[str]:
    if not await has_second_factor(db, user.id):
        raise TotpNotEnabled()
    return await replace_recovery_codes(db, user.id, now)


async def disable(db: AsyncSession, user: User) -> None:
    """Remove the TOTP factor (after the caller checked a fresh proof); with it the recovery
    codes when no passkey is left."""
    await db.execute(
        delete(UserTotp)
        .where(UserTotp.user_id == user.id)
        .execution_options(synchronize_session=False)
    )
    await factor_removed(db, user)


async def factor_removed(db: AsyncSession, user: User) -> None:
    """After a factor was removed: when none is left, the recovery codes, the pending sign-ins
    and the sessions' step-up times go too (the account signs in with one step again)."""
    if await has_second_factor(db, user.id):
        return
    for model in (UserTotp, RecoveryCode, SecondFactorChallenge):
        await db.execute(
            delete(model)
            .where(model.user_id == user.id)
            .execution_options(synchronize_session=False)
        )
    await db.execute(
        update(UserSession)
        .where(UserSession.user_id == user.id)
        .values(second_factor_at=None)
        .execution_options(synchronize_session=False)
    )


async def mark_session_verified(db: AsyncSession, session_id: str, now: datetime) -> None:
    await db.execute(
        update(UserSession)
        .where(UserSession.id == session_id)
        .values(second_factor_at=now)
        .execution_options(synchronize_session=False)
    )


# -- step-up -----------------------------------------------------------------------------------


async def require_recent_second_factor(auth: CurrentAuth, db: SessionDep, now: Now) -> None:
    """FastAPI dependency for sensitive actions: an account with a second factor must have
    proved it in this session within the last ``STEP_UP_WINDOW`` (403 ``step_up_required``,
    which the pages answer by asking for a code, ``POST /api/auth/second-factor/verify``, and
    retrying). Accounts without a factor pass."""
    if not await has_second_factor(db, auth.user.id):
        return
    verified_at = await db.scalar(
        select(UserSession.second_factor_at).where(UserSession.id == auth.session_id)
    )
    if verified_at is None or now - verified_at > STEP_UP_WINDOW:
        raise StepUpRequired()


#: ``dependencies=[StepUp]`` on a route (or a parameter ``_: RecentSecondFactor``).
StepUp = Depends(require_recent_second_factor)
RecentSecondFactor = Annotated[None, StepUp]
