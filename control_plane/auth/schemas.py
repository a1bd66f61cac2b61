"""Request and response bodies of ``/api/auth/*``. Unknown fields are refused; every string has
a length bound so no input is unbounded."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, EmailStr, Field, StringConstraints, model_validator

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


#: A TOTP code: six digits (spaces around it are dropped; nothing else is accepted).
TotpCode = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^[0-9]{6}$", max_length=6)
]
#: A recovery code as shown (``xxxx-xxxx-xxxx-xxxx``); dashes, spaces and case are forgiven.
RecoveryCodeText = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=16, max_length=32)
]


class ProofIn(_In):
    """A second factor: a TOTP ``code`` or a ``recovery_code``, exactly one."""

    code: TotpCode | None = None
    recovery_code: RecoveryCodeText | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ProofIn:
        if (self.code is None) == (self.recovery_code is None):
            raise ValueError("give either code or recovery_code")
        return self


class SecondFactorIn(ProofIn):
    """The second step of a sign-in. ``second_factor_token`` for ``transport: body`` clients;
    browsers send the HttpOnly cookie the first step set instead."""

    second_factor_token: Token | None = None


class TotpConfirmIn(_In):
    code: TotpCode


class ChangePasswordIn(_In):
    """``current_password`` is required when the account has a password."""

    current_password: Password | None = None
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
    #: For people: the device named from the User-Agent, the network rather than the address.
    device: str
    network: str | None
    current: bool


class SessionsOut(BaseModel):
    sessions: list[SessionOut]


class RevokedOut(BaseModel):
    ok: bool = True
    revoked: int


class SecondFactorRequiredOut(BaseModel):
    """The first step of a sign-in succeeded; the account asks for its second factor.
    ``second_factor_token`` only with ``transport: body`` (browsers get an HttpOnly cookie)."""

    ok: bool = True
    second_factor_required: Literal[True] = True
    methods: list[str]
    expires_in: int
    second_factor_token: str | None = None


class SecondFactorStatusOut(BaseModel):
    totp_enabled: bool
    recovery_codes_left: int
    #: When this session last proved the factor, and until when that allows sensitive actions.
    verified_at: datetime | None
    step_up_until: datetime | None


class TotpSetupOut(BaseModel):
    """The new secret, as a QR code (SVG, drawn by segno) and as text; shown until confirmed."""

    secret: str
    otpauth_uri: str
    #: An SVG document, and the same as a ``data:`` URI for an ``<img>``.
    qr_svg: str
    qr_data_uri: str


class RecoveryCodesOut(BaseModel):
    ok: bool = True
    recovery_codes: list[str]


# -- passkeys (issue 15, item 2) -------------------------------------------------------------------

#: base64url text from a browser's WebAuthn answer. The bound here is only the request body's:
#: each field's own limit is checked before it is decoded (control_plane/auth/passkeys.py), so
#: an oversized attestation or client data is 413 ``passkey_too_large``.
B64Text = Annotated[str, StringConstraints(max_length=65536, pattern=r"^[A-Za-z0-9_-]*={0,2}$")]
PasskeyName = Annotated[str, StringConstraints(min_length=1, max_length=64, strip_whitespace=True)]


class _Browser(BaseModel):
    """What ``PublicKeyCredential.toJSON()`` sends; browsers add fields over time (extensions,
    the public key again), so unknown ones are ignored rather than refused."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class CredentialResponseIn(_Browser):
    client_data_json: B64Text = Field(alias="clientDataJSON")
    attestation_object: B64Text | None = Field(default=None, alias="attestationObject")
    authenticator_data: B64Text | None = Field(default=None, alias="authenticatorData")
    signature: B64Text | None = None
    user_handle: B64Text | None = Field(default=None, alias="userHandle")
    transports: list[Annotated[str, StringConstraints(max_length=32)]] | None = Field(
        default=None, max_length=16
    )


class CredentialIn(_Browser):
    id: B64Text
    raw_id: B64Text = Field(alias="rawId")
    type: Literal["public-key"]
    response: CredentialResponseIn
    authenticator_attachment: Annotated[str, StringConstraints(max_length=32)] | None = Field(
        default=None, alias="authenticatorAttachment"
    )

    def as_webauthn(self) -> dict[str, object]:
        """The credential in WebAuthn's JSON names, as py_webauthn reads it."""
        return self.model_dump(by_alias=True, exclude_none=True)


class PasskeyRegisterIn(_In):
    credential: CredentialIn
    name: PasskeyName | None = None


class PasskeyRenameIn(_In):
    name: PasskeyName


class PasskeyAssertionIn(_In):
    """An assertion; ``second_factor_token`` for ``transport: body`` clients at the second step
    of a sign-in (browsers send the pending sign-in's cookie)."""

    credential: CredentialIn
    second_factor_token: Token | None = None


class PendingIn(_In):
    second_factor_token: Token | None = None


class WebAuthnOptionsOut(BaseModel):
    """``publicKey`` options for ``navigator.credentials.create()`` / ``.get()``, in WebAuthn's
    JSON form (binary values base64url), valid for ``expires_in`` seconds."""

    ok: bool = True
    public_key: dict[str, object]
    expires_in: int


class PasskeyOut(BaseModel):
    id: str
    name: str
    created_at: datetime
    last_used_at: datetime | None
    backed_up: bool
    #: Set when a signature counter went backwards (a copied authenticator): refused since.
    counter_regressed_at: datetime | None


class PasskeysOut(BaseModel):
    passkeys: list[PasskeyOut]


class PasskeyRegisteredOut(BaseModel):
    ok: bool = True
    passkey: PasskeyOut
    #: The account's first second factor: its ten recovery codes, shown once.
    recovery_codes: list[str] | None = None
