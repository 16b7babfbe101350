// Load: calls per second, latency percentiles per method (from the
// engine's handling-time histograms) and rule hits over the last minutes.
// The sampler reads /admin/stats every two seconds while the page is open
// and visible and keeps ten minutes of samples in the page; the engine
// keeps nothing for it.

import { h, fill, note, table, ms } from "./dom.js";

/** A percentile as shown: within the first bucket only a bound is known. */
const shown = (v, le) => (v !== null && v !== undefined && v <= le[0] * 1000 ? `≤ ${le[0] * 1000} ms` : ms(v));
import { api, errorOf } from "./api.js";
import { lineChart, legend } from "./chart.js";

const EVERY_MS = 2000;
const KEEP = 300; // ten minutes
/** Samples a percentile is taken over: the last ten seconds. */
const WINDOW = 5;
const TOP = 5;

export const sampler = {
  samples: [],
  listeners: new Set(),
  error: null,
  timer: null,
  start() {
    if (this.timer) return;
    const tick = async () => {
      if (!document.hidden) {
        const res = await api("/admin/stats");
        if (res.ok) {
          this.error = null;
          this.samples.push({ t: Date.now(), stats: res.data });
          if (this.samples.length > KEEP) this.samples.shift();
        } else {
          this.error = errorOf(res);
        }
        for (const f of this.listeners) f();
      }
      this.timer = setTimeout(tick, EVERY_MS);
    };
    tick();
  },
};

const key = (m) => `/${m.service}/${m.method}`;

/** What changed between two samples, per method and per rule, as rates. */
function delta(a, b) {
  const dt = Math.max((b.t - a.t) / 1000, 0.001);
  const before = new Map(a.stats.methods.map((m) => [key(m), m]));
  const methods = [];
  const rules = new Map();
  for (const m of b.stats.methods) {
    const p = before.get(key(m));
    const sub = (x, y) => (y === undefined || x < y ? x : x - y);
    const calls = sub(m.handled, p && p.handled);
    const buckets = m.buckets.map((c, i) => sub(c, p && p.buckets[i]));
    methods.push({ key: key(m), calls, rate: calls / dt, misses: sub(m.misses, p && p.misses), buckets });
    for (const [origin, n] of Object.entries(m.rules || {})) {
      rules.set(origin, { method: key(m), hits: sub(n, p && p.rules && p.rules[origin]) });
    }
  }
  return { t: b.t, dt, methods, rules };
}

/** The q-quantile (0..1) of a cumulative histogram, interpolated in its bucket, in ms. */
export function quantile(q, le, cumulative) {
  const total = cumulative[cumulative.length - 1];
  if (!total) return null;
  const rank = q * total;
  for (let i = 0; i < cumulative.length; i++) {
    if (cumulative[i] >= rank) {
      if (i >= le.length) return le[le.length - 1] * 1000;
      const lo = i === 0 ? 0 : le[i - 1];
      const below = i === 0 ? 0 : cumulative[i - 1];
      const inBucket = cumulative[i] - below;
      const f = inBucket ? (rank - below) / inBucket : 0;
      return (lo + (le[i] - lo) * f) * 1000;
    }
  }
  return null;
}

function sumBuckets(deltas, k) {
  let out = null;
  for (const d of deltas) {
    const m = d.methods.find((x) => x.key === k);
    if (!m) continue;
    out = out ? out.map((c, i) => c + m.buckets[i]) : m.buckets.slice();
  }
  return out;
}

export function mount(root) {
  const body = h("div", { id: "load-body" });
  root.append(
    h("h1", null, "Load"),
    h("p", { class: "muted" }, "Sampled every 2 s while this page is open; the last 10 minutes. Latency percentiles come from the handling-time histogram (buckets from 5 ms up), interpolated within a bucket."),
    body,
  );
  const draw = () => render(body);
  sampler.listeners.add(draw);
  draw();
  return { stop: () => sampler.listeners.delete(draw) };
}

function render(body) {
  const s = sampler.samples;
  if (sampler.error) return fill(body, note(sampler.error));
  if (s.length < 2) return fill(body, note("Collecting samples…", "muted"));
  const deltas = [];
  for (let i = 1; i < s.length; i++) deltas.push(delta(s[i - 1], s[i]));
  const le = s[s.length - 1].stats.le;
  const last = deltas[deltas.length - 1];
  const recent = deltas.slice(-WINDOW);
  const span = recent.reduce((n, d) => n + d.dt, 0);

  // Calls per second, all methods, and misses.
  const total = deltas.map((d) => [d.t, d.methods.reduce((n, m) => n + m.rate, 0)]);
  const misses = deltas.map((d) => [d.t, d.methods.reduce((n, m) => n + m.misses, 0) / d.dt]);
  const rateNow = recent.reduce((n, d) => n + d.methods.reduce((k, m) => k + m.calls, 0), 0) / span;
  const rateSeries = [{ name: "calls/s", points: total }, { name: "no rule matched/s", points: misses }];

  // Methods by their recent rate; percentiles over the recent window.
  const keys = [...new Set(deltas.flatMap((d) => d.methods.map((m) => m.key)))];
  const rows = keys
    .map((k) => {
      const calls = recent.reduce((n, d) => n + (d.methods.find((m) => m.key === k)?.calls || 0), 0);
      const all = deltas.reduce((n, d) => n + (d.methods.find((m) => m.key === k)?.calls || 0), 0);
      const b = sumBuckets(recent, k);
      return { k, rate: calls / span, all, p50: b && quantile(0.5, le, b), p95: b && quantile(0.95, le, b), p99: b && quantile(0.99, le, b) };
    })
    .filter((r) => r.all > 0)
    .sort((a, b) => b.rate - a.rate || b.all - a.all);
  const p99Series = rows.slice(0, TOP).map((r) => ({
    name: `${r.k} p99`,
    points: deltas
      .map((d, i) => [d.t, sumBuckets(deltas.slice(Math.max(0, i - WINDOW + 1), i + 1), r.k)])
      .map(([t, b]) => [t, b ? quantile(0.99, le, b) : null])
      .filter(([, v]) => v !== null),
  }));

  // Rules by hits over the whole window.
  const hits = new Map();
  for (const d of deltas) for (const [origin, r] of d.rules) {
    const e = hits.get(origin) || { method: r.method, hits: 0, now: 0 };
    e.hits += r.hits;
    hits.set(origin, e);
  }
  for (const d of recent) for (const [origin, r] of d.rules) hits.get(origin).now += r.hits;
  const topRules = [...hits.entries()].filter(([, e]) => e.hits > 0).sort((a, b) => b[1].hits - a[1].hits);
  const ruleSeries = topRules.slice(0, TOP).map(([origin]) => ({
    name: origin,
    points: deltas.map((d) => [d.t, (d.rules.get(origin)?.hits || 0) / d.dt]),
  }));

  fill(
    body,
    h("h2", null, "Calls per second: ", h("span", { id: "load-total-rate" }, rateNow.toFixed(1))),
    lineChart(rateSeries, { unit: "/s", label: "calls per second" }),
    legend(rateSeries),
    h("h2", null, "Latency per method"),
    rows.length
      ? table(["Method", "Calls/s now", "Calls shown", "p50", "p95", "p99"],
          rows.map((r) => h("tr", { dataset: { method: r.k } }, h("td", null, r.k), h("td", { class: "num" }, r.rate.toFixed(1)), h("td", { class: "num" }, r.all),
            h("td", { class: "num" }, shown(r.p50, le)), h("td", { class: "num" }, shown(r.p95, le)), h("td", { class: "num" }, shown(r.p99, le)))),
          { id: "load-methods" })
      : note("No calls in the last minutes.", "muted"),
    p99Series.length ? [lineChart(p99Series, { unit: " ms", label: "p99 latency per method" }), legend(p99Series)] : null,
    h("h2", null, "Rule hits"),
    topRules.length
      ? [
          lineChart(ruleSeries, { unit: "/s", label: "rule hits per second" }),
          legend(ruleSeries),
          table(["Rule", "Method", "Hits shown", "Hits/s now"],
            topRules.slice(0, 20).map(([origin, e]) => h("tr", null, h("td", null, h("code", null, origin)), h("td", null, e.method), h("td", { class: "num" }, e.hits), h("td", { class: "num" }, (e.now / span).toFixed(1)))),
            { id: "load-rules" }),
        ]
      : note("No rule answered in the last minutes.", "muted"),
    h("p", { class: "muted" }, `Last sample ${new Date(last.t).toLocaleTimeString()}.`),
  );
}
