"""A stand-in for ``quoroom-runtime gateway`` in the local provider's tests.

Run with the provider's argv, this file in place of the Python interpreter::

    fake_gateway.py -m room_cloud_runtime.cli gateway --host H --port P --upstream URL -- COMMAND…

It starts COMMAND with its own environment plus what the real gateway adds for the Room, answers
``GET /healthz`` 200 once the upstream answers (503 before), and stops COMMAND when stopped.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def main() -> None:
    argv = sys.argv[1:]
    cut = argv.index("--")
    own, command = argv[:cut], argv[cut + 1 :]
    if own[:3] != ["-m", "room_cloud_runtime.cli", "gateway"]:
        sys.exit(f"fake gateway: unexpected command line {own}")
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args(own[3:])
    env = dict(
        os.environ,
        QUOROOM_BIND_HOST="127.0.0.1",
        QUOROOM_SKIP_MCP_REGISTER="1",
        QUOROOM_NO_AUTO_OPEN="1",
    )
    room = subprocess.Popen(command, env=env)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status = 404
            if self.path == "/healthz":
                status = 503
                try:
                    with opener.open(f"{args.upstream}/", timeout=2) as reply:
                        status = 200 if reply.status == 200 else 503
                except OSError:
                    pass
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer((args.host, args.port), Handler)

    def stop(*_: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    finally:
        room.terminate()
        room.wait(5)


if __name__ == "__main__":
    main()
