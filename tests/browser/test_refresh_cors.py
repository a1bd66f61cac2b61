"""The browser judges the refresh call the real Room UI makes: from a page on the instance's
runtime origin, ``fetch(POST {control}/api/cloud/instances/{id}/refresh-token,
{credentials: "include", ...})`` — with the control plane's session cookies in the browser —
gets a new token; the same call from any other origin is rejected by the browser."""

from __future__ import annotations

from typing import Any

import httpx
import jwt

from tests.browser.conftest import PASSWORD, ControlPlane
from tests.browser.test_cors import _running_room, other_origin  # noqa: F401 - fixture

# Exactly what the Room UI (src/ui/lib/auth.ts at 68b00f0) sends.
REFRESH = """async ([url, token]) => {
  try {
    const res = await fetch(url, {
      method: "POST",
      credentials: "include",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token }),
    });
    return { ok: true, status: res.status, body: await res.json() };
  } catch (err) {
    return { ok: false, error: String(err) };
  }
}"""

SIGN_IN = """async ([email, password]) => {
  const res = await fetch("/api/auth/login", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ email, password }),
  });
  return res.status;
}"""


async def test_the_room_ui_refreshes_its_token_from_the_runtime_origin_only(
    browser: Any,
    control_plane: ControlPlane,
    other_origin: str,  # noqa: F811
):
    address = "refresh-cors@example.com"
    grant = await _running_room(control_plane, address)
    runtime = grant["runtime_url"].rstrip("/")
    instance_id = jwt.decode(grant["token"], options={"verify_signature": False})["instanceId"]
    url = f"{control_plane.url}/api/cloud/instances/{instance_id}/refresh-token"
    context = await browser.new_context()
    page = await context.new_page()
    try:
        # Signed in to the control plane: its cookies ride along with credentials: "include"
        # (loopback ports are one site) and must neither be needed nor trip the CSRF defence.
        await page.goto(f"{control_plane.url}/healthz")
        assert await page.evaluate(SIGN_IN, [address, PASSWORD]) == 200
        assert {c["name"] for c in await context.cookies(control_plane.url)} >= {"qr_access"}

        await page.goto(f"{runtime}/healthz")
        allowed = await page.evaluate(REFRESH, [url, grant["token"]])
        assert allowed["ok"] is True, allowed
        assert allowed["status"] == 200, allowed
        assert allowed["body"]["ok"] is True and allowed["body"]["token"].count(".") == 2

        # Another loopback port, and the runtime's own port under another host name: the
        # browser refuses to hand the answer over.
        port = runtime.rsplit(":", 1)[1]
        for elsewhere in (f"{other_origin}/", f"http://localhost:{port}/healthz"):
            await page.goto(elsewhere)
            refused = await page.evaluate(REFRESH, [url, grant["token"]])
            assert refused["ok"] is False, (elsewhere, refused)
            assert "TypeError" in refused["error"]
    finally:
        await context.close()

    # What the browser did not let those pages see: the control plane refused the origin.
    async with httpx.AsyncClient() as http:
        r = await http.post(url, json={"token": grant["token"]}, headers={"Origin": other_origin})
        assert r.status_code == 403
        assert "access-control-allow-origin" not in r.headers
        assert "access-control-allow-credentials" not in r.headers
