// The control plane's service worker (issue 17), served at /sw.js by control_plane/pages/pwa.py.
// Hand-written, not Workbox: see pwa.py's docstring for why. What it stores, and only that:
//   - at install, this release's static files and the offline shell (fetched without cookies);
//   - static files (/static/…) cache-first.
// Pages go network-first and are never stored (they are personal and cookie-bearing); when the
// network is down a navigation gets the offline shell. Anything else — /api/, /.well-known/,
// other origins (the Rooms), non-GET requests — is left to the network untouched.
"use strict";

const RELEASE = "{{ release }}";
const PREFIX = "quoroom-shell-";
const CACHE = PREFIX + RELEASE;
const PRECACHE = {{ precache | safe }};
const OFFLINE = {{ offline | safe }};
// Never handled, never stored: the API (tokens, sessions, instance data), keys, the worker.
const BYPASS = [/^\/api\//, /^\/\.well-known\//, /^\/sw\.js$/, /^\/healthz$/];

self.addEventListener("install", (event) => {
  event.waitUntil(
    caches
      .open(CACHE)
      .then((cache) =>
        cache.addAll(
          PRECACHE.map((url) => new Request(url, { credentials: "omit", cache: "no-cache" }))
        )
      )
      // A new release takes over without waiting for every window to close: the next
      // navigation is served by it, and pwa.js shows the "updated" notice (never a reload).
      .then(() => self.skipWaiting())
  );
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches
      .keys()
      .then((keys) =>
        Promise.all(keys.filter((k) => k.startsWith(PREFIX) && k !== CACHE).map((k) => caches.delete(k)))
      )
      .then(() => self.clients.claim())
  );
});

self.addEventListener("message", (event) => {
  if (event.data && event.data.type === "release" && event.ports[0]) {
    event.ports[0].postMessage({ release: RELEASE });
  }
});

// Only answers that cannot carry a person's data go into the cache.
function storable(response) {
  if (!response || !response.ok || response.type !== "basic") return false;
  const control = (response.headers.get("cache-control") || "").toLowerCase();
  return !/no-store|private/.test(control) && !response.headers.has("set-cookie");
}

async function cacheFirst(request) {
  const cache = await caches.open(CACHE);
  const hit = await cache.match(request);
  if (hit) return hit;
  const response = await fetch(request);
  if (storable(response)) await cache.put(request, response.clone());
  return response;
}

async function networkFirst(request) {
  try {
    return await fetch(request);
  } catch (err) {
    const shell = await caches.match(OFFLINE, { cacheName: CACHE });
    if (shell) return shell;
    throw err;
  }
}

self.addEventListener("fetch", (event) => {
  const request = event.request;
  if (request.method !== "GET") return;
  const url = new URL(request.url);
  if (url.origin !== self.location.origin) return;
  if (BYPASS.some((pattern) => pattern.test(url.pathname))) return;
  if (request.mode === "navigate") {
    event.respondWith(networkFirst(request));
  } else if (url.pathname.startsWith("/static/")) {
    event.respondWith(cacheFirst(request));
  }
});
