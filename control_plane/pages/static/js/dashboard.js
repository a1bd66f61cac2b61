// /app: the person's Rooms (owned and shared) with status, Open, Members and Delete.
"use strict";

(function () {
  const Q = window.Q;
  const list = document.getElementById("instances");
  if (!list) return;
  const loading = document.getElementById("instances-loading");
  const empty = document.getElementById("instances-empty");
  const dialog = document.getElementById("delete-dialog");
  const TRANSITIONAL = new Set(["draft", "awaiting_payment", "provisioning", "canceled", "destroying"]);
  const GONE = new Set(["canceled", "destroying", "destroyed"]);
  let refreshTimer = null;

  function actions(instance) {
    const path = `/app/instances/${encodeURIComponent(instance.id)}`;
    const items = [];
    if (instance.status === "running") {
      items.push(Q.el("a", { class: "button primary small", href: `${path}/open`, text: "Open", "aria-label": `Open ${instance.name}` }));
    } else if (instance.role === "owner" && ["awaiting_payment", "provisioning", "failed"].includes(instance.status)) {
      items.push(
        Q.el("a", {
          class: "button small",
          href: `/cloud/new/provisioning?instance=${encodeURIComponent(instance.id)}`,
          text: instance.status === "failed" ? "Details" : "Progress",
          "aria-label": `Progress of ${instance.name}`,
        })
      );
    }
    if (!GONE.has(instance.status)) {
      // The owner's whole log, or a member's own entries (issue 15).
      items.push(Q.el("a", { class: "button small", href: `${path}/access`, text: "Access log", "aria-label": `Access log of ${instance.name}` }));
    }
    if (instance.role === "owner" && !GONE.has(instance.status)) {
      items.push(Q.el("a", { class: "button small", href: `${path}/members`, text: "Members", "aria-label": `Members of ${instance.name}` }));
      items.push(
        Q.el("button", {
          type: "button",
          class: "button small",
          text: "Delete",
          "aria-label": `Delete ${instance.name}`,
          dataset: { action: "delete", id: instance.id, name: instance.name },
        })
      );
    }
    return Q.el("div", { class: "actions" }, ...items);
  }

  function row(instance) {
    const label = Q.STATUS_LABELS[instance.status] || instance.status;
    const meta = Q.el(
      "p",
      { class: "meta" },
      Q.el("span", { class: "badge", dataset: { status: instance.status }, text: label }),
      Q.el("span", { text: `${instance.tier} · ${instance.region}` }),
      Q.el("span", { text: instance.role === "owner" ? "Owner" : "Shared with you" })
    );
    return Q.el(
      "li",
      { class: "instance", dataset: { id: instance.id, status: instance.status } },
      Q.el("div", {}, Q.el("h2", { text: instance.name }), meta),
      actions(instance),
      instance.status === "failed" && instance.error
        ? Q.el("p", { class: "error-text", text: instance.error })
        : null
    );
  }

  async function load() {
    clearTimeout(refreshTimer);
    let data;
    try {
      data = await Q.api("GET", "/api/cloud/instances");
    } catch (err) {
      loading.hidden = true;
      Q.showError(err);
      return;
    }
    loading.hidden = true;
    const visible = data.instances.filter((i) => i.status !== "destroyed");
    list.replaceChildren(...visible.map(row));
    empty.hidden = visible.length > 0;
    if (visible.some((i) => TRANSITIONAL.has(i.status))) refreshTimer = setTimeout(load, 5000);
  }

  // -- invitations: shared Rooms appear only once accepted --------------------------------------

  const invitations = document.getElementById("invitations");
  const invitationList = document.getElementById("invitation-list");

  function invitationRow(invitation) {
    const from = invitation.invitedBy ? `${invitation.invitedBy} invited you to ` : "An invitation to ";
    const data = { id: invitation.id, name: invitation.instanceName };
    return Q.el(
      "li",
      { class: "member invitation", dataset: { id: invitation.id } },
      Q.el("div", {}, Q.el("span", { text: from }), Q.el("strong", { text: invitation.instanceName })),
      Q.el(
        "div",
        { class: "actions" },
        Q.el("button", { type: "button", class: "button primary small", text: "Accept", "aria-label": `Accept the invitation to ${invitation.instanceName}`, dataset: { action: "accept", ...data } }),
        Q.el("button", { type: "button", class: "button small", text: "Decline", "aria-label": `Decline the invitation to ${invitation.instanceName}`, dataset: { action: "decline", ...data } })
      )
    );
  }

  async function loadInvitations() {
    try {
      const data = await Q.api("GET", "/api/cloud/invitations");
      invitationList.replaceChildren(...data.invitations.map(invitationRow));
      invitations.hidden = data.invitations.length === 0;
    } catch (err) {
      Q.showError(err);
    }
  }

  invitationList.addEventListener("click", async (event) => {
    const button = event.target.closest("[data-action=accept], [data-action=decline]");
    if (!button) return;
    const { action, id, name } = button.dataset;
    const path = `/api/cloud/invitations/${encodeURIComponent(id)}`;
    Q.busy(button, true);
    try {
      if (action === "accept") {
        await Q.api("POST", `${path}/accept`);
        Q.notice(`You joined ${name}.`);
      } else {
        await Q.api("DELETE", path);
        Q.notice(`You declined the invitation to ${name}.`);
      }
    } catch (err) {
      Q.busy(button, false);
      Q.showError(err);
    }
    await loadInvitations();
    await load();
  });

  list.addEventListener("click", (event) => {
    const button = event.target.closest("[data-action=delete]");
    if (!button) return;
    dialog.querySelector("[data-slot=name]").textContent = button.dataset.name;
    dialog.dataset.id = button.dataset.id;
    dialog.returnValue = "";
    dialog.showModal();
  });

  dialog.addEventListener("close", async () => {
    if (dialog.returnValue !== "delete") return;
    const id = dialog.dataset.id;
    try {
      await Q.api("DELETE", `/api/cloud/instances/${encodeURIComponent(id)}`);
      Q.notice("The Room is being deleted. Its subscription is canceled.");
    } catch (err) {
      Q.showError(err);
    }
    await load();
  });

  loadInvitations();
  load();
})();
