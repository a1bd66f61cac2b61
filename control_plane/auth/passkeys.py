"""Passkeys (issue 15, item 2): WebAuthn registration and assertions through py_webauthn.

- **Relying party**: the RP id is ``PUBLIC_URL``'s host and the only origin accepted is
  ``PUBLIC_URL``'s origin (:func:`relying_party`). A host that is an IP address cannot be an RP id
  (WebAuthn §5.1.4: a valid domain string), so passkeys are off there (409
  ``passkeys_unavailable``); ``http://localhost`` works, browsers count it as a secure context.
- **Challenges** (:class:`WebAuthnChallenge`): 256 random bits, single use (one guarded
  ``UPDATE … WHERE used_at IS NULL``, spent *before* the response is verified, so a failed or
  forged attempt burns it too), ``CHALLENGE_TTL`` long, and bound to who asked and what for: the
  signed-in session (registration, step-up), the pending second-factor sign-in, or, for
  passwordless sign-in, a random token in an HttpOnly cookie of the browser that asked. The
  challenge is found from the response's own ``clientDataJSON``, so a challenge of another
  session is told apart from an unknown one, a used one and an expired one.
- **Bounds before parsing**: every base64url field is checked against its own size limit before
  it is decoded, and the client data before it is read as JSON (413 ``passkey_too_large``).
- **Sign counters** (WebAuthn §6.1.1): after the signature is verified, a counter not above the
  stored one (unless both are 0: authenticators without a counter, like synced passkeys) means
  two authenticators hold one key. The regression is recorded on the passkey and the passkey is
  refused from then on (401 ``passkey_counter_regression``): which copy is the clone cannot be
  told, so neither is trusted until the owner removes the passkey and registers it again.
- **Throttling**: an assertion for a known account is a sign-in attempt (the budgets of
  :mod:`control_plane.auth.lockout`, checked before and counted on failure), like a TOTP code.

Nothing here logs a credential's public key, a session id or a cookie token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import HTTPConnection
from starlette.responses import Response
from webauthn import (
    base64url_to_bytes,
    generate_authentication_options,
    generate_registration_options,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import options_to_json_dict
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from control_plane.auth import lockout
from control_plane.auth.devices import KnownDevice
from control_plane.auth.models import User, UserPasskey, WebAuthnChallenge
from control_plane.auth.service import AuthContext
from control_plane.db import new_id, rowcount
from control_plane.errors import ERROR_TABLE, ControlPlaneError
from control_plane.settings import Settings

logger = logging.getLogger("control_plane.auth.passkeys")

#: How long a browser has to answer a challenge.
CHALLENGE_TTL = timedelta(minutes=5)
#: Passkeys per account (each is a row and an entry in every sign-in's allow list).
MAX_PASSKEYS = 10
RP_NAME = "Quoroom"

REGISTER = "register"
SIGN_IN = "sign_in"
SECOND_FACTOR = "second_factor"
STEP_UP = "step_up"

#: Size limits, in decoded bytes, checked on the base64url text before anything is decoded.
#: A "none" attestation of an ES256 key is ~250 bytes; packed or TPM attestations with their
#: certificate chains stay within a few KiB. Client data is ~200 bytes.
MAX_ATTESTATION_OBJECT_BYTES = 8192
MAX_CLIENT_DATA_BYTES = 2048
MAX_AUTHENTICATOR_DATA_BYTES = 1024
MAX_SIGNATURE_BYTES = 1024  # an RSA-4096 signature is 512
MAX_CREDENTIAL_ID_BYTES = 1023  # WebAuthn §5.8.3
MAX_USER_HANDLE_BYTES = 64  # WebAuthn §5.4.3
MAX_PUBLIC_KEY_BYTES = 1024

#: The passwordless sign-in's browser token: HttpOnly, SameSite=Strict, on ``/api/auth`` only.
BROWSER_COOKIE = "qr_passkey"
SECURE_BROWSER_COOKIE = "__Secure-qr_passkey"
BROWSER_COOKIE_PATH = "/api/auth"


# -- errors (their rows join the one table in control_plane/errors.py) --------------------------


class PasskeyError(ControlPlaneError):
    """Root of the refusals of a WebAuthn response (the route commits what was recorded)."""

    message = "the passkey could not be verified"


class PasskeyInvalid(PasskeyError):
    message = "the passkey's answer is not valid"


class PasskeyTooLarge(PasskeyError):
    message = "the passkey's answer is too large"


class PasskeyOriginMismatch(PasskeyError):
    message = "the passkey answered for another site"


class PasskeyChallengeInvalid(PasskeyError):
    message = "this passkey request is unknown; try again"


class PasskeyChallengeMismatch(PasskeyError):
    message = "this passkey request was started in another session or for something else"


class PasskeyChallengeExpired(PasskeyError):
    message = "this passkey request expired; try again"


class PasskeyReplayed(PasskeyError):
    message = "this passkey answer was already used"


class PasskeyUnknown(PasskeyError):
    message = "this passkey is not registered to an account here"


class PasskeyCounterRegression(PasskeyError):
    message = (
        "this passkey was refused: its signature counter went backwards, a sign of a copied "
        "authenticator; remove it and register it again"
    )


class PasskeyAlreadyRegistered(ControlPlaneError):
    message = "this passkey is already registered"


class PasskeyLimitReached(ControlPlaneError):
    message = f"an account can have at most {MAX_PASSKEYS} passkeys; remove one first"


class PasskeyNotFound(ControlPlaneError):
    message = "passkey not found"


class NoPasskeys(ControlPlaneError):
    message = "this account has no passkey"


class PasskeysUnavailable(ControlPlaneError):
    message = "passkeys need a public URL whose host is a domain name (not an IP address)"


ERROR_TABLE.update(
    {
        PasskeyError: (401, "passkey_invalid"),
        PasskeyInvalid: (401, "passkey_invalid"),
        PasskeyTooLarge: (413, "passkey_too_large"),
        PasskeyOriginMismatch: (401, "passkey_origin_mismatch"),
        PasskeyChallengeInvalid: (401, "passkey_challenge_invalid"),
        PasskeyChallengeMismatch: (401, "passkey_challenge_mismatch"),
        PasskeyChallengeExpired: (401, "passkey_challenge_expired"),
        PasskeyReplayed: (401, "passkey_replayed"),
        PasskeyUnknown: (401, "passkey_unknown"),
        PasskeyCounterRegression: (401, "passkey_counter_regression"),
        PasskeyAlreadyRegistered: (409, "passkey_already_registered"),
        PasskeyLimitReached: (409, "passkey_limit"),
        PasskeyNotFound: (404, "not_found"),
        NoPasskeys: (409, "no_passkeys"),
        PasskeysUnavailable: (409, "passkeys_unavailable"),
    }
)


# -- the relying party ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelyingParty:
    rp_id: str
    origin: str
    name: str = RP_NAME


def relying_party(settings: Settings) -> RelyingParty:
    """RP id and origin from ``PUBLIC_URL``; :class:`PasskeysUnavailable` for an IP host."""
    host = urlsplit(settings.public_url).hostname
    if not host:  # pragma: no cover - the settings validate PUBLIC_URL
        raise PasskeysUnavailable()
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return RelyingParty(rp_id=host, origin=settings.public_origin)
    raise PasskeysUnavailable()


# -- bindings ------------------------------------------------------------------------------------


def _bind(kind: str, value: str) -> bytes:
    return hashlib.sha256(f"quoroom-webauthn\0{kind}\0{value}".encode()).digest()


def bind_session(session_id: str) -> bytes:
    return _bind("session", session_id)


def bind_pending(pending_id: str) -> bytes:
    return _bind("pending", pending_id)


def bind_browser(token: str) -> bytes:
    return _bind("browser", token)


def browser_cookie_name(settings: Settings) -> str:
    return SECURE_BROWSER_COOKIE if settings.secure_cookies else BROWSER_COOKIE


def browser_token_of(request: HTTPConnection, settings: Settings) -> str | None:
    raw = request.cookies.get(browser_cookie_name(settings))
    return raw if raw and len(raw) <= 128 else None


def set_browser_cookie(response: Response, settings: Settings, token: str) -> None:
    response.set_cookie(
        browser_cookie_name(settings),
        token,
        max_age=int(CHALLENGE_TTL.total_seconds()),
        path=BROWSER_COOKIE_PATH,
        secure=settings.secure_cookies,
        httponly=True,
        samesite="strict",
    )


def clear_browser_cookie(response: Response, settings: Settings) -> None:
    response.delete_cookie(
        browser_cookie_name(settings),
        path=BROWSER_COOKIE_PATH,
        secure=settings.secure_cookies,
        httponly=True,
        samesite="strict",
    )


def new_browser_token() -> str:
    return secrets.token_urlsafe(32)


# -- challenges ----------------------------------------------------------------------------------


async def new_challenge(
    db: AsyncSession, *, purpose: str, binding: bytes, user_id: str | None, now: datetime
) -> bytes:
    """A fresh challenge bound to ``binding`` for ``purpose`` (flushed, not committed)."""
    # Challenges that ended are dropped here: the table stays bounded by what is live.
    await db.execute(
        delete(WebAuthnChallenge)
        .where(WebAuthnChallenge.expires_at <= now)
        .execution_options(synchronize_session=False)
    )
    challenge = secrets.token_bytes(32)
    db.add(
        WebAuthnChallenge(
            id=new_id(),
            challenge=challenge,
            purpose=purpose,
            binding_hash=binding,
            user_id=user_id,
            created_at=now,
            expires_at=now + CHALLENGE_TTL,
        )
    )
    await db.flush()
    return challenge


async def spend_challenge(
    db: AsyncSession, challenge: bytes, *, purpose: str, binding: bytes, now: datetime
) -> WebAuthnChallenge:
    """Spend the challenge a response names, or raise why it cannot be used."""
    row = await db.scalar(select(WebAuthnChallenge).where(WebAuthnChallenge.challenge == challenge))
    if row is None:
        raise PasskeyChallengeInvalid()
    if row.purpose != purpose or not hmac.compare_digest(bytes(row.binding_hash), binding):
        raise PasskeyChallengeMismatch()
    if row.used_at is not None:
        raise PasskeyReplayed()
    if row.expires_at <= now:
        raise PasskeyChallengeExpired()
    spent = await db.execute(
        update(WebAuthnChallenge)
        .where(WebAuthnChallenge.id == row.id, WebAuthnChallenge.used_at.is_(None))
        .values(used_at=now)
        .execution_options(synchronize_session=False)
    )
    if rowcount(spent) != 1:
        raise PasskeyReplayed()
    return row


# -- reading a response before py_webauthn does ----------------------------------------------------


def _b64_limit(nbytes: int) -> int:
    """The base64url length of ``nbytes`` bytes, padded (what a client may send at most)."""
    return 4 * ((nbytes + 2) // 3)


def _field(data: dict[str, Any], name: str, max_bytes: int, *, required: bool = True) -> str:
    value = data.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise PasskeyInvalid(f"the passkey's answer has no {name}")
    if len(value) > _b64_limit(max_bytes):
        raise PasskeyTooLarge(f"{name} is larger than {max_bytes} bytes")
    return value


def _decode(value: str) -> bytes:
    try:
        return base64url_to_bytes(value)
    except (ValueError, TypeError) as exc:
        raise PasskeyInvalid() from exc


@dataclass(frozen=True, slots=True)
class ReadResponse:
    """A credential as the browser sent it, bounded, with what we read from it ourselves."""

    credential: dict[str, Any]
    raw_id: bytes
    challenge: bytes
    user_handle: bytes | None
    #: The client data named our origin, outside any frame.
    same_origin: bool

    def check_origin(self) -> None:
        if not self.same_origin:
            raise PasskeyOriginMismatch()


def read_response(
    settings: Settings, credential: dict[str, Any], *, registration: bool
) -> ReadResponse:
    """Check every field's size, then read the client data's challenge and origin (the rest is
    py_webauthn's). Raises :class:`PasskeyTooLarge` or :class:`PasskeyInvalid`; the origin is
    checked by :meth:`ReadResponse.check_origin` once the attempt counts against an account."""
    rp = relying_party(settings)
    response = credential.get("response")
    if not isinstance(response, dict):
        raise PasskeyInvalid("the passkey's answer has no response")
    cred_id = _field(credential, "id", MAX_CREDENTIAL_ID_BYTES)
    raw_id = _field(credential, "rawId", MAX_CREDENTIAL_ID_BYTES)
    client_data = _field(response, "clientDataJSON", MAX_CLIENT_DATA_BYTES)
    bounded: dict[str, Any] = {"clientDataJSON": client_data}
    handle: bytes | None = None
    if registration:
        bounded["attestationObject"] = _field(
            response, "attestationObject", MAX_ATTESTATION_OBJECT_BYTES
        )
        transports = response.get("transports")
        if isinstance(transports, list):
            bounded["transports"] = [t for t in transports[:8] if isinstance(t, str)]
    else:
        bounded["authenticatorData"] = _field(
            response, "authenticatorData", MAX_AUTHENTICATOR_DATA_BYTES
        )
        bounded["signature"] = _field(response, "signature", MAX_SIGNATURE_BYTES)
        user_handle = _field(response, "userHandle", MAX_USER_HANDLE_BYTES, required=False)
        if user_handle:
            bounded["userHandle"] = user_handle
            handle = _decode(user_handle)
    try:
        data = json.loads(_decode(client_data))
    except (ValueError, RecursionError) as exc:
        raise PasskeyInvalid("clientDataJSON is not JSON") from exc
    if not isinstance(data, dict):
        raise PasskeyInvalid("clientDataJSON is not an object")
    origin, challenge = data.get("origin"), data.get("challenge")
    if not isinstance(challenge, str) or not 0 < len(challenge) <= 128:
        raise PasskeyInvalid("clientDataJSON has no challenge")
    clean = {
        "id": cred_id,
        "rawId": raw_id,
        "type": credential.get("type"),
        "response": bounded,
    }
    attachment = credential.get("authenticatorAttachment")
    if attachment in ("platform", "cross-platform"):
        clean["authenticatorAttachment"] = attachment
    # Only our own origin, never inside another site's frame (the pages forbid framing).
    same_origin = origin == rp.origin and data.get("crossOrigin") is not True
    return ReadResponse(clean, _decode(raw_id), _decode(challenge), handle, same_origin)


# -- registration --------------------------------------------------------------------------------


async def passkeys_of(db: AsyncSession, user_id: str) -> list[UserPasskey]:
    rows = await db.scalars(
        select(UserPasskey).where(UserPasskey.user_id == user_id).order_by(UserPasskey.created_at)
    )
    return list(rows)


async def count_passkeys(db: AsyncSession, user_id: str) -> int:
    count = await db.scalar(
        select(func.count()).select_from(UserPasskey).where(UserPasskey.user_id == user_id)
    )
    return int(count or 0)


def _descriptor(passkey: UserPasskey) -> PublicKeyCredentialDescriptor:
    transports: list[AuthenticatorTransport] = []
    for name in (passkey.transports or "").split(","):
        try:
            transports.append(AuthenticatorTransport(name))
        except ValueError:
            continue
    return PublicKeyCredentialDescriptor(id=bytes(passkey.credential_id), transports=transports)


def _timeout_ms() -> int:
    return int(CHALLENGE_TTL.total_seconds() * 1000)


async def registration_options(
    db: AsyncSession, settings: Settings, user: User, session_id: str, now: datetime
) -> dict[str, Any]:
    """``PublicKeyCredentialCreationOptions`` (JSON) for a new passkey of ``user``: a
    discoverable credential (passwordless sign-in needs it), no attestation, the account's
    passkeys excluded."""
    rp = relying_party(settings)
    existing = await passkeys_of(db, user.id)
    if len(existing) >= MAX_PASSKEYS:
        raise PasskeyLimitReached()
    challenge = await new_challenge(
        db, purpose=REGISTER, binding=bind_session(session_id), user_id=user.id, now=now
    )
    options = generate_registration_options(
        rp_id=rp.rp_id,
        rp_name=rp.name,
        user_name=user.email,
        # The user handle is the account's random id, never the address (WebAuthn §14.6.1).
        user_id=user.id.encode(),
        user_display_name=user.name or user.email,
        challenge=challenge,
        timeout=_timeout_ms(),
        attestation=AttestationConveyancePreference.NONE,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.REQUIRED,
            require_resident_key=True,
            user_verification=UserVerificationRequirement.PREFERRED,
        ),
        exclude_credentials=[_descriptor(p) for p in existing],
    )
    return dict(options_to_json_dict(options))


async def register(
    db: AsyncSession,
    settings: Settings,
    user: User,
    session_id: str,
    credential: dict[str, Any],
    name: str | None,
    now: datetime,
) -> UserPasskey:
    """Verify a registration response for the challenge this session asked for and store the
    passkey. The challenge is spent first (the caller commits on refusal too)."""
    rp = relying_party(settings)
    read = read_response(settings, credential, registration=True)
    read.check_origin()
    await spend_challenge(
        db, read.challenge, purpose=REGISTER, binding=bind_session(session_id), now=now
    )
    try:
        verified = verify_registration_response(
            credential=read.credential,
            expected_challenge=read.challenge,
            expected_rp_id=rp.rp_id,
            expected_origin=rp.origin,
        )
    # py_webauthn raises its own errors for what it checks, but a malformed CBOR structure or
    # key can surface from cbor2 or cryptography as anything; a client's blob that does not
    # verify is a refusal, never a 500.
    except Exception as exc:
        raise PasskeyInvalid() from exc
    if (
        len(verified.credential_id) > MAX_CREDENTIAL_ID_BYTES
        or len(verified.credential_public_key) > MAX_PUBLIC_KEY_BYTES
    ):
        raise PasskeyTooLarge()
    taken = await db.scalar(
        select(UserPasskey.id).where(UserPasskey.credential_id == verified.credential_id)
    )
    if taken is not None:
        raise PasskeyAlreadyRegistered()
    count = await count_passkeys(db, user.id)
    if count >= MAX_PASSKEYS:
        raise PasskeyLimitReached()
    transports = credential.get("response", {}).get("transports")
    known = [t for t in transports or [] if t in {x.value for x in AuthenticatorTransport}]
    passkey = UserPasskey(
        id=new_id(),
        user_id=user.id,
        credential_id=verified.credential_id,
        public_key=verified.credential_public_key,
        sign_count=verified.sign_count,
        name=name or f"Passkey {count + 1}",
        aaguid=verified.aaguid,
        transports=",".join(known)[:128] or None,
        backed_up=verified.credential_backed_up,
        created_at=now,
    )
    db.add(passkey)
    await db.flush()
    return passkey


# -- assertions ----------------------------------------------------------------------------------


async def authentication_options(
    db: AsyncSession,
    settings: Settings,
    *,
    purpose: str,
    binding: bytes,
    user: User | None,
    now: datetime,
) -> dict[str, Any]:
    """``PublicKeyCredentialRequestOptions`` (JSON). With a ``user``, its passkeys are the
    allow list (second factor, step-up); without, the browser offers its discoverable
    credentials for this RP (passwordless sign-in, which also requires user verification)."""
    rp = relying_party(settings)
    allowed: list[PublicKeyCredentialDescriptor] = []
    if user is not None:
        passkeys = await passkeys_of(db, user.id)
        if not passkeys:
            raise NoPasskeys()
        allowed = [_descriptor(p) for p in passkeys]
    challenge = await new_challenge(
        db, purpose=purpose, binding=binding, user_id=user.id if user else None, now=now
    )
    options = generate_authentication_options(
        rp_id=rp.rp_id,
        challenge=challenge,
        timeout=_timeout_ms(),
        allow_credentials=allowed,
        user_verification=(
            UserVerificationRequirement.REQUIRED
            if user is None
            else UserVerificationRequirement.PREFERRED
        ),
    )
    return dict(options_to_json_dict(options))


async def passkey_by_credential(db: AsyncSession, raw_id: bytes) -> tuple[UserPasskey, User] | None:
    if not raw_id or len(raw_id) > MAX_CREDENTIAL_ID_BYTES:
        return None
    row = (
        await db.execute(
            select(UserPasskey, User)
            .join(User, User.id == UserPasskey.user_id)
            .where(UserPasskey.credential_id == raw_id)
        )
    ).first()
    return None if row is None else (row[0], row[1])


async def _record_regression(db: AsyncSession, passkey: UserPasskey, now: datetime) -> None:
    await db.execute(
        update(UserPasskey)
        .where(UserPasskey.id == passkey.id, UserPasskey.counter_regressed_at.is_(None))
        .values(counter_regressed_at=now)
        .execution_options(synchronize_session=False)
    )
    # The ids only: no key, no counter values beyond what the owner sees on the page.
    logger.warning(
        "passkey %s of user %s refused: signature counter regression (cloned authenticator?)",
        passkey.id,
        passkey.user_id,
    )


async def _check_assertion(
    db: AsyncSession,
    rp: RelyingParty,
    read: ReadResponse,
    passkey: UserPasskey,
    *,
    require_user_verification: bool,
    now: datetime,
) -> None:
    """Verify the signature, then the counter; store the new counter (one guarded UPDATE)."""
    if passkey.counter_regressed_at is not None:
        raise PasskeyCounterRegression()
    try:
        verified = verify_authentication_response(
            credential=read.credential,
            expected_challenge=read.challenge,
            expected_rp_id=rp.rp_id,
            expected_origin=rp.origin,
            credential_public_key=bytes(passkey.public_key),
            # 0: py_webauthn's own counter check is skipped so that a regression is told apart
            # (and recorded) below, only once the signature is known to be genuine.
            credential_current_sign_count=0,
            require_user_verification=require_user_verification,
        )
    except Exception as exc:  # as in register(): a refusal, never a 500
        raise PasskeyInvalid() from exc
    new, old = verified.new_sign_count, int(passkey.sign_count)
    if (new > 0 or old > 0) and new <= old:
        await _record_regression(db, passkey, now)
        raise PasskeyCounterRegression()
    stored = await db.execute(
        update(UserPasskey)
        .where(
            UserPasskey.id == passkey.id,
            UserPasskey.counter_regressed_at.is_(None),
            UserPasskey.sign_count < new if new > 0 else UserPasskey.sign_count == 0,
        )
        .values(sign_count=new, last_used_at=now, backed_up=verified.credential_backed_up)
        .execution_options(synchronize_session=False)
    )
    if rowcount(stored) != 1:  # a concurrent assertion with a counter at least as high
        await _record_regression(db, passkey, now)
        raise PasskeyCounterRegression()


@dataclass(frozen=True, slots=True)
class Caller:
    """Where an assertion comes from: the client address and its known-device cookie."""

    address: str
    device: KnownDevice | None


async def verify_for_user(
    db: AsyncSession,
    ctx: AuthContext,
    user: User,
    credential: dict[str, Any],
    *,
    purpose: str,
    binding: bytes,
    now: datetime,
    who: Caller,
) -> UserPasskey:
    """An assertion from one of ``user``'s passkeys (second factor, step-up). Throttled as a
    sign-in attempt: the budgets are checked first, and any refusal counts as a failure."""
    budget = lockout.requester(ctx.devices, user.email, who.address, who.device)
    await lockout.before_sign_in(ctx.throttle, budget)
    try:
        read = read_response(ctx.settings, credential, registration=False)
        found = await passkey_by_credential(db, read.raw_id)
        if found is None or found[0].user_id != user.id:
            raise PasskeyUnknown()
        read.check_origin()
        await spend_challenge(db, read.challenge, purpose=purpose, binding=binding, now=now)
        await _check_assertion(
            db,
            relying_party(ctx.settings),
            read,
            found[0],
            require_user_verification=False,
            now=now,
        )
    except PasskeyError:
        await lockout.failed_sign_in(ctx.throttle, budget)
        raise
    return found[0]


async def verify_passwordless(
    db: AsyncSession,
    ctx: AuthContext,
    credential: dict[str, Any],
    *,
    binding: bytes,
    now: datetime,
    who: Caller,
) -> tuple[UserPasskey, User]:
    """A passwordless sign-in: the discoverable credential names the account. User
    verification is required (the passkey is then both factors: possession plus the device's
    PIN or biometric). Unknown credentials spend the address's sign-in budget."""
    read = read_response(ctx.settings, credential, registration=False)
    found = await passkey_by_credential(db, read.raw_id)
    if found is None:
        await ctx.throttle.hit("login_address", who.address)
        raise PasskeyUnknown()
    passkey, user = found
    budget = lockout.requester(ctx.devices, user.email, who.address, who.device)
    await lockout.before_sign_in(ctx.throttle, budget)
    try:
        if read.user_handle is not None and not hmac.compare_digest(
            read.user_handle, user.id.encode()
        ):
            raise PasskeyInvalid("the passkey belongs to another account")
        read.check_origin()
        await spend_challenge(db, read.challenge, purpose=SIGN_IN, binding=binding, now=now)
        await _check_assertion(
            db,
            relying_party(ctx.settings),
            read,
            passkey,
            require_user_verification=True,
            now=now,
        )
    except PasskeyError:
        await lockout.failed_sign_in(ctx.throttle, budget)
        raise
    return passkey, user


# -- naming and removal --------------------------------------------------------------------------


async def owned_passkey(db: AsyncSession, user_id: str, passkey_id: str) -> UserPasskey:
    row = await db.scalar(
        select(UserPasskey).where(UserPasskey.id == passkey_id, UserPasskey.user_id == user_id)
    )
    if row is None:
        raise PasskeyNotFound()
    return row


async def remove(db: AsyncSession, user_id: str, passkey_id: str) -> None:
    removed = await db.execute(
        delete(UserPasskey)
        .where(UserPasskey.id == passkey_id, UserPasskey.user_id == user_id)
        .execution_options(synchronize_session=False)
    )
    if rowcount(removed) != 1:
        raise PasskeyNotFound()
