// The installable app shell (issue 17): registers the service worker (/sw.js), tells the person
// when a new release has taken over (a notice, never a reload: no reload loop is possible), and
// gives the standalone app a Back button (an installed app has no browser toolbar; iOS has no
// back gesture either). Loaded with `defer` on every page.
"use strict";

(function () {
  const UPDATED_KEY = "quoroom.shellUpdated";
  const release = document.querySelector('meta[name="quoroom-release"]');
  const notice = document.getElementById("app-update");

  function showUpdated() {
    if (!notice) return;
    notice.hidden = false;
  }

  // Shown once on the first page the new release serves, after it took over on the page before.
  try {
    const pending = sessionStorage.getItem(UPDATED_KEY);
    if (pending && release && pending === release.content) {
      sessionStorage.removeItem(UPDATED_KEY);
      showUpdated();
    }
  } catch (err) {
    // Storage may be off (private mode); the notice is a courtesy.
  }

  if ("serviceWorker" in navigator && window.isSecureContext) {
    const hadController = Boolean(navigator.serviceWorker.controller);
    navigator.serviceWorker.addEventListener("controllerchange", () => {
      // The first install claims the page too: that is not an update.
      if (!hadController) return;
      showUpdated();
      const worker = navigator.serviceWorker.controller;
      if (!worker) return;
      const channel = new MessageChannel();
      channel.port1.onmessage = (event) => {
        try {
          sessionStorage.setItem(UPDATED_KEY, String(event.data.release || ""));
        } catch (err) {
          // see above
        }
      };
      worker.postMessage({ type: "release" }, [channel.port2]);
    });
    navigator.serviceWorker
      .register("/sw.js", { scope: "/", updateViaCache: "none" })
      .catch(() => {
        // No worker (blocked, or an old browser): the pages work the same, only not offline.
      });
  }

  document.addEventListener("click", (event) => {
    if (event.target.closest("[data-action=dismiss-update]")) {
      if (notice) notice.hidden = true;
      return;
    }
    if (!event.target.closest("[data-action=app-back]")) return;
    event.preventDefault();
    if (history.length > 1) history.back();
    else location.assign("/app");
  });

  const retry = document.querySelector("[data-action=retry]");
  if (retry) retry.addEventListener("click", () => location.reload());
})();
