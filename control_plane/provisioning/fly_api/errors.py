"""The errors of the Fly Machines API client: one root, :class:`FlyError`, and a subclass per
kind of failure, carrying its data (``status_code``, ``retry_after``, ``maybe_applied``,
``checks``).

The client translates every failure into one of these at one boundary
(:meth:`~control_plane.provisioning.fly_api.client.FlyMachinesClient._request`); see there for the
status-code table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for an annotation only: the models import these errors
    from control_plane.provisioning.fly_api.models import FlyCheckStatus

__all__ = [
    "FlyAuthError",
    "FlyBadRequest",
    "FlyCapacity",
    "FlyConflict",
    "FlyError",
    "FlyNameTaken",
    "FlyNotFound",
    "FlyPreconditionFailed",
    "FlyProtocolError",
    "FlyRateLimited",
    "FlyServerError",
    "FlyTimeout",
    "FlyUnavailable",
    "FlyUnhealthy",
    "FlyUnprocessable",
]


class FlyError(Exception):
    """Root of every error this client raises.

    ``status_code`` is the HTTP status (``None`` for transport failures), ``fly_status`` the
    ``status`` field of Fly's ``ErrorResponse`` (e.g. ``name_taken``), ``method``/``path`` the
    request (never its headers or body).
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        fly_status: str | None = None,
        method: str | None = None,
        path: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.fly_status = fly_status
        self.method = method
        self.path = path

    def __str__(self) -> str:
        where = f"{self.method} {self.path}: " if self.method and self.path else ""
        code = f" (HTTP {self.status_code})" if self.status_code is not None else ""
        return f"{where}{self.message}{code}"


class FlyBadRequest(FlyError):
    """400: Fly refused the request as malformed. A bug on our side; never retried."""


class FlyAuthError(FlyError):
    """401/403: the API token is missing, wrong or lacks access to the org or app."""


class FlyNotFound(FlyError):
    """404: the app, volume or machine does not exist (or is not visible to this token)."""


class FlyConflict(FlyError):
    """409: e.g. ``current_version`` no longer matches, or a lease is held by someone else."""


class FlyPreconditionFailed(FlyError):
    """412 ``failed_precondition: ...``: the machine is not in a state that allows the action
    (e.g. destroying a started machine without ``force``)."""


class FlyCapacity(FlyError):
    """412 (or a capacity ``status``): no room on the host/region, e.g. for a pinned volume.

    Kilo-Org/cloud#388: creating a machine for a volume whose host is full gives 412; the caller
    decides whether to try another region (with a new volume) or retry later. A 412 whose message
    says ``failed_precondition`` is :class:`FlyPreconditionFailed` instead.
    """


class FlyUnprocessable(FlyError):
    """422 other than ``name_taken``."""


class FlyNameTaken(FlyUnprocessable):
    """422 ``name_taken`` on Create App, and the existing app is not provably ours."""


class FlyRateLimited(FlyError):
    """429. ``retry_after`` is the delay Fly asked for in seconds, when it said."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class FlyServerError(FlyError):
    """5xx from Fly. For a write the outcome is unknown: reconcile before retrying."""


class FlyTimeout(FlyError):
    """No answer in time (HTTP timeout, or a wait's overall deadline passed).

    ``maybe_applied`` is true when the request may have reached Fly (a write may have happened).
    """

    def __init__(self, message: str, *, maybe_applied: bool = True, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.maybe_applied = maybe_applied


class FlyUnavailable(FlyError):
    """The connection failed or was dropped before a complete reply.

    ``maybe_applied`` is false only when the connection was never established; a reply lost
    after sending (the "lost response" case) means the write may have happened.
    """

    def __init__(self, message: str, *, maybe_applied: bool = True, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.maybe_applied = maybe_applied


class FlyProtocolError(FlyError):
    """Fly answered 2xx with a body that does not match the contract (missing fields, not JSON)."""


class FlyUnhealthy(FlyError):
    """The machine started but its checks did not all pass before the deadline."""

    def __init__(self, message: str, *, checks: Sequence[FlyCheckStatus] = (), **kw: Any) -> None:
        super().__init__(message, **kw)
        self.checks = tuple(checks)
