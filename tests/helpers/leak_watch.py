"""The suite-wide secret-leak check (issue 14, item 2): a test fails if anything it logged — the
records pytest captured and everything written to stderr, where both services log, subprocesses
included — holds a token, a password, a secret, a Stripe key or a credential value.

What counts as a secret:

- by shape: a JWT, a ``Bearer`` value, a Stripe secret/restricted key or webhook secret;
- by value: every string ``secrets.token_urlsafe`` made in this process (session and refresh
  tokens, device ids, OAuth state and nonces, the gateway's upstream secret, generated setting
  secrets …) and every password handed to the password hasher. Those have no shape; they are
  remembered as they are made (this module wraps the two functions for the session).

Not checked: stdout. The CLI prints there what the operator asked for (a token, a banner) and the
development mail transport prints mails there, links with their tokens included, by design.

A test that logs a secret on purpose (to prove the redaction works) says so with
``@pytest.mark.logs_secrets``.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

_SHAPES = {
    "a JWT": re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    "a Bearer value": re.compile(r"\bBearer\s+[A-Za-z0-9._~+/=-]{16,}"),
    "a Stripe key": re.compile(r"\b(?:(?:sk|rk)_(?:live|test)|whsec)_[A-Za-z0-9]{8,}"),
}
_WORD = re.compile(r"[A-Za-z0-9_-]{16,}")

_made: set[str] = set()
_passwords: set[str] = set()


def _remember_tokens() -> None:
    original = secrets.token_urlsafe

    def token_urlsafe(nbytes: int | None = None) -> str:
        value = original(nbytes)
        if len(value) >= 16:
            _made.add(value)
        return value

    secrets.token_urlsafe = token_urlsafe


def _remember_passwords() -> None:
    from control_plane.auth.passwords import PasswordHasher

    original = PasswordHasher.hash

    async def hash_(self: PasswordHasher, password: str) -> str:
        if len(password) >= 8:
            _passwords.add(password)
        return await original(self, password)

    PasswordHasher.hash = hash_  # type: ignore[method-assign]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "logs_secrets: the test logs a secret on purpose (redaction tests)"
    )
    _remember_tokens()
    _remember_passwords()
    # The tests' own HTTP clients log every URL they request at INFO, query tokens included: a
    # test that sends ``?token=`` on purpose is not a leak of the code under test. (The services
    # run these loggers through their redacting handlers.)
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def leaks(text: str) -> list[str]:
    """What in ``text`` is a secret, described without the secret itself."""
    found = [what for what, shape in _SHAPES.items() if shape.search(text)]
    if _made and any(word in _made for word in _WORD.findall(text)):
        found.append("a token this process made")
    if any(password in text for password in _passwords):
        found.append("a password")
    return found


def _logged(report: pytest.TestReport) -> Iterator[tuple[str, str]]:
    """This phase's captured logs and stderr (a report holds the earlier phases' too)."""
    for name, content in report.sections:
        if name.startswith(("Captured log", "Captured stderr")) and name.endswith(report.when):
            yield name, content


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    report: pytest.TestReport = yield
    if report.failed or item.get_closest_marker("logs_secrets") is not None:
        return report
    problems = [
        f"{name}: {', '.join(found)}" for name, text in _logged(report) if (found := leaks(text))
    ]
    if problems:
        report.outcome = "failed"
        report.longrepr = (
            "a secret reached the logs (tests/helpers/leak_watch.py):\n  " + "\n  ".join(problems)
        )
    return report
