// Edit: rule files and protos through the runtime API. A save is compiled
// with everything else first; if it does not compile, nothing changes and
// the compiler's diagnostics are shown at the lines they point to.

import { h, fill, note } from "./dom.js";
import { api, errorOf, planChanged, seg } from "./api.js";

const KINDS = {
  rule: { list: "/admin/rules/grpc", file: (n) => `/admin/rule/grpc/${seg(n)}`, title: "Rule files", fresh: "service: package.Service\nmethod: Method\nresponses:\n  - body: {}\n" },
  proto: { list: "/admin/protos", file: (n) => `/admin/proto/${seg(n)}`, title: "Protos", fresh: 'syntax = "proto3";\n\npackage example.v1;\n' },
};

export function mount(root, args) {
  const lists = { rule: h("ul", { class: "plain", id: "rule-files" }), proto: h("ul", { class: "plain", id: "proto-files" }) };
  const editorArea = h("section", { class: "detail", id: "editor" });
  const newName = h("input", { id: "new-name", placeholder: "extra.yaml or api/v1/x.proto", "aria-label": "New file name" });
  const upload = h("input", { type: "file", id: "upload-file", accept: ".proto,.yaml,.yml,.json", "aria-label": "Upload a file" });
  root.append(
    h("h1", null, "Edit"),
    h("div", { class: "split" },
      h("div", null,
        h("h2", null, KINDS.rule.title), lists.rule,
        h("h2", null, KINDS.proto.title), lists.proto,
        h("h2", null, "New file"),
        h("form", { onsubmit: (e) => { e.preventDefault(); create(); } },
          newName, " ", h("button", { type: "submit", id: "new-file" }, "Create"),
          h("p", { class: "muted" }, "A name ending in .proto is a proto; anything else a rule file.")),
        h("p", null, h("label", { for: "upload-file" }, "Upload "), upload)),
      editorArea),
  );

  let known = { rule: new Set(), proto: new Set() };
  let dirty = false;
  let flash = null;
  let openedHash = location.hash;
  const beforeUnload = (e) => {
    if (dirty) e.preventDefault();
  };
  window.addEventListener("beforeunload", beforeUnload);
  // A template naming a method this plan serves.
  api("/admin/services").then((res) => {
    const m = res.ok && res.data.services.flatMap((s) => s.methods).find((x) => !x.builtin);
    if (m) KINDS.rule.fresh = `service: ${m.path.split("/")[1]}\nmethod: ${m.name}\nresponses:\n  - body: {}\n`;
  });

  async function refresh() {
    for (const kind of Object.keys(KINDS)) {
      const res = await api(KINDS[kind].list);
      if (!res.ok) {
        fill(lists[kind], h("li", null, note(res.status === 404 ? "The runtime API is not available." : errorOf(res))));
        continue;
      }
      const files = res.data.files.slice().sort((a, b) => a.filename.localeCompare(b.filename));
      known[kind] = new Set(files.map((f) => f.filename));
      fill(lists[kind], files.length
        ? files.map((f) => h("li", null, h("a", { href: `#/edit/${kind}/${seg(f.filename)}`, dataset: { file: f.filename } }, f.filename)))
        : h("li", { class: "muted" }, "none"));
    }
  }

  function create() {
    const name = newName.value.trim();
    if (!name || !leave()) return;
    const kind = name.endsWith(".proto") ? "proto" : "rule";
    if (known[kind].has(name)) {
      // An existing file opens as it is, never replaced by a template.
      location.hash = `#/edit/${kind}/${seg(name)}`;
      return;
    }
    open(kind, name, KINDS[kind].fresh, true);
  }

  upload.addEventListener("change", async () => {
    const file = upload.files[0];
    upload.value = "";
    if (!file || !leave()) return;
    const kind = file.name.endsWith(".proto") ? "proto" : "rule";
    if (known[kind].has(file.name) && !confirm(`${file.name} exists; saving the upload replaces it. Go on?`)) return;
    open(kind, file.name, await file.text(), !known[kind].has(file.name));
    dirty = true;
  });

  /** Whether unsaved text may be dropped (asked only when there is some). */
  function leave() {
    if (dirty && !confirm("Drop the unsaved changes?")) return false;
    dirty = false;
    return true;
  }

  async function show(args) {
    if (!leave()) {
      history.replaceState(null, "", openedHash);
      return;
    }
    openedHash = location.hash;
    const [kind, name] = args;
    if (!KINDS[kind] || !name) {
      const text = flash;
      flash = null;
      return fill(editorArea, text ? note(text, "ok") : note("Pick a file to edit, or create one.", "muted"));
    }
    const res = await api(KINDS[kind].file(name));
    if (!res.ok) return fill(editorArea, note(errorOf(res)));
    open(kind, name, res.data.content, false);
  }

  function open(kind, name, content, unsaved) {
    if (unsaved) {
      // A file not saved yet has no address of its own: any file of the
      // lists opens from here.
      openedHash = "#/edit";
      history.pushState(null, "", openedHash);
    }
    for (const a of root.querySelectorAll("a[aria-current]")) a.removeAttribute("aria-current");
    root.querySelector(`a[data-file="${CSS.escape(name)}"]`)?.setAttribute("aria-current", "true");
    const gutter = h("pre", { class: "gutter", "aria-hidden": "true" });
    const text = h("textarea", { id: "editor-text", spellcheck: "false", wrap: "off", "aria-label": `Contents of ${name}` });
    text.value = content;
    const diags = h("ol", { class: "diagnostics", id: "diagnostics", "aria-live": "polite" });
    const result = h("div", { id: "save-result", "aria-live": "polite" });
    let marks = new Map();
    let drawn = -1;
    const lines = (force) => {
      const n = text.value.split("\n").length;
      if (n === drawn && !force) return;
      drawn = n;
      fill(gutter, Array.from({ length: n }, (_, i) => {
        const m = marks.get(i + 1);
        return h("span", { class: m ? `line ${m}` : "line", dataset: { line: i + 1 } }, `${i + 1}\n`);
      }));
      gutter.scrollTop = text.scrollTop;
    };
    text.addEventListener("input", () => {
      dirty = true;
      lines();
    });
    text.addEventListener("scroll", () => { gutter.scrollTop = text.scrollTop; });
    const save = h("button", { type: "button", id: "save" }, unsaved ? "Create" : "Save");
    const del = h("button", { type: "button", id: "delete", hidden: unsaved }, "Delete");
    save.addEventListener("click", async () => {
      save.disabled = true;
      fill(result, h("p", { class: "muted" }, "Compiling…"));
      const res = await api(KINDS[kind].file(name), { method: "PUT", body: { content: text.value } });
      save.disabled = false;
      report(res, `Applied: plan ${res.data?.plan?.identity?.slice(0, 12) ?? ""} (generation ${res.data?.plan?.generation ?? "?"}) serves it now.`);
      if (res.ok) {
        dirty = false;
        save.textContent = "Save";
        del.hidden = false;
        refresh();
        const here = `#/edit/${kind}/${seg(name)}`;
        if (location.hash !== here) {
          // Updates the address without opening the file again.
          openedHash = here;
          history.pushState(null, "", here);
        }
      }
    });
    del.addEventListener("click", async () => {
      if (!confirm(`Delete ${name}? The plan is compiled without it first.`)) return;
      const res = await api(KINDS[kind].file(name), { method: "DELETE" });
      report(res, `Deleted ${name}.`);
      if (res.ok) {
        dirty = false;
        flash = `Deleted ${name}.`;
        refresh();
        location.hash = "#/edit";
      }
    });

    function report(res, okText) {
      marks = new Map();
      const list = (res.data && res.data.diagnostics) || [];
      const warnings = (res.ok && res.data && res.data.warnings) || [];
      const all = res.ok ? (Array.isArray(warnings) ? warnings : []) : list;
      fill(diags, all.map((d) => {
        const here = d.file && (d.file === name || d.file.endsWith(`/${name}`));
        if (here && d.line) marks.set(d.line, d.severity === "error" ? "diag-error" : "diag-warning");
        const where = d.file ? `${d.file}${d.line ? `:${d.line}:${d.column}` : ""}` : "";
        return h("li", { class: d.severity, dataset: { line: here ? d.line : "", file: d.file || "" } },
          here && d.line
            ? h("button", { type: "button", class: "link", onclick: () => goTo(d.line) }, `line ${d.line}, column ${d.column}`)
            : where,
          ` ${d.severity}: ${d.message}`, d.hint ? h("span", { class: "muted" }, ` (${d.hint})`) : null);
      }));
      fill(result, res.ok ? note(okText, "ok") : note(errorOf(res)));
      lines(true);
      if (res.ok) planChanged();
      else if (marks.size) goTo(Math.min(...marks.keys()));
    }

    function goTo(line) {
      const before = text.value.split("\n").slice(0, line - 1).join("\n");
      const at = line > 1 ? before.length + 1 : 0;
      text.focus();
      text.setSelectionRange(at, at);
      const lineHeight = parseFloat(getComputedStyle(text).lineHeight) || 18;
      text.scrollTop = Math.max(0, (line - 3) * lineHeight);
    }

    fill(
      editorArea,
      h("h2", null, name, unsaved ? h("span", { class: "badge" }, "new") : null),
      h("div", { class: "editor" }, gutter, text),
      h("p", null, save, " ", del),
      result,
      diags,
    );
    lines();
  }

  refresh().then(() => show(args));
  return { update: show, leave, stop: () => window.removeEventListener("beforeunload", beforeUnload) };
}
