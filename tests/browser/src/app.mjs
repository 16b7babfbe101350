// The browser side of tests/browser: calls a wirestub engine on another
// origin with @connectrpc/connect-web and writes what it answered into the
// page, one table row per transport and call.
//
// No generated code: schema.js (written by build.mjs) sets
// globalThis.WIRESTUB_SCHEMA to the base64 of a FileDescriptorSet of
// protos/, which @bufbuild/protobuf loads into a registry of services.
//
// Query string: engine=<base URL of the engine's gRPC port> (required);
// transports=<comma-separated names> (optional, default all of TRANSPORTS).
//
// Each row (tr[data-transport][data-call]) ends with data-outcome "ok" or
// "error" and its last cell holds the text the tests compare; the body gets
// data-state="done" once every call has ended (or "failed" when the page
// could not start, with the reason in #fatal).

import { createFileRegistry, fromBinary } from "@bufbuild/protobuf";
import { base64Decode } from "@bufbuild/protobuf/wire";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-web";

/** connect-web's transports, by the name shown in the page. */
const TRANSPORTS = {
  "connect-json": (baseUrl) => createConnectTransport({ baseUrl, useBinaryFormat: false }),
  "connect-binary": (baseUrl) => createConnectTransport({ baseUrl, useBinaryFormat: true }),
  "grpc-web-binary": (baseUrl) => createGrpcWebTransport({ baseUrl, useBinaryFormat: true }),
  "grpc-web-json": (baseUrl) => createGrpcWebTransport({ baseUrl, useBinaryFormat: false }),
};

/** How long one call may take before the page gives up on it. */
const CALL_TIMEOUT_MS = 10000;

/** A failure as the page shows it: the Connect code's name and message. */
function describeError(e) {
  const err = ConnectError.from(e);
  return `${Code[err.code] ?? err.code}: ${err.rawMessage}`;
}

/**
 * The calls, each `run(clients)` resolving to the text shown for it. A
 * call that throws is shown as an error (describeError), plus whatever
 * `onError` adds.
 */
const CALLS = [
  {
    // Unary.
    name: "unary",
    async run({ greeter }) {
      const reply = await greeter.sayHello({ name: "Tom" }, { timeoutMs: CALL_TIMEOUT_MS });
      return reply.message;
    },
  },
  {
    // Unary answered with an error status and trailing metadata.
    name: "error",
    async run({ greeter }) {
      const reply = await greeter.sayHello({ name: "blocked" }, { timeoutMs: CALL_TIMEOUT_MS });
      return `unexpected answer: ${reply.message}`;
    },
    onError(err) {
      const id = err.metadata.get("error-id");
      return id === null ? "" : ` (error-id: ${id})`;
    },
  },
  {
    // Server streaming, with initial metadata.
    name: "stream",
    async run({ chat }) {
      let room = null;
      const lines = [];
      const stream = chat.subscribe(
        { room: "general" },
        { timeoutMs: CALL_TIMEOUT_MS, onHeader: (h) => (room = h.get("x-room")) },
      );
      for await (const m of stream) lines.push(`${m.user}: ${m.text} (#${m.seq})`);
      return `${lines.length} messages: ${lines.join(" | ")} (x-room: ${room})`;
    },
  },
  {
    // A custom request header (not CORS-safelisted, so the browser asks
    // the engine first in a preflight) and a custom response header the
    // page may only read when the engine exposes it.
    name: "header",
    async run({ greeter }) {
      let servedBy = null;
      const reply = await greeter.sayHello(
        { name: "admin" },
        {
          timeoutMs: CALL_TIMEOUT_MS,
          headers: { "x-role": "root" },
          onHeader: (h) => (servedBy = h.get("x-served-by")),
        },
      );
      return `${reply.message} (x-served-by: ${servedBy})`;
    },
  },
];

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

async function main() {
  const params = new URLSearchParams(location.search);
  const engine = params.get("engine");
  if (!engine) throw new Error("no ?engine=<base URL> in the page's address");
  const wanted = params.get("transports")?.split(",").filter(Boolean) ?? Object.keys(TRANSPORTS);
  document.getElementById("page-origin").textContent = location.origin;
  document.getElementById("engine").textContent = engine;

  if (typeof globalThis.WIRESTUB_SCHEMA !== "string") {
    throw new Error("schema.js did not set WIRESTUB_SCHEMA");
  }
  const registry = createFileRegistry(
    fromBinary(FileDescriptorSetSchema, base64Decode(globalThis.WIRESTUB_SCHEMA)),
  );
  const service = (name) => {
    const s = registry.getService(name);
    if (!s) throw new Error(`no service ${name} in schema.js`);
    return s;
  };
  const greeterService = service("helloworld.Greeter");
  const chatService = service("chat.v1.Chat");

  const tbody = document.getElementById("results");
  const state = document.getElementById("state");
  // One call at a time, in a fixed order, so that what the browser sends
  // (preflights included) is the same on every run.
  for (const name of wanted) {
    const make = TRANSPORTS[name];
    if (!make) throw new Error(`unknown transport ${name}`);
    const transport = make(engine);
    const clients = {
      greeter: createClient(greeterService, transport),
      chat: createClient(chatService, transport),
    };
    for (const call of CALLS) {
      const row = document.createElement("tr");
      row.dataset.transport = name;
      row.dataset.call = call.name;
      cell(row, name);
      cell(row, call.name);
      const outcome = cell(row, "running");
      const shown = cell(row, "");
      tbody.appendChild(row);
      state.textContent = `calling ${name} ${call.name}`;
      let result;
      try {
        result = { outcome: "ok", text: await call.run(clients) };
      } catch (e) {
        const err = ConnectError.from(e);
        result = { outcome: "error", text: describeError(err) + (call.onError?.(err) ?? "") };
      }
      outcome.textContent = result.outcome;
      outcome.className = `outcome-${result.outcome}`;
      shown.textContent = result.text;
      row.dataset.outcome = result.outcome;
    }
  }
  state.textContent = "done";
  document.body.dataset.state = "done";
}

main().catch((e) => {
  document.getElementById("fatal").textContent = `the page failed: ${e?.stack ?? e}`;
  document.getElementById("state").textContent = "failed";
  document.body.dataset.state = "failed";
});
