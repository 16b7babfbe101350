// Calls: the journal as a table that grows as calls arrive (a poll for
// calls newer than the last one seen, once a second while the page is
// visible), filters, older pages on request, and one call opened: its
// metadata, messages, rule, timing, and for a call no rule answered, the
// rule that came closest and the condition that failed there.

import { h, fill, note, code, table, facts, ms, clock } from "./dom.js";
import { api, errorOf, rulesPath, seg } from "./api.js";

const STATUS_NAMES = [
  "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
  "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
  "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
];
/** Calls shown at most; older ones leave the table (and come back with "Load older"). */
const MAX_ROWS = 2000;
const POLL_MS = 1000;
const FIRST_PAGE = 100;

export function mount(root, args) {
  const method = h("select", { id: "f-method", "aria-label": "Method" }, h("option", { value: "" }, "any method"));
  const status = h(
    "select",
    { id: "f-status", "aria-label": "Status" },
    h("option", { value: "" }, "any status"),
    STATUS_NAMES.map((n) => h("option", { value: n }, n)),
  );
  const matched = h(
    "select",
    { id: "f-matched", "aria-label": "Matched" },
    h("option", { value: "" }, "matched or not"),
    h("option", { value: "true" }, "a rule answered"),
    h("option", { value: "false" }, "no rule answered"),
  );
  const rule = h("input", { id: "f-rule", placeholder: "rule origin (file:line)", "aria-label": "Rule origin contains" });
  const session = h("input", { id: "f-session", placeholder: "session", "aria-label": "Session" });
  const metadata = h("input", { id: "f-metadata", placeholder: "metadata key=value", "aria-label": "Metadata key=value" });
  const live = h("input", { type: "checkbox", id: "f-live", checked: true });
  const problem = h("div", { id: "calls-problem", "aria-live": "polite" });
  const tbody = h("tbody", { id: "calls-body" });
  const older = h("button", { type: "button", id: "load-older", hidden: true, onclick: () => loadOlder() }, "Load older calls");
  const counter = h("span", { class: "muted", id: "calls-count" });
  const detail = h("section", { class: "detail", id: "call-detail", "aria-live": "polite", tabindex: "-1" });
  const form = h(
    "form",
    {
      class: "filters",
      onsubmit: (e) => {
        e.preventDefault();
        restart();
      },
    },
    method, status, matched, rule, session, metadata,
    h("button", { type: "submit", id: "f-apply" }, "Apply"),
    h("label", { class: "check" }, live, " Live"),
  );
  root.append(
    h("h1", null, "Calls"),
    form,
    problem,
    h("div", { class: "split calls" },
      h("div", { class: "scroll" },
        h("table", { class: "calls", id: "calls-table" },
          h("thead", null, h("tr", null, ["#", "Time", "Method", "Protocol", "Status", "Rule", "Latency"].map((x) => h("th", { scope: "col" }, x)))),
          tbody),
        older, " ", counter),
      detail),
  );
  if (args[0]) method.append(h("option", { value: args[0], selected: true }, args[0]));

  // Per call shown, only what its row needs: the whole call is fetched
  // when it is opened, so the page holds little per row.
  let entries = new Map(); // seq -> summary
  let newest = 0;
  let oldest = null;
  let timer = null;
  let busy = false;
  let stopped = false;
  let generation = 0;
  // The filters as of the last Apply (the form may be changed meanwhile).
  let applied = {};

  api("/admin/services").then((res) => {
    if (!res.ok) return;
    for (const s of res.data.services)
      for (const m of s.methods)
        if (!m.builtin && m.path !== args[0]) method.append(h("option", { value: m.path }, m.path));
  });

  function capture() {
    applied = {
      method: method.value,
      status: status.value,
      matched: matched.value,
      rule: rule.value.trim(),
      session: session.value.trim(),
      metadata: metadata.value.split(",").map((s) => s.trim()).filter(Boolean),
    };
  }

  function query(extra) {
    const q = new URLSearchParams();
    for (const k of ["method", "status", "matched", "rule", "session"]) if (applied[k]) q.set(k, applied[k]);
    for (const m of applied.metadata || []) q.append("metadata", m);
    for (const [k, v] of Object.entries(extra)) q.set(k, v);
    return `/admin/journal?${q}`;
  }

  function row(e) {
    const open = () => openCall(detail, e.seq);
    const r = h(
      "tr",
      { dataset: { seq: e.seq, matched: e.rule ? "yes" : "no" }, class: e.rule ? "" : "missed", onclick: open },
      h("td", null, h("button", { type: "button", class: "link", "aria-label": `Open call ${e.seq}`, onclick: (ev) => { ev.stopPropagation(); open(); } }, e.seq)),
      h("td", null, clock(e.time)),
      h("td", null, e.method),
      h("td", null, e.protocol),
      h("td", { class: e.status.code ? "bad" : "" }, e.status.name),
      h("td", null, e.rule ? h("code", null, e.rule.origin) : e.upstream ? "upstream" : h("span", { class: "badge warn" }, "no match")),
      h("td", { class: "num" }, ms(e.latency_ms)),
    );
    return r;
  }

  function add(list, atTop) {
    const rows = [];
    for (const e of list) {
      if (entries.has(e.seq)) continue;
      entries.set(e.seq, true);
      rows.push(row(e));
      newest = Math.max(newest, e.seq);
      oldest = oldest === null ? e.seq : Math.min(oldest, e.seq);
    }
    if (atTop) tbody.prepend(...rows.reverse());
    else tbody.append(...rows.reverse());
    while (entries.size > MAX_ROWS) {
      const last = tbody.lastElementChild;
      if (!last) break;
      entries.delete(Number(last.dataset.seq));
      last.remove();
      oldest = Number(tbody.lastElementChild?.dataset.seq ?? oldest);
      older.hidden = false;
    }
    counter.textContent = `${entries.size} call${entries.size === 1 ? "" : "s"} shown`;
  }

  async function first() {
    const mine = generation;
    const res = await api(query({ limit: FIRST_PAGE }));
    if (mine !== generation) return;
    if (!res.ok) {
      fill(problem, note(errorOf(res)));
      return;
    }
    fill(problem);
    add(res.data.entries, true);
    older.hidden = !res.data.page.more;
    schedule();
  }

  async function poll() {
    timer = null;
    if (stopped) return;
    if (!live.checked || document.hidden || busy) return schedule();
    busy = true;
    const mine = generation;
    const since = newest;
    // Everything after the last call seen: the newest page, then the pages
    // before it down to `since`, so no call is passed over (at most
    // MAX_ROWS calls a poll).
    let res = await api(query({ since, limit: 1000 }));
    let got = 0;
    while (res.ok && mine === generation && !stopped) {
      add(res.data.entries, true);
      got += res.data.entries.length;
      if (!res.data.page.more || got >= MAX_ROWS) break;
      res = await api(query({ since, before: res.data.page.before, limit: 1000 }));
    }
    busy = false;
    if (mine !== generation || stopped) return;
    if (res.ok) fill(problem);
    else fill(problem, note(errorOf(res)));
    if (res.ok && res.data.page.more) fill(problem, note("More calls arrived than the table holds; the oldest of them are left out (filters narrow it).", "muted"));
    schedule();
  }

  async function loadOlder() {
    if (oldest === null) return;
    const res = await api(query({ before: oldest, limit: FIRST_PAGE }));
    if (!res.ok) return fill(problem, note(errorOf(res)));
    const before = entries.size;
    for (const e of res.data.entries.slice().reverse()) {
      if (entries.has(e.seq)) continue;
      entries.set(e.seq, true);
      tbody.append(row(e));
      oldest = Math.min(oldest, e.seq);
    }
    older.hidden = !res.data.page.more;
    counter.textContent = `${entries.size} calls shown`;
    if (entries.size === before) older.hidden = true;
  }

  function schedule() {
    if (!stopped && !timer) timer = setTimeout(poll, POLL_MS);
  }

  function restart() {
    capture();
    generation++;
    entries = new Map();
    newest = 0;
    oldest = null;
    tbody.replaceChildren();
    fill(detail);
    if (timer) clearTimeout(timer);
    timer = null;
    first();
  }

  fill(detail, note("Open a call to see its metadata, messages and the rule that answered.", "muted"));
  capture();
  first();
  return {
    stop: () => {
      stopped = true;
      if (timer) clearTimeout(timer);
    },
  };
}

/** Fetches call `seq` whole and shows it. */
async function openCall(el, seq) {
  const res = await api(`/admin/journal?since=${seq - 1}&before=${seq + 1}&limit=1`);
  if (!res.ok) return fill(el, note(errorOf(res)));
  const e = res.data.entries[0];
  if (!e) return fill(el, note(`Call ${seq} is no longer in the journal (it keeps the last calls within its limits).`, "muted"));
  for (const tr of document.querySelectorAll("#calls-body tr[aria-selected]")) tr.removeAttribute("aria-selected");
  document.querySelector(`#calls-body tr[data-seq="${e.seq}"]`)?.setAttribute("aria-selected", "true");
  const [, service, name] = e.method.split("/");
  const parts = [
    h("h2", null, `Call ${e.seq}`),
    facts([
      ["Method", e.method ? h("a", { href: `#/services/${seg(service || "")}/${seg(name || "")}` }, e.method) : "(none)"],
      ["Time", e.time],
      ["Protocol", e.protocol],
      ["Status", `${e.status.name} (${e.status.code})${e.message ? `: ${e.message}` : ""}`],
      ["Latency", ms(e.latency_ms)],
      ["Plan generation", e.generation],
      e.replica ? ["Replica", `${e.replica} (its call ${e.replica_seq})`] : null,
      e.request_omitted ? ["Request", e.request_omitted] : null,
      ["Rule", e.rule ? h("code", { id: "call-rule" }, e.rule.origin) : e.upstream ? `forwarded upstream (${ms(e.upstream.latency_ms)}${e.upstream.failed ? ", failed" : ""})` : "none answered"],
      e.similarity !== undefined ? ["Similarity", e.similarity] : null,
      e.fault ? ["Fault injected", JSON.stringify(e.fault)] : null,
    ]),
  ];
  if (e.closest) {
    const c = e.closest;
    const f = c.failed;
    parts.push(
      h("div", { class: "closest", id: "closest" },
        h("h3", null, "Why no rule answered"),
        facts([
          ["Closest rule", h("code", null, c.origin)],
          ["Conditions held", `${c.held} of ${c.total}`],
          f ? ["Failed condition", h("code", { id: "failed-condition" }, f.text)] : null,
          f ? ["Expected", h("code", null, JSON.stringify(f.expected))] : null,
          f ? ["Received", h("code", { id: "failed-actual" }, f.present === false ? "(absent)" : JSON.stringify(f.actual))] : null,
          ["Reason", h("span", { id: "closest-reason" }, c.reason)],
        ])),
    );
  } else if (!e.rule && !e.upstream) {
    parts.push(note("No rule came close (the method has no rules, or the plan changed since).", "muted"));
  }
  if (e.violations && e.violations.length) {
    parts.push(
      h("h3", null, "Validation"),
      table(["Field", "Rule", "Message"], e.violations.map((v) => h("tr", null, h("td", null, v.field), h("td", null, v.rule), h("td", null, v.message)))),
    );
  }
  const md = Object.entries(e.metadata || {});
  parts.push(
    h("h3", null, "Metadata"),
    md.length
      ? table(["Key", "Value"], md.map(([k, v]) => h("tr", null, h("td", null, k), h("td", null, Array.isArray(v) ? v.join(", ") : String(v)))))
      : note("none", "muted"),
  );
  if ("request" in e) parts.push(h("h3", null, "Request"), code(e.request, { id: "call-request" }));
  if (e.messages) {
    parts.push(h("h3", null, `Request messages (${e.message_count})`));
    e.messages.forEach((m, i) => parts.push(code(m, { "aria-label": `message ${i}` })));
    if (e.omitted_messages) parts.push(note(`${e.omitted_messages.count} messages between were not kept.`, "muted"));
  }
  if (e.rule) {
    const answer = h("div");
    parts.push(h("details", { ontoggle: (ev) => ev.target.open && !answer.firstChild && showAnswer(answer, e) },
      h("summary", null, "The rule's answer, as the plan has it now"), answer));
  }
  fill(el, parts);
  el.focus();
}

/** The answer of the rule that answered `e`, found by its origin (its index may have moved since). */
async function showAnswer(el, e) {
  let res = await api(rulesPath(e.method, e.rule.index));
  if (res.ok && res.data.origin !== e.rule.origin) {
    const all = await api(rulesPath(e.method));
    const now = all.ok ? all.data.rules.find((r) => r.origin === e.rule.origin) : null;
    if (!now) return fill(el, note(`The rule at ${e.rule.origin} is no longer in the plan.`, "muted"));
    res = await api(rulesPath(e.method, now.index));
  }
  fill(el, res.ok ? code(res.data.response) : note(errorOf(res)));
}
