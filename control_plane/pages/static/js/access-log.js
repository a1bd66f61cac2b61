// /app/instances/{id}/access: the Room's access log (issue 15) — a filter, a table, older pages
// on demand, and a CSV link that follows the filter. A member sees their own entries only.
"use strict";

(function () {
  const Q = window.Q;
  const root = document.getElementById("access-log");
  if (!root) return;
  const base = `/api/cloud/instances/${encodeURIComponent(root.dataset.instance)}`;
  const category = document.getElementById("access-category");
  const rows = document.getElementById("access-rows");
  const wrap = document.getElementById("access-table-wrap");
  const loading = document.getElementById("access-loading");
  const empty = document.getElementById("access-empty");
  const more = document.getElementById("access-more");
  const csv = document.getElementById("access-csv");
  const retention = document.getElementById("access-retention");
  let next = null;

  const KINDS = {
    launch: "Opened the Room",
    refresh: "Renewed its token",
    member_invited: "Invited",
    member_joined: "Joined",
    member_removed: "Removed by the owner",
    member_left: "Left",
    invitation_declined: "Declined the invitation",
  };
  const REASONS = {
    missing_token: "No token",
    token_expired: "Expired token",
    token_malformed: "Malformed token",
    bad_signature: "Forged token (bad signature)",
    unknown_key: "Token signed by an unknown key",
    invalid_claim: "Token with an invalid claim",
    wrong_instance: "Token for another Room",
    token_not_yet_valid: "Token not valid yet",
    token_too_large: "Oversized token",
    unsupported_algorithm: "Token with a refused algorithm",
    origin_not_allowed: "Disallowed origin",
    cors_preflight_refused: "Disallowed cross-origin request",
    rate_limited: "Too many requests",
    keys_unavailable: "Keys unavailable (our side)",
  };

  function when(iso) {
    const at = new Date(iso);
    return Q.el("time", { datetime: iso, text: at.toLocaleString() });
  }

  function row(entry) {
    const refused = entry.kind === "refused";
    const what = refused
      ? `Refused: ${REASONS[entry.reason] || entry.reason}`
      : KINDS[entry.kind] || entry.kind;
    const who = refused ? entry.address : entry.who;
    const from = [entry.network, entry.region && `edge ${entry.region}`].filter(Boolean).join(" · ");
    return Q.el(
      "tr",
      { dataset: { kind: entry.kind } },
      Q.el("td", {}, when(entry.at)),
      Q.el("td", { text: what }),
      Q.el("td", { class: "wrap", text: who || "—" }),
      Q.el("td", { text: from || "—" }),
      Q.el("td", { class: "wrap agent", text: entry.userAgent || "—" }),
      Q.el("td", { class: "num", text: String(entry.count) })
    );
  }

  function query(before) {
    const params = new URLSearchParams();
    if (category.value) params.set("category", category.value);
    if (before) params.set("before", String(before));
    const text = params.toString();
    return text ? `?${text}` : "";
  }

  async function load(append) {
    Q.busy(more, true);
    try {
      const data = await Q.api("GET", `${base}/access-log${query(append ? next : null)}`);
      loading.hidden = true;
      const built = data.entries.map(row);
      if (append) rows.append(...built);
      else rows.replaceChildren(...built);
      next = data.next;
      more.hidden = next === null;
      const any = rows.children.length > 0;
      wrap.hidden = !any;
      empty.hidden = any;
      retention.textContent = `Entries are kept for ${data.retentionDays} days.`;
      retention.hidden = false;
    } catch (err) {
      loading.hidden = true;
      Q.showError(err);
    } finally {
      Q.busy(more, false);
    }
  }

  Q.api("GET", base)
    .then((instance) => {
      document.getElementById("instance-name").textContent = instance.name;
      document.title = `Access log of ${instance.name} · Quoroom`;
      if (instance.role === "owner") {
        document.getElementById("members-link").hidden = false;
      } else {
        document.getElementById("access-scope").textContent =
          "Your own entries in this Room's access log: when you opened it, and your membership.";
      }
    })
    .catch((err) => Q.showError(err));

  category.addEventListener("change", () => {
    csv.href = `${base}/access-log.csv${query(null)}`;
    load(false);
  });
  document.getElementById("access-filter").addEventListener("submit", (event) => event.preventDefault());
  more.addEventListener("click", () => load(true));
  load(false);
})();
