// Validation failures as @connectrpc/connect-node sees them: one invalid
// request goes over every protocol connect-node speaks (Connect with the
// proto and JSON codecs, gRPC-Web, gRPC; HTTP/1.1 and HTTP/2), and what
// the client reads from its ConnectError is printed as one JSON line per
// transport: { transport, code, message, badRequest, violations }, the
// google.rpc.BadRequest field paths and the buf.validate.Violations
// (field path, rule id) pairs found with `findDetails`. Run by
// tests/python/test_validation.py against an engine serving
// tests/cases/validation with --validation on.
//
//   WIRESTUB_ADDR  the engine's address
//   argv[2]        a FileDescriptorSet (binary) with signup.proto, its
//                  imports and google/rpc/error_details.proto
//   argv[3]        the request, a signup.User in protobuf JSON

import http from "node:http";
import { readFileSync } from "node:fs";

import { createFileRegistry, fromBinary, fromJson } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { ConnectError, Code, createClient } from "@connectrpc/connect";
import {
  Http2SessionManager,
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";

const baseUrl = `http://${process.env.WIRESTUB_ADDR}`;
const registry = createFileRegistry(fromBinary(FileDescriptorSetSchema, readFileSync(process.argv[2])));
const service = registry.getService("signup.Signup");
const user = fromJson(registry.getMessage("signup.User"), JSON.parse(process.argv[3]), { registry });
const badRequestSchema = registry.getMessage("google.rpc.BadRequest");
const violationsSchema = registry.getMessage("buf.validate.Violations");

const transports = [
  ["connect proto http/1.1", createConnectTransport, "1.1", true],
  ["connect json http/1.1", createConnectTransport, "1.1", false],
  ["connect proto http/2", createConnectTransport, "2", true],
  ["grpc-web proto http/1.1", createGrpcWebTransport, "1.1", true],
  ["grpc-web json http/2", createGrpcWebTransport, "2", false],
  ["grpc http/2", createGrpcTransport, "2", true],
];

// A FieldPath as text: `items[2].sku`, `limits["ab"]`.
function pathText(path) {
  return (path?.elements ?? [])
    .map((e) => {
      const s = e.subscript;
      if (s?.case === "index") return `${e.fieldName}[${s.value}]`;
      if (s?.case === "stringKey") return `${e.fieldName}[${JSON.stringify(s.value)}]`;
      if (s?.case === "intKey" || s?.case === "uintKey") return `${e.fieldName}[${s.value}]`;
      if (s?.case === "boolKey") return `${e.fieldName}[${s.value}]`;
      return e.fieldName;
    })
    .join(".");
}

for (const [name, make, httpVersion, binary] of transports) {
  const options = { baseUrl, httpVersion, useBinaryFormat: binary, jsonOptions: { registry } };
  let session;
  let agent;
  if (httpVersion === "2") {
    session = new Http2SessionManager(baseUrl);
    options.sessionManager = session;
  } else {
    agent = new http.Agent({ keepAlive: true });
    options.nodeOptions = { agent };
  }
  const client = createClient(service, make(options));
  const seen = { transport: name };
  try {
    await client.create(user, { timeoutMs: 10000 });
    seen.code = "ok";
  } catch (e) {
    const err = ConnectError.from(e);
    seen.code = Code[err.code];
    seen.message = err.rawMessage;
    seen.badRequest = err.findDetails(badRequestSchema).flatMap((b) => b.fieldViolations.map((f) => f.field));
    seen.violations = err
      .findDetails(violationsSchema)
      .flatMap((v) => v.violations.map((x) => [pathText(x.field), x.ruleId]));
  } finally {
    session?.abort();
    agent?.destroy();
  }
  console.log(JSON.stringify(seen));
}
