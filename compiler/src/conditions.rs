//! Conditions: resolving what a condition reads (a request field path, a
//! map entry, a oneof case, a metadata key) and compiling the value written
//! in the rule (a literal or an operator object) into a typed plan test.
//!
//! Operators (Wishmock's, plus a few): `eq`, `ne`, `in`, `gt`, `gte`, `lt`,
//! `lte`, `exists`, `contains`, `prefix`, `suffix`, `regex` (with `flags`),
//! `len`, `not`, `any_of`, `all_of`. An object with several operators means
//! all of them. Every operand is read as the type of what it is compared
//! with, so a mismatch is a compile-time error, never a silent miss.

use crate::diag::{suggest, Diagnostic, Diagnostics, Span};
use crate::values::{self, find_field, kind_name};
use crate::yaml::{Node, NodeKind};
use prost_reflect::{Kind, MessageDescriptor};
use wirestub_plan::{self as plan, MessageSel, Op, Shape, Test, ValueClass};

/// What a condition reads, resolved against the descriptors.
#[derive(Debug, Clone)]
pub enum Target {
    Field {
        path: plan::FieldPath,
        kind: Kind,
        message: bool,
    },
    Metadata(String),
    /// The length of something (inside `len`): a U64.
    Length,
}

const OPERATORS: &[&str] = &[
    "eq", "ne", "in", "gt", "gte", "lt", "lte", "exists", "contains", "prefix", "suffix", "regex", "flags", "len",
    "not", "any_of", "all_of",
];

/// How deep tests may nest in a condition: `not`, `any_of`, `all_of`, `len`
/// and several operators in one object each add a level. It is the plan
/// loader's own limit (`MAX_TEST_DEPTH` in `plan/src/codec.rs`, not
/// exported), checked here so that a compiled plan always loads.
pub const MAX_TEST_DEPTH: usize = 32;

/// How deep a test nests: 0 for a single operator.
pub fn test_depth(test: &Test) -> usize {
    match test {
        Test::Op(Op::Len(t) | Op::Chars(t)) | Test::Not(t) => 1 + test_depth(t),
        Test::Any(list) | Test::All(list) => 1 + list.iter().map(test_depth).max().unwrap_or(0),
        Test::Op(_) => 0,
    }
}

/// A regular expression to compile, collected while reading conditions; the
/// plan's `Op::Regex(i)` indexes the compiler-wide list of these.
#[derive(Clone)]
pub struct RegexSpec {
    pub pattern: String,
    pub flags: String,
    pub span: Span,
}

pub struct Cx<'a> {
    pub diags: &'a mut Diagnostics,
    pub regexes: &'a mut Vec<RegexSpec>,
}

impl Cx<'_> {
    fn error(&mut self, span: &Span, msg: impl Into<String>) {
        self.diags.push(Diagnostic::error(Some(span.clone()), msg));
    }

    fn error_help(&mut self, span: &Span, msg: impl Into<String>, help: impl Into<String>) {
        self.diags.push(Diagnostic::error(Some(span.clone()), msg).with_help(help));
    }

    /// Resolves a dotted path in `input`. `key` is where to point on error.
    pub fn field_target(&mut self, input: &MessageDescriptor, path: &str, key: &Node) -> Option<Target> {
        let mut desc = input.clone();
        let mut numbers = Vec::new();
        let mut picks: Vec<plan::Pick> = Vec::new();
        let segments: Vec<&str> = path.split('.').collect();
        let mut i = 0;
        while i < segments.len() {
            let last = i + 1 == segments.len();
            let (seg, elem) = match split_pick(segments[i]) {
                Ok(s) => s,
                Err(e) => {
                    self.error_help(&key.span, format!("`{path}`: {e}"), PICK_HELP);
                    return None;
                }
            };
            let Some(field) = find_field(&desc, seg) else {
                if elem.is_some() {
                    self.error_help(
                        &key.span,
                        format!("unknown field `{seg}` in message `{}` (in path `{path}`)", desc.full_name()),
                        suggest(seg, values::field_names(&desc).iter().map(String::as_str)),
                    );
                    return None;
                }
                if last {
                    if let Some(oneof) =
                        desc.oneofs().find(|o| o.name() == seg && !o.is_synthetic()).filter(|_| picks.is_empty())
                    {
                        let members = oneof.fields().map(|f| f.number()).collect();
                        let path = plan::FieldPath {
                            name: path.to_string(),
                            numbers,
                            kind: plan::ScalarKind::Int32,
                            default: plan::Value::I64(0),
                            shape: Shape::OneofCase { members },
                            message: MessageSel::Single,
                            picks: picks.clone(),
                        };
                        return Some(Target::Field { path, kind: Kind::Message(desc.clone()), message: false });
                    }
                }
                let mut names = values::field_names(&desc);
                names.extend(desc.oneofs().filter(|o| !o.is_synthetic()).map(|o| o.name().to_string()));
                self.error_help(
                    &key.span,
                    format!("unknown field `{seg}` in message `{}` (in path `{path}`)", desc.full_name()),
                    suggest(seg, names.iter().map(String::as_str)),
                );
                return None;
            };
            numbers.push(field.number());
            if let Some(elem) = elem {
                if !field.is_list() {
                    let what = if field.is_map() { "a map, read by key (`name.key`)" } else { "not repeated" };
                    self.error_help(&key.span, format!("field `{seg}` in path `{path}` is {what}"), PICK_HELP);
                    return None;
                }
                let quantifier = |e: &plan::Elem| matches!(e, plan::Elem::Any | plan::Elem::All);
                let quantifiers = picks.iter().map(|p| &p.elem).chain([&elem]).filter(|e| quantifier(e)).count();
                if picks.len() >= plan::MAX_PICKS || quantifiers > 1 {
                    self.error_help(
                        &key.span,
                        format!("`{path}` goes through too many repeated fields"),
                        format!(
                            "a path may pick in at most {} repeated fields, with at most one `[*]` or `[all]`",
                            plan::MAX_PICKS
                        ),
                    );
                    return None;
                }
                picks.push(plan::Pick { step: numbers.len() as u32 - 1, elem });
                match field.kind() {
                    Kind::Message(m) if !last => {
                        desc = m;
                        i += 1;
                        continue;
                    }
                    _ if !last => {
                        self.error(
                            &key.span,
                            format!(
                                "field `{seg}` in path `{path}` is repeated {}, not a message",
                                kind_name(&field.kind())
                            ),
                        );
                        return None;
                    }
                    // The element itself: a scalar, or a message (only
                    // presence can be tested).
                    kind => {
                        let (scalar, message) = match &kind {
                            Kind::Message(_) => (plan::ScalarKind::Bytes, true),
                            k => (crate::paths::scalar_kind(k), false),
                        };
                        let path = plan::FieldPath {
                            name: path.to_string(),
                            numbers,
                            kind: scalar,
                            default: zero_of(scalar),
                            shape: Shape::Singular,
                            message: MessageSel::Single,
                            picks,
                        };
                        return Some(Target::Field { path, kind, message });
                    }
                }
            }
            if field.is_map() && !picks.is_empty() {
                self.error(&key.span, format!("`{path}`: a map cannot be read through a repeated field yet"));
                return None;
            }
            if field.is_map() {
                let Kind::Message(entry) = field.kind() else { return None };
                let (kf, vf) = (entry.map_entry_key_field(), entry.map_entry_value_field());
                let Some(key_text) = segments.get(i + 1) else {
                    self.error_help(
                        &key.span,
                        format!("`{path}` is a map; name the key to test"),
                        format!("e.g. `{path}.some_key`, or use `len` to test the number of entries"),
                    );
                    return None;
                };
                if i + 2 != segments.len() {
                    self.error(&key.span, format!("map `{seg}` in `{path}`: only the entry's value can be tested"));
                    return None;
                }
                if matches!(vf.kind(), Kind::Message(_)) {
                    self.error(&key.span, format!("map `{seg}` has message values, which cannot be tested yet"));
                    return None;
                }
                let key_kind = crate::paths::scalar_kind(&kf.kind());
                let key_node =
                    Node { kind: NodeKind::Scalar { text: key_text.to_string(), plain: true }, span: key.span.clone() };
                let key_value = match read_literal(&key_node, &kf.kind()) {
                    Ok(v) => v,
                    Err((e, _)) => {
                        self.error(&key.span, format!("map key of `{seg}`: {e}"));
                        return None;
                    }
                };
                let kind = vf.kind();
                let scalar = crate::paths::scalar_kind(&kind);
                let path = plan::FieldPath {
                    name: path.to_string(),
                    numbers,
                    kind: scalar,
                    default: default_of(scalar, &vf.default_value()),
                    shape: Shape::MapValue { key_kind, key: key_value },
                    message: MessageSel::Single,
                    picks: picks.clone(),
                };
                return Some(Target::Field { path, kind, message: false });
            }
            if field.is_list() {
                if !last {
                    self.error_help(
                        &key.span,
                        format!("field `{seg}` in path `{path}` is repeated: say which elements"),
                        PICK_HELP,
                    );
                    return None;
                }
                let (scalar, message) = match field.kind() {
                    Kind::Message(_) => (plan::ScalarKind::Bytes, true),
                    k => (crate::paths::scalar_kind(&k), false),
                };
                let path = plan::FieldPath {
                    name: path.to_string(),
                    numbers,
                    kind: scalar,
                    default: zero_of(scalar),
                    shape: Shape::Repeated,
                    message: MessageSel::Single,
                    picks: picks.clone(),
                };
                return Some(Target::Field { path, kind: field.kind(), message });
            }
            match field.kind() {
                Kind::Message(m) if last => {
                    // Only presence can be tested on a message field.
                    let path = plan::FieldPath {
                        name: path.to_string(),
                        numbers,
                        kind: plan::ScalarKind::Bytes,
                        default: plan::Value::Bytes(Vec::new()),
                        shape: Shape::Singular,
                        message: MessageSel::Single,
                        picks: picks.clone(),
                    };
                    return Some(Target::Field { path, kind: Kind::Message(m), message: true });
                }
                Kind::Message(m) => desc = m,
                _ if !last => {
                    self.error(
                        &key.span,
                        format!("field `{seg}` in path `{path}` is {}, not a message", kind_name(&field.kind())),
                    );
                    return None;
                }
                kind => {
                    let scalar = crate::paths::scalar_kind(&kind);
                    let path = plan::FieldPath {
                        name: path.to_string(),
                        numbers,
                        kind: scalar,
                        default: default_of(scalar, &field.default_value()),
                        shape: Shape::Singular,
                        message: MessageSel::Single,
                        picks: picks.clone(),
                    };
                    return Some(Target::Field { path, kind, message: false });
                }
            }
            i += 1;
        }
        None
    }

    /// Resolves a path in the aggregate view of a client stream, as Wishmock
    /// presents it: `first.<path>`, `last.<path>`, `items.<N>.<path>` and
    /// `count`.
    pub fn aggregate_target(&mut self, input: &MessageDescriptor, path: &str, key: &Node) -> Option<Target> {
        let (head, rest) = match path.split_once('.') {
            Some((h, r)) => (h, Some(r)),
            None => (path, None),
        };
        // `items[0]`, `items[-1]` and `items[*]` name messages of the stream.
        let picked = match (head, rest) {
            ("items[0]", Some(r)) => Some((MessageSel::First, r)),
            ("items[-1]", Some(r)) => Some((MessageSel::Last, r)),
            ("items[*]" | "items[any]", Some(r)) => Some((MessageSel::Each, r)),
            (h, _) if h.starts_with("items[") => match split_pick(h) {
                Ok((_, Some(plan::Elem::Index(n)))) if n >= 0 && rest.is_some() => {
                    Some((MessageSel::Nth(n as u32), rest.unwrap_or_default()))
                }
                _ => {
                    self.error_help(
                        &key.span,
                        format!("`{path}`: the messages of a client stream are `items[N]`, `items[-1]` or `items[*]`, followed by a field"),
                        "e.g. `items[0].name`, `items[-1].name`, or `sum(request.items[*].size)` in a template; `count` is the number of messages",
                    );
                    return None;
                }
            },
            _ => None,
        };
        let (message, rest) = match (head, rest) {
            _ if picked.is_some() => picked.unwrap_or((MessageSel::First, "")),
            ("count", None) => {
                let path = plan::FieldPath {
                    name: path.to_string(),
                    numbers: Vec::new(),
                    kind: plan::ScalarKind::Uint64,
                    default: plan::Value::U64(0),
                    shape: Shape::Singular,
                    message: MessageSel::Count,
                    picks: Vec::new(),
                };
                return Some(Target::Field { path, kind: Kind::Uint64, message: false });
            }
            ("first", Some(r)) => (MessageSel::First, r),
            ("last", Some(r)) => (MessageSel::Last, r),
            ("items", Some(r)) => match r.split_once('.') {
                Some((n, r)) if n.parse::<u32>().is_ok() => (MessageSel::Nth(n.parse().unwrap()), r),
                _ => {
                    self.error_help(
                        &key.span,
                        format!("`{path}`: `items` is followed by a message index"),
                        "e.g. `items.0.name`; `count` is the number of messages",
                    );
                    return None;
                }
            },
            _ => {
                self.error_help(
                    &key.span,
                    format!("`{path}` does not name a part of the client stream"),
                    "in a client stream, rules see `first.<field>`, `last.<field>`, `items.<N>.<field>` and `count`",
                );
                return None;
            }
        };
        let mut target = self.field_target(input, rest, key)?;
        if let Target::Field { path: p, .. } = &mut target {
            p.message = message;
            p.name = path.to_string();
        }
        Some(target)
    }

    /// Compiles the value written for a whole condition into a test, no
    /// deeper than the plan allows.
    pub fn condition(&mut self, node: &Node, target: &Target) -> Option<Test> {
        let test = self.test(node, target)?;
        if test_depth(&test) > MAX_TEST_DEPTH {
            self.error_help(
                &node.span,
                format!("condition nested more than {MAX_TEST_DEPTH} deep"),
                "`not`, `any_of`, `all_of`, `len` and objects of several operators each add a level",
            );
            return None;
        }
        Some(test)
    }

    /// Compiles the value written for a condition into a test.
    pub fn test(&mut self, node: &Node, target: &Target) -> Option<Test> {
        match &node.kind {
            NodeKind::Map(entries) => {
                if entries.is_empty() {
                    self.error_help(
                        &node.span,
                        "empty operator object",
                        "write a value, or an operator such as `{ eq: value }`",
                    );
                    return None;
                }
                let flags = entries.iter().find(|(k, _)| k.scalar() == Some("flags"));
                let mut tests = Vec::new();
                let mut ok = true;
                for (k, v) in entries {
                    let op = k.scalar().unwrap_or_default();
                    if op == "flags" {
                        if !entries.iter().any(|(k, _)| k.scalar() == Some("regex")) {
                            self.error(&k.span, "`flags` goes with `regex`");
                            ok = false;
                        }
                        continue;
                    }
                    match self.operator(op, k, v, flags.map(|(_, f)| f), target) {
                        Some(t) => tests.push(t),
                        None => ok = false,
                    }
                }
                if !ok {
                    return None;
                }
                Some(if tests.len() == 1 { tests.pop().unwrap() } else { Test::All(tests) })
            }
            NodeKind::Seq(_) => {
                let help = match target {
                    Target::Field { path, .. } if path.shape == Shape::Repeated => {
                        "test a repeated field with `contains` (membership) or `len` (element count)"
                    }
                    _ => "use `in: [...]` to accept any of several values",
                };
                self.error_help(&node.span, "expected a single value to compare with, found a list", help);
                None
            }
            _ => self.eq(node, target).map(Test::Op),
        }
    }

    fn eq(&mut self, node: &Node, target: &Target) -> Option<Op> {
        if let Target::Field { path, .. } = target {
            if path.shape == Shape::Repeated {
                self.error_help(
                    &node.span,
                    format!("`{}` is repeated: equality does not apply", path.name),
                    "test a repeated field with `contains` (membership) or `len` (element count)",
                );
                return None;
            }
        }
        if node.is_null() {
            return match target {
                Target::Field { path, message: false, .. } => Some(Op::Eq(path.default.clone())),
                Target::Metadata(_) => Some(Op::Eq(plan::Value::Bytes(Vec::new()))),
                _ => {
                    self.error(&node.span, "null cannot be compared here");
                    None
                }
            };
        }
        self.operand(node, target, "eq").map(Op::Eq)
    }

    /// Reads an operand as the value class of the target.
    fn operand(&mut self, node: &Node, target: &Target, op: &str) -> Option<plan::Value> {
        let result = match target {
            Target::Metadata(_) => {
                values::read_string(node).map(|s| plan::Value::Bytes(s.into_bytes())).map_err(|e| (e, None))
            }
            Target::Length => values::read_int(node, 0, u64::MAX as i128, "a length")
                .map(|v| plan::Value::U64(v as u64))
                .map_err(|e| (e, None)),
            Target::Field { message: true, path, .. } => {
                self.error_help(
                    &node.span,
                    format!("`{}` is a message; `{op}` does not apply", path.name),
                    format!("test one of its fields (e.g. `{}.<field>`), or its presence with `exists`", path.name),
                );
                return None;
            }
            Target::Field { path, kind, .. } => match &path.shape {
                Shape::OneofCase { .. } => {
                    let Kind::Message(desc) = kind else { return None };
                    let oneof_name = path.name.rsplit('.').next().unwrap_or_default();
                    let oneof = desc.oneofs().find(|o| o.name() == oneof_name)?;
                    let text = node.scalar().unwrap_or_default();
                    let member = oneof.fields().find(|f| f.name() == text || f.json_name() == text);
                    match member {
                        Some(f) => Ok(plan::Value::I64(f.number() as i64)),
                        None => {
                            let names: Vec<String> = oneof.fields().map(|f| f.name().to_string()).collect();
                            Err((
                                format!("`{text}` is not a member of oneof `{oneof_name}`"),
                                Some(suggest(text, names.iter().map(String::as_str))),
                            ))
                        }
                    }
                }
                _ => read_literal(node, kind),
            },
        };
        match result {
            Ok(v) => Some(v),
            Err((e, help)) => {
                let what = match target {
                    Target::Field { path, kind, .. } => format!("`{}` is {}: ", path.name, kind_name(kind)),
                    Target::Metadata(k) => format!("metadata `{k}`: "),
                    Target::Length => "length: ".to_string(),
                };
                let mut d = Diagnostic::error(Some(node.span.clone()), format!("{what}{e}"));
                d.help = help;
                self.diags.push(d);
                None
            }
        }
    }

    fn class(target: &Target) -> Option<ValueClass> {
        match target {
            Target::Field { path, message: false, .. } => Some(path.kind.value_class()),
            Target::Field { .. } => None,
            Target::Metadata(_) => Some(ValueClass::Bytes),
            Target::Length => Some(ValueClass::U64),
        }
    }

    fn operator(&mut self, op: &str, key: &Node, v: &Node, flags: Option<&Node>, target: &Target) -> Option<Test> {
        let repeated = matches!(target, Target::Field { path, .. } if path.shape == Shape::Repeated);
        let message = matches!(target, Target::Field { message: true, .. });
        let oneof = matches!(target, Target::Field { path, .. } if matches!(path.shape, Shape::OneofCase { .. }));
        let name = match target {
            Target::Field { path, .. } => format!("`{}`", path.name),
            Target::Metadata(k) => format!("metadata `{k}`"),
            Target::Length => "a length".to_string(),
        };
        let class = Self::class(target);
        let textual = class == Some(ValueClass::Bytes) && !repeated && !message;
        let not_applicable = |cx: &mut Self, why: &str| {
            cx.error_help(&key.span, format!("`{op}` does not apply to {name}: {why}"), applicable_help(target));
            None
        };
        let op_ = match op {
            "eq" => return self.eq(v, target).map(Test::Op),
            "ne" => return self.eq(v, target).map(|o| Test::Not(Box::new(Test::Op(o)))),
            "not" => return self.test(v, target).map(|t| Test::Not(Box::new(t))),
            "any_of" | "all_of" => {
                let NodeKind::Seq(items) = &v.kind else {
                    self.error(&v.span, format!("`{op}` takes a list of values or operator objects"));
                    return None;
                };
                let mut tests = Vec::new();
                for item in items {
                    tests.push(self.test(item, target)?);
                }
                return Some(if op == "any_of" { Test::Any(tests) } else { Test::All(tests) });
            }
            "exists" => {
                return match values::read_bool(v) {
                    Ok(true) => Some(Test::Op(Op::Exists)),
                    Ok(false) => Some(Test::Not(Box::new(Test::Op(Op::Exists)))),
                    Err(e) => {
                        self.error(&v.span, format!("`exists`: {e}"));
                        None
                    }
                }
            }
            "len" if repeated => Op::Len(Box::new(self.test(v, &Target::Length)?)),
            _ if message && repeated => {
                return not_applicable(self, "its elements are messages; `len` and `exists` apply")
            }
            _ if message => return not_applicable(self, "it is a message; only `exists` applies"),
            "in" => {
                if repeated {
                    return not_applicable(self, "it is repeated");
                }
                let NodeKind::Seq(items) = &v.kind else {
                    self.error(&v.span, "`in` takes a list of values");
                    return None;
                };
                let mut vs = Vec::new();
                for item in items {
                    vs.push(self.operand(item, target, "in")?);
                }
                Op::In(vs)
            }
            "gt" | "gte" | "lt" | "lte" => {
                if repeated || oneof {
                    return not_applicable(self, "it has no order");
                }
                let (op, bound) = match class {
                    Some(ValueClass::Bool) => return not_applicable(self, "booleans have no order"),
                    Some(ValueClass::Bytes) => match values::read_float(v, "number") {
                        // Strings and metadata are parsed as numbers at run time.
                        Ok(f) => (op, plan::Value::F64(f)),
                        Err(e) => {
                            self.error(&v.span, format!("`{op}`: {e}"));
                            return None;
                        }
                    },
                    Some(ValueClass::F64) => (op, self.operand(v, target, op)?),
                    Some(c @ (ValueClass::I64 | ValueClass::U64)) => self.int_bound(op, v, c, target)?,
                    None => return None,
                };
                match op {
                    "gt" => Op::Gt(bound),
                    "gte" => Op::Gte(bound),
                    "lt" => Op::Lt(bound),
                    _ => Op::Lte(bound),
                }
            }
            "contains" => {
                if repeated {
                    match target {
                        Target::Field { kind, .. } => match read_literal(v, kind) {
                            Ok(x) => Op::Contains(x),
                            Err((e, help)) => {
                                let mut d =
                                    Diagnostic::error(Some(v.span.clone()), format!("`contains` on {name}: {e}"));
                                d.help = help;
                                self.diags.push(d);
                                return None;
                            }
                        },
                        _ => return None,
                    }
                } else if textual {
                    Op::Contains(plan::Value::Bytes(self.text_operand(v, target, op)?))
                } else {
                    return not_applicable(self, "it is not a string, bytes or a repeated field");
                }
            }
            "prefix" | "suffix" => {
                if !textual {
                    return not_applicable(self, "it is not a string or bytes");
                }
                let b = self.text_operand(v, target, op)?;
                if op == "prefix" {
                    Op::Prefix(b)
                } else {
                    Op::Suffix(b)
                }
            }
            "regex" => {
                if !textual {
                    return not_applicable(self, "regular expressions apply to strings");
                }
                let pattern = match values::read_string(v) {
                    Ok(p) => p,
                    Err(e) => {
                        self.error(&v.span, format!("`regex`: {e}"));
                        return None;
                    }
                };
                let flags_span = flags.map(|f| f.span.clone()).unwrap_or(v.span.clone());
                let flags = match flags.map(values::read_string) {
                    None => String::new(),
                    Some(Ok(f)) => f,
                    Some(Err(e)) => {
                        self.error(&flags_span, format!("`flags`: {e}"));
                        return None;
                    }
                };
                if let Some(bad) = flags.chars().find(|c| !"imsugy".contains(*c)) {
                    self.error_help(
                        &flags_span,
                        format!("unknown regex flag `{bad}`"),
                        "flags are i (ignore case), m (multi-line), s (dot matches newline), u, g and y (accepted, no effect)",
                    );
                    return None;
                }
                self.regexes.push(RegexSpec { pattern, flags, span: v.span.clone() });
                Op::Regex(self.regexes.len() as u32 - 1)
            }
            "len" => {
                if !textual {
                    return not_applicable(self, "only strings, bytes, metadata and repeated fields have a length");
                }
                Op::Len(Box::new(self.test(v, &Target::Length)?))
            }
            _ => {
                self.error_help(&key.span, format!("unknown operator `{op}`"), suggest(op, OPERATORS.iter().copied()));
                return None;
            }
        };
        Some(Test::Op(op_))
    }

    /// The bytes a textual operator looks for: UTF-8 text for strings and
    /// metadata, base64 for bytes fields.
    fn text_operand(&mut self, v: &Node, target: &Target, op: &str) -> Option<Vec<u8>> {
        let bytes_field = matches!(target, Target::Field { kind: Kind::Bytes, .. });
        let r = if bytes_field { values::read_bytes(v) } else { values::read_string(v).map(String::into_bytes) };
        match r {
            Ok(b) => Some(b),
            Err(e) => {
                self.error(&v.span, format!("`{op}`: {e}"));
                None
            }
        }
    }

    /// An integer bound for an integer (or enum) field. A fractional bound
    /// becomes an inclusive integer one: `gt 2.5` is `gte 3`, `lt 2.5` is
    /// `lte 2`. Bounds beyond the type's range are clamped to it.
    fn int_bound<'o>(
        &mut self,
        op: &'o str,
        v: &Node,
        class: ValueClass,
        target: &Target,
    ) -> Option<(&'o str, plan::Value)> {
        if let Target::Field { kind: Kind::Enum(_), .. } = target {
            return self.operand(v, target, op).map(|b| (op, b));
        }
        if let Ok(i) = values::read_int(v, i128::MIN, i128::MAX, "integer") {
            return Some(int_op(op, i, class));
        }
        match values::read_float(v, "number") {
            Ok(f) if f.is_finite() => Some(match op {
                "gt" | "gte" => int_op("gte", f.ceil() as i128, class),
                _ => int_op("lte", f.floor() as i128, class),
            }),
            _ => {
                self.error(&v.span, format!("`{op}` takes a finite number"));
                None
            }
        }
    }
}

/// An ordered comparison with an integer bound that may lie outside the
/// class's range: such bounds become an always-true or always-false test at
/// the range's end, so the comparison keeps its meaning.
fn int_op(op: &str, x: i128, class: ValueClass) -> (&'static str, plan::Value) {
    let (lo, hi) = match class {
        ValueClass::U64 => (0, u64::MAX as i128),
        _ => (i64::MIN as i128, i64::MAX as i128),
    };
    let value = |i: i128| match class {
        ValueClass::U64 => plan::Value::U64(i as u64),
        _ => plan::Value::I64(i as i64),
    };
    let (always, never) = (("gte", value(lo)), ("gt", value(hi)));
    match op {
        "gt" if x < lo => always,
        "gt" if x >= hi => never,
        "gte" if x <= lo => always,
        "gte" if x > hi => never,
        "lt" if x > hi => ("lte", value(hi)),
        "lt" if x <= lo => ("lt", value(lo)),
        "lte" if x >= hi => ("lte", value(hi)),
        "lte" if x < lo => ("lt", value(lo)),
        "gt" => ("gt", value(x)),
        "gte" => ("gte", value(x)),
        "lt" => ("lt", value(x)),
        _ => ("lte", value(x)),
    }
}

fn applicable_help(target: &Target) -> String {
    match target {
        Target::Field { message: true, .. } => "a message field supports `exists`; test its fields by path".into(),
        Target::Field { path, .. } if path.shape == Shape::Repeated => {
            "a repeated field supports `contains`, `len`, `exists`, `not`, `any_of`, `all_of`".into()
        }
        Target::Field { path, .. } if matches!(path.shape, Shape::OneofCase { .. }) => {
            "a oneof supports `eq`, `ne`, `in` and `exists` with member names".into()
        }
        Target::Field { path, .. } => match path.kind.value_class() {
            ValueClass::Bytes => {
                "strings support eq, ne, in, contains, prefix, suffix, regex, len, gt/gte/lt/lte (as numbers)".into()
            }
            ValueClass::Bool => "booleans support eq, ne, in, exists".into(),
            _ => "numbers support eq, ne, in, gt, gte, lt, lte, exists".into(),
        },
        Target::Metadata(_) => "metadata supports every string operator".into(),
        Target::Length => "a length supports eq, ne, in, gt, gte, lt, lte".into(),
    }
}

/// The zero value of a kind's class (repeated fields have no default of
/// their own; the plan still records one of the right class).
fn zero_of(kind: plan::ScalarKind) -> plan::Value {
    match kind.value_class() {
        ValueClass::I64 => plan::Value::I64(0),
        ValueClass::U64 => plan::Value::U64(0),
        ValueClass::F64 => plan::Value::F64(0.0),
        ValueClass::Bool => plan::Value::Bool(false),
        ValueClass::Bytes => plan::Value::Bytes(Vec::new()),
    }
}

fn default_of(kind: plan::ScalarKind, v: &prost_reflect::Value) -> plan::Value {
    crate::paths::to_plan_value(v, kind)
}

/// Reads a literal as the given field kind, normalised as the engine will
/// normalise the wire value (floats rounded to f32 for float fields).
pub fn read_literal(node: &Node, kind: &Kind) -> Result<plan::Value, (String, Option<String>)> {
    use plan::ScalarKind as S;
    let scalar = crate::paths::scalar_kind(kind);
    let plain = |e: String| (e, None);
    let name = kind_name(kind);
    Ok(match scalar {
        S::Int32 | S::Sint32 | S::Sfixed32 => {
            plan::Value::I64(values::read_int(node, i32::MIN as i128, i32::MAX as i128, &name).map_err(plain)? as i64)
        }
        S::Int64 | S::Sint64 | S::Sfixed64 => {
            plan::Value::I64(values::read_int(node, i64::MIN as i128, i64::MAX as i128, &name).map_err(plain)? as i64)
        }
        S::Uint32 | S::Fixed32 => {
            plan::Value::U64(values::read_int(node, 0, u32::MAX as i128, &name).map_err(plain)? as u64)
        }
        S::Uint64 | S::Fixed64 => {
            plan::Value::U64(values::read_int(node, 0, u64::MAX as i128, &name).map_err(plain)? as u64)
        }
        S::Float => plan::Value::F64(values::read_float(node, &name).map_err(plain)? as f32 as f64),
        S::Double => plan::Value::F64(values::read_float(node, &name).map_err(plain)?),
        S::Bool => plan::Value::Bool(values::read_bool(node).map_err(plain)?),
        S::String => plan::Value::Bytes(values::read_string(node).map_err(plain)?.into_bytes()),
        S::Bytes => plan::Value::Bytes(values::read_bytes(node).map_err(plain)?),
        S::Enum => {
            let Kind::Enum(e) = kind else { unreachable!("scalar_kind maps only enums to Enum") };
            plan::Value::I64(values::read_enum(node, e)? as i64)
        }
    })
}

/// How picks are written, for diagnostics.
const PICK_HELP: &str =
    "pick elements of a repeated field: `items[0].size`, `items[-1].size` (the last), `items[*].size` (any element) or `items[all].size` (every element)";

/// Splits a path segment into the field name and the elements it picks:
/// `items[0]`, `items[-1]`, `items[*]` (or `[any]`) and `items[all]`.
pub fn split_pick(seg: &str) -> Result<(&str, Option<plan::Elem>), String> {
    let Some(open) = seg.find('[') else { return Ok((seg, None)) };
    let (name, rest) = seg.split_at(open);
    let Some(inner) = rest.strip_prefix('[').and_then(|r| r.strip_suffix(']')) else {
        return Err(format!("`{seg}` is not `name[index]`"));
    };
    let elem = match inner.trim() {
        "*" | "any" => plan::Elem::Any,
        "all" => plan::Elem::All,
        n => match n.parse::<i32>() {
            Ok(i) if i.unsigned_abs() < 1 << 24 => plan::Elem::Index(i),
            _ => return Err(format!("`[{inner}]` is not an index, `*`, `any` or `all`")),
        },
    };
    if name.is_empty() {
        return Err(format!("`{seg}` names no field"));
    }
    Ok((name, Some(elem)))
}
