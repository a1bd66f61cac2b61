"""``quoroom-cloud``: the control plane's command line.

Subcommands are registered in :data:`COMMANDS` (argparse subparsers); other parts add theirs
(``dev``, ``worker``, ``ops update-image``) with :func:`register`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence

from control_plane.logs import configure_logging
from control_plane.settings import Settings, SettingsError, get_settings

Handler = Callable[[argparse.Namespace], int]
#: name → (configure the subparser, run it). Extend with :func:`register`.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}


def register(
    name: str, help_text: str
) -> Callable[
    [Callable[[argparse.ArgumentParser], None]], Callable[[argparse.ArgumentParser], None]
]:
    """Decorator: ``configure(parser)`` adds arguments and ``parser.set_defaults(handler=...)``."""

    def decorate(
        configure: Callable[[argparse.ArgumentParser], None],
    ) -> Callable[[argparse.ArgumentParser], None]:
        COMMANDS[name] = (help_text, configure)
        return configure

    return decorate


def _listen_args(parser: argparse.ArgumentParser, port: int = 8000) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=port, help="port to listen on")


# -- serve --------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from control_plane.app import create_app

    settings = get_settings()
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        proxy_headers=False,  # client addresses come from Fly-Client-IP when configured
        server_header=False,
        log_level="info",
        log_config=None,  # main() set up the logs; uvicorn's config would replace them
        access_log=False,  # it prints query strings: control_plane/logs.py writes access lines
    )
    return 0


@register("serve", "run the control-plane HTTP server")
def _serve_parser(parser: argparse.ArgumentParser) -> None:
    _listen_args(parser)
    parser.set_defaults(handler=_serve)


# -- migrate ------------------------------------------------------------------------------------


def _migrate(args: argparse.Namespace) -> int:
    from control_plane.migrations import migrate

    revision = asyncio.run(migrate(get_settings()))
    print(f"database at revision {revision}")
    return 0


@register("migrate", "apply database migrations (Alembic) up to the latest revision")
def _migrate_parser(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(handler=_migrate)


# -- keys ---------------------------------------------------------------------------------------


async def _rotate_async(settings: Settings) -> str:
    from control_plane.db import create_engine, create_session_factory
    from control_plane.keys.service import KeyRing

    engine = create_engine(settings.resolved_database_url)
    try:
        ring = KeyRing(settings, create_session_factory(engine))
        await ring.ensure_keys()
        async with create_session_factory(engine)() as session:
            kid = await ring.rotate(session)
        pending = ring.pending_switch
        if pending is None:
            return f"rotated: active signing key is now {kid}"
        # Runtimes may hold a JWKS without the new key for one max-age: it signs after that.
        return (
            f"rotated: key {kid} is published and becomes the active signing key at "
            f"{pending[1].isoformat()} (one JWKS max-age after it was published)"
        )
    finally:
        await engine.dispose()


def _keys_rotate(args: argparse.Namespace) -> int:
    from control_plane.errors import KeysNotReady

    try:
        print(asyncio.run(_rotate_async(get_settings())))
    except KeysNotReady as exc:
        print(f"not rotated: {exc.message}", file=sys.stderr)
        return 1
    return 0


@register("keys", "manage the token signing keys")
def _keys_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    rotate = sub.add_parser(
        "rotate",
        help="make the published next key active (it signs once it has been published for one "
        "JWKS max-age), retire the active one, publish a new next key",
    )
    rotate.set_defaults(handler=_keys_rotate)


# -- dev ----------------------------------------------------------------------------------------


@register("dev", "run the control plane, the worker and the local provider with embedded defaults")
def _dev_parser(parser: argparse.ArgumentParser) -> None:
    from control_plane.devserver import configure

    configure(parser)


# -- worker and ops -----------------------------------------------------------------------------


@register("worker", "run the provisioning worker and reconciler (no HTTP server)")
def _worker_parser(parser: argparse.ArgumentParser) -> None:
    from control_plane.provisioning.commands import configure_worker

    configure_worker(parser)


@register(
    "ops",
    "operations on the fleet of Room machines (ops update-image IMAGE, ops restore INSTANCE)",
)
def _ops_parser(parser: argparse.ArgumentParser) -> None:
    from control_plane.provisioning.commands import configure_ops

    configure_ops(parser)


# -- entry point --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quoroom-cloud", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure) in COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        configure_logging(os.environ.get("QUOROOM_CP_LOG_FORMAT"))
    except ValueError as exc:
        print(f"configuration error: QUOROOM_CP_LOG_FORMAT: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        handler: Handler = args.handler
        return handler(args)
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the settings validator raises pydantic's ValidationError
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            print(f"configuration error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
