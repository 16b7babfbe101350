// Status: the plan served and when it was loaded, listeners, journal,
// validation, runtime store, upstream; a button to reload the plan.

import { h, fill, facts, note, code } from "./dom.js";
import { api, errorOf, planChanged } from "./api.js";

export function mount(root) {
  const body = h("div", null, h("p", { class: "muted" }, "Loading…"));
  const result = h("div", { id: "reload-result", "aria-live": "polite" });
  const reload = h(
    "button",
    {
      type: "button",
      id: "reload",
      onclick: async () => {
        reload.disabled = true;
        fill(result, h("p", { class: "muted" }, "Reloading…"));
        const res = await api("/admin/reload", { method: "POST" });
        reload.disabled = false;
        planChanged();
        fill(
          result,
          res.ok
            ? note(
                `Reloaded: generation ${res.data.generation}, ${res.data.changed ? "a new plan" : "the same plan"} ` +
                  `(${res.data.methods} methods, ${res.data.rules} rules).`,
                "ok",
              )
            : note(`Not reloaded: ${errorOf(res)}`),
        );
        show();
      },
    },
    "Reload the plan",
  );
  root.append(h("h1", null, "Status"), h("p", null, reload), result, body);

  async function show() {
    const res = await api("/admin/status");
    if (!res.ok) return fill(body, note(errorOf(res)));
    const s = res.data;
    const p = s.plan;
    const j = s.journal;
    const v = s.validation || {};
    const vServices = Object.entries(v.services || {}).map(([n, on]) => `${n} ${on ? "on" : "off"}`);
    fill(
      body,
      h("h2", null, "Plan"),
      facts([
        ["Identity", h("code", { id: "plan-identity" }, p.identity)],
        ["Format version", p.version],
        ["Source", p.source],
        ["Loaded at", p.loaded_at],
        ["Generation", p.generation],
        ["Services", (s.services || []).join(", ") || "none"],
        ["Methods / rules", `${s.methods} / ${s.rules}`],
      ]),
      h("h2", null, "Process"),
      facts([
        ["Started at", s.started_at],
        ["Uptime", `${Math.round(s.uptime_seconds)} s`],
        ["Workers", s.workers],
        ["State", s.draining ? "draining" : "serving"],
        [
          "Listeners",
          h("ul", { class: "plain" }, (s.listeners || []).map((l) => h("li", null, `${l.kind} ${l.addr}`))),
        ],
      ]),
      h("h2", null, "Journal"),
      j.enabled
        ? facts([
            ["Calls held", `${j.size} of ${j.capacity} (${j.bytes} of ${j.limits.bytes} bytes)`],
            ["Recorded", j.recorded],
            ["Evicted", j.evicted],
            j.shared
              ? [
                  "Shared",
                  `${j.shared.up ? "appending to" : "waiting for"} ${j.shared.stream}: ${j.shared.appended} appended, ` +
                    `${j.shared.dropped} left out, ${j.shared.waiting_bytes} bytes waiting; the Calls view shows every replica's calls`,
                ]
              : null,
          ])
        : note("Off: start the engine with --journal N to see calls here.", "muted"),
      h("h2", null, "Validation"),
      facts([
        ["Requests validated", v.enabled ? "yes" : "no"],
        vServices.length ? ["Per service", vServices.join(", ")] : null,
        ["Streams", v.mode],
        ["Annotations", v.source],
      ]),
      h("h2", null, "Upstream"),
      s.upstream || s.upstreams_by_service
        ? code({ default: s.upstream, by_service: s.upstreams_by_service })
        : note("None: calls no rule answers get the plan's no-match status.", "muted"),
      s.runtime ? [h("h2", null, "Runtime store"), code(s.runtime)] : null,
    );
  }
  show();
  return {};
}
