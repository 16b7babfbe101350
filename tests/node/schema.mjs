// The schema the clients use, obtained at run time (no generated code):
// `buf build` turns protos/ (and the compiler's built-in google/rpc protos,
// for decoding rich error details) into FileDescriptorSets, which
// @bufbuild/protobuf loads into a registry of DescService/DescMessage.
//
// Environment:
//   WIRESTUB_BUF     buf binary (default: tests/node/node_modules/.bin/buf,
//                    then node_modules/.bin/buf at the repository root)
//   WIRESTUB_PROTOS  the engine's .proto directory (default: protos/ at the
//                    repository root)

import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, isAbsolute, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { create, createFileRegistry, fromBinary } from "@bufbuild/protobuf";
import {
  FieldDescriptorProto_Label,
  FieldDescriptorProto_Type,
  FileDescriptorSetSchema,
} from "@bufbuild/protobuf/wkt";

export const HERE = dirname(fileURLToPath(import.meta.url));
export const REPO_ROOT = resolve(HERE, "..", "..");

function fromRoot(p) {
  return isAbsolute(p) ? p : join(REPO_ROOT, p);
}

export function bufBinary() {
  if (process.env.WIRESTUB_BUF) return fromRoot(process.env.WIRESTUB_BUF);
  for (const candidate of [
    join(HERE, "node_modules", ".bin", "buf"),
    join(REPO_ROOT, "node_modules", ".bin", "buf"),
  ]) {
    if (existsSync(candidate)) return candidate;
  }
  throw new Error(
    "buf not found: run `npm ci` in tests/node (it installs @bufbuild/buf) " +
      "or set WIRESTUB_BUF",
  );
}

/** `buf build DIR` as a FileDescriptorSet message. */
function bufBuild(buf, dir) {
  const out = mkdtempSync(join(tmpdir(), "wirestub-schema-"));
  try {
    const image = join(out, "image.binpb");
    execFileSync(buf, ["build", dir, "-o", image], {
      cwd: REPO_ROOT,
      stdio: ["ignore", "ignore", "pipe"],
    });
    return fromBinary(FileDescriptorSetSchema, readFileSync(image));
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
}

/**
 * Methods the engine does not serve, for the "unimplemented" cases: an
 * unknown method of a known service (helloworld.Greeter/SayGoodbye) and a
 * method of an unknown service (wirestub.nowhere.v1.Nowhere/Nothing). They
 * live in a registry of their own, so that the fake helloworld.Greeter does
 * not clash with the real one.
 */
function unknownMethodsRegistry() {
  const string = (name, number) => ({
    name,
    number,
    jsonName: name,
    type: FieldDescriptorProto_Type.STRING,
    label: FieldDescriptorProto_Label.OPTIONAL,
  });
  const set = create(FileDescriptorSetSchema, {
    file: [
      {
        name: "wirestub_test/unknown_greeter.proto",
        package: "helloworld",
        syntax: "proto3",
        messageType: [
          { name: "ByeRequest", field: [string("name", 1)] },
          { name: "ByeReply", field: [string("message", 1)] },
        ],
        service: [
          {
            name: "Greeter",
            method: [
              {
                name: "SayGoodbye",
                inputType: ".helloworld.ByeRequest",
                outputType: ".helloworld.ByeReply",
              },
            ],
          },
        ],
      },
      {
        name: "wirestub_test/nowhere.proto",
        package: "wirestub.nowhere.v1",
        syntax: "proto3",
        dependency: ["wirestub_test/unknown_greeter.proto"],
        service: [
          {
            name: "Nowhere",
            method: [
              {
                name: "Nothing",
                inputType: ".helloworld.ByeRequest",
                outputType: ".helloworld.ByeReply",
              },
            ],
          },
        ],
      },
    ],
  });
  return createFileRegistry(set);
}

/**
 * Loads the schema: `registry` (protos/ plus google.rpc.*, for services,
 * messages and error details) and `unknown` (the fake services above).
 */
export function loadSchema() {
  const buf = bufBinary();
  const protos = fromRoot(process.env.WIRESTUB_PROTOS ?? "protos");
  const served = bufBuild(buf, protos);
  // google/rpc/status.proto and error_details.proto, as the engine's
  // compiler has them built in.
  const rpc = bufBuild(buf, join(REPO_ROOT, "compiler", "src", "builtin"));
  const seen = new Set(served.file.map((f) => f.name));
  for (const f of rpc.file) {
    if (!seen.has(f.name)) {
      served.file.push(f);
      seen.add(f.name);
    }
  }
  return { registry: createFileRegistry(served), unknown: unknownMethodsRegistry() };
}

/**
 * A method by "package.Service/Method", from the served registry or, if
 * not there, the registry of unknown methods.
 */
export function findMethod(schema, path) {
  const [serviceName, methodName] = path.split("/");
  for (const registry of [schema.registry, schema.unknown]) {
    const service = registry.getService(serviceName);
    const method = service?.methods.find((m) => m.name === methodName);
    if (method) return method;
  }
  throw new Error(`no method ${path} in the schema`);
}
