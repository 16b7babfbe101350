// Drives the engine's web UI (/ui/ on the admin listener) in headless
// Chromium through a scenario and prints what it saw as one JSON document:
//
//   { "scenario", "steps": [{ "name", "ok", "seen", "error" }],
//     "console": [{ "level", "text" }], "screenshots": [paths],
//     "refused": [{ "url", "afterToken" }] (401s), "failed": [{ "url", "status" }] (other 4xx/5xx) }
//
// Scenarios:
//   main   token prompt; Services (the example's methods, a method's rules);
//          Try it (an answer); Calls (the call appears live; a call no rule
//          answered opened, its failing condition read); Edit (a rule file
//          with a mistake: the diagnostic at its line; fixed: the new
//          answer); Load (rates and percentiles drawn); Status (reload);
//          keyboard focus visible.
//   scale  a method with 10,000 rules and a journal of 10,000 calls: the
//          pages show them a page at a time.
//
// Usage: node tests/browser/ui.mjs ADMIN_URL --scenario main|scale
//        [--token T] [--screenshots DIR] [--serving URL]
// Exit status 0 when every step held, 1 otherwise (the JSON is printed
// either way), 2 for bad arguments. The browser is the system's Chromium
// (WIRESTUB_CHROMIUM, default /usr/bin/chromium), never a downloaded one.

import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { chromium } from "playwright-core";

const FLAGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
];
const WAIT = 20000;

const argv = process.argv.slice(2);
const opts = { url: null, scenario: "main", token: "", screenshots: null };
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  if (a === "--scenario") opts.scenario = argv[++i];
  else if (a === "--token") opts.token = argv[++i];
  else if (a === "--screenshots") opts.screenshots = argv[++i];
  else if (!opts.url && !a.startsWith("--")) opts.url = a.replace(/\/+$/, "");
  else {
    console.error(`unexpected argument ${a}`);
    process.exit(2);
  }
}
if (!opts.url || !["main", "scale", "shared"].includes(opts.scenario)) {
  console.error("usage: node ui.mjs ADMIN_URL --scenario main|scale|shared [--token T] [--screenshots DIR]");
  process.exit(2);
}
if (opts.screenshots) mkdirSync(opts.screenshots, { recursive: true });

const report = { scenario: opts.scenario, steps: [], console: [], screenshots: [], refused: [], failed: [] };
let page;
let tokenGiven = false;

async function step(name, f) {
  const s = { name, ok: false, seen: null, error: null };
  report.steps.push(s);
  try {
    s.seen = (await f()) ?? null;
    s.ok = true;
  } catch (e) {
    s.error = String(e?.message ?? e);
  }
  return s.ok;
}

async function shot(name) {
  if (!opts.screenshots) return;
  const path = join(opts.screenshots, `${name}.png`);
  await page.screenshot({ path, fullPage: true });
  report.screenshots.push(path);
}

const text = (sel) => page.locator(sel).first().innerText({ timeout: WAIT });
const go = async (hash) => {
  await page.evaluate((h) => { location.hash = h; }, hash);
};

/** A Connect JSON call from the page itself to the serving port. */
async function callFromPage(path, body, metadata = {}) {
  return page.evaluate(async ([path, body, metadata]) => {
    const base = document.getElementById("try-endpoint")?.value;
    const status = await (await fetch("/admin/status", { headers: { authorization: `Bearer ${sessionStorage.getItem("wirestub-admin-token") || ""}` } })).json();
    const l = status.listeners.find((x) => x.kind === "grpc");
    const url = (base || `http://127.0.0.1:${l.addr.split(":").pop()}`) + path;
    const r = await fetch(url, { method: "POST", headers: { ...metadata, "content-type": "application/json", "connect-protocol-version": "1" }, body: JSON.stringify(body) });
    return { status: r.status, body: await r.json() };
  }, [path, body, metadata]);
}

async function trySend(method, request, metadata = "", deadlineMs = 10000) {
  const [svc, m] = method.split("/").slice(1);
  await go(`#/try/${svc}/${m}`);
  await page.waitForFunction((p) => document.getElementById("try-method")?.value === p && document.getElementById("try-request").value.length > 1, method, { timeout: WAIT });
  await page.fill("#try-request", JSON.stringify(request));
  await page.fill("#try-metadata", metadata);
  await page.fill("#try-timeout", String(deadlineMs));
  await page.evaluate(() => document.getElementById("try-result").replaceChildren());
  await page.click("#try-send");
  await page.waitForFunction(() => {
    const s = document.getElementById("try-status");
    return s && s.textContent !== "…";
  }, undefined, { timeout: WAIT });
  return {
    status: await text("#try-status"),
    message: (await page.locator("#try-message").count()) ? await text("#try-message") : "",
    messages: await page.locator("#try-messages pre").evaluateAll((l) => l.slice(0, 20).map((e) => e.innerText)),
    shown: await page.locator("#try-messages pre").count(),
    more: (await page.locator("#try-result p.muted:not([hidden])").allInnerTexts()).join(" "),
    headers: await text("#try-headers"),
    trailers: await text("#try-trailers"),
  };
}

async function main() {
  await step("token prompt", async () => {
    await page.goto(`${opts.url}/ui/`, { waitUntil: "load" });
    if (!opts.token) return "no token";
    await page.waitForSelector("#token-dialog[open]", { timeout: WAIT });
    await page.fill("#token-input", opts.token);
    await page.click("#token-save");
    await page.waitForSelector("#token-dialog", { state: "detached", timeout: WAIT });
    tokenGiven = true;
    return "token accepted";
  });

  await step("services", async () => {
    await go("#/services");
    await page.waitForSelector('a[data-method="/helloworld.Greeter/SayHello"]', { timeout: WAIT });
    const services = await page.locator("h2.service").allInnerTexts();
    await page.click('a[data-method="/helloworld.Greeter/SayHello"]');
    await page.waitForSelector("#rules tr[data-rule]", { timeout: WAIT });
    await page.waitForSelector("#method-detail table.fields td", { timeout: WAIT });
    const rules = await page.locator("#rules tr[data-rule]").count();
    const origins = await page.locator("#rules tr[data-rule] td:nth-child(2)").allInnerTexts();
    const conditions = await page.locator("#rules tr[data-rule] td:nth-child(4)").allInnerTexts();
    const neverHit = await page.locator("#rules .never-hit").count();
    const fields = await page.locator("#method-detail table.fields").first().locator("td:first-child").allInnerTexts();
    await shot("services");
    return { services, rules, origins, conditions, neverHit, fields };
  });

  await step("try it", async () => {
    const r = await trySend("/helloworld.Greeter/SayHello", { name: "Tom" });
    await shot("try-it");
    return r;
  });

  await step("try it: a streaming answer", async () => trySend("/chat.v1.Chat/Subscribe", { room: "general" }));

  await step("try it: an endless stream until its deadline", async () => trySend("/chat.v1.Chat/Subscribe", { room: "firehose" }, "", 1000));

  await step("try it: a client stream", async () => trySend("/chat.v1.Chat/Upload", [{ user: "ann", text: "a" }, { user: "bob", text: "b" }]));

  await step("try it: a call no rule answers", async () => trySend("/shop.v1.Catalog/SearchProducts", { query: "zzz" }));

  await step("calls, live", async () => {
    await go("#/calls");
    await page.waitForSelector('#calls-body tr[data-seq]', { timeout: WAIT });
    const before = await page.locator("#calls-body tr").count();
    const top = Number(await page.locator("#calls-body tr").first().getAttribute("data-seq"));
    // What a client sends is shown as text, never run as markup.
    const answered = await callFromPage("/helloworld.Greeter/SayHello", { name: "<img src=x onerror=window.__pwned=1>" },
      { "x-note": "<script>window.__pwned=2</script>" });
    await page.waitForFunction((n) => document.querySelectorAll("#calls-body tr").length > n, before, { timeout: WAIT });
    const first = page.locator("#calls-body tr").first();
    return {
      answered,
      before,
      after: await page.locator("#calls-body tr").count(),
      newSeqAbove: Number(await first.getAttribute("data-seq")) > top,
      firstRow: await first.innerText(),
    };
  });

  await step("calls: what clients send stays text", async () => {
    await page.locator("#calls-body tr").first().click();
    await page.waitForSelector("#call-request", { timeout: WAIT });
    return {
      request: await text("#call-request"),
      metadata: await page.locator("#call-detail").innerText(),
      images: await page.locator("#call-detail img, #call-detail script").count(),
      pwned: await page.evaluate(() => window.__pwned ?? null),
      focused: await page.evaluate(() => document.activeElement?.id ?? ""),
    };
  });

  await step("calls: a call that missed", async () => {
    await page.click('#calls-body tr[data-matched="no"]');
    await page.waitForSelector("#closest", { timeout: WAIT });
    const seen = {
      condition: await text("#failed-condition"),
      actual: await text("#failed-actual"),
      reason: await text("#closest-reason"),
      request: await text("#call-request"),
    };
    await shot("calls");
    return seen;
  });

  const file = "helloworld.greeter.sayhello.yaml";
  await step("edit: a mistake", async () => {
    await go(`#/edit/rule/${file}`);
    await page.waitForFunction(() => (document.getElementById("editor-text")?.value || "").includes("Hi Tom"), undefined, { timeout: WAIT });
    const original = await page.inputValue("#editor-text");
    const broken = original.replace('message: "Hi Tom (from mock)"', 'mesage: "Hi Tom (edited)"');
    const line = broken.split("\n").findIndex((l) => l.includes("mesage")) + 1;
    await page.fill("#editor-text", broken);
    await page.click("#save");
    await page.waitForSelector("#diagnostics li.error", { timeout: WAIT });
    const seen = {
      line,
      diagnosticLine: Number(await page.locator("#diagnostics li.error").first().getAttribute("data-line")),
      diagnostic: await text("#diagnostics li.error"),
      gutterMarked: await page.locator(".gutter .diag-error").allInnerTexts(),
      result: await text("#save-result"),
    };
    await shot("edit");
    return seen;
  });

  await step("edit: fixed", async () => {
    const fixed = (await page.inputValue("#editor-text")).replace("mesage:", "message:");
    await page.fill("#editor-text", fixed);
    await page.click("#save");
    await page.waitForSelector("#save-result .ok", { timeout: WAIT });
    return { result: await text("#save-result"), diagnostics: await page.locator("#diagnostics li").count() };
  });

  await step("try it after the edit", async () => trySend("/helloworld.Greeter/SayHello", { name: "Tom" }));

  await step("load", async () => {
    await go("#/load");
    for (let i = 0; i < 5; i++) await callFromPage("/helloworld.Greeter/SayHello", { name: "Tom" });
    // The calls reach the chart with the next sample (every 2 s): the row's
    // "calls/s now" turns positive and its p50 gets a value.
    await page.waitForFunction(() => {
      const row = document.querySelector('#load-methods tr[data-method="/helloworld.Greeter/SayHello"]');
      return row && Number(row.cells[1].textContent) > 0 && row.cells[3].textContent !== "–";
    }, undefined, { timeout: WAIT });
    await page.waitForSelector("svg.chart polyline", { timeout: WAIT });
    const row = await page.locator('#load-methods tr[data-method="/helloworld.Greeter/SayHello"]').innerText();
    await shot("load");
    return { row, lines: await page.locator("svg.chart polyline").count(), rules: await page.locator("#load-rules tr").count() };
  });

  await step("status and reload", async () => {
    await go("#/status");
    await page.waitForSelector("#plan-identity", { timeout: WAIT });
    const identity = await text("#plan-identity");
    await page.click("#reload");
    await page.waitForSelector("#reload-result .ok", { timeout: WAIT });
    await shot("status");
    return { identity, reload: await text("#reload-result") };
  });

  await step("keyboard focus", async () => {
    await go("#/services");
    await page.waitForSelector('a[data-method="/helloworld.Greeter/SayHello"]', { timeout: WAIT });
    await page.evaluate(() => document.activeElement?.blur());
    await page.keyboard.press("Tab");
    await page.keyboard.press("Tab");
    return page.evaluate(() => {
      const el = document.activeElement;
      const style = getComputedStyle(el);
      return { tag: el.tagName, text: el.textContent.trim().slice(0, 40), focusVisible: el.matches(":focus-visible"), outline: style.outlineStyle, width: style.outlineWidth };
    });
  });
}

async function scale() {
  await step("10,000 rules, a page at a time", async () => {
    await page.goto(`${opts.url}/ui/#/services/helloworld.Greeter/SayHello`, { waitUntil: "load" });
    await page.waitForSelector("#rules tr[data-rule]", { timeout: 60000 });
    const first = await page.locator("#rules tr[data-rule]").count();
    const button = await text("#more-rules");
    await page.click("#more-rules");
    await page.waitForFunction((n) => document.querySelectorAll("#rules tr[data-rule]").length > n, first, { timeout: WAIT });
    const heading = await page.locator("#method-detail h3").nth(2).innerText();
    return { first, button, second: await page.locator("#rules tr[data-rule]").count(), heading };
  });
  await step("10,000 calls, a page at a time", async () => {
    await page.evaluate(() => { location.hash = "#/calls"; });
    await page.waitForSelector("#calls-body tr[data-seq]", { timeout: 60000 });
    const first = await page.locator("#calls-body tr").count();
    const older = await page.locator("#load-older").isVisible();
    await page.click("#load-older");
    await page.waitForFunction((n) => document.querySelectorAll("#calls-body tr").length > n, first, { timeout: WAIT });
    await shot("scale-calls");
    return { first, older, second: await page.locator("#calls-body tr").count() };
  });
}

async function shared() {
  await step("every replica's calls", async () => {
    await page.goto(`${opts.url}/ui/#/calls`, { waitUntil: "load" });
    await page.waitForSelector("#calls-body tr[data-seq]", { timeout: 60000 });
    const rows = await page.locator("#calls-body tr[data-seq]").count();
    const replicas = [];
    // Rows spread over the list: a replica's calls arrive in batches.
    for (let i = 0; i < Math.min(rows, 8); i++) {
      const row = page.locator("#calls-body tr[data-seq]").nth(Math.floor((i * rows) / Math.min(rows, 8)));
      const seq = await row.getAttribute("data-seq");
      await row.click();
      await page.waitForFunction((s) => document.querySelector("#call-detail h2")?.textContent === `Call ${s}`, seq, { timeout: WAIT });
      const facts = await page.locator("#call-detail dl.facts").first().innerText();
      const m = /Replica\s+(\S+) \(its call (\d+)\)/.exec(facts);
      replicas.push(m ? m[1] : null);
    }
    await shot("shared-calls");
    await page.evaluate(() => { location.hash = "#/status"; });
    await page.waitForSelector("#plan-identity", { timeout: WAIT });
    const status = await page.locator("main").innerText();
    return { rows, replicas, status };
  });
}

const userDataDir = mkdtempSync(join(tmpdir(), "wirestub-ui-"));
let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.WIRESTUB_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    chromiumSandbox: false,
    args: FLAGS,
    timeout: 60000,
    viewport: { width: 1280, height: 900 },
  });
  page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (m) => report.console.push({ level: m.type(), text: m.text() }));
  page.on("pageerror", (e) => report.console.push({ level: "pageerror", text: String(e) }));
  page.on("response", (r) => {
    if (r.status() === 401) report.refused.push({ url: r.url(), afterToken: tokenGiven });
    else if (r.status() >= 400) report.failed.push({ url: r.url(), status: r.status() });
  });
  if (opts.scenario === "main") await main();
  else if (opts.scenario === "shared") await shared();
  else await scale();
} catch (e) {
  report.steps.push({ name: "driver", ok: false, seen: null, error: String(e?.stack ?? e) });
} finally {
  await context?.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}

process.stdout.write(JSON.stringify(report, null, 2) + "\n");
process.exitCode = report.steps.every((s) => s.ok) ? 0 : 1;
