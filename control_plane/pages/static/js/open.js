// /app/instances/{id}/open: a runtime token, then into the Room at the grant's launch_url.
"use strict";

(function () {
  const Q = window.Q;
  const root = document.getElementById("open");
  if (!root) return;
  const status = document.getElementById("open-status");
  Q.launch(root.dataset.instance).catch((err) => {
    status.textContent = "The Room could not be opened.";
    if (err instanceof Q.ApiError && err.status === 409) {
      Q.alert("This Room is not running right now. Check its status on your Rooms page.");
    } else {
      Q.showError(err);
    }
  });
})();
