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
    const started = performance.now();
    send.disabled = true;
    fill(out, h("p", { class: "muted" }, "Sending…"));
    try {
      if (streaming) await stream(url, headers, m.request_stream ? (Array.isArray(body) ? body : [body]) : [body], started);
      else await unary(url, headers, body, started);
    } catch (e) {
      fill(out, note(`The call failed in the browser: ${e.message}. Is the engine serving at ${endpoint.value}, and does --cors-origins allow this page's origin?`));
    } finally {
      send.disabled = false;
      controller = null;
    }
  }

  async function unary(url, headers, body, started) {
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
    show({
      status: ok ? "OK" : (data && data.code ? data.code.toUpperCase() : `HTTP ${r.status}`),
      message: ok ? "" : data && data.message,
      details: ok ? null : data && data.details,
      headers: head,
      trailers,
      messages: ok ? [data] : [],
      elapsed: performance.now() - started,
    });
  }

  async function stream(url, headers, messages, started) {
    const parts = messages.map((m) => envelope(0, new TextEncoder().encode(JSON.stringify(m))));
    const r = await fetch(url, {
      method: "POST",
      headers: { ...headers, "content-type": "application/connect+json" },
      body: concat(parts),
      signal: controller.signal,
    });
    const [head] = split(r.headers);
    const state = { status: "…", headers: head, trailers: {}, messages: [], elapsed: 0 };
    if (r.status !== 200) {
      const text = await r.text();
      let data = {};
      try { data = JSON.parse(text); } catch { /* not JSON */ }
      return show({ ...state, status: data.code ? data.code.toUpperCase() : `HTTP ${r.status}`, message: data.message || text, elapsed: performance.now() - started });
    }
    const reader = r.body.getReader();
    let buf = new Uint8Array(0);
    show(state);
    for (;;) {
      const { value, done } = await reader.read();
      if (value) buf = concat([buf, value]);
      while (buf.length >= 5) {
        const len = new DataView(buf.buffer, buf.byteOffset + 1, 4).getUint32(0);
        if (buf.length < 5 + len) break;
        const flags = buf[0];
        const json = JSON.parse(new TextDecoder().decode(buf.subarray(5, 5 + len)) || "{}");
        buf = buf.slice(5 + len);
        if (flags & 2) {
          const err = json.error;
          state.status = err ? (err.code || "unknown").toUpperCase() : "OK";
          state.message = err && err.message;
          state.details = err && err.details;
          state.trailers = Object.fromEntries(Object.entries(json.metadata || {}).map(([k, v]) => [k, v.join(", ")]));
        } else {
          state.messages.push(json);
        }
        state.elapsed = performance.now() - started;
        show(state);
      }
      if (done) break;
    }
    if (state.status === "…") {
      state.status = "UNKNOWN";
      state.message = "the stream ended without its end message";
      show(state);
    }
  }

  function show(r) {
    const kv = (o) => {
      const rows = Object.entries(o).map(([k, v]) => h("tr", null, h("td", null, k), h("td", null, v)));
      return rows.length ? table(["Key", "Value"], rows) : note("none", "muted");
    };
    fill(
      out,
      h("h2", null, "Answer"),
      h("p", null, h("strong", { id: "try-status", class: r.status === "OK" ? "ok" : "bad" }, r.status),
        r.message ? [": ", h("span", { id: "try-message" }, r.message)] : null,
        h("span", { class: "muted" }, ` after ${r.elapsed.toFixed(1)} ms`)),
      r.details && r.details.length ? [h("h3", null, "Error details"), code(r.details)] : null,
      h("h3", null, `Messages (${r.messages.length})`),
      h("div", { id: "try-messages" }, r.messages.map((m, i) => code(m, { "aria-label": `message ${i}`, class: "json message" }))),
      h("h3", null, "Headers"),
      h("div", { id: "try-headers" }, kv(r.headers)),
      h("h3", null, "Trailers"),
      h("div", { id: "try-trailers" }, kv(r.trailers)),
    );
  }

  init();
  return { update: select };
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
  const skip = new Set(["content-type", "content-length", "content-encoding", "date", "vary", "connect-content-encoding"]);
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
