"""Request and response bodies of ``/api/cloud/*``. Inputs forbid unknown fields and are bounded;
outputs never carry credentials, provider ids or billing ids."""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    field_validator,
)

from control_plane.instances.credentials import validate_credentials

NAME_MAX = 60
GOAL_MAX = 2000
# A Stripe Checkout Session id; Stripe's are ~66 characters.
SESSION_ID_PATTERN = r"^cs_[A-Za-z0-9_]{1,250}$"
_CHOICE_PATTERN = r"^[A-Za-z0-9_-]{1,32}$"


def _no_controls(value: str, *, allow_newlines: bool) -> str:
    for char in value:
        if allow_newlines and char in "\n\r\t":
            continue
        if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            raise ValueError("must not contain control or invisible characters")
    return value


def _name(value: str) -> str:
    value = _no_controls(value.strip(), allow_newlines=False)
    if not 1 <= len(value) <= NAME_MAX:
        raise ValueError(f"must be 1-{NAME_MAX} characters after trimming")
    return value


def _goal(value: str | None) -> str | None:
    if value is None:
        return None
    value = _no_controls(value.strip(), allow_newlines=True)
    if len(value) > GOAL_MAX:
        raise ValueError(f"must be at most {GOAL_MAX} characters")
    return value or None


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class InstanceCreateIn(_In):
    # Raw length caps come first so an oversized value is refused before any work on it.
    name: Annotated[str, StringConstraints(max_length=NAME_MAX * 4), AfterValidator(_name)]
    tier: Annotated[str, StringConstraints(pattern=_CHOICE_PATTERN)]
    region: Annotated[str, StringConstraints(pattern=_CHOICE_PATTERN)]
    goal: Annotated[
        str | None, StringConstraints(max_length=GOAL_MAX * 2), AfterValidator(_goal)
    ] = None
    credentials: dict[str, Any] | None = Field(default=None, max_length=64)

    @field_validator("credentials")
    @classmethod
    def _credentials(cls, value: dict[str, Any] | None) -> dict[str, str] | None:
        if value is None:
            return None
        return validate_credentials(value) or None

    def __repr__(self) -> str:  # never show the keys
        return f"InstanceCreateIn(name={self.name!r}, tier={self.tier!r}, region={self.region!r})"

    __str__ = __repr__


class CheckoutConfirmIn(_In):
    session_id: Annotated[str, StringConstraints(pattern=SESSION_ID_PATTERN)] | None = None


class MemberIn(_In):
    email: Annotated[EmailStr, StringConstraints(max_length=254)]


class InviteAcceptIn(_In):
    token: Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class RefreshTokenIn(_In):
    token: Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class InstanceOut(BaseModel):
    id: str
    name: str
    goal: str | None
    tier: str
    region: str
    status: str
    step: str | None
    error: str | None
    url: str | None
    role: Literal["owner", "member"]
    runtimeKind: Literal["reference", "quoroom"]
    createdAt: datetime
    updatedAt: datetime


class InstanceCreatedOut(BaseModel):
    instance: InstanceOut
    checkout_url: str | None


class InstancesOut(BaseModel):
    instances: list[InstanceOut]


class EventOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    kind: str
    from_: str | None = Field(serialization_alias="from", validation_alias="from")
    to: str | None
    message: str
    at: datetime


class StatusOut(BaseModel):
    status: str
    step: str | None
    error: str | None
    url: str | None
    events: list[EventOut]
    updatedAt: datetime


class MemberOut(BaseModel):
    id: str
    #: ``None`` for a member looking at someone else: only the owner sees the invitees' addresses.
    email: str | None
    status: Literal["pending", "active"]
    role: Literal["member"] = "member"
    createdAt: datetime


class MembersOut(BaseModel):
    members: list[MemberOut]


class InvitationOut(BaseModel):
    """A pending invitation, as its invitee sees it (``id`` is the membership's)."""

    id: str
    instanceId: str
    instanceName: str
    invitedBy: str | None
    createdAt: datetime


class InvitationsOut(BaseModel):
    invitations: list[InvitationOut]


class RuntimeTokenOut(BaseModel):
    token: str
    expires_at: datetime
    runtime_url: str
    #: Open this to enter the Room: ``{runtime_url}/#launch=<token>`` for the reference Room,
    #: ``{runtime_url}/?token=<token>`` for the real one (its UI reads the query).
    launch_url: str


class RefreshTokenOut(BaseModel):
    ok: Literal[True] = True
    token: str


IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")


class AccessLogEntryOut(BaseModel):
    """One access-log line (issue 15). ``who`` is the address of the person concerned; for
    ``refused`` lines ``reason``, ``address`` and ``count`` say what the runtime refused."""

    id: int
    at: datetime
    kind: str
    who: str | None = None
    network: str | None = None
    region: str | None = None
    user_agent: str | None = Field(default=None, serialization_alias="userAgent")
    reason: str | None = None
    address: str | None = None
    count: int = 1


class AccessLogOut(BaseModel):
    entries: list[AccessLogEntryOut]
    #: The cursor of the next (older) page, or ``None`` on the last one.
    next: int | None = None
    retention_days: int = Field(serialization_alias="retentionDays")


class ReportAcceptedOut(BaseModel):
    ok: Literal[True] = True
    accepted: int
