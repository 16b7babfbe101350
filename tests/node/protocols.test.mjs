// One list of cases (cases.mjs) run with real clients over every protocol
// the engine serves on its cleartext port: Connect (proto and JSON, POST and
// GET), gRPC-Web (proto, JSON, text) and gRPC, over HTTP/1.1 and HTTP/2
// (prior knowledge). Clients: connect-node (Connect, gRPC-Web, gRPC),
// connect-web and protobuf-ts's gRPC-Web transport (both on fetch), grpc-js. The schema comes from `buf build` at run time
// (schema.mjs): no generated code.
//
//   WIRESTUB_ADDR=127.0.0.1:PORT node --test tests/node/protocols.test.mjs
//
// Environment:
//   WIRESTUB_ADDR         host:port of an engine serving protos/ and rules/
//                         (required)
//   WIRESTUB_NODE_RULES   1 when the engine also serves tests/node/rules/
//                         (`--rules rules --rules tests/node/rules`); the
//                         cases marked `extra` are skipped otherwise
//   WIRESTUB_TRANSPORTS   comma-separated substrings: only the transports
//                         whose name contains one of them run
//   WIRESTUB_BUF, WIRESTUB_PROTOS   see schema.mjs
//
// tests/python/test_protocols.py starts an engine and runs this file.

import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { fromJson, toJson } from "@bufbuild/protobuf";
import { MethodOptions_IdempotencyLevel } from "@bufbuild/protobuf/wkt";

import { CASES } from "./cases.mjs";
import {
  CallError,
  connectNodeClient,
  connectWebClient,
  grpcJsClient,
  protobufTsClient,
  withTimeout,
} from "./clients.mjs";
import { findMethod, loadSchema } from "./schema.mjs";

const ADDR = process.env.WIRESTUB_ADDR;
const EXTRA_RULES = process.env.WIRESTUB_NODE_RULES === "1";
const TEST_TIMEOUT_MS = 15000;
const STEP_TIMEOUT_MS = 5000;

// Every transport: how to make its client and what it can do.
// `streams`: client and bidirectional streaming (HTTP/2 only: over HTTP/1.1
// connect-node could at best do them half-duplex, and the fetch transport
// not at all). `getOnly`: the Connect GET variant, which only applies to
// unary NO_SIDE_EFFECTS methods (connect-es uses POST for the others).
const TRANSPORTS = [
  ...["1.1", "2"].flatMap((httpVersion) =>
    [true, false].map((binary) => ({
      name: `connect ${binary ? "proto" : "json"} HTTP/${httpVersion} (connect-node)`,
      make: (ctx) => connectNodeClient({ ...ctx, protocol: "connect", httpVersion, binary }),
      streams: httpVersion === "2",
    })),
  ),
  ...["1.1", "2"].flatMap((httpVersion) =>
    [true, false].map((binary) => ({
      name: `connect GET ${binary ? "proto" : "json"} HTTP/${httpVersion} (connect-node)`,
      make: (ctx) =>
        connectNodeClient({ ...ctx, protocol: "connect", httpVersion, binary, get: true }),
      getOnly: true,
    })),
  ),
  ...["1.1", "2"].flatMap((httpVersion) =>
    [true, false].map((binary) => ({
      name: `grpc-web ${binary ? "proto" : "json"} HTTP/${httpVersion} (connect-node)`,
      make: (ctx) => connectNodeClient({ ...ctx, protocol: "grpc-web", httpVersion, binary }),
      streams: httpVersion === "2",
    })),
  ),
  {
    name: "grpc proto HTTP/2 (connect-node)",
    make: (ctx) => connectNodeClient({ ...ctx, protocol: "grpc", httpVersion: "2", binary: true }),
    streams: true,
  },
  {
    name: "grpc proto HTTP/2 (grpc-js)",
    make: (ctx) => grpcJsClient({ ...ctx, address: ADDR }),
    streams: true,
  },
  ...["connect", "grpc-web"].flatMap((protocol) =>
    [true, false].map((binary) => ({
      name: `${protocol} ${binary ? "proto" : "json"} HTTP/1.1 (connect-web fetch)`,
      make: (ctx) => connectWebClient({ ...ctx, protocol, binary }),
      streams: false,
    })),
  ),
  ...["text", "binary"].map((format) => ({
    name: `grpc-web ${format === "text" ? "text" : "proto"} HTTP/1.1 (protobuf-ts fetch)`,
    make: (ctx) => protobufTsClient({ ...ctx, format }),
    streams: false,
  })),
];

function selectedTransports() {
  const only = process.env.WIRESTUB_TRANSPORTS;
  if (!only) return TRANSPORTS;
  const wanted = only.split(",").map((s) => s.trim()).filter(Boolean);
  return TRANSPORTS.filter((t) => wanted.some((w) => t.name.includes(w)));
}

// ---------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------

function json(method, message, registry) {
  return toJson(method.output, message, { registry });
}

function assertSubset(actual, expected, what) {
  for (const [k, v] of Object.entries(expected ?? {})) {
    assert.equal(
      actual?.[k],
      v,
      `${what} ${k}: expected ${JSON.stringify(v)}, got ${JSON.stringify(actual?.[k])} ` +
        `(all: ${JSON.stringify(actual)})`,
    );
  }
}

function assertError(err, expected) {
  if (!(err instanceof CallError)) throw err;
  const got = {
    code: err.code,
    message: err.rawMessage,
    details: err.details,
    metadata: err.metadata,
  };
  const context = `error ${JSON.stringify(got)}`;
  assert.equal(err.code, expected.code, `status code; ${context}`);
  if (expected.message !== undefined) {
    assert.equal(err.rawMessage, expected.message, `status message; ${context}`);
  }
  if (expected.details !== undefined) {
    assert.deepEqual(err.details, expected.details, `error details; ${context}`);
  }
  assertSubset(err.metadata, expected.metadata, "error metadata");
}

function assertResponses(got, c) {
  if (c.expect.cycle) {
    const cycle = c.expect.cycle;
    assert.ok(got.length >= 1, "an endless stream sent nothing before its deadline");
    got.forEach((m, i) =>
      assert.deepEqual(m, cycle[i % cycle.length], `message ${i} of the endless stream`),
    );
  } else {
    assert.deepEqual(got, c.expect.responses ?? []);
  }
}

/** Runs `call` and checks it fails as the case expects. */
async function expectFailure(call, c, method, registry) {
  let result;
  try {
    result = await call();
  } catch (err) {
    assertError(err, c.expect.error);
    if (method.methodKind !== "unary" && method.methodKind !== "client_streaming") {
      assertResponses((err.responses ?? []).map((m) => json(method, m, registry)), c);
    }
    return;
  }
  const shown = result?.response
    ? json(method, result.response, registry)
    : result?.responses?.map((m) => json(method, m, registry));
  assert.fail(
    `expected ${c.expect.error.code}, but the call succeeded: ${JSON.stringify(shown)}`,
  );
}

async function runCase(client, schema, c) {
  const { registry } = schema;
  const method = findMethod(schema, c.method);
  const request = (j) => fromJson(method.input, j, { registry });
  const opts = { headers: c.headers ?? {}, timeoutMs: c.timeoutMs };
  const checkMeta = (r) => {
    assertSubset(r.headers, c.expectHeaders, "response header");
    assertSubset(r.trailers, c.expectTrailers, "response trailer");
  };

  switch (method.methodKind) {
    case "unary": {
      const call = () => client.unary(method, request(c.request), opts);
      if (c.expect.error) return expectFailure(call, c, method, registry);
      const r = await call();
      assert.deepEqual(json(method, r.response, registry), c.expect.response);
      return checkMeta(r);
    }
    case "server_streaming": {
      const call = () => client.serverStream(method, request(c.request), opts);
      if (c.expect.error) return expectFailure(call, c, method, registry);
      const r = await call();
      assertResponses(r.responses.map((m) => json(method, m, registry)), c);
      return checkMeta(r);
    }
    case "client_streaming": {
      const call = () => client.clientStream(method, c.requests.map(request), opts);
      if (c.expect.error) return expectFailure(call, c, method, registry);
      const r = await call();
      assert.deepEqual(json(method, r.response, registry), c.expect.response);
      return checkMeta(r);
    }
    case "bidi_streaming":
      return runBidi(client, method, registry, c, request, opts, checkMeta);
    default:
      throw new Error(`unknown method kind ${method.methodKind}`);
  }
}

async function runBidi(client, method, registry, c, request, opts, checkMeta) {
  const call = client.bidi(method, opts);
  const next = (what) => withTimeout(call.next(), STEP_TIMEOUT_MS, what);
  try {
    if (c.script) {
      // Duplex: each step's answers must come while the stream stays open.
      for (const [i, step] of c.script.entries()) {
        call.send(request(step.send));
        for (const [j, want] of step.receive.entries()) {
          const what = `answer ${j} to step ${i} (${JSON.stringify(step.send)})`;
          const r = await next(what);
          assert.ok(!r.done, `${what}: the stream ended`);
          assert.deepEqual(json(method, r.value, registry), want, what);
        }
      }
      call.close();
      const rest = [];
      const readRest = async () => {
        for (;;) {
          const r = await next("end of the stream");
          if (r.done) return;
          rest.push(json(method, r.value, registry));
        }
      };
      if (c.expect.error) {
        let err;
        try {
          await readRest();
        } catch (e) {
          err = e;
        }
        assert.ok(
          err,
          `expected ${c.expect.error.code}, but the stream ended OK after ${JSON.stringify(rest)}`,
        );
        assertError(err, c.expect.error);
        assert.deepEqual(rest, [], "messages after the last step");
        return;
      }
      await readRest();
      assert.deepEqual(rest, c.expect.responses ?? [], "messages after the client closed");
      return checkMeta({ headers: call.headers(), trailers: call.trailers() });
    }
    // Aggregate: everything sent, then everything read.
    for (const m of c.requests) call.send(request(m));
    call.close();
    const got = [];
    const readAll = async () => {
      for (;;) {
        const r = await next("next message");
        if (r.done) return { responses: got };
        got.push(r.value);
      }
    };
    if (c.expect.error) return expectFailure(readAll, c, method, registry);
    await readAll();
    assertResponses(got.map((m) => json(method, m, registry)), c);
    return checkMeta({ headers: call.headers(), trailers: call.trailers() });
  } finally {
    call.cancel?.();
  }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

if (!ADDR) {
  test("WIRESTUB_ADDR names the engine", () => {
    assert.fail(
      "set WIRESTUB_ADDR to the host:port of an engine serving protos/ and rules/ " +
        "(tests/python/test_protocols.py starts one)",
    );
  });
} else {
  const schema = loadSchema();
  const baseUrl = `http://${ADDR}`;

  for (const transport of selectedTransports()) {
    describe(transport.name, () => {
      const client = transport.make({ registry: schema.registry, baseUrl });
      after(() => client.close());

      const cases = CASES.filter((c) => {
        if (!transport.getOnly) return true;
        const m = findMethod(schema, c.method);
        return (
          m.methodKind === "unary" &&
          m.idempotency === MethodOptions_IdempotencyLevel.NO_SIDE_EFFECTS
        );
      });
      if (transport.getOnly && cases.length === 0) {
        test("GET requests", {
          skip: "no case calls a method with idempotency_level = NO_SIDE_EFFECTS (the bundled protos/ have none)",
        }, () => {});
      }

      for (const c of cases) {
        const kind = findMethod(schema, c.method).methodKind;
        let skip = false;
        if (c.extra && !EXTRA_RULES) {
          skip =
            "needs the engine to serve tests/node/rules/ too (--rules rules --rules tests/node/rules; then set WIRESTUB_NODE_RULES=1)";
        } else if ((kind === "client_streaming" || kind === "bidi_streaming") && !transport.streams) {
          skip = "client and bidirectional streaming are tested over HTTP/2 only";
        }
        test(c.name, { skip, timeout: TEST_TIMEOUT_MS }, () => runCase(client, schema, c));
      }
    });
  }
}
