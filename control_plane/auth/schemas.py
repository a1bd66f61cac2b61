"""Request and response bodies of ``/api/auth/*``. Unknown fields are refused; every string has
a length bound so no input is unbounded."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, EmailStr, Field, StringConstraints

Password = Annotated[str, Field(min_length=1, max_length=1024)]
Token = Annotated[str, StringConstraints(min_length=1, max_length=256, strip_whitespace=True)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=100, strip_whitespace=True)]
Email = Annotated[EmailStr, Field(max_length=254)]
#: ``cookie`` (browsers: HttpOnly cookies, tokens never in the body) or ``body`` (non-browser
#: clients: tokens in the JSON body, used as ``Authorization: Bearer``).
Transport = Literal["cookie", "body"]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=1024)


class SignupIn(_In):
    email: Email
    password: Password
    name: Name | None = None


class LoginIn(_In):
    email: Email
    password: Password
    transport: Transport = "cookie"


class RefreshIn(_In):
    refresh_token: Token | None = None


class LogoutIn(_In):
    refresh_token: Token | None = None


class EmailIn(_In):
    email: Email


class TokenIn(_In):
    token: Token


class ResetPasswordIn(_In):
    token: Token
    password: Password


class OkOut(BaseModel):
    ok: bool = True
    message: str | None = None


class UserOut(BaseModel):
    id: str
    email: str
    email_verified: bool
    name: str | None
    created_at: datetime
    has_password: bool
    identities: list[str]


class TokensOut(BaseModel):
    """A signed-in answer. ``access_token``/``refresh_token`` only with ``transport: body``;
    ``csrf_token`` (also in the ``qr_csrf`` cookie) only with cookies."""

    ok: bool = True
    user: UserOut
    session_id: str
    token_type: Literal["Bearer"] = "Bearer"  # noqa: S105 - a scheme name
    expires_in: int
    access_token: str | None = None
    refresh_token: str | None = None
    csrf_token: str | None = None


class SessionOut(BaseModel):
    id: str
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    method: str
    user_agent: str | None
    ip_address: str | None
    current: bool


class SessionsOut(BaseModel):
    sessions: list[SessionOut]


class RevokedOut(BaseModel):
    ok: bool = True
    revoked: int
