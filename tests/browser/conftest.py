"""Browser fixtures: the real control plane (``quoroom-cloud dev``'s server: app + in-process
worker + local provider) on a free loopback port with SQLite and the mail outbox in a temporary
directory, and Debian's Chromium driven by Playwright (no browser download is possible here)."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import io
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from control_plane.devserver import DevServer, bind_socket
from control_plane.settings import Settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
PASSWORD = "correct horse battery staple"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.slow)


@dataclass
class ControlPlane:
    url: str
    outbox: Path
    var_dir: Path
    server: Any

    def wait_for_link(self, to: str, kind: str, timeout: float = 15.0) -> str:
        """The ``{PUBLIC_URL}/{kind}#token=…`` link of the newest mail to ``to``."""
        deadline = time.monotonic() + timeout
        pattern = re.compile(re.escape(f"{self.url}/{kind}#token=") + r"[A-Za-z0-9_\-\.~%]+")
        while time.monotonic() < deadline:
            for path in sorted(self.outbox.glob("*.eml"), key=lambda p: p.stat().st_mtime_ns)[::-1]:
                message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
                if message["To"] != to:
                    continue
                body = message.get_body(preferencelist=("plain", "html"))
                text = body.get_content() if body is not None else ""
                found = pattern.search(text)
                if found:
                    return found.group(0)
            time.sleep(0.1)
        raise AssertionError(f"no {kind} mail to {to} in {self.outbox}")


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    root = tmp_path_factory.mktemp("cp")
    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = Settings(
        env="development",
        public_url=url,
        var_dir=root / "var",
        database_url=f"sqlite+aiosqlite:///{root / 'cp.db'}",
        auto_migrate=True,
        mail_outbox=root / "outbox",
        secret_key="s" * 48,
        key_encryption_key=base64.urlsafe_b64encode(b"k" * 32).decode(),
        password_hash_memory_kib=1024,
        password_hash_time_cost=1,
        provider="local",
        run_worker=True,
        worker_poll_seconds=1.0,
        runtime_health_timeout_seconds=60,
        # One browser, one address (127.0.0.1) signing up several people within a minute.
        throttle_signup_address="1000/minute",
        throttle_email_address="1000/minute",
        throttle_login_address="1000/minute",
    )
    (root / "var").mkdir()
    dev = DevServer(settings, sock, out=io.StringIO())

    thread = threading.Thread(target=lambda: asyncio.run(dev.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not dev.server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the control plane did not start")
        time.sleep(0.02)
    try:
        yield ControlPlane(url, root / "outbox", root / "var", dev.server)
    finally:
        dev.server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        instance = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            await instance.close()


@pytest.fixture
async def profile_context(tmp_path: Path) -> AsyncIterator[Any]:
    """Chromium with a real profile on disk (``browser``'s contexts are incognito, where nothing
    can be installed): what an installed app runs in. Phone-sized, touch."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            viewport={"width": 412, "height": 915},
            has_touch=True,
        )
        try:
            yield context
        finally:
            await context.close()
