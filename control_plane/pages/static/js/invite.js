// /accept-invite: the invitation link from an email. The token is in the fragment (#token=…),
// so it never reaches a server log or a Referer; it is kept in this tab's sessionStorage while
// the person signs in, and posted only when they press Accept (nothing happens without consent).
"use strict";

(function () {
  const Q = window.Q;
  if (document.body.dataset.page !== "accept-invite") return;
  const KEY = "quoroom.invite";

  function takeToken() {
    const params = new URLSearchParams(location.hash.slice(1));
    const fromLink = params.get("token");
    if (location.hash) history.replaceState(null, "", location.pathname + location.search);
    try {
      if (fromLink) sessionStorage.setItem(KEY, fromLink);
      return fromLink || sessionStorage.getItem(KEY);
    } catch (err) {
      return fromLink; // storage disabled: the link works in a signed-in tab
    }
  }

  function forget() {
    try {
      sessionStorage.removeItem(KEY);
    } catch (err) {
      /* nothing kept */
    }
  }

  function show(id) {
    for (const panel of document.querySelectorAll("#accept-invite .inline-panel")) {
      panel.hidden = panel.id !== id;
    }
    const el = document.getElementById(id);
    if (el && el.tabIndex === -1) el.focus();
  }

  const token = takeToken();
  if (!token) {
    show("invite-failed");
    return;
  }
  if (!document.body.dataset.signedIn) {
    show("invite-signin");
    return;
  }
  show("invite-ask");
  const button = document.getElementById("invite-accept");
  button.addEventListener("click", async () => {
    Q.busy(button, true);
    try {
      const instance = await Q.api("POST", "/api/cloud/invitations/accept", { token });
      forget();
      document.querySelector("#invite-done [data-slot=name]").textContent = instance.name;
      show("invite-done");
    } catch (err) {
      Q.busy(button, false);
      if (err instanceof Q.ApiError && err.code === "invite_wrong_account") show("invite-wrong");
      else if (err instanceof Q.ApiError && err.code === "invalid_token") {
        forget();
        show("invite-failed");
      } else Q.showError(err);
    }
  });
})();
