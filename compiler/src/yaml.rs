//! Reads YAML and JSON rule files into a tree whose every node knows its line
//! and column, so that every later check can point at the exact place.
//!
//! Built on yaml-rust2's event parser (see ARCHITECTURE.md for why). JSON is
//! read by the same parser: JSON documents are YAML flow documents.

use crate::diag::{Diagnostic, SourceFile, Span};
use std::collections::HashMap;
use std::sync::Arc;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

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

/// Parses every document of a file. A syntax error is one diagnostic.
pub fn parse(file: &Arc<SourceFile>) -> Result<Vec<Node>, Diagnostic> {
    let mut builder =
        Builder { file: file.clone(), stack: Vec::new(), docs: Vec::new(), anchors: HashMap::new(), error: None };
    let mut parser = Parser::new_from_str(&file.text);
    if let Err(e) = parser.load(&mut builder, true) {
        let m = e.marker();
        let span = Span { file: file.clone(), line: m.line() as u32, col: m.col() as u32 + 1, len: 1 };
        return Err(Diagnostic::error(Some(span), format!("syntax error: {}", e.info())));
    }
    if let Some(e) = builder.error {
        return Err(e);
    }
    Ok(builder.docs)
}

enum Frame {
    Seq(Node, usize),
    Map(Node, usize, Option<Node>),
}

struct Builder {
    file: Arc<SourceFile>,
    stack: Vec<Frame>,
    docs: Vec<Node>,
    anchors: HashMap<usize, Node>,
    error: Option<Diagnostic>,
}

impl Builder {
    fn span(&self, m: Marker, len: usize) -> Span {
        Span { file: self.file.clone(), line: m.line() as u32, col: m.col() as u32 + 1, len: len.max(1) as u32 }
    }

    fn finish(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some(Frame::Seq(seq, _)) => {
                if let NodeKind::Seq(items) = &mut seq.kind {
                    items.push(node);
                }
            }
            Some(Frame::Map(map, _, pending)) => match pending.take() {
                None => {
                    if !matches!(node.kind, NodeKind::Scalar { .. }) {
                        self.error.get_or_insert(Diagnostic::error(
                            Some(node.span.clone()),
                            "mapping keys must be plain strings",
                        ));
                    }
                    *pending = Some(node);
                }
                Some(key) => {
                    if let NodeKind::Map(entries) = &mut map.kind {
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
                }
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let plain = style == TScalarStyle::Plain && tag.is_none();
                let len = text.chars().count() + if plain { 0 } else { 2 };
                let span = self.span(mark, len);
                let kind = if plain && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL") {
                    NodeKind::Null
                } else {
                    NodeKind::Scalar { text, plain }
                };
                self.finish(Node { kind, span }, anchor);
            }
            Event::SequenceStart(anchor, _) => {
                let span = self.span(mark, 1);
                self.stack.push(Frame::Seq(Node { kind: NodeKind::Seq(Vec::new()), span }, anchor));
            }
            Event::MappingStart(anchor, _) => {
                let span = self.span(mark, 1);
                self.stack.push(Frame::Map(Node { kind: NodeKind::Map(Vec::new()), span }, anchor, None));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(Frame::Seq(node, anchor) | Frame::Map(node, anchor, _)) = self.stack.pop() {
                    self.finish(node, anchor);
                }
            }
            Event::Alias(id) => {
                let node = match self.anchors.get(&id) {
                    Some(n) => n.clone(),
                    None => Node { kind: NodeKind::Null, span: self.span(mark, 1) },
                };
                self.finish(node, 0);
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentStart | Event::DocumentEnd => {}
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
}
