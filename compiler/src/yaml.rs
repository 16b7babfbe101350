//! Reads YAML and JSON rule files into a tree whose every node knows its line
//! and column, so that every later check can point at the exact place.
//!
//! Built on yaml-rust2's event parser (see ARCHITECTURE.md for why). JSON is
//! read by the same parser: JSON documents are YAML flow documents.
//!
//! The tree is built from the parser's events in a loop of ours (not the
//! parser's recursive `load`), under two limits that no honest file comes
//! near, so that a small hostile file cannot take the compiler's memory,
//! time or stack:
//!
//! - **Expansion** ([`Budget`]): an alias is a full copy of its anchor, so
//!   nested anchors grow exponentially ("billion laughs": 400 bytes would be
//!   hundreds of millions of nodes). Every node built counts, copies made
//!   for aliases and anchors included, and a copy that would take the total
//!   past the budget stops the reading with an error at that alias, before
//!   anything is copied.
//! - **Nesting** ([`MAX_DEPTH`]): lists and mappings nest at most that deep,
//!   aliases included, so every later pass can recurse over the tree.

use crate::diag::{Diagnostic, SourceFile, Span};
use std::collections::HashMap;
use std::sync::Arc;
use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// How deep lists and mappings may nest, counting the document's own top
/// level, aliases expanded. 128 is serde_json's default recursion limit, so
/// every JSON document serde_json reads is accepted; rule files nest a
/// handful of levels plus their messages' depth, and protobuf decoders
/// themselves refuse messages nested more than 100 deep. It keeps the
/// recursive passes over the tree (checking, conversion to JSON, dropping)
/// far from the end of a 2 MiB thread stack.
pub const MAX_DEPTH: usize = 128;

/// The expansion allowance never goes below this many units (see
/// [`Budget`]), whatever the input's size: a 1,000,000-unit tree is at most
/// some 60 MB, and no hand-written rule file reuses anchors on this scale.
pub const EXPANSION_FLOOR: u64 = 1_000_000;

/// Units allowed per byte of input, for large inputs. A file without
/// aliases costs at most about 2.5 units a byte (at most about 1.5 nodes a
/// byte plus its text), so this leaves generated files a threefold reuse of
/// anchors on top of everything they spell out, while a hostile file can
/// only make the compiler build eight times what its size allows.
pub const EXPANSION_PER_BYTE: u64 = 8;

/// The expansion allowance of one compilation, shared by all the files it
/// reads, so many small files cannot each take the floor.
///
/// Units: one per node built plus the length in bytes of every scalar's
/// text, counting the copies aliases and anchors make. The allowance is
/// [`EXPANSION_PER_BYTE`] times the bytes read so far, at least
/// [`EXPANSION_FLOOR`]. Memory and time spent reading are proportional to
/// the units used, so both are bounded by the input's size.
#[derive(Debug, Default)]
pub struct Budget {
    input: u64,
    used: u64,
}

impl Budget {
    pub fn new() -> Self {
        Budget::default()
    }

    /// The current allowance in units.
    pub fn limit(&self) -> u64 {
        self.input.saturating_mul(EXPANSION_PER_BYTE).max(EXPANSION_FLOOR)
    }

    /// Units used so far.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Takes `cost` units if they fit in the allowance.
    fn take(&mut self, cost: u64) -> bool {
        match self.used.checked_add(cost) {
            Some(total) if total <= self.limit() => {
                self.used = total;
                true
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub kind: NodeKind,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// `~`, `null`, or nothing at all.
    Null,
    /// A scalar with its text; `plain` is false for quoted and block
    /// scalars, which are always strings.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    /// Keys in file order; duplicates are rejected while reading.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// The text of a scalar, or None for other nodes.
    pub fn scalar(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.kind, NodeKind::Null)
    }

    /// The entries of a mapping, or None.
    pub fn map(&self) -> Option<&[(Node, Node)]> {
        match &self.kind {
            NodeKind::Map(m) => Some(m),
            _ => None,
        }
    }

    /// A word for the kind of node, for "expected X, found Y" messages.
    pub fn describe(&self) -> &'static str {
        match &self.kind {
            NodeKind::Null => "null",
            NodeKind::Scalar { plain: false, .. } => "a string",
            NodeKind::Scalar { text, plain: true } => match plain_type(text) {
                PlainType::Bool(_) => "a boolean",
                PlainType::Int | PlainType::Float => "a number",
                PlainType::Str => "a string",
            },
            NodeKind::Seq(_) => "a list",
            NodeKind::Map(_) => "a mapping",
        }
    }

    /// Converts to JSON following the YAML 1.2 core schema for plain scalars.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.kind {
            NodeKind::Null => J::Null,
            NodeKind::Scalar { text, plain: false } => J::String(text.clone()),
            NodeKind::Scalar { text, plain: true } => match plain_type(text) {
                PlainType::Bool(b) => J::Bool(b),
                PlainType::Int => text
                    .parse::<i64>()
                    .map(J::from)
                    .or_else(|_| text.parse::<u64>().map(J::from))
                    .unwrap_or_else(|_| J::String(text.clone())),
                PlainType::Float => serde_json::Number::from_f64(text.parse::<f64>().unwrap_or(f64::NAN))
                    .map(J::Number)
                    .unwrap_or_else(|| J::String(text.clone())),
                PlainType::Str => J::String(text.clone()),
            },
            NodeKind::Seq(items) => J::Array(items.iter().map(Node::to_json).collect()),
            NodeKind::Map(entries) => J::Object(
                entries.iter().map(|(k, v)| (k.scalar().unwrap_or_default().to_string(), v.to_json())).collect(),
            ),
        }
    }
}

/// How a plain scalar reads under the YAML 1.2 core schema.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PlainType {
    Bool(bool),
    Int,
    Float,
    Str,
}

pub fn plain_type(text: &str) -> PlainType {
    match text {
        "true" | "True" | "TRUE" => return PlainType::Bool(true),
        "false" | "False" | "FALSE" => return PlainType::Bool(false),
        _ => {}
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return PlainType::Int;
    }
    if text.parse::<f64>().is_ok() && text.bytes().any(|b| b.is_ascii_digit()) {
        return PlainType::Float;
    }
    PlainType::Str
}

/// Parses every document of a file on its own allowance (see [`Budget`]). A
/// syntax error or a passed limit is one diagnostic.
pub fn parse(file: &Arc<SourceFile>) -> Result<Vec<Node>, Diagnostic> {
    parse_with(file, &mut Budget::new())
}

/// Parses every document of a file, taking what it builds from `budget`,
/// which grows by the file's size first.
pub fn parse_with(file: &Arc<SourceFile>, budget: &mut Budget) -> Result<Vec<Node>, Diagnostic> {
    budget.input = budget.input.saturating_add(file.text.len() as u64);
    let mut builder = Builder {
        file: file.clone(),
        budget,
        stack: Vec::new(),
        docs: Vec::new(),
        anchors: HashMap::new(),
        error: None,
        fatal: None,
    };
    let mut parser = Parser::new_from_str(&file.text);
    loop {
        let (ev, mark) = match parser.next_token() {
            Ok(next) => next,
            Err(e) => {
                let m = e.marker();
                let span = Span { file: file.clone(), line: m.line() as u32, col: m.col() as u32 + 1, len: 1 };
                return Err(Diagnostic::error(Some(span), format!("syntax error: {}", e.info())));
            }
        };
        if ev == Event::StreamEnd {
            break;
        }
        builder.on_event(ev, mark);
        if let Some(d) = builder.fatal.take() {
            return Err(d);
        }
    }
    if let Some(e) = builder.error {
        return Err(e);
    }
    Ok(builder.docs)
}

/// A collection being read: the node so far, its anchor (0 for none), the
/// units it holds and its height (1 for a collection of scalars).
struct Open {
    node: Node,
    anchor: usize,
    cost: u64,
    height: usize,
    /// In a mapping: the key read, waiting for its value.
    key: Option<Node>,
}

/// An anchored node, kept for its aliases with what a copy costs.
struct Anchored {
    node: Node,
    cost: u64,
    height: usize,
}

struct Builder<'b> {
    file: Arc<SourceFile>,
    budget: &'b mut Budget,
    stack: Vec<Open>,
    docs: Vec<Node>,
    /// By the parser's anchor id; cleared at each document's start, as
    /// anchors do not cross documents.
    anchors: HashMap<usize, Anchored>,
    /// The first mistake found; reading goes on, so a syntax error later in
    /// the file is reported instead.
    error: Option<Diagnostic>,
    /// A passed limit: reading stops at once.
    fatal: Option<Diagnostic>,
}

impl Builder<'_> {
    fn span(&self, m: Marker, len: usize) -> Span {
        Span { file: self.file.clone(), line: m.line() as u32, col: m.col() as u32 + 1, len: len.max(1) as u32 }
    }

    /// The length of the alias (`*name`) at `m`, for underlining.
    fn alias_len(&self, m: Marker) -> usize {
        let line = self.file.text.lines().nth(m.line().saturating_sub(1)).unwrap_or_default();
        line.chars().skip(m.col()).take_while(|c| !c.is_whitespace() && !",[]{}".contains(*c)).count()
    }

    fn expansion_error(&self, span: Span, what: &str) -> Diagnostic {
        Diagnostic::error(
            Some(span),
            format!("{what} goes past the limit of {} YAML nodes and text bytes", self.budget.limit()),
        )
        .with_help(format!(
            "every alias is a full copy of its anchor; the limit is {EXPANSION_PER_BYTE} per byte of input, \
             at least {EXPANSION_FLOOR}"
        ))
    }

    fn depth_error(&self, span: Span) -> Diagnostic {
        Diagnostic::error(Some(span), format!("lists and mappings nested more than {MAX_DEPTH} deep"))
    }

    /// Opens a collection unless it would nest too deep.
    fn open(&mut self, kind: NodeKind, anchor: usize, mark: Marker) {
        let span = self.span(mark, 1);
        if self.stack.len() >= MAX_DEPTH {
            self.fatal = Some(self.depth_error(span));
            return;
        }
        self.budget.used = self.budget.used.saturating_add(1);
        self.stack.push(Open { node: Node { kind, span }, anchor, cost: 1, height: 1, key: None });
    }

    /// Places a finished node (`cost` units, `height` levels of
    /// collections) in its parent, keeping a copy if it is anchored.
    fn finish(&mut self, node: Node, anchor: usize, cost: u64, height: usize) {
        if anchor > 0 {
            if !self.budget.take(cost) {
                self.fatal =
                    Some(self.expansion_error(node.span.clone(), "keeping this anchored node for its aliases"));
                return;
            }
            self.anchors.insert(anchor, Anchored { node: node.clone(), cost, height });
        }
        let Some(open) = self.stack.last_mut() else {
            self.docs.push(node);
            return;
        };
        open.cost = open.cost.saturating_add(cost);
        open.height = open.height.max(height + 1);
        match &mut open.node.kind {
            NodeKind::Seq(items) => items.push(node),
            NodeKind::Map(entries) => match open.key.take() {
                None => {
                    if !matches!(node.kind, NodeKind::Scalar { .. }) {
                        self.error.get_or_insert(Diagnostic::error(
                            Some(node.span.clone()),
                            "mapping keys must be plain strings",
                        ));
                    }
                    open.key = Some(node);
                }
                Some(key) => {
                    if let Some((first, _)) = entries.iter().find(|(k, _)| k.scalar() == key.scalar()) {
                        let d = Diagnostic::error(
                            Some(key.span.clone()),
                            format!("duplicate key `{}`", key.scalar().unwrap_or_default()),
                        )
                        .with_help(format!("first defined at line {}", first.span.line));
                        self.error.get_or_insert(d);
                    }
                    entries.push((key, node));
                }
            },
            _ => {}
        }
    }

    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let plain = style == TScalarStyle::Plain && tag.is_none();
                let len = text.chars().count() + if plain { 0 } else { 2 };
                let span = self.span(mark, len);
                let cost = 1 + text.len() as u64;
                self.budget.used = self.budget.used.saturating_add(cost);
                let kind = if plain && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL") {
                    NodeKind::Null
                } else {
                    NodeKind::Scalar { text, plain }
                };
                self.finish(Node { kind, span }, anchor, cost, 0);
            }
            Event::SequenceStart(anchor, _) => self.open(NodeKind::Seq(Vec::new()), anchor, mark),
            Event::MappingStart(anchor, _) => self.open(NodeKind::Map(Vec::new()), anchor, mark),
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(open) = self.stack.pop() {
                    self.finish(open.node, open.anchor, open.cost, open.height);
                }
            }
            Event::Alias(id) => {
                let span = self.span(mark, self.alias_len(mark));
                let Some(anchored) = self.anchors.get(&id) else {
                    // An anchor of an earlier document: the parser's own
                    // loader refuses those with this message.
                    self.fatal =
                        Some(Diagnostic::error(Some(span), "syntax error: while parsing node, found unknown anchor"));
                    return;
                };
                let (cost, height) = (anchored.cost, anchored.height);
                if self.stack.len() + height > MAX_DEPTH {
                    let help = "an alias nests as deep as everything its anchor holds";
                    self.fatal = Some(self.depth_error(span).with_help(help));
                    return;
                }
                if !self.budget.take(cost) {
                    self.fatal = Some(self.expansion_error(span, "expanding this alias"));
                    return;
                }
                let node = anchored.node.clone();
                self.finish(node, 0, cost, height);
            }
            Event::DocumentStart => self.anchors.clear(),
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse_str(s: &str) -> Result<Vec<Node>, Diagnostic> {
        parse(&SourceFile::new(Path::new("t.yaml"), s.to_string()))
    }

    #[test]
    fn spans_point_at_keys_and_values() {
        let docs = parse_str("a:\n  b: 12\n  c: \"x\"\n").unwrap();
        let top = docs[0].map().unwrap();
        let inner = top[0].1.map().unwrap();
        assert_eq!((inner[0].0.span.line, inner[0].0.span.col), (2, 3));
        assert_eq!((inner[0].1.span.line, inner[0].1.span.col), (2, 6));
        assert_eq!(inner[1].1.kind, NodeKind::Scalar { text: "x".into(), plain: false });
    }

    #[test]
    fn json_reads_as_yaml() {
        let docs = parse_str("{\"a\": [1, \"2\", null, true]}").unwrap();
        assert_eq!(docs[0].to_json(), serde_json::json!({"a": [1, "2", null, true]}));
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let err = parse_str("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert!(err.message.contains("duplicate key `a`"));
        assert_eq!(err.span.unwrap().line, 3);
    }

    #[test]
    fn syntax_errors_have_a_location() {
        let err = parse_str("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.message.starts_with("syntax error"), "{}", err.message);
        assert!(err.span.is_some());
    }

    #[test]
    fn several_documents() {
        assert_eq!(parse_str("a: 1\n---\nb: 2\n").unwrap().len(), 2);
    }

    /// Nine levels of nine aliases each: 9^9 scalars if expanded.
    fn bomb() -> String {
        let mut s = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
        for (prev, name) in "abcdefgh".chars().zip("bcdefghi".chars()) {
            s.push_str(&format!("{name}: &{name} [{}]\n", vec![format!("*{prev}"); 9].join(", ")));
        }
        s
    }

    #[test]
    fn aliases_are_copies_of_their_anchor() {
        let docs = parse_str("a: &a { x: [1, 2] }\nb: *a\n").unwrap();
        let top = docs[0].map().unwrap();
        assert_eq!(top[1].1.to_json(), serde_json::json!({"x": [1, 2]}));
        // The copy keeps the anchored node's position.
        assert_eq!(top[1].1.span.line, 1);
    }

    #[test]
    fn an_alias_bomb_stops_at_the_alias_that_passes_the_budget() {
        let err = parse_str(&bomb()).unwrap_err();
        assert_eq!(err.message, "expanding this alias goes past the limit of 1000000 YAML nodes and text bytes");
        let span = err.span.unwrap();
        // The sixth `*e` of `f`: 9^5 scalars per copy.
        assert_eq!((span.line, span.col, span.len), (6, 28, 2));
    }

    #[test]
    fn the_budget_is_shared_by_the_files_of_a_compilation() {
        // Each file alone fits (about 310,000 units); four do not.
        let file = format!(
            "a: &a [{}]\n\
             b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n\
             c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n\
             d: [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
            "x".repeat(250)
        );
        let source = SourceFile::new(Path::new("t.yaml"), file);
        assert!(parse(&source).is_ok());
        let mut budget = Budget::new();
        let results: Vec<bool> = (0..4).map(|_| parse_with(&source, &mut budget).is_ok()).collect();
        assert_eq!(results, [true, true, true, false]);
        assert!(budget.used() <= budget.limit());
    }

    #[test]
    fn large_inputs_get_a_proportional_budget() {
        let mut budget = Budget::new();
        assert_eq!(budget.limit(), EXPANSION_FLOOR);
        budget.input = 10_000_000;
        assert_eq!(budget.limit(), 10_000_000 * EXPANSION_PER_BYTE);
    }

    #[test]
    fn nesting_is_bounded() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse_str(&ok).is_ok());
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let err = parse_str(&deep).unwrap_err();
        assert_eq!(err.message, "lists and mappings nested more than 128 deep");
        assert_eq!(err.span.unwrap().col, MAX_DEPTH as u32 + 1);
        // Block mappings, one level a line.
        let block: String = (0..200).map(|i| format!("{}a:\n", "  ".repeat(i))).collect();
        let err = parse_str(&block).unwrap_err();
        assert!(err.message.starts_with("lists and mappings nested"), "{}", err.message);
        // Far deeper than the parser's own flow limit: an error, no overflow.
        let err = parse_str(&"[".repeat(100_000)).unwrap_err();
        assert!(err.span.is_some());
        let err = parse_str(&"- ".repeat(100_000)).unwrap_err();
        assert!(err.message.starts_with("lists and mappings nested"), "{}", err.message);
    }

    #[test]
    fn aliases_count_at_the_depth_they_are_used() {
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let ok = format!("a: &a {deep}\nb: [*a]\n");
        assert!(parse_str(&ok).is_ok());
        let err = parse_str(&format!("a: &a {deep}\nb: [[[[[[[[[[[[[[[[[[[[[[[[[[[[*a]]]]]]]]]]]]]]]]]]]]]]]]]]]]\n"))
            .unwrap_err();
        assert_eq!(err.message, "lists and mappings nested more than 128 deep");
        assert_eq!((err.span.as_ref().unwrap().line, err.span.as_ref().unwrap().col), (2, 32));
    }

    #[test]
    fn anchors_do_not_cross_documents() {
        let err = parse_str("a: &a 1\n---\nb: *a\n").unwrap_err();
        assert!(err.message.contains("unknown anchor"), "{}", err.message);
        assert_eq!(err.span.unwrap().line, 3);
    }
}
