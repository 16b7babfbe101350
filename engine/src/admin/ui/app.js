// The page: a bar of views, hash routing (`#/calls`, `#/services/pkg.Svc/M`),
// the token prompt, and the sampler of the load charts, which runs while
// the page is open and visible.

import { h, fill } from "./dom.js";
import { api, setToken, token, whenUnauthorized } from "./api.js";
import * as status from "./status.js";
import * as services from "./services.js";
import * as calls from "./calls.js";
import * as tryIt from "./try.js";
import * as edit from "./edit.js";
import * as load from "./load.js";

const VIEWS = [
  ["services", "Services", services],
  ["calls", "Calls", calls],
  ["try", "Try it", tryIt],
  ["edit", "Edit", edit],
  ["load", "Load", load],
  ["status", "Status", status],
];

const view = document.getElementById("view");
const nav = document.getElementById("nav");
let cleanup = null;
let shown = "";

function route() {
  const [name, ...rest] = (location.hash.replace(/^#\/?/, "") || "services").split("/");
  const entry = VIEWS.find(([n]) => n === name) || VIEWS[0];
  const args = rest.map((a) => {
    try {
      return decodeURIComponent(a);
    } catch {
      return a;
    }
  });
  for (const a of nav.querySelectorAll("a")) {
    if (a.dataset.view === entry[0]) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const key = `${entry[0]}/${args.join("/")}`;
  if (cleanup && cleanup.leave && entry[0] !== shown && !cleanup.leave()) {
    // Unsaved edits kept: back to the view that has them.
    history.replaceState(null, "", `#/${view.dataset.route || shown}`);
    return;
  }
  if (cleanup && entry[0] === shown && cleanup.update) {
    // The same view with other arguments (a method picked): it updates itself.
    cleanup.update(args);
    return;
  }
  if (cleanup && cleanup.stop) cleanup.stop();
  shown = entry[0];
  document.title = `${entry[1]} · wirestub`;
  fill(view);
  cleanup = entry[2].mount(view, args) || null;
  view.dataset.route = key;
}

function askToken(message) {
  if (document.getElementById("token-dialog")) return;
  const input = h("input", {
    id: "token-input",
    type: "password",
    autocomplete: "off",
    "aria-describedby": "token-why",
    required: true,
  });
  const dialog = h(
    "dialog",
    { id: "token-dialog", "aria-labelledby": "token-title" },
    h(
      "form",
      {
        method: "dialog",
        onsubmit: (e) => {
          e.preventDefault();
          setToken(input.value.trim());
          dialog.close();
          forgetButton();
          shown = "";
          if (cleanup && cleanup.stop) cleanup.stop();
          cleanup = null;
          route();
          header();
        },
      },
      h("h2", { id: "token-title" }, "Admin token"),
      h(
        "p",
        { id: "token-why" },
        message || "This engine's admin API needs its token (--admin-token).",
        " It is kept for this tab only.",
      ),
      h("label", { for: "token-input" }, "Token "),
      input,
      " ",
      h("button", { type: "submit", id: "token-save" }, "Use it"),
    ),
  );
  dialog.addEventListener("close", () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
  input.focus();
}

async function header() {
  const res = await api("/admin/status");
  const el = document.getElementById("plan-id");
  if (res.ok) {
    const p = res.data.plan;
    el.textContent = `plan ${p.identity.slice(0, 12)} · generation ${p.generation}${res.data.draining ? " · draining" : ""}`;
  }
}

function forgetButton() {
  if (!token() || document.getElementById("forget-token")) return;
  nav.append(
    h("button", { class: "link", type: "button", id: "forget-token", onclick: () => { setToken(""); location.reload(); } }, "Forget token"),
  );
}

function start() {
  fill(nav, VIEWS.map(([name, label]) => h("a", { href: `#/${name}`, dataset: { view: name } }, label)));
  forgetButton();
  // The plan may change from elsewhere (another tab, the API, a reload).
  setInterval(() => { if (!document.hidden) header(); }, 10000);
  whenUnauthorized(askToken);
  window.addEventListener("hashchange", route);
  window.addEventListener("wirestub:plan", header);
  route();
  header();
  load.sampler.start();
}

start();
