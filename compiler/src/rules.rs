//! Rule files: reading Wishmock-format documents, type-checking them against
//! the descriptors, and producing the compiler's intermediate form
//! ([`RuleDoc`]), which still carries source spans for diagnostics.
//!
//! A rule document is one YAML (or JSON) document:
//!
//! ```yaml
//! service: pkg.Service      # optional: else the file name names the method,
//! method: Method            # `package.service.method.yaml`, any case
//! match:                    # the gate: every entry must hold
//!   request: { field.path: value }
//!   metadata: { key: value }
//! responses:
//!   - when: { request.field.path: value, metadata.key: value }
//!     body: { ... }         # the response message, protobuf JSON mapping
//!     metadata: { ... }     # initial metadata
//!     trailers: { grpc-status: 5, grpc-message: "...", other: "..." }
//!     details: [{ "@type": type.googleapis.com/google.rpc.ErrorInfo, ... }]
//!     delay_ms: 100
//!     priority: 10
//! ```

use crate::conditions::{Cx, RegexSpec, Target};
use crate::diag::{suggest, Diagnostic, Diagnostics, Span};
pub use crate::paths::{Cond, CondSource};
use crate::values;
use crate::yaml::{Node, NodeKind};
use prost::Message as _;
use prost_reflect::{DescriptorPool, MethodDescriptor};
use std::collections::HashMap;
use wirestub_plan as plan;

/// One rule document after checking.
#[derive(Clone)]
pub struct RuleDoc {
    pub method: MethodDescriptor,
    /// `mode: duplex` on a bidirectional method: answer each message.
    pub duplex: bool,
    /// The `match` gate.
    pub gate: Vec<Cond>,
    pub responses: Vec<Resp>,
    /// The test session the document belongs to: every one of its rules
    /// then also needs the call's [`SESSION_KEY`] to name it, and they are
    /// tried before the rules without a session.
    pub session: Option<String>,
}

/// A checked response entry.
#[derive(Clone)]
pub struct Resp {
    pub when: Option<Vec<Cond>>,
    pub priority: i64,
    /// `validate: false`: answers requests that fail validation too.
    pub skip_validation: bool,
    /// `response.templates` expressions `Expr::Field(i)` refer to
    /// `template_refs[i]` until lowering interns them.
    pub response: plan::Response,
    pub template_refs: Vec<CondSource>,
    pub origin: String,
    pub span: Span,
}

const DOC_KEYS: &[&str] = &["service", "method", "mode", "match", "responses", "description", "session"];
/// The metadata key that carries a call's test session; rules with a
/// `session` answer only calls that carry it (the engine also reads
/// `x-gripmock-session` under this name).
pub use wirestub_plan::SESSION_KEY;
/// Rule files below `sessions/NAME/` in a rules directory belong to the
/// session NAME.
pub const SESSIONS_DIR: &str = "sessions";
const MATCH_KEYS: &[&str] = &["request", "metadata"];
const RESPONSE_KEYS: &[&str] = &[
    "when", "body", "metadata", "trailers", "details", "delay_ms", "latency", "fault", "times", "priority", "validate",
];
const STREAM_KEYS: &[&str] =
    &["stream_items", "stream_delay_ms", "stream_loop", "stream_random_order", "stream_error_after"];
/// What `times` means, for its diagnostics.
pub(crate) const TIMES_HELP: &str = "`times` is how many calls this response may answer, at least 1";
/// Wishmock's pause between streamed items when the rule gives none.
const DEFAULT_STREAM_DELAY_MS: u32 = 100;
/// Header names a rule may not set: HTTP/2 connection headers and the ones
/// the engine writes itself.
const RESERVED_HEADERS: &[&str] = &[
    "connection",
    "content-length",
    "content-type",
    "host",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The session a rule file belongs to by its path relative to its rules
/// directory: `sessions/NAME/...`.
pub fn session_of(rel: &str) -> Option<&str> {
    let rest = rel.strip_prefix(SESSIONS_DIR)?.strip_prefix('/')?;
    let (name, file) = rest.split_once('/')?;
    (!name.is_empty() && !file.is_empty()).then_some(name)
}

impl RuleDoc {
    /// Adds `offset` to every `Op::Regex` index (documents of several files
    /// share one list of expressions).
    pub fn offset_regexes(&mut self, offset: u32) {
        if offset == 0 {
            return;
        }
        fn walk(t: &mut plan::Test, offset: u32) {
            match t {
                plan::Test::Op(plan::Op::Regex(i)) => *i += offset,
                plan::Test::Op(plan::Op::Len(inner) | plan::Op::Chars(inner)) | plan::Test::Not(inner) => {
                    walk(inner, offset)
                }
                plan::Test::Any(list) | plan::Test::All(list) => list.iter_mut().for_each(|t| walk(t, offset)),
                plan::Test::Op(_) => {}
            }
        }
        for c in self.gate.iter_mut() {
            walk(&mut c.test, offset);
        }
        for r in self.responses.iter_mut() {
            for c in r.when.iter_mut().flatten() {
                walk(&mut c.test, offset);
            }
        }
    }
}

/// The schema's methods by name, for resolving rule documents.
pub struct MethodIndex {
    /// Lower-case `package.service.method` to method.
    by_dotted: HashMap<String, MethodDescriptor>,
    /// Full service name to its methods.
    pub(crate) services: HashMap<String, prost_reflect::ServiceDescriptor>,
}

impl MethodIndex {
    pub fn new(pool: &DescriptorPool) -> Self {
        let mut by_dotted = HashMap::new();
        let mut services = HashMap::new();
        for s in pool.services() {
            for m in s.methods() {
                by_dotted.insert(format!("{}.{}", s.full_name(), m.name()).to_ascii_lowercase(), m);
            }
            services.insert(s.full_name().to_string(), s);
        }
        MethodIndex { by_dotted, services }
    }

    /// The method `name` of service `service`, if the schema has it.
    pub fn find(&self, service: &str, name: &str) -> Option<MethodDescriptor> {
        self.services.get(service)?.methods().find(|m| m.name() == name)
    }

    fn dotted_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .services
            .values()
            .flat_map(|s| s.methods().map(|m| format!("{}.{}", s.full_name(), m.name())))
            .collect();
        v.sort();
        v
    }
}

pub(crate) struct DocCx<'a> {
    pub(crate) stem: &'a str,
    pub(crate) methods: &'a MethodIndex,
    pub(crate) diags: &'a mut Diagnostics,
    pub(crate) regexes: &'a mut Vec<RegexSpec>,
    /// Whether request paths in this document use the aggregate view of a
    /// client stream (`first`, `last`, `items.N`, `count`).
    pub(crate) aggregate: bool,
    /// The session of the file's place, if any.
    pub(crate) session: Option<&'a str>,
    /// What Wishmock ignores is a warning, and the document or entry is
    /// left out (`--lenient`, or the file's directive).
    pub(crate) lenient: bool,
}

impl DocCx<'_> {
    pub(crate) fn err(&mut self, span: &Span, msg: impl Into<String>) -> Diagnostic {
        Diagnostic::error(Some(span.clone()), msg)
    }

    fn origin(&self, span: &Span) -> String {
        format!("{}:{}:{}", span.file.name, span.line, span.col)
    }

    pub(crate) fn doc(&mut self, node: &Node) -> Option<RuleDoc> {
        if node.is_null() {
            return None; // an empty document, e.g. after a trailing `---`
        }
        let Some(entries) = node.map() else {
            let d = self.err(&node.span, format!("a rule document must be a mapping, found {}", node.describe()));
            self.diags.push(d);
            return None;
        };
        let get = |k: &str| entries.iter().find(|(key, _)| key.scalar() == Some(k));
        for (key, _) in entries {
            let name = key.scalar().unwrap_or_default();
            if !DOC_KEYS.contains(&name) {
                let d = self
                    .err(&key.span, format!("unknown key `{name}` in rule document"))
                    .with_help(suggest(name, DOC_KEYS.iter().copied()));
                self.diags.push(d);
            }
        }
        let method = self.resolve_method(node, get("service"), get("method"))?;
        let mut duplex = false;
        if let Some((k, v)) = get("mode") {
            match v.scalar() {
                Some("aggregate") => {}
                Some("duplex") => duplex = true,
                _ => {
                    let d = self
                        .err(&v.span, format!("`mode` is `aggregate` or `duplex`, found {}", v.describe()))
                        .with_help("duplex answers each message as it arrives; aggregate (the default) answers once after the client's last message");
                    self.diags.push(d);
                }
            }
            if !(method.is_client_streaming() && method.is_server_streaming()) {
                let d = self.err(
                    &k.span,
                    format!("`mode` applies to bidirectional streaming methods; `{}` is not one", method.full_name()),
                );
                self.diags.push(d);
            }
        }
        self.aggregate = method.is_client_streaming() && !duplex;
        let input = method.input();
        let mut gate = Vec::new();
        if let Some((_, m)) = get("match") {
            if let Some(m_entries) = self.expect_map(m, "`match`") {
                for (key, value) in m_entries {
                    match key.scalar().unwrap_or_default() {
                        "request" => {
                            for (k, v) in self.expect_map(value, "`match.request`").unwrap_or_default() {
                                let path = k.scalar().unwrap_or_default().to_string();
                                if let Some(c) = self.field_cond(&input, &path, k, v) {
                                    gate.push(c);
                                }
                            }
                        }
                        "metadata" => {
                            for (k, v) in self.expect_map(value, "`match.metadata`").unwrap_or_default() {
                                let name = k.scalar().unwrap_or_default().to_string();
                                if let Some(c) = self.metadata_cond(&name, k, v) {
                                    gate.push(c);
                                }
                            }
                        }
                        other => {
                            let d = self
                                .err(&key.span, format!("unknown key `{other}` in `match`"))
                                .with_help(suggest(other, MATCH_KEYS.iter().copied()));
                            self.diags.push(d);
                        }
                    }
                }
            }
        }
        let session = self.session(get("session"));
        let mut responses = Vec::new();
        match get("responses") {
            None => {
                let d = self.err(&doc_span(node), "rule document has no `responses`");
                self.diags.push(d.with_help("add `responses:` with at least one entry"));
            }
            Some((_, list)) => match &list.kind {
                NodeKind::Seq(items) => {
                    for item in items {
                        responses.extend(self.leniently(|cx| cx.response(&method, item)));
                    }
                }
                _ => {
                    let d = self.err(&list.span, format!("`responses` must be a list, found {}", list.describe()));
                    self.diags.push(d);
                }
            },
        }
        Some(RuleDoc { method, duplex, gate, responses, session })
    }

    /// The document's session: its `session` key, or the session of the
    /// file's place; both given must agree.
    pub(crate) fn session(&mut self, key: Option<&(Node, Node)>) -> Option<String> {
        let name = match key {
            Some((_, v)) => {
                let Some(name) = v.scalar().filter(|s| is_valid_session(s)) else {
                    let d = self
                        .err(&v.span, format!("`session` must be a session name, found {}", v.describe()))
                        .with_help("1 to 128 letters, digits, `-`, `_` or `.`");
                    self.diags.push(d);
                    return None;
                };
                if let Some(place) = self.session.filter(|p| *p != name) {
                    let d = self.err(&v.span, format!("`session: {name}` in a file of session `{place}`")).with_help(
                        format!("files below `{SESSIONS_DIR}/{place}/` belong to session `{place}`; drop the key or move the file"),
                    );
                    self.diags.push(d);
                    return None;
                }
                name.to_string()
            }
            None => self.session?.to_string(),
        };
        Some(name)
    }

    pub(crate) fn expect_map<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n [(Node, Node)]> {
        match &node.kind {
            NodeKind::Map(m) => Some(m),
            NodeKind::Null => Some(&[]),
            _ => {
                let d = self.err(&node.span, format!("{what} must be a mapping, found {}", node.describe()));
                self.diags.push(d);
                None
            }
        }
    }

    fn resolve_method(
        &mut self,
        doc: &Node,
        service: Option<&(Node, Node)>,
        method: Option<&(Node, Node)>,
    ) -> Option<MethodDescriptor> {
        let text = |n: Option<&(Node, Node)>| n.and_then(|(_, v)| v.scalar()).map(str::to_string);
        let (svc, meth) = (text(service), text(method));
        let (wanted, mut span, from_name) = match (&svc, &meth) {
            (Some(s), Some(m)) => (format!("{s}.{m}"), method.unwrap().1.span.clone(), false),
            (None, Some(m)) if m.contains('/') => (m.replace('/', "."), method.unwrap().1.span.clone(), false),
            (Some(_), None) | (None, Some(_)) => {
                let (k, _) = service.or(method).unwrap();
                let d = self
                    .err(&k.span, "`service` and `method` go together")
                    .with_help("give both, e.g. `service: helloworld.Greeter` and `method: SayHello`");
                self.diags.push(d);
                return None;
            }
            (None, None) => (self.stem.to_string(), doc_span(doc), true),
        };
        if let Some(m) = self.methods.by_dotted.get(&wanted.to_ascii_lowercase()) {
            return Some(m.clone());
        }
        let names = self.methods.dotted_names();
        let message = if from_name {
            format!(
                "rule file name `{}` does not name a method: expected `package.service.method.yaml` or `service:`/`method:` keys",
                self.stem
            )
        } else if let Some(s) = svc.as_deref().filter(|s| !self.methods.services.contains_key(*s)) {
            span = service.unwrap().1.span.clone();
            format!("unknown service `{s}`")
        } else {
            format!("unknown method `{wanted}`")
        };
        let d = self.err(&span, message).with_help(suggest(&wanted, names.iter().map(String::as_str)));
        self.diags.push(d);
        None
    }

    fn response(&mut self, method: &MethodDescriptor, node: &Node) -> Option<Resp> {
        let entries = self.expect_map(node, "a response entry")?;
        let mut ok = true;
        let mut when = None;
        let mut body_node = None;
        let mut details = None;
        let mut response = plan::Response::default();
        let mut priority = 0i64;
        let mut skip_validation = false;
        let mut stream_nodes: Option<&[Node]> = None;
        let mut stream_delay = None;
        let mut error_after = None;
        // Metadata values holding `{{`: (trailer, key, value).
        let mut templated: Vec<(bool, &Node, &Node)> = Vec::new();
        let errors_before = self.diags.error_count();
        for (key, value) in entries {
            let name = key.scalar().unwrap_or_default();
            match name {
                "when" => {
                    let mut conds = Vec::new();
                    for (k, v) in self.expect_map(value, "`when`").unwrap_or_default() {
                        let full = k.scalar().unwrap_or_default();
                        if let Some(path) = full.strip_prefix("request.") {
                            if let Some(c) = self.field_cond(&method.input(), path, k, v) {
                                conds.push(c);
                            }
                        } else if let Some(meta) = full.strip_prefix("metadata.") {
                            if let Some(c) = self.metadata_cond(meta, k, v) {
                                conds.push(c);
                            }
                        } else {
                            let d = self
                                .err(&k.span, format!("condition `{full}` must start with `request.` or `metadata.`"))
                                .with_help(format!("e.g. `request.{full}`"));
                            self.diags.push(d);
                        }
                    }
                    when = Some(conds);
                }
                "body" => body_node = Some(value),
                "details" => details = Some((key, value)),
                "metadata" => {
                    for (k, v) in self.expect_map(value, "`metadata`").unwrap_or_default() {
                        if crate::template::has_template(v) {
                            templated.push((false, k, v));
                        } else if let Some(pair) = self.metadata_pair(k, v) {
                            response.headers.push(pair);
                        }
                    }
                }
                "trailers" => {
                    for (k, v) in self.expect_map(value, "`trailers`").unwrap_or_default() {
                        match k.scalar().unwrap_or_default() {
                            crate::details::TRAILER => self.diags.push(crate::details::hand_written(k)),
                            "grpc-status" | "grpc-message" => self.trailer(k, v, &mut response),
                            _ if crate::template::has_template(v) => templated.push((true, k, v)),
                            _ => self.trailer(k, v, &mut response),
                        }
                    }
                }
                "delay_ms" => response.delay_ms = self.count(value, 0, "delay_ms", None).unwrap_or(response.delay_ms),
                "latency" => {
                    if let Some(l) = self.latency(value) {
                        response.latency = l;
                    }
                }
                "fault" => response.fault = self.fault(value),
                "times" => response.times = self.count(value, 1, "times", Some(TIMES_HELP)).unwrap_or(response.times),
                "validate" => match values::read_bool(value) {
                    Ok(v) => skip_validation = !v,
                    Err(e) => {
                        let d = self
                            .err(&value.span, e)
                            .with_help("`validate: false` answers requests that fail validation too");
                        self.diags.push(d);
                    }
                },
                "priority" => match values::read_int(value, i64::MIN as i128, i64::MAX as i128, "priority") {
                    Ok(v) => priority = v as i64,
                    Err(e) => {
                        let d = self.err(&value.span, e);
                        self.diags.push(d);
                    }
                },
                _ if STREAM_KEYS.contains(&name) && !method.is_server_streaming() => {
                    let d = Diagnostic::warning(
                        Some(key.span.clone()),
                        format!(
                            "`{name}` applies to server-streaming responses; `{}` answers with one message, so it is ignored",
                            method.full_name()
                        ),
                    );
                    self.diags.push(d);
                }
                "stream_items" => match &value.kind {
                    NodeKind::Seq(items) => stream_nodes = Some(items.as_slice()),
                    _ => {
                        let d = self.err(
                            &value.span,
                            format!("`stream_items` must be a list of messages, found {}", value.describe()),
                        );
                        self.diags.push(d);
                    }
                },
                "stream_delay_ms" => stream_delay = self.count(value, 0, "stream_delay_ms", None).or(stream_delay),
                "stream_loop" => {
                    match (values::read_bool(value), values::read_int(value, 1, u32::MAX as i128, "stream_loop")) {
                        // true: until the client cancels; a number: that many passes.
                        (Ok(b), _) => response.stream_repeat = if b { 0 } else { 1 },
                        (_, Ok(n)) => response.stream_repeat = n as u32,
                        _ => {
                            let d = self
                                .err(
                                    &value.span,
                                    format!(
                                        "`stream_loop` is true, false or a number of passes, found `{}`",
                                        value.scalar().unwrap_or_default()
                                    ),
                                )
                                .with_help("true sends the items until the client cancels; 3 sends them three times");
                            self.diags.push(d);
                        }
                    }
                }
                "stream_random_order" => match values::read_bool(value) {
                    Ok(b) => response.stream_random_order = b,
                    Err(e) => {
                        let d = self.err(&value.span, e);
                        self.diags.push(d);
                    }
                },
                "stream_error_after" => match values::read_int(value, 0, u32::MAX as i128, "stream_error_after") {
                    Ok(v) => error_after = Some((v as u32, key.span.clone())),
                    Err(e) => {
                        let d = self.err(&value.span, e);
                        self.diags.push(d);
                    }
                },
                _ => {
                    let all = RESPONSE_KEYS.iter().chain(STREAM_KEYS).copied();
                    let d = self
                        .err(&key.span, format!("unknown key `{name}` in response entry"))
                        .with_help(suggest(name, all));
                    self.diags.push(d);
                }
            }
        }
        // The body is checked even for errors (where it is not sent) so that
        // mistakes in it never go unnoticed. Bodies and items with `{{ }}`
        // become templates; the others are encoded once, here.
        let output = method.output();
        let mut template_refs = Vec::new();
        let aggregate = self.aggregate;
        let mut compile_template = |cx: &mut Self, node: &Node, stream: bool| -> Option<plan::Template> {
            let mut conditions = Cx { diags: cx.diags, regexes: cx.regexes };
            let mut t = crate::template::Compiler {
                cx: &mut conditions,
                input: method.input(),
                refs: &mut template_refs,
                scope: crate::template::Scope { stream, aggregate },
                enums: Vec::new(),
            };
            let pieces = t.message(node, &output)?;
            if crate::template::pieces_depth(&pieces) > crate::template::MAX_PIECES_DEPTH {
                let d = cx.err(
                    &node.span,
                    format!("a templated message nested more than {} deep", crate::template::MAX_PIECES_DEPTH),
                );
                cx.diags.push(d);
                return None;
            }
            Some(plan::Template { pieces })
        };
        let mut body_template = None;
        let body = match body_node {
            Some(b) if crate::template::has_template(b) => {
                body_template = compile_template(self, b, false);
                None
            }
            Some(b) => values::read_message(b, &output, self.diags),
            None => Some(prost_reflect::DynamicMessage::new(output.clone())),
        };
        let frame = |m: prost_reflect::DynamicMessage| {
            plan::grpc_frame(&crate::canonical::canonicalize(&m.encode_to_vec(), &method.output()))
        };
        if let Some(items) = stream_nodes {
            for item in items {
                if crate::template::has_template(item) {
                    if let Some(t) = compile_template(self, item, true) {
                        response.templates.push((response.stream.len() as u32 + 1, t));
                    }
                    // A placeholder: the engine renders this slot per call.
                    response.stream.push(plan::grpc_frame(&[]));
                } else if let Some(m) = values::read_message(item, &method.output(), self.diags) {
                    response.stream.push(frame(m));
                }
            }
            response.stream_delay_ms = stream_delay.unwrap_or(DEFAULT_STREAM_DELAY_MS);
        } else if let Some(d) = stream_delay {
            response.stream_delay_ms = d;
        }
        if let Some((n, span)) = error_after {
            if response.status == 0 {
                let d = self.err(&span, "`stream_error_after` goes with an error status in `trailers`");
                self.diags
                    .push(d.with_help("e.g. `trailers: { grpc-status: UNAVAILABLE }` to fail after that many items"));
            }
            response.error_after = n;
        }
        if response.status == 0 {
            if let Some(b) = body {
                response.body = frame(b);
            }
            if let Some(t) = body_template {
                response.body = plan::grpc_frame(&[]);
                response.templates.insert(0, (0, t));
            }
        }
        for (trailer, k, v) in templated {
            let Some(name) = self.template_key(k) else { continue };
            let Some(text) = v.scalar() else {
                let d = self.err(&v.span, format!("metadata values must be scalars, found {}", v.describe()));
                self.diags.push(d);
                continue;
            };
            if !name.ends_with("-bin") && !plan::is_valid_metadata_value(text.as_bytes()) {
                let d = self
                    .err(&v.span, format!("the value of `{name}` must be printable ASCII"))
                    .with_help("use a `-bin` key for binary or non-ASCII values");
                self.diags.push(d);
                continue;
            }
            let mut conditions = Cx { diags: self.diags, regexes: self.regexes };
            let mut t = crate::template::Compiler {
                cx: &mut conditions,
                input: method.input(),
                refs: &mut template_refs,
                scope: crate::template::Scope { stream: false, aggregate },
                enums: Vec::new(),
            };
            if let Some(parts) = t.text_value(text, &v.span) {
                // A client-sized payload has no place in a header.
                if parts.iter().any(|p| matches!(p, plan::Part::Expr(e) if has_fill(e))) {
                    let d = self.err(&v.span, "`utils.bytes` is for message fields, not metadata values");
                    self.diags.push(d);
                    continue;
                }
                response.metadata_templates.push(plan::MetadataTemplate { trailer, name, parts });
            }
        }
        // After the loop: the status must be known, whatever the key order.
        if let Some((k, v)) = details {
            crate::details::attach(node, k, v, &mut response, method.parent_pool(), self.diags);
        }
        ok &= self.diags.error_count() == errors_before;
        ok.then(|| Resp {
            when,
            priority,
            skip_validation,
            response,
            template_refs,
            origin: self.origin(&node.span),
            span: node.span.clone(),
        })
    }

    /// `latency: { fixed: ms } | { uniform: [min, max] } | { normal: { mean, stddev } }
    /// | { lognormal: { median, p99 } }`, in milliseconds.
    fn latency(&mut self, node: &Node) -> Option<plan::Latency> {
        const FORMS: &[&str] = &["fixed", "uniform", "normal", "lognormal"];
        let help = "e.g. `{ uniform: [50, 150] }`, `{ normal: { mean: 100, stddev: 20 } }` or `{ lognormal: { median: 80, p99: 400 } }` (milliseconds)";
        let entries = match node.map() {
            Some(e) if e.len() == 1 => e,
            _ => {
                let d = self.err(&node.span, "`latency` is a mapping with one distribution").with_help(help);
                self.diags.push(d);
                return None;
            }
        };
        let (k, v) = &entries[0];
        let ms = |cx: &mut Self, n: &Node| -> Option<f64> {
            match values::read_float(n, "milliseconds") {
                Ok(f) if f.is_finite() && (0.0..=86_400_000.0).contains(&f) => Some(f),
                _ => {
                    let d = cx.err(&n.span, "expected milliseconds, from 0 to 86400000");
                    cx.diags.push(d);
                    None
                }
            }
        };
        let field = |cx: &mut Self, name: &str| -> Option<f64> {
            match v.map().and_then(|m| m.iter().find(|(k, _)| k.scalar() == Some(name))) {
                Some((_, n)) => ms(cx, n),
                None => {
                    let d = cx.err(&v.span, format!("missing `{name}`")).with_help(help);
                    cx.diags.push(d);
                    None
                }
            }
        };
        let form = k.scalar().unwrap_or_default();
        let latency = match form {
            "fixed" => {
                let d = ms(self, v)?;
                return Some(plan::Latency::Uniform { min: d, max: d });
            }
            "uniform" => match &v.kind {
                NodeKind::Seq(b) if b.len() == 2 => {
                    plan::Latency::Uniform { min: ms(self, &b[0])?, max: ms(self, &b[1])? }
                }
                _ => {
                    let d = self.err(&v.span, "`uniform` takes `[min, max]`").with_help(help);
                    self.diags.push(d);
                    return None;
                }
            },
            "normal" => plan::Latency::Normal { mean: field(self, "mean")?, stddev: field(self, "stddev")? },
            "lognormal" => plan::Latency::LogNormal { median: field(self, "median")?, p99: field(self, "p99")? },
            _ => {
                let d = self
                    .err(&k.span, format!("unknown distribution `{form}`"))
                    .with_help(suggest(form, FORMS.iter().copied()));
                self.diags.push(d);
                return None;
            }
        };
        let ordered = match latency {
            plan::Latency::Uniform { min, max } => min <= max,
            plan::Latency::LogNormal { median, p99 } => median > 0.0 && median <= p99,
            _ => true,
        };
        if !ordered {
            let d = self
                .err(&v.span, "the bounds are out of order")
                .with_help("uniform takes [min, max]; lognormal needs 0 < median <= p99");
            self.diags.push(d);
            return None;
        }
        Some(latency)
    }

    /// `fault: { rate: 0.1, status: UNAVAILABLE, message: "..." }`,
    /// `fault: { rate: 0.05, drop: true }`, or a transport fault:
    /// `reset: CANCEL`, `goaway: graceful | immediate`, `close: true`,
    /// `stall: { write_ms | read_ms: N }`, `trickle: { bytes, every_ms }`
    /// or `malformed_frame: true`, each with an optional `after: N`
    /// (response messages sent first).
    fn fault(&mut self, node: &Node) -> Option<plan::Fault> {
        const KEYS: &[&str] = &[
            "rate",
            "status",
            "message",
            "drop",
            "reset",
            "goaway",
            "close",
            "stall",
            "trickle",
            "malformed_frame",
            "after",
        ];
        let entries = self.expect_map(node, "`fault`")?;
        let mut fault = plan::Fault { rate: 0.0, drop: false, status: 14, message: String::new(), transport: None };
        let mut ok = true;
        let mut has_rate = false;
        // Keys that make it a status fault, and the transport action.
        let mut status_keys: Option<&Span> = None;
        let mut action: Option<(plan::Transport, &Span)> = None;
        let mut after: Option<(u32, &Span)> = None;
        for (k, v) in entries {
            let key = k.scalar().unwrap_or_default();
            let mut read_action = |this: &mut Self, a: Result<plan::Transport, String>| match a {
                Ok(_) if action.is_some() => {
                    let d = this
                        .err(&k.span, format!("a fault does one thing: `{key}` comes after another transport fault"))
                        .with_help("write one of reset, goaway, close, stall, trickle or malformed_frame");
                    this.diags.push(d);
                    false
                }
                Ok(a) => {
                    action = Some((a, &k.span));
                    true
                }
                Err(e) => {
                    let d = this.err(&v.span, e);
                    this.diags.push(d);
                    false
                }
            };
            match key {
                "rate" => match values::read_float(v, "rate") {
                    Ok(r) if r > 0.0 && r <= 1.0 => {
                        fault.rate = r;
                        has_rate = true;
                    }
                    _ => {
                        let d = self
                            .err(&v.span, "`rate` is a fraction of calls, above 0 and at most 1")
                            .with_help("e.g. 0.05 for 5% of calls");
                        self.diags.push(d);
                        ok = false;
                    }
                },
                "status" => {
                    status_keys = Some(&k.span);
                    match read_status(v) {
                        Ok(0) | Err(_) => {
                            let d = self.err(&v.span, "a fault's `status` is an error code, 1 to 16 or its name");
                            self.diags.push(d);
                            ok = false;
                        }
                        Ok(s) => fault.status = s,
                    }
                }
                "message" => {
                    status_keys = Some(&k.span);
                    match values::read_string(v) {
                        Ok(m) => fault.message = plan::percent_encode_message(&m),
                        Err(e) => {
                            let d = self.err(&v.span, e);
                            self.diags.push(d);
                            ok = false;
                        }
                    }
                }
                "drop" => {
                    status_keys = Some(&k.span);
                    match values::read_bool(v) {
                        Ok(b) => fault.drop = b,
                        Err(e) => {
                            let d = self.err(&v.span, e);
                            self.diags.push(d);
                            ok = false;
                        }
                    }
                }
                "reset" => ok &= read_action(self, read_h2_code(v).map(plan::Transport::Reset)),
                "goaway" => {
                    let a = match v.scalar() {
                        Some("graceful") => Ok(plan::Transport::GoAway { graceful: true }),
                        Some("immediate") => Ok(plan::Transport::GoAway { graceful: false }),
                        Some(other) => Err(format!("`goaway` is `graceful` or `immediate`, not `{other}`")),
                        None => Err(format!("`goaway` is `graceful` or `immediate`, not {}", v.describe())),
                    };
                    ok &= read_action(self, a);
                }
                "close" | "malformed_frame" => {
                    let a = match values::read_bool(v) {
                        Ok(true) if key == "close" => Ok(plan::Transport::Close),
                        Ok(true) => Ok(plan::Transport::Malformed),
                        Ok(false) => Err(format!("`{key}: false` asks for nothing; leave it out")),
                        Err(e) => Err(e),
                    };
                    ok &= read_action(self, a);
                }
                "stall" => {
                    let a = self.ms_pair(v, "stall", &["write_ms", "read_ms"]).map(|(k, ms)| match k {
                        "write_ms" => plan::Transport::StallWrite(ms),
                        _ => plan::Transport::StallRead(ms),
                    });
                    ok &= read_action(self, a);
                }
                "trickle" => {
                    let a = self.trickle(v);
                    ok &= read_action(self, a);
                }
                "after" => match values::read_int(v, 0, u32::MAX as i128, "after") {
                    Ok(n) => after = Some((n as u32, &k.span)),
                    Err(e) => {
                        let d = self.err(&v.span, e).with_help("the number of response messages sent before the fault");
                        self.diags.push(d);
                        ok = false;
                    }
                },
                other => {
                    let d = self
                        .err(&k.span, format!("unknown key `{other}` in `fault`"))
                        .with_help(suggest(other, KEYS.iter().copied()));
                    self.diags.push(d);
                    ok = false;
                }
            }
        }
        match (action, status_keys, after) {
            (Some(_), Some(span), _) => {
                let d = self
                    .err(span, "a transport fault has no status: the client sees the connection or stream fail")
                    .with_help("write `status`/`message`/`drop` or a transport fault (reset, goaway, close, stall, trickle, malformed_frame), not both");
                self.diags.push(d);
                ok = false;
            }
            (None, _, Some((_, span))) => {
                let d = self
                    .err(span, "`after` places a transport fault; this fault has none")
                    .with_help("e.g. `fault: { rate: 1, reset: CANCEL, after: 2 }`");
                self.diags.push(d);
                ok = false;
            }
            (Some((a, _)), None, after) => {
                fault.transport = Some(plan::TransportFault { after: after.map_or(0, |(n, _)| n), action: a });
            }
            (None, _, None) => {}
        }
        if !has_rate && ok {
            let d = self
                .err(&node.span, "`fault` needs a `rate`")
                .with_help("e.g. `fault: { rate: 0.1, status: UNAVAILABLE }`");
            self.diags.push(d);
            ok = false;
        }
        ok.then_some(fault)
    }

    /// `{ key: N }` with one key of `keys`, N milliseconds (at most a day).
    fn ms_pair<'k>(&mut self, node: &Node, what: &str, keys: &[&'k str]) -> Result<(&'k str, u32), String> {
        let entries = match &node.kind {
            NodeKind::Map(entries) if entries.len() == 1 => entries,
            _ => return Err(format!("`{what}` is `{{ {}: N }}` (milliseconds)", keys.join(": N }` or `{ "))),
        };
        let (k, v) = &entries[0];
        let name = k.scalar().unwrap_or_default();
        let Some(key) = keys.iter().find(|x| **x == name) else {
            return Err(format!("`{what}` takes {}, not `{name}`", keys.join(" or ")));
        };
        let ms = values::read_int(v, 0, 86_400_000, "milliseconds")?;
        Ok((key, ms as u32))
    }

    /// `trickle: { bytes: N, every_ms: M }`.
    fn trickle(&mut self, node: &Node) -> Result<plan::Transport, String> {
        let help = "`trickle` is `{ bytes: N, every_ms: M }`: N bytes (at least 1) every M ms (at most 60000)";
        let NodeKind::Map(entries) = &node.kind else { return Err(help.into()) };
        let (mut bytes, mut every) = (None, None);
        for (k, v) in entries {
            match k.scalar().unwrap_or_default() {
                "bytes" => bytes = Some(values::read_int(v, 1, 1 << 20, "bytes")? as u32),
                "every_ms" => every = Some(values::read_int(v, 0, 60_000, "every_ms")? as u32),
                _ => return Err(help.into()),
            }
        }
        match (bytes, every) {
            (Some(bytes), Some(every_ms)) => Ok(plan::Transport::Trickle { bytes, every_ms }),
            _ => Err(help.into()),
        }
    }

    pub(crate) fn metadata_pairs(&mut self, node: &Node, what: &str) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for (k, v) in self.expect_map(node, what).unwrap_or_default() {
            if let Some(p) = self.metadata_pair(k, v) {
                out.push(p);
            }
        }
        out
    }

    /// Checks one response entry; under `--lenient` an entry with an error
    /// is left out (None), its errors made warnings.
    pub(crate) fn leniently<T>(&mut self, check: impl FnOnce(&mut Self) -> Option<T>) -> Option<T> {
        if !self.lenient {
            return check(self);
        }
        let mut local = Diagnostics::default();
        std::mem::swap(self.diags, &mut local);
        let regexes_before = self.regexes.len();
        let checked = check(self);
        std::mem::swap(self.diags, &mut local);
        if local.has_errors() {
            self.regexes.truncate(regexes_before);
            self.diags.extend_lenient(&local, "entry left out");
            return None;
        }
        self.diags.extend(&local);
        checked
    }

    /// A whole number from `min` to `u32::MAX` (`delay_ms`, `times`, ...);
    /// None, with a diagnostic, when the value is not one.
    pub(crate) fn count(&mut self, value: &Node, min: u32, what: &str, help: Option<&str>) -> Option<u32> {
        match values::read_int(value, min as i128, u32::MAX as i128, what) {
            Ok(v) => Some(v as u32),
            Err(e) => {
                let mut d = self.err(&value.span, e);
                if let Some(h) = help {
                    d = d.with_help(h);
                }
                self.diags.push(d);
                None
            }
        }
    }

    /// One entry of `trailers` other than the details: the status, the
    /// message, or trailing metadata.
    pub(crate) fn trailer(&mut self, k: &Node, v: &Node, response: &mut plan::Response) {
        match k.scalar().unwrap_or_default() {
            "grpc-status" => match read_status(v) {
                Ok(s) => response.status = s,
                Err(e) => {
                    let d = self.err(&v.span, e).with_help("use a code from 0 to 16 or its name, e.g. 5 or NOT_FOUND");
                    self.diags.push(d);
                }
            },
            "grpc-message" if crate::template::has_template(v) => {
                let name = k.scalar().unwrap_or_default();
                let d = self
                    .err(&v.span, format!("`{name}` holds `{{{{`: it is not rendered, it would be sent as written"));
                self.diags.push(d.with_help("template a trailer of your own, e.g. `x-reason`"));
            }
            "grpc-message" => match values::read_string(v) {
                Ok(s) => response.message = plan::percent_encode_message(&s),
                Err(e) => {
                    let d = self.err(&v.span, e);
                    self.diags.push(d);
                }
            },
            _ => {
                if let Some(pair) = self.metadata_pair(k, v) {
                    response.trailers.push(pair);
                }
            }
        }
    }

    /// The key of a metadata value that is a template: a valid name the
    /// engine does not write itself.
    fn template_key(&mut self, key: &Node) -> Option<String> {
        let raw = key.scalar().unwrap_or_default();
        let name = raw.to_ascii_lowercase();
        if !plan::is_valid_metadata_key(&name) || name.starts_with("grpc-") || RESERVED_HEADERS.contains(&name.as_str())
        {
            let d = self.err(&key.span, format!("`{raw}` cannot carry a templated value"));
            self.diags.push(d.with_help("use a valid metadata key other than `grpc-` keys and connection headers"));
            return None;
        }
        Some(name)
    }

    pub(crate) fn metadata_pair(&mut self, key: &Node, value: &Node) -> Option<(String, Vec<u8>)> {
        let raw = key.scalar().unwrap_or_default();
        let name = raw.to_ascii_lowercase();
        if !plan::is_valid_metadata_key(&name) {
            let d = self
                .err(&key.span, format!("`{raw}` is not a valid metadata key"))
                .with_help("keys are letters, digits, `-`, `_` and `.`");
            self.diags.push(d);
            return None;
        }
        if name.starts_with("grpc-") || RESERVED_HEADERS.contains(&name.as_str()) {
            let d = self
                .err(&key.span, format!("metadata key `{name}` is reserved"))
                .with_help("`grpc-` keys and HTTP/2 connection headers are written by the engine; in `trailers` only `grpc-status` and `grpc-message` may be set");
            self.diags.push(d);
            return None;
        }
        let text = match &value.kind {
            NodeKind::Scalar { text, .. } => text.clone(),
            _ => {
                let d = self.err(&value.span, format!("metadata values must be scalars, found {}", value.describe()));
                self.diags.push(d);
                return None;
            }
        };
        if text.contains("{{") {
            let d = self
                .err(&value.span, format!("`{name}` holds `{{{{`: templates are not rendered here"))
                .with_help("the value would be sent as this literal text");
            self.diags.push(d);
            return None;
        }
        if name.ends_with("-bin") {
            if values::read_bytes(value).is_err() {
                let d = self
                    .err(&value.span, format!("`{name}` is a binary key, so its value must be base64"))
                    .with_help("binary metadata is written base64-encoded in rules, as it travels on the wire");
                self.diags.push(d);
                return None;
            }
            return Some((name, text.trim_end_matches('=').as_bytes().to_vec()));
        }
        if !plan::is_valid_metadata_value(text.as_bytes()) {
            let d = self
                .err(&value.span, format!("the value of `{name}` must be printable ASCII"))
                .with_help("use a `-bin` key for binary or non-ASCII values");
            self.diags.push(d);
            return None;
        }
        Some((name, text.into_bytes()))
    }

    fn metadata_cond(&mut self, raw: &str, key: &Node, value: &Node) -> Option<Cond> {
        let name = raw.to_ascii_lowercase();
        if !plan::is_valid_metadata_key(&name) {
            let d = self
                .err(&key.span, format!("`{raw}` is not a valid metadata key"))
                .with_help("keys are letters, digits, `-`, `_` and `.`");
            self.diags.push(d);
            return None;
        }
        let target = Target::Metadata(name.clone());
        let test = Cx { diags: self.diags, regexes: self.regexes }.condition(value, &target)?;
        Some(Cond { source: CondSource::Metadata(name), test })
    }

    fn field_cond(
        &mut self,
        input: &prost_reflect::MessageDescriptor,
        path: &str,
        key: &Node,
        value: &Node,
    ) -> Option<Cond> {
        let mut cx = Cx { diags: self.diags, regexes: self.regexes };
        let target =
            if self.aggregate { cx.aggregate_target(input, path, key)? } else { cx.field_target(input, path, key)? };
        if matches!(&target, Target::Field { path, .. } if path.message == plan::MessageSel::Each) {
            cx.diags.push(
                Diagnostic::error(Some(key.span.clone()), format!("`{path}`: a condition cannot read every message of the stream"))
                    .with_help("test `items[0]`, `items[-1]` or `items[N]`; `items[*]` is for aggregates in templates, e.g. `{{sum(request.items[*].size)}}`"),
            );
            return None;
        }
        let test = cx.condition(value, &target)?;
        let Target::Field { path, .. } = target else { return None };
        Some(Cond { source: CondSource::Field(path), test })
    }
}

/// A session name: 1 to 128 ASCII letters, digits, `-`, `_` or `.`, not
/// `.` or `..` (it names a directory and travels as a header value).
pub fn is_valid_session(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Where to point for a whole document: its first key.
/// Whether an expression writes a `utils.bytes` payload.
fn has_fill(e: &plan::Expr) -> bool {
    match e {
        plan::Expr::Fill(..) => true,
        plan::Expr::Format(_, args) => args.iter().any(has_fill),
        plan::Expr::Arith(l, _, r) => has_fill(l) || has_fill(r),
        _ => false,
    }
}

pub(crate) fn doc_span(doc: &Node) -> Span {
    match doc.map().and_then(|m| m.first()) {
        Some((k, _)) => k.span.clone(),
        None => doc.span.clone(),
    }
}

/// An HTTP/2 error code: its name (RFC 9113 §7) or number.
fn read_h2_code(node: &Node) -> Result<u32, String> {
    let text = node.scalar().ok_or_else(|| format!("expected an HTTP/2 error code, found {}", node.describe()))?;
    if let Ok(n) = text.trim().parse::<u32>() {
        if n <= 0xff {
            return Ok(n);
        }
    }
    let upper = text.trim().to_ascii_uppercase();
    plan::H2_ERROR_NAMES.iter().position(|n| *n == upper).map(|p| p as u32).ok_or_else(|| {
        match crate::diag::near_miss(&upper, plan::H2_ERROR_NAMES.iter().copied()) {
            Some(near) => format!("`{text}` is not an HTTP/2 error code; did you mean `{near}`?"),
            None => format!("`{text}` is not an HTTP/2 error code (NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, REFUSED_STREAM, CANCEL, ENHANCE_YOUR_CALM, ... or a number)"),
        }
    })
}

pub(crate) fn read_status(node: &Node) -> Result<u8, String> {
    let text = node.scalar().ok_or_else(|| format!("expected a status code, found {}", node.describe()))?;
    if let Ok(n) = text.trim().parse::<u8>() {
        if n <= 16 {
            return Ok(n);
        }
    }
    let upper = text.trim().to_ascii_uppercase();
    plan::STATUS_NAMES.iter().position(|n| *n == upper).map(|p| p as u8).ok_or_else(|| {
        match crate::diag::near_miss(&upper, plan::STATUS_NAMES.iter().copied()) {
            Some(near) => format!("`{text}` is not a gRPC status code; did you mean `{near}`?"),
            None => format!("`{text}` is not a gRPC status code"),
        }
    })
}
