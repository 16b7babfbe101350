// Building DOM nodes without markup strings: every value is set as text or
// as an attribute, never parsed as HTML, so what clients send (metadata,
// messages) cannot turn into page content.

/** An element: `h("a", {href: "#x", onclick: f}, "text", child, [more])`. */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "value") el.value = v;
    else if (k === "checked") el.checked = Boolean(v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replaces an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** JSON, indented, for `<pre>`. */
export const pretty = (v) => JSON.stringify(v, null, 2);

/** A `<pre>` of a JSON value. */
export const code = (v, attrs) => h("pre", { class: "json", ...attrs }, typeof v === "string" ? v : pretty(v));

/** A table from header names and rows of cells. */
export function table(headers, rows, attrs) {
  return h(
    "table",
    attrs,
    h("thead", null, h("tr", null, headers.map((x) => h("th", { scope: "col" }, x)))),
    h("tbody", null, rows),
  );
}

/** Term/definition pairs. */
export function facts(pairs) {
  return h(
    "dl",
    { class: "facts" },
    pairs.filter(Boolean).map(([k, v]) => [h("dt", null, k), h("dd", null, v)]),
  );
}

/** An error or note line. */
export const note = (text, kind = "error") => h("p", { class: kind, role: kind === "error" ? "alert" : null }, text);

/** "12.3 ms" from milliseconds. */
export function ms(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (v < 1) return `${(v * 1000).toFixed(0)} µs`;
  if (v < 100) return `${v.toFixed(1)} ms`;
  return `${v.toFixed(0)} ms`;
}

/** The local time of an RFC 3339 instant, with milliseconds. */
export function clock(rfc3339) {
  const d = new Date(rfc3339);
  if (Number.isNaN(d.getTime())) return rfc3339 || "";
  const p = (n, w = 2) => String(n).padStart(w, "0");
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
}
