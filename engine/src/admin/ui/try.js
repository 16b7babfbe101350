// Try it: pick a method, start from a request skeleton built from its
// schema, edit it as JSON, add metadata, and send it to the engine's
// serving port over the Connect protocol with JSON (the browser's own
// fetch, cross-origin, so the engine's CORS answers apply); see the
// status, headers, trailers and messages, streamed ones as they arrive.

import { h, fill, note, code, table } from "./dom.js";
import { api, errorOf, seg } from "./api.js";

const SCALAR_ZERO = {
  string: "", bytes: "", bool: false, double: 0, float: 0, int32: 0, uint32: 0, sint32: 0, fixed32: 0, sfixed32: 0,
  int64: "0", uint64: "0", sint64: "0", fixed64: "0", sfixed64: "0",
};
const WELL_KNOWN = {
  "google.protobuf.Timestamp": "1970-01-01T00:00:00Z",
  "google.protobuf.Duration": "0s",
  "google.protobuf.FieldMask": "",
  "google.protobuf.Struct": {},
  "google.protobuf.Value": null,
  "google.protobuf.ListValue": [],
  "google.protobuf.Empty": {},
  "google.protobuf.Any": {},
};

export function mount(root, args) {
  const methodSel = h("select", { id: "try-method", "aria-label": "Method" });
  const endpoint = h("input", { id: "try-endpoint", size: 32, "aria-label": "Serving address" });
  const request = h("textarea", { id: "try-request", rows: 12, spellcheck: "false", "aria-label": "Request (JSON)" });
  const metadata = h("textarea", { id: "try-metadata", rows: 3, spellcheck: "false", placeholder: "x-role: root", "aria-label": "Metadata, one key: value per line" });
  const timeout = h("input", { id: "try-timeout", type: "number", min: 1, value: 10000, "aria-label": "Deadline (ms)" });
  const send = h("button", { type: "submit", id: "try-send" }, "Send");
  const skeletonBtn = h("button", { type: "button", id: "try-skeleton", onclick: () => skeleton() }, "Reset to skeleton");
  const out = h("section", { id: "try-result", "aria-live": "polite" });
  const kindEl = h("span", { class: "badge", id: "try-kind" });
  let methods = [];
  let controller = null;

  root.append(
    h("h1", null, "Try it"),
    h(
      "form",
      { class: "try", onsubmit: (e) => { e.preventDefault(); call(); } },
      h("p", null, h("label", { for: "try-method" }, "Method "), methodSel, " ", kindEl),
      h("p", null, h("label", { for: "try-endpoint" }, "Serving at "), endpoint, " ",
        h("label", { for: "try-timeout" }, "Deadline (ms) "), timeout),
      h("label", { for: "try-request" }, "Request (JSON; a list of messages for client and bidi streams)"),
      request,
      h("label", { for: "try-metadata" }, "Metadata (one key: value per line)"),
      metadata,
      h("p", null, send, " ", skeletonBtn,
        h("button", { type: "button", id: "try-cancel", onclick: () => controller && controller.abort() }, "Cancel")),
    ),
    out,
  );

  const current = () => methods.find((m) => m.path === methodSel.value);

  async function skeleton() {
    const m = current();
    if (!m) return;
    kindEl.textContent = m.kind;
    const one = await build(m.request_type, 0, new Map());
    request.value = JSON.stringify(m.request_stream ? [one] : one, null, 2);
  }

  methodSel.addEventListener("change", () => {
    location.hash = `#/try/${seg(methodSel.value.split("/")[1])}/${seg(methodSel.value.split("/")[2])}`;
  });

  async function init() {
    const [services, status] = await Promise.all([api("/admin/services"), api("/admin/status")]);
    if (!services.ok) return fill(out, note(errorOf(services)));
    methods = services.data.services.flatMap((s) => s.methods).filter((m) => !m.builtin);
    fill(methodSel, methods.map((m) => h("option", { value: m.path }, m.path)));
    if (status.ok) endpoint.value = servingUrl(status.data.listeners || []);
    select(args);
  }

  function select(args) {
    if (args.length >= 2) methodSel.value = `/${args[0]}/${args[1]}`;
    fill(out);
    skeleton();
  }

  async function call() {
    const m = current();
    if (!m) return;
    let body;
    try {
      body = JSON.parse(request.value || "{}");
    } catch (e) {
      return fill(out, note(`The request is not JSON: ${e.message}`));
    }
    const headers = {};
    for (const line of metadata.value.split("\n").map((l) => l.trim()).filter(Boolean)) {
      const i = line.indexOf(":");
      if (i <= 0) return fill(out, note(`Metadata line “${line}” is not key: value`));
      headers[line.slice(0, i).trim().toLowerCase()] = line.slice(i + 1).trim();
    }
    headers["connect-protocol-version"] = "1";
    if (timeout.value) headers["connect-timeout-ms"] = String(Math.max(1, Number(timeout.value) | 0));
    controller = new AbortController();
    const url = endpoint.value.replace(/\/+$/, "") + m.path;
    const streaming = m.request_stream || m.response_stream;
    const view = answerView(out);
    send.disabled = true;
    try {
      if (streaming) await stream(url, headers, m.request_stream ? (Array.isArray(body) ? body : [body]) : [body], view);
      else await unary(url, headers, body, view);
    } catch (e) {
      if (e.name === "AbortError") view.end("CANCELLED", "cancelled here; the messages received so far are kept");
      else fill(out, note(`The call failed in the browser: ${e.message}. Is the engine serving at ${endpoint.value}, and does --cors-origins allow this page's origin?`));
    } finally {
      send.disabled = false;
      controller = null;
    }
  }

  async function unary(url, headers, body, view) {
    const r = await fetch(url, {
      method: "POST",
      headers: { ...headers, "content-type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    const text = await r.text();
    let data = text;
    try { data = JSON.parse(text); } catch { /* shown as text */ }
    const [head, trailers] = split(r.headers);
    const ok = r.status === 200;
    view.headers(head);
    if (ok) view.message(data);
    view.trailers(trailers);
    if (ok) view.end("OK");
    else view.end(data && data.code ? data.code.toUpperCase() : `HTTP ${r.status}`, data && data.message, data && data.details);
  }

  async function stream(url, headers, messages, view) {
    const parts = messages.map((m) => envelope(0, new TextEncoder().encode(JSON.stringify(m))));
    const r = await fetch(url, {
      method: "POST",
      headers: { ...headers, "content-type": "application/connect+json" },
      body: concat(parts),
      signal: controller.signal,
    });
    const [head] = split(r.headers);
    view.headers(head);
    if (r.status !== 200) {
      const text = await r.text();
      let data = {};
      try { data = JSON.parse(text); } catch { /* not JSON */ }
      return view.end(data.code ? data.code.toUpperCase() : `HTTP ${r.status}`, data.message || text);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    // Unparsed bytes: the rest of the last chunk, then what comes; a chunk
    // is copied at most once, however many messages it holds.
    let buf = new Uint8Array(0);
    let ended = false;
    for (;;) {
      const { value, done } = await reader.read();
      if (value) buf = buf.length ? concat([buf, value]) : value;
      let at = 0;
      while (buf.length - at >= 5) {
        const len = new DataView(buf.buffer, buf.byteOffset + at + 1, 4).getUint32(0);
        if (buf.length - at < 5 + len) break;
        const flags = buf[at];
        const json = JSON.parse(decoder.decode(buf.subarray(at + 5, at + 5 + len)) || "{}");
        at += 5 + len;
        if (flags & 2) {
          const err = json.error;
          view.trailers(Object.fromEntries(Object.entries(json.metadata || {}).map(([k, v]) => [k, v.join(", ")])));
          view.end(err ? (err.code || "unknown").toUpperCase() : "OK", err && err.message, err && err.details);
          ended = true;
        } else {
          view.message(json);
        }
      }
      buf = buf.subarray(at);
      if (done) break;
    }
    if (!ended) view.end("UNKNOWN", "the stream ended without its end message");
  }

  init();
  return { update: select };
}

/** Messages shown at most; more are only counted. */
const SHOWN = 500;

/**
 * The answer, drawn as it comes: messages are appended as they arrive (the
 * first SHOWN; the rest counted), the status once the call ends.
 */
function answerView(out) {
  const started = performance.now();
  const status = h("strong", { id: "try-status" }, "…");
  const message = h("span", { id: "try-message" });
  const elapsed = h("span", { class: "muted" });
  const count = h("span", null, "0");
  const messages = h("div", { id: "try-messages" });
  const more = h("p", { class: "muted", hidden: true });
  const details = h("div");
  const headersEl = h("div", { id: "try-headers" }, note("none", "muted"));
  const trailersEl = h("div", { id: "try-trailers" }, note("none", "muted"));
  let n = 0;
  const kv = (el, o) => {
    const rows = Object.entries(o).map(([k, v]) => h("tr", null, h("td", null, k), h("td", null, v)));
    fill(el, rows.length ? table(["Key", "Value"], rows) : note("none", "muted"));
  };
  fill(out,
    h("h2", null, "Answer"),
    h("p", null, status, message, " ", elapsed),
    details,
    h("h3", null, "Messages (", count, ")"),
    messages, more,
    h("h3", null, "Headers"), headersEl,
    h("h3", null, "Trailers"), trailersEl);
  return {
    headers: (o) => kv(headersEl, o),
    trailers: (o) => kv(trailersEl, o),
    message(m) {
      n++;
      count.textContent = String(n);
      if (n <= SHOWN) messages.append(code(m, { "aria-label": `message ${n - 1}`, class: "json message" }));
      else {
        more.hidden = false;
        more.textContent = `${n - SHOWN} more messages received, not shown.`;
      }
    },
    end(name, text, errorDetails) {
      status.textContent = name;
      status.className = name === "OK" ? "ok" : "bad";
      message.textContent = text ? `: ${text}` : "";
      elapsed.textContent = ` after ${(performance.now() - started).toFixed(1)} ms`;
      if (errorDetails && errorDetails.length) fill(details, h("h3", null, "Error details"), code(errorDetails));
    },
  };
}

/** The serving address the browser can reach: this page's host, the first gRPC listener's port. */
export function servingUrl(listeners) {
  const plain = listeners.find((l) => l.kind === "grpc");
  const tls = listeners.find((l) => l.kind === "grpc+tls");
  const l = plain || tls;
  if (!l) return "";
  const port = l.addr.slice(l.addr.lastIndexOf(":") + 1);
  const host = location.hostname.includes(":") ? `[${location.hostname}]` : location.hostname;
  return `${plain ? "http" : "https"}://${host}:${port}`;
}

/** Response headers into (metadata, trailers): Connect sends unary trailers as `trailer-` headers. */
function split(headers) {
  const head = {};
  const trailers = {};
  const skip = new Set(["content-type", "content-length", "content-encoding", "date", "vary", "connect-content-encoding", "connection", "keep-alive", "transfer-encoding"]);
  headers.forEach((v, k) => {
    if (k.startsWith("access-control-") || skip.has(k)) return;
    if (k.startsWith("trailer-")) trailers[k.slice(8)] = v;
    else head[k] = v;
  });
  return [head, trailers];
}

function envelope(flags, bytes) {
  const out = new Uint8Array(5 + bytes.length);
  out[0] = flags;
  new DataView(out.buffer).setUint32(1, bytes.length);
  out.set(bytes, 5);
  return out;
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** A request skeleton for message `type`: every field at its zero value, one member per oneof. */
async function build(type, depth, cache) {
  const name = type.replace(/^\./, "");
  if (name in WELL_KNOWN) return WELL_KNOWN[name];
  if (name.startsWith("google.protobuf.") && name.endsWith("Value")) return null;
  if (!cache.has(name)) cache.set(name, api(`/admin/schema/${seg(name)}`));
  const res = await cache.get(name);
  if (!res.ok) return {};
  const s = res.data;
  if (s.kind === "enum") {
    const zero = Object.entries(s.values).find(([, n]) => n === 0);
    return zero ? zero[0] : Object.keys(s.values)[0];
  }
  const out = {};
  const taken = new Set();
  const oneofOf = {};
  for (const [o, members] of Object.entries(s.oneofs || {})) for (const f of members) oneofOf[f] = o;
  for (const f of s.fields) {
    // A proto3 `optional` field is left unset (setting it, even to zero, is a choice).
    if (f.optional) continue;
    const o = oneofOf[f.name];
    if (o) {
      if (taken.has(o)) continue;
      taken.add(o);
    }
    if (f.map) out[f.name] = {};
    else if (f.repeated) out[f.name] = [];
    else if (f.type in SCALAR_ZERO) out[f.name] = SCALAR_ZERO[f.type];
    else if (depth >= 3) continue;
    else out[f.name] = await build(f.type, depth + 1, cache);
  }
  return out;
}
