//! GripMock v3 stubs (github.com/bavix/gripmock) read as rule documents.
//!
//! A rule file may hold GripMock stubs instead of Wishmock documents: one
//! stub (a mapping with `input`, `inputs`, `output` or `headers` and neither
//! `responses` nor `match`), a list of them, in YAML or JSON. Each stub is
//! translated here into the Wishmock rule document that answers the same
//! calls, built from the stub's own nodes, so that every later check
//! (`rules.rs`, `conditions.rs`) points at the stub's file, line and column.
//! What the rule language cannot say is an error naming the GripMock
//! feature, never a silent difference.
//!
//! How GripMock's semantics (its matcher in `internal/infra/stuber` and
//! `internal/infra/deeply`) map:
//!
//! - `service` + `method`: the same keys. `service` is the full name or, as
//!   GripMock allows, the bare service name (every package's service of
//!   that name that has the method). `id` and `_meta` are dropped.
//! - `input.equals`: every listed field equals the value; unlisted fields
//!   are ignored. A nested object is compared whole, as GripMock does: its
//!   view of the request carries every singular field (defaults included),
//!   so the stub must list all of them (an error says which are missing),
//!   and its repeated fields must be empty (`len: 0`). A list compares in
//!   order, which only a one-element list can be tested as; with
//!   `ignoreArrayOrder: true`, distinct values become `len` plus `contains`.
//!   A proto map is compared whole: not supported (`contains` is).
//! - `input.contains`: a recursive subset. Strings compare whole (GripMock
//!   does not look for substrings); a list needs every listed value
//!   (`contains` each, any order); a message or map entry must be present.
//! - `input.matches`: a Go regular expression searched in strings (`regex`;
//!   Rust's syntax is RE2's), in enum names (`in` the names it matches); a
//!   non-string value is compared for equality. Patterns on numbers, bytes
//!   and lists are not supported.
//! - `input.glob`: Go's `path.Match` on strings and enum names, as an
//!   anchored `regex` (`*` and `?` stop at `/`).
//! - `input.anyOf`: one response entry per alternative (times the header
//!   alternatives), each with the base conditions; not with `options.times`,
//!   whose count GripMock shares among them.
//! - `headers.{equals,contains,matches,glob,anyOf}`: `metadata.<key>`
//!   conditions; names compare case-insensitively; a header must be
//!   present. GripMock joins repeated values with `;`, the engine reads the
//!   first.
//! - `inputs` (client streaming): `request.count` is the number of entries
//!   and entry N tests `request.items.N.<field>`. One entry (every message
//!   must match it), `input` on a client stream (any message matches) and
//!   bidirectional stubs are not supported. On a method with one request
//!   message, one entry is the same as `input`.
//! - `output.data` → `body`; `output.stream` → `stream_items` (no pause
//!   between items unless `delay`); `output.error` + `output.code` (a
//!   number or a name such as `NOT_FOUND`; an error without a code is
//!   ABORTED, code 0 is OK) → `trailers` `grpc-status`/`grpc-message`, sent
//!   after the streamed items (`stream_error_after`); `output.details`
//!   (`type` is the type URL) → `details` (`@type`); `output.headers` →
//!   `metadata`; `output.trailers` → further `trailers`; `output.delay` (a
//!   Go duration, or a number of nanoseconds) → `delay_ms`, and
//!   `stream_delay_ms` too for a stream, as GripMock waits before every
//!   message. A stream element's `_gripmock` `error`/`code`/`details` ends
//!   the stream there; its `delay` is not supported.
//! - `priority` → `priority` of the response; `options.times` → `times`;
//!   `session` → the document's `session`.
//! - Not supported: templates (`{{ ... }}`), `effects`, and the cases above.
//!
//! Selection differs in one way that cannot be reported per stub: GripMock
//! ranks matching stubs by specificity before priority; here a stub without
//! conditions is a fallback (tried after every stub with some), and the
//! others go by priority, then file order. Where GripMock's own comparison
//! never matches because of how it represents numbers (a float in
//! `contains` or inside a nested object, a quoted number, an enum given by
//! number), the values are compared here.

use crate::diag::{suggest, Diagnostic, Diagnostics, Span};
use crate::values::find_field;
use crate::yaml::{plain_type, Node, NodeKind, PlainType};
use prost_reflect::{
    DescriptorPool, EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor, ServiceDescriptor,
};
use wirestub_plan::STATUS_NAMES;

const STUB_KEYS: &[&str] = &[
    "id", "service", "method", "priority", "input", "inputs", "headers", "options", "output", "effects", "session",
    "_meta",
];
const INPUT_KEYS: &[&str] = &["equals", "contains", "matches", "glob", "anyOf", "ignoreArrayOrder"];
const INPUT_ALT_KEYS: &[&str] = &["equals", "contains", "matches", "glob", "ignoreArrayOrder"];
const HEADER_KEYS: &[&str] = &["equals", "contains", "matches", "glob", "anyOf"];
const HEADER_ALT_KEYS: &[&str] = &["equals", "contains", "matches", "glob"];
const OUTPUT_KEYS: &[&str] = &["data", "stream", "error", "code", "details", "delay", "headers", "trailers"];
const ELEMENT_KEYS: &[&str] = &["delay", "error", "code", "details"];
const OPTION_KEYS: &[&str] = &["times"];
/// The reserved key of a stream element.
const ELEMENT: &str = "_gripmock";

/// Whether a document is a GripMock stub: a mapping with any of `input`,
/// `inputs`, `output` or `headers` and none of Wishmock's `responses` and
/// `match`.
pub fn is_stub(node: &Node) -> bool {
    let Some(entries) = node.map() else { return false };
    let has = |k: &str| entries.iter().any(|(key, _)| key.scalar() == Some(k));
    ["input", "inputs", "output", "headers"].iter().any(|k| has(k)) && !has("responses") && !has("match")
}

/// A top-level list of stubs.
fn is_stub_list(node: &Node) -> bool {
    matches!(&node.kind, NodeKind::Seq(items) if items.iter().any(is_stub))
}

/// Replaces the GripMock stubs among a file's documents (single stubs and
/// lists of them) by the rule documents they translate to; other documents
/// pass through. `services` are the schema's, for resolving names.
pub fn expand<'s>(
    nodes: Vec<Node>,
    services: impl IntoIterator<Item = &'s ServiceDescriptor>,
    diags: &mut Diagnostics,
) -> Vec<Node> {
    if !nodes.iter().any(|n| is_stub(n) || is_stub_list(n)) {
        return nodes;
    }
    let mut services: Vec<ServiceDescriptor> = services.into_iter().cloned().collect();
    services.sort_by(|a, b| a.full_name().cmp(b.full_name()));
    let mut out = Vec::new();
    for node in nodes {
        match &node.kind {
            _ if is_stub(&node) => out.extend(translate(&node, &services, diags)),
            NodeKind::Seq(items) if is_stub_list(&node) => {
                for item in items {
                    if is_stub(item) {
                        out.extend(translate(item, &services, diags));
                    } else {
                        diags.push(
                            Diagnostic::error(
                                Some(item.span.clone()),
                                format!("expected a GripMock stub in this list of stubs, found {}", item.describe()),
                            )
                            .with_help(
                                "a stub is a mapping with `service`, `method`, `input` or `inputs`, and `output`",
                            ),
                        );
                    }
                }
            }
            _ => out.push(node),
        }
    }
    out
}

/// Translates one stub into rule documents: one, or one per service when a
/// bare service name names several. Nothing when the stub cannot be read
/// (the problems are in `diags`).
pub fn translate(stub: &Node, services: &[ServiceDescriptor], diags: &mut Diagnostics) -> Vec<Node> {
    let Some(entries) = stub.map() else {
        diags.push(Diagnostic::error(
            Some(stub.span.clone()),
            format!("a GripMock stub must be a mapping, found {}", stub.describe()),
        ));
        return Vec::new();
    };
    let mut tx = Tx { diags, pool: services.first().map(|s| s.parent_pool().clone()) };
    if tx.templates(stub) {
        return Vec::new();
    }
    let mut ok = true;
    for (key, value) in entries {
        let name = key.scalar().unwrap_or_default();
        if name == "effects" {
            tx.error_help(
                &key.span,
                "GripMock `effects` are not supported",
                "effects create or delete stubs when this one matches; rules are fixed when compiled (`times` writes sequences)",
            );
            ok = false;
        } else if !STUB_KEYS.contains(&name) {
            let d = tx.err(&key.span, format!("unknown key `{name}` in GripMock stub"));
            tx.diags.push(d.with_help(suggest(name, STUB_KEYS.iter().copied())));
            ok = false;
        } else if name == "id" && value.scalar().is_none() {
            tx.error(&value.span, format!("a stub `id` is a UUID string, found {}", value.describe()));
        }
    }
    let get = |k: &str| get(entries, k);
    fn named(e: Option<&(Node, Node)>) -> Option<&str> {
        e.and_then(|(_, v)| v.scalar()).filter(|s| !s.is_empty())
    }
    let (Some(service), Some(method)) = (named(get("service")), named(get("method"))) else {
        let span = get("service").or(get("method")).map(|(_, v)| v.span.clone()).unwrap_or(stub_span(stub));
        tx.error_help(
            &span,
            "a GripMock stub needs `service` and `method`",
            "e.g. `service: helloworld.Greeter` (or `Greeter`) and `method: SayHello`",
        );
        return Vec::new();
    };
    if !ok {
        return Vec::new();
    }
    let stub = Stub { node: stub, entries };
    resolve(services, service, method).into_iter().filter_map(|(full, m)| tx.doc(&stub, &full, m.as_ref())).collect()
}

/// The services a stub's `service` names, each with the method if it has
/// it: the service of that full name, or every service of that bare name
/// (GripMock looks a call's service up both ways). Unresolved names pass
/// through for `rules.rs` to report.
fn resolve(services: &[ServiceDescriptor], service: &str, method: &str) -> Vec<(String, Option<MethodDescriptor>)> {
    let find = |s: &ServiceDescriptor| s.methods().find(|m| m.name().eq_ignore_ascii_case(method));
    let named: Vec<&ServiceDescriptor> =
        services.iter().filter(|s| s.full_name() == service || s.name() == service).collect();
    let with_method: Vec<(String, Option<MethodDescriptor>)> =
        named.iter().filter_map(|s| find(s).map(|m| (s.full_name().to_string(), Some(m)))).collect();
    if !with_method.is_empty() {
        return with_method;
    }
    match named.first() {
        Some(s) => vec![(s.full_name().to_string(), None)],
        None => vec![(service.to_string(), None)],
    }
}

/// A stub being translated: its node and entries.
struct Stub<'n> {
    node: &'n Node,
    entries: &'n [(Node, Node)],
}

/// The `when` entries of one response.
type Conds = Vec<(Node, Node)>;

#[derive(Clone, Copy, PartialEq)]
enum Block {
    Equals,
    Contains,
    Matches,
    Glob,
}

impl Block {
    fn of(name: &str) -> Option<Block> {
        Some(match name {
            "equals" => Block::Equals,
            "contains" => Block::Contains,
            "matches" => Block::Matches,
            "glob" => Block::Glob,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Block::Equals => "equals",
            Block::Contains => "contains",
            Block::Matches => "matches",
            Block::Glob => "glob",
        }
    }
}

/// What a stub key names in the request, as far as the schema tells.
enum Shape {
    Unknown,
    Scalar(Kind),
    Message(MessageDescriptor),
    List,
    /// A proto map, with its value field.
    Map(FieldDescriptor),
}

fn shape(field: Option<&FieldDescriptor>) -> Shape {
    let Some(f) = field else { return Shape::Unknown };
    match f.kind() {
        Kind::Message(entry) if f.is_map() => Shape::Map(entry.map_entry_value_field()),
        _ if f.is_list() => Shape::List,
        Kind::Message(m) => Shape::Message(m),
        k => Shape::Scalar(k),
    }
}

/// A condition's place: the path written after `request.`/`metadata.`
/// (with that prefix), the stub key it comes from, the field it names.
struct At<'k> {
    path: String,
    key: &'k Node,
    field: Option<FieldDescriptor>,
    /// A proto map's entry: its presence is tested too, as GripMock needs
    /// the key.
    entry: bool,
}

/// An operator of a condition's value.
enum Leaf {
    Eq(Node),
    Ops(Vec<(Node, Node)>),
}

struct Tx<'d> {
    diags: &'d mut Diagnostics,
    pool: Option<DescriptorPool>,
}

fn text(s: impl Into<String>, span: &Span) -> Node {
    Node { kind: NodeKind::Scalar { text: s.into(), plain: false }, span: span.clone() }
}

fn plain(s: impl Into<String>, span: &Span) -> Node {
    Node { kind: NodeKind::Scalar { text: s.into(), plain: true }, span: span.clone() }
}

fn map(entries: Vec<(Node, Node)>, span: &Span) -> Node {
    Node { kind: NodeKind::Map(entries), span: span.clone() }
}

fn seq(items: Vec<Node>, span: &Span) -> Node {
    Node { kind: NodeKind::Seq(items), span: span.clone() }
}

/// An operator entry `op: value`, placed at `span`.
fn op(name: &str, value: Node, span: &Span) -> (Node, Node) {
    (text(name, span), value)
}

/// Where to point for a whole stub: its first key.
fn stub_span(stub: &Node) -> Span {
    match stub.map().and_then(|m| m.first()) {
        Some((k, _)) => k.span.clone(),
        None => stub.span.clone(),
    }
}

/// Whether a scalar is a string (quoted, or plain text that is no number,
/// boolean or null).
fn is_string(node: &Node) -> bool {
    match &node.kind {
        NodeKind::Scalar { plain: false, .. } => true,
        NodeKind::Scalar { text, plain: true } => plain_type(text) == PlainType::Str,
        _ => false,
    }
}

fn is_scalar(node: &Node) -> bool {
    matches!(node.kind, NodeKind::Scalar { .. })
}

/// A mapping's entries; null reads as empty.
fn entries_of(node: &Node) -> Option<&[(Node, Node)]> {
    match &node.kind {
        NodeKind::Map(m) => Some(m),
        NodeKind::Null => Some(&[]),
        _ => None,
    }
}

fn get<'n>(entries: &'n [(Node, Node)], key: &str) -> Option<&'n (Node, Node)> {
    entries.iter().find(|(k, _)| k.scalar() == Some(key))
}

impl Tx<'_> {
    fn err(&self, span: &Span, msg: impl Into<String>) -> Diagnostic {
        Diagnostic::error(Some(span.clone()), msg)
    }

    fn error(&mut self, span: &Span, msg: impl Into<String>) {
        self.diags.push(Diagnostic::error(Some(span.clone()), msg));
    }

    fn error_help(&mut self, span: &Span, msg: impl Into<String>, help: impl Into<String>) {
        self.diags.push(Diagnostic::error(Some(span.clone()), msg).with_help(help));
    }

    /// Reports unknown keys of a mapping; false if there were any.
    fn known_keys(&mut self, entries: &[(Node, Node)], allowed: &[&str], what: &str) -> bool {
        let mut ok = true;
        for (k, _) in entries {
            let name = k.scalar().unwrap_or_default();
            if !allowed.contains(&name) {
                let d = self.err(&k.span, format!("unknown key `{name}` in {what}"));
                self.diags.push(d.with_help(suggest(name, allowed.iter().copied())));
                ok = false;
            }
        }
        ok
    }

    /// A mapping, or an error saying what it should have been.
    fn mapping<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n [(Node, Node)]> {
        let entries = entries_of(node);
        if entries.is_none() {
            self.error(&node.span, format!("{what} must be a mapping, found {}", node.describe()));
        }
        entries
    }

    /// Reports GripMock templates anywhere in the stub; true if any.
    fn templates(&mut self, node: &Node) -> bool {
        match &node.kind {
            NodeKind::Scalar { text, .. } if text.contains("{{") => {
                self.error_help(
                    &node.span,
                    "GripMock templates (`{{ ... }}`) are not supported",
                    "Go templates are GripMock's own; Wishmock rule documents have templates of their own (`{{ request.name }}`)",
                );
                true
            }
            NodeKind::Seq(items) => items.iter().fold(false, |any, i| self.templates(i) | any),
            NodeKind::Map(entries) => {
                entries.iter().fold(false, |any, (k, v)| self.templates(k) | self.templates(v) | any)
            }
            _ => false,
        }
    }

    /// The rule document of a stub for one service.
    fn doc(&mut self, stub: &Stub, service: &str, method: Option<&MethodDescriptor>) -> Option<Node> {
        let get = |k: &str| get(stub.entries, k);
        let (service_key, service_node) = get("service")?;
        let (method_key, method_node) = get("method")?;
        let errors_before = self.diags.error_count();
        if let Some(m) = method.filter(|m| m.is_client_streaming() && m.is_server_streaming()) {
            self.error_help(
                &method_node.span,
                format!("GripMock bidirectional streaming stubs are not supported (`{}`)", m.full_name()),
                "GripMock answers each message with the stream element of its index; a Wishmock rule with `mode: duplex` answers each message by its own conditions",
            );
            return None;
        }
        let input = method.map(|m| m.input());
        let client_stream = method.is_some_and(|m| m.is_client_streaming());
        let inputs = match (get("input"), get("inputs")) {
            (Some(_), Some((k, _))) => {
                self.error_help(
                    &k.span,
                    "a GripMock stub has `input` or `inputs`, not both",
                    "`input` matches the request message, `inputs` the messages of a client stream",
                );
                None
            }
            (Some((k, v)), None) if client_stream => {
                if has_conditions(v) {
                    self.error_help(
                        &k.span,
                        format!(
                            "GripMock `input` on client-streaming method `{}` (matched by any one of the messages) is not supported",
                            method.map(|m| m.full_name()).unwrap_or_default()
                        ),
                        "use `inputs`, one entry per message",
                    );
                    None
                } else {
                    Some(vec![Vec::new()])
                }
            }
            (Some((_, v)), None) => self.matcher(v, "`input`", "request.", input.as_ref()),
            (None, Some((k, v))) if client_stream => self.stream_inputs(k, v, input.as_ref()),
            (None, Some((k, v))) => self.single_inputs(k, v, input.as_ref(), method),
            (None, None) => Some(vec![Vec::new()]),
        };
        let headers = match get("headers") {
            Some((_, v)) => self.headers(v),
            None => Some(vec![Vec::new()]),
        };
        let output = match get("output") {
            Some((_, v)) => self.output(v, method),
            None => {
                self.error_help(
                    &stub_span(stub.node),
                    "a GripMock stub needs `output`",
                    "e.g. `output: { data: { message: hi } }` or `output: { error: not found, code: 5 }`",
                );
                None
            }
        };
        let times = get("options").and_then(|(_, v)| self.times(v));
        let session = match get("session") {
            Some((k, v)) => match &v.kind {
                NodeKind::Scalar { text, .. } if text.is_empty() => None,
                NodeKind::Scalar { .. } => Some((k.clone(), v.clone())),
                NodeKind::Null => None,
                _ => {
                    self.error(&v.span, format!("a stub's `session` is a string, found {}", v.describe()));
                    None
                }
            },
            None => None,
        };
        let (inputs, headers, output) = (inputs?, headers?, output?);
        let mut alternatives = Vec::new();
        for i in &inputs {
            for h in &headers {
                alternatives.push(i.iter().chain(h).cloned().collect::<Conds>());
            }
        }
        if alternatives.len() > 1 {
            if let Some((k, _)) = &times {
                self.error_help(
                    &k.span,
                    "GripMock `options.times` with `anyOf` is not supported",
                    "GripMock counts the matches of all the alternatives together; each alternative is a response with a count of its own here",
                );
            }
        }
        if self.diags.error_count() > errors_before {
            return None;
        }
        let when_span = ["input", "inputs", "headers"]
            .iter()
            .find_map(|k| get(k))
            .map(|(k, _)| k.span.clone())
            .unwrap_or_else(|| stub_span(stub.node));
        let responses = alternatives
            .into_iter()
            .map(|conds| {
                let mut entry = Vec::new();
                if !conds.is_empty() {
                    entry.push((text("when", &when_span), map(conds, &when_span)));
                }
                entry.extend(output.iter().cloned());
                if let Some((k, v)) = get("priority") {
                    entry.push((text("priority", &k.span), v.clone()));
                }
                if let Some((k, v)) = &times {
                    entry.push((text("times", &k.span), v.clone()));
                }
                map(entry, &stub_span(stub.node))
            })
            .collect();
        let method_name = method
            .map(|m| m.name().to_string())
            .unwrap_or_else(|| method_node.scalar().unwrap_or_default().to_string());
        let mut doc = vec![
            (text("service", &service_key.span), text(service, &service_node.span)),
            (text("method", &method_key.span), text(method_name, &method_node.span)),
        ];
        if let Some((k, v)) = session {
            doc.push((text("session", &k.span), v));
        }
        let output_span = get("output").map(|(k, _)| k.span.clone()).unwrap_or_else(|| stub_span(stub.node));
        doc.push((text("responses", &output_span), seq(responses, &output_span)));
        Some(map(doc, &stub_span(stub.node)))
    }

    /// `options`: `times` (0 for no limit).
    fn times(&mut self, node: &Node) -> Option<(Node, Node)> {
        let entries = self.mapping(node, "`options`")?;
        self.known_keys(entries, OPTION_KEYS, "`options`");
        let (k, v) = get(entries, "times")?;
        match v.scalar().map(str::parse::<i64>) {
            Some(Ok(0)) => None,
            Some(Ok(n)) if n > 0 => Some((k.clone(), v.clone())),
            _ => {
                self.error_help(&v.span, "`times` is a count of matches, 0 or more", "0 (the default) means no limit");
                None
            }
        }
    }

    /// `input` (or one `anyOf` element): the alternatives it allows, each a
    /// list of conditions.
    fn matcher(
        &mut self,
        node: &Node,
        what: &str,
        prefix: &str,
        desc: Option<&MessageDescriptor>,
    ) -> Option<Vec<Conds>> {
        let entries = self.mapping(node, what)?;
        if !self.known_keys(entries, INPUT_KEYS, what) {
            return None;
        }
        let mut base = Conds::new();
        self.blocks(entries, prefix, desc, &mut base)?;
        let Some((_, any_of)) = get(entries, "anyOf") else { return Some(vec![base]) };
        let NodeKind::Seq(items) = &any_of.kind else {
            self.error(&any_of.span, format!("`anyOf` is a list of alternatives, found {}", any_of.describe()));
            return None;
        };
        if items.is_empty() {
            return Some(vec![base]);
        }
        let mut alternatives = Vec::new();
        for item in items {
            let entries = self.mapping(item, "an `anyOf` alternative")?;
            if let Some((inner, _)) = get(entries, "anyOf") {
                self.error(&inner.span, "GripMock `anyOf` does not nest");
                return None;
            }
            if !self.known_keys(entries, INPUT_ALT_KEYS, "an `anyOf` alternative") {
                return None;
            }
            let mut conds = base.clone();
            self.blocks(entries, prefix, desc, &mut conds)?;
            alternatives.push(conds);
        }
        Some(alternatives)
    }

    /// The `equals`, `contains`, `matches` and `glob` of a matcher.
    fn blocks(
        &mut self,
        entries: &[(Node, Node)],
        prefix: &str,
        desc: Option<&MessageDescriptor>,
        out: &mut Conds,
    ) -> Option<()> {
        let ignore_order = match get(entries, "ignoreArrayOrder") {
            None => false,
            Some((_, v)) => match (v.scalar().map(plain_type), &v.kind) {
                (Some(PlainType::Bool(b)), NodeKind::Scalar { plain: true, .. }) => b,
                _ => {
                    self.error(&v.span, format!("`ignoreArrayOrder` is true or false, found {}", v.describe()));
                    return None;
                }
            },
        };
        let before = self.diags.error_count();
        for (key, node) in entries {
            let Some(block) = key.scalar().and_then(Block::of) else { continue };
            let Some(fields) = self.mapping(node, &format!("`{}`", block.name())) else { continue };
            for (k, v) in fields {
                let name = k.scalar().unwrap_or_default();
                let field = desc.and_then(|d| find_field(d, name));
                let at = At { path: format!("{prefix}{name}"), key: k, field, entry: false };
                if desc.is_some() && at.field.is_none() {
                    // `rules.rs` reports the unknown field, with suggestions.
                    self.leaf(&at, Leaf::Ops(vec![op("exists", plain("true", &k.span), &k.span)]), out);
                    continue;
                }
                self.value(block, &at, v, false, ignore_order, out);
            }
        }
        (self.diags.error_count() == before).then_some(())
    }

    /// Adds the condition for `at`, with a presence test for map entries.
    fn leaf(&mut self, at: &At, leaf: Leaf, out: &mut Conds) {
        let key = text(&at.path, &at.key.span);
        let value = match leaf {
            Leaf::Eq(v) if !at.entry => v,
            Leaf::Eq(v) => {
                let span = v.span.clone();
                map(vec![op("exists", plain("true", &span), &span), op("eq", v, &span)], &span)
            }
            Leaf::Ops(mut ops) => {
                let span = ops.first().map(|(k, _)| k.span.clone()).unwrap_or_else(|| at.key.span.clone());
                if at.entry && !ops.iter().any(|(k, _)| k.scalar() == Some("exists")) {
                    ops.insert(0, op("exists", plain("true", &span), &span));
                }
                map(ops, &span)
            }
        };
        out.push((key, value));
    }

    /// The conditions for one value of a block.
    fn value(&mut self, b: Block, at: &At, v: &Node, nested: bool, ignore_order: bool, out: &mut Conds) {
        let span = &v.span;
        match &v.kind {
            NodeKind::Null => match shape(at.field.as_ref()) {
                Shape::Message(_) | Shape::Unknown => {
                    self.leaf(at, Leaf::Ops(vec![op("exists", plain("false", span), span)]), out)
                }
                _ => self.error_help(
                    span,
                    format!("GripMock never matches `null` against `{}`", at.path),
                    "only an unset message field reads as null in GripMock's view of the request",
                ),
            },
            NodeKind::Scalar { text: t, .. } => match b {
                Block::Equals | Block::Contains => self.leaf(at, Leaf::Eq(v.clone()), out),
                Block::Matches if is_string(v) => self.pattern(b, at, v, t.clone(), out),
                Block::Matches => self.leaf(at, Leaf::Eq(v.clone()), out),
                Block::Glob if is_string(v) => match glob_to_regex(t) {
                    Ok(re) => self.pattern(b, at, v, re, out),
                    Err(e) => self.error_help(
                        span,
                        format!("invalid GripMock glob `{t}`: {e}"),
                        "Go's path.Match syntax: `*`, `?`, `[a-z]`, `[^a]`, `\\` escapes",
                    ),
                },
                Block::Glob => {
                    self.error(span, format!("GripMock `glob` patterns are strings; {} never matches", v.describe()))
                }
            },
            NodeKind::Seq(items) => match b {
                Block::Equals => self.equal_list(at, v, items, nested || !ignore_order, out),
                Block::Contains => self.contained_list(at, v, items, out),
                Block::Matches => self.error_help(
                    span,
                    format!("GripMock `matches` on a list (`{}`) is not supported", at.path),
                    "it pairs each pattern with a different element; the rule language has no such test",
                ),
                Block::Glob => self.error(span, format!("GripMock `glob` never matches a list (`{}`)", at.path)),
            },
            NodeKind::Map(entries) => self.object(b, at, v, entries, nested, ignore_order, out),
        }
    }

    /// A regular expression (from `matches`, or a glob's) tested on `at`.
    fn pattern(&mut self, b: Block, at: &At, v: &Node, regex: String, out: &mut Conds) {
        let span = &v.span;
        let feature = format!("GripMock `{}` on `{}`", b.name(), at.path);
        match shape(at.field.as_ref()) {
            Shape::Scalar(Kind::Enum(e)) => match names_matching(&e, &regex) {
                Ok(names) if names.is_empty() => self.error(
                    span,
                    format!(
                        "`{}` matches no value of enum `{}`, so the stub never matches",
                        v.scalar().unwrap_or_default(),
                        e.full_name()
                    ),
                ),
                Ok(names) => {
                    let list = seq(names.into_iter().map(|n| text(n, span)).collect(), span);
                    self.leaf(at, Leaf::Ops(vec![op("in", list, span)]), out);
                }
                Err(e) => self.error(span, format!("invalid regular expression `{regex}`: {e}")),
            },
            Shape::Scalar(Kind::Bytes) => self.error_help(
                span,
                format!("{feature} (a pattern over the base64 text of bytes) is not supported"),
                "test the bytes with `equals` (base64)",
            ),
            Shape::Scalar(Kind::Bool) => {
                self.error(span, format!("GripMock never matches a pattern against a boolean (`{}`)", at.path))
            }
            Shape::Scalar(Kind::String) | Shape::Unknown => {
                self.leaf(at, Leaf::Ops(vec![op("regex", text(regex, span), span)]), out)
            }
            Shape::Scalar(_) => self.error_help(
                span,
                format!("{feature} (a pattern over a number's decimal text) is not supported"),
                "test the number with `equals`",
            ),
            // `rules.rs` explains why `regex` does not apply.
            _ => self.leaf(at, Leaf::Ops(vec![op("regex", text(regex, span), span)]), out),
        }
    }

    /// A list in `equals`: the same values in the same order.
    fn equal_list(&mut self, at: &At, v: &Node, items: &[Node], ordered: bool, out: &mut Conds) {
        let span = &v.span;
        match shape(at.field.as_ref()) {
            Shape::List | Shape::Unknown => {}
            // `rules.rs` says the field is not repeated.
            _ => return self.leaf(at, Leaf::Eq(v.clone()), out),
        }
        if items.is_empty() {
            return self.error(
                span,
                format!("GripMock never matches an empty list in `equals` (`{}`): its view of the request leaves empty repeated fields out", at.path),
            );
        }
        if !items.iter().all(is_scalar) {
            return self
                .error(span, format!("GripMock `equals` on a list of messages (`{}`) is not supported", at.path));
        }
        if ordered && items.len() > 1 {
            return self.error_help(
                span,
                format!("GripMock `equals` on the list `{}` compares it in order, which is not supported", at.path),
                "the rule language cannot test the order of a repeated field; with `ignoreArrayOrder: true` (distinct values) order does not matter",
            );
        }
        if self.repeats(at, items) {
            return;
        }
        let mut ops = vec![op("len", plain(items.len().to_string(), span), span)];
        ops.push(self.contains_all(items, span));
        self.leaf(at, Leaf::Ops(ops), out);
    }

    /// A list in `contains`: every listed value, in any order.
    fn contained_list(&mut self, at: &At, v: &Node, items: &[Node], out: &mut Conds) {
        let span = &v.span;
        match shape(at.field.as_ref()) {
            Shape::List | Shape::Unknown => {}
            _ => return self.leaf(at, Leaf::Eq(v.clone()), out),
        }
        if items.is_empty() {
            // GripMock's view has the field only when it has elements.
            let gt = map(vec![op("gt", plain("0", span), span)], span);
            return self.leaf(at, Leaf::Ops(vec![op("len", gt, span)]), out);
        }
        if !items.iter().all(is_scalar) {
            return self
                .error(span, format!("GripMock `contains` on a list of messages (`{}`) is not supported", at.path));
        }
        if self.repeats(at, items) {
            return;
        }
        let all = self.contains_all(items, span);
        self.leaf(at, Leaf::Ops(vec![all]), out);
    }

    /// Reports a value listed twice: GripMock counts them.
    fn repeats(&mut self, at: &At, items: &[Node]) -> bool {
        for (i, item) in items.iter().enumerate() {
            if items[..i].iter().any(|x| x.scalar() == item.scalar()) {
                self.error_help(
                    &item.span,
                    format!(
                        "GripMock compares lists as multisets: `{}` appears twice in `{}`, which is not supported",
                        item.scalar().unwrap_or_default(),
                        at.path
                    ),
                    "the rule language tests whether a repeated field contains a value, not how often",
                );
                return true;
            }
        }
        false
    }

    /// `contains: x`, or `all_of` of them for several values.
    fn contains_all(&mut self, items: &[Node], span: &Span) -> (Node, Node) {
        if let [one] = items {
            return op("contains", one.clone(), span);
        }
        let each = items.iter().map(|i| map(vec![op("contains", i.clone(), &i.span)], &i.span)).collect();
        op("all_of", seq(each, span), span)
    }

    /// An object value: a nested message (its fields by path) or a proto
    /// map (its entries).
    #[allow(clippy::too_many_arguments)]
    fn object(
        &mut self,
        b: Block,
        at: &At,
        v: &Node,
        entries: &[(Node, Node)],
        nested: bool,
        ignore_order: bool,
        out: &mut Conds,
    ) {
        let span = &v.span;
        let desc = match shape(at.field.as_ref()) {
            Shape::Map(value_field) => {
                if b == Block::Equals {
                    return self.error_help(
                        span,
                        format!("GripMock `equals` on the map `{}` compares it whole (these keys and no others), which is not supported", at.path),
                        "`contains` tests the listed entries and ignores the others",
                    );
                }
                for (k, val) in entries {
                    let key = k.scalar().unwrap_or_default();
                    if key.contains('.') {
                        self.error(&k.span, format!("map key `{key}` has a dot, which a condition path cannot name"));
                        continue;
                    }
                    let entry = At {
                        path: format!("{}.{key}", at.path),
                        key: k,
                        field: Some(value_field.clone()),
                        entry: true,
                    };
                    self.value(b, &entry, val, nested, ignore_order, out);
                }
                return;
            }
            Shape::Message(m) => Some(m),
            Shape::Unknown => None,
            // Not a message: `rules.rs` reports the paths through it.
            _ => {
                for (k, val) in entries {
                    let path = format!("{}.{}", at.path, k.scalar().unwrap_or_default());
                    self.leaf(&At { path, key: k, field: None, entry: false }, Leaf::Eq(val.clone()), out);
                }
                return;
            }
        };
        // GripMock's view has an object here only when the field is set.
        self.leaf(at, Leaf::Ops(vec![op("exists", plain("true", span), span)]), out);
        let mut listed = Vec::new();
        for (k, val) in entries {
            let name = k.scalar().unwrap_or_default();
            let field = desc.as_ref().and_then(|d| find_field(d, name));
            let child = At { path: format!("{}.{name}", at.path), key: k, field, entry: false };
            match &child.field {
                Some(f) => listed.push(f.number()),
                None if desc.is_some() => {
                    self.leaf(&child, Leaf::Ops(vec![op("exists", plain("true", &k.span), &k.span)]), out);
                    continue;
                }
                None => {}
            }
            self.value(b, &child, val, nested || b == Block::Equals, ignore_order, out);
        }
        let (Block::Equals, Some(desc)) = (b, desc) else { return };
        // `equals` compares a nested object whole, and GripMock's view of
        // the request has every singular field of it.
        let mut missing = Vec::new();
        for f in desc.fields().filter(|f| !listed.contains(&f.number())) {
            if f.is_map() {
                self.error_help(
                    &at.key.span,
                    format!(
                        "GripMock `equals` on the object `{}` needs its map `{}` empty, which is not supported",
                        at.path,
                        f.name()
                    ),
                    "the rule language cannot test that a map is empty; use `contains` to test some fields",
                );
            } else if f.is_list() {
                let path = format!("{}.{}", at.path, f.name());
                let len = op("len", plain("0", &at.key.span), &at.key.span);
                self.leaf(&At { path, key: at.key, field: Some(f.clone()), entry: false }, Leaf::Ops(vec![len]), out);
            } else {
                missing.push(f.name().to_string());
            }
        }
        if !missing.is_empty() {
            let shown: Vec<String> = missing.iter().map(|m| format!("`{m}`")).collect();
            self.error_help(
                &at.key.span,
                format!(
                    "GripMock `equals` compares the object `{}` whole, so without {} of `{}` this stub never matches",
                    at.path,
                    shown.join(", "),
                    desc.full_name()
                ),
                "GripMock's view of the request has every field of a set message, defaults included: list them all, or use `contains` to test some",
            );
        }
    }

    /// `inputs` of a client-streaming method: entry N against message N.
    fn stream_inputs(&mut self, key: &Node, node: &Node, desc: Option<&MessageDescriptor>) -> Option<Vec<Conds>> {
        let NodeKind::Seq(items) = &node.kind else {
            self.error(
                &node.span,
                format!("`inputs` is a list of matchers, one per message, found {}", node.describe()),
            );
            return None;
        };
        match items.len() {
            0 => {
                self.error(&node.span, "GripMock never matches empty `inputs`");
                return None;
            }
            1 if has_conditions(&items[0]) => {
                self.error_help(
                    &key.span,
                    "GripMock `inputs` with one entry (a pattern every message must match) is not supported",
                    "write one entry per message the client sends",
                );
                return None;
            }
            1 => return Some(vec![Vec::new()]),
            _ => {}
        }
        let mut conds = vec![(text("request.count", &key.span), plain(items.len().to_string(), &key.span))];
        for (i, item) in items.iter().enumerate() {
            let entries = self.mapping(item, "an `inputs` entry")?;
            if !self.known_keys(entries, INPUT_KEYS, "an `inputs` entry") {
                return None;
            }
            if let Some((k, _)) = get(entries, "anyOf") {
                self.error_help(
                    &k.span,
                    "GripMock `anyOf` in `inputs` with several entries is not supported",
                    "GripMock ignores it there",
                );
                return None;
            }
            if !has_conditions(item) {
                self.error(&item.span, "GripMock never matches an `inputs` entry without conditions among several");
                return None;
            }
            self.blocks(entries, &format!("request.items.{i}."), desc, &mut conds)?;
        }
        Some(vec![conds])
    }

    /// `inputs` of a method with one request message: one entry is `input`.
    fn single_inputs(
        &mut self,
        key: &Node,
        node: &Node,
        desc: Option<&MessageDescriptor>,
        method: Option<&MethodDescriptor>,
    ) -> Option<Vec<Conds>> {
        match &node.kind {
            NodeKind::Seq(items) if items.len() == 1 => self.matcher(&items[0], "an `inputs` entry", "request.", desc),
            NodeKind::Seq(_) if method.is_none() => Some(vec![Vec::new()]),
            NodeKind::Seq(items) => {
                self.error(
                    &key.span,
                    format!(
                        "GripMock never matches `inputs` of {} entries: `{}` takes one request message",
                        items.len(),
                        method.map(|m| m.full_name()).unwrap_or_default()
                    ),
                );
                None
            }
            _ => {
                self.error(&node.span, format!("`inputs` is a list of matchers, found {}", node.describe()));
                None
            }
        }
    }

    /// `headers`: the alternatives of metadata conditions.
    fn headers(&mut self, node: &Node) -> Option<Vec<Conds>> {
        let entries = self.mapping(node, "`headers`")?;
        if !self.known_keys(entries, HEADER_KEYS, "`headers`") {
            return None;
        }
        let mut base = Conds::new();
        self.header_blocks(entries, &mut base)?;
        let Some((_, any_of)) = get(entries, "anyOf") else { return Some(vec![base]) };
        let NodeKind::Seq(items) = &any_of.kind else {
            self.error(&any_of.span, format!("`anyOf` is a list of alternatives, found {}", any_of.describe()));
            return None;
        };
        if items.is_empty() {
            return Some(vec![base]);
        }
        let mut alternatives = Vec::new();
        for item in items {
            let entries = self.mapping(item, "a `headers.anyOf` alternative")?;
            if !self.known_keys(entries, HEADER_ALT_KEYS, "a `headers.anyOf` alternative") {
                return None;
            }
            let mut conds = base.clone();
            self.header_blocks(entries, &mut conds)?;
            alternatives.push(conds);
        }
        Some(alternatives)
    }

    fn header_blocks(&mut self, entries: &[(Node, Node)], out: &mut Conds) -> Option<()> {
        let before = self.diags.error_count();
        for (key, node) in entries {
            let Some(block) = key.scalar().and_then(Block::of) else { continue };
            let Some(headers) = self.mapping(node, &format!("`headers.{}`", block.name())) else { continue };
            for (k, v) in headers {
                let name = k.scalar().unwrap_or_default();
                let span = &v.span;
                let Some(value) = v.scalar() else {
                    self.error(span, format!("a header value is a string, found {}", v.describe()));
                    continue;
                };
                let present = op("exists", plain("true", span), span);
                let test = match block {
                    Block::Equals | Block::Contains if value.is_empty() => {
                        map(vec![present, op("eq", v.clone(), span)], span)
                    }
                    Block::Equals | Block::Contains => v.clone(),
                    Block::Matches => map(vec![present, op("regex", v.clone(), span)], span),
                    Block::Glob => match glob_to_regex(value) {
                        Ok(re) => map(vec![present, op("regex", text(re, span), span)], span),
                        Err(e) => {
                            self.error(span, format!("invalid GripMock glob `{value}`: {e}"));
                            continue;
                        }
                    },
                };
                out.push((text(format!("metadata.{name}"), &k.span), test));
            }
        }
        (self.diags.error_count() == before).then_some(())
    }

    /// `output`: the response entry's keys.
    fn output(&mut self, node: &Node, method: Option<&MethodDescriptor>) -> Option<Vec<(Node, Node)>> {
        let entries = self.mapping(node, "`output`")?;
        if !self.known_keys(entries, OUTPUT_KEYS, "`output`") {
            return None;
        }
        let server_stream = method.is_some_and(|m| m.is_server_streaming());
        let before = self.diags.error_count();
        let mut fields = Vec::new();
        if let Some((k, v)) = get(entries, "data").filter(|(_, v)| !v.is_null()) {
            fields.push((text("body", &k.span), v.clone()));
        }
        let mut status = self.status(get(entries, "error"), get(entries, "code"));
        let mut details = get(entries, "details").cloned();
        let mut error_after = None;
        let mut stream_span = None;
        if let Some((k, v)) = get(entries, "stream") {
            stream_span = Some(k.span.clone());
            match &v.kind {
                NodeKind::Seq(items) => {
                    let mut sent = Vec::new();
                    for item in items {
                        match self.element(item) {
                            Element::Message(m) => sent.push(m),
                            Element::Skip => {}
                            Element::End(s, d) => {
                                status = Some(s);
                                details = d;
                                break;
                            }
                        }
                    }
                    if sent.is_empty() && status.is_none() && server_stream {
                        self.error_help(
                            &v.span,
                            "GripMock's empty `stream` (no messages, status OK) is not supported",
                            "a server stream here sends at least one message: give `data` or a stream element",
                        );
                    }
                    if status.is_some() && !sent.is_empty() {
                        error_after = Some(sent.len());
                    }
                    fields.push((text("stream_items", &k.span), seq(sent, &v.span)));
                }
                _ => self.error(&v.span, format!("`stream` is a list of messages, found {}", v.describe())),
            }
        }
        let mut trailers = Vec::new();
        if let Some(s) = status {
            trailers.push((text("grpc-status", &s.code.span), s.code));
            if let Some(m) = s.message {
                trailers.push((text("grpc-message", &m.span), m));
            }
        }
        if let Some((_, v)) = get(entries, "trailers") {
            if let Some(extra) = self.mapping(v, "`output.trailers`") {
                for (name, value) in extra {
                    let n = name.scalar().unwrap_or_default();
                    if n.to_ascii_lowercase().starts_with("grpc-") {
                        self.error_help(
                            &name.span,
                            format!("trailer `{n}` is reserved"),
                            "`grpc-` trailers are written by the engine; set the status with `error` and `code`",
                        );
                    } else {
                        trailers.push((name.clone(), value.clone()));
                    }
                }
            }
        }
        if !trailers.is_empty() {
            let span = trailers[0].0.span.clone();
            fields.push((text("trailers", &span), map(trailers, &span)));
        }
        if let Some((k, v)) = details {
            if let Some(d) = self.details(&v) {
                fields.push((text("details", &k.span), d));
            }
        }
        if let Some((k, v)) = get(entries, "headers") {
            fields.push((text("metadata", &k.span), v.clone()));
        }
        let delay = match get(entries, "delay") {
            Some((k, v)) => self.delay(v).map(|ms| (k.span.clone(), ms)),
            None => None,
        };
        if let Some((span, ms)) = &delay {
            fields.push((text("delay_ms", span), plain(ms.to_string(), span)));
        }
        if let (Some(span), true) = (&stream_span, server_stream) {
            // GripMock waits `delay` before every message; nothing else.
            let (span, ms) = delay.clone().unwrap_or((span.clone(), 0));
            fields.push((text("stream_delay_ms", &span), plain(ms.to_string(), &span)));
        }
        if let (Some(n), Some(span)) = (error_after, &stream_span) {
            fields.push((text("stream_error_after", span), plain(n.to_string(), span)));
        }
        (self.diags.error_count() == before).then_some(fields)
    }

    /// One element of `output.stream`, with its `_gripmock` directives.
    fn element(&mut self, item: &Node) -> Element {
        let Some(entries) = item.map() else { return Element::Message(item.clone()) };
        let Some((_, directives)) = get(entries, ELEMENT) else { return Element::Message(item.clone()) };
        let message =
            map(entries.iter().filter(|(key, _)| key.scalar() != Some(ELEMENT)).cloned().collect(), &item.span);
        let Some(d) = self.mapping(directives, "`_gripmock`") else { return Element::Skip };
        if !self.known_keys(d, ELEMENT_KEYS, "`_gripmock`") {
            return Element::Skip;
        }
        if let Some((k, _)) = get(d, "delay") {
            self.error_help(
                &k.span,
                "GripMock per-message `_gripmock.delay` is not supported",
                "`output.delay` waits before every message",
            );
        }
        let (error, code, details) = (get(d, "error"), get(d, "code"), get(d, "details"));
        if error.is_none() && code.is_none() && details.is_none() {
            return Element::Message(message);
        }
        match self.status(error, code) {
            Some(s) => Element::End(s, details.cloned()),
            // GripMock sends nothing for an element whose status is OK.
            None => Element::Skip,
        }
    }

    /// `error` and `code` as a status; None for OK.
    fn status(&mut self, error: Option<&(Node, Node)>, code: Option<&(Node, Node)>) -> Option<Status> {
        let message = match error.map(|(_, v)| v) {
            Some(v) if matches!(v.kind, NodeKind::Null) => None,
            Some(v) if v.scalar().is_some() => v.scalar().filter(|s| !s.is_empty()).map(|_| v.clone()),
            Some(v) => {
                self.error(&v.span, format!("`error` is the status message, a string, found {}", v.describe()));
                return None;
            }
            None => None,
        };
        let code_node = code.map(|(_, v)| v).filter(|v| !v.is_null());
        let number = match code_node {
            None => None,
            Some(v) => match (&v.kind, v.scalar()) {
                (NodeKind::Scalar { plain: true, .. }, Some(t)) if t.parse::<u8>().is_ok_and(|n| n <= 16) => {
                    t.parse::<u8>().ok()
                }
                (_, Some(t)) if STATUS_NAMES.contains(&t) => STATUS_NAMES.iter().position(|n| *n == t).map(|p| p as u8),
                (_, t) => {
                    let shown = t.unwrap_or_default();
                    let d = self.err(&v.span, format!("`{shown}` is not a gRPC status code"));
                    self.diags.push(d.with_help(format!(
                        "a number from 0 to 16 or a name: {}",
                        suggest(shown, STATUS_NAMES.iter().copied())
                    )));
                    return None;
                }
            },
        };
        match (number, &message, code_node) {
            (Some(0), _, _) | (None, None, _) => None,
            (Some(_), _, Some(code)) => Some(Status { code: code.clone(), message }),
            (_, Some(m), _) => Some(Status { code: text("ABORTED", &m.span), message }),
            _ => None,
        }
    }

    /// `details`: GripMock's `type` is the `@type` of the Any.
    fn details(&mut self, node: &Node) -> Option<Node> {
        let NodeKind::Seq(items) = &node.kind else {
            self.error(&node.span, format!("`details` is a list of messages, found {}", node.describe()));
            return None;
        };
        let mut out = Vec::new();
        for item in items {
            let Some(entries) = item.map() else {
                self.error(&item.span, format!("a detail is a mapping, found {}", item.describe()));
                continue;
            };
            let Some((k, url)) = get(entries, "type").filter(|(_, v)| is_string(v)) else {
                self.error_help(
                    &item.span,
                    "a GripMock detail needs `type`, its type URL",
                    "e.g. `type: type.googleapis.com/google.rpc.ErrorInfo`",
                );
                continue;
            };
            let rest: Vec<(Node, Node)> =
                entries.iter().filter(|(key, _)| key.scalar() != Some("type")).cloned().collect();
            // GripMock also reads `{ type, value: { ... } }` when the message
            // has no field `value`.
            let rest = match rest.as_slice() {
                [(key, value)]
                    if key.scalar() == Some("value") && value.map().is_some() && !self.has_value_field(url) =>
                {
                    value.map().unwrap_or_default().to_vec()
                }
                _ => rest,
            };
            let mut entries = vec![(text("@type", &k.span), url.clone())];
            entries.extend(rest);
            out.push(map(entries, &item.span));
        }
        Some(seq(out, &node.span))
    }

    fn has_value_field(&self, url: &Node) -> bool {
        let name = url.scalar().unwrap_or_default().rsplit('/').next().unwrap_or_default();
        let Some(desc) = self.pool.as_ref().and_then(|p| p.get_message_by_name(name)) else { return true };
        find_field(&desc, "value").is_some()
    }

    /// `delay`: a Go duration, or a number of nanoseconds, in milliseconds.
    fn delay(&mut self, node: &Node) -> Option<u32> {
        let ns = match &node.kind {
            NodeKind::Null => return None,
            NodeKind::Scalar { text, plain: true } if plain_type(text) == PlainType::Int => {
                text.parse::<i128>().map_err(|_| format!("`{text}` is out of range"))
            }
            NodeKind::Scalar { text, .. } => go_duration_ns(text),
            _ => Err(format!("expected a duration such as `100ms`, found {}", node.describe())),
        };
        let help = "a Go duration such as `100ms`, `1.5s` or `1m`; a bare number is nanoseconds";
        let ns = match ns {
            Ok(ns) => ns.max(0),
            Err(e) => {
                self.error_help(&node.span, format!("invalid GripMock delay: {e}"), help);
                return None;
            }
        };
        if ns % 1_000_000 != 0 {
            self.error_help(
                &node.span,
                format!(
                    "GripMock delay `{}` is not a whole number of milliseconds, which is not supported",
                    node.scalar().unwrap_or_default()
                ),
                "delays are whole milliseconds here; a bare number is nanoseconds in GripMock",
            );
            return None;
        }
        match u32::try_from(ns / 1_000_000) {
            Ok(ms) => Some(ms),
            Err(_) => {
                self.error(&node.span, "the delay is too long (at most 4294967295 ms)");
                None
            }
        }
    }
}

/// A stream element read.
enum Element {
    Message(Node),
    /// Not sent.
    Skip,
    /// Ends the stream with a status (and its details).
    End(Status, Option<(Node, Node)>),
}

/// A status: its code (a number or a name) and message.
struct Status {
    code: Node,
    message: Option<Node>,
}

/// Whether a matcher has any condition (GripMock's empty matchers match
/// anything).
fn has_conditions(node: &Node) -> bool {
    let Some(entries) = node.map() else { return false };
    entries.iter().any(|(k, v)| match k.scalar() {
        Some("equals" | "contains" | "matches" | "glob") => v.map().is_some_and(|m| !m.is_empty()),
        Some("anyOf") => matches!(&v.kind, NodeKind::Seq(items) if items.iter().any(has_conditions)),
        _ => false,
    })
}

/// The names of an enum's values that a regular expression finds a match
/// in (GripMock reads enums by name).
fn names_matching(e: &EnumDescriptor, pattern: &str) -> Result<Vec<String>, String> {
    use regex_automata::dfa::{dense, Automaton};
    use regex_automata::Input;
    let dfa = dense::DFA::new(pattern).map_err(|e| {
        let mut cause: &dyn std::error::Error = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        cause.to_string().lines().last().unwrap_or_default().trim().trim_start_matches("error: ").to_string()
    })?;
    Ok(e.values()
        .filter(|v| matches!(dfa.try_search_fwd(&Input::new(v.name())), Ok(Some(_))))
        .map(|v| v.name().to_string())
        .collect())
}

/// Go's `path.Match` pattern as an anchored regular expression: `*` is any
/// run of characters but `/`, `?` one character but `/`, `[...]` a class
/// (`^` negates; classes match `/` too), `\` escapes.
fn glob_to_regex(pattern: &str) -> Result<String, String> {
    fn literal(re: &mut String, c: char) {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            re.push('\\');
        }
        re.push(c);
    }
    fn class_char(chars: &mut std::iter::Peekable<std::str::Chars>) -> Result<char, String> {
        match chars.next() {
            None => Err("a `[` is not closed".into()),
            Some(c @ ('-' | ']')) => {
                Err(format!("`{c}` where a character is expected in a class (escape it with `\\`)"))
            }
            Some('\\') => chars.next().ok_or_else(|| "a `[` is not closed".into()),
            Some(c) => Ok(c),
        }
    }
    let mut re = String::from("^");
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => re.push_str("[^/]*"),
            '?' => re.push_str("[^/]"),
            '\\' => literal(&mut re, chars.next().ok_or("a `\\` at the end escapes nothing")?),
            '[' => {
                re.push('[');
                if chars.peek() == Some(&'^') {
                    chars.next();
                    re.push('^');
                }
                let mut ranges = 0;
                loop {
                    if chars.peek() == Some(&']') && ranges > 0 {
                        chars.next();
                        break;
                    }
                    let lo = class_char(&mut chars)?;
                    let mut hi = lo;
                    if chars.peek() == Some(&'-') {
                        chars.next();
                        hi = class_char(&mut chars)?;
                    }
                    if lo > hi {
                        return Err(format!("the range `{lo}-{hi}` is reversed"));
                    }
                    re.push_str(&format!("\\x{{{:X}}}-\\x{{{:X}}}", lo as u32, hi as u32));
                    ranges += 1;
                }
                re.push(']');
            }
            c => literal(&mut re, c),
        }
    }
    re.push('$');
    Ok(re)
}

/// Go's `time.ParseDuration`, in nanoseconds.
fn go_duration_ns(text: &str) -> Result<i128, String> {
    let bad = || format!("`{text}` is not a duration");
    let (negative, mut s) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(bad());
    }
    let mut total: i128 = 0;
    while !s.is_empty() {
        let whole_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let whole = &s[..whole_len];
        s = &s[whole_len..];
        let mut fraction = "";
        if let Some(rest) = s.strip_prefix('.') {
            let n = rest.bytes().take_while(u8::is_ascii_digit).count();
            fraction = &rest[..n];
            s = &rest[n..];
        }
        if whole.is_empty() && fraction.is_empty() {
            return Err(bad());
        }
        let unit_len = s.find(|c: char| c == '.' || c.is_ascii_digit()).unwrap_or(s.len());
        let scale: i128 = match &s[..unit_len] {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("`{text}` has a number without a unit (ns, us, ms, s, m, h)")),
            u => return Err(format!("unknown unit `{u}` in `{text}`")),
        };
        s = &s[unit_len..];
        let too_long = || format!("`{text}` is too long");
        let mut value = if whole.is_empty() { 0 } else { whole.parse::<i128>().map_err(|_| too_long())? };
        value = value.checked_mul(scale).ok_or_else(too_long)?;
        let fraction = &fraction[..fraction.len().min(18)];
        if !fraction.is_empty() {
            let f: i128 = fraction.parse().map_err(|_| bad())?;
            value += f * scale / 10i128.pow(fraction.len() as u32);
        }
        total = total.checked_add(value).filter(|t| *t <= i64::MAX as i128).ok_or_else(too_long)?;
    }
    Ok(if negative { -total } else { total })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diag::SourceFile;
    use serde_json::{json, Value as J};

    const PROTO: &str = r#"
        syntax = "proto3";
        package shop;
        service Orders {
          rpc Get (Req) returns (Resp);
          rpc Watch (Req) returns (stream Resp);
          rpc Upload (stream Req) returns (Resp);
          rpc Chat (stream Req) returns (stream Resp);
        }
        enum State { STATE_UNSPECIFIED = 0; OPEN = 1; CLOSED = 2; }
        message User { string id = 1; string name = 2; repeated string roles = 3; }
        message Req {
          string name = 1; int32 qty = 2; State state = 3; User user = 4;
          repeated string tags = 5; map<string, string> labels = 6; bytes blob = 7; bool rush = 8;
        }
        message Resp { string message = 1; int32 code = 2; }
    "#;

    struct One;

    impl protox::file::FileResolver for One {
        fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
            match name {
                "shop.proto" => protox::file::File::from_source(name, PROTO),
                _ => Err(protox::Error::file_not_found(name)),
            }
        }
    }

    fn services() -> Vec<ServiceDescriptor> {
        let mut compiler = protox::Compiler::with_file_resolver(One);
        compiler.open_file("shop.proto").expect("the test schema compiles");
        compiler.descriptor_pool().services().collect()
    }

    /// The documents a stub file translates to, and the diagnostics.
    fn expand_str(text: &str) -> (Vec<Node>, Diagnostics) {
        let file = SourceFile::named("stubs.yaml", text.to_string());
        let nodes = crate::yaml::parse(&file).unwrap_or_else(|d| panic!("{}", d.render()));
        let mut diags = Diagnostics::default();
        let docs = expand(nodes, &services(), &mut diags);
        (docs, diags)
    }

    fn one(text: &str) -> J {
        let (docs, diags) = expand_str(text);
        assert!(diags.is_empty(), "{}", diags.render());
        assert_eq!(docs.len(), 1);
        docs[0].to_json()
    }

    /// The `when` entries of the first response, in order (keys repeat).
    fn when(text: &str) -> Vec<(String, J)> {
        let (docs, diags) = expand_str(text);
        assert!(diags.is_empty(), "{}", diags.render());
        let doc = docs[0].map().unwrap();
        let responses = &get(doc, "responses").unwrap().1;
        let NodeKind::Seq(items) = &responses.kind else { panic!("responses") };
        match get(items[0].map().unwrap(), "when") {
            Some((_, w)) => {
                w.map().unwrap().iter().map(|(k, v)| (k.scalar().unwrap().to_string(), v.to_json())).collect()
            }
            None => Vec::new(),
        }
    }

    /// Every error message, with its line and column.
    fn errors(text: &str) -> Vec<String> {
        let (_, diags) = expand_str(text);
        diags
            .iter()
            .map(|d| {
                let s = d.span.as_ref().unwrap();
                format!("{}:{}: {}", s.line, s.col, d.message)
            })
            .collect()
    }

    fn pairs(list: &[(&str, J)]) -> Vec<(String, J)> {
        list.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn stubs_are_told_from_rule_documents() {
        let doc = |t: &str| crate::yaml::parse(&SourceFile::named("t.yaml", t.to_string())).unwrap().remove(0);
        assert!(is_stub(&doc("service: a\nmethod: b\noutput: { data: {} }\n")));
        assert!(is_stub(&doc("headers: { equals: { a: b } }\n")));
        assert!(!is_stub(&doc("service: a\nmethod: b\nresponses: []\n")));
        assert!(!is_stub(&doc("input: {}\nmatch: {}\n")));
        assert!(!is_stub(&doc("- a\n")));
        let (docs, _) = expand_str("service: shop.Orders\nmethod: Get\nresponses: [{ body: {} }]\n");
        assert_eq!(docs[0].to_json(), json!({"service": "shop.Orders", "method": "Get", "responses": [{"body": {}}]}));
    }

    #[test]
    fn a_unary_stub_becomes_one_response() {
        let doc = one(
            "id: 6f1b3c2e-0000-4000-8000-000000000001\n\
             service: Orders\n\
             method: Get\n\
             priority: 5\n\
             session: s1\n\
             input:\n  equals: { name: book, qty: 2, state: OPEN, user: null }\n\
             headers:\n  equals: { x-user: ann }\n  contains: { x-empty: \"\" }\n  matches: { authorization: \"^Bearer \" }\n\
             output:\n  data: { message: ok }\n  headers: { x-a: b }\n  trailers: { x-t: c }\n  delay: 1.5s\n\
             options: { times: 2 }\n",
        );
        assert_eq!(
            doc,
            json!({
                "service": "shop.Orders",
                "method": "Get",
                "session": "s1",
                "responses": [{
                    "when": {
                        "request.name": "book",
                        "request.qty": 2,
                        "request.state": "OPEN",
                        "request.user": { "exists": false },
                        "metadata.x-user": "ann",
                        "metadata.x-empty": { "exists": true, "eq": "" },
                        "metadata.authorization": { "exists": true, "regex": "^Bearer " },
                    },
                    "body": { "message": "ok" },
                    "trailers": { "x-t": "c" },
                    "metadata": { "x-a": "b" },
                    "delay_ms": 1500,
                    "priority": 5,
                    "times": 2,
                }],
            })
        );
    }

    #[test]
    fn errors_become_trailers_and_streams_keep_their_pace() {
        let (docs, diags) = expand_str(
            "- service: shop.Orders\n  method: Get\n  output: { error: gone, code: NOT_FOUND, details: [{ type: type.googleapis.com/google.rpc.ErrorInfo, reason: R }] }\n\
             - service: shop.Orders\n  method: Get\n  output: { error: busy }\n\
             - service: shop.Orders\n  method: Get\n  output: { error: ignored, code: 0, data: { message: fine } }\n\
             - service: shop.Orders\n  method: Watch\n  output: { stream: [{ message: a }, { message: b }], error: cut, code: 14 }\n\
             - service: shop.Orders\n  method: Watch\n  output: { delay: 20ms, stream: [{ message: a }, { _gripmock: { error: stop, code: 9 } }, { message: never }] }\n",
        );
        assert!(diags.is_empty(), "{}", diags.render());
        let responses: Vec<J> = docs.iter().map(|d| d.to_json()["responses"][0].clone()).collect();
        assert_eq!(
            responses[0],
            json!({
                "trailers": { "grpc-status": "NOT_FOUND", "grpc-message": "gone" },
                "details": [{ "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "R" }],
            })
        );
        assert_eq!(responses[1], json!({ "trailers": { "grpc-status": "ABORTED", "grpc-message": "busy" } }));
        assert_eq!(responses[2], json!({ "body": { "message": "fine" } }));
        assert_eq!(
            responses[3],
            json!({
                "stream_items": [{ "message": "a" }, { "message": "b" }],
                "trailers": { "grpc-status": 14, "grpc-message": "cut" },
                "stream_delay_ms": 0,
                "stream_error_after": 2,
            })
        );
        assert_eq!(
            responses[4],
            json!({
                "stream_items": [{ "message": "a" }],
                "trailers": { "grpc-status": 9, "grpc-message": "stop" },
                "delay_ms": 20,
                "stream_delay_ms": 20,
                "stream_error_after": 1,
            })
        );
    }

    #[test]
    fn nested_objects_lists_maps_and_patterns() {
        let conds = when(
            "service: shop.Orders\nmethod: Get\n\
             input:\n\
             \x20 ignoreArrayOrder: true\n\
             \x20 equals: { tags: [a, b], user: { id: u1, name: ann } }\n\
             \x20 contains: { labels: { env: prod }, user: { roles: [admin] } }\n\
             \x20 matches: { name: \"^bo+k$\", state: \"^(OPEN|CLOSED)$\", qty: 3 }\n\
             \x20 glob: { user: { id: \"u-*\" } }\n\
             output: { data: {} }\n",
        );
        assert_eq!(
            conds,
            pairs(&[
                ("request.tags", json!({ "len": 2, "all_of": [{ "contains": "a" }, { "contains": "b" }] })),
                ("request.user", json!({ "exists": true })),
                ("request.user.id", json!("u1")),
                ("request.user.name", json!("ann")),
                ("request.user.roles", json!({ "len": 0 })),
                ("request.labels.env", json!({ "exists": true, "eq": "prod" })),
                ("request.user", json!({ "exists": true })),
                ("request.user.roles", json!({ "contains": "admin" })),
                ("request.name", json!({ "regex": "^bo+k$" })),
                ("request.state", json!({ "in": ["OPEN", "CLOSED"] })),
                ("request.qty", json!(3)),
                ("request.user", json!({ "exists": true })),
                ("request.user.id", json!({ "regex": "^u\\-[^/]*$" })),
            ])
        );
        // One element in order is a test; an empty `contains` list means
        // "has elements".
        let conds = when(
            "service: shop.Orders\nmethod: Get\ninput: { equals: { tags: [x] }, contains: { tags: [] } }\noutput: {}\n",
        );
        assert_eq!(
            conds,
            pairs(&[
                ("request.tags", json!({ "len": 1, "contains": "x" })),
                ("request.tags", json!({ "len": { "gt": 0 } }))
            ])
        );
    }

    #[test]
    fn any_of_becomes_one_response_per_alternative() {
        let (docs, diags) = expand_str(
            "service: shop.Orders\nmethod: Get\n\
             input: { equals: { qty: 1 }, anyOf: [{ equals: { name: a } }, { matches: { name: \"^b\" } }] }\n\
             headers: { anyOf: [{ equals: { x-a: \"1\" } }, { equals: { x-b: \"2\" } }] }\n\
             output: { data: { message: hi } }\n",
        );
        assert!(diags.is_empty(), "{}", diags.render());
        let responses = docs[0].to_json()["responses"].clone();
        let whens: Vec<J> = responses.as_array().unwrap().iter().map(|r| r["when"].clone()).collect();
        assert_eq!(
            whens,
            vec![
                json!({ "request.qty": 1, "request.name": "a", "metadata.x-a": "1" }),
                json!({ "request.qty": 1, "request.name": "a", "metadata.x-b": "2" }),
                json!({ "request.qty": 1, "request.name": { "regex": "^b" }, "metadata.x-a": "1" }),
                json!({ "request.qty": 1, "request.name": { "regex": "^b" }, "metadata.x-b": "2" }),
            ]
        );
    }

    #[test]
    fn client_stream_inputs_use_the_aggregate_view() {
        let conds = when(
            "service: shop.Orders\nmethod: Upload\n\
             inputs:\n  - equals: { name: a }\n  - contains: { tags: [x] }\n\
             output: { data: { message: two } }\n",
        );
        assert_eq!(
            conds,
            pairs(&[
                ("request.count", json!(2)),
                ("request.items.0.name", json!("a")),
                ("request.items.1.tags", json!({ "contains": "x" })),
            ])
        );
        // A catch-all: no conditions, a fallback.
        assert!(when("service: shop.Orders\nmethod: Upload\ninputs: [{ equals: {} }]\noutput: {}\n").is_empty());
        // On a unary method, one entry is `input`.
        assert_eq!(
            when("service: shop.Orders\nmethod: Get\ninputs: [{ equals: { name: a } }]\noutput: {}\n"),
            pairs(&[("request.name", json!("a"))])
        );
    }

    #[test]
    fn a_bare_service_name_finds_the_service() {
        let doc = one("service: Orders\nmethod: get\noutput: {}\n");
        assert_eq!((doc["service"].clone(), doc["method"].clone()), (json!("shop.Orders"), json!("Get")));
        // Unknown names pass through for `rules.rs` to report.
        let doc = one("service: Nope\nmethod: Get\noutput: {}\n");
        assert_eq!(doc["service"], json!("Nope"));
    }

    #[test]
    fn unsupported_features_are_named() {
        let stub = |body: &str| format!("service: shop.Orders\nmethod: Get\n{body}\noutput: {{ data: {{}} }}\n");
        let cases = [
            (stub("input: { equals: { tags: [a, b] } }"), "3:26: GripMock `equals` on the list `request.tags` compares it in order, which is not supported"),
            (stub("input: { ignoreArrayOrder: true, equals: { tags: [a, a] } }"), "3:54: GripMock compares lists as multisets: `a` appears twice in `request.tags`, which is not supported"),
            (stub("input: { matches: { qty: \"^1\" } }"), "3:26: GripMock `matches` on `request.qty` (a pattern over a number's decimal text) is not supported"),
            (stub("input: { matches: { tags: [a] } }"), "3:27: GripMock `matches` on a list (`request.tags`) is not supported"),
            (stub("input: { equals: { labels: { a: b } } }"), "3:28: GripMock `equals` on the map `request.labels` compares it whole (these keys and no others), which is not supported"),
            (stub("input: { equals: { user: { id: u } } }"), "3:20: GripMock `equals` compares the object `request.user` whole, so without `name` of `shop.User` this stub never matches"),
            (stub("effects: [{ action: delete, id: x }]"), "3:1: GripMock `effects` are not supported"),
            (stub("input: { equals: { name: \"{{ .Request.name }}\" } }"), "3:26: GripMock templates (`{{ ... }}`) are not supported"),
            (stub("input: { anyOf: [{ equals: { name: a } }, { equals: { name: b } }] }\noptions: { times: 1 }"), "4:12: GripMock `options.times` with `anyOf` is not supported"),
            ("service: shop.Orders\nmethod: Upload\ninputs: [{ equals: { name: a } }]\noutput: {}\n".into(), "3:1: GripMock `inputs` with one entry (a pattern every message must match) is not supported"),
            ("service: shop.Orders\nmethod: Upload\ninput: { equals: { name: a } }\noutput: {}\n".into(), "3:1: GripMock `input` on client-streaming method `shop.Orders.Upload` (matched by any one of the messages) is not supported"),
            ("service: shop.Orders\nmethod: Chat\noutput: {}\n".into(), "2:9: GripMock bidirectional streaming stubs are not supported (`shop.Orders.Chat`)"),
            ("service: shop.Orders\nmethod: Watch\noutput: { stream: [{ _gripmock: { delay: 1s } }] }\n".into(), "3:35: GripMock per-message `_gripmock.delay` is not supported"),
            ("service: shop.Orders\nmethod: Get\noutput: { delay: 100us }\n".into(), "3:18: GripMock delay `100us` is not a whole number of milliseconds, which is not supported"),
        ];
        for (text, want) in cases {
            assert_eq!(errors(&text), vec![want.to_string()], "{text}");
        }
    }

    #[test]
    fn malformed_stubs_are_reported_where_they_are() {
        let cases = [
            (
                "service: shop.Orders\nmethod: Get\ninput: { equal: { name: a } }\noutput: {}\n",
                "3:10: unknown key `equal` in `input`",
            ),
            (
                "service: shop.Orders\nmethod: Get\noutput: { code: NOTFOUND }\n",
                "3:17: `NOTFOUND` is not a gRPC status code",
            ),
            ("service: shop.Orders\nmethod: Get\noutput: { code: 17 }\n", "3:17: `17` is not a gRPC status code"),
            (
                "service: shop.Orders\nmethod: Get\noutput: { delay: soon }\n",
                "3:18: invalid GripMock delay: `soon` is not a duration",
            ),
            (
                "service: shop.Orders\nmethod: Get\ninput: { equals: [a] }\noutput: {}\n",
                "3:18: `equals` must be a mapping, found a list",
            ),
            ("service: shop.Orders\nmethod: Get\ninput: {}\n", "1:1: a GripMock stub needs `output`"),
            ("method: Get\noutput: {}\n", "1:9: a GripMock stub needs `service` and `method`"),
            (
                "service: shop.Orders\nmethod: Get\noutputs: {}\ninput: {}\n",
                "3:1: unknown key `outputs` in GripMock stub",
            ),
            (
                "service: shop.Orders\nmethod: Get\noutput: { details: [{ reason: x }] }\n",
                "3:21: a GripMock detail needs `type`, its type URL",
            ),
            (
                "service: shop.Orders\nmethod: Get\ninput: { glob: { name: \"[a\" } }\noutput: {}\n",
                "3:24: invalid GripMock glob `[a`: a `[` is not closed",
            ),
            (
                "- service: shop.Orders\n  method: Get\n  output: {}\n- 3\n",
                "4:3: expected a GripMock stub in this list of stubs, found a number",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(errors(text), vec![want.to_string()], "{text}");
        }
    }

    #[test]
    fn globs_follow_go_path_match() {
        assert_eq!(glob_to_regex("a*b?.txt").unwrap(), "^a[^/]*b[^/]\\.txt$");
        assert_eq!(glob_to_regex("[^a-c]\\*").unwrap(), "^[^\\x{61}-\\x{63}]\\*$");
        assert!(glob_to_regex("[]").is_err());
        assert!(glob_to_regex("a\\").is_err());
        assert!(glob_to_regex("[z-a]").is_err());
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration_ns("1h2m3.5s"), Ok(3_723_500_000_000));
        assert_eq!(go_duration_ns("250ms"), Ok(250_000_000));
        assert_eq!(go_duration_ns("1.5µs"), Ok(1_500));
        assert_eq!(go_duration_ns("0"), Ok(0));
        assert_eq!(go_duration_ns("-2s"), Ok(-2_000_000_000));
        assert!(go_duration_ns("").is_err());
        assert!(go_duration_ns("5").is_err());
        assert!(go_duration_ns(".s").is_err());
        assert!(go_duration_ns("3x").is_err());
    }

    /// Compiles stub files against the test schema with the whole compiler.
    fn compile(files: &[(&str, &str)]) -> Result<crate::Output, Diagnostics> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("wirestub-gripmock-{}-{n}", std::process::id()));
        let (protos, rules) = (dir.join("protos"), dir.join("rules"));
        std::fs::create_dir_all(&protos).unwrap();
        std::fs::create_dir_all(&rules).unwrap();
        std::fs::write(protos.join("shop.proto"), PROTO).unwrap();
        for (name, text) in files {
            std::fs::write(rules.join(name), text).unwrap();
        }
        let result = crate::compile(&crate::Options {
            protos: vec![protos],
            rules: vec![rules],
            protos_only: Vec::new(),
            lenient: false,
        });
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    #[test]
    fn stubs_compile_into_rules() {
        let out = compile(&[
            (
                "stubs.yaml",
                "- service: Orders\n  method: Get\n  input: { equals: { name: a }, matches: { state: OPEN } }\n  output: { data: { message: A } }\n\
                 - service: Orders\n  method: Get\n  output: { error: nope, code: 5 }\n\
                 - service: Orders\n  method: Watch\n  output: { stream: [{ message: x }, { message: y }], delay: 10ms }\n",
            ),
            (
                "upload.json",
                r#"{"service": "shop.Orders", "method": "Upload", "inputs": [{"equals": {"name": "a"}}, {"contains": {"tags": ["t"]}}], "output": {"data": {"code": 2}}}"#,
            ),
        ])
        .unwrap_or_else(|d| panic!("{}", d.render()));
        let rules = |path: &str| out.plan.methods.iter().find(|m| m.path == path).map(|m| m.rules.len()).unwrap();
        assert_eq!(rules("/shop.Orders/Get"), 2);
        assert_eq!(rules("/shop.Orders/Watch"), 1);
        assert_eq!(rules("/shop.Orders/Upload"), 1);
        let get = out.plan.methods.iter().find(|m| m.path == "/shop.Orders/Get").unwrap();
        // The stub with conditions first, the catch-all as the fallback.
        assert!(get.rules[0].origin.ends_with("stubs.yaml:1:3"), "{}", get.rules[0].origin);
        assert!(get.rules[1].origin.ends_with("stubs.yaml:5:3"), "{}", get.rules[1].origin);
        assert_eq!(get.responses[get.rules[1].response as usize].status, 5);
        let watch = out.plan.methods.iter().find(|m| m.path == "/shop.Orders/Watch").unwrap();
        let r = &watch.responses[0];
        assert_eq!((r.stream.len(), r.delay_ms, r.stream_delay_ms), (2, 10, 10));
    }

    #[test]
    fn checks_after_translation_point_at_the_stub() {
        let err = compile(&[(
            "stubs.yaml",
            "service: shop.Orders\nmethod: Get\ninput:\n  equals:\n    nme: a\noutput: { data: { mesage: x } }\n",
        )])
        .err()
        .expect("fails");
        let text = err.render();
        assert!(text.contains("unknown field `nme` in message `shop.Req`"), "{text}");
        assert!(text.contains("stubs.yaml:5:5"), "{text}");
        assert!(text.contains("stubs.yaml:6:19"), "{text}");
    }
}
