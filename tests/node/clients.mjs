// The clients under test, behind one small interface so that one list of
// cases runs against all of them:
//
//   unary(method, request, opts)         -> { response, headers, trailers }
//   serverStream(method, request, opts)  -> { responses, headers, trailers }
//   clientStream(method, requests, opts) -> { response, headers, trailers }
//   bidi(method, opts)                   -> { send(msg), close(), next(),
//                                             headers(), trailers() }
//
// Requests and responses are protobuf messages (@bufbuild/protobuf); opts is
// { headers: {name: value}, timeoutMs }. Every failure is thrown as a
// CallError (a normalized status: gRPC code name, message, decoded details,
// metadata), with the messages received before it in `responses`.
//
// The clients:
// - @connectrpc/connect-node: createConnectTransport (Connect protocol),
//   createGrpcWebTransport, createGrpcTransport, over HTTP/1.1 or HTTP/2
//   (prior knowledge, cleartext);
// - @connectrpc/connect-web (the browser client): Connect and gRPC-Web over
//   Node's global fetch (HTTP/1.1);
// - @protobuf-ts/grpcweb-transport's GrpcWebFetchTransport (gRPC-Web, text
//   or binary, over Node's global fetch: HTTP/1.1);
// - @grpc/grpc-js, the reference gRPC client.

import http from "node:http";

import { fromBinary, toBinary, toJson } from "@bufbuild/protobuf";
import { base64Decode } from "@bufbuild/protobuf/wire";
import { ConnectError, createClient } from "@connectrpc/connect";
import {
  Http2SessionManager,
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import {
  createConnectTransport as createWebConnectTransport,
  createGrpcWebTransport as createWebGrpcWebTransport,
} from "@connectrpc/connect-web";
import { GrpcWebFetchTransport } from "@protobuf-ts/grpcweb-transport";
import { RpcError } from "@protobuf-ts/runtime-rpc";
import grpc from "@grpc/grpc-js";

// gRPC status codes by number, as named in the gRPC spec (Connect's Code
// enum has the same numbers).
export const GRPC_CODES = [
  "OK",
  "CANCELLED",
  "UNKNOWN",
  "INVALID_ARGUMENT",
  "DEADLINE_EXCEEDED",
  "NOT_FOUND",
  "ALREADY_EXISTS",
  "PERMISSION_DENIED",
  "RESOURCE_EXHAUSTED",
  "FAILED_PRECONDITION",
  "ABORTED",
  "OUT_OF_RANGE",
  "UNIMPLEMENTED",
  "INTERNAL",
  "UNAVAILABLE",
  "DATA_LOSS",
  "UNAUTHENTICATED",
];

/** A call that ended with a status other than OK, normalized. */
export class CallError extends Error {
  constructor({ code, message, details = [], metadata = {}, responses = [], cause }) {
    super(`${code}: ${message}`);
    this.name = "CallError";
    this.code = code;
    this.rawMessage = message;
    this.details = details;
    this.metadata = metadata;
    this.responses = responses;
    this.cause = cause;
  }
}

function headersToObject(headers) {
  const out = {};
  if (!headers) return out;
  for (const [k, v] of headers) out[k.toLowerCase()] = v;
  return out;
}

function stripTypeUrl(type) {
  const slash = type.lastIndexOf("/");
  return slash >= 0 ? type.slice(slash + 1) : type;
}

/** Error details ({type, value bytes}) as {type, value: proto JSON}. */
function decodeDetails(registry, details) {
  return details.map(({ type, value }) => {
    const typeName = stripTypeUrl(type);
    const desc = registry.getMessage(typeName);
    if (!desc) return { type: typeName, value: Buffer.from(value).toString("base64") };
    return { type: typeName, value: toJson(desc, fromBinary(desc, value), { registry }) };
  });
}

/** The details of a grpc-status-details-bin value (a google.rpc.Status). */
function detailsFromStatusBin(registry, bin) {
  if (bin === undefined || bin === null) return [];
  const bytes = typeof bin === "string" ? base64Decode(bin) : new Uint8Array(bin);
  const status = fromBinary(registry.getMessage("google.rpc.Status"), bytes);
  return decodeDetails(
    registry,
    status.details.map((any) => ({ type: any.typeUrl, value: any.value })),
  );
}

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: nothing within ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** An async iterable fed by push()/close(), for streaming requests. */
function pushable() {
  const queue = [];
  let closed = false;
  let wake;
  return {
    push(value) {
      queue.push(value);
      wake?.();
    },
    close() {
      closed = true;
      wake?.();
    },
    async *[Symbol.asyncIterator]() {
      for (;;) {
        while (queue.length) yield queue.shift();
        if (closed) return;
        await new Promise((r) => (wake = r));
        wake = undefined;
      }
    },
  };
}

// ---------------------------------------------------------------------------
// @connectrpc/connect-node
// ---------------------------------------------------------------------------

function connectErrorToCallError(registry, err, responses = []) {
  if (!(err instanceof ConnectError)) {
    err = ConnectError.from(err);
  }
  return new CallError({
    code: GRPC_CODES[err.code] ?? `code ${err.code}`,
    message: err.rawMessage,
    details: decodeDetails(
      registry,
      err.details.filter((d) => "type" in d),
    ),
    metadata: headersToObject(err.metadata),
    responses,
    cause: err,
  });
}

// A fetch that keeps the cause of a failure (a refused connection, a
// malformed response) in the message: fetch itself only says "fetch failed".
const fetchWithCause = (url, init) =>
  globalThis.fetch(url, init).catch((e) => {
    const cause = e?.cause?.message ?? e?.cause;
    throw new Error(cause ? `${e.message}: ${cause}` : e.message);
  });

/**
 * A client over one connect-node transport. `protocol` is "connect",
 * "grpc-web" or "grpc"; `httpVersion` "1.1" or "2"; `binary` picks the
 * proto or JSON codec; `get` makes the Connect protocol use GET for
 * NO_SIDE_EFFECTS methods.
 */
export function connectNodeClient({ registry, baseUrl, protocol, httpVersion, binary, get = false }) {
  const common = {
    baseUrl,
    httpVersion,
    useBinaryFormat: binary,
    jsonOptions: { registry },
  };
  let sessionManager;
  let agent;
  if (httpVersion === "2") {
    sessionManager = new Http2SessionManager(baseUrl);
    common.sessionManager = sessionManager;
  } else {
    agent = new http.Agent({ keepAlive: true });
    common.nodeOptions = { agent };
  }
  let transport;
  if (protocol === "connect") {
    transport = createConnectTransport({ ...common, useHttpGet: get });
  } else if (protocol === "grpc-web") {
    transport = createGrpcWebTransport(common);
  } else if (protocol === "grpc") {
    transport = createGrpcTransport(common);
  } else {
    throw new Error(`unknown protocol ${protocol}`);
  }
  return connectEsClient(registry, transport, () => {
    sessionManager?.abort();
    agent?.destroy();
  });
}

/**
 * A client over one @connectrpc/connect-web transport (the browser
 * client), on Node's global fetch: HTTP/1.1, unary and server streaming.
 * `protocol` is "connect" or "grpc-web".
 */
export function connectWebClient({ registry, baseUrl, protocol, binary }) {
  const options = {
    baseUrl,
    useBinaryFormat: binary,
    jsonOptions: { registry },
    fetch: fetchWithCause,
  };
  let transport;
  if (protocol === "connect") {
    transport = createWebConnectTransport(options);
  } else if (protocol === "grpc-web") {
    transport = createWebGrpcWebTransport(options);
  } else {
    throw new Error(`unknown protocol ${protocol}`);
  }
  return connectEsClient(registry, transport, () => {});
}

/** The common interface over a connect-es Transport. */
function connectEsClient(registry, transport, cleanup) {
  const clients = new Map();
  const clientFor = (method) => {
    let c = clients.get(method.parent);
    if (!c) {
      c = createClient(method.parent, transport);
      clients.set(method.parent, c);
    }
    return c[method.localName];
  };

  const callOptions = (opts, meta) => ({
    headers: opts.headers ?? {},
    timeoutMs: opts.timeoutMs,
    onHeader: (h) => (meta.headers = headersToObject(h)),
    onTrailer: (t) => (meta.trailers = headersToObject(t)),
  });

  return {
    async unary(method, request, opts = {}) {
      const meta = { headers: {}, trailers: {} };
      try {
        const response = await clientFor(method)(request, callOptions(opts, meta));
        return { response, ...meta };
      } catch (e) {
        throw connectErrorToCallError(registry, e);
      }
    },
    async serverStream(method, request, opts = {}) {
      const meta = { headers: {}, trailers: {} };
      const responses = [];
      try {
        for await (const m of clientFor(method)(request, callOptions(opts, meta))) {
          responses.push(m);
        }
        return { responses, ...meta };
      } catch (e) {
        throw connectErrorToCallError(registry, e, responses);
      }
    },
    async clientStream(method, requests, opts = {}) {
      const meta = { headers: {}, trailers: {} };
      async function* input() {
        yield* requests;
      }
      try {
        const response = await clientFor(method)(input(), callOptions(opts, meta));
        return { response, ...meta };
      } catch (e) {
        throw connectErrorToCallError(registry, e);
      }
    },
    bidi(method, opts = {}) {
      const meta = { headers: {}, trailers: {} };
      const input = pushable();
      const received = [];
      const output = clientFor(method)(input, callOptions(opts, meta))[Symbol.asyncIterator]();
      return {
        send: (m) => input.push(m),
        close: () => input.close(),
        async next() {
          try {
            const r = await output.next();
            if (!r.done) received.push(r.value);
            return r;
          } catch (e) {
            throw connectErrorToCallError(registry, e, received);
          }
        },
        headers: () => meta.headers,
        trailers: () => meta.trailers,
        cancel: () => {
          input.close();
          output.return?.();
        },
      };
    },
    async close() {
      cleanup();
    },
  };
}

// ---------------------------------------------------------------------------
// @protobuf-ts/grpcweb-transport (fetch)
// ---------------------------------------------------------------------------

function rpcMetaToObject(meta) {
  const out = {};
  for (const [k, v] of Object.entries(meta ?? {})) {
    out[k.toLowerCase()] = Array.isArray(v) ? v.join(", ") : v;
  }
  return out;
}

// protobuf-ts hands grpc-message over as it is on the wire; the gRPC spec
// percent-encodes it, so decode it as every gRPC client does.
function percentDecode(s) {
  try {
    return decodeURIComponent(s);
  } catch {
    return s;
  }
}

function rpcErrorToCallError(registry, err, responses = []) {
  if (!(err instanceof RpcError)) {
    return new CallError({
      code: "UNKNOWN",
      message: String(err?.message ?? err),
      responses,
      cause: err,
    });
  }
  const metadata = rpcMetaToObject(err.meta);
  let details = [];
  try {
    details = detailsFromStatusBin(registry, metadata["grpc-status-details-bin"]);
  } catch (e) {
    details = [{ undecodable: String(e) }];
  }
  return new CallError({
    code: err.code,
    message: percentDecode(err.message),
    details,
    metadata,
    responses,
    cause: err,
  });
}

/** protobuf-ts's MethodInfo for a @bufbuild/protobuf DescMethod. */
function methodInfo(method) {
  return {
    service: { typeName: method.parent.typeName },
    name: method.name,
    localName: method.localName,
    I: { toBinary: (m) => toBinary(method.input, m) },
    O: { fromBinary: (b) => fromBinary(method.output, b) },
    options: {},
    idempotency: undefined,
    serverStreaming: method.methodKind === "server_streaming",
    clientStreaming: method.methodKind === "client_streaming",
  };
}

/** GrpcWebFetchTransport in `format` "text" or "binary". */
export function protobufTsClient({ registry, baseUrl, format }) {
  const transport = new GrpcWebFetchTransport({ baseUrl, format, fetch: fetchWithCause });
  const options = (opts) =>
    transport.mergeOptions({
      meta: { ...(opts.headers ?? {}) },
      timeout: opts.timeoutMs,
    });
  return {
    async unary(method, request, opts = {}) {
      const call = transport.unary(methodInfo(method), request, options(opts));
      try {
        const response = await call.response;
        const headers = rpcMetaToObject(await call.headers);
        const trailers = rpcMetaToObject(await call.trailers);
        await call.status;
        return { response, headers, trailers };
      } catch (e) {
        throw rpcErrorToCallError(registry, e);
      }
    },
    async serverStream(method, request, opts = {}) {
      const call = transport.serverStreaming(methodInfo(method), request, options(opts));
      const responses = [];
      try {
        for await (const m of call.responses) responses.push(m);
        const headers = rpcMetaToObject(await call.headers);
        const trailers = rpcMetaToObject(await call.trailers);
        await call.status;
        return { responses, headers, trailers };
      } catch (e) {
        throw rpcErrorToCallError(registry, e, responses);
      }
    },
    async close() {},
  };
}

// ---------------------------------------------------------------------------
// @grpc/grpc-js
// ---------------------------------------------------------------------------

function grpcMetadataToObject(md) {
  const out = {};
  if (!md) return out;
  for (const [k, values] of Object.entries(md.toJSON())) {
    out[k] = values
      .map((v) => (Buffer.isBuffer(v) ? v.toString("base64") : v))
      .join(", ");
  }
  return out;
}

function grpcErrorToCallError(registry, err, responses = []) {
  if (typeof err?.code !== "number") {
    return new CallError({ code: "UNKNOWN", message: String(err?.message ?? err), responses, cause: err });
  }
  let details = [];
  const bin = err.metadata?.get("grpc-status-details-bin")?.[0];
  try {
    details = detailsFromStatusBin(registry, bin);
  } catch (e) {
    details = [{ undecodable: String(e) }];
  }
  return new CallError({
    code: GRPC_CODES[err.code],
    message: err.details,
    details,
    metadata: grpcMetadataToObject(err.metadata),
    responses,
    cause: err,
  });
}

export function grpcJsClient({ registry, address }) {
  const client = new grpc.Client(address, grpc.credentials.createInsecure(), {
    "grpc.enable_http_proxy": 0,
  });
  const path = (method) => `/${method.parent.typeName}/${method.name}`;
  const ser = (method) => (m) => Buffer.from(toBinary(method.input, m));
  const de = (method) => (b) => fromBinary(method.output, new Uint8Array(b));
  const metadata = (opts) => {
    const md = new grpc.Metadata();
    for (const [k, v] of Object.entries(opts.headers ?? {})) md.set(k, v);
    return md;
  };
  const callOptions = (opts) =>
    opts.timeoutMs !== undefined ? { deadline: Date.now() + opts.timeoutMs } : {};

  // Headers and trailers of a call, from its 'metadata' and 'status' events.
  const watch = (call) => {
    const meta = { headers: {}, trailers: {} };
    let statusSeen;
    const status = new Promise((r) => (statusSeen = r));
    call.on("metadata", (md) => (meta.headers = grpcMetadataToObject(md)));
    call.on("status", (s) => {
      meta.trailers = grpcMetadataToObject(s.metadata);
      statusSeen(s);
    });
    return { meta, status };
  };

  return {
    unary(method, request, opts = {}) {
      return new Promise((resolve, reject) => {
        let w;
        const call = client.makeUnaryRequest(
          path(method),
          ser(method),
          de(method),
          request,
          metadata(opts),
          callOptions(opts),
          (err, response) => {
            // The callback can run before the 'status' event.
            w.status.then(() => {
              if (err) reject(grpcErrorToCallError(registry, err));
              else resolve({ response, ...w.meta });
            });
          },
        );
        w = watch(call);
      });
    },
    serverStream(method, request, opts = {}) {
      return new Promise((resolve, reject) => {
        const responses = [];
        const call = client.makeServerStreamRequest(
          path(method),
          ser(method),
          de(method),
          request,
          metadata(opts),
          callOptions(opts),
        );
        const w = watch(call);
        call.on("data", (m) => responses.push(m));
        call.on("error", () => {});
        w.status.then((s) => {
          if (s.code === grpc.status.OK) resolve({ responses, ...w.meta });
          else reject(grpcErrorToCallError(registry, { code: s.code, details: s.details, metadata: s.metadata }, responses));
        });
      });
    },
    clientStream(method, requests, opts = {}) {
      return new Promise((resolve, reject) => {
        let w;
        const call = client.makeClientStreamRequest(
          path(method),
          ser(method),
          de(method),
          metadata(opts),
          callOptions(opts),
          (err, response) => {
            w.status.then(() => {
              if (err) reject(grpcErrorToCallError(registry, err));
              else resolve({ response, ...w.meta });
            });
          },
        );
        w = watch(call);
        for (const r of requests) call.write(r);
        call.end();
      });
    },
    bidi(method, opts = {}) {
      const call = client.makeBidiStreamRequest(
        path(method),
        ser(method),
        de(method),
        metadata(opts),
        callOptions(opts),
      );
      const w = watch(call);
      const received = [];
      const events = [];
      let wake;
      const push = (e) => {
        events.push(e);
        wake?.();
      };
      call.on("data", (m) => push({ value: m }));
      call.on("error", () => {});
      w.status.then((s) => push({ status: s }));
      return {
        send: (m) => call.write(m),
        close: () => call.end(),
        async next() {
          while (!events.length) await new Promise((r) => (wake = r));
          const e = events[0];
          if ("value" in e) {
            events.shift();
            received.push(e.value);
            return { done: false, value: e.value };
          }
          if (e.status.code === grpc.status.OK) return { done: true, value: undefined };
          throw grpcErrorToCallError(
            registry,
            { code: e.status.code, details: e.status.details, metadata: e.status.metadata },
            received,
          );
        },
        headers: () => w.meta.headers,
        trailers: () => w.meta.trailers,
        cancel: () => call.cancel(),
      };
    },
    async close() {
      client.close();
    },
  };
}

export { withTimeout };
