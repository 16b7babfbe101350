//! Raw rule documents: calls recorded without descriptors (`engine run
//! --record` for a method no `.proto` describes), replayed from their bytes.
//!
//! ```yaml
//! service: pkg.Service
//! method: Method
//! raw: unary            # the call's shape as recorded
//! responses:
//!   - request:
//!       messages: ["CgVoZWxsbw=="]        # base64, one per request message
//!       metadata: [authorization, x-id]   # names the call carried (never values)
//!       content_type: application/grpc
//!     messages: ["CgV3b3JsZA=="]          # the answer's messages, base64
//!     metadata: { x-served-by: a }
//!     trailers: { grpc-status: 5, grpc-message: gone }
//!     times: 1
//! ```
//!
//! A raw document compiles with no protos at all: its method joins the plan
//! without types, and the engine replays it by comparing bytes. When the
//! protos describe the method, the recordings become typed rules: the
//! recorded messages must decode as its types (a mismatch is an error at
//! the line), each request's set fields become `eq` conditions (repeated
//! fields by their length; maps left out; a client stream by its count,
//! first and last message), and the answers are sent as recorded, so
//! `compiler dump` shows them as JSON and every protocol and codec gets
//! them.

use crate::diag::{Diagnostic, Span};
use crate::paths::{Cond, CondSource};
use crate::rules::DocCx;
use crate::values;
use crate::yaml::{Node, NodeKind};
use base64::Engine as _;
use prost_reflect::{DynamicMessage, MessageDescriptor, MethodDescriptor};
use wirestub_plan as plan;

/// The keys of a raw document.
pub const DOC_KEYS: &[&str] = &["service", "method", "raw", "responses", "description", "session"];
const RESPONSE_KEYS: &[&str] = &["request", "messages", "metadata", "trailers", "delay_ms", "stream_delay_ms", "times"];
const REQUEST_KEYS: &[&str] = &["messages", "metadata", "content_type", "encoding"];
/// The most messages a recorded request may hold: replay keeps this many of
/// a call's messages to compare.
pub const MAX_REQUEST_MESSAGES: usize = 1024;

/// A checked raw document.
#[derive(Clone)]
pub struct RawDoc {
    /// `/package.Service/Method`.
    pub path: String,
    pub kind: plan::MethodKind,
    /// The method's descriptor, when the protos describe it.
    pub method: Option<MethodDescriptor>,
    pub session: Option<String>,
    pub entries: Vec<RawEntry>,
}

/// One recording: the request to recognise and the answer.
#[derive(Clone)]
pub struct RawEntry {
    pub request: plan::RawRequest,
    /// With the method's descriptor: the request as typed conditions.
    pub typed: Option<Vec<Cond>>,
    pub response: plan::Response,
    pub origin: String,
    pub span: Span,
}

/// Whether the client and the server stream in a call of this shape.
pub fn streaming(kind: plan::MethodKind) -> (bool, bool) {
    use plan::MethodKind::*;
    (matches!(kind, ClientStreaming | BidiStreaming), matches!(kind, ServerStreaming | BidiStreaming))
}

impl RawDoc {
    /// The document as a typed rule document, when the protos describe its
    /// method: each recording a `when` entry.
    pub fn typed(&self) -> Option<crate::rules::RuleDoc> {
        let method = self.method.clone()?;
        let responses = self
            .entries
            .iter()
            .map(|e| crate::rules::Resp {
                when: Some(e.typed.clone().unwrap_or_default()),
                priority: 0,
                skip_validation: false,
                response: e.response.clone(),
                template_refs: Vec::new(),
                origin: e.origin.clone(),
                span: e.span.clone(),
            })
            .collect();
        Some(crate::rules::RuleDoc {
            method,
            duplex: false,
            gate: Vec::new(),
            responses,
            session: self.session.clone(),
        })
    }
}

fn kind_of(name: &str) -> Option<plan::MethodKind> {
    use plan::MethodKind::*;
    [Unary, ServerStreaming, ClientStreaming, BidiStreaming].into_iter().find(|k| k.name() == name)
}

impl DocCx<'_> {
    /// Checks a document holding `raw:`.
    pub(crate) fn raw_doc(&mut self, node: &Node, entries: &[(Node, Node)]) -> Option<RawDoc> {
        let get = |k: &str| entries.iter().find(|(key, _)| key.scalar() == Some(k));
        for (key, _) in entries {
            let name = key.scalar().unwrap_or_default();
            if !DOC_KEYS.contains(&name) {
                let d = self
                    .err(&key.span, format!("unknown key `{name}` in a raw rule document"))
                    .with_help(crate::diag::suggest(name, DOC_KEYS.iter().copied()));
                self.diags.push(d);
            }
        }
        let (_, kind_node) = get("raw")?;
        let Some(kind) = kind_node.scalar().and_then(kind_of) else {
            let d = self
                .err(
                    &kind_node.span,
                    format!("`raw` names the call's shape, found `{}`", kind_node.scalar().unwrap_or("?")),
                )
                .with_help("one of `unary`, `server_streaming`, `client_streaming`, `bidi_streaming`");
            self.diags.push(d);
            return None;
        };
        let text = |k: &str| get(k).and_then(|(_, v)| v.scalar()).map(str::to_string);
        let (Some(service), Some(name)) = (text("service"), text("method")) else {
            let d = self
                .err(&crate::rules::doc_span(node), "a raw rule document needs `service` and `method`")
                .with_help("e.g. `service: helloworld.Greeter` and `method: SayHello`");
            self.diags.push(d);
            return None;
        };
        let path = format!("/{service}/{name}");
        let valid = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
        if !valid(&service) || !valid(&name) || name.contains('.') {
            let span = get("method").map(|(_, v)| v.span.clone()).unwrap_or_else(|| crate::rules::doc_span(node));
            let d = self.err(&span, format!("`{path}` is not a method path"));
            self.diags.push(d.with_help("`service` is `package.Service`, `method` a plain name"));
            return None;
        }
        let method = self.methods.find(&service, &name);
        if let Some(m) = &method {
            // The recorder sees counts, not the shape: a server stream that
            // sent one reply is recorded as unary. A shape fits when every
            // side it saw streaming streams in the protos.
            let described = plan::MethodKind::from_streaming(m.is_client_streaming(), m.is_server_streaming());
            let (client, server) = streaming(kind);
            if (client && !m.is_client_streaming()) || (server && !m.is_server_streaming()) {
                let d = self.err(
                    &kind_node.span,
                    format!("`{}` is {} in the protos, recorded as {}", m.full_name(), described.name(), kind.name()),
                );
                self.diags.push(d.with_help("record again, or give `raw:` the method's shape"));
                return None;
            }
        }
        let session = self.session(get("session"));
        let mut out = Vec::new();
        match get("responses") {
            Some((_, list)) => match &list.kind {
                NodeKind::Seq(items) => {
                    for item in items {
                        out.extend(self.leniently(|cx| cx.raw_entry(item, kind, method.as_ref())));
                    }
                }
                _ => {
                    let d = self.err(&list.span, format!("`responses` must be a list, found {}", list.describe()));
                    self.diags.push(d);
                }
            },
            None => {
                let d = self.err(&crate::rules::doc_span(node), "rule document has no `responses`");
                self.diags.push(d);
            }
        }
        Some(RawDoc { path, kind, method, session, entries: out })
    }

    fn raw_entry(
        &mut self,
        node: &Node,
        kind: plan::MethodKind,
        method: Option<&MethodDescriptor>,
    ) -> Option<RawEntry> {
        let entries = self.expect_map(node, "a response entry")?;
        let errors_before = self.diags.error_count();
        let mut request = None;
        let mut messages = Vec::new();
        let mut response = plan::Response::default();
        let mut stream_delay = 0;
        for (key, value) in entries {
            let name = key.scalar().unwrap_or_default();
            match name {
                "request" => request = self.raw_request(value, method.map(|m| m.input())),
                "messages" => messages = self.base64_list(value, "`messages`", method.map(|m| m.output())),
                "metadata" => response.headers = self.metadata_pairs(value, "`metadata`"),
                "trailers" => {
                    for (k, v) in self.expect_map(value, "`trailers`").unwrap_or_default() {
                        match k.scalar().unwrap_or_default() {
                            // Recorded rich error details travel as recorded.
                            crate::details::TRAILER => match values::read_string(v) {
                                Ok(s) if base64_any(&s).is_some() && plan::is_valid_metadata_value(s.as_bytes()) => {
                                    response.trailers.push((crate::details::TRAILER.to_string(), s.into_bytes()))
                                }
                                _ => {
                                    let d = self.err(&v.span, "`grpc-status-details-bin` must be base64");
                                    self.diags.push(d);
                                }
                            },
                            _ => self.trailer(k, v, &mut response),
                        }
                    }
                }
                "delay_ms" => response.delay_ms = self.count(value, 0, "delay_ms", None).unwrap_or(response.delay_ms),
                "stream_delay_ms" => {
                    stream_delay = self.count(value, 0, "stream_delay_ms", None).unwrap_or(stream_delay)
                }
                "times" => {
                    let help = Some(crate::rules::TIMES_HELP);
                    response.times = self.count(value, 1, "times", help).unwrap_or(response.times)
                }
                _ => {
                    let d = self
                        .err(&key.span, format!("unknown key `{name}` in a raw response entry"))
                        .with_help(crate::diag::suggest(name, RESPONSE_KEYS.iter().copied()));
                    self.diags.push(d);
                }
            }
        }
        let Some(request) = request else {
            if self.diags.error_count() == errors_before {
                let d = self.err(&node.span, "a raw response entry needs `request`, the call it answers");
                self.diags.push(d.with_help("`request: { messages: [...], metadata: [...], content_type: ... }`"));
            }
            return None;
        };
        let streams = matches!(kind, plan::MethodKind::ServerStreaming | plan::MethodKind::BidiStreaming);
        if !streams && messages.len() > 1 {
            let d = self.err(
                &node.span,
                format!("a {} call answers with one message, {} recorded", kind.name(), messages.len()),
            );
            self.diags.push(d);
        }
        if streams {
            response.stream = messages.iter().map(|m| plan::grpc_frame(m)).collect();
            response.stream_delay_ms = stream_delay;
            if response.status != 0 {
                response.error_after = messages.len() as u32;
            }
        } else if response.status == 0 {
            response.body = plan::grpc_frame(messages.first().map(Vec::as_slice).unwrap_or_default());
        }
        if streams && response.stream.is_empty() && response.status == 0 {
            // An answer without messages: the plan's stream list cannot be
            // empty for that, so the body is empty and not framed.
            response.body = Vec::new();
        }
        // Typed conditions read the request as the protos' shape does.
        let typed = method.map(|m| {
            let described = plan::MethodKind::from_streaming(m.is_client_streaming(), m.is_server_streaming());
            typed_conditions(&request.messages, described, &m.input())
        });
        (self.diags.error_count() == errors_before).then(|| RawEntry {
            request,
            typed,
            response,
            origin: format!("{}:{}:{}", node.span.file.name, node.span.line, node.span.col),
            span: node.span.clone(),
        })
    }

    fn raw_request(&mut self, node: &Node, input: Option<MessageDescriptor>) -> Option<plan::RawRequest> {
        let entries = self.expect_map(node, "`request`")?;
        let mut out = plan::RawRequest::default();
        for (key, value) in entries {
            match key.scalar().unwrap_or_default() {
                "messages" => {
                    out.messages = self.base64_list(value, "`request.messages`", input.clone());
                    if out.messages.len() > MAX_REQUEST_MESSAGES {
                        let d = self
                            .err(&value.span, format!("more than {MAX_REQUEST_MESSAGES} recorded request messages"));
                        self.diags.push(d);
                    }
                }
                "metadata" => match &value.kind {
                    NodeKind::Seq(items) => {
                        for item in items {
                            let written = item.scalar().unwrap_or_default();
                            let name = written.to_ascii_lowercase();
                            if !plan::is_valid_metadata_key(&name) {
                                let d = self.err(&item.span, format!("`{written}` is not a metadata name"));
                                self.diags.push(d);
                                continue;
                            }
                            out.metadata_keys.push(name);
                        }
                        out.metadata_keys.sort();
                        out.metadata_keys.dedup();
                    }
                    _ => {
                        let d = self.err(&value.span, "`request.metadata` is a list of metadata names");
                        self.diags.push(d);
                    }
                },
                k @ ("content_type" | "encoding") => match values::read_string(value) {
                    Ok(s) if plan::is_valid_metadata_value(s.as_bytes()) => {
                        let s = s.trim().to_ascii_lowercase();
                        match k {
                            "content_type" => out.content_type = s,
                            _ => out.encoding = if s == "identity" { String::new() } else { s },
                        }
                    }
                    _ => {
                        let d = self.err(&value.span, format!("`{k}` must be a header value"));
                        self.diags.push(d);
                    }
                },
                other => {
                    let d = self
                        .err(&key.span, format!("unknown key `{other}` in a recorded request"))
                        .with_help(crate::diag::suggest(other, REQUEST_KEYS.iter().copied()));
                    self.diags.push(d);
                }
            }
        }
        if out.content_type.is_empty() {
            out.content_type = "application/grpc".into();
        }
        Some(out)
    }

    /// A list of base64 messages; with a type, each must decode as it.
    fn base64_list(&mut self, node: &Node, what: &str, ty: Option<MessageDescriptor>) -> Vec<Vec<u8>> {
        let NodeKind::Seq(items) = &node.kind else {
            let d = self.err(&node.span, format!("{what} is a list of base64 messages, found {}", node.describe()));
            self.diags.push(d);
            return Vec::new();
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let bytes = values::read_string(item).ok().and_then(|s| base64_any(&s));
            let Some(bytes) = bytes else {
                let d = self.err(&item.span, format!("an entry of {what} is not base64"));
                self.diags.push(d);
                continue;
            };
            if let Some(ty) = &ty {
                if let Err(e) = DynamicMessage::decode(ty.clone(), bytes.as_slice()) {
                    let d = Diagnostic::error(
                        Some(item.span.clone()),
                        format!("the recorded message does not decode as `{}`: {e}", ty.full_name()),
                    );
                    self.diags.push(d.with_help("the protos describe this method differently from the recording"));
                    continue;
                }
            }
            out.push(bytes);
        }
        out
    }
}

/// A recorded request as typed conditions on the method's input (its
/// messages decode: checked when they were read).
fn typed_conditions(messages: &[Vec<u8>], kind: plan::MethodKind, input: &MessageDescriptor) -> Vec<Cond> {
    use plan::MessageSel;
    let decode = |b: &Vec<u8>| DynamicMessage::decode(input.clone(), b.as_slice()).ok();
    let mut out = Vec::new();
    match kind {
        plan::MethodKind::Unary | plan::MethodKind::ServerStreaming => {
            if let Some(m) = messages.first().and_then(decode) {
                set_fields(&m, MessageSel::Single, &[], "", &mut out);
            }
        }
        plan::MethodKind::ClientStreaming | plan::MethodKind::BidiStreaming => {
            let count = plan::FieldPath {
                name: "count".into(),
                numbers: Vec::new(),
                kind: plan::ScalarKind::Uint64,
                default: plan::Value::U64(0),
                shape: plan::Shape::Singular,
                message: MessageSel::Count,
                picks: Vec::new(),
            };
            let n = plan::Value::U64(messages.len() as u64);
            out.push(Cond { source: CondSource::Field(count), test: plan::Test::Op(plan::Op::Eq(n)) });
            if let Some(m) = messages.first().and_then(decode) {
                set_fields(&m, MessageSel::First, &[], "first.", &mut out);
            }
            if let Some(m) = messages.last().filter(|_| messages.len() > 1).and_then(decode) {
                set_fields(&m, MessageSel::Last, &[], "last.", &mut out);
            }
        }
    }
    out
}

/// An `eq` condition on every set scalar of `m` (below embedded messages),
/// a length condition on every set repeated scalar; maps and repeated
/// messages are left out.
fn set_fields(m: &DynamicMessage, sel: plan::MessageSel, numbers: &[u32], prefix: &str, out: &mut Vec<Cond>) {
    use prost_reflect::{Kind, Value};
    for (field, value) in m.fields() {
        if field.is_map() {
            continue;
        }
        let name = format!("{prefix}{}", field.name());
        let mut at = numbers.to_vec();
        at.push(field.number());
        if let (Value::Message(inner), false) = (value, field.is_list()) {
            set_fields(inner, sel, &at, &format!("{name}."), out);
            continue;
        }
        if matches!(field.kind(), Kind::Message(_)) {
            continue;
        }
        let kind = crate::paths::scalar_kind(&field.kind());
        let path = |shape| plan::FieldPath {
            name: name.clone(),
            numbers: at.clone(),
            kind,
            default: crate::paths::to_plan_value(&field.default_value(), kind),
            shape,
            message: sel,
            picks: Vec::new(),
        };
        let test = match value {
            Value::List(items) => {
                let n = plan::Test::Op(plan::Op::Eq(plan::Value::U64(items.len() as u64)));
                out.push(Cond {
                    source: CondSource::Field(path(plan::Shape::Repeated)),
                    test: plan::Test::Op(plan::Op::Len(Box::new(n))),
                });
                continue;
            }
            v => plan::Test::Op(plan::Op::Eq(crate::paths::to_plan_value(v, kind))),
        };
        out.push(Cond { source: CondSource::Field(path(plan::Shape::Singular)), test });
    }
}

/// Standard or URL-safe base64, padded or not.
fn base64_any(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let s = s.trim();
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD].iter().find_map(|e| e.decode(s).ok())
}

/// The content types a call of the recorded one's protocol may carry.
pub fn content_type_aliases(content_type: &str) -> Vec<String> {
    let pairs: &[(&str, &str)] = &[
        ("application/grpc", "application/grpc+proto"),
        ("application/grpc-web", "application/grpc-web+proto"),
        ("application/grpc-web-text", "application/grpc-web-text+proto"),
    ];
    let mut out = vec![content_type.to_string()];
    for (a, b) in pairs {
        if content_type == *a {
            out.push(b.to_string());
        } else if content_type == *b {
            out.push(a.to_string());
        }
    }
    out
}
