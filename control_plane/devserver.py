"""``quoroom-cloud dev``: the main job — the control plane, the provisioning worker and the local
provider in one process with the embedded defaults.

- settings from the environment (``QUOROOM_CP_*``) over development defaults: SQLite and the mail
  outbox under ``./var/``, the local provider, billing disabled unless Stripe keys are set;
- ``PUBLIC_URL`` follows ``--host``/``--port`` unless set (it is the CSRF origin and the base
  of every emailed link, so it must be the address the browser uses);
- migrates, binds the socket, prints the URL once the app is up, and on Ctrl-C (SIGINT) or
  SIGTERM shuts down through the app's lifespan: the worker stops and the local provider stops
  the runtimes it started.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import socket
import sys
from typing import Any, TextIO

from control_plane.settings import ENV_PREFIX, Settings

__all__ = ["DevServer", "bind_socket", "configure", "dev_settings", "run"]


def _url_host(host: str) -> str:
    """The host to put in URLs: a wildcard bind is reached on loopback."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    except ValueError:
        pass
    return host


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket bound to ``host:port`` (``port`` 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY on an accepted connection only when its socket says
    # IPPROTO_TCP, and accepted sockets inherit the listener's. With proto 0, every answer uvicorn
    # writes in two pieces (head, then body) waited for the client's delayed ACK: 40 ms for each
    # request after the first on a kept-alive connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def dev_settings(host: str, port: int, environ: dict[str, str] | None = None) -> Settings:
    """Development settings for a server on ``host:port``; the environment still wins."""
    env = os.environ if environ is None else environ
    overrides: dict[str, Any] = {}
    if f"{ENV_PREFIX}PUBLIC_URL" not in env:
        overrides["public_url"] = f"http://{_url_host(host)}:{port}"
    if f"{ENV_PREFIX}ENV" not in env:
        overrides["env"] = "development"  # `dev` says so explicitly, whatever the PUBLIC_URL
    settings = Settings(**overrides)
    if not settings.development:
        raise SystemExit(
            f"quoroom-cloud dev runs in development only ({ENV_PREFIX}ENV={settings.env}); "
            "use `quoroom-cloud serve` and `quoroom-cloud worker` in production"
        )
    return settings


def _banner(settings: Settings) -> str:
    billing = (
        "Stripe (test keys from the environment)"
        if settings.stripe_secret_key is not None
        else "disabled (development: no STRIPE_SECRET_KEY)"
    )
    mail = "SMTP" if settings.smtp_url is not None else f"outbox {settings.outbox_dir} + console"
    database = settings.resolved_database_url.split("://", 1)[0]
    if database.startswith("sqlite"):
        database = f"SQLite {settings.var_dir / 'control_plane.db'}"
    return "\n".join(
        [
            "",
            f"  Quoroom control plane (development) is up: {settings.public_url}/",
            f"    database  {database}",
            f"    mail      {mail}",
            f"    billing   {billing}",
            f"    provider  {settings.provider} (runtimes on free loopback ports)",
            f"    runtime   {_runtime(settings)}",
            "  Press Ctrl-C to stop (the Rooms it started stop too).",
            "",
        ]
    )


def _runtime(settings: Settings) -> str:
    if settings.runtime_kind == "quoroom":
        return f"quoroom: the real Room ({settings.quoroom_room_cli}) behind the gateway"
    return "reference: the Python reference Room (QUOROOM_CP_RUNTIME_KIND=quoroom: the real one)"


class DevServer:
    """uvicorn on a pre-bound socket (so ``--port 0`` knows its URL before the app is built)
    that prints the banner once the lifespan has started."""

    def __init__(self, settings: Settings, sock: socket.socket, *, out: TextIO | None = None):
        import uvicorn

        from control_plane.app import create_app

        self.settings = settings
        self.socket = sock
        self.out = out or sys.stdout
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app,
            lifespan="on",
            proxy_headers=False,
            server_header=False,
            access_log=False,
            log_level="info",
            log_config=None,  # the CLI set up the logs (control_plane/logs.py)
            timeout_graceful_shutdown=10,
        )
        banner = _banner(settings)
        out_stream = self.out

        class _Server(uvicorn.Server):
            async def startup(self, sockets: list[socket.socket] | None = None) -> None:
                await super().startup(sockets)
                if self.started:
                    print(banner, file=out_stream, flush=True)

        self.server = _Server(config)

    async def serve(self) -> None:
        await self.server.serve(sockets=[self.socket])


async def _migrate(settings: Settings) -> str | None:
    from control_plane.migrations import migrate

    return await migrate(settings)


def run(args: argparse.Namespace) -> int:
    from control_plane.provisioning.runner import check_provider_settings

    settings = dev_settings(args.host, args.port)
    check_provider_settings(settings)  # a SettingsError names the variable (exit status 2)
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    if args.port == 0 and f"{ENV_PREFIX}PUBLIC_URL" not in os.environ:
        settings = dev_settings(args.host, sock.getsockname()[1])
    revision = asyncio.run(_migrate(settings))
    print(f"database at revision {revision}", flush=True)
    with sock:
        try:
            asyncio.run(DevServer(settings, sock).serve())
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after shutdown
            pass
    print("stopped", flush=True)
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free)")
    parser.set_defaults(handler=run)
