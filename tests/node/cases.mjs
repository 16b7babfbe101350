// The cases every client runs, as data. Expected values are read off the
// rules (rules/*.yaml at the repository root, and tests/node/rules/ for the
// cases marked `extra`), written in the protobuf JSON form of the message
// (as @bufbuild/protobuf's toJson writes it: lowerCamelCase names, default
// values left out, 64-bit integers as strings, enums by name).
//
// A case:
//   name       test name
//   method     "package.Service/Method" (its kind comes from the schema)
//   request    request message, proto JSON (unary, server streaming)
//   requests   request messages (client streaming, bidi `aggregate`)
//   script     bidi `duplex`: [{ send, receive: [responses] }], each step
//              sent only after the previous step's answers came back
//   headers    request metadata
//   timeoutMs  deadline of the call
//   expect     { response } | { responses } | { error, responses? } with
//              error = { code, message?, details?, metadata? }; message,
//              details and metadata are only checked when given (metadata
//              as a subset); `responses` with an error: the messages that
//              come before it; `cycle`: the stream repeats these messages
//              (any whole or cut number of passes, at least one message)
//   expectHeaders / expectTrailers   response metadata (a subset)
//   extra      needs tests/node/rules/ loaded by the engine

export const CASES = [
  // -------------------------------------------------------------------------
  // Unary: answers
  // -------------------------------------------------------------------------
  {
    name: "unary: match on a request field",
    method: "helloworld.Greeter/SayHello",
    request: { name: "Tom" },
    expect: { response: { message: "Hi Tom (from mock)" } },
  },
  {
    name: "unary: empty request message, fallback rule",
    method: "helloworld.Greeter/SayHello",
    request: {},
    expect: { response: { message: "Hello, stranger" } },
  },
  {
    name: "unary: match on a request header, answer with a response header",
    method: "helloworld.Greeter/SayHello",
    request: { name: "admin" },
    headers: { "x-role": "root" },
    expect: { response: { message: "Welcome back, root" } },
    expectHeaders: { "x-served-by": "wirestub" },
  },
  {
    name: "unary: the same request without the header falls through",
    method: "helloworld.Greeter/SayHello",
    request: { name: "admin" },
    headers: { "x-role": "guest" },
    expect: { response: { message: "Hello, stranger" } },
  },
  {
    name: "unary: match on an optional field, answer with a trailer",
    method: "helloworld.Greeter/SayHello",
    request: { age: 42 },
    expect: { response: { message: "The answer" } },
    expectTrailers: { "x-answer": "42" },
  },
  {
    name: "unary: unary method of the streaming service",
    method: "chat.v1.Chat/GetRoom",
    request: { room: "general" },
    expect: { response: { room: "general", topic: "anything goes" } },
  },
  {
    name: "unary: fallback of a unary method",
    method: "chat.v1.Chat/GetRoom",
    request: { room: "random" },
    expect: { response: { topic: "no topic yet" } },
  },
  {
    name: "unary: header gate and nested field, well-known types and int64 in the answer",
    method: "shop.v1.Catalog/GetProduct",
    request: { sku: "BOOK-1", locale: { language: "fr" } },
    headers: { "x-tenant": "acme" },
    expect: {
      response: {
        sku: "BOOK-1",
        title: "Le Petit Prince",
        category: "CATEGORY_BOOKS",
        price: { currencyCode: "EUR", units: "12", nanos: 500000000 },
        tags: ["classic", "fr"],
        attributes: { binding: "paperback" },
        releasedAt: "1943-04-06T00:00:00Z",
        warranty: "0s",
        stock: 3,
        extra: { shelf: "B2", signed: false, editions: [1943, 1946] },
        views: "9007199254740993",
        rating: 4.8,
      },
    },
  },
  {
    name: "unary: header gate, lower-priority rule",
    method: "shop.v1.Catalog/GetProduct",
    request: { sku: "BOOK-1", includeStock: true },
    headers: { "x-tenant": "acme" },
    expect: {
      response: {
        sku: "BOOK-1",
        title: "The Little Prince",
        category: "CATEGORY_BOOKS",
        price: { currencyCode: "USD", units: "14" },
      },
    },
  },
  {
    name: "unary: header gate closed without the header, the fallback answers",
    method: "shop.v1.Catalog/GetProduct",
    request: { sku: "BOOK-1" },
    headers: { "x-tenant": "globex" },
    expect: { response: { sku: "UNKNOWN", title: "Mystery box", category: "CATEGORY_GAMES" } },
  },
  {
    name: "unary: fallback answer with an enum given by number",
    method: "shop.v1.Catalog/GetProduct",
    request: { sku: "PEN-9" },
    headers: { "x-tenant": "acme" },
    expect: { response: { sku: "UNKNOWN", title: "Mystery box", category: "CATEGORY_GAMES" } },
  },
  {
    name: "unary: match on enum and uint32, repeated messages in the answer",
    method: "shop.v1.Catalog/SearchProducts",
    request: { query: "x", category: "CATEGORY_GAMES", pageSize: 2 },
    expect: {
      response: {
        products: [
          { sku: "GAME-1", title: "Chess", category: "CATEGORY_GAMES" },
          { sku: "GAME-2", title: "Go", category: "CATEGORY_GAMES" },
        ],
        nextCursor: "page-2",
      },
    },
  },
  {
    name: "unary: match on a negative sint64",
    method: "shop.v1.Catalog/SearchProducts",
    request: { minPriceUnits: "-5", cursor: "18446744073709551615", minRating: 0.5 },
    expect: { response: { nextCursor: "negative" } },
  },
  {
    name: "unary: delayed answer within the deadline",
    method: "shop.v1.Catalog/SearchProducts",
    request: { query: "slow" },
    timeoutMs: 5000,
    expect: { response: { nextCursor: "slow" } },
  },
  {
    name: "unary: template filled from the request and a header",
    extra: true,
    method: "helloworld.Greeter/SayHello",
    request: { name: "Zoe", age: 7 },
    headers: { "x-user": "zoe@example" },
    expect: { response: { message: "Hello Zoe (7), you are zoe@example" } },
  },

  // -------------------------------------------------------------------------
  // Unary: errors
  // -------------------------------------------------------------------------
  {
    name: "unary error: rule status, message and trailing metadata",
    method: "helloworld.Greeter/SayHello",
    request: { name: "blocked" },
    expect: {
      error: {
        code: "PERMISSION_DENIED",
        message: "blocked users may not say hello",
        details: [],
        metadata: { "error-id": "E123" },
      },
    },
  },
  {
    name: "unary error: status by number",
    method: "shop.v1.Catalog/GetProduct",
    request: { sku: "GONE" },
    headers: { "x-tenant": "acme" },
    expect: {
      error: { code: "NOT_FOUND", message: "product GONE was discontinued", details: [] },
    },
  },
  {
    name: "unary error: no rule matches",
    method: "shop.v1.Catalog/SearchProducts",
    request: { query: "nothing" },
    expect: {
      error: {
        code: "NOT_FOUND",
        message: "no rule matches this request to shop.v1.Catalog/SearchProducts",
        details: [],
      },
    },
  },
  {
    name: "unary error: deadline passes before the delayed answer",
    method: "shop.v1.Catalog/SearchProducts",
    request: { query: "slow" },
    timeoutMs: 100,
    expect: { error: { code: "DEADLINE_EXCEEDED" } },
  },
  // Unknown methods: gRPC and gRPC-Web want a status (grpc-status 12); a
  // bare HTTP 404 is read as UNIMPLEMENTED by connect-es (all protocols) but
  // as NOT_FOUND by protobuf-ts. The message is not checked: a Connect 404
  // may have no body.
  {
    name: "unary error: unknown method of a known service",
    method: "helloworld.Greeter/SayGoodbye",
    request: { name: "Tom" },
    expect: { error: { code: "UNIMPLEMENTED" } },
  },
  {
    name: "unary error: unknown service",
    method: "wirestub.nowhere.v1.Nowhere/Nothing",
    request: {},
    expect: { error: { code: "UNIMPLEMENTED" } },
  },
  {
    name: "unary error: rich error details, non-ASCII message",
    extra: true,
    method: "helloworld.Greeter/SayHello",
    request: { name: "invalid" },
    expect: {
      error: {
        code: "INVALID_ARGUMENT",
        message: "name « invalid » is not allowed ✗",
        details: [
          {
            type: "google.rpc.BadRequest",
            value: { fieldViolations: [{ field: "name", description: "must not be invalid" }] },
          },
          {
            type: "google.rpc.ErrorInfo",
            value: {
              reason: "NAME_INVALID",
              domain: "wirestub.test",
              metadata: { hint: "pick another name" },
            },
          },
          { type: "google.rpc.RetryInfo", value: { retryDelay: "1.500s" } },
        ],
        metadata: { "x-request-id": "req-7" },
      },
    },
  },

  // -------------------------------------------------------------------------
  // Server streaming
  // -------------------------------------------------------------------------
  {
    name: "server stream: three messages and a response header",
    method: "chat.v1.Chat/Subscribe",
    request: { room: "general" },
    expect: {
      responses: [
        { user: "ann", text: "hello", seq: 1 },
        { user: "bob", text: "hi ann", seq: 2 },
        { user: "ann", text: "bye", seq: 3 },
      ],
    },
    expectHeaders: { "x-room": "general" },
  },
  {
    name: "server stream: a body answers as a stream of one",
    method: "chat.v1.Chat/Subscribe",
    request: { room: "attic" },
    expect: { responses: [{ user: "system", text: "this room is empty" }] },
  },
  {
    name: "server stream error: two messages, then the rule's status",
    method: "chat.v1.Chat/Subscribe",
    request: { room: "flaky" },
    expect: {
      responses: [
        { user: "ann", text: "one", seq: 1 },
        { user: "ann", text: "two", seq: 2 },
      ],
      error: { code: "UNAVAILABLE", message: "room connection lost", details: [] },
    },
  },
  {
    name: "server stream error: an endless stream ends at the deadline",
    method: "chat.v1.Chat/Subscribe",
    request: { room: "lobby" },
    timeoutMs: 300,
    expect: {
      cycle: [
        { user: "bot", text: "tick", seq: 1 },
        { user: "bot", text: "tock", seq: 2 },
      ],
      error: { code: "DEADLINE_EXCEEDED" },
    },
  },
  {
    name: "server stream: templated messages",
    extra: true,
    method: "chat.v1.Chat/Subscribe",
    request: { room: "countdown" },
    expect: {
      responses: [
        { user: "bot", text: "1 of 2 in countdown", seq: 1 },
        { user: "bot", text: "2 of 2 in countdown", seq: 2 },
      ],
    },
  },

  // -------------------------------------------------------------------------
  // Client streaming
  // -------------------------------------------------------------------------
  {
    name: "client stream: match on the first and the last message",
    method: "chat.v1.Chat/Upload",
    requests: [
      { user: "ann", text: "hi" },
      { user: "bob", text: "hello" },
      { user: "cid", text: "bye" },
    ],
    expect: { response: { note: "ann started it, and someone said bye" } },
  },
  {
    name: "client stream: match on the message count",
    method: "chat.v1.Chat/Upload",
    requests: [
      { user: "bob", text: "a" },
      { user: "bob", text: "b" },
      { user: "bob", text: "c" },
    ],
    expect: { response: { note: "three messages" } },
  },
  {
    name: "client stream: no message at all",
    method: "chat.v1.Chat/Upload",
    requests: [],
    expect: { response: { note: "nothing uploaded" } },
  },
  {
    name: "client stream: fallback",
    method: "chat.v1.Chat/Upload",
    requests: [{ user: "bob", text: "solo" }],
    expect: { response: { note: "uploaded" } },
  },

  // -------------------------------------------------------------------------
  // Bidirectional streaming
  // -------------------------------------------------------------------------
  {
    name: "bidi (aggregate): answered after the client's last message",
    method: "chat.v1.Chat/Converse",
    requests: [
      { user: "ann", text: "hello" },
      { user: "ann", text: "over" },
    ],
    expect: {
      responses: [
        { user: "mock", text: "roger" },
        { user: "mock", text: "out" },
      ],
    },
  },
  {
    name: "bidi (aggregate): fallback",
    method: "chat.v1.Chat/Converse",
    requests: [{ user: "ann", text: "hello" }],
    expect: { responses: [{ user: "mock", text: "say over when you are done" }] },
  },
  {
    name: "bidi (duplex): each message answered while the stream stays open",
    method: "chat.v1.Chat/Talk",
    script: [
      { send: { text: "ping" }, receive: [{ user: "mock", text: "pong" }] },
      {
        send: { text: "count" },
        receive: [
          { user: "mock", text: "one", seq: 1 },
          { user: "mock", text: "two", seq: 2 },
        ],
      },
      { send: { text: "hello" }, receive: [{ user: "mock", text: "say ping" }] },
    ],
    expect: { responses: [] },
  },
  {
    name: "bidi (duplex) error: an error answer ends the call",
    method: "chat.v1.Chat/Talk",
    script: [
      { send: { text: "ping" }, receive: [{ user: "mock", text: "pong" }] },
      { send: { text: "bye" }, receive: [] },
    ],
    expect: { error: { code: "ABORTED", message: "conversation closed", details: [] } },
  },
];
