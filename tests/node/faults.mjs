// Transport faults seen by @grpc/grpc-js: each call of the list goes on a
// fresh client (a fault may end the connection), and its outcome is
// printed as one JSON line: { name, code, messages }. Run by
// tests/python/test_faults.py against an engine serving
// tests/python/fault_rules; WIRESTUB_ADDR is its address, argv[2] a JSON
// list of { name, method: "unary" | "stream", request, timeoutMs }.

import grpc from "@grpc/grpc-js";

const address = process.env.WIRESTUB_ADDR;
const calls = JSON.parse(process.argv[2]);
const names = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));

// A message whose field 1 is the string `s` (HelloRequest.name,
// SubscribeRequest.room): no generated code needed.
const field1 = (s) => {
  const b = Buffer.from(s);
  return Buffer.concat([Buffer.from([0x0a, b.length]), b]);
};
const identity = (b) => b;

function call(c) {
  const client = new grpc.Client(address, grpc.credentials.createInsecure(), { "grpc.enable_http_proxy": 0 });
  const deadline = Date.now() + (c.timeoutMs ?? 3000);
  const done = (code, messages) => {
    client.close();
    return { name: c.name, code: names[code] ?? String(code), messages };
  };
  return new Promise((resolve) => {
    if (c.method === "unary") {
      client.makeUnaryRequest("/helloworld.Greeter/SayHello", identity, identity, field1(c.request), new grpc.Metadata(), { deadline },
        (err, reply) => resolve(done(err ? err.code : 0, reply ? 1 : 0)));
    } else {
      let messages = 0;
      const s = client.makeServerStreamRequest("/chat.v1.Chat/Subscribe", identity, identity, field1(c.request), new grpc.Metadata(), { deadline });
      s.on("data", () => messages++);
      s.on("error", () => {});
      s.on("status", (st) => resolve(done(st.code, messages)));
    }
  });
}

for (const c of calls) {
  console.log(JSON.stringify(await call(c)));
}
