// /app/instances/{id}/members: invite by email, list, remove (or withdraw an invitation).
"use strict";

(function () {
  const Q = window.Q;
  const root = document.getElementById("members");
  if (!root) return;
  const base = `/api/cloud/instances/${encodeURIComponent(root.dataset.instance)}`;
  const form = document.getElementById("add-member-form");
  const list = document.getElementById("member-list");
  const loading = document.getElementById("members-loading");
  const empty = document.getElementById("members-empty");

  function row(member) {
    const state = member.status === "pending" ? "Invited — joins once they accept" : "Member";
    return Q.el(
      "li",
      { class: "member", dataset: { id: member.id } },
      Q.el(
        "div",
        {},
        Q.el("div", { class: "email", text: member.email }),
        Q.el("div", { class: "muted", text: state })
      ),
      Q.el("button", {
        type: "button",
        class: "button small",
        text: "Remove",
        "aria-label": `Remove ${member.email}`,
        dataset: { action: "remove", id: member.id, email: member.email },
      })
    );
  }

  async function load() {
    try {
      const data = await Q.api("GET", `${base}/members`);
      loading.hidden = true;
      list.replaceChildren(...data.members.map(row));
      empty.hidden = data.members.length > 0;
    } catch (err) {
      loading.hidden = true;
      Q.showError(err);
    }
  }

  Q.api("GET", base)
    .then((instance) => {
      document.getElementById("instance-name").textContent = instance.name;
      document.title = `Members of ${instance.name} · Quoroom`;
    })
    .catch((err) => Q.showError(err));

  Q.onSubmit(form, async (values) => {
    await Q.api("POST", `${base}/members`, { email: values.email });
    form.reset();
    Q.notice(`We emailed an invitation to ${values.email}. They become a member once they accept it.`);
    await load();
  });

  list.addEventListener("click", async (event) => {
    const button = event.target.closest("[data-action=remove]");
    if (!button) return;
    if (!window.confirm(`Remove ${button.dataset.email} from this Room?`)) return;
    Q.busy(button, true);
    try {
      await Q.api("DELETE", `${base}/members/${encodeURIComponent(button.dataset.id)}`);
      Q.notice(`${button.dataset.email} was removed.`);
      await load();
    } catch (err) {
      Q.busy(button, false);
      Q.showError(err);
    }
  });

  load();
})();
