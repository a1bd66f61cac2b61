"""The control plane the load bench seeds for its token refresher (bench/cp_seed.py)."""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from bench import cp_seed


def test_runtime_origin() -> None:
    assert cp_seed.runtime_origin("http://127.0.0.1:41234/") == "http://127.0.0.1:41234"
    assert cp_seed.runtime_origin("https://qr-1.fly.dev/x") == "https://qr-1.fly.dev"
    assert cp_seed.runtime_origin("http://example.com:80") == "http://example.com"


def test_verification_links_are_read_from_the_outbox(tmp_path: Path) -> None:
    for n, to in enumerate(("a@bench.example.com", "b@bench.example.com", "c@other.example")):
        message = EmailMessage()
        message["To"] = to
        message["Subject"] = "Confirm"
        message.set_content(f"Open http://127.0.0.1:9/verify-email#token=tok_{n}-x.y\n")
        (tmp_path / f"{n}.eml").write_bytes(message.as_bytes())
    links = cp_seed._verify_links(tmp_path, ["a@bench.example.com", "b@bench.example.com"])
    assert links == {"a@bench.example.com": "tok_0-x.y", "b@bench.example.com": "tok_1-x.y"}
    with pytest.raises(cp_seed.SeedError):
        cp_seed._verify_links(tmp_path, ["missing@bench.example.com"], timeout=0.1)


@pytest.mark.slow
def test_a_seeded_control_plane_issues_tokens_its_runtime_accepts_and_refreshes() -> None:
    with cp_seed.seeded_control_plane(2) as seeded:
        assert len(seeded.tokens) == 2 and seeded.origin.startswith("http://127.0.0.1:")
        url = f"{seeded.url}/api/cloud/instances/{seeded.instance_id}/refresh-token"
        for token in seeded.tokens:  # the owner's and a member's
            r = httpx.post(
                url, json={"token": token}, headers={"origin": seeded.origin}, trust_env=False
            )
            assert r.status_code == 200, r.text
            assert r.json()["ok"] and r.json()["token"] != token
            assert r.headers["access-control-allow-origin"] == seeded.origin
        runtime = seeded.pids["runtime"]
        assert Path(f"/proc/{runtime}").exists()
    # Stopping the control plane stopped the runtime its worker started.
    assert (
        not Path(f"/proc/{runtime}").exists()
        or b"room_cloud_runtime" not in Path(f"/proc/{runtime}/cmdline").read_bytes()
    )
