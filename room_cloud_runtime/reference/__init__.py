"""A small ASGI app shaped like the Room's API: for tests, the demo, benchmarks and the Fly image.

It is not the Room, and not part of ``room_cloud_runtime``'s public API. It answers the routes the
runtime stack and the dashboard care about with the Room's shapes (``{"error", "code"}`` errors,
the local handshake, ``/ws`` live events), keeps its state in memory and, given ``data_dir``, in an
atomically written ``room.json`` so a Fly volume keeps it across restarts.

Two ways in, as in the Room:

- **local mode** (no principal in ``scope["state"]``): a loopback client learns the local token
  from ``GET /api/auth/handshake``; every other ``/api/`` route but ``/api/status`` and ``/ws``
  need it as ``Authorization: Bearer`` (``/ws`` also takes ``?token=``, since browsers cannot
  set headers on a WebSocket).
- **behind the cloud stack**: the stack has authenticated and authorised the request and put a
  :class:`~room_cloud_runtime._scope.Principal` in the scope; the app trusts it, records its
  subject on writes and refuses the handshake.

Modules: ``store`` (state and its snapshot), ``events`` (the live-event hub), ``local_auth``
(local mode's token and loopback checks), ``bodies`` (request input), ``ws_protocol`` (``/ws``),
``dashboard`` (the placeholder page) and ``app`` (the routes and ``create_room_app``).
"""

from .app import create_room_app
from .store import SNAPSHOT_NAME, ApiError

__all__ = ["SNAPSHOT_NAME", "ApiError", "create_room_app"]
