"""Members of an instance: invited by email by the owner, ``pending`` until that address has a
verified account, then ``active``. Removing a member stops new runtime tokens (and refreshes) at
once; tokens already issued die within their TTL (≤ 15 minutes)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.models import User
from control_plane.errors import CannotInviteOwner, MemberLimitReached, MemberNotFound
from control_plane.instances.lifecycle import record_event
from control_plane.instances.models import CloudInstance, CloudInstanceMember, MemberStatus


def _normalize(email: str) -> str:
    return email.strip().lower()


async def list_members(db: AsyncSession, instance_id: str) -> list[CloudInstanceMember]:
    rows = await db.scalars(
        select(CloudInstanceMember)
        .where(CloudInstanceMember.instance_id == instance_id)
        .order_by(CloudInstanceMember.created_at, CloudInstanceMember.id)
    )
    return list(rows)


async def add_member(
    db: AsyncSession,
    instance: CloudInstance,
    *,
    email: str,
    invited_by: str,
    limit: int,
    now: datetime,
) -> tuple[CloudInstanceMember, bool]:
    """The membership for ``email`` and whether it was created now (adding twice is a no-op)."""
    email = _normalize(email)
    owner_email = await db.scalar(select(User.email).where(User.id == instance.owner_id))
    if owner_email is not None and owner_email == email:
        raise CannotInviteOwner()
    existing = await _by_email(db, instance.id, email)
    if existing is not None:
        return existing, False
    count = await db.scalar(
        select(func.count())
        .select_from(CloudInstanceMember)
        .where(CloudInstanceMember.instance_id == instance.id)
    )
    if (count or 0) >= limit:
        raise MemberLimitReached()
    user = await db.scalar(select(User).where(User.email == email))
    active = user is not None and user.email_verified
    member = CloudInstanceMember(
        instance_id=instance.id,
        email=email,
        user_id=user.id if active and user is not None else None,
        role="member",
        status=MemberStatus.ACTIVE if active else MemberStatus.PENDING,
        invited_by=invited_by,
        created_at=now,
    )
    try:
        async with db.begin_nested():
            db.add(member)
    except IntegrityError:  # the same address added concurrently
        found = await _by_email(db, instance.id, email)
        if found is None:  # pragma: no cover - the conflicting row is there
            raise
        return found, False
    await record_event(
        db, instance.id, "member", f"member {'added' if active else 'invited'}", now=now
    )
    return member, True


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
    if not getattr(result, "rowcount", 0):
        raise MemberNotFound()
    await record_event(db, instance_id, "member", "member removed", now=now)


async def claim_invites(db: AsyncSession, user: User) -> int:
    """Activate the pending invites addressed to ``user``'s email, once that email is verified.

    Called by the account service when an email becomes verified, and again when a verified user
    lists their instances (which covers accounts verified another way, e.g. Google).
    """
    if not user.email_verified:
        return 0
    result = await db.execute(
        update(CloudInstanceMember)
        .where(
            CloudInstanceMember.email == _normalize(user.email),
            CloudInstanceMember.status == MemberStatus.PENDING,
        )
        .values(status=MemberStatus.ACTIVE, user_id=user.id)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)
