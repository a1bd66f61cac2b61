// Sign-in security (/app/security, issue 15): set up an authenticator app (the server draws the
// QR code as SVG; this only shows it), see the recovery codes once, make new ones, turn it off;
// change the password; add, rename and remove passkeys; see where the account is signed in and
// sign a session (or every session) out. A step-up answer opens common.js's dialog and the
// request is retried.
"use strict";

(function () {
  const Q = window.Q;
  const $ = (id) => document.getElementById(id);
  const sections = ["totp-off", "totp-setup", "recovery-codes", "totp-on"];

  function only(id) {
    for (const name of sections) $(name).hidden = name !== id;
    const el = $(id);
    if (el && el.tabIndex === -1) el.focus();
  }

  async function load() {
    const status = await Q.api("GET", "/api/auth/second-factor");
    $("security-loading").hidden = true;
    if (status.totp_enabled) {
      $("recovery-left").textContent = String(status.recovery_codes_left);
      only("totp-on");
    } else {
      only("totp-off");
    }
  }

  function showCodes(codes) {
    const list = $("recovery-code-list");
    list.replaceChildren(...codes.map((code) => Q.el("li", { text: code })));
    only("recovery-codes");
  }

  document.addEventListener("click", async (event) => {
    const button = event.target.closest("[data-action]");
    if (!button) return;
    const action = button.dataset.action;
    if (!["totp-setup", "recovery-new", "recovery-done"].includes(action)) return;
    if (action === "recovery-done") {
      $("recovery-code-list").replaceChildren();
      await load();
      return;
    }
    Q.alert("");
    Q.busy(button, true);
    try {
      if (action === "totp-setup") {
        const setup = await Q.api("POST", "/api/auth/totp/setup");
        const src = String(setup.qr_data_uri || "");
        if (src.startsWith("data:image/svg+xml")) $("totp-qr").src = src;
        $("totp-secret").textContent = setup.secret;
        only("totp-setup");
      } else {
        const answer = await Q.api("POST", "/api/auth/totp/recovery-codes");
        showCodes(answer.recovery_codes);
      }
    } catch (err) {
      Q.showError(err);
    } finally {
      Q.busy(button, false);
    }
  });

  const confirm = $("totp-confirm-form");
  Q.onSubmit(confirm, async (values, form) => {
    try {
      const answer = await Q.api("POST", "/api/auth/totp/confirm", { code: values.code || "" });
      form.reset();
      $("totp-secret").textContent = "";
      $("totp-qr").removeAttribute("src");
      showCodes(answer.recovery_codes);
    } catch (err) {
      if (err instanceof Q.ApiError && ["invalid_code", "code_reused", "invalid_body"].includes(err.code)) {
        Q.fieldError(form, "code", "That code is not right. Enter the six digits the app shows now.");
        return;
      }
      throw err;
    }
  });

  const disable = $("totp-disable-form");
  Q.onSubmit(disable, async (values, form) => {
    try {
      await Q.api("POST", "/api/auth/totp/disable", Q.proof(values.code));
    } catch (err) {
      if (err instanceof Q.ApiError && ["invalid_code", "code_reused", "invalid_body"].includes(err.code)) {
        const text =
          err.code === "code_reused" ? "This code was already used. Wait for the next one." : "That code is not right.";
        Q.fieldError(form, "code", text);
        return;
      }
      throw err;
    }
    form.reset();
    Q.notice("Two-step sign-in is off.");
    await load();
  });

  const password = $("password-form");
  Q.onSubmit(password, async (values, form) => {
    try {
      await Q.api("POST", "/api/auth/password", {
        current_password: values.current_password,
        password: values.password || "",
      });
    } catch (err) {
      if (err instanceof Q.ApiError && err.code === "invalid_credentials") {
        Q.fieldError(form, "current_password", "The current password is not right.");
        return;
      }
      throw err;
    }
    form.reset();
    Q.notice("Your password was changed. Other devices were signed out.");
  });

  // -- passkeys ----------------------------------------------------------------------------------

  const when = (iso) => {
    const date = new Date(iso);
    return Q.el("time", { datetime: iso, text: date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" }) });
  };

  function passkeyRow(passkey) {
    const meta = Q.el("p", { class: "muted" }, "Added ", when(passkey.created_at), " · ");
    if (passkey.last_used_at) meta.append("last used ", when(passkey.last_used_at));
    else meta.append("never used");
    const fieldId = `rename-${passkey.id}`;
    const rename = Q.el(
      "form",
      { class: "form rename-form", novalidate: true, hidden: true, dataset: { id: passkey.id } },
      Q.el(
        "div",
        { class: "field" },
        Q.el("label", { for: fieldId, text: `New name for “${passkey.name}”` }),
        Q.el("input", {
          id: fieldId,
          name: "name",
          type: "text",
          maxlength: "64",
          required: true,
          value: passkey.name,
          "aria-describedby": `${fieldId}-error`,
        }),
        Q.el("p", { class: "field-error", id: `${fieldId}-error`, hidden: true, dataset: { errorFor: "name" } })
      ),
      Q.el(
        "div",
        { class: "item-actions" },
        Q.el("button", { type: "submit", class: "button small primary", text: "Save" }),
        Q.el("button", { type: "button", class: "button small", text: "Cancel", dataset: { action: "rename-cancel" } })
      )
    );
    return Q.el(
      "li",
      { class: "item", dataset: { id: passkey.id } },
      Q.el(
        "div",
        { class: "item-main" },
        Q.el("strong", { class: "item-name", text: passkey.name }),
        meta,
        passkey.counter_regressed_at
          ? Q.el("p", {
              class: "item-warning",
              text: "Refused since it looked copied to another device (its signature counter went backwards). Remove it and add it again.",
            })
          : null
      ),
      Q.el(
        "div",
        { class: "item-actions" },
        Q.el("button", {
          type: "button",
          class: "button small",
          text: "Rename",
          "aria-label": `Rename passkey “${passkey.name}”`,
          dataset: { action: "passkey-rename", id: passkey.id },
        }),
        Q.el("button", {
          type: "button",
          class: "button small",
          text: "Remove",
          "aria-label": `Remove passkey “${passkey.name}”`,
          dataset: { action: "passkey-remove", id: passkey.id, name: passkey.name },
        })
      ),
      rename
    );
  }

  async function loadPasskeys() {
    const data = await Q.api("GET", "/api/auth/passkeys");
    $("passkeys-loading").hidden = true;
    $("passkey-list").replaceChildren(...data.passkeys.map(passkeyRow));
    $("passkeys-empty").hidden = data.passkeys.length > 0;
  }

  const addPasskey = $("passkey-add-form");
  if (!Q.passkeysSupported()) {
    $("passkeys-unsupported").hidden = false;
    addPasskey.hidden = true;
  }
  Q.onSubmit(addPasskey, async (values, form) => {
    const options = await Q.api("POST", "/api/auth/passkeys/options");
    let credential;
    try {
      credential = await Q.passkeyCreate(options.public_key);
    } catch (err) {
      Q.fieldError(form, "passkey_name", Q.passkeyProblem(err) || "The passkey could not be created.");
      return;
    }
    const body = { credential };
    if (values.passkey_name) body.name = values.passkey_name;
    let answer;
    try {
      answer = await Q.api("POST", "/api/auth/passkeys", body);
    } catch (err) {
      const message = Q.passkeyProblem(err);
      if (message && Q.fieldError(form, "passkey_name", message)) return;
      throw err;
    }
    form.reset();
    Q.notice(`Passkey “${answer.passkey.name}” added.`);
    await loadPasskeys();
    if (answer.recovery_codes) showCodes(answer.recovery_codes);
  });

  $("passkey-list").addEventListener("click", async (event) => {
    const button = event.target.closest("[data-action]");
    if (!button) return;
    const item = button.closest("li.item");
    const form = item && item.querySelector(".rename-form");
    if (button.dataset.action === "passkey-rename" && form) {
      form.hidden = false;
      form.elements.name.focus();
      form.elements.name.select();
    } else if (button.dataset.action === "rename-cancel" && form) {
      form.hidden = true;
      Q.clearErrors(form);
      item.querySelector("[data-action=passkey-rename]").focus();
    } else if (button.dataset.action === "passkey-remove") {
      if (!window.confirm(`Remove the passkey “${button.dataset.name}”? It will no longer sign you in.`)) return;
      Q.busy(button, true);
      try {
        await Q.api("DELETE", `/api/auth/passkeys/${encodeURIComponent(button.dataset.id)}`);
      } catch (err) {
        Q.busy(button, false);
        Q.showError(err);
        return;
      }
      Q.notice(`Passkey “${button.dataset.name}” removed.`);
      await Promise.all([loadPasskeys(), load()]);
      $("passkeys-title").focus();
    }
  });

  $("passkey-list").addEventListener("submit", async (event) => {
    const form = event.target.closest(".rename-form");
    if (!form) return;
    event.preventDefault();
    if (!Q.checkForm(form)) return;
    const button = form.querySelector("[type=submit]");
    Q.busy(button, true);
    try {
      const renamed = await Q.api("PATCH", `/api/auth/passkeys/${encodeURIComponent(form.dataset.id)}`, {
        name: form.elements.name.value.trim(),
      });
      Q.notice(`Passkey renamed to “${renamed.name}”.`);
      await loadPasskeys();
      const again = $("passkey-list").querySelector(`li[data-id="${CSS.escape(renamed.id)}"] [data-action=passkey-rename]`);
      if (again) again.focus();
    } catch (err) {
      Q.busy(button, false);
      Q.showError(err, form);
    }
  });

  // -- sessions (issue 15, item 5) --------------------------------------------------------------

  const METHODS = { password: "password", google: "Google", passkey: "passkey" };

  function sessionRow(session) {
    const meta = Q.el("p", { class: "muted" });
    if (session.network) meta.append(`Network ${session.network} · `);
    meta.append("signed in ", when(session.created_at), ` with ${METHODS[session.method] || session.method} · last active `, when(session.last_used_at));
    const label = session.current ? `Sign out this device (${session.device})` : `Sign out ${session.device}, signed in ${new Date(session.created_at).toLocaleString()}`;
    return Q.el(
      "li",
      { class: "item", dataset: { id: session.id } },
      Q.el(
        "div",
        { class: "item-main" },
        Q.el(
          "strong",
          { class: "item-name" },
          session.device,
          session.current ? Q.el("span", { class: "badge", text: "This device" }) : null
        ),
        meta
      ),
      Q.el(
        "div",
        { class: "item-actions" },
        Q.el("button", {
          type: "button",
          class: "button small",
          text: "Sign out",
          "aria-label": label,
          dataset: { action: "session-revoke", id: session.id, current: session.current ? "1" : "", device: session.device },
        })
      )
    );
  }

  async function loadSessions() {
    const data = await Q.api("GET", "/api/auth/sessions");
    $("sessions-loading").hidden = true;
    $("session-list").replaceChildren(...data.sessions.map(sessionRow));
  }

  $("session-list").addEventListener("click", async (event) => {
    const button = event.target.closest("[data-action=session-revoke]");
    if (!button) return;
    Q.busy(button, true);
    try {
      await Q.api("DELETE", `/api/auth/sessions/${encodeURIComponent(button.dataset.id)}`);
    } catch (err) {
      Q.busy(button, false);
      Q.showError(err);
      return;
    }
    if (button.dataset.current) {
      location.assign("/signin");
      return;
    }
    Q.notice(`${button.dataset.device} was signed out.`);
    await loadSessions();
    $("sessions-title").focus();
  });

  document.querySelector("[data-action=signout-everywhere]").addEventListener("click", async (event) => {
    const button = event.currentTarget;
    if (!window.confirm("Sign out every device, this one included?")) return;
    Q.busy(button, true);
    try {
      await Q.api("POST", "/api/auth/sessions/revoke-all");
    } catch (err) {
      Q.busy(button, false);
      Q.showError(err);
      return;
    }
    location.assign("/signin");
  });

  const failed = (loading) => (err) => {
    $(loading).hidden = true;
    Q.showError(err);
  };
  load().catch(failed("security-loading"));
  loadPasskeys().catch(failed("passkeys-loading"));
  loadSessions().catch(failed("sessions-loading"));
})();
