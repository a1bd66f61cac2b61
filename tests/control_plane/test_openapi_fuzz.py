"""A bounded schemathesis run over the control plane's OpenAPI: no input makes it answer 5xx."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import hypothesis
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase

from control_plane.app import create_app

MAX_EXAMPLES = 75


def _serve(app: Any) -> tuple[uvicorn.Server, threading.Thread, str]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws="none")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


def _fuzz(base_url: str) -> list[str]:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            response = case.call(base_url=base_url, timeout=10)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path}: {response.status_code}")

        run()
    assert operations >= 10
    return failures


@pytest.mark.slow
async def test_schemathesis_finds_no_server_error(make_settings: Any, tmp_path: Any):
    app = create_app(make_settings(mail_outbox=tmp_path / "outbox"))
    server, thread, base_url = _serve(app)
    try:
        failures = await asyncio.to_thread(_fuzz, base_url)
    finally:
        server.should_exit = True
        await asyncio.to_thread(thread.join, 15)
    assert failures == []


async def test_openapi_docs_are_served(harness: Any):
    assert (await harness.client.get("/docs")).status_code == 200
    spec = (await harness.client.get("/openapi.json")).json()
    for path in (
        "/api/auth/signup",
        "/api/auth/login",
        "/api/auth/refresh",
        "/api/auth/logout",
        "/api/auth/forgot-password",
        "/api/auth/reset-password",
        "/api/auth/verify-email",
        "/api/auth/resend-verification",
        "/api/auth/google",
        "/api/auth/google/callback",
        "/api/auth/me",
        "/.well-known/jwks.json",
    ):
        assert path in spec["paths"], path
