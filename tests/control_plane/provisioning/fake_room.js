// A stand-in for the real Room's cli.js (`node cli.js serve --port U`): answers every request
// on 127.0.0.1:U with the environment it was started with, so a test can see what the Room sees.
"use strict";
const http = require("http");
const port = Number(process.argv[process.argv.indexOf("--port") + 1]);
const keys = [
  "HOME", "npm_config_prefix", "TMPDIR", "PATH", "QUOROOM_DATA_DIR", "QUOROOM_DEPLOYMENT_MODE",
  "QUOROOM_CLOUD_INSTANCE_ID", "QUOROOM_BIND_HOST", "ANTHROPIC_API_KEY",
];
const seen = Object.fromEntries(keys.map((k) => [k, process.env[k] ?? null]));
seen.argv = process.argv.slice(2);
http
  .createServer((req, res) => {
    res.setHeader("content-type", "application/json");
    res.end(JSON.stringify(seen));
  })
  .listen(port, "127.0.0.1");
process.on("SIGTERM", () => process.exit(0));
