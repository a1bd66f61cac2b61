// Sign-in security (/app/security, issue 15): set up an authenticator app (the server draws the
// QR code as SVG; this only shows it), see the recovery codes once, make new ones, turn it off;
// change the password. A step-up answer opens common.js's dialog and the request is retried.
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

  load().catch((err) => {
    $("security-loading").hidden = true;
    Q.showError(err);
  });
})();
