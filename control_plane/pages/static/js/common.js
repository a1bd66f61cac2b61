// Shared helpers for the control plane's pages: the API client (session cookie + CSRF header,
// one silent refresh on an expired access token), error display next to the field that caused
// it, and the launch into a Room. Plain JavaScript, no build step; loaded with `defer`.
"use strict";

(function () {
  const Q = (window.Q = {});

  class ApiError extends Error {
    constructor(status, body) {
      const message = (body && body.error) || `request failed (${status})`;
      super(message);
      this.status = status;
      this.code = (body && body.code) || "error";
      this.body = body || {};
      this.field = fieldOf(this.body, message);
      this.problem = this.field ? problemOf(message, this.field) : message;
    }
  }
  Q.ApiError = ApiError;

  // The API's 422 names the field: {"field": "email"} and/or "email: problem" in `error`.
  function fieldOf(body, message) {
    if (typeof body.field === "string" && body.field !== "body") return body.field;
    const match = /^([A-Za-z_][\w.-]*): /.exec(message || "");
    if (match && match[1] !== "body") return match[1];
    return CODE_FIELDS[body.code] || null;
  }
  const CODE_FIELDS = { weak_password: "password" };

  function problemOf(message, field) {
    const prefix = `${field}: `;
    let text = message.startsWith(prefix) ? message.slice(prefix.length) : message;
    text = text.replace(/^(Value error|Assertion failed), /, "");
    return text.charAt(0).toUpperCase() + text.slice(1);
  }

  Q.cookie = function (name) {
    for (const part of document.cookie.split(";")) {
      const [key, ...rest] = part.trim().split("=");
      if (key === name) return decodeURIComponent(rest.join("="));
    }
    return null;
  };

  // The CSRF cookie: __Host-qr_csrf with Secure cookies (production, https), qr_csrf in
  // development over http (control_plane/auth/cookies.py).
  Q.csrfCookie = function () {
    return Q.cookie("__Host-qr_csrf") || Q.cookie("qr_csrf");
  };

  Q.uuid = function () {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  };

  // A local path for `next` (never //host, /\host or a URL): the server checks it too.
  Q.safeNext = function (value, fallback) {
    if (typeof value === "string" && /^\/(?![\/\\])/.test(value) && !/[\\\u0000-\u001f]/.test(value)) {
      return value;
    }
    return fallback || "/app";
  };

  Q.signinUrl = function () {
    const here = location.pathname + location.search;
    return `/signin?next=${encodeURIComponent(Q.safeNext(here))}`;
  };

  async function send(method, path, body, headers) {
    const h = { accept: "application/json", ...headers };
    const csrf = Q.csrfCookie();
    if (csrf && method !== "GET") h["x-csrf-token"] = csrf;
    const init = { method, headers: h, credentials: "same-origin", cache: "no-store" };
    if (body !== undefined) {
      h["content-type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const res = await fetch(path, init);
    let data = null;
    const text = await res.text();
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (err) {
        data = { error: `unexpected answer (${res.status})`, code: "bad_response" };
      }
    }
    return { res, data };
  }

  let refreshing = null;
  // One refresh at a time for the whole page: concurrent 401s wait for the same one.
  Q.refreshSession = function () {
    if (!refreshing) {
      refreshing = send("POST", "/api/auth/refresh")
        .then(({ res }) => res.ok)
        .catch(() => false)
        .finally(() => {
          setTimeout(() => (refreshing = null), 0);
        });
    }
    return refreshing;
  };

  // fetch a JSON API: resolves with the body, rejects with ApiError. On 401 (expired access
  // token) it refreshes the session once and retries; if that fails it goes to sign-in unless
  // `opts.noRedirect`.
  Q.api = async function (method, path, body, opts) {
    const options = opts || {};
    const headers = options.headers || {};
    let { res, data } = await send(method, path, body, headers);
    if (res.status === 401 && !path.startsWith("/api/auth/")) {
      if (await Q.refreshSession()) {
        ({ res, data } = await send(method, path, body, headers));
      }
      if (res.status === 401 && !options.noRedirect) {
        location.assign(Q.signinUrl());
        return new Promise(() => {}); // navigating away
      }
    }
    // A sensitive action of an account with a second factor not proved in the last 10 minutes
    // (issue 15): ask for a code, then try once more.
    if (res.status === 403 && data && data.code === "step_up_required" && !options.noStepUp) {
      if (await Q.stepUp()) ({ res, data } = await send(method, path, body, headers));
    }
    if (!res.ok) throw new ApiError(res.status, data);
    return data;
  };

  // What the person typed as a second factor: six digits are a TOTP code, anything else a
  // recovery code (the server checks both).
  Q.proof = function (value) {
    const text = String(value || "").trim();
    return /^[0-9]{6}$/.test(text.replace(/\s/g, ""))
      ? { code: text.replace(/\s/g, "") }
      : { recovery_code: text };
  };

  // -- passkeys (WebAuthn, issue 15) -----------------------------------------------------------
  // The server's options and the browser's answers travel as JSON with binary values in
  // base64url (py_webauthn's and PublicKeyCredential.toJSON()'s form); converted here by hand so
  // any browser with WebAuthn works, not only those with parseCreationOptionsFromJSON.

  function fromB64url(text) {
    const b64 = String(text).replace(/-/g, "+").replace(/_/g, "/");
    const binary = atob(b64 + "===".slice((b64.length + 3) % 4));
    return Uint8Array.from(binary, (c) => c.charCodeAt(0));
  }

  function toB64url(buffer) {
    let binary = "";
    for (const byte of new Uint8Array(buffer)) binary += String.fromCharCode(byte);
    return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function descriptors(list) {
    return (list || []).map((c) => ({ ...c, id: fromB64url(c.id) }));
  }

  function credentialJSON(credential) {
    const r = credential.response;
    const response = { clientDataJSON: toB64url(r.clientDataJSON) };
    if (r.attestationObject) {
      response.attestationObject = toB64url(r.attestationObject);
      if (r.getTransports) response.transports = r.getTransports();
    } else {
      response.authenticatorData = toB64url(r.authenticatorData);
      response.signature = toB64url(r.signature);
      if (r.userHandle) response.userHandle = toB64url(r.userHandle);
    }
    return {
      id: credential.id,
      rawId: toB64url(credential.rawId),
      type: credential.type,
      authenticatorAttachment: credential.authenticatorAttachment || undefined,
      response,
    };
  }

  Q.passkeysSupported = function () {
    return Boolean(window.PublicKeyCredential && navigator.credentials && window.isSecureContext);
  };

  Q.passkeyCreate = async function (publicKey) {
    const options = {
      ...publicKey,
      challenge: fromB64url(publicKey.challenge),
      user: { ...publicKey.user, id: fromB64url(publicKey.user.id) },
      excludeCredentials: descriptors(publicKey.excludeCredentials),
    };
    return credentialJSON(await navigator.credentials.create({ publicKey: options }));
  };

  Q.passkeyGet = async function (publicKey) {
    const options = {
      ...publicKey,
      challenge: fromB64url(publicKey.challenge),
      allowCredentials: descriptors(publicKey.allowCredentials),
    };
    return credentialJSON(await navigator.credentials.get({ publicKey: options }));
  };

  // A sentence for what went wrong with a passkey: the browser's refusals (cancelled, timed out,
  // another site) and the server's codes.
  const PASSKEY_CODES = {
    passkey_counter_regression:
      "This passkey was refused: it looks copied to another device. Remove it and add it again.",
    passkey_unknown: "This passkey is not registered here. Sign in another way.",
    passkey_origin_mismatch: "The passkey answered for another site.",
    passkey_challenge_expired: "That took too long. Try again.",
    passkey_replayed: "That passkey answer was already used. Try again.",
    passkey_challenge_mismatch: "That passkey request was started elsewhere. Try again.",
    passkey_already_registered: "This passkey is already registered.",
    passkey_limit: "You have the most passkeys allowed. Remove one first.",
    no_passkeys: "Your account has no passkey. Use a code instead.",
    passkeys_unavailable: "Passkeys are not available on this site.",
  };
  Q.passkeyProblem = function (err) {
    if (err instanceof ApiError) {
      return PASSKEY_CODES[err.code] || (err.code.startsWith("passkey_") ? "The passkey could not be verified. Try again." : null);
    }
    if (err && err.name === "NotAllowedError") return "The passkey request was cancelled or timed out.";
    if (err && err.name === "InvalidStateError") return "This device already holds a passkey for your account.";
    if (err && err.name === "SecurityError") return "Passkeys cannot be used on this address.";
    if (err && err.name) return "The passkey could not be used on this device.";
    return null;
  };

  // The step-up dialog (base.html, signed-in pages): resolves true once the second factor was
  // proved for this session, false when the person cancels.
  Q.stepUp = function () {
    const dialog = document.getElementById("step-up-dialog");
    const form = document.getElementById("step-up-form");
    if (!dialog || !form || !dialog.showModal) return Promise.resolve(false);
    return new Promise((resolve) => {
      const done = (ok) => {
        form.removeEventListener("submit", submit);
        dialog.removeEventListener("close", closed);
        cancel.removeEventListener("click", cancelled);
        if (passkey) passkey.removeEventListener("click", withPasskey);
        if (dialog.open) dialog.close();
        resolve(ok);
      };
      const cancel = form.querySelector("[data-action=step-up-cancel]");
      const passkey = form.querySelector("[data-action=step-up-passkey]");
      const cancelled = () => done(false);
      const closed = () => done(false);
      const withPasskey = async () => {
        Q.clearErrors(form);
        Q.busy(passkey, true);
        try {
          const options = await Q.api("POST", "/api/auth/second-factor/verify/passkey/options", undefined, {
            noStepUp: true,
          });
          const credential = await Q.passkeyGet(options.public_key);
          await Q.api("POST", "/api/auth/second-factor/verify/passkey", { credential }, { noStepUp: true });
          done(true);
        } catch (err) {
          const message = Q.passkeyProblem(err);
          if (!message || !Q.fieldError(form, "code", message)) Q.showError(err, form);
        } finally {
          Q.busy(passkey, false);
        }
      };
      const submit = async (event) => {
        event.preventDefault();
        if (!Q.checkForm(form)) return;
        const button = form.querySelector("[type=submit]");
        Q.busy(button, true);
        try {
          await Q.api("POST", "/api/auth/second-factor/verify", Q.proof(form.elements.code.value), {
            noStepUp: true,
          });
          done(true);
        } catch (err) {
          const message =
            err instanceof ApiError && err.status !== 429 ? err.message : null;
          if (!message || !Q.fieldError(form, "code", message.charAt(0).toUpperCase() + message.slice(1) + ".")) {
            Q.showError(err, form);
          }
        } finally {
          Q.busy(button, false);
        }
      };
      form.reset();
      Q.clearErrors(form);
      form.addEventListener("submit", submit);
      dialog.addEventListener("close", closed);
      cancel.addEventListener("click", cancelled);
      if (passkey) {
        passkey.hidden = !Q.passkeysSupported();
        passkey.addEventListener("click", withPasskey);
      }
      dialog.showModal();
    });
  };

  // -- page messages ----------------------------------------------------------------------------

  Q.alert = function (message) {
    const el = document.getElementById("page-alert");
    if (!el) return;
    el.textContent = message || "";
    el.hidden = !message;
    if (message) el.scrollIntoView({ block: "nearest" });
  };

  Q.notice = function (message) {
    const el = document.getElementById("page-notice");
    if (!el) return;
    el.textContent = message || "";
    el.hidden = !message;
  };

  Q.clearErrors = function (form) {
    Q.alert("");
    if (!form) return;
    for (const el of form.querySelectorAll("[data-error-for]")) {
      el.textContent = "";
      el.hidden = true;
    }
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  };

  // Show `message` next to the field named `name` (input name or data-error-for); false if the
  // form has no such field.
  Q.fieldError = function (form, name, message) {
    if (!form) return false;
    const slot = Array.from(form.querySelectorAll("[data-error-for]")).find(
      (el) => el.dataset.errorFor === name
    );
    if (!slot) return false;
    slot.textContent = message;
    slot.hidden = false;
    const details = slot.closest("details");
    if (details) details.open = true;
    const input =
      Array.from(form.elements).find((el) => el.name === name) ||
      slot.closest("fieldset");
    if (input) {
      input.setAttribute("aria-invalid", "true");
      if (input.focus) input.focus();
    }
    return true;
  };

  // An error from Q.api (or the network) shown next to its field, else in the page alert.
  Q.showError = function (err, form) {
    if (err instanceof ApiError) {
      if (err.field && Q.fieldError(form, err.field, err.problem)) return;
      // "credentials.openai" without its own slot: show it on "credentials".
      if (err.field && err.field.includes(".")) {
        const head = err.field.split(".")[0];
        if (Q.fieldError(form, head, `${err.field.slice(head.length + 1)}: ${err.problem}`)) return;
      }
      let message = err.message.charAt(0).toUpperCase() + err.message.slice(1);
      if (err.status === 429) {
        const wait = err.body && err.body.retry_after;
        message = wait ? `${message} (wait ${wait} s)` : message;
      }
      Q.alert(message);
      return;
    }
    Q.alert("The server could not be reached. Check your connection and try again.");
  };

  // Browser-side checks before a request: required fields and HTML constraints.
  Q.checkForm = function (form) {
    Q.clearErrors(form);
    for (const el of form.elements) {
      if (!el.name || !el.willValidate || el.checkValidity()) continue;
      if (el.type === "radio") {
        const legend = el.closest("fieldset") && el.closest("fieldset").querySelector("legend");
        const what = legend ? legend.textContent.trim().toLowerCase() : el.name;
        Q.fieldError(form, el.name, `Choose a ${what}.`);
        return false;
      }
      const label = form.querySelector(`label[for="${el.id}"]`);
      const what = label ? label.textContent.replace(/\s*\(optional\)\s*/, "").trim() : el.name;
      let message = el.validationMessage || "This field is not valid.";
      if (el.validity.valueMissing) message = `${what} is required.`;
      else if (el.validity.typeMismatch && el.type === "email") message = "Enter an email address like name@example.com.";
      else if (el.validity.tooShort) message = `${what} must be at least ${el.minLength} characters.`;
      Q.fieldError(form, el.name, message);
      return false;
    }
    return true;
  };

  // The form's values as an object; empty fields left out; "a.b" names nest ({a: {b}}).
  Q.formValues = function (form) {
    const out = {};
    for (const [name, raw] of new FormData(form).entries()) {
      const value = typeof raw === "string" ? raw.trim() : raw;
      if (value === "") continue;
      const parts = name.split(".");
      let target = out;
      for (const part of parts.slice(0, -1)) target = target[part] = target[part] || {};
      target[parts[parts.length - 1]] = value;
    }
    return out;
  };

  Q.busy = function (button, on, label) {
    if (!button) return;
    if (on) {
      button.dataset.label = button.textContent;
      if (label) button.textContent = label;
      button.disabled = true;
      button.setAttribute("aria-busy", "true");
    } else {
      if (button.dataset.label) button.textContent = button.dataset.label;
      button.disabled = false;
      button.removeAttribute("aria-busy");
    }
  };

  // Submit handler wiring: validate, mark busy, run `handler(values)`, show errors.
  Q.onSubmit = function (form, handler) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (!Q.checkForm(form)) return;
      const button = form.querySelector("[type=submit]");
      Q.busy(button, true);
      try {
        await handler(Q.formValues(form), form);
      } catch (err) {
        Q.showError(err, form);
      } finally {
        Q.busy(button, false);
      }
    });
  };

  Q.el = function (tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child);
    }
    return node;
  };

  Q.STATUS_LABELS = {
    draft: "Draft",
    awaiting_payment: "Awaiting payment",
    provisioning: "Provisioning",
    running: "Running",
    failed: "Failed",
    past_due: "Payment overdue",
    suspended: "Suspended",
    canceled: "Canceled",
    destroying: "Being deleted",
    destroyed: "Deleted",
  };

  Q.money = function (cents, currency) {
    try {
      return new Intl.NumberFormat(undefined, {
        style: "currency",
        currency: (currency || "usd").toUpperCase(),
      }).format(cents / 100);
    } catch (err) {
      return `${(cents / 100).toFixed(2)} ${currency || ""}`;
    }
  };

  // Into the Room: a short-lived runtime token in the launch URL the grant names, in the style
  // the Room's UI reads (#launch=<token> for the reference Room, ?token=<token> for the real
  // one). Never in a Referer: every page here answers with Referrer-Policy: no-referrer.
  Q.launch = async function (instanceId) {
    const grant = await Q.api(
      "POST",
      `/api/cloud/instances/${encodeURIComponent(instanceId)}/runtime-token`
    );
    const target = String(grant.launch_url || "");
    if (!/^https?:\/\/[^/?#]/.test(target)) throw new Error("the Room has no address yet");
    location.replace(target);
  };

  // -- page-wide wiring --------------------------------------------------------------------------

  document.addEventListener("click", async (event) => {
    const button = event.target.closest("[data-action=signout]");
    if (!button) return;
    button.disabled = true;
    try {
      await Q.api("POST", "/api/auth/logout", undefined, { noRedirect: true });
    } catch (err) {
      // Signed out already, or the session ended: either way the cookies are gone or useless.
    }
    location.assign("/");
  });
})();
