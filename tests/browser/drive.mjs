// Loads the test page (see build.mjs, src/app.mjs) in headless Chromium,
// waits until every call has ended, and prints what the page shows as one
// JSON document on stdout:
//
//   {
//     "state": "done" | "failed" | <the page's state when time ran out>,
//     "fatal": text of #fatal (why the page could not start), or "",
//     "rows": [{ "transport", "call", "outcome": "ok"|"error", "text" }],
//     "console": [{ "source", "level", "text" }]   (console and browser log,
//                                                   CORS refusals included),
//     "requests": [{ "method", "url", "type", "status", "requestHeaders",
//                    "responseHeaders", "failure" }]  (every request to the
//                    engine, preflights included, as DevTools sees them),
//     "screenshot": path or null
//   }
//
// Usage: node tests/browser/drive.mjs PAGE_URL [--screenshot FILE]
//        [--timeout-ms N]
// Exit status: 0 when the page reached state "done", 1 otherwise (the JSON
// is printed either way), 2 for bad arguments.
//
// The browser is the system's Chromium (Debian package `chromium`), never a
// downloaded one: WIRESTUB_CHROMIUM (default /usr/bin/chromium). It runs
// headless with a fresh user-data-dir, removed afterwards, and nothing but
// loopback traffic (no background networking, component updates or sync).

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { chromium } from "playwright-core";

const CHROMIUM_FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  // No name lookups: the page and the engine are addressed by IP literal,
  // and without this Chromium still looks up a few Google hosts (account
  // and update services) at start, through the system's resolver.
  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
];

function parseArgs(argv) {
  const out = { url: null, screenshot: null, timeoutMs: 60000 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--screenshot") out.screenshot = argv[++i];
    else if (a === "--timeout-ms") out.timeoutMs = Number(argv[++i]);
    else if (!out.url && !a.startsWith("--")) out.url = a;
    else throw new Error(`unexpected argument ${a}`);
  }
  if (!out.url) throw new Error("no page URL");
  if (!(out.timeoutMs > 0)) throw new Error("--timeout-ms needs a positive number");
  return out;
}

let args;
try {
  args = parseArgs(process.argv.slice(2));
} catch (e) {
  console.error(`${e.message}\nusage: node drive.mjs PAGE_URL [--screenshot FILE] [--timeout-ms N]`);
  process.exit(2);
}

const pageOrigin = new URL(args.url).origin;
const userDataDir = mkdtempSync(join(tmpdir(), "wirestub-chromium-"));
const report = {
  state: null,
  fatal: "",
  rows: [],
  console: [],
  requests: [],
  screenshot: null,
};
let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.WIRESTUB_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    chromiumSandbox: false,
    args: CHROMIUM_FLAGS,
    timeout: 60000,
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (m) => report.console.push({ source: "console", level: m.type(), text: m.text() }));
  page.on("pageerror", (e) => report.console.push({ source: "pageerror", level: "error", text: String(e) }));

  // DevTools' view of the network: unlike Playwright's request events, it
  // has the CORS preflights, and the browser's log has its CORS refusals.
  const cdp = await context.newCDPSession(page);
  const byId = new Map();
  cdp.on("Network.requestWillBeSent", (e) => {
    if (new URL(e.request.url).origin === pageOrigin) return;
    const r = {
      method: e.request.method,
      url: e.request.url,
      type: e.type ?? null,
      status: null,
      requestHeaders: lower(e.request.headers),
      responseHeaders: null,
      failure: null,
    };
    byId.set(e.requestId + (e.type === "Preflight" ? ":preflight" : ""), r);
    report.requests.push(r);
  });
  cdp.on("Network.responseReceived", (e) => {
    const r = byId.get(e.requestId + (e.type === "Preflight" ? ":preflight" : "")) ?? byId.get(e.requestId);
    if (!r) return;
    r.status = e.response.status;
    r.responseHeaders = lower(e.response.headers);
  });
  cdp.on("Network.loadingFailed", (e) => {
    const r = byId.get(e.requestId + (e.type === "Preflight" ? ":preflight" : "")) ?? byId.get(e.requestId);
    if (!r) return;
    r.failure = [e.errorText, e.corsErrorStatus?.corsError].filter(Boolean).join(" ");
  });
  cdp.on("Log.entryAdded", ({ entry }) =>
    report.console.push({ source: `log:${entry.source}`, level: entry.level, text: entry.text }),
  );
  await cdp.send("Network.enable");
  await cdp.send("Network.setCacheDisabled", { cacheDisabled: true });
  await cdp.send("Log.enable");

  await page.goto(args.url, { waitUntil: "load", timeout: 30000 });
  try {
    await page.waitForFunction(
      () => document.body.dataset.state === "done" || document.body.dataset.state === "failed",
      undefined,
      { timeout: args.timeoutMs, polling: 50 },
    );
  } catch (e) {
    report.console.push({ source: "driver", level: "error", text: `waiting for the page: ${e.message}` });
  }
  Object.assign(
    report,
    await page.evaluate(() => ({
      state: document.body.dataset.state,
      fatal: document.getElementById("fatal")?.textContent ?? "",
      rows: [...document.querySelectorAll("#results tr")].map((tr) => ({
        transport: tr.dataset.transport,
        call: tr.dataset.call,
        outcome: tr.dataset.outcome ?? tr.cells[2]?.textContent,
        text: tr.cells[3]?.textContent ?? "",
      })),
    })),
  );
  if (args.screenshot) {
    await page.screenshot({ path: args.screenshot, fullPage: true });
    report.screenshot = args.screenshot;
  }
} catch (e) {
  report.console.push({ source: "driver", level: "error", text: String(e?.stack ?? e) });
} finally {
  await context?.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}

function lower(headers) {
  const out = {};
  for (const [k, v] of Object.entries(headers ?? {})) out[k.toLowerCase()] = v;
  return out;
}

process.stdout.write(JSON.stringify(report, null, 2) + "\n");
process.exitCode = report.state === "done" ? 0 : 1;
