"""Lighthouse over the control plane's pages (run by ``scripts/lighthouse``; issue 17).

Starts the control plane in this process (``quoroom-cloud dev``'s server: SQLite, the mail outbox
and the local provider in a temporary directory, on a free loopback port), signs a person up,
confirms their address from the outbox, creates a Room (billing disabled) and waits until it runs,
so ``/app`` shows a real list. Then, with Debian's Chromium (``CHROME_PATH``):

- Lighthouse 12 (performance, accessibility, best practices, SEO; mobile emulation, its default)
  on ``/`` and ``/cloud/new`` as a visitor, and on ``/cloud/new`` (the plan and Room form) and
  ``/app`` signed in (the session cookies passed as an extra ``Cookie`` header);
- Lighthouse 11's PWA category (``installable-manifest`` and the other installability audits,
  which Lighthouse 12 dropped) on ``/`` and ``/app``.

Every report (JSON and HTML) goes to ``test-artifacts/lighthouse/``, with ``summary.json`` and
``summary.md``; the summary also replaces the "## Lighthouse (…)" section of ``bench/RESULTS.md``
(only that section). Exit status 1 when a target is missed: accessibility or best practices under
95 on a page, or a failing installability audit.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import email
import email.policy
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "test-artifacts" / "lighthouse"
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Lighthouse"
CATEGORIES = ("performance", "accessibility", "best-practices", "seo")
TARGETS = {"accessibility": 95, "best-practices": 95}
PASSWORD = "correct horse battery staple"  # noqa: S105 - a throwaway local account
CHROME_FLAGS = "--headless --no-sandbox --disable-gpu --disable-background-networking"
#: (label, path, signed in)
PAGES = (
    ("landing", "/", False),
    ("cloud-new-visitor", "/cloud/new", False),
    ("cloud-new", "/cloud/new", True),
    ("app", "/app", True),
)
PWA_PAGES = (("landing", "/", False), ("app", "/app", True))


@dataclass
class Plane:
    url: str
    outbox: Path


@contextmanager
def control_plane(root: Path) -> Iterator[Plane]:
    from control_plane.devserver import DevServer, bind_socket
    from control_plane.settings import Settings

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
        key_encryption_key=base64.urlsafe_b64encode(os.urandom(32)).decode(),
        provider="local",
        run_worker=True,
        worker_poll_seconds=1.0,
    )
    (root / "var").mkdir()
    dev = DevServer(settings, sock, out=io.StringIO())
    thread = threading.Thread(target=lambda: asyncio.run(dev.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not dev.server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the control plane did not start")
        time.sleep(0.05)
    try:
        yield Plane(url, root / "outbox")
    finally:
        dev.server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _verification_token(plane: Plane, address: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in plane.outbox.glob("*.eml"):
            message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            body = message.get_body(preferencelist=("plain", "html"))
            found = re.search(r"/verify-email#token=([A-Za-z0-9_\-.~%]+)", body.get_content())
            if message["To"] == address and found:
                return found.group(1)
        time.sleep(0.1)
    raise RuntimeError(f"no verification mail to {address}")


def signed_in_cookie(plane: Plane) -> str:
    """A verified person with a running Room; their session cookies as one ``Cookie`` header."""
    address = "lighthouse@example.com"
    with httpx.Client(base_url=plane.url, timeout=30) as http:
        http.post("/api/auth/signup", json={"email": address, "password": PASSWORD})
        token = _verification_token(plane, address)
        http.post("/api/auth/verify-email", json={"token": token}).raise_for_status()
        r = http.post(
            "/api/auth/login", json={"email": address, "password": PASSWORD, "transport": "body"}
        )
        bearer = {"Authorization": f"Bearer {r.json()['access_token']}"}
        catalog = http.get("/api/cloud/catalog", headers=bearer).json()
        r = http.post(
            "/api/cloud/instances",
            json={
                "name": "Research lab",
                "tier": catalog["tiers"][0]["id"],
                "region": catalog["regions"][0]["id"],
            },
            headers={**bearer, "Idempotency-Key": "lighthouse"},
        )
        r.raise_for_status()
        instance = r.json()["instance"]["id"]
        deadline = time.monotonic() + 90
        while http.get(f"/api/cloud/instances/{instance}/status", headers=bearer).json()[
            "status"
        ] not in ("running", "failed"):
            if time.monotonic() > deadline:
                raise RuntimeError("the Room did not start")
            time.sleep(0.5)
        http.cookies.clear()
        http.post("/api/auth/login", json={"email": address, "password": PASSWORD})
        return "; ".join(f"{name}={value}" for name, value in http.cookies.items())


def run_lighthouse(
    binary: Path, url: str, out: Path, categories: tuple[str, ...], cookie: str | None
) -> dict[str, Any]:
    command = [
        str(binary),
        url,
        "--quiet",
        "--output=json",
        "--output=html",
        f"--output-path={out}",
        f"--chrome-flags={CHROME_FLAGS}",
        f"--only-categories={','.join(categories)}",
    ]
    if cookie:
        command.append(f"--extra-headers={json.dumps({'Cookie': cookie})}")
    started = time.monotonic()
    subprocess.run(command, check=True, timeout=300)  # noqa: S603 - our pinned binary
    print(f"  {out.name}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    report: dict[str, Any] = json.loads(out.with_name(f"{out.name}.report.json").read_text())
    return report


def scores(report: dict[str, Any]) -> dict[str, int]:
    return {
        key: round(category["score"] * 100)
        for key, category in report["categories"].items()
        if category.get("score") is not None
    }


def pwa_audits(report: dict[str, Any]) -> dict[str, Any]:
    """The PWA category's automated audits: id -> pass (True/False) or "n/a"."""
    out: dict[str, Any] = {}
    for ref in report["categories"]["pwa"]["auditRefs"]:
        audit = report["audits"][ref["id"]]
        if audit["scoreDisplayMode"] in ("manual", "notApplicable", "informative"):
            continue
        out[ref["id"]] = audit["score"] == 1
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"{SECTION} (control plane pages, mobile emulation; issue 17)",
        "",
        f"`scripts/lighthouse`, {summary['date']}: Lighthouse {summary['lighthouse']} "
        f"(categories) and {summary['lighthouse_pwa']} (PWA installability audits, dropped from "
        f"12) against {summary['chromium']}, the control plane on loopback (SQLite, local "
        "provider). Default mobile emulation and simulated throttling. Reports: "
        "`test-artifacts/lighthouse/`. Targets: accessibility and best practices ≥ 95, every "
        "installability audit passing.",
        "",
        "| page | signed in | performance | accessibility | best practices | SEO |",
        "|---|---|---|---|---|---|",
    ]
    for page in summary["pages"]:
        s = page["scores"]
        lines.append(
            f"| `{page['path']}` | {'yes' if page['signed_in'] else 'no'} | "
            f"{s.get('performance', '–')} | {s.get('accessibility', '–')} | "
            f"{s.get('best-practices', '–')} | {s.get('seo', '–')} |"
        )
    lines += ["", "| page | installability audits (Lighthouse 11 PWA category) |", "|---|---|"]
    for page in summary["pwa"]:
        audits = ", ".join(
            f"{name} {'pass' if ok else 'FAIL'}" for name, ok in page["audits"].items()
        )
        lines.append(f"| `{page['path']}` | {audits} |")
    lines += ["", f"Targets met: {'yes' if not summary['missed'] else 'no'}."]
    for miss in summary["missed"]:
        lines.append(f"- missed: {miss}")
    lines += ["", f"Load average (1/5/15 min) after the run: {summary['load']}."]
    return "\n".join(lines) + "\n"


def replace_section(text: str, section: str) -> str:
    """``text`` with its "## Lighthouse …" section (to the next "## " or the end) replaced by
    ``section``, or with ``section`` appended; the other sections are left as they are."""
    pattern = re.compile(rf"^{re.escape(SECTION)}\b.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    return text.rstrip("\n") + "\n\n" + section


def chromium_version() -> str:
    chrome = os.environ.get("CHROME_PATH", "/usr/bin/chromium")
    done = subprocess.run(  # noqa: S603 - the configured browser
        [chrome, "--version"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip().split(" built on")[0] or chrome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lighthouse", type=Path, required=True)
    parser.add_argument("--lighthouse-pwa", type=Path, required=True)
    parser.add_argument("--no-results", action="store_true", help="leave bench/RESULTS.md alone")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)

    def version(binary: Path) -> str:
        package = binary.parents[1] / "lighthouse" / "package.json"
        return str(json.loads(package.read_text())["version"])

    summary: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "lighthouse": version(args.lighthouse),
        "lighthouse_pwa": version(args.lighthouse_pwa),
        "chromium": chromium_version(),
        "pages": [],
        "pwa": [],
        "missed": [],
    }
    with tempfile.TemporaryDirectory() as tmp, control_plane(Path(tmp)) as plane:
        cookie = signed_in_cookie(plane)
        print(f"control plane at {plane.url}", file=sys.stderr)
        for label, path, signed_in in PAGES:
            report = run_lighthouse(
                args.lighthouse,
                plane.url + path,
                OUT / label,
                CATEGORIES,
                cookie if signed_in else None,
            )
            got = scores(report)
            summary["pages"].append({"path": path, "signed_in": signed_in, "scores": got})
            for category, target in TARGETS.items():
                if got.get(category, 0) < target:
                    summary["missed"].append(f"{path}: {category} {got.get(category)} < {target}")
        for label, path, signed_in in PWA_PAGES:
            report = run_lighthouse(
                args.lighthouse_pwa,
                plane.url + path,
                OUT / f"{label}-pwa",
                ("pwa",),
                cookie if signed_in else None,
            )
            audits = pwa_audits(report)
            summary["pwa"].append({"path": path, "signed_in": signed_in, "audits": audits})
            summary["missed"] += [f"{path}: {name} fails" for name, ok in audits.items() if not ok]
    summary["load"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())

    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    section = markdown(summary)
    (OUT / "summary.md").write_text(section)
    if not args.no_results:
        RESULTS.write_text(replace_section(RESULTS.read_text(), section))
    print(section)
    return 1 if summary["missed"] else 0


if __name__ == "__main__":
    sys.exit(main())
