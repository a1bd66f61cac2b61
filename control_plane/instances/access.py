"""Who may see and act on an instance: the owner, and active members (the private ACL).

``VisibleInstance`` (owner or active member) and ``OwnedInstance`` (owner only) are the
dependencies every ``/api/cloud/instances/{id}`` route uses. An instance the caller may not see is
``404 not_found`` — never 403, so ids of other people's instances reveal nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.auth.models import User
from control_plane.deps import CurrentAuth, SessionDep
from control_plane.errors import InstanceNotFound, OwnerRequired
from control_plane.instances.models import CloudInstance, CloudInstanceMember, MemberStatus, Role

MAX_ID_LENGTH = 64


@dataclass(frozen=True, slots=True)
class Access:
    """An instance as seen by one signed-in caller."""

    instance: CloudInstance
    role: Role
    user: User
    session_id: str


async def role_of(db: AsyncSession, instance: CloudInstance, user_id: str) -> Role | None:
    """``owner``, ``member`` (an active membership) or ``None``."""
    if instance.owner_id == user_id:
        return "owner"
    member = await db.scalar(
        select(CloudInstanceMember.id).where(
            CloudInstanceMember.instance_id == instance.id,
            CloudInstanceMember.user_id == user_id,
            CloudInstanceMember.status == MemberStatus.ACTIVE,
        )
    )
    return "member" if member is not None else None


async def load_instance(db: AsyncSession, instance_id: str) -> CloudInstance | None:
    if not 0 < len(instance_id) <= MAX_ID_LENGTH:
        return None
    return await db.scalar(
        select(CloudInstance)
        .where(CloudInstance.id == instance_id)
        .execution_options(populate_existing=True)
    )


async def _visible(
    instance_id: Annotated[str, Path(max_length=MAX_ID_LENGTH)],
    db: SessionDep,
    auth: CurrentAuth,
) -> Access:
    instance = await load_instance(db, instance_id)
    role = await role_of(db, instance, auth.user.id) if instance is not None else None
    if instance is None or role is None:
        raise InstanceNotFound()
    return Access(instance, role, auth.user, auth.session_id)


async def _owned(access: Annotated[Access, Depends(_visible)]) -> Access:
    if access.role != "owner":
        raise OwnerRequired()
    return access


VisibleInstance = Annotated[Access, Depends(_visible)]
OwnedInstance = Annotated[Access, Depends(_owned)]
