"""The errors of the Stripe boundary: one root, ``BillingError``, and subclasses carrying what
the caller needs (status, Stripe's code, request id). Every ``stripe`` exception is translated into
one of these at the boundary (``raise ... from exc``): by the gateway for calls and signatures, by
the webhook translation for payloads."""

from __future__ import annotations

__all__ = [
    "BillingError",
    "BillingNotFound",
    "BillingRejected",
    "BillingReplyError",
    "BillingUnavailable",
    "WebhookPayloadError",
    "WebhookSignatureError",
]


class BillingError(Exception):
    """Root of every error raised by the billing boundary."""


class BillingUnavailable(BillingError):
    """Stripe could not be reached, timed out, rate-limited us or failed (5xx, 409 lock
    conflicts). Safe to retry later with the same idempotency key."""

    def __init__(self, message: str, *, status: int | None = None, request_id: str | None = None):
        super().__init__(message)
        self.status = status
        self.request_id = request_id


class BillingReplyError(BillingUnavailable):
    """Stripe answered 2xx with a body we cannot use (missing or malformed fields)."""


class BillingRejected(BillingError):
    """Stripe refused the request (4xx): bad parameters, bad key, idempotency key reused with
    different parameters. Retrying the same request will not help."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        error_type: str | None = None,
        param: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.error_type = error_type
        self.param = param
        self.request_id = request_id


class BillingNotFound(BillingRejected):
    """The object does not exist (404 ``resource_missing``) — or, for a subscription being
    canceled, no longer accepts the call because it is already canceled."""


class WebhookSignatureError(BillingError):
    """The webhook delivery is not authentic or is too old: answer 400 and process nothing."""


class WebhookPayloadError(BillingError):
    """The webhook is authentic but its payload lacks fields we need or has the wrong shape."""
