// /cloud/new/provisioning?instance=…[&session_id=…]: live status of a new Room, polled every
// second — each step, the elapsed time, errors with a Retry — then into the Room.
"use strict";

(function () {
  const Q = window.Q;
  const root = document.getElementById("provisioning");
  if (!root) return;
  const id = root.dataset.instance;
  const base = `/api/cloud/instances/${encodeURIComponent(id)}`;
  const POLL_MS = 1000;
  const CHECKLIST = [
    ["payment", "Payment confirmed"],
    ["app", "App created"],
    ["secrets", "Secrets set"],
    ["volume", "Storage volume ready"],
    ["machine", "Machine started"],
    ["running", "Health check passed"],
  ];
  const PROVISION_STEPS = ["app", "secrets", "volume", "machine"];
  const FINAL = new Set(["canceled", "destroying", "destroyed"]);

  const statusEl = document.getElementById("prov-status");
  const stepEl = document.getElementById("prov-step");
  const elapsedEl = document.getElementById("prov-elapsed");
  const bar = document.getElementById("prov-bar");
  const eventsEl = document.getElementById("prov-events");
  const errorBox = document.getElementById("prov-error");
  const errorText = document.getElementById("prov-error-text");
  const retryButton = document.getElementById("prov-retry");
  const launchEl = document.getElementById("prov-launch");

  const pageStart = Date.now();
  let startedAt = null; // when provisioning began (from the events), else the page load
  let stoppedAt = null;
  let timer = null;
  let launching = false;
  let seenEvents = 0;

  // -- checkout confirmation (Stripe's success_url brings session_id) ------------------------------

  async function confirmOnce() {
    const params = new URLSearchParams(location.search);
    const sessionId = params.get("session_id");
    if (!sessionId) return;
    // Out of the address bar, so a reload or a shared link does not confirm again.
    params.delete("session_id");
    history.replaceState(null, "", `${location.pathname}?${params.toString()}`);
    const key = `quoroom.confirmed.${id}`;
    if (sessionStorage.getItem(key)) return;
    sessionStorage.setItem(key, "1");
    try {
      await Q.api("POST", `${base}/checkout/confirm`, { session_id: sessionId });
    } catch (err) {
      // The webhook fulfils the same payment; a refused confirm is shown, polling goes on.
      Q.showError(err);
    }
  }

  // -- rendering --------------------------------------------------------------------------------

  function checklistState(status, step) {
    let done = 0; // how many CHECKLIST items are complete
    if (status === "running") done = CHECKLIST.length;
    else if (status === "draft" || status === "awaiting_payment") done = 0;
    else {
      done = 1;
      const index = PROVISION_STEPS.indexOf(step);
      if (index >= 0) done = index + 2;
    }
    return done;
  }

  function renderChecklist(status, step) {
    const done = checklistState(status, step);
    let list = document.getElementById("prov-checklist");
    if (!list) {
      list = Q.el("ol", { class: "events checklist", id: "prov-checklist" });
      for (const [key, label] of CHECKLIST) {
        list.append(
          Q.el(
            "li",
            { dataset: { key } },
            Q.el("span", { class: "mark", "aria-hidden": "true" }),
            Q.el("span", { class: "label", text: label }),
            Q.el("span", { class: "sr-state visually-hidden" })
          )
        );
      }
      eventsEl.before(list);
    }
    Array.from(list.children).forEach((item, index) => {
      let state = "todo";
      if (index < done) state = "done";
      else if (index === done) state = status === "failed" ? "failed" : "current";
      item.dataset.state = state;
      item.querySelector(".mark").textContent =
        state === "done" ? "✓" : state === "failed" ? "✕" : state === "current" ? "…" : "·";
      item.querySelector(".sr-state").textContent = ` (${state})`;
    });
    bar.style.width = `${Math.max(5, Math.round((done / CHECKLIST.length) * 100))}%`;
  }

  function secondsSince(at) {
    return Math.max(0, ((stoppedAt || Date.now()) - at) / 1000);
  }

  function tick() {
    const from = startedAt || pageStart;
    elapsedEl.textContent = secondsSince(from).toFixed(stoppedAt ? 1 : 0);
  }

  function renderEvents(events) {
    for (const event of events.slice(seenEvents)) {
      const at = Date.parse(event.at);
      if (!startedAt && event.to === "provisioning" && !Number.isNaN(at)) startedAt = at;
      const rel = startedAt && !Number.isNaN(at) ? `${Math.max(0, (at - startedAt) / 1000).toFixed(1)} s` : "";
      const text = event.message || `${event.from || "—"} → ${event.to || "—"}`;
      eventsEl.append(
        Q.el(
          "li",
          { dataset: { kind: event.kind } },
          Q.el("span", { class: "at", text: rel }),
          Q.el("span", { text })
        )
      );
    }
    seenEvents = events.length;
  }

  function render(state) {
    statusEl.dataset.status = state.status;
    statusEl.textContent = Q.STATUS_LABELS[state.status] || state.status;
    stepEl.textContent =
      state.status === "provisioning"
        ? state.step ? `last step: ${state.step}` : "starting"
        : state.status === "awaiting_payment" ? "waiting for the payment to be confirmed" : "";
    renderEvents(state.events || []);
    renderChecklist(state.status, state.step);
    const failed = state.status === "failed";
    errorBox.hidden = !failed;
    if (failed) errorText.textContent = state.error || "Provisioning failed.";
  }

  // -- the loop ---------------------------------------------------------------------------------

  function stop() {
    stoppedAt = stoppedAt || Date.now();
    clearInterval(timer);
    tick();
  }

  async function poll() {
    let state;
    try {
      state = await Q.api("GET", `${base}/status`);
    } catch (err) {
      if (err instanceof Q.ApiError && err.status === 404) {
        stop();
        Q.alert("This Room does not exist, or it is not yours.");
        return;
      }
      Q.showError(err);
      setTimeout(poll, POLL_MS * 3);
      return;
    }
    Q.alert("");
    render(state);
    if (state.status === "running" && state.url) {
      stop();
      await launch();
      return;
    }
    if (state.status === "failed") {
      stop();
      return; // Retry restarts the loop
    }
    if (FINAL.has(state.status)) {
      stop();
      Q.alert("This Room was canceled.");
      return;
    }
    setTimeout(poll, POLL_MS);
  }

  async function launch() {
    if (launching) return;
    launching = true;
    launchEl.hidden = false;
    try {
      await Q.launch(id);
    } catch (err) {
      launching = false;
      launchEl.hidden = true;
      Q.showError(err);
      const again = Q.el("button", { type: "button", class: "button primary", text: "Open the Room" });
      again.addEventListener("click", () => {
        again.remove();
        launch();
      });
      root.append(again);
    }
  }

  retryButton.addEventListener("click", async () => {
    Q.busy(retryButton, true, "Retrying…");
    try {
      await Q.api("POST", `${base}/retry`);
      errorBox.hidden = true;
      stoppedAt = null;
      startedAt = null;
      timer = setInterval(tick, 200);
      await poll();
    } catch (err) {
      Q.showError(err);
    } finally {
      Q.busy(retryButton, false);
    }
  });

  timer = setInterval(tick, 200);
  confirmOnce().finally(poll);
})();
