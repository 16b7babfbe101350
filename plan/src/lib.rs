//! The plan: the one binary artifact the compiler writes and the engine serves.
//!
//! This crate is the single owner of the plan format. It holds the types, the
//! writer ([`Plan::to_bytes`]) and the validating reader ([`Plan::from_bytes`]),
//! and depends on nothing, so that both the compiler and the engine can use it
//! without pulling the other's dependencies.
//!
//! # Layout (version 1)
//!
//! All integers are little-endian.
//!
//! ```text
//! header   magic "WSTBPLAN" (8) | endian check 0x0A0B0C0D (4) | version (4)
//!          | reserved, zero (4) | section count (4) | FNV-1a 64 of everything
//!          after the header (8)
//! table    per section: kind (4) | offset from file start (4) | length (4)
//! sections DESCRIPTORS: an encoded google.protobuf.FileDescriptorSet
//!          METHODS:     the method table (see `codec`)
//! ```
//!
//! Loading checks the header, the checksum, the section table and then every
//! method in a fixed order (field paths, metadata keys, responses, then rules,
//! whose indices refer to the earlier lists). After [`Plan::from_bytes`]
//! returns, every index in the plan is in range and every response is
//! well-formed, so the engine never re-checks them. Any layout change bumps
//! [`VERSION`]; `tests/plans/` keeps plan files written by earlier versions,
//! which must still load.

mod codec;
mod dump;
pub mod layer;

pub use codec::{fnv1a, identity, LoadError};
pub use layer::layer;

/// First eight bytes of every plan file.
pub const MAGIC: [u8; 8] = *b"WSTBPLAN";
/// The layout version this crate writes. It also reads every earlier version.
pub const VERSION: u32 = 8;
/// The oldest layout version this crate still reads.
pub const OLDEST_VERSION: u32 = 1;

/// A compiled plan: everything the engine needs to serve, nothing more.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// An encoded `google.protobuf.FileDescriptorSet` holding every file the
    /// plan was compiled from, dependencies and well-known types included, so
    /// that later features (reflection, JSON) need no .proto at run time.
    pub descriptors: Vec<u8>,
    /// Every method of every service in the descriptors, sorted by path.
    pub methods: Vec<Method>,
}

/// The four RPC shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MethodKind {
    Unary = 0,
    ServerStreaming = 1,
    ClientStreaming = 2,
    BidiStreaming = 3,
}

impl MethodKind {
    /// Builds the kind from the two streaming flags of a method descriptor.
    pub fn from_streaming(client: bool, server: bool) -> Self {
        match (client, server) {
            (false, false) => MethodKind::Unary,
            (false, true) => MethodKind::ServerStreaming,
            (true, false) => MethodKind::ClientStreaming,
            (true, true) => MethodKind::BidiStreaming,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MethodKind::Unary => "unary",
            MethodKind::ServerStreaming => "server_streaming",
            MethodKind::ClientStreaming => "client_streaming",
            MethodKind::BidiStreaming => "bidi_streaming",
        }
    }
}

/// One RPC method and the rules that answer it.
#[derive(Debug, Clone, PartialEq)]
pub struct Method {
    /// The HTTP/2 `:path`, `/package.Service/Method`.
    pub path: String,
    pub kind: MethodKind,
    /// Fully-qualified request message name.
    pub input_type: String,
    /// Fully-qualified response message name.
    pub output_type: String,
    /// The distinct request field paths that this method's rules read.
    pub fields: Vec<FieldPath>,
    /// The distinct (lower-case) metadata keys that this method's rules read.
    pub metadata_keys: Vec<String>,
    /// The responses rules point at.
    pub responses: Vec<Response>,
    /// Rules in evaluation order: the first rule whose conditions all hold
    /// answers the call. The compiler has already applied priorities, tiers
    /// and tie-breaks to produce this order.
    pub rules: Vec<Rule>,
    /// For bidirectional methods: answer each request message as it arrives
    /// (rules see that message), instead of once after the client
    /// half-closes (rules see the aggregate view).
    pub duplex: bool,
    /// Request validation (buf.validate rules of the input message): checks
    /// that must all hold for a call to be valid, in field order. Used
    /// only when the engine runs with validation on.
    pub checks: Vec<Check>,
    /// Validation rules written in CEL (protovalidate's `cel`): evaluated
    /// on the decoded message, only for requests of methods that have
    /// them.
    pub cel_checks: Vec<CelCheck>,
    /// Regular expressions the rules use, each a dense DFA from
    /// regex-automata serialized little-endian for unanchored search
    /// (`DFA::to_bytes_little_endian`). Validated when the engine loads them.
    pub regexes: Vec<Vec<u8>>,
}

/// A path from the request message to a scalar field, as field numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldPath {
    /// The dotted path as written in the rule, for dumps and messages.
    pub name: String,
    /// Field numbers from the top-level message down; every step but the last
    /// is a singular message field.
    pub numbers: Vec<u32>,
    /// The protobuf type of the last field.
    pub kind: ScalarKind,
    /// The value the field has when it is absent from the wire (proto3 zero,
    /// or the proto2 declared default).
    pub default: Value,
    /// How the last field is read.
    pub shape: Shape,
    /// Which request message of the call the path reads.
    pub message: MessageSel,
    /// The steps that go into a repeated field, in path order, and which of
    /// its elements the path goes on in (`items[0].size`, `items[*].size`).
    /// A step before the last is then a repeated message field; a pick on
    /// the last step reads that element itself. At most one pick is a
    /// quantifier ([`Elem::Any`] or [`Elem::All`]).
    pub picks: Vec<Pick>,
}

impl Method {
    /// The index of `path` in the method's field paths, added if new; two
    /// paths are the same when they read the same value the same way.
    pub fn intern_field(&mut self, path: &FieldPath) -> u32 {
        let same = |f: &FieldPath| {
            f.numbers == path.numbers
                && f.shape == path.shape
                && f.kind == path.kind
                && f.message == path.message
                && f.picks == path.picks
        };
        match self.fields.iter().position(same) {
            Some(i) => i as u32,
            None => {
                self.fields.push(path.clone());
                self.fields.len() as u32 - 1
            }
        }
    }
}

impl FieldPath {
    /// The quantifier of the path, if one of its picks is.
    pub fn quantifier(&self) -> Option<Elem> {
        self.picks.iter().map(|p| p.elem).find(|e| matches!(e, Elem::Any | Elem::All))
    }

    /// Whether the path reads several values: through a quantifier, a
    /// repeated field at its end or every message of a client stream.
    /// Such a path is read by aggregates in templates, not as one value.
    pub fn is_multi(&self) -> bool {
        self.quantifier().is_some() || self.shape == Shape::Repeated || self.message == MessageSel::Each
    }
}

/// A step of a [`FieldPath`] into a repeated field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    /// Index into [`FieldPath::numbers`] of the repeated field.
    pub step: u32,
    pub elem: Elem,
}

/// Which elements of a repeated field a path goes on in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// The element at this position; negative counts from the end (-1 is
    /// the last). An element the field lacks reads as absent.
    Index(i32),
    /// Any element: a test holds if it holds for at least one.
    Any,
    /// Every element: a test holds if it holds for all of them (and so
    /// when there are none).
    All,
}

/// The most picks one path may have.
pub const MAX_PICKS: usize = 4;

/// Which message of a call a field path reads. Unary and server-streaming
/// calls have one request message; for client-streaming and aggregated
/// bidirectional calls the rules see Wishmock's view of all of them:
/// `first`, `last`, `items.N` and `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MessageSel {
    /// The call's only message (or, in a duplex call, the one just received).
    #[default]
    Single,
    First,
    Last,
    /// The message at this index.
    Nth(u32),
    /// Not a field: the number of messages received (`numbers` is empty,
    /// kind Uint64).
    Count,
    /// Every message of a client stream, each read as it arrives: only
    /// aggregates in templates read such a path (`sum(request.items[*].n)`).
    Each,
}

/// How a field path is read from the request.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// A singular scalar: the last occurrence counts; absent reads as the
    /// default.
    Singular,
    /// A repeated scalar (packed or not): every element.
    Repeated,
    /// One entry of a map field (`numbers` ends at the map field): the value
    /// of the last entry whose key equals `key`; absent reads as the default.
    /// `kind` and `default` describe the value.
    MapValue { key_kind: ScalarKind, key: Value },
    /// Which member of a oneof is set (`numbers` leads to the message holding
    /// it): reads as the field number (I64) of the last member seen, 0 if
    /// none. `kind` is Int32.
    OneofCase { members: Vec<u32> },
}

/// Protobuf scalar types, numbered as in `FieldDescriptorProto.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ScalarKind {
    Double = 1,
    Float = 2,
    Int64 = 3,
    Uint64 = 4,
    Int32 = 5,
    Fixed64 = 6,
    Fixed32 = 7,
    Bool = 8,
    String = 9,
    Bytes = 12,
    Uint32 = 13,
    Enum = 14,
    Sfixed32 = 15,
    Sfixed64 = 16,
    Sint32 = 17,
    Sint64 = 18,
}

impl ScalarKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        use ScalarKind::*;
        Some(match v {
            1 => Double,
            2 => Float,
            3 => Int64,
            4 => Uint64,
            5 => Int32,
            6 => Fixed64,
            7 => Fixed32,
            8 => Bool,
            9 => String,
            12 => Bytes,
            13 => Uint32,
            14 => Enum,
            15 => Sfixed32,
            16 => Sfixed64,
            17 => Sint32,
            18 => Sint64,
            _ => return None,
        })
    }

    /// The wire type a field of this kind is encoded with (0 varint,
    /// 1 fixed64, 2 length-delimited, 5 fixed32).
    pub fn wire_type(self) -> u8 {
        use ScalarKind::*;
        match self {
            Int64 | Uint64 | Int32 | Bool | Uint32 | Enum | Sint32 | Sint64 => 0,
            Double | Fixed64 | Sfixed64 => 1,
            String | Bytes => 2,
            Float | Fixed32 | Sfixed32 => 5,
        }
    }

    /// The kind of [`Value`] a field of this kind compares as.
    pub fn value_class(self) -> ValueClass {
        use ScalarKind::*;
        match self {
            Int64 | Int32 | Sfixed32 | Sfixed64 | Sint32 | Sint64 | Enum => ValueClass::I64,
            Uint64 | Uint32 | Fixed64 | Fixed32 => ValueClass::U64,
            Double | Float => ValueClass::F64,
            Bool => ValueClass::Bool,
            String | Bytes => ValueClass::Bytes,
        }
    }

    pub fn name(self) -> &'static str {
        use ScalarKind::*;
        match self {
            Double => "double",
            Float => "float",
            Int64 => "int64",
            Uint64 => "uint64",
            Int32 => "int32",
            Fixed64 => "fixed64",
            Fixed32 => "fixed32",
            Bool => "bool",
            String => "string",
            Bytes => "bytes",
            Uint32 => "uint32",
            Enum => "enum",
            Sfixed32 => "sfixed32",
            Sfixed64 => "sfixed64",
            Sint32 => "sint32",
            Sint64 => "sint64",
        }
    }
}

/// What a [`Value`] of a given scalar kind looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueClass {
    I64,
    U64,
    F64,
    Bool,
    Bytes,
}

/// A decoded scalar, normalised so that values read from the wire and values
/// written in rules compare with `==`.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// int32, int64, sint*, sfixed* and enum numbers.
    I64(i64),
    /// uint32, uint64, fixed32, fixed64.
    U64(u64),
    /// float (widened) and double.
    F64(f64),
    Bool(bool),
    /// string (UTF-8) and bytes; metadata values too.
    Bytes(Vec<u8>),
}

impl Value {
    pub fn class(&self) -> ValueClass {
        match self {
            Value::I64(_) => ValueClass::I64,
            Value::U64(_) => ValueClass::U64,
            Value::F64(_) => ValueClass::F64,
            Value::Bool(_) => ValueClass::Bool,
            Value::Bytes(_) => ValueClass::Bytes,
        }
    }
}

/// One rule: all conditions must hold for it to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub conditions: Vec<Condition>,
    /// Index into [`Method::responses`].
    pub response: u32,
    /// The effective priority, kept for dumps and diagnostics.
    pub priority: i64,
    /// Where the rule was written, `file:line:column`.
    pub origin: String,
    /// A recording replayed without descriptors: the rule holds only if the
    /// call looks like the recorded one (see [`RawRequest`]); `conditions`
    /// then hold at most the session test.
    pub raw: Option<Box<RawRequest>>,
    /// Answers requests that fail validation too (`validate: false`), so
    /// that a mock can give the real service's own error answer.
    pub skip_validation: bool,
}

/// A request recorded as bytes (raw mode, no `.proto`): replay matches a
/// call to it in stages. The call must carry the same set of metadata
/// names (after the engine's ignore list), the same content type and the
/// same compression; then identical messages win, else the most similar
/// recording above the engine's threshold.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RawRequest {
    /// The request messages, unframed and uncompressed, in order.
    pub messages: Vec<Vec<u8>>,
    /// The names of the request's metadata, lower-case, sorted, distinct.
    pub metadata_keys: Vec<String>,
    /// The request's `content-type`, lower-case (`application/grpc` is
    /// also written `application/grpc+proto`).
    pub content_type: String,
    /// `grpc-encoding` of the request messages; empty for identity.
    pub encoding: String,
}

/// One validation rule of the input message, compiled: the call is
/// invalid if `test` fails on `source` while every `guards` field is
/// present (rules of a field inside an optional message apply when that
/// message is set).
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub source: Source,
    pub test: Test,
    /// Indices into [`Method::fields`] of paths that must be present.
    pub guards: Vec<u32>,
    /// The rule's id, as protovalidate names it (`string.min_len`).
    pub rule_id: String,
    /// What a violation says (`must be at least 3 characters`).
    pub message: String,
    /// The field, from the request message down: (number, name, type as
    /// in `FieldDescriptorProto.Type`) per step; the violation's path.
    pub path: Vec<(u32, String, u8)>,
    /// The rule, from `buf.validate.FieldRules` down: (number, name,
    /// type) per step (`string` then `min_len`).
    pub rule: Vec<(u32, String, u8)>,
    /// Read from protoc-gen-validate's `validate.rules` rather than
    /// protovalidate's `buf.validate` (`--validation-source`).
    pub pgv: bool,
    /// A rule on the keys or values of a map: the keys' type, so that a
    /// violation names the entry by its key.
    pub map_key: Option<ScalarKind>,
    /// A rule on the keys of a map (the violation is `for_key`).
    pub for_key: bool,
}

/// A validation rule written in CEL.
#[derive(Debug, Clone, PartialEq)]
pub struct CelCheck {
    /// Field numbers from the request message to what `this` is: a field
    /// (`field` true) or a message (empty for the request itself).
    /// Rules inside a message that is not set do not apply.
    pub numbers: Vec<u32>,
    pub field: bool,
    /// The expression: false, or a non-empty string (the violation's
    /// message), is a violation.
    pub expression: String,
    pub rule_id: String,
    /// The message of a violation whose expression gave false.
    pub message: String,
    /// The violation's field path, as in [`Check::path`].
    pub path: Vec<(u32, String, u8)>,
    /// For a predefined rule (an extension of protovalidate's rules with
    /// CEL rules of its own): the extension's value, as a CEL literal the
    /// expression reads as `rule`; empty otherwise.
    pub rule: String,
    /// For the rules protovalidate defines in CEL (timestamps and
    /// durations): the field's rules message as a CEL map literal, which
    /// the expression reads as `rules`; empty otherwise.
    pub rules: String,
    /// The field is ignored at its zero value (`IGNORE_IF_ZERO_VALUE`).
    pub skip_zero: bool,
    /// For a rule inside the elements of a repeated field or the values
    /// of a map: the position in `numbers` of that field (a map's is
    /// followed by its value's number, 2) and, for a map, its keys'
    /// `ScalarKind` (0 for a list). The rule runs on every element.
    pub each: Option<(u32, u8)>,
}

/// A test on one input of the call.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub source: Source,
    pub test: Test,
}

/// What a condition reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// Index into [`Method::fields`].
    Field(u32),
    /// Index into [`Method::metadata_keys`]. An absent key reads as the empty
    /// string.
    Metadata(u32),
}

/// A boolean combination of operators applied to one source.
#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    Op(Op),
    Not(Box<Test>),
    /// At least one holds.
    Any(Vec<Test>),
    /// All hold.
    All(Vec<Test>),
}

/// An operator, applied to the value read from a source. Operand classes are
/// checked at load time against the source (see `codec::check_test`).
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Equal to the value.
    Eq(Value),
    /// Equal to one of the values.
    In(Vec<Value>),
    /// Ordered comparisons: numbers (and enum numbers) directly; string
    /// fields and metadata are parsed as numbers (never holds if unparsable).
    Gt(Value),
    Gte(Value),
    Lt(Value),
    Lte(Value),
    /// Present on the wire (a repeated field: at least one element; metadata:
    /// the key was sent).
    Exists,
    /// Substring of a string, bytes or metadata value; for a repeated field,
    /// one element equals the value.
    Contains(Value),
    Prefix(Vec<u8>),
    Suffix(Vec<u8>),
    /// Unanchored regular expression search; index into [`Method::regexes`].
    Regex(u32),
    /// The test applies to the length: elements of a repeated field, bytes
    /// of a string, bytes or metadata value. The inner test sees a U64.
    Len(Box<Test>),
    /// The test applies to the number of Unicode code points of a string
    /// (U64).
    Chars(Box<Test>),
    /// A string is a well-formed value of this format (validation).
    Format(Format),
    /// Every element of a repeated field differs from the others
    /// (validation's `repeated.unique`).
    Unique,
}

/// The string formats validation checks natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Format {
    /// A host name (RFC 1034 labels; the last not all digits).
    Hostname = 1,
    /// An IPv4 or IPv6 address.
    Ip = 2,
    Ipv4 = 3,
    Ipv6 = 4,
    /// An RFC 3986 URI.
    Uri = 5,
    /// An RFC 3986 URI reference (a URI or a relative reference).
    UriRef = 6,
    /// A host name or an IP address.
    Address = 7,
    /// A host and a port: `example.com:443`, `[::1]:80`.
    HostAndPort = 8,
    /// An address and a prefix length, no host bits set: `10.0.0.0/8`.
    IpPrefix = 9,
    Ipv4Prefix = 10,
    Ipv6Prefix = 11,
    /// An address and a prefix length: `10.0.0.1/8`.
    IpWithPrefixlen = 12,
    Ipv4WithPrefixlen = 13,
    Ipv6WithPrefixlen = 14,
    /// An e-mail address as the HTML standard defines one.
    Email = 15,
}

impl Format {
    pub fn from_u8(v: u8) -> Option<Format> {
        Some(match v {
            1 => Format::Hostname,
            2 => Format::Ip,
            3 => Format::Ipv4,
            4 => Format::Ipv6,
            5 => Format::Uri,
            6 => Format::UriRef,
            7 => Format::Address,
            8 => Format::HostAndPort,
            9 => Format::IpPrefix,
            10 => Format::Ipv4Prefix,
            11 => Format::Ipv6Prefix,
            12 => Format::IpWithPrefixlen,
            13 => Format::Ipv4WithPrefixlen,
            14 => Format::Ipv6WithPrefixlen,
            15 => Format::Email,
            _ => return None,
        })
    }
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Eq(_) => "eq",
            Op::In(_) => "in",
            Op::Gt(_) => "gt",
            Op::Gte(_) => "gte",
            Op::Lt(_) => "lt",
            Op::Lte(_) => "lte",
            Op::Exists => "exists",
            Op::Contains(_) => "contains",
            Op::Prefix(_) => "prefix",
            Op::Suffix(_) => "suffix",
            Op::Regex(_) => "regex",
            Op::Len(_) => "len",
            Op::Chars(_) => "chars",
            Op::Format(_) => "format",
            Op::Unique => "unique",
        }
    }
}

/// A prepared answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// The gRPC status code, 0 to 16.
    pub status: u8,
    /// `grpc-message`, already percent-encoded for the wire; empty for none.
    pub message: String,
    /// The response message exactly as sent: the 5-byte gRPC prefix followed
    /// by the encoded message. Empty for error responses.
    pub body: Vec<u8>,
    /// Initial metadata, names lower-case and valid for HTTP/2.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Trailing metadata other than `grpc-status` and `grpc-message`.
    pub trailers: Vec<(String, Vec<u8>)>,
    /// Delay before answering, in milliseconds.
    pub delay_ms: u32,
    /// For streaming responses: the messages to send, each framed like
    /// `body`. Empty means `body` is the only message.
    pub stream: Vec<Vec<u8>>,
    /// Pause between streamed messages.
    pub stream_delay_ms: u32,
    /// How many times the stream list is sent: 1 normally, 0 = until the
    /// client cancels.
    pub stream_repeat: u32,
    /// Shuffle the list on each pass.
    pub stream_random_order: bool,
    /// For an error status: how many streamed messages go out before it
    /// (0: a trailers-only error, as Wishmock does).
    pub error_after: u32,
    /// How long to wait before answering, drawn per call; `Fixed` uses
    /// `delay_ms`.
    pub latency: Latency,
    /// Fault injection: a fraction of the calls this response answers get
    /// the fault instead.
    pub fault: Option<Fault>,
    /// How many calls this response may answer, across all connections and
    /// workers; 0 for no limit. Once used up, the rules leading to it are
    /// skipped, which is how sequences (first call A, then B, then C) are
    /// written.
    pub times: u32,
    /// Messages rendered per call instead of sent as prepared bytes: slot 0
    /// is `body`, slot `i + 1` is `stream[i]` (whose prepared bytes are then
    /// unused).
    pub templates: Vec<(u32, Template)>,
    /// Metadata values rendered per call, sent after `headers` (or
    /// `trailers`); a value that renders empty or invalid is left out.
    pub metadata_templates: Vec<MetadataTemplate>,
}

/// A header or trailer whose value is a template (`{{metadata.x-id}}`).
#[derive(Debug, Clone, PartialEq)]
pub struct MetadataTemplate {
    /// Sent with the trailers rather than the headers.
    pub trailer: bool,
    /// The metadata key, lower-case.
    pub name: String,
    pub parts: Vec<Part>,
}

/// A response message with holes: encoded protobuf pieces around values
/// computed per call. Rendering writes the pieces in order and computes the
/// length prefix of every `Nested` and `Text` piece, so no message tree is
/// built at run time.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Template {
    pub pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Encoded bytes, copied as they are.
    Bytes(Vec<u8>),
    /// A length-delimited field (an embedded message) whose content has
    /// holes: `key` is the encoded field key.
    Nested { key: Vec<u8>, pieces: Vec<Piece> },
    /// A string or bytes field whose content is rendered text.
    Text { key: Vec<u8>, parts: Vec<Part> },
    /// A numeric, bool or enum field whose value is rendered text read as
    /// `kind`; left out when the text does not read as one.
    Number { key: Vec<u8>, kind: ScalarKind, parts: Vec<Part> },
}

/// Text of a template: literal pieces and expressions.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Lit(Vec<u8>),
    Expr(Expr),
}

/// A template expression, Wishmock's `{{ ... }}` language.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A request field: index into [`Method::fields`].
    Field(u32),
    /// A metadata value: index into [`Method::metadata_keys`].
    Metadata(u32),
    StreamIndex,
    StreamTotal,
    StreamIsFirst,
    StreamIsLast,
    /// Milliseconds since the Unix epoch.
    Now,
    /// A random version 4 UUID.
    Uuid,
    /// A uniformly random integer in `[lo, hi]`.
    RandomInt(i64, i64),
    /// A uniformly random number in `[lo, hi)`.
    RandomFloat(f64, f64),
    /// `utils.format`: each `%s` in the text takes the next argument.
    Format(Vec<u8>, Vec<Expr>),
    /// A number literal (in arithmetic and format arguments).
    Number(f64),
    /// A string literal (format arguments).
    Str(Vec<u8>),
    /// `left op right` on numbers: op is one of `+ - * /`.
    Arith(Box<Expr>, u8, Box<Expr>),
    /// An enum field (index into [`Method::fields`]) rendered as the name
    /// of its value, from the table (number, name) sorted by number; a
    /// number the table lacks renders as the number.
    EnumName(u32, Vec<(i32, Vec<u8>)>),
    /// `utils.bytes(n)`: as many bytes as the expression says (a number,
    /// rounded down; bounded by the engine's send limit), the pattern
    /// repeated (one zero byte for none).
    Fill(Box<Expr>, Vec<u8>),
    /// An aggregate of the values a multi-valued path reads (see
    /// [`FieldPath::is_multi`]; index into [`Method::fields`]).
    Aggregate(u32, Agg),
}

/// What an [`Expr::Aggregate`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Agg {
    /// How many values (0 for none).
    Count = 0,
    /// Their sum (0 for none); numeric paths only.
    Sum = 1,
    /// The least; empty for none; numeric paths only.
    Min = 2,
    /// The greatest; empty for none; numeric paths only.
    Max = 3,
}

impl Agg {
    pub fn name(self) -> &'static str {
        match self {
            Agg::Count => "count",
            Agg::Sum => "sum",
            Agg::Min => "min",
            Agg::Max => "max",
        }
    }
}

impl Default for Response {
    fn default() -> Self {
        Response {
            status: 0,
            message: String::new(),
            body: Vec::new(),
            headers: Vec::new(),
            trailers: Vec::new(),
            delay_ms: 0,
            stream: Vec::new(),
            stream_delay_ms: 0,
            stream_repeat: 1,
            stream_random_order: false,
            error_after: 0,
            latency: Latency::Fixed,
            fault: None,
            times: 0,
            templates: Vec::new(),
            metadata_templates: Vec::new(),
        }
    }
}

/// A latency distribution, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Latency {
    /// `delay_ms`, every time.
    Fixed,
    Uniform {
        min: f64,
        max: f64,
    },
    Normal {
        mean: f64,
        stddev: f64,
    },
    /// Log-normal with the given median and 99th percentile.
    LogNormal {
        median: f64,
        p99: f64,
    },
}

/// An injected fault.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// Fraction of calls affected, in (0, 1].
    pub rate: f64,
    /// Reset the stream (RST_STREAM) instead of answering with a status.
    pub drop: bool,
    /// The status to answer with when not dropping.
    pub status: u8,
    /// Its message, percent-encoded.
    pub message: String,
    /// A fault below gRPC, on the HTTP/2 stream or connection, instead of
    /// a status (then `drop` is false).
    pub transport: Option<TransportFault>,
}

/// A fault on the HTTP/2 stream or connection of a call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransportFault {
    /// How many response messages go out first; it fires before the call
    /// ends if fewer do.
    pub after: u32,
    pub action: Transport,
}

/// What a transport fault does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transport {
    /// RST_STREAM with this HTTP/2 error code.
    Reset(u32),
    /// GOAWAY: graceful lets the calls in flight finish; immediate closes
    /// the connection after it.
    GoAway { graceful: bool },
    /// Closes the TCP connection (no GOAWAY).
    Close,
    /// Stops writing to the connection for this many milliseconds.
    StallWrite(u32),
    /// Stops reading from the connection for this many milliseconds.
    StallRead(u32),
    /// Writes the connection's output `bytes` at a time, one write every
    /// `every_ms`, until the call ends.
    Trickle { bytes: u32, every_ms: u32 },
    /// Sends a malformed response header block (an upper-case field
    /// name, RFC 9113 §8.2.1), which the client takes as a stream error.
    Malformed,
}

/// The names of the HTTP/2 error codes (RFC 9113 §7), indexed by code.
pub const H2_ERROR_NAMES: [&str; 14] = [
    "NO_ERROR",
    "PROTOCOL_ERROR",
    "INTERNAL_ERROR",
    "FLOW_CONTROL_ERROR",
    "SETTINGS_TIMEOUT",
    "STREAM_CLOSED",
    "FRAME_SIZE_ERROR",
    "REFUSED_STREAM",
    "CANCEL",
    "COMPRESSION_ERROR",
    "CONNECT_ERROR",
    "ENHANCE_YOUR_CALM",
    "INADEQUATE_SECURITY",
    "HTTP_1_1_REQUIRED",
];

impl TransportFault {
    /// The fault as the journal and the logs name it.
    pub fn describe(&self) -> String {
        let what = match self.action {
            Transport::Reset(code) => match H2_ERROR_NAMES.get(code as usize) {
                Some(name) => format!("RST_STREAM {name}"),
                None => format!("RST_STREAM {code:#x}"),
            },
            Transport::GoAway { graceful: true } => "GOAWAY (graceful)".into(),
            Transport::GoAway { graceful: false } => "GOAWAY (immediate)".into(),
            Transport::Close => "TCP close".into(),
            Transport::StallWrite(ms) => format!("writes stalled {ms} ms"),
            Transport::StallRead(ms) => format!("reads stalled {ms} ms"),
            Transport::Trickle { bytes, every_ms } => format!("trickle {bytes} bytes every {every_ms} ms"),
            Transport::Malformed => "malformed frame".into(),
        };
        format!("{what} after {} message(s)", self.after)
    }

    /// The short name metrics count it under.
    pub fn kind(&self) -> &'static str {
        match self.action {
            Transport::Reset(_) => "reset",
            Transport::GoAway { graceful: true } => "goaway_graceful",
            Transport::GoAway { graceful: false } => "goaway_immediate",
            Transport::Close => "close",
            Transport::StallWrite(_) => "stall_write",
            Transport::StallRead(_) => "stall_read",
            Transport::Trickle { .. } => "trickle",
            Transport::Malformed => "malformed",
        }
    }

    /// Whether the call goes on after it (a stall, a trickle, a graceful
    /// GOAWAY) rather than ending there.
    pub fn call_goes_on(&self) -> bool {
        matches!(
            self.action,
            Transport::StallWrite(_)
                | Transport::StallRead(_)
                | Transport::Trickle { .. }
                | Transport::GoAway { graceful: true }
        )
    }
}

/// Frames a protobuf message as one uncompressed gRPC message.
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 5);
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// Percent-encodes a `grpc-message` value as the gRPC HTTP/2 protocol asks:
/// bytes outside printable ASCII, and `%` itself, become `%XX`.
pub fn percent_encode_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(char::from_digit((b >> 4) as u32, 16).unwrap().to_ascii_uppercase());
            out.push(char::from_digit((b & 15) as u32, 16).unwrap().to_ascii_uppercase());
        }
    }
    out
}

/// The canonical names of the gRPC status codes, indexed by code.
pub const STATUS_NAMES: [&str; 17] = [
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

/// The metadata key of a call's test session. Rules written for a session
/// test it; the engine reads [`SESSION_ALIAS`] under this name too, so
/// clients of either convention select their session's rules.
pub const SESSION_KEY: &str = "x-wirestub-session";
/// GripMock's session header, read as [`SESSION_KEY`].
pub const SESSION_ALIAS: &str = "x-gripmock-session";

/// Whether `name` is a valid gRPC metadata key: lower-case `[0-9a-z_.-]+`.
pub fn is_valid_metadata_key(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || matches!(b, b'_' | b'.' | b'-'))
}

/// Whether `value` may be sent as a metadata value of `key`: `-bin` keys take
/// base64 text, others printable ASCII and spaces.
pub fn is_valid_metadata_value(value: &[u8]) -> bool {
    value.iter().all(|&b| (0x20..=0x7e).contains(&b))
}

impl Plan {
    /// Finds a method by its `:path`.
    pub fn method(&self, path: &str) -> Option<&Method> {
        self.methods.binary_search_by(|m| m.path.as_str().cmp(path)).ok().map(|i| &self.methods[i])
    }

    /// A readable rendering of the plan, stable across runs; message bodies are
    /// shown as escaped bytes (the compiler's `dump` decodes them instead).
    pub fn dump(&self) -> String {
        dump::dump(self, &|_, body| dump::escape_bytes(body))
    }

    /// Like [`Plan::dump`], with a caller-supplied rendering of each response
    /// body, given the method and the message bytes without the gRPC prefix.
    pub fn dump_with(&self, body: &dyn Fn(&Method, &[u8]) -> String) -> String {
        dump::dump(self, body)
    }
}
