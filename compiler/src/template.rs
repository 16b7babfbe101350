//! Templates: Wishmock's `{{ ... }}` in response bodies and stream items,
//! lowered into plan templates: encoded pieces around holes, so the engine
//! only fills the holes and writes length prefixes.
//!
//! Expressions: `request.<path>` (in a client stream: `request.first.<path>`,
//! `request.last.<path>`, `request.items.<N>.<path>`, `request.count`),
//! `metadata.<key>`, `stream.index`, `stream.total`, `stream.isFirst`,
//! `stream.isLast` (in stream items), `utils.now()`, `utils.uuid()`,
//! `utils.random(a, b)`, `utils.format("%s-%s", x, y)`, `utils.bytes(n)`
//! and `utils.bytes(n, "pattern")` (a payload sized from the request), number and string
//! literals, and `+ - * /` on numbers. A template can fill a string or bytes
//! field, or a number, bool or enum field when the whole rendered text reads
//! as one. An enum field renders as its value's name in text (a number in
//! arithmetic and in numeric fields).

use crate::conditions::{Cx, Target};
use crate::diag::{Diagnostic, Span};
use crate::paths::CondSource;
use crate::values::{self, find_field, kind_name};
use crate::yaml::{Node, NodeKind};
use prost::Message as _;
use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};
use wirestub_plan::{self as plan, Expr, Part, Piece, Shape};

/// How deep template expressions may nest (`+ - * /` and function calls
/// each add a level): the plan loader's own limit (`MAX_TEST_DEPTH` in
/// `plan/src/codec.rs`, not exported), checked here so that a compiled plan
/// always loads and parsing never recurses further than this.
pub const MAX_EXPR_DEPTH: usize = 32;

/// How deep messages holding templates may nest in a body or stream item:
/// the plan loader's limit for template pieces (twice its test depth).
pub const MAX_PIECES_DEPTH: usize = 2 * MAX_EXPR_DEPTH;

/// How deep template pieces nest: 0 when no message holds another.
pub fn pieces_depth(pieces: &[Piece]) -> usize {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Nested { pieces, .. } => 1 + pieces_depth(pieces),
            _ => 0,
        })
        .max()
        .unwrap_or(0)
}

/// How deep an expression nests: 0 for a name or a literal.
fn expr_depth(e: &Expr) -> usize {
    match e {
        Expr::Arith(l, _, r) => 1 + expr_depth(l).max(expr_depth(r)),
        Expr::Format(_, args) => 1 + args.iter().map(expr_depth).max().unwrap_or(0),
        Expr::Fill(n, _) => 1 + expr_depth(n),
        _ => 0,
    }
}

/// Whether a node holds a template anywhere.
pub fn has_template(node: &Node) -> bool {
    match &node.kind {
        NodeKind::Scalar { text, .. } => text.contains("{{"),
        NodeKind::Seq(items) => items.iter().any(has_template),
        NodeKind::Map(entries) => entries.iter().any(|(_, v)| has_template(v)),
        NodeKind::Null => false,
    }
}

/// Where the template is, which decides what `stream.*` and `request.*` mean.
pub struct Scope {
    /// In `stream_items`: `stream.*` is known.
    pub stream: bool,
    /// The request is a client stream seen whole.
    pub aggregate: bool,
}

/// Compiles templates, collecting what their expressions read. `Expr::Field`
/// indices refer to `refs` until lowering interns them per method.
pub struct Compiler<'a, 'c> {
    pub cx: &'a mut Cx<'c>,
    pub input: MessageDescriptor,
    pub refs: &'a mut Vec<CondSource>,
    pub scope: Scope,
    /// For the refs that read an enum field: its values' names, sorted by
    /// number, so text renders the name (`Expr::EnumName`).
    pub enums: Vec<(u32, EnumNames)>,
}

/// An enum's values as (number, name), sorted by number.
pub type EnumNames = Vec<(i32, Vec<u8>)>;

/// The enum type of the field `path` (as written after `request.`) names,
/// if it is an enum field or a map's enum value; words of the aggregate
/// view (`first`, `items.N`) are skipped.
fn enum_of(input: &MessageDescriptor, path: &str) -> Option<prost_reflect::EnumDescriptor> {
    let segments: Vec<&str> = path.split('.').collect();
    let mut desc = input.clone();
    for (n, seg) in segments.iter().enumerate() {
        let seg = seg.split('[').next().unwrap_or(seg);
        let Some(f) = find_field(&desc, seg) else { continue };
        let last = n + 1 == segments.len();
        if f.is_map() {
            let Kind::Message(entry) = f.kind() else { return None };
            return match entry.map_entry_value_field().kind() {
                Kind::Enum(e) if n + 2 == segments.len() => Some(e),
                _ => None,
            };
        }
        match f.kind() {
            Kind::Message(m) if !last => desc = m,
            Kind::Enum(e) if last && (!f.is_list() || segments[n].contains('[')) => return Some(e),
            _ => return None,
        }
    }
    None
}

/// Text parts with enum fields read as their names (not inside arithmetic,
/// which needs the number).
fn enum_names(parts: &mut [Part], enums: &[(u32, EnumNames)]) {
    fn expr(e: &mut Expr, enums: &[(u32, EnumNames)]) {
        match e {
            Expr::Field(i) => {
                if let Some((_, names)) = enums.iter().find(|(r, _)| r == i) {
                    *e = Expr::EnumName(*i, names.clone());
                }
            }
            Expr::Format(_, args) => args.iter_mut().for_each(|a| expr(a, enums)),
            _ => {}
        }
    }
    for p in parts {
        if let Part::Expr(e) = p {
            expr(e, enums);
        }
    }
}

fn key(number: u32, wire_type: u8) -> Vec<u8> {
    let mut v = ((number as u64) << 3) | wire_type as u64;
    let mut out = Vec::new();
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
    out
}

impl Compiler<'_, '_> {
    fn error(&mut self, span: &Span, msg: impl Into<String>, help: Option<&str>) {
        let mut d = Diagnostic::error(Some(span.clone()), msg);
        d.help = help.map(str::to_string);
        self.cx.diags.push(d);
    }

    /// Compiles a message node of type `desc` into pieces.
    pub fn message(&mut self, node: &Node, desc: &MessageDescriptor) -> Option<Vec<Piece>> {
        let Some(entries) = node.map() else {
            self.error(
                &node.span,
                format!("expected a mapping for message `{}`, found {}", desc.full_name(), node.describe()),
                None,
            );
            return None;
        };
        let mut pieces = Vec::new();
        let mut plain = Vec::new();
        let mut ok = true;
        for (k, v) in entries {
            if !has_template(v) {
                plain.push((k.clone(), v.clone()));
                continue;
            }
            let name = k.scalar().unwrap_or_default();
            let Some(field) = find_field(desc, name) else {
                // Reported by the plain reading below, with suggestions.
                plain.push((k.clone(), v.clone()));
                continue;
            };
            ok &= self.field(v, &field, desc, &mut pieces, k).is_some();
        }
        // Everything without a template is encoded once, here.
        let rest = Node { kind: NodeKind::Map(plain), span: node.span.clone() };
        let msg = values::read_message(&rest, desc, self.cx.diags)?;
        let bytes = crate::canonical::canonicalize(&msg.encode_to_vec(), desc);
        if !bytes.is_empty() {
            pieces.insert(0, Piece::Bytes(bytes));
        }
        ok.then_some(pieces)
    }

    fn field(
        &mut self,
        v: &Node,
        field: &FieldDescriptor,
        parent: &MessageDescriptor,
        pieces: &mut Vec<Piece>,
        k: &Node,
    ) -> Option<()> {
        if field.is_map() {
            self.error(
                &v.span,
                format!("templates in map field `{}` are not supported", field.name()),
                Some("use templates in message and repeated fields"),
            );
            return None;
        }
        if let Kind::Message(m) = field.kind() {
            if m.full_name().starts_with("google.protobuf.") {
                self.error(
                    &v.span,
                    format!("templates in well-known type `{}` are not supported", m.full_name()),
                    Some("write the value literally"),
                );
                return None;
            }
        }
        let items: Vec<&Node> = match (&v.kind, field.is_list()) {
            (NodeKind::Seq(items), true) => items.iter().collect(),
            (_, true) => {
                self.error(
                    &v.span,
                    format!("expected a list for repeated field `{}`, found {}", field.name(), v.describe()),
                    None,
                );
                return None;
            }
            _ => vec![v],
        };
        // Elements keep their order: each one is its own piece.
        for item in items {
            if has_template(item) {
                pieces.push(self.value(item, field)?);
                continue;
            }
            let one = Node { kind: NodeKind::Seq(vec![item.clone()]), span: item.span.clone() };
            let synthetic = Node { kind: NodeKind::Map(vec![(k.clone(), one)]), span: item.span.clone() };
            let msg = values::read_message(&synthetic, parent, self.cx.diags)?;
            pieces.push(Piece::Bytes(crate::canonical::canonicalize(&msg.encode_to_vec(), parent)));
        }
        Some(())
    }

    fn value(&mut self, node: &Node, field: &FieldDescriptor) -> Option<Piece> {
        match field.kind() {
            Kind::Message(m) => {
                let inner = self.message(node, &m)?;
                Some(Piece::Nested { key: key(field.number(), 2), pieces: inner })
            }
            kind => {
                let Some(text) = node.scalar() else {
                    self.error(
                        &node.span,
                        format!("field `{}`: expected {}, found {}", field.name(), kind_name(&kind), node.describe()),
                        None,
                    );
                    return None;
                };
                let mut parts = self.text(text, &node.span)?;
                Some(match kind {
                    Kind::String | Kind::Bytes => {
                        enum_names(&mut parts, &self.enums);
                        Piece::Text { key: key(field.number(), 2), parts }
                    }
                    k => {
                        let scalar = crate::paths::scalar_kind(&k);
                        Piece::Number { key: key(field.number(), scalar.wire_type()), kind: scalar, parts }
                    }
                })
            }
        }
    }

    /// A metadata value's text as parts, enum fields read as their names.
    pub fn text_value(&mut self, text: &str, span: &Span) -> Option<Vec<Part>> {
        let mut parts = self.text(text, span)?;
        enum_names(&mut parts, &self.enums);
        Some(parts)
    }

    /// Splits text into literal parts and `{{ expression }}` parts.
    pub fn text(&mut self, text: &str, span: &Span) -> Option<Vec<Part>> {
        let mut parts = Vec::new();
        let mut rest = text;
        let mut ok = true;
        while let Some(start) = rest.find("{{") {
            let Some(len) = rest[start + 2..].find("}}") else { break };
            if start > 0 {
                parts.push(Part::Lit(rest.as_bytes()[..start].to_vec()));
            }
            let source = rest[start + 2..start + 2 + len].trim();
            match self.expr(source, span) {
                Some(e) => parts.push(Part::Expr(e)),
                None => ok = false,
            }
            rest = &rest[start + 2 + len + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.as_bytes().to_vec()));
        }
        ok.then_some(parts)
    }

    fn expr(&mut self, source: &str, span: &Span) -> Option<Expr> {
        let tokens = match tokenize(source) {
            Ok(t) => t,
            Err(e) => {
                self.error(span, format!("in template `{{{{{source}}}}}`: {e}"), None);
                return None;
            }
        };
        let mut p = Parser { tokens, pos: 0, calls: 0 };
        let result = p.sum(self, span, source);
        match result {
            Some(e) if p.pos == p.tokens.len() => Some(e),
            Some(_) => {
                self.error(
                    span,
                    format!("in template `{{{{{source}}}}}`: unexpected `{}`", p.tokens[p.pos].text()),
                    None,
                );
                None
            }
            None => None,
        }
    }

    /// Resolves a name (`request.x`, `metadata.k`, `stream.index`, ...).
    fn name(&mut self, name: &str, span: &Span, source: &str) -> Option<Expr> {
        let bad = |c: &mut Self, msg: String, help: &str| {
            c.error(span, format!("in template `{{{{{source}}}}}`: {msg}"), Some(help));
            None
        };
        if let Some(path) = name.strip_prefix("request.") {
            let node = Node { kind: NodeKind::Scalar { text: path.to_string(), plain: true }, span: span.clone() };
            let target = if self.scope.aggregate {
                self.cx.aggregate_target(&self.input, path, &node)?
            } else {
                self.cx.field_target(&self.input, path, &node)?
            };
            let Target::Field { path: fp, message, .. } = target else { return None };
            if message || fp.is_multi() {
                return bad(
                    self,
                    format!("`{name}` is not a single value"),
                    "templates read singular fields, elements (`items[0].x`), map entries and oneof cases; aggregate many values with count(), sum(), min() or max()",
                );
            }
            let is_enum =
                fp.kind == plan::ScalarKind::Enum && matches!(fp.shape, Shape::Singular | Shape::MapValue { .. });
            self.refs.push(CondSource::Field(fp));
            let index = self.refs.len() as u32 - 1;
            if let Some(e) = enum_of(&self.input, path).filter(|_| is_enum) {
                let mut names: Vec<(i32, Vec<u8>)> =
                    e.values().map(|v| (v.number(), v.name().as_bytes().to_vec())).collect();
                names.sort_by_key(|(n, _)| *n);
                // An alias (allow_alias) renders as the first name.
                names.dedup_by_key(|(n, _)| *n);
                self.enums.push((index, names));
            }
            return Some(Expr::Field(index));
        }
        if let Some(key) = name.strip_prefix("metadata.") {
            let key = key.to_ascii_lowercase();
            if !plan::is_valid_metadata_key(&key) {
                return bad(
                    self,
                    format!("`{key}` is not a valid metadata key"),
                    "keys are letters, digits, `-`, `_` and `.`",
                );
            }
            self.refs.push(CondSource::Metadata(key));
            return Some(Expr::Field(self.refs.len() as u32 - 1));
        }
        if let Some(what) = name.strip_prefix("stream.") {
            if !self.scope.stream {
                return bad(
                    self,
                    format!("`{name}` is only known in `stream_items`"),
                    "use it in stream items, where each item has an index",
                );
            }
            return match what {
                "index" => Some(Expr::StreamIndex),
                "total" => Some(Expr::StreamTotal),
                "isFirst" => Some(Expr::StreamIsFirst),
                "isLast" => Some(Expr::StreamIsLast),
                _ => bad(self, format!("unknown `{name}`"), "stream has index, total, isFirst and isLast"),
            };
        }
        bad(self, format!("unknown name `{name}`"), "names start with request., metadata., stream. or utils.")
    }

    /// Resolves `count(path)`, `sum(path)`, `min(path)` or `max(path)`:
    /// the path must read many values (a repeated field, a path through
    /// `[*]` or `[all]`, or `items[*]` of a client stream), numbers for all
    /// but `count`.
    fn aggregate(&mut self, agg: plan::Agg, arg: &str, span: &Span, source: &str) -> Option<Expr> {
        let bad = |c: &mut Self, msg: String| {
            let help = "e.g. count(request.items), sum(request.items[*].size), max(request.scores); in a client stream, sum(request.items[*].size) adds a field of every message";
            c.error(span, format!("in template `{{{{{source}}}}}`: {msg}"), Some(help));
            None
        };
        let Some(path) = arg.strip_prefix("request.") else {
            return bad(self, format!("`{}` takes a request path, not `{arg}`", agg.name()));
        };
        let node = Node { kind: NodeKind::Scalar { text: path.to_string(), plain: true }, span: span.clone() };
        let target = if self.scope.aggregate {
            self.cx.aggregate_target(&self.input, path, &node)?
        } else {
            self.cx.field_target(&self.input, path, &node)?
        };
        let Target::Field { path: fp, .. } = target else { return None };
        if !fp.is_multi() {
            return bad(self, format!("`{arg}` is a single value, not a list to {}", agg.name()));
        }
        let numeric =
            matches!(fp.kind.value_class(), plan::ValueClass::I64 | plan::ValueClass::U64 | plan::ValueClass::F64);
        if agg != plan::Agg::Count && !numeric {
            return bad(self, format!("`{}` needs numbers; `{arg}` is {}", agg.name(), fp.kind.name()));
        }
        self.refs.push(CondSource::Field(fp));
        Some(Expr::Aggregate(self.refs.len() as u32 - 1, agg))
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Num(f64),
    Str(String),
    Name(String),
    Op(u8),
    Open,
    Close,
    Comma,
}

impl Token {
    fn text(&self) -> String {
        match self {
            Token::Num(n) => n.to_string(),
            Token::Str(s) => format!("{s:?}"),
            Token::Name(n) => n.clone(),
            Token::Op(o) => (*o as char).to_string(),
            Token::Open => "(".into(),
            Token::Close => ")".into(),
            Token::Comma => ",".into(),
        }
    }
}

fn tokenize(s: &str) -> Result<Vec<Token>, String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' => i += 1,
            b'(' => {
                out.push(Token::Open);
                i += 1
            }
            b')' => {
                out.push(Token::Close);
                i += 1
            }
            b',' => {
                out.push(Token::Comma);
                i += 1
            }
            b'+' | b'-' | b'*' | b'/' => {
                out.push(Token::Op(c));
                i += 1
            }
            b'"' | b'\'' => {
                let end = s[i + 1..].find(c as char).ok_or("unterminated string")?;
                out.push(Token::Str(s[i + 1..i + 1 + end].to_string()));
                i += end + 2;
            }
            b'0'..=b'9' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                    i += 1;
                }
                out.push(Token::Num(s[start..i].parse().map_err(|_| format!("bad number `{}`", &s[start..i]))?));
            }
            _ if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'_' | b'.' | b'-' | b'[')) {
                    // A `-` belongs to a name only inside metadata keys.
                    if b[i] == b'-' && !s[start..i].starts_with("metadata.") {
                        break;
                    }
                    // `items[0]`, `items[-1]`, `items[*]`: the brackets
                    // belong to the name.
                    if b[i] == b'[' {
                        let close = s[i..].find(']').ok_or("unclosed `[`")?;
                        i += close;
                    }
                    i += 1;
                }
                out.push(Token::Name(s[start..i].to_string()));
            }
            _ => return Err(format!("unexpected character `{}`", c as char)),
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    /// Function calls open around the current position.
    calls: usize,
}

/// Refuses an expression nested deeper than the plan allows; checked as
/// each operator or call is built, so no deeper tree is ever made.
fn within_depth(e: Expr, c: &mut Compiler, span: &Span, src: &str) -> Option<Expr> {
    if expr_depth(&e) > MAX_EXPR_DEPTH {
        c.error(span, format!("in template `{{{{{src}}}}}`: expression nested more than {MAX_EXPR_DEPTH} deep"), None);
        return None;
    }
    Some(e)
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn sum(&mut self, c: &mut Compiler, span: &Span, src: &str) -> Option<Expr> {
        let mut left = self.product(c, span, src)?;
        while let Some(Token::Op(op @ (b'+' | b'-'))) = self.peek().cloned() {
            self.pos += 1;
            let right = self.product(c, span, src)?;
            left = within_depth(Expr::Arith(Box::new(left), op, Box::new(right)), c, span, src)?;
        }
        Some(left)
    }

    fn product(&mut self, c: &mut Compiler, span: &Span, src: &str) -> Option<Expr> {
        let mut left = self.atom(c, span, src)?;
        while let Some(Token::Op(op @ (b'*' | b'/'))) = self.peek().cloned() {
            self.pos += 1;
            let right = self.atom(c, span, src)?;
            left = within_depth(Expr::Arith(Box::new(left), op, Box::new(right)), c, span, src)?;
        }
        Some(left)
    }

    fn atom(&mut self, c: &mut Compiler, span: &Span, src: &str) -> Option<Expr> {
        let fail = |c: &mut Compiler, msg: String| {
            c.error(span, format!("in template `{{{{{src}}}}}`: {msg}"), None);
            None
        };
        let token = self.peek().cloned();
        self.pos += 1;
        match token {
            Some(Token::Num(n)) => Some(Expr::Number(n)),
            Some(Token::Op(b'-')) => match self.peek().cloned() {
                Some(Token::Num(n)) => {
                    self.pos += 1;
                    Some(Expr::Number(-n))
                }
                _ => fail(c, "`-` goes before a number".into()),
            },
            Some(Token::Str(s)) => Some(Expr::Str(s.into_bytes())),
            Some(Token::Name(name)) if self.peek() == Some(&Token::Open) && aggregate_of(&name).is_some() => {
                let agg = aggregate_of(&name)?;
                match (self.tokens.get(self.pos + 1).cloned(), self.tokens.get(self.pos + 2)) {
                    (Some(Token::Name(arg)), Some(Token::Close)) => {
                        self.pos += 3;
                        c.aggregate(agg, &arg, span, src)
                    }
                    _ => fail(c, format!("`{name}` takes one request path, e.g. {name}(request.items[*].size)")),
                }
            }
            Some(Token::Name(name)) if self.peek() == Some(&Token::Open) => {
                self.pos += 1;
                if self.calls >= MAX_EXPR_DEPTH {
                    return fail(c, format!("expression nested more than {MAX_EXPR_DEPTH} deep"));
                }
                self.calls += 1;
                let mut args = Vec::new();
                if self.peek() != Some(&Token::Close) {
                    loop {
                        args.push(self.sum(c, span, src)?);
                        match self.peek() {
                            Some(Token::Comma) => self.pos += 1,
                            Some(Token::Close) => break,
                            _ => return fail(c, format!("expected `,` or `)` in the arguments of `{name}`")),
                        }
                    }
                }
                self.calls -= 1;
                self.pos += 1;
                within_depth(call(c, &name, args, span, src)?, c, span, src)
            }
            Some(Token::Name(name)) => c.name(&name, span, src),
            Some(t) => fail(c, format!("unexpected `{}`", t.text())),
            None => fail(c, "empty expression".into()),
        }
    }
}

/// The aggregate a function name calls for, if it is one (`utils.` is
/// optional).
fn aggregate_of(name: &str) -> Option<plan::Agg> {
    Some(match name.strip_prefix("utils.").unwrap_or(name) {
        "count" => plan::Agg::Count,
        "sum" => plan::Agg::Sum,
        "min" => plan::Agg::Min,
        "max" => plan::Agg::Max,
        _ => return None,
    })
}

fn call(c: &mut Compiler, name: &str, args: Vec<Expr>, span: &Span, src: &str) -> Option<Expr> {
    let fail = |c: &mut Compiler, msg: String, help: &str| {
        c.error(span, format!("in template `{{{{{src}}}}}`: {msg}"), Some(help));
        None
    };
    match (name, args.as_slice()) {
        ("utils.now", []) => Some(Expr::Now),
        ("utils.uuid", []) => Some(Expr::Uuid),
        ("utils.random", []) => Some(Expr::RandomFloat(0.0, 1.0)),
        ("utils.random", [Expr::Number(a), Expr::Number(b)]) if a <= b => {
            if a.fract() == 0.0 && b.fract() == 0.0 {
                Some(Expr::RandomInt(*a as i64, *b as i64))
            } else {
                Some(Expr::RandomFloat(*a, *b))
            }
        }
        ("utils.random", _) => fail(
            c,
            "`utils.random` takes two numbers, low then high".into(),
            "e.g. utils.random(1, 100): an integer from 1 to 100",
        ),
        ("utils.bytes", [n]) if !matches!(n, Expr::Str(_)) => Some(Expr::Fill(Box::new(n.clone()), vec![0])),
        ("utils.bytes", [n, Expr::Str(p)]) if !matches!(n, Expr::Str(_)) && !p.is_empty() => {
            Some(Expr::Fill(Box::new(n.clone()), p.clone()))
        }
        ("utils.bytes", _) => fail(
            c,
            "`utils.bytes` takes a length, then optionally a non-empty pattern".into(),
            "e.g. utils.bytes(request.size) (zero bytes) or utils.bytes(request.size, \"ab\")",
        ),
        ("utils.format", [Expr::Str(f), rest @ ..]) => Some(Expr::Format(f.clone(), rest.to_vec())),
        ("utils.format", _) => fail(
            c,
            "`utils.format` takes a format string first".into(),
            "e.g. utils.format(\"%s-%s\", request.a, request.b)",
        ),
        _ => fail(
            c,
            format!("unknown function `{name}`"),
            "functions are utils.now(), utils.uuid(), utils.random(a, b), utils.format(text, ...), utils.bytes(n), and count, sum, min and max of a list",
        ),
    }
}
