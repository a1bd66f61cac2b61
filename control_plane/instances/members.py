"""Members of an instance and their invitations (issue 12, item 6).

The owner invites an address: a ``pending`` row, and a mail with a link. Nobody becomes a member
without saying yes. The invitee accepts by that link (signed, expiring, single use) or in ``/app``
(the pending invitations addressed to their verified email), and only then is the row ``active``
with their ``user_id`` — which is what every access check reads (``access.role_of``,
``service.list_visible``, runtime tokens and their refresh). Until then the Room is not in their
list and they get no token.

Inviting never looks at accounts: the owner's answer and the work behind it are the same for a
verified account, an unverified one and an unknown address (the old answer, ``active`` for a
verified account and ``pending`` otherwise, was an enumeration oracle).

Removing a member stops new runtime tokens (and refreshes) at once; tokens already issued die
within their TTL (≤ 15 minutes).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from itsdangerous import BadData, URLSafeSerializer
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.models import User
from control_plane.db import rowcount
from control_plane.errors import (
    CannotInviteOwner,
    EmailNotVerified,
    InvalidInviteToken,
    InvitationNotFound,
    InviteWrongAccount,
    MemberLimitReached,
    MemberNotFound,
)
from control_plane.instances import quotas
from control_plane.instances.lifecycle import record_event
from control_plane.instances.models import (
    CloudInstance,
    CloudInstanceMember,
    InstanceStatus,
    MemberStatus,
)
from control_plane.mail import Mail
from control_plane.settings import Settings

#: itsdangerous salt: a signature made for anything else (a CSRF token, the OAuth state cookie)
#: is never an invitation.
INVITE_SALT = "quoroom-member-invite"
MAX_INVITE_TOKEN_LENGTH = 512
MAX_LISTED_INVITATIONS = 100
_ENDED = (InstanceStatus.CANCELED, InstanceStatus.DESTROYING, InstanceStatus.DESTROYED)


def _normalize(email: str) -> str:
    return email.strip().lower()


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class InviteLinks:
    """Invitation tokens: ``{m: membership id, i: instance id, x: expiry}`` signed by itsdangerous
    (HMAC under ``SECRET_KEY``, salt :data:`INVITE_SALT`, constant-time check).

    Single use comes from the row, not the token: accepting turns it ``pending → active`` in one
    guarded update, so a second use finds it active; removing or declining deletes it, and a new
    invitation to the same address is a new row, so every older link is dead. The expiry is in the
    signed payload and checked against the app's clock.
    """

    def __init__(self, settings: Settings) -> None:
        self._serializer = URLSafeSerializer(settings.secret_key_bytes(), salt=INVITE_SALT)
        self.ttl = timedelta(seconds=settings.invite_ttl_seconds)
        self._public_url = settings.public_url

    def issue(self, member: CloudInstanceMember, now: datetime) -> str:
        expires = int((now + self.ttl).timestamp())
        token: str = self._serializer.dumps({"m": member.id, "i": member.instance_id, "x": expires})
        return token

    def read(self, token: str, now: datetime) -> tuple[str, str]:
        """``(membership id, instance id)`` of a well-signed, unexpired token, or raise."""
        if not 0 < len(token) <= MAX_INVITE_TOKEN_LENGTH:
            raise InvalidInviteToken()
        try:
            data: Any = self._serializer.loads(token)
        except BadData as exc:
            raise InvalidInviteToken() from exc
        if not isinstance(data, dict):
            raise InvalidInviteToken()
        member_id, instance_id, expires = data.get("m"), data.get("i"), data.get("x")
        if not (
            isinstance(member_id, str)
            and isinstance(instance_id, str)
            and isinstance(expires, int)
            and not isinstance(expires, bool)
        ):
            raise InvalidInviteToken()
        if expires <= now.timestamp():
            raise InvalidInviteToken()
        return member_id, instance_id

    def link(self, token: str) -> str:
        # Built from the configured public URL (never the request's Host); the token rides in the
        # fragment, so it never reaches an access log or a Referer. The page posts it to the API.
        return f"{self._public_url}/accept-invite#token={token}"

    def mail(
        self,
        member: CloudInstanceMember,
        instance: CloudInstance,
        inviter_email: str,
        now: datetime,
    ) -> Mail:
        """The invitation mail, the same whether or not the address has an account."""
        link = self.link(self.issue(member, now))
        seconds = int(self.ttl.total_seconds())
        if seconds >= 2 * 86400:
            life = f"{seconds // 86400} days"
        elif seconds >= 2 * 3600:
            life = f"{seconds // 3600} hours"
        else:
            life = f"{seconds // 60} minutes"
        return Mail(
            to=member.email,
            subject="An invitation to a Quoroom Room",
            text=(
                f"{inviter_email} invited {member.email} to their Quoroom Room "
                f"(they named it “{instance.name}”).\n\n"
                "To accept, open this link and sign in — or create an account — with "
                f"{member.email}:\n\n{link}\n\n"
                f"The link expires in {life}. Nothing happens unless you accept: if you do not "
                f"know {inviter_email}, ignore this message.\n"
            ),
            link=link,
        )


@dataclass(frozen=True, slots=True)
class Invitation:
    """A pending invitation as its invitee sees it."""

    member: CloudInstanceMember
    instance_id: str
    instance_name: str
    invited_by: str | None


async def list_members(
    db: AsyncSession, instance_id: str, *, active_only: bool = False
) -> list[CloudInstanceMember]:
    query = select(CloudInstanceMember).where(CloudInstanceMember.instance_id == instance_id)
    if active_only:
        query = query.where(CloudInstanceMember.status == MemberStatus.ACTIVE)
    rows = await db.scalars(query.order_by(CloudInstanceMember.created_at, CloudInstanceMember.id))
    return list(rows)


async def invite(
    db: AsyncSession,
    instance: CloudInstance,
    *,
    email: str,
    owner: User,
    settings: Settings,
    now: datetime,
) -> tuple[CloudInstanceMember, bool]:
    """The membership for ``email`` (a new ``pending`` one, or the one already there) and whether
    an invitation mail should go out now (new or still pending: sent again with a fresh link).

    No account is looked up: what happens here depends on this instance's rows (and the owner's
    invitations of the day) only. Limits (``quotas.py``): ``MAX_MEMBERS_PER_INSTANCE`` rows per
    Room, pending ones included, and ``INVITATIONS_PER_DAY`` mails per owner, both counted under
    the owner's row lock so two invitations at once cannot both take the last slot (only the
    owner invites, so that one lock serialises every write that adds a member to their Rooms).
    """
    email = _normalize(email)
    if _same(_normalize(owner.email), email):
        raise CannotInviteOwner()
    await quotas.lock_user(db, owner.id)
    existing = await _by_email(db, instance.id, email)
    if existing is not None:
        if existing.status != MemberStatus.PENDING:
            return existing, False
        await quotas.check_invitations(db, settings, owner.id, now=now)
        await _resend(db, existing, now)
        await record_event(db, instance.id, quotas.INVITE_EVENT, "invitation sent again", now=now)
        return existing, True
    count = await db.scalar(
        select(func.count())
        .select_from(CloudInstanceMember)
        .where(CloudInstanceMember.instance_id == instance.id)
    )
    if (count or 0) >= settings.max_members_per_instance:
        raise MemberLimitReached(
            f"this Room has the maximum of {settings.max_members_per_instance} members "
            "(invitations included); remove one first"
        )
    await quotas.check_invitations(db, settings, owner.id, now=now)
    member = CloudInstanceMember(
        instance_id=instance.id,
        email=email,
        user_id=None,
        role="member",
        status=MemberStatus.PENDING,
        invited_by=owner.id,
        created_at=now,
    )
    try:
        async with db.begin_nested():
            db.add(member)
    except IntegrityError:  # the same address invited concurrently
        found = await _by_email(db, instance.id, email)
        if found is None:  # pragma: no cover - the conflicting row is there
            raise
        return found, False
    await record_event(db, instance.id, quotas.INVITE_EVENT, "member invited", now=now)
    return member, True


async def _resend(db: AsyncSession, member: CloudInstanceMember, now: datetime) -> None:
    # Sent again: its in-app deadline starts over with the new link.
    await db.execute(
        update(CloudInstanceMember)
        .where(
            CloudInstanceMember.id == member.id,
            CloudInstanceMember.status == MemberStatus.PENDING,
        )
        .values(created_at=now)
        .execution_options(synchronize_session=False)
    )
    member.created_at = now


async def _by_email(db: AsyncSession, instance_id: str, email: str) -> CloudInstanceMember | None:
    return await db.scalar(
        select(CloudInstanceMember).where(
            CloudInstanceMember.instance_id == instance_id, CloudInstanceMember.email == email
        )
    )


async def get_member(db: AsyncSession, instance_id: str, member_id: str) -> CloudInstanceMember:
    member = (
        await db.scalar(
            select(CloudInstanceMember).where(
                CloudInstanceMember.id == member_id,
                CloudInstanceMember.instance_id == instance_id,
            )
        )
        if 0 < len(member_id) <= 64
        else None
    )
    if member is None:
        raise MemberNotFound()
    return member


async def remove_member(
    db: AsyncSession, instance_id: str, member_id: str, *, now: datetime
) -> None:
    result = await db.execute(
        delete(CloudInstanceMember)
        .where(
            CloudInstanceMember.id == member_id,
            CloudInstanceMember.instance_id == instance_id,
        )
        .execution_options(synchronize_session=False)
    )
    if not rowcount(result):
        raise MemberNotFound()
    await record_event(db, instance_id, "member", "member removed", now=now)


# -- the invitee's side --------------------------------------------------------------------------


def _require_verified(user: User) -> str:
    if not user.email_verified:
        raise EmailNotVerified()
    return _normalize(user.email)


async def accept_by_token(
    db: AsyncSession, links: InviteLinks, user: User, token: str, *, now: datetime
) -> CloudInstance:
    """Accept the invitation a mailed link names, as ``user`` (who must be its addressee)."""
    member_id, instance_id = links.read(token, now)
    member = await db.scalar(
        select(CloudInstanceMember).where(
            CloudInstanceMember.id == member_id,
            CloudInstanceMember.instance_id == instance_id,
        )
    )
    if member is None or member.status != MemberStatus.PENDING:
        raise InvalidInviteToken()  # removed, declined or already accepted: the link is spent
    if not _same(_require_verified(user), member.email):
        raise InviteWrongAccount()
    return await _activate(db, member, user, now)


async def accept_in_app(
    db: AsyncSession, links: InviteLinks, user: User, member_id: str, *, now: datetime
) -> CloudInstance:
    """Accept one of ``user``'s pending invitations from ``/app``."""
    member = await _pending_for(db, links, user, member_id, now)
    return await _activate(db, member, user, now)


async def decline(
    db: AsyncSession, links: InviteLinks, user: User, member_id: str, *, now: datetime
) -> str:
    """The invitee says no: the invitation is deleted (its links die with it). Returns the
    instance's id."""
    member = await _pending_for(db, links, user, member_id, now, unexpired=False)
    result = await db.execute(
        delete(CloudInstanceMember)
        .where(
            CloudInstanceMember.id == member.id,
            CloudInstanceMember.status == MemberStatus.PENDING,
        )
        .execution_options(synchronize_session=False)
    )
    if not rowcount(result):
        raise InvitationNotFound()
    await record_event(db, member.instance_id, "member", "invitation declined", now=now)
    return member.instance_id


async def _pending_for(
    db: AsyncSession,
    links: InviteLinks,
    user: User,
    member_id: str,
    now: datetime,
    *,
    unexpired: bool = True,
) -> CloudInstanceMember:
    """``user``'s own pending invitation ``member_id``; anyone else's is ``404`` (never 403: the
    ids of other people's invitations reveal nothing)."""
    email = _require_verified(user)
    if not 0 < len(member_id) <= 64:
        raise InvitationNotFound()
    query = select(CloudInstanceMember).where(
        CloudInstanceMember.id == member_id,
        CloudInstanceMember.email == email,
        CloudInstanceMember.status == MemberStatus.PENDING,
    )
    if unexpired:
        query = query.where(CloudInstanceMember.created_at > now - links.ttl)
    member = await db.scalar(query)
    if member is None:
        raise InvitationNotFound()
    return member


async def _activate(
    db: AsyncSession, member: CloudInstanceMember, user: User, now: datetime
) -> CloudInstance:
    """``pending → active`` for ``user``: one guarded update, so a link or a click counts once."""
    result = await db.execute(
        update(CloudInstanceMember)
        .where(
            CloudInstanceMember.id == member.id,
            CloudInstanceMember.status == MemberStatus.PENDING,
            CloudInstanceMember.email == member.email,
        )
        .values(status=MemberStatus.ACTIVE, user_id=user.id)
        .execution_options(synchronize_session=False)
    )
    if not rowcount(result):
        raise InvalidInviteToken()  # accepted or removed concurrently
    await record_event(db, member.instance_id, "member", "member joined", now=now)
    instance = await db.get(CloudInstance, member.instance_id, populate_existing=True)
    if instance is None:  # pragma: no cover - the membership cascades with its instance
        raise InvitationNotFound()
    return instance


async def invitations_for(
    db: AsyncSession, links: InviteLinks, user: User, *, now: datetime
) -> list[Invitation]:
    """The pending, unexpired invitations addressed to ``user``'s verified email."""
    if not user.email_verified:
        return []
    rows = await db.execute(
        select(CloudInstanceMember, CloudInstance.name, User.email)
        .join(CloudInstance, CloudInstance.id == CloudInstanceMember.instance_id)
        .outerjoin(User, User.id == CloudInstance.owner_id)
        .where(
            CloudInstanceMember.email == _normalize(user.email),
            CloudInstanceMember.status == MemberStatus.PENDING,
            CloudInstanceMember.created_at > now - links.ttl,
            CloudInstance.status.not_in([str(s) for s in _ENDED]),
        )
        .order_by(CloudInstanceMember.created_at, CloudInstanceMember.id)
        .limit(MAX_LISTED_INVITATIONS)
    )
    return [
        Invitation(member, member.instance_id, name, owner_email)
        for member, name, owner_email in rows.all()
    ]
