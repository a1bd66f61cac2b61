"""``quoroom-runtime serve``: a Room (the reference Room by default) wrapped by the stack, served
by granian; ``quoroom-runtime gateway``: the stack in front of a Room on loopback, served by
uvicorn (``_server.py`` says why each).

Settings come from the environment (see README / DESIGN.md). A missing or malformed setting
stops start-up with exit status 2 and a message naming it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Literal, TypedDict

from starlette.types import ASGIApp

from ._errors import ConfigError
from ._logging import configure_logging
from ._server import (
    DrainUnreadBody,
    GuardedHttpToolsProtocol,
    guarded_protocol,
    serve_granian,
    served_app_spec,
    served_log_level,
)
from ._settings import RuntimeSettings, load_settings

log = logging.getLogger("room_cloud_runtime.cli")
# The guard counts the whole head (request line included); the stack checks the headers alone.
_REQUEST_LINE_ALLOWANCE = 16 * 1024


def _load_app(spec: str | None, settings: RuntimeSettings) -> ASGIApp:
    if spec is None:
        from .reference import create_room_app

        return create_room_app(data_dir=settings.data_dir)
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError("--app", f"must look like 'package.module:app', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
        app: ASGIApp = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("--app", f"cannot load {spec!r}: {exc}") from exc
    return app


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


class ServerOptions(TypedDict):
    """The keyword arguments :func:`server_options` gives ``uvicorn.Config`` (the gateway's
    server; the integration tests run the stack under it too)."""

    lifespan: Literal["auto", "on", "off"]
    access_log: bool
    proxy_headers: bool
    server_header: bool
    ws_max_size: int
    http: type[GuardedHttpToolsProtocol]
    limit_concurrency: int


def server_options(settings: RuntimeSettings) -> ServerOptions:
    """uvicorn options the stack relies on (shared by the CLI and the integration tests)."""
    return {
        "lifespan": "on",
        # uvicorn's access log prints query strings (WebSocket tokens): AccessLog replaces it.
        "access_log": False,
        # Never rewrite the client from X-Forwarded-*: uvicorn trusts 127.0.0.1 by default and
        # takes the left entry, which the client controls (arcjet-js#5412). Fly-Client-IP is
        # handled by the ClientAddress layer when QUOROOM_BEHIND_FLY_PROXY is set.
        "proxy_headers": False,
        "server_header": False,
        "ws_max_size": settings.max_ws_message_bytes,
        # httptools with a bounded, timed request head (uvicorn has neither): _server.py.
        "http": guarded_protocol(
            max_head_bytes=settings.max_header_bytes + _REQUEST_LINE_ALLOWANCE,
            head_timeout=settings.head_timeout_seconds,
        ),
        "limit_concurrency": settings.max_connections,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quoroom-runtime", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a Room wrapped by the runtime stack")
    serve.add_argument("--host", help="default: 127.0.0.1 in local mode, 0.0.0.0 in cloud mode")
    serve.add_argument(
        "--port", type=_port, help="default: $PORT, else 3700 in local mode and 8080 in cloud mode"
    )
    serve.add_argument(
        "--app", help="an ASGI app to wrap instead of the reference Room, 'mod:attr'"
    )
    serve.add_argument(
        "--log-level", type=_log_level, default=os.environ.get("QUOROOM_LOG_LEVEL", "info")
    )
    gateway = sub.add_parser(
        "gateway",
        help="the stack in front of a Room on loopback (the Node quoroom server), proxying to it",
        usage="quoroom-runtime gateway [--host H] [--port P] --upstream http://127.0.0.1:U "
        "[-- COMMAND ARGS...]",
    )
    gateway.add_argument("--host", help="default: 0.0.0.0")
    gateway.add_argument("--port", type=_port, help="default: $PORT, else 8080")
    gateway.add_argument(
        "--upstream", help="the Room's URL on loopback (default: $QUOROOM_GATEWAY_UPSTREAM)"
    )
    gateway.add_argument(
        "--log-level", type=_log_level, default=os.environ.get("QUOROOM_LOG_LEVEL", "info")
    )
    return parser


_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _log_level(value: str) -> str:
    """--log-level and $QUOROOM_LOG_LEVEL (argparse checks a string default too)."""
    level = value.strip().lower()
    if level not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a log level (QUOROOM_LOG_LEVEL / --log-level: one of "
            f"{', '.join(_LOG_LEVELS)})"
        )
    return level


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" is the Room's command line (gateway mode), never our options.
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level.upper())
    if args.command == "gateway":
        return _gateway(args, command)
    if command:
        print("quoroom-runtime: serve takes no command after --", file=sys.stderr)
        return 2
    try:
        settings = load_settings()
        app = _load_app(args.app, settings)
        port = args.port or (_port(os.environ["PORT"]) if os.environ.get("PORT") else None)
    except ConfigError as exc:
        print(f"quoroom-runtime: configuration error: {exc}", file=sys.stderr)
        return 2
    except argparse.ArgumentTypeError as exc:
        print(f"quoroom-runtime: configuration error: PORT: {exc}", file=sys.stderr)
        return 2
    del app  # loaded to check --app before serving; granian's worker builds its own (served_app)
    cloud = settings.mode == "cloud"
    host = args.host or ("0.0.0.0" if cloud else "127.0.0.1")
    port = port or (8080 if cloud else 3700)
    log.info("serving", extra={"mode": settings.mode, "host": host, "port": port})
    return serve_granian(
        "room_cloud_runtime.cli:served_app",
        app_spec=args.app,
        host=host,
        port=port,
        max_head_bytes=settings.max_header_bytes + _REQUEST_LINE_ALLOWANCE,
        head_timeout=settings.head_timeout_seconds,
        max_connections=settings.max_connections,
        log_level=args.log_level.lower(),
    )


def served_app() -> ASGIApp:
    """What ``serve`` serves, built in granian's worker process from the settings ``serve`` has
    already checked: the Room wrapped by the stack, inside :class:`DrainUnreadBody`."""
    from ._stack import wrap

    configure_logging(served_log_level().upper())  # granian's worker set up its own logging
    settings = load_settings()
    stack = wrap(_load_app(served_app_spec(), settings), settings)
    stack.settle_heap = True  # granian's worker serves this stack alone
    return DrainUnreadBody(stack, settings.head_timeout_seconds)


def _gateway(args: argparse.Namespace, command: list[str]) -> int:
    from ._gateway import build_gateway, load_gateway_settings

    try:
        settings = load_settings()
        gateway_settings = load_gateway_settings(args.upstream, command)
        stack, gateway = build_gateway(settings, gateway_settings)
        stack.settle_heap = True  # this process is the gateway's alone
        port = args.port or (_port(os.environ["PORT"]) if os.environ.get("PORT") else 8080)
    except ConfigError as exc:
        print(f"quoroom-runtime: configuration error: {exc}", file=sys.stderr)
        return 2
    except argparse.ArgumentTypeError as exc:
        print(f"quoroom-runtime: configuration error: PORT: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    host = args.host or "0.0.0.0"
    config = uvicorn.Config(
        stack,
        host=host,
        port=port,
        log_config=None,
        log_level=args.log_level.lower(),
        **server_options(settings),
    )
    server = uvicorn.Server(config)

    def stop_on_fatal() -> None:
        server.should_exit = True

    gateway.on_fatal.append(stop_on_fatal)
    log.info(
        "gateway serving",
        extra={"host": host, "port": port, "upstream": gateway_settings.upstream},
    )
    server.run()
    if gateway.failed:
        print("quoroom-runtime: the Room could not be kept up", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
