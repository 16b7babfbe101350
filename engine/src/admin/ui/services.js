// Services: packages, services and methods; a method's request and
// response types field by field, and its rules in evaluation order with
// their origin, conditions in words, answer and hit count.

import { h, fill, note, code, table } from "./dom.js";
import { api, errorOf, rulesPath, seg } from "./api.js";

/** Rules shown at once; more on request. */
const RULES_PAGE = 200;

export function mount(root, args) {
  const filter = h("input", {
    type: "search",
    id: "service-filter",
    placeholder: "Filter methods",
    "aria-label": "Filter methods",
    oninput: () => list(),
  });
  const listEl = h("nav", { class: "side", "aria-label": "Methods" });
  const detail = h("section", { class: "detail", id: "method-detail", "aria-live": "polite", tabindex: "-1" });
  root.append(h("h1", null, "Services"), h("div", { class: "split" }, h("div", null, filter, listEl), detail));
  let services = [];

  function list() {
    const q = filter.value.trim().toLowerCase();
    const groups = services.map((s) => {
      const methods = s.methods.filter((m) => !q || m.path.toLowerCase().includes(q));
      if (!methods.length) return null;
      return h(
        "div",
        { class: "group" },
        h("h2", { class: "service" }, s.name, s.methods.some((m) => m.builtin) ? h("span", { class: "badge" }, "built in") : null),
        h(
          "ul",
          { class: "plain" },
          methods.map((m) =>
            h(
              "li",
              null,
              h(
                "a",
                { href: `#/services/${seg(s.name)}/${seg(m.name)}`, dataset: { method: m.path } },
                m.name,
                " ",
                h("span", { class: "badge" }, m.kind),
                m.builtin ? null : h("span", { class: "muted" }, ` ${m.rules} rule${m.rules === 1 ? "" : "s"}`),
              ),
            ),
          ),
        ),
      );
    });
    fill(listEl, groups.some(Boolean) ? groups : note("No method matches.", "muted"));
  }

  async function load() {
    const res = await api("/admin/services");
    if (!res.ok) return fill(listEl, note(errorOf(res)));
    services = res.data.services;
    list();
  }

  async function show(args) {
    for (const a of listEl.querySelectorAll("a[aria-current]")) a.removeAttribute("aria-current");
    if (args.length < 2) {
      return fill(detail, note("Pick a method to see its types and rules.", "muted"));
    }
    const path = `/${args[0]}/${args[1]}`;
    const link = listEl.querySelector(`a[data-method="${CSS.escape(path)}"]`);
    if (link) link.setAttribute("aria-current", "true");
    fill(detail, h("p", { class: "muted" }, "Loading…"));
    const res = await api(rulesPath(path));
    if (!res.ok) return fill(detail, note(errorOf(res)));
    const m = res.data;
    const input = h("div");
    const output = h("div");
    const rules = h("div", { id: "rules" });
    fill(
      detail,
      h("h2", { class: "method-path" }, m.method),
      h(
        "p",
        null,
        h("span", { class: "badge" }, m.kind),
        " ",
        m.builtin ? null : h("a", { href: `#/try/${seg(args[0])}/${seg(args[1])}` }, "Try it"),
        " · ",
        h("a", { href: `#/calls/${seg(path)}` }, "Calls"),
      ),
      h("h3", null, "Request ", h("code", null, m.input_type.replace(/^\./, ""))),
      input,
      h("h3", null, "Response ", h("code", null, m.output_type.replace(/^\./, ""))),
      output,
      h("h3", null, `Rules (${m.rules.length}), in evaluation order`),
      rules,
    );
    fields(input, m.input_type, 0);
    fields(output, m.output_type, 0);
    showRules(rules, path, m.rules, RULES_PAGE);
    if (document.activeElement?.closest?.(".side")) detail.focus();
  }

  load().then(() => show(args));
  return { update: show };
}

/** The fields of message `type` as a table; message-typed fields open to their own. */
async function fields(el, type, depth) {
  const res = await api(`/admin/schema/${seg(type.replace(/^\./, ""))}`);
  if (!res.ok) return fill(el, note(errorOf(res)));
  const s = res.data;
  if (s.kind === "enum") {
    return fill(el, h("p", null, "enum: ", Object.entries(s.values).map(([k, v]) => `${k} = ${v}`).join(", ")));
  }
  const oneofOf = {};
  for (const [name, members] of Object.entries(s.oneofs || {})) for (const f of members) oneofOf[f] = name;
  const rows = s.fields.map((f) => {
    const label = [f.map ? `map<${f.keyType}, …>` : null, f.repeated && !f.map ? "repeated" : null, f.optional ? "optional" : null, oneofOf[f.name] ? `oneof ${oneofOf[f.name]}` : null].filter(Boolean).join(", ");
    const nested = f.type.includes(".") && depth < 6;
    let typeCell = h("code", null, f.type);
    if (nested) {
      const inner = h("div");
      typeCell = h(
        "details",
        { ontoggle: (e) => e.target.open && !inner.firstChild && fields(inner, f.type, depth + 1) },
        h("summary", null, h("code", null, f.type)),
        inner,
      );
    }
    return h("tr", null, h("td", null, f.proto_name), h("td", null, f.id), h("td", null, typeCell), h("td", null, label));
  });
  fill(el, rows.length ? table(["Field", "Number", "Type", ""], rows, { class: "fields" }) : note("No fields.", "muted"));
}

function showRules(el, path, rules, count) {
  if (!rules.length) return fill(el, note("No rules: every call gets the no-match answer (or goes upstream).", "muted"));
  const rows = rules.slice(0, count).map((r) => {
    const resp = r.response || {};
    const answer = h("div");
    const status = resp.status ? `${resp.status.name}${resp.message ? `: ${resp.message}` : ""}` : "";
    return h(
      "tr",
      { dataset: { rule: r.index } },
      h("td", null, r.index),
      h("td", null, h("code", null, r.origin)),
      h("td", null, r.priority),
      h(
        "td",
        null,
        r.conditions.length
          ? h("ul", { class: "plain conditions" }, r.conditions.map((c) => h("li", null, c.text)))
          : h("span", { class: "muted" }, "always"),
      ),
      h(
        "td",
        null,
        h(
          "details",
          { ontoggle: (e) => e.target.open && !answer.firstChild && ruleAnswer(answer, path, r.index) },
          h("summary", null, status, resp.times ? ` (${resp.used ?? 0} of ${resp.times} used)` : ""),
          answer,
        ),
      ),
      h("td", { class: "num" }, r.hits, r.hits === 0 ? h("span", { class: "badge warn never-hit" }, "never hit") : null),
    );
  });
  fill(
    el,
    table(["#", "Origin", "Priority", "When", "Answer", "Hits"], rows, { class: "rules" }),
    rules.length > count
      ? h(
          "button",
          { type: "button", id: "more-rules", onclick: () => showRules(el, path, rules, count + RULES_PAGE) },
          `Show ${Math.min(RULES_PAGE, rules.length - count)} more of ${rules.length - count}`,
        )
      : null,
  );
}

async function ruleAnswer(el, path, index) {
  const res = await api(rulesPath(path, index));
  fill(el, res.ok ? code(res.data.response) : note(errorOf(res)));
}
