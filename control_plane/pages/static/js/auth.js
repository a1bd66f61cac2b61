// Sign-in, sign-up, email confirmation and password reset pages.
"use strict";

(function () {
  const Q = window.Q;
  const NEXT_KEY = "quoroom.next";

  // A token from an email link: it is in the fragment (#token=…) so it never reaches a server
  // log or a Referer. Read it once and drop it from the address bar and the history.
  function takeHashToken() {
    const params = new URLSearchParams(location.hash.slice(1));
    const token = params.get("token");
    if (location.hash) history.replaceState(null, "", location.pathname + location.search);
    return token;
  }

  function rememberNext(next) {
    try {
      localStorage.setItem(NEXT_KEY, Q.safeNext(next));
    } catch (err) {
      /* storage disabled: the person lands on /app instead */
    }
  }

  function recalledNext() {
    try {
      return Q.safeNext(localStorage.getItem(NEXT_KEY));
    } catch (err) {
      return "/app";
    }
  }

  function show(id) {
    const el = document.getElementById(id);
    if (!el) return;
    el.hidden = false;
    if (el.tabIndex === -1) el.focus();
  }

  // -- sign in ----------------------------------------------------------------------------------

  const signin = document.getElementById("signin-form");
  if (signin) {
    const next = Q.safeNext(signin.dataset.next);
    let lastEmail = "";

    // Sent here because the access token expired? The refresh cookie may still hold a session.
    const triedAt = Number(sessionStorage.getItem("quoroom.resume") || 0);
    if (Q.csrfCookie() && Date.now() - triedAt > 30000) {
      sessionStorage.setItem("quoroom.resume", String(Date.now()));
      Q.refreshSession().then((ok) => {
        if (ok) location.replace(next);
      });
    }

    Q.onSubmit(signin, async (values) => {
      lastEmail = values.email || "";
      document.getElementById("resend").hidden = true;
      let answer;
      try {
        answer = await Q.api("POST", "/api/auth/login", {
          email: values.email,
          password: values.password || "",
          transport: "cookie",
        });
      } catch (err) {
        if (err instanceof Q.ApiError && err.code === "email_not_verified") {
          Q.alert("Confirm your email address first: follow the link we sent you.");
          show("resend");
          return;
        }
        if (err instanceof Q.ApiError && err.code === "invalid_credentials") {
          Q.fieldError(signin, "password", "Invalid email or password.");
          return;
        }
        throw err;
      }
      sessionStorage.removeItem("quoroom.resume");
      if (answer && answer.second_factor_required) {
        // No session yet: the second step (issue 15) holds its state in an HttpOnly cookie.
        location.assign(`/signin/second-factor?next=${encodeURIComponent(next)}`);
        return;
      }
      location.assign(next);
    });

    // Passwordless (issue 15): the browser offers the passkeys it holds for this site.
    const passkeyPanel = document.getElementById("passkey-signin");
    if (passkeyPanel && Q.passkeysSupported()) {
      passkeyPanel.hidden = false;
      passkeyPanel.querySelector("[data-action=passkey-signin]").addEventListener("click", async (event) => {
        const button = event.currentTarget;
        Q.clearErrors(signin);
        Q.busy(button, true);
        try {
          const options = await Q.api("POST", "/api/auth/passkey/options");
          const credential = await Q.passkeyGet(options.public_key);
          await Q.api("POST", "/api/auth/passkey/sign-in", { credential });
        } catch (err) {
          const message = Q.passkeyProblem(err);
          if (message) Q.alert(message);
          else Q.showError(err);
          Q.busy(button, false);
          return;
        }
        sessionStorage.removeItem("quoroom.resume");
        location.assign(next);
      });
    }

    document.addEventListener("click", async (event) => {
      const button = event.target.closest("[data-action=resend-verification]");
      if (!button) return;
      Q.busy(button, true);
      try {
        await Q.api("POST", "/api/auth/resend-verification", { email: lastEmail });
        Q.alert("");
        Q.notice("If the address has an unconfirmed account, a new link is on its way.");
      } catch (err) {
        Q.showError(err, signin);
      } finally {
        Q.busy(button, false);
      }
    });
  }

  // -- sign in: the second factor ----------------------------------------------------------------

  const second = document.getElementById("second-factor-form");
  if (second) {
    const next = Q.safeNext(second.dataset.next);
    Q.onSubmit(second, async (values) => {
      try {
        await Q.api("POST", "/api/auth/second-factor", Q.proof(values.code));
      } catch (err) {
        if (err instanceof Q.ApiError && err.code === "second_factor_expired") {
          second.hidden = true;
          show("second-factor-expired");
          return;
        }
        if (err instanceof Q.ApiError && (err.code === "invalid_code" || err.code === "code_reused")) {
          const text =
            err.code === "code_reused"
              ? "This code was already used. Wait for the next one."
              : "That code is not right. Check the time on your phone, or use a recovery code.";
          Q.fieldError(second, "code", text);
          return;
        }
        if (err instanceof Q.ApiError && err.code === "invalid_body") {
          Q.fieldError(second, "code", "Enter the six digits your app shows, or a recovery code.");
          return;
        }
        throw err;
      }
      location.assign(next);
    });

    const passkeyPanel = document.getElementById("second-factor-passkey");
    if (passkeyPanel && Q.passkeysSupported()) {
      passkeyPanel.hidden = false;
      passkeyPanel.querySelector("button").addEventListener("click", async (event) => {
        const button = event.currentTarget;
        Q.clearErrors(second);
        Q.busy(button, true);
        try {
          const options = await Q.api("POST", "/api/auth/second-factor/passkey/options");
          const credential = await Q.passkeyGet(options.public_key);
          await Q.api("POST", "/api/auth/second-factor/passkey", { credential });
        } catch (err) {
          Q.busy(button, false);
          if (err instanceof Q.ApiError && err.code === "second_factor_expired") {
            second.hidden = true;
            show("second-factor-expired");
            return;
          }
          const message = Q.passkeyProblem(err);
          if (message) Q.alert(message);
          else Q.showError(err);
          return;
        }
        location.assign(next);
      });
    }
  }

  // -- sign up ----------------------------------------------------------------------------------

  const signup = document.getElementById("signup-form");
  if (signup) {
    Q.onSubmit(signup, async (values) => {
      const body = { email: values.email, password: values.password || "" };
      if (values.name) body.name = values.name;
      await Q.api("POST", "/api/auth/signup", body);
      rememberNext(signup.dataset.next);
      signup.hidden = true;
      document.querySelector("#signup-done [data-slot=email]").textContent = values.email;
      show("signup-done");
    });
  }

  // -- confirm email ----------------------------------------------------------------------------

  if (document.body.dataset.page === "verify-email") {
    const token = takeHashToken();
    const progress = document.getElementById("verify-progress");
    const fail = () => {
      progress.hidden = true;
      show("verify-failed");
    };
    if (!token) {
      fail();
    } else {
      Q.api("POST", "/api/auth/verify-email", { token })
        .then(() => {
          progress.hidden = true;
          const next = recalledNext();
          document.getElementById("verify-continue").href =
            `/signin?next=${encodeURIComponent(next)}`;
          show("verify-done");
        })
        .catch((err) => {
          if (err instanceof Q.ApiError && err.status === 400) fail();
          else {
            progress.hidden = true;
            Q.showError(err);
          }
        });
    }
  }

  // -- forgot and reset -------------------------------------------------------------------------

  const forgot = document.getElementById("forgot-form");
  if (forgot) {
    Q.onSubmit(forgot, async (values) => {
      await Q.api("POST", "/api/auth/forgot-password", { email: values.email });
      forgot.hidden = true;
      show("forgot-done");
    });
  }

  const reset = document.getElementById("reset-form");
  if (reset) {
    const token = takeHashToken();
    if (!token) {
      reset.hidden = true;
      show("reset-missing");
    }
    Q.onSubmit(reset, async (values) => {
      if ((values.password || "") !== (values.password_confirm || "")) {
        Q.fieldError(reset, "password_confirm", "The two passwords are not the same.");
        return;
      }
      try {
        await Q.api("POST", "/api/auth/reset-password", { token, password: values.password });
      } catch (err) {
        if (err instanceof Q.ApiError && err.code === "invalid_token") {
          Q.alert("This link is invalid, expired or already used. Ask for a new one.");
          return;
        }
        throw err;
      }
      reset.hidden = true;
      show("reset-done");
    });
  }
})();
