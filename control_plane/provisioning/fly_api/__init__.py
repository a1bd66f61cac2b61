"""An async client for the Fly Machines API (https://api.machines.dev), over httpx.

The contract is the public OpenAPI description (``tests/fakes/fly-machines-openapi.json``, a
verbatim copy of superfly/docs ``api/machines/openapi.json``). The client is deliberately thin: one
method per endpoint the control plane uses, every reply parsed into a small validated model, and
every failure translated at one boundary (:meth:`FlyMachinesClient._request`) into a subclass of
:class:`FlyError`.

Rules it follows (see ``PITFALLS.md``, "Fly Machines API"):

- **Never blind-retry a create.** Only Create App carries an ``idempotency_key``; other creates
  (volume, machine, IP, snapshot) are sent once. A transport failure after the request was sent is
  raised as :class:`FlyUnavailable` / :class:`FlyTimeout` with ``maybe_applied=True``; the caller
  reconciles by listing (e.g. :meth:`list_machines` by metadata) before trying again.
- **Idempotent reads retry** (5xx, 429 with ``Retry-After``, connection failures), bounded.
- ``/wait`` takes a timeout of 1-60 s and answers 408 when it expires: loop until the overall
  deadline; waiting for ``stopped`` needs the machine version (superfly/flyctl#1751).
- ``/stop`` is sent with a JSON body (``{}`` at least): no body can give a 400 (superfly/docs#2187).
- App names are global: a 422 ``name_taken`` on Create App is followed by a GET that must show the
  app in our organization before we treat it as ours.
- The API token is never logged, never put in an exception and never in ``repr``.

The package, one job a module: :mod:`.errors` the :class:`FlyError` tree, :mod:`.models` the reply
models, :mod:`.client` the client and its one boundary. Import the names from here.
"""

from control_plane.provisioning.fly_api.client import DEFAULT_BASE_URL, FlyMachinesClient
from control_plane.provisioning.fly_api.errors import (
    FlyAuthError,
    FlyBadRequest,
    FlyCapacity,
    FlyConflict,
    FlyError,
    FlyNameTaken,
    FlyNotFound,
    FlyPreconditionFailed,
    FlyProtocolError,
    FlyRateLimited,
    FlyServerError,
    FlyTimeout,
    FlyUnavailable,
    FlyUnhealthy,
    FlyUnprocessable,
)
from control_plane.provisioning.fly_api.models import (
    FlyApp,
    FlyCheckStatus,
    FlyIPAssignment,
    FlyLease,
    FlyMachine,
    FlySnapshot,
    FlyVolume,
    FlyWaitResult,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "FlyApp",
    "FlyAuthError",
    "FlyBadRequest",
    "FlyCapacity",
    "FlyCheckStatus",
    "FlyConflict",
    "FlyError",
    "FlyIPAssignment",
    "FlyLease",
    "FlyMachine",
    "FlyMachinesClient",
    "FlyNameTaken",
    "FlyNotFound",
    "FlyPreconditionFailed",
    "FlyProtocolError",
    "FlyRateLimited",
    "FlyServerError",
    "FlySnapshot",
    "FlyTimeout",
    "FlyUnavailable",
    "FlyUnhealthy",
    "FlyUnprocessable",
    "FlyVolume",
    "FlyWaitResult",
]
