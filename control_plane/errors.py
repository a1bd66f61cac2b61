"""The control plane's exception root and the ONE table that maps domain errors to HTTP.

Service code raises these; only :func:`install_error_handlers` turns them into responses of the
shape ``{"error": "<message>", "code": "<stable_code>"}``. Other domains (instances, billing,
provisioning) subclass :class:`ControlPlaneError` and add their rows to :data:`ERROR_TABLE`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from control_plane.metrics import metrics_of

logger = logging.getLogger("control_plane.errors")


class ControlPlaneError(Exception):
    """Root of every error the control plane raises on purpose.

    ``message`` is safe to show to the client; the stable machine code and the status come from
    :data:`ERROR_TABLE`, keyed by class.
    """

    message = "request failed"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)
        if message:
            self.message = message


# -- auth ----------------------------------------------------------------------------------------
class InvalidCredentials(ControlPlaneError):
    message = "invalid email or password"


class EmailNotVerified(ControlPlaneError):
    message = "verify your email address before signing in"


class NotAuthenticated(ControlPlaneError):
    message = "authentication required"


class InvalidAccessToken(ControlPlaneError):
    message = "invalid or expired access token"


class InvalidRefreshToken(ControlPlaneError):
    message = "invalid or expired refresh token"


class RefreshTokenReused(ControlPlaneError):
    message = "refresh token was already used; the session has been revoked"


class InvalidEmailToken(ControlPlaneError):
    message = "invalid, expired or already used link"


class WeakPassword(ControlPlaneError):
    message = "password does not meet the requirements"


class CsrfFailed(ControlPlaneError):
    message = "missing or invalid CSRF token"


class OriginMismatch(ControlPlaneError):
    message = "request origin is not allowed"


class SessionNotFound(ControlPlaneError):
    message = "session not found"


class Throttled(ControlPlaneError):
    message = "too many attempts; try again later"

    def __init__(self, retry_after: int, message: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))


class ThrottleUnavailable(ControlPlaneError):
    message = "rate limiting is unavailable; try again shortly"


# -- Google / OAuth ------------------------------------------------------------------------------
class OAuthNotConfigured(ControlPlaneError):
    message = "Google sign-in is not configured"


class OAuthStateMismatch(ControlPlaneError):
    message = "sign-in request expired or did not come from this browser; start again"


class OAuthProviderError(ControlPlaneError):
    message = "the identity provider refused the sign-in"


class OAuthProviderUnavailable(ControlPlaneError):
    message = "the identity provider could not be reached"


class InvalidIdToken(ControlPlaneError):
    message = "the identity provider's token is invalid"


class OAuthEmailNotVerified(ControlPlaneError):
    message = "the Google account's email address is not verified"


class AccountLinkRefused(ControlPlaneError):
    message = (
        "an account with this email exists but its email is not verified; "
        "sign in with your password and verify it first"
    )


# -- keys ----------------------------------------------------------------------------------------
class KeysNotReady(ControlPlaneError):
    message = "no active signing key"


class KeyDecryptionFailed(ControlPlaneError):
    message = "a signing key could not be decrypted (wrong KEY_ENCRYPTION_KEY?)"


# -- request shape -------------------------------------------------------------------------------
class BodyTooLarge(ControlPlaneError):
    message = "request body too large"


# -- instances, members, runtime tokens ----------------------------------------------------------
class InstanceNotFound(ControlPlaneError):
    message = "instance not found"


class OwnerRequired(ControlPlaneError):
    message = "only the owner of this instance may do this"


class InvalidInstanceState(ControlPlaneError):
    message = "the instance is not in a state that allows this"


class InstanceNotRunning(ControlPlaneError):
    message = "the instance is not running"


class QuotaExceeded(ControlPlaneError):
    message = "you have reached the maximum number of instances"


class UnknownTier(ControlPlaneError):
    message = "unknown tier"


class UnknownRegion(ControlPlaneError):
    message = "unknown region"


class InvalidIdempotencyKey(ControlPlaneError):
    message = "Idempotency-Key must be 1-128 printable ASCII characters without spaces"


class IdempotencyConflict(ControlPlaneError):
    message = "this Idempotency-Key was already used for a different request"


class MemberNotFound(ControlPlaneError):
    message = "member not found"


class CannotInviteOwner(ControlPlaneError):
    message = "the owner of an instance cannot be added as a member"


class MemberLimitReached(ControlPlaneError):
    message = "this instance has the maximum number of members"


class InvalidInviteToken(InvalidEmailToken):
    message = "invalid, expired or already used invitation link"


class InviteWrongAccount(ControlPlaneError):
    message = (
        "this invitation was sent to another email address; sign in with that address to accept it"
    )


class InvitationNotFound(ControlPlaneError):
    message = "invitation not found"


class InvitesThrottled(Throttled):
    message = "too many invitations; try again later"


class CapacityReached(ControlPlaneError):
    """No room for another Room: a region's capacity (``ROOMS_PER_REGION``) or the whole
    fleet's (``ROOMS_TOTAL``). Refused before any checkout, nothing written."""

    message = "there is no capacity for another Room right now"


class RegionFull(CapacityReached):
    message = "this region is full; choose another region"


class FleetFull(CapacityReached):
    message = "no new Rooms can be created right now; try again later"


class InvitationLimitReached(Throttled):
    message = "you have sent the most invitations allowed in a day; try again later"


class RuntimeTokensThrottled(Throttled):
    message = "too many Room tokens for this session; try again shortly"


class InvalidRuntimeToken(ControlPlaneError):
    message = "invalid or expired runtime token"


class RuntimeOriginRefused(ControlPlaneError):
    message = "request origin is not allowed"


# -- access log reports (a runtime reporting its refusals, issue 15) -----------------------------
class InvalidReportCredential(ControlPlaneError):
    message = "invalid report credential for this instance"


class ReportTooLarge(ControlPlaneError):
    message = "the report is too large; send fewer entries per batch"


class ReportInstanceMismatch(ControlPlaneError):
    message = "the report is for another instance"


class ReportReplayed(ControlPlaneError):
    message = "this report batch was already received"


class InvalidReport(ControlPlaneError):
    message = "invalid report"


class ReportTooOld(InvalidReport):
    message = "the report names minutes too old to be accepted"


# -- billing -------------------------------------------------------------------------------------
class BillingDisabled(ControlPlaneError):
    message = "billing is disabled (development)"


class PaymentProviderUnavailable(ControlPlaneError):
    message = "the payment provider could not be reached; try again shortly"


class PaymentProviderError(ControlPlaneError):
    message = "the payment provider refused the request"


class CheckoutMismatch(ControlPlaneError):
    message = "this checkout session does not belong to this instance"


class InvalidWebhookSignature(ControlPlaneError):
    message = "invalid webhook signature"


class InvalidWebhookPayload(ControlPlaneError):
    message = "invalid webhook payload"


#: The one mapping: exception class → (HTTP status, stable code). Looked up along the MRO, so
#: a subclass without its own row uses its parent's.
ERROR_TABLE: dict[type[ControlPlaneError], tuple[int, str]] = {
    ControlPlaneError: (400, "bad_request"),
    InvalidCredentials: (401, "invalid_credentials"),
    EmailNotVerified: (403, "email_not_verified"),
    NotAuthenticated: (401, "not_authenticated"),
    InvalidAccessToken: (401, "invalid_token"),
    InvalidRefreshToken: (401, "invalid_refresh_token"),
    RefreshTokenReused: (401, "refresh_token_reused"),
    InvalidEmailToken: (400, "invalid_token"),
    WeakPassword: (422, "weak_password"),
    CsrfFailed: (403, "csrf_failed"),
    OriginMismatch: (403, "origin_mismatch"),
    SessionNotFound: (404, "session_not_found"),
    Throttled: (429, "throttled"),
    ThrottleUnavailable: (503, "throttle_unavailable"),
    OAuthNotConfigured: (404, "oauth_not_configured"),
    OAuthStateMismatch: (400, "oauth_state_mismatch"),
    OAuthProviderError: (400, "oauth_provider_error"),
    OAuthProviderUnavailable: (502, "oauth_provider_unavailable"),
    InvalidIdToken: (400, "invalid_id_token"),
    OAuthEmailNotVerified: (403, "oauth_email_not_verified"),
    AccountLinkRefused: (409, "account_link_refused"),
    KeysNotReady: (503, "keys_not_ready"),
    KeyDecryptionFailed: (500, "key_decryption_failed"),
    BodyTooLarge: (413, "body_too_large"),
    InstanceNotFound: (404, "not_found"),
    OwnerRequired: (403, "owner_required"),
    InvalidInstanceState: (409, "invalid_state"),
    InstanceNotRunning: (409, "instance_not_running"),
    QuotaExceeded: (409, "quota_exceeded"),
    UnknownTier: (422, "unknown_tier"),
    UnknownRegion: (422, "unknown_region"),
    InvalidIdempotencyKey: (400, "invalid_idempotency_key"),
    IdempotencyConflict: (409, "idempotency_conflict"),
    MemberNotFound: (404, "not_found"),
    CannotInviteOwner: (422, "cannot_invite_owner"),
    MemberLimitReached: (409, "member_limit"),
    InvalidInviteToken: (400, "invalid_token"),
    InviteWrongAccount: (403, "invite_wrong_account"),
    InvitationNotFound: (404, "not_found"),
    RegionFull: (409, "region_full"),
    FleetFull: (409, "capacity_full"),
    CapacityReached: (409, "capacity_full"),
    InvitationLimitReached: (429, "invitation_limit"),
    RuntimeTokensThrottled: (429, "runtime_token_throttled"),
    InvalidRuntimeToken: (401, "invalid_token"),
    RuntimeOriginRefused: (403, "origin_not_allowed"),
    InvalidReportCredential: (401, "invalid_report_credential"),
    ReportTooLarge: (413, "report_too_large"),
    ReportInstanceMismatch: (403, "report_wrong_instance"),
    ReportReplayed: (409, "report_replayed"),
    InvalidReport: (422, "invalid_report"),
    ReportTooOld: (422, "report_too_old"),
    BillingDisabled: (409, "billing_disabled"),
    PaymentProviderUnavailable: (503, "billing_unavailable"),
    PaymentProviderError: (502, "billing_error"),
    CheckoutMismatch: (400, "checkout_mismatch"),
    InvalidWebhookSignature: (400, "invalid_signature"),
    InvalidWebhookPayload: (400, "invalid_payload"),
}

_HTTP_CODES = {
    401: "not_authenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def status_and_code(exc: ControlPlaneError) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        row = ERROR_TABLE.get(cls)
        if row is not None:
            return row
    return 400, "bad_request"  # pragma: no cover - ControlPlaneError is always in the table


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=status, headers=headers)


def response_for(exc: ControlPlaneError) -> JSONResponse:
    status, code = status_and_code(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, Throttled):
        headers["Retry-After"] = str(exc.retry_after)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="quoroom-control"'
    if status >= 500:
        logger.error("%s: %s", code, exc.message)
    return error_response(status, code, exc.message, headers)


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors: list[Any] = list(exc.errors())
    for err in errors:
        if err.get("type") == "json_invalid":
            return error_response(400, "invalid_json", "request body is not valid JSON")
    first = errors[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    field = ".".join(loc) or "body"
    # The message never echoes the input (it could be a password).
    message = f"{field}: {first.get('msg', 'invalid value')}"
    fields = [
        {
            "field": ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body",
            "message": e.get("msg"),
        }
        for e in errors[:20]
    ]
    return JSONResponse(
        {"error": message, "code": "invalid_body", "field": field, "fields": fields},
        status_code=422,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that render every refusal as ``{error, code}``."""

    async def domain(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ControlPlaneError)
        # Counted by code; the auth events among them (failed sign-in, throttled, refresh-token
        # reuse) by event too (control_plane/metrics.py).
        metrics_of(request).refused(status_and_code(exc)[1])
        return response_for(exc)

    async def validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        response = _validation_response(exc)
        metrics_of(request).refused(
            "invalid_json" if response.status_code == 400 else "invalid_body"
        )
        return response

    async def http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        metrics_of(request).refused(code)
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(exc.status_code, code, detail, dict(exc.headers or {}))

    async def unexpected(_request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal error")

    app.add_exception_handler(ControlPlaneError, domain)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http)
    app.add_exception_handler(Exception, unexpected)


def json_dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()
