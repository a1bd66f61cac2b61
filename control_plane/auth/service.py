"""Account operations. Routes stay thin: they parse, call one function here, commit, then send
the mail this returned and set cookies.

Every function that produces mail returns it instead of sending it, so mail leaves only after
the transaction committed (no "verify your email" for an account that was rolled back).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.auth import lockout
from control_plane.auth import sessions as sessions_
from control_plane.auth.csrf import CsrfProtector
from control_plane.auth.devices import KnownDevice, KnownDevices
from control_plane.auth.google import StateCookie
from control_plane.auth.models import EmailToken, User, UserIdentity, UserSession
from control_plane.auth.passwords import PasswordHasher
from control_plane.db import new_id
from control_plane.errors import (
    AccountLinkRefused,
    EmailNotVerified,
    InvalidCredentials,
    InvalidEmailToken,
    OAuthEmailNotVerified,
    WeakPassword,
)
from control_plane.keys.service import KeyRing
from control_plane.mail import Mail, Mailer
from control_plane.settings import Settings
from control_plane.throttle import Throttle

ACCESS_AUDIENCE = "quoroom-control"
VERIFY = "verify"
RESET = "reset"


@dataclass
class AuthContext:
    """The long-lived collaborators of the account service (built once in the app lifespan)."""

    settings: Settings
    key_ring: KeyRing
    hasher: PasswordHasher
    throttle: Throttle
    mailer: Mailer
    csrf: CsrfProtector
    google_state: StateCookie
    devices: KnownDevices = field(init=False)

    def __post_init__(self) -> None:
        self.devices = KnownDevices(self.settings)


@dataclass
class SignedIn:
    user: User
    session: UserSession
    refresh_token: str
    access_token: str
    mails: list[Mail] = field(default_factory=list)


def normalize_email(email: str) -> str:
    return email.strip().lower()


def check_password_policy(settings: Settings, password: str, email: str) -> None:
    """Length bounds (OWASP: at least 8, allow long passphrases), not blank, not the email."""
    if len(password) < settings.password_min_length:
        raise WeakPassword(f"password must be at least {settings.password_min_length} characters")
    if len(password) > settings.password_max_length:
        raise WeakPassword(f"password must be at most {settings.password_max_length} characters")
    if not password.strip():
        raise WeakPassword("password must not be blank")
    if password.strip().lower() == email:
        raise WeakPassword("password must not be your email address")


async def user_by_email(db: AsyncSession, email: str) -> User | None:
    return await db.scalar(select(User).where(User.email == normalize_email(email)))


async def identities_of(db: AsyncSession, user_id: str) -> list[str]:
    rows = await db.scalars(
        select(UserIdentity.provider).where(UserIdentity.user_id == user_id).distinct()
    )
    return sorted(rows)


def _link(ctx: AuthContext, page: str, token: str) -> str:
    # Built from the configured public URL, never from the request's Host header (host-header
    # poisoning of reset links). The token travels in the fragment so it never reaches a server
    # access log or a Referer header; the page posts it to the API.
    return f"{ctx.settings.public_url}/{page}#token={token}"


async def _new_email_token(
    db: AsyncSession, ctx: AuthContext, user: User, purpose: str, now: datetime
) -> str:
    # Only the newest verification link works: older unused ones are spent now. Reset links are
    # not: anyone may ask for one, and that must not spend the link the owner is about to open
    # (issue 12). Each lives an hour, their number is bounded by the mail budgets, and using one
    # spends all the others (reset_password).
    if purpose == VERIFY:
        await db.execute(
            update(EmailToken)
            .where(
                EmailToken.user_id == user.id,
                EmailToken.purpose == purpose,
                EmailToken.used_at.is_(None),
            )
            .values(used_at=now)
            .execution_options(synchronize_session=False)
        )
    ttl = (
        ctx.settings.verify_token_ttl_seconds
        if purpose == VERIFY
        else ctx.settings.reset_token_ttl_seconds
    )
    raw = sessions_.new_token()
    db.add(
        EmailToken(
            user_id=user.id,
            purpose=purpose,
            token_hash=sessions_.token_hash(raw),
            email=user.email,
            created_at=now,
            expires_at=now + timedelta(seconds=ttl),
        )
    )
    await db.flush()
    return raw


async def _consume_email_token(
    db: AsyncSession, raw: str, purpose: str, now: datetime
) -> tuple[User, str]:
    """Spend a token atomically (one guarded UPDATE): single use even under concurrency."""
    row = (
        await db.execute(
            update(EmailToken)
            .where(
                EmailToken.token_hash == sessions_.token_hash(raw),
                EmailToken.purpose == purpose,
                EmailToken.used_at.is_(None),
                EmailToken.expires_at > now,
            )
            .values(used_at=now)
            .returning(EmailToken.user_id, EmailToken.email)
            .execution_options(synchronize_session=False)
        )
    ).first()
    if row is None:
        raise InvalidEmailToken()
    user = await db.get(User, row[0])
    if user is None:  # pragma: no cover - cascade
        raise InvalidEmailToken()
    return user, row[1]


def _verify_mail(ctx: AuthContext, user: User, token: str) -> Mail:
    link = _link(ctx, "verify-email", token)
    hours = ctx.settings.verify_token_ttl_seconds // 3600
    return Mail(
        to=user.email,
        subject="Confirm your email address",
        text=(
            "Welcome to Quoroom.\n\nConfirm your email address by opening this link:\n\n"
            f"{link}\n\nThe link works once and expires in {hours} hours. If you did not sign "
            "up, ignore this message.\n"
        ),
        link=link,
    )


def _reset_mail(ctx: AuthContext, user: User, token: str) -> Mail:
    link = _link(ctx, "reset-password", token)
    minutes = ctx.settings.reset_token_ttl_seconds // 60
    return Mail(
        to=user.email,
        subject="Reset your password",
        text=(
            "Someone asked to reset the password of your Quoroom account.\n\n"
            f"Choose a new password here:\n\n{link}\n\nThe link works once and expires in "
            f"{minutes} minutes. If it was not you, ignore this message; your password is "
            "unchanged.\n"
        ),
        link=link,
    )


def _account_exists_mail(ctx: AuthContext, user: User) -> Mail:
    link = f"{ctx.settings.public_url}/forgot-password"
    return Mail(
        to=user.email,
        subject="You already have a Quoroom account",
        text=(
            "Someone tried to create a Quoroom account with this address, which already has "
            f"one. If it was you, sign in, or reset your password here:\n\n{link}\n"
        ),
        link=link,
    )


def _password_changed_mail(ctx: AuthContext, user: User) -> Mail:
    link = f"{ctx.settings.public_url}/forgot-password"
    return Mail(
        to=user.email,
        subject="Your password was changed",
        text=(
            "The password of your Quoroom account was just reset and every device was signed "
            "out. If this was not you, reset your password now:\n\n"
            f"{link}\n"
        ),
        link=link,
    )


# -- sign-up and email verification --------------------------------------------------------------


#: Work whose effect depends on whether an account exists; run by :func:`in_background`.
Job = Callable[[AsyncSession], Awaitable[list[Mail]]]


def in_background(
    ctx: AuthContext, factory: async_sessionmaker[AsyncSession], job: Job, *, what: str
) -> None:
    """Run ``job`` in its own transaction after the answer, then send the mail it returns.

    Sign-up, forgot-password and resend-verification answer the same for every address; doing
    the lookup and the writes before answering made a known address measurably slower or
    faster (issue 12: ~3 ms, right 61-70 % of the time from one request). What is left before
    the answer (parsing, throttling, the password hash) is the same work for every address."""

    async def run() -> list[Mail]:
        async with factory() as db:
            mails = await job(db)
            await db.commit()
        return mails

    ctx.mailer.run_then_send(run, what=what)


async def new_password_hash(ctx: AuthContext, *, email: str, password: str) -> str:
    """The policy check and the (slow) hash of a sign-up: done before answering, for every
    address alike, so the hashing stays bounded by the requests waiting for it."""
    check_password_policy(ctx.settings, password, normalize_email(email))
    return await ctx.hasher.hash(password)


async def signup(
    db: AsyncSession,
    ctx: AuthContext,
    *,
    email: str,
    password_hash: str,
    name: str | None,
    now: datetime,
) -> list[Mail]:
    """Create an unverified account and mail a verification link (in the background, see
    :func:`in_background`).

    For an address that already has an account nothing is written and the owner gets a notice
    instead (the answer was the same: no enumeration).
    """
    email = normalize_email(email)
    existing = await user_by_email(db, email)
    if existing is not None:
        return [_account_exists_mail(ctx, existing)]
    user = User(
        id=new_id(),
        email=email,
        email_verified=False,
        password_hash=password_hash,
        name=name,
        created_at=now,
        updated_at=now,
        password_changed_at=now,
    )
    db.add(user)
    try:
        await db.flush()
    except IntegrityError:
        # A concurrent sign-up for the same address won; answer as for an existing account.
        await db.rollback()
        return []
    token = await _new_email_token(db, ctx, user, VERIFY, now)
    return [_verify_mail(ctx, user, token)]


async def verify_email(db: AsyncSession, *, token: str, now: datetime) -> User:
    user, email = await _consume_email_token(db, token, VERIFY, now)
    if user.email != email:  # the address changed since the link was sent
        raise InvalidEmailToken()
    user.email_verified = True
    user.updated_at = now
    await db.flush()
    # Pending instance invitations to this address stay pending: the invitee accepts each one
    # (control_plane/instances/members.py); being invited never makes anyone a member.
    return user


async def resend_verification(
    db: AsyncSession, ctx: AuthContext, *, email: str, now: datetime
) -> list[Mail]:
    user = await user_by_email(db, email)
    if user is None or user.email_verified:
        return []
    token = await _new_email_token(db, ctx, user, VERIFY, now)
    return [_verify_mail(ctx, user, token)]


# -- password sign-in ---------------------------------------------------------------------------


async def authenticate(
    db: AsyncSession,
    ctx: AuthContext,
    *,
    email: str,
    password: str,
    now: datetime,
    address: str,
    device: KnownDevice | None,
) -> User:
    """The user for a correct email and password; one generic error otherwise.

    Throttled per account and requester, plus the per-account ceiling for unknown devices
    (:mod:`control_plane.auth.lockout`), before the database is read."""
    email = normalize_email(email)
    who = lockout.requester(ctx.devices, email, address, device)
    await lockout.before_sign_in(ctx.throttle, who)
    user = await user_by_email(db, email)
    ok = await ctx.hasher.verify(user.password_hash if user else None, password)
    if not ok or user is None:
        await lockout.failed_sign_in(ctx.throttle, who)
        raise InvalidCredentials()
    if not user.email_verified:
        raise EmailNotVerified()
    if user.password_hash and ctx.hasher.needs_rehash(user.password_hash):
        user.password_hash = await ctx.hasher.hash(password)
        user.updated_at = now
    return user


async def start_session(
    db: AsyncSession,
    ctx: AuthContext,
    user: User,
    *,
    method: str,
    now: datetime,
    user_agent: str | None,
    ip_address: str | None,
) -> SignedIn:
    session, refresh = await sessions_.create_session(
        db,
        user,
        method=method,
        ttl=timedelta(seconds=ctx.settings.session_ttl_seconds),
        now=now,
        user_agent=user_agent,
        ip_address=ip_address,
    )
    return SignedIn(user, session, refresh, issue_access_token(ctx, user, session.id))


def issue_access_token(ctx: AuthContext, user: User, session_id: str) -> str:
    return ctx.key_ring.sign(
        {
            "sub": user.id,
            "sid": session_id,
            "email": user.email,
            "emailVerified": user.email_verified,
        },
        audience=ACCESS_AUDIENCE,
        ttl=timedelta(seconds=ctx.settings.access_token_ttl_seconds),
    )


# -- password reset -----------------------------------------------------------------------------


async def forgot_password(
    db: AsyncSession, ctx: AuthContext, *, email: str, now: datetime
) -> list[Mail]:
    user = await user_by_email(db, email)
    if user is None:
        return []
    token = await _new_email_token(db, ctx, user, RESET, now)
    return [_reset_mail(ctx, user, token)]


async def reset_password(
    db: AsyncSession, ctx: AuthContext, *, token: str, password: str, now: datetime
) -> tuple[User, list[Mail]]:
    """Set a new password, sign every session out, and tell the owner."""
    user, email = await _consume_email_token(db, token, RESET, now)
    if user.email != email:
        raise InvalidEmailToken()
    check_password_policy(ctx.settings, password, user.email)
    user.password_hash = await ctx.hasher.hash(password)
    user.password_changed_at = now
    user.updated_at = now
    # Following the emailed link proves control of the address.
    user.email_verified = True
    await sessions_.revoke_all_sessions(db, user.id, reason="password_reset", now=now)
    await db.execute(
        update(EmailToken)
        .where(EmailToken.user_id == user.id, EmailToken.used_at.is_(None))
        .values(used_at=now)
        .execution_options(synchronize_session=False)
    )
    await db.flush()
    return user, [_password_changed_mail(ctx, user)]


async def change_password(
    db: AsyncSession,
    ctx: AuthContext,
    user: User,
    *,
    session_id: str,
    current_password: str | None,
    password: str,
    now: datetime,
    address: str,
    device: KnownDevice | None,
) -> list[Mail]:
    """A signed-in password change (issue 15: changing credentials, behind the step-up rule).

    The current password is asked for when the account has one, checked and throttled as a
    sign-in (a wrong one counts as a failed sign-in); a Google-only account sets its first.
    Every other session is signed out, and the owner is told by mail."""
    if user.password_hash is not None:
        who = lockout.requester(ctx.devices, user.email, address, device)
        await lockout.before_sign_in(ctx.throttle, who)
        if not current_password or not await ctx.hasher.verify(
            user.password_hash, current_password
        ):
            await lockout.failed_sign_in(ctx.throttle, who)
            raise InvalidCredentials("the current password is not right")
    check_password_policy(ctx.settings, password, user.email)
    user.password_hash = await ctx.hasher.hash(password)
    user.password_changed_at = now
    user.updated_at = now
    await sessions_.revoke_all_sessions(
        db, user.id, reason="password_changed", now=now, except_id=session_id
    )
    await db.flush()
    link = f"{ctx.settings.public_url}/forgot-password"
    return [
        Mail(
            to=user.email,
            subject="Your password was changed",
            text=(
                "The password of your Quoroom account was just changed and every other device "
                f"was signed out. If this was not you, reset your password now:\n\n{link}\n"
            ),
            link=link,
        )
    ]


# -- Google -------------------------------------------------------------------------------------


async def user_for_google(
    db: AsyncSession,
    *,
    subject: str,
    email: str,
    email_verified: bool,
    name: str | None,
    now: datetime,
) -> User:
    """The account for a verified Google identity: by ``sub`` first, then link or create.

    Linking to an existing account by email happens only when both sides' emails are verified;
    otherwise whoever registered an unverified account with the victim's address (or a Google
    account with an unverified address) could take the account over.
    """
    if not email_verified:
        raise OAuthEmailNotVerified()
    identity = await db.scalar(
        select(UserIdentity).where(
            UserIdentity.provider == "google", UserIdentity.subject == subject
        )
    )
    if identity is not None:
        user = await db.get(User, identity.user_id)
        if user is not None:
            identity.last_login_at = now
            identity.email = email
            return user
    email = normalize_email(email)
    user = await user_by_email(db, email)
    if user is None:
        user = User(
            id=new_id(),
            email=email,
            email_verified=True,
            password_hash=None,
            name=(name or None) and name[:100],
            created_at=now,
            updated_at=now,
        )
        db.add(user)
        await db.flush()
    elif not user.email_verified:
        raise AccountLinkRefused()
    db.add(
        UserIdentity(
            user_id=user.id,
            provider="google",
            subject=subject,
            email=email,
            created_at=now,
            last_login_at=now,
        )
    )
    await db.flush()
    return user
