// Line charts as plain SVG: time on x, one polyline per series, a few
// grid lines with their values, a legend.

const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];

function el(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

/** A round step for about `n` grid lines up to `max`. */
function step(max, n) {
  const raw = max / n;
  const p = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((m) => m * p).find((s) => s >= raw) || raw;
}

/**
 * `series`: [{name, points: [[ms since epoch, value], ...]}]; `unit` is
 * written after values ("/s", " ms").
 */
export function lineChart(series, { width = 640, height = 200, unit = "", label = "" } = {}) {
  const pad = { l: 56, r: 12, t: 10, b: 24 };
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": label });
  const all = series.flatMap((s) => s.points);
  if (!all.length) {
    svg.append(el("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "axis" }, "no data yet"));
    return svg;
  }
  const t0 = Math.min(...all.map((p) => p[0]));
  const t1 = Math.max(...all.map((p) => p[0]), t0 + 1000);
  const vmax = Math.max(...all.map((p) => p[1]), 0);
  const s = vmax > 0 ? step(vmax, 4) : 1;
  const top = Math.max(s, Math.ceil(vmax / s) * s);
  const x = (t) => pad.l + ((t - t0) / (t1 - t0)) * (width - pad.l - pad.r);
  const y = (v) => height - pad.b - (v / top) * (height - pad.t - pad.b);
  for (let v = 0; v <= top + 1e-9; v += s) {
    svg.append(el("line", { x1: pad.l, x2: width - pad.r, y1: y(v), y2: y(v), class: "grid" }));
    const text = Number.isInteger(v) ? String(v) : v.toPrecision(2);
    svg.append(el("text", { x: pad.l - 4, y: y(v) + 4, "text-anchor": "end", class: "axis" }, `${text}${unit}`));
  }
  const secs = Math.round((t1 - t0) / 1000);
  svg.append(el("text", { x: pad.l, y: height - 6, class: "axis" }, `${secs} s ago`));
  svg.append(el("text", { x: width - pad.r, y: height - 6, "text-anchor": "end", class: "axis" }, "now"));
  series.forEach((ser, i) => {
    const color = COLORS[i % COLORS.length];
    const pts = ser.points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    const line = el("polyline", { points: pts, fill: "none", stroke: color, "stroke-width": 2, class: "series" });
    line.append(el("title", null, ser.name));
    svg.append(line);
  });
  return svg;
}

/** The legend of a chart's series, as HTML. */
export function legend(series) {
  const ul = document.createElement("ul");
  ul.className = "legend";
  series.forEach((s, i) => {
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = COLORS[i % COLORS.length];
    li.append(swatch, document.createTextNode(s.name));
    ul.append(li);
  });
  return ul;
}
