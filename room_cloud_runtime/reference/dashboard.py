"""The placeholder dashboard the reference Room serves at ``/`` (the real UI is the Room bundle)."""

from typing import Final

_INDEX_HTML: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>Quoroom Room</title>
<script src="/assets/app.js" defer></script>
<style>
body { font: 16px/1.5 system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2430; }
main { max-width: 48rem; margin: 0 auto; padding: 1.25rem; }
.bar { display: flex; gap: .75rem; align-items: center; flex-wrap: wrap; }
.role { border-radius: 999px; padding: .1rem .7rem; background: #e8ebff; color: #3a4fd8;
  font-weight: 700; }
#rooms { list-style: none; padding: 0; display: grid; gap: .75rem; }
#rooms li { background: #fff; border: 1px solid #d9dee5; border-radius: 10px; padding: 1rem; }
#rooms h2 { font-size: 1.1rem; margin: 0 0 .25rem; }
.muted { color: #5b6573; }
[data-state=error] { color: #b3261e; }
</style>
</head>
<body>
<main>
<div class="bar">
<h1>Quoroom Room</h1>
<span id="role" class="role" hidden></span>
</div>
<p id="who" class="muted" hidden></p>
<p id="status" role="status">Connecting&hellip;</p>
<ul id="rooms" aria-label="Rooms"></ul>
</main>
</body>
</html>
"""

_APP_JS: Final = """// Placeholder dashboard (the real UI is the Room bundle).
// Cloud mode: the control plane opens this page as /#launch=<runtime token>. The token is taken
// out of the address bar at once (history.replaceState), kept in sessionStorage for this tab,
// sent as Authorization: Bearer, and refreshed at 80 % of its life through the control plane
// (the token's iss, trusted once /api/auth/verify has accepted the token).
(() => {
  const KEY = "quoroom.runtimeToken";
  const statusEl = document.getElementById("status");
  const roleEl = document.getElementById("role");
  const whoEl = document.getElementById("who");
  const roomsEl = document.getElementById("rooms");
  let refreshTimer = null;

  function show(text, state) {
    statusEl.textContent = text;
    statusEl.dataset.state = state;
  }

  function takeLaunchToken() {
    const params = new URLSearchParams(location.hash.slice(1));
    const launched = params.get("launch");
    if (launched) {
      sessionStorage.setItem(KEY, launched);
      history.replaceState(null, "", location.pathname + location.search);
    }
    return sessionStorage.getItem(KEY);
  }

  function claimsOf(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const padded = part + "===".slice((part.length + 3) % 4);
      return JSON.parse(atob(padded));
    } catch (err) {
      return null;
    }
  }

  async function call(path, token) {
    const res = await fetch(path, {
      headers: { accept: "application/json", authorization: `Bearer ${token}` },
      cache: "no-store",
    });
    const body = await res.json().catch(() => ({}));
    return { res, body };
  }

  function controlPlane(claims) {
    return String(claims.iss || "").replace(/\\/+$/, "");
  }

  function signedOut(claims, why) {
    sessionStorage.removeItem(KEY);
    clearTimeout(refreshTimer);
    show(why, "error");
    const cp = claims && controlPlane(claims);
    if (cp && /^https?:\\/\\//.test(cp)) {
      const link = document.createElement("a");
      link.href = `${cp}/app`;
      link.textContent = " Open it again from your Rooms.";
      statusEl.append(link);
    }
  }

  async function refresh(token) {
    const claims = claimsOf(token);
    const url = `${controlPlane(claims)}/api/cloud/instances/${encodeURIComponent(
      claims.instanceId
    )}/refresh-token`;
    try {
      const res = await fetch(url, {
        method: "POST",
        headers: { "content-type": "application/json", accept: "application/json" },
        body: JSON.stringify({ token }),
        credentials: "omit",
        cache: "no-store",
      });
      const body = await res.json().catch(() => ({}));
      if (res.ok && body.ok && body.token) {
        sessionStorage.setItem(KEY, body.token);
        schedule(body.token);
        return body.token;
      }
      signedOut(claims, `Your access ended (${body.error || res.status}).`);
    } catch (err) {
      refreshTimer = setTimeout(() => refresh(token), 5000); // the control plane is unreachable
    }
    return null;
  }

  function schedule(token) {
    const claims = claimsOf(token);
    if (!claims || !claims.exp) return;
    const issued = claims.iat || claims.nbf || Math.floor(Date.now() / 1000);
    const at = (issued + 0.8 * (claims.exp - issued)) * 1000;
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(() => refresh(token), Math.max(1000, at - Date.now()));
  }

  function renderRooms(rooms) {
    roomsEl.replaceChildren();
    for (const room of rooms) {
      const item = document.createElement("li");
      item.dataset.id = room.id;
      const title = document.createElement("h2");
      title.textContent = room.name;
      const goal = document.createElement("p");
      goal.className = "muted";
      goal.textContent = room.goal || "";
      item.append(title, goal);
      roomsEl.append(item);
    }
  }

  async function cloud(token) {
    let { res, body } = await call("/api/auth/verify", token);
    if (res.status === 401) {
      // Expired while the tab slept: refresh needs a still-valid token, so this usually ends.
      signedOut(claimsOf(token), "Your session in this Room has expired.");
      return;
    }
    if (!res.ok || !body.ok) {
      show(`Error: ${body.error || res.status}`, "error");
      return;
    }
    roleEl.textContent = body.role;
    roleEl.dataset.role = body.role;
    roleEl.hidden = false;
    const profile = body.profile || {};
    const who = profile.name || profile.email;
    if (who) {
      whoEl.textContent = `Signed in as ${who}`;
      whoEl.hidden = false;
    }
    schedule(token);
    ({ res, body } = await call("/api/rooms", sessionStorage.getItem(KEY) || token));
    if (!res.ok) {
      show(`Error: ${body.error || res.status}`, "error");
      return;
    }
    renderRooms(body);
    show(`${body.length} room${body.length === 1 ? "" : "s"}`, "ok");
  }

  async function local() {
    const res = await fetch("/api/status", { headers: { accept: "application/json" } });
    const body = await res.json();
    if (!res.ok) {
      show(`Error: ${body.error}`, "error");
    } else if (body.deploymentMode === "cloud") {
      show("Open this Room from the control plane to sign in.", "signed-out");
    } else {
      show(`Room ${body.version}: ${body.rooms} rooms, up ${body.uptimeSeconds}s`, "ok");
    }
  }

  const token = takeLaunchToken();
  (token ? cloud(token) : local()).catch(() => show("Room unreachable", "error"));
})();
"""
