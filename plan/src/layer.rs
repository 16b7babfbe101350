//! Layering: one plan served in front of another.
//!
//! Rules and protos added at run time are compiled on their own into an
//! *overlay* plan, against the schema of the compiled plan file (the *base*)
//! plus any uploaded protos. [`layer`] merges the two into one plan that the
//! engine serves like any other: for every method, the overlay's rules are
//! tried first, then the base's.
//!
//! The overlay numbers its per-method tables (field paths, metadata keys,
//! responses, regexes) independently of the base, so merging appends the
//! overlay's entries to the base's tables and rewrites every index held by
//! the overlay's rules and responses. Identical field paths, metadata keys
//! and regexes are shared rather than repeated; responses never are, since
//! each one counts its own calls (`Response::times`). The base's rules and
//! indices are left exactly as they are.

use crate::codec::MAX_TEST_DEPTH;
use crate::{Elem, Expr, FieldPath, MessageSel, Method, Op, Part, Piece, Plan, Shape, Source, Test, Value};
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// The reader's bound on every element count (`codec::MAX_COUNT`): a merged
/// table longer than this would not load.
const MAX_COUNT: usize = 1 << 24;

/// Deepest nesting of groups skipped in descriptors.
const MAX_GROUP_DEPTH: usize = 64;

/// A plan that serves `overlay`'s rules in front of `base`'s.
///
/// - Descriptors: every file of the base, then every file of the overlay
///   whose name the base does not have (those are the same imported files).
/// - A method in both: the overlay's rules first, in their order, then the
///   base's; the tables are merged and the overlay's indices remapped. The
///   kinds and message types must agree, and so must the `duplex` flags when
///   both have rules (otherwise the flag of the side with rules is kept, the
///   base's when neither has any).
/// - A method in only one of them is kept as it is. Methods stay sorted by
///   path, as the reader requires and [`Plan::method`] expects, so the
///   overlay's new methods take their place by path, in the overlay's order.
///
/// When both inputs load with [`Plan::from_bytes`], so does the result,
/// unless a merged table would exceed the format's limits, which is an
/// `Err`. So are malformed descriptors, a method given twice, and an index
/// of the overlay that is out of range or a tree nested deeper than the
/// reader accepts: errors, never panics.
pub fn layer(base: &Plan, overlay: &Plan) -> Result<Plan, String> {
    let descriptors = layer_descriptors(&base.descriptors, &overlay.descriptors)?;

    let mut overlay_methods: HashMap<&str, &Method> = HashMap::with_capacity(overlay.methods.len());
    for m in &overlay.methods {
        if overlay_methods.insert(&m.path, m).is_some() {
            return Err(format!("the overlay has method {} twice", m.path));
        }
    }
    let mut in_base: HashSet<&str> = HashSet::with_capacity(base.methods.len());
    let mut methods = Vec::with_capacity(base.methods.len() + overlay.methods.len());
    for m in &base.methods {
        if !in_base.insert(&m.path) {
            return Err(format!("the plan has method {} twice", m.path));
        }
        methods.push(match overlay_methods.get(m.path.as_str()) {
            Some(over) => merge_method(m, over)?,
            None => m.clone(),
        });
    }
    methods.extend(overlay.methods.iter().filter(|m| !in_base.contains(m.path.as_str())).cloned());
    if methods.len() > MAX_COUNT {
        return Err(format!("layering gives {} methods, more than a plan can hold ({MAX_COUNT})", methods.len()));
    }
    // Plans from the reader are sorted by path, so this keeps the base's
    // order and the overlay's order among its new methods.
    methods.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Plan { descriptors, methods })
}

fn merge_method(base: &Method, over: &Method) -> Result<Method, String> {
    let path = base.path.as_str();
    if over.kind != base.kind {
        return Err(format!(
            "method {path}: the plan serves it as {} but the overlay's protos make it {}",
            base.kind.name(),
            over.kind.name()
        ));
    }
    if over.input_type != base.input_type || over.output_type != base.output_type {
        return Err(format!(
            "method {path}: the plan serves it as {} -> {} but the overlay's protos make it {} -> {}",
            base.input_type, base.output_type, over.input_type, over.output_type
        ));
    }
    let mode = |duplex: bool| if duplex { "duplex" } else { "aggregate" };
    let duplex = match (base.rules.is_empty(), over.rules.is_empty()) {
        (false, false) if base.duplex != over.duplex => {
            return Err(format!(
                "method {path}: the plan's rules answer it in {} mode but the overlay's in {} mode",
                mode(base.duplex),
                mode(over.duplex)
            ))
        }
        (_, false) => over.duplex,
        _ => base.duplex,
    };

    let (fields, field_map) = merge_table(&base.fields, &over.fields, field_key, ("field paths", path), MAX_COUNT)?;
    let (metadata_keys, key_map) =
        merge_table(&base.metadata_keys, &over.metadata_keys, |k| k.as_str(), ("metadata keys", path), MAX_COUNT)?;
    let (regexes, regex_map) =
        merge_table(&base.regexes, &over.regexes, |r| r.as_slice(), ("regexes", path), MAX_COUNT)?;
    let response_count = base.responses.len() + over.responses.len();
    if response_count > MAX_COUNT {
        return Err(too_many(path, "responses", response_count));
    }
    let rule_count = base.rules.len() + over.rules.len();
    if rule_count > MAX_COUNT {
        return Err(too_many(path, "rules", rule_count));
    }
    let remap = Remap {
        fields: &field_map,
        keys: &key_map,
        regexes: &regex_map,
        first_response: base.responses.len() as u32,
        overlay_responses: over.responses.len(),
    };

    let mut responses = Vec::with_capacity(response_count);
    responses.extend_from_slice(&base.responses);
    for (i, r) in over.responses.iter().enumerate() {
        let mut r = r.clone();
        for (_, t) in &mut r.templates {
            remap.pieces(&mut t.pieces, 0).map_err(|why| format!("method {path}: overlay response {i}: {why}"))?;
        }
        for t in &mut r.metadata_templates {
            for part in &mut t.parts {
                if let Part::Expr(e) = part {
                    remap.expr(e, 0).map_err(|why| format!("method {path}: overlay response {i}: {why}"))?;
                }
            }
        }
        responses.push(r);
    }
    let mut rules = Vec::with_capacity(rule_count);
    for (i, rule) in over.rules.iter().enumerate() {
        let mut rule = rule.clone();
        remap.rule(&mut rule).map_err(|why| format!("method {path}: overlay rule {i} ({}): {why}", rule.origin))?;
        rules.push(rule);
    }
    rules.extend_from_slice(&base.rules);

    Ok(Method {
        path: base.path.clone(),
        kind: base.kind,
        input_type: base.input_type.clone(),
        output_type: base.output_type.clone(),
        fields,
        metadata_keys,
        responses,
        rules,
        duplex,
        checks: match base.checks.is_empty() {
            true => over
                .checks
                .iter()
                .cloned()
                .map(|mut c| {
                    remap.check(&mut c)?;
                    Ok(c)
                })
                .collect::<Result<_, String>>()
                .map_err(|why| format!("method {path}: overlay check: {why}"))?,
            false => base.checks.clone(),
        },
        cel_checks: match base.cel_checks.is_empty() {
            true => over.cel_checks.clone(),
            false => base.cel_checks.clone(),
        },
        regexes,
    })
}

fn too_many(path: &str, what: &str, n: usize) -> String {
    format!("method {path}: layering gives it {n} {what}, more than a plan can hold ({MAX_COUNT})")
}

/// The base's table followed by the overlay's entries that it lacks, and
/// where each overlay entry ended up. Entries with equal keys are one entry;
/// a table longer than `limit` is an error.
fn merge_table<'a, T: Clone, K: Eq + Hash>(
    base: &'a [T],
    over: &'a [T],
    key: impl Fn(&'a T) -> K,
    (what, path): (&str, &str),
    limit: usize,
) -> Result<(Vec<T>, Vec<u32>), String> {
    if base.len() > limit {
        return Err(too_many(path, what, base.len()));
    }
    let mut table = base.to_vec();
    let mut index: HashMap<K, u32> = HashMap::with_capacity(base.len() + over.len());
    for (i, t) in base.iter().enumerate() {
        index.entry(key(t)).or_insert(i as u32);
    }
    let mut map = Vec::with_capacity(over.len());
    for t in over {
        map.push(match index.entry(key(t)) {
            Entry::Occupied(e) => *e.get(),
            Entry::Vacant(e) => {
                if table.len() >= limit {
                    return Err(too_many(path, what, table.len() + 1));
                }
                table.push(t.clone());
                *e.insert(table.len() as u32 - 1)
            }
        });
    }
    Ok((table, map))
}

/// An injective encoding of a field path, so that identical paths (floats
/// compared bit for bit) share one entry.
fn field_key(f: &FieldPath) -> Vec<u8> {
    fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
    }
    fn value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::I64(x) => {
                out.push(0);
                out.extend_from_slice(&x.to_le_bytes());
            }
            Value::U64(x) => {
                out.push(1);
                out.extend_from_slice(&x.to_le_bytes());
            }
            Value::F64(x) => {
                out.push(2);
                out.extend_from_slice(&x.to_bits().to_le_bytes());
            }
            Value::Bool(x) => out.extend_from_slice(&[3, *x as u8]),
            Value::Bytes(x) => {
                out.push(4);
                bytes(out, x);
            }
        }
    }
    fn numbers(out: &mut Vec<u8>, ns: &[u32]) {
        out.extend_from_slice(&(ns.len() as u64).to_le_bytes());
        for n in ns {
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
    let mut out = Vec::with_capacity(32 + f.name.len() + 4 * f.numbers.len());
    bytes(&mut out, f.name.as_bytes());
    numbers(&mut out, &f.numbers);
    out.push(f.kind as u8);
    value(&mut out, &f.default);
    match &f.shape {
        Shape::Singular => out.push(0),
        Shape::Repeated => out.push(1),
        Shape::MapValue { key_kind, key } => {
            out.extend_from_slice(&[2, *key_kind as u8]);
            value(&mut out, key);
        }
        Shape::OneofCase { members } => {
            out.push(3);
            numbers(&mut out, members);
        }
    }
    match f.message {
        MessageSel::Single => out.push(0),
        MessageSel::First => out.push(1),
        MessageSel::Last => out.push(2),
        MessageSel::Nth(n) => {
            out.push(3);
            out.extend_from_slice(&n.to_le_bytes());
        }
        MessageSel::Count => out.push(4),
        MessageSel::Each => out.push(5),
    }
    for p in &f.picks {
        out.extend_from_slice(&p.step.to_le_bytes());
        match p.elem {
            Elem::Index(i) => {
                out.push(0);
                out.extend_from_slice(&i.to_le_bytes());
            }
            Elem::Any => out.push(1),
            Elem::All => out.push(2),
        }
    }
    out
}

/// Where the overlay's indices go in the merged method.
struct Remap<'a> {
    fields: &'a [u32],
    keys: &'a [u32],
    regexes: &'a [u32],
    first_response: u32,
    overlay_responses: usize,
}

fn lookup(map: &[u32], i: u32, what: &str) -> Result<u32, String> {
    map.get(i as usize).copied().ok_or_else(|| format!("{what} index {i} out of range"))
}

impl Remap<'_> {
    fn rule(&self, rule: &mut crate::Rule) -> Result<(), String> {
        for c in &mut rule.conditions {
            c.source = match c.source {
                Source::Field(i) => Source::Field(lookup(self.fields, i, "field")?),
                Source::Metadata(i) => Source::Metadata(lookup(self.keys, i, "metadata")?),
            };
            self.test(&mut c.test, 0)?;
        }
        if rule.response as usize >= self.overlay_responses {
            return Err(format!("response index {} out of range", rule.response));
        }
        rule.response += self.first_response;
        Ok(())
    }

    fn check(&self, c: &mut crate::Check) -> Result<(), String> {
        if let Source::Field(i) = c.source {
            c.source = Source::Field(lookup(self.fields, i, "field")?);
        }
        for g in &mut c.guards {
            *g = lookup(self.fields, *g, "field")?;
        }
        self.test(&mut c.test, 0)
    }

    /// Depths count as in the reader, which refuses anything deeper.
    fn test(&self, t: &mut Test, depth: usize) -> Result<(), String> {
        if depth > MAX_TEST_DEPTH {
            return Err("tests nested too deeply".into());
        }
        match t {
            Test::Op(Op::Regex(i)) => *i = lookup(self.regexes, *i, "regex")?,
            Test::Op(Op::Len(inner) | Op::Chars(inner)) | Test::Not(inner) => self.test(inner, depth + 1)?,
            Test::Op(_) => {}
            Test::Any(list) | Test::All(list) => {
                for t in list {
                    self.test(t, depth + 1)?;
                }
            }
        }
        Ok(())
    }

    fn pieces(&self, pieces: &mut [Piece], depth: usize) -> Result<(), String> {
        if depth > MAX_TEST_DEPTH * 2 {
            return Err("template nested too deeply".into());
        }
        for p in pieces {
            match p {
                Piece::Bytes(_) => {}
                Piece::Nested { pieces, .. } => self.pieces(pieces, depth + 1)?,
                Piece::Text { parts, .. } | Piece::Number { parts, .. } => {
                    for part in parts {
                        if let Part::Expr(e) = part {
                            self.expr(e, 0)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn expr(&self, e: &mut Expr, depth: usize) -> Result<(), String> {
        if depth > MAX_TEST_DEPTH {
            return Err("template expression nested too deeply".into());
        }
        match e {
            Expr::Field(i) | Expr::EnumName(i, _) | Expr::Aggregate(i, _) => {
                *i = lookup(self.fields, *i, "template field")?
            }
            Expr::Metadata(i) => *i = lookup(self.keys, *i, "template metadata")?,
            Expr::Format(_, args) => {
                for a in args {
                    self.expr(a, depth + 1)?;
                }
            }
            Expr::Arith(l, _, r) => {
                self.expr(l, depth + 1)?;
                self.expr(r, depth + 1)?;
            }
            Expr::Fill(n, _) => self.expr(n, depth + 1)?,
            Expr::StreamIndex
            | Expr::StreamTotal
            | Expr::StreamIsFirst
            | Expr::StreamIsLast
            | Expr::Now
            | Expr::Uuid
            | Expr::RandomInt(..)
            | Expr::RandomFloat(..)
            | Expr::Number(_)
            | Expr::Str(_) => {}
        }
        Ok(())
    }
}

// ---- descriptors ----------------------------------------------------------

/// The base's descriptor set followed by the overlay's files whose names it
/// does not have. The base's bytes are kept as they are.
fn layer_descriptors(base: &[u8], overlay: &[u8]) -> Result<Vec<u8>, String> {
    let base_files = files(base).map_err(|why| format!("the plan's descriptors are malformed: {why}"))?;
    let overlay_files = files(overlay).map_err(|why| format!("the overlay's descriptors are malformed: {why}"))?;
    let mut names: HashSet<&[u8]> = base_files.iter().map(|f| f.name).collect();
    let mut out = base.to_vec();
    for f in overlay_files {
        if names.insert(f.name) {
            put_varint(&mut out, 1 << 3 | 2);
            put_varint(&mut out, f.bytes.len() as u64);
            out.extend_from_slice(f.bytes);
        }
    }
    if out.len() > u32::MAX as usize {
        return Err(format!("layered descriptors take {} bytes, more than a plan can hold", out.len()));
    }
    Ok(out)
}

/// One `FileDescriptorProto` of a set: its encoding and its name (field 1;
/// empty when absent).
#[derive(Debug)]
struct File<'a> {
    bytes: &'a [u8],
    name: &'a [u8],
}

/// The files of an encoded `google.protobuf.FileDescriptorSet` (field 1),
/// other fields skipped.
fn files(set: &[u8]) -> Result<Vec<File<'_>>, String> {
    let mut out = Vec::new();
    let mut set = Wire { bytes: set, pos: 0 };
    while let Some((number, value)) = set.field()? {
        if number != 1 {
            continue;
        }
        let bytes = value.ok_or("a file is not length-delimited")?;
        let mut file = Wire { bytes, pos: 0 };
        let mut name: &[u8] = &[];
        while let Some((number, value)) = file.field()? {
            if number == 1 {
                name = value.ok_or("a file name is not length-delimited")?;
            }
        }
        out.push(File { bytes, name });
    }
    Ok(out)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A field's number and, when it is length-delimited, its content.
type Field<'a> = (u32, Option<&'a [u8]>);

/// A minimal protobuf wire reader: enough to walk fields and skip them.
struct Wire<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Wire<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = *self.bytes.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            if i == 9 && b > 1 {
                return Err("varint longer than 64 bits".into());
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 64 bits".into())
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&end| end <= self.bytes.len())
            .ok_or("field extends past the end of its message")?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// A field key: number and wire type.
    fn key(&mut self) -> Result<(u32, u8), String> {
        let key = self.varint()?;
        let number = u32::try_from(key >> 3).map_err(|_| "field number out of range")?;
        if number == 0 || number >= 1 << 29 {
            return Err(format!("field number {number} out of range"));
        }
        Ok((number, (key & 7) as u8))
    }

    /// The next field: its number and, when length-delimited, its content.
    /// None at the end of the message.
    fn field(&mut self) -> Result<Option<Field<'a>>, String> {
        if self.pos == self.bytes.len() {
            return Ok(None);
        }
        let (number, wire_type) = self.key()?;
        Ok(Some((number, self.value(number, wire_type, 0)?)))
    }

    /// Reads (or skips) the value of a field whose key was just read.
    fn value(&mut self, number: u32, wire_type: u8, depth: usize) -> Result<Option<&'a [u8]>, String> {
        match wire_type {
            0 => {
                self.varint()?;
            }
            1 => {
                self.take(8)?;
            }
            2 => {
                let n = self.varint()?;
                return self.take(n).map(Some);
            }
            3 => {
                if depth >= MAX_GROUP_DEPTH {
                    return Err("groups nested too deeply".into());
                }
                loop {
                    if self.pos == self.bytes.len() {
                        return Err(format!("group {number} is not closed"));
                    }
                    match self.key()? {
                        (n, 4) if n == number => break,
                        (n, 4) => return Err(format!("group {number} closed as {n}")),
                        (n, wire_type) => {
                            self.value(n, wire_type, depth + 1)?;
                        }
                    }
                }
            }
            4 => return Err(format!("end of group {number} that was not opened")),
            5 => {
                self.take(4)?;
            }
            t => return Err(format!("unknown wire type {t}")),
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    // ---- building plans by hand ----

    fn file(name: &str, package: &str) -> Vec<u8> {
        let mut f = Vec::new();
        for (number, text) in [(1u64, name), (2, package)] {
            put_varint(&mut f, number << 3 | 2);
            put_varint(&mut f, text.len() as u64);
            f.extend_from_slice(text.as_bytes());
        }
        f
    }

    fn set(files: &[Vec<u8>]) -> Vec<u8> {
        let mut s = Vec::new();
        for f in files {
            put_varint(&mut s, 1 << 3 | 2);
            put_varint(&mut s, f.len() as u64);
            s.extend_from_slice(f);
        }
        s
    }

    fn names(descriptors: &[u8]) -> Vec<String> {
        files(descriptors).unwrap().iter().map(|f| String::from_utf8(f.name.to_vec()).unwrap()).collect()
    }

    fn method(path: &str, kind: MethodKind) -> Method {
        Method {
            path: path.into(),
            kind,
            input_type: "pkg.Req".into(),
            output_type: "pkg.Resp".into(),
            fields: vec![],
            metadata_keys: vec![],
            responses: vec![],
            rules: vec![],
            duplex: false,
            regexes: vec![],
            checks: vec![],
            cel_checks: vec![],
        }
    }

    fn string_field(name: &str, number: u32) -> FieldPath {
        FieldPath {
            name: name.into(),
            numbers: vec![number],
            kind: ScalarKind::String,
            default: Value::Bytes(vec![]),
            shape: Shape::Singular,
            message: MessageSel::Single,
            picks: Vec::new(),
        }
    }

    fn int_field(name: &str, number: u32) -> FieldPath {
        FieldPath {
            name: name.into(),
            numbers: vec![number],
            kind: ScalarKind::Int64,
            default: Value::I64(0),
            shape: Shape::Singular,
            message: MessageSel::Single,
            picks: Vec::new(),
        }
    }

    fn rule(conditions: Vec<Condition>, response: u32, origin: &str) -> Rule {
        Rule { conditions, response, priority: 0, origin: origin.into(), raw: None, skip_validation: false }
    }

    fn cond(source: Source, test: Test) -> Condition {
        Condition { source, test }
    }

    fn text_template(exprs: Vec<Expr>) -> Template {
        Template {
            pieces: vec![Piece::Nested {
                key: vec![0x0a],
                pieces: vec![Piece::Text { key: vec![0x12], parts: exprs.into_iter().map(Part::Expr).collect() }],
            }],
        }
    }

    fn reply(text: &[u8]) -> Response {
        Response { body: grpc_frame(text), ..Default::default() }
    }

    fn round_trips(plan: &Plan) {
        let back = Plan::from_bytes(&plan.to_bytes()).unwrap_or_else(|e| panic!("{e}\n{}", plan.dump()));
        assert_eq!(&back, plan);
    }

    /// A base and an overlay for `/pkg.Svc/Get` that share some inputs.
    fn pair() -> (Plan, Plan) {
        let mut b = method("/pkg.Svc/Get", MethodKind::Unary);
        b.fields = vec![string_field("name", 1), int_field("age", 2)];
        b.metadata_keys = vec!["x-tenant".into()];
        b.regexes = vec![vec![1, 1]];
        b.responses = vec![reply(b"base"), reply(b"base default")];
        b.rules = vec![
            rule(
                vec![
                    cond(Source::Field(0), Test::Op(Op::Regex(0))),
                    cond(Source::Metadata(0), Test::Op(Op::Eq(Value::Bytes(b"a".to_vec())))),
                ],
                0,
                "base.yaml:1:1",
            ),
            rule(vec![], 1, "base.yaml:9:1"),
        ];
        let base = Plan { descriptors: set(&[file("a.proto", "a"), file("b.proto", "b")]), methods: vec![b] };

        let mut o = method("/pkg.Svc/Get", MethodKind::Unary);
        // Field 0 is new, field 1 is the base's field 1, field 2 its field 0.
        o.fields = vec![string_field("city", 3), int_field("age", 2), string_field("name", 1)];
        o.metadata_keys = vec!["x-user".into(), "x-tenant".into()];
        o.regexes = vec![vec![2, 2], vec![1, 1]];
        o.responses = vec![
            Response {
                body: grpc_frame(b"x"),
                templates: vec![(
                    0,
                    text_template(vec![
                        Expr::Field(0),
                        Expr::Format(b"%s/%s".to_vec(), vec![Expr::Metadata(0), Expr::Field(2)]),
                        Expr::Arith(Box::new(Expr::Field(1)), b'+', Box::new(Expr::Metadata(1))),
                    ]),
                )],
                ..Default::default()
            },
            reply(b"overlay"),
        ];
        o.rules = vec![
            rule(
                vec![
                    cond(
                        Source::Field(0),
                        Test::All(vec![
                            Test::Op(Op::Regex(0)),
                            Test::Not(Box::new(Test::Any(vec![Test::Op(Op::Regex(1))]))),
                            Test::Op(Op::Len(Box::new(Test::Op(Op::Gt(Value::U64(2)))))),
                        ]),
                    ),
                    cond(Source::Field(1), Test::Op(Op::Gte(Value::I64(18)))),
                    cond(Source::Metadata(0), Test::Op(Op::Exists)),
                ],
                1,
                "live:1:1",
            ),
            rule(
                vec![cond(Source::Field(2), Test::Op(Op::Regex(1))), cond(Source::Metadata(1), Test::Op(Op::Exists))],
                0,
                "live:5:1",
            ),
        ];
        let overlay = Plan { descriptors: set(&[file("b.proto", "b, again"), file("c.proto", "c")]), methods: vec![o] };
        (base, overlay)
    }

    #[test]
    fn overlay_rules_come_first_and_are_remapped() {
        let (base, overlay) = pair();
        round_trips(&base);
        round_trips(&overlay);
        let plan = layer(&base, &overlay).unwrap();
        round_trips(&plan);
        let m = &plan.methods[0];
        let (b, o) = (&base.methods[0], &overlay.methods[0]);

        // Tables: the base's, then what the overlay adds, shared where equal.
        assert_eq!(m.fields, vec![string_field("name", 1), int_field("age", 2), string_field("city", 3)]);
        assert_eq!(m.metadata_keys, vec!["x-tenant".to_string(), "x-user".to_string()]);
        assert_eq!(m.regexes, vec![vec![1, 1], vec![2, 2]]);
        assert_eq!(m.responses[..2], b.responses[..]);
        assert_eq!(m.responses[2].body, o.responses[0].body);
        assert_eq!(m.responses[3], o.responses[1]);

        // Rules: the overlay's, remapped, then the base's untouched.
        assert_eq!(m.rules.len(), 4);
        assert_eq!(m.rules[2..], b.rules[..]);
        let r0 = &m.rules[0];
        assert_eq!(r0.origin, "live:1:1");
        assert_eq!(r0.response, 3);
        assert_eq!(
            r0.conditions,
            vec![
                cond(
                    Source::Field(2),
                    Test::All(vec![
                        Test::Op(Op::Regex(1)),
                        Test::Not(Box::new(Test::Any(vec![Test::Op(Op::Regex(0))]))),
                        Test::Op(Op::Len(Box::new(Test::Op(Op::Gt(Value::U64(2)))))),
                    ]),
                ),
                cond(Source::Field(1), Test::Op(Op::Gte(Value::I64(18)))),
                cond(Source::Metadata(1), Test::Op(Op::Exists)),
            ]
        );
        let r1 = &m.rules[1];
        assert_eq!(r1.response, 2);
        assert_eq!(
            r1.conditions,
            vec![cond(Source::Field(0), Test::Op(Op::Regex(0))), cond(Source::Metadata(0), Test::Op(Op::Exists))]
        );
        assert_eq!(
            m.responses[2].templates,
            vec![(
                0,
                text_template(vec![
                    Expr::Field(2),
                    Expr::Format(b"%s/%s".to_vec(), vec![Expr::Metadata(1), Expr::Field(0)]),
                    Expr::Arith(Box::new(Expr::Field(1)), b'+', Box::new(Expr::Metadata(0))),
                ]),
            )]
        );
        assert!(!m.duplex);
    }

    #[test]
    fn descriptors_are_unioned_by_file_name() {
        let (base, overlay) = pair();
        let plan = layer(&base, &overlay).unwrap();
        assert_eq!(names(&plan.descriptors), ["a.proto", "b.proto", "c.proto"]);
        // The base's bytes come first, unchanged: b.proto is the base's.
        assert!(plan.descriptors.starts_with(&base.descriptors));
        assert_eq!(files(&plan.descriptors).unwrap()[1].bytes, file("b.proto", "b"));
        assert_eq!(files(&plan.descriptors).unwrap()[2].bytes, file("c.proto", "c"));

        // Nothing new: the base's set as it is; an empty overlay set too.
        let same = Plan { descriptors: set(&[file("a.proto", "other")]), methods: vec![] };
        assert_eq!(layer(&base, &same).unwrap().descriptors, base.descriptors);
        assert_eq!(layer(&base, &Plan::default()).unwrap().descriptors, base.descriptors);
        assert_eq!(names(&layer(&Plan::default(), &overlay).unwrap().descriptors), ["b.proto", "c.proto"]);
    }

    #[test]
    fn descriptors_skip_other_fields_and_groups() {
        let mut s = Vec::new();
        s.extend_from_slice(&[0x10, 0x96, 0x01]); // field 2, varint
        s.extend_from_slice(&[0x19, 1, 2, 3, 4, 5, 6, 7, 8]); // field 3, fixed64
        s.extend_from_slice(&[0x25, 1, 2, 3, 4]); // field 4, fixed32
        s.extend_from_slice(&[0x2b, 0x08, 0x01, 0x33, 0x34, 0x2c]); // group 5 holding group 6
                                                                    // A file with unknown fields around a name given twice: the last wins.
        let mut f = vec![0x0a, 1, b'x', 0x18, 0x05];
        f.extend_from_slice(&[0x0a, 3, b'y', b'.', b'p']);
        s.extend_from_slice(&set(&[f.clone()]));
        // A file with no name.
        s.extend_from_slice(&set(&[vec![0x12, 1, b'z']]));
        let fs = files(&s).unwrap();
        assert_eq!(fs.len(), 2);
        assert_eq!((fs[0].name, fs[0].bytes), (&b"y.p"[..], &f[..]));
        assert_eq!(fs[1].name, b"");
    }

    #[test]
    fn malformed_descriptors_are_errors() {
        let bad: [&[u8]; 12] = [
            &[0x0a],                                                             // no length
            &[0x0a, 5, 1, 2],                                                    // length past the end
            &[0x08],                                                             // no varint
            &[0x09, 1, 2, 3],                                                    // short fixed64
            &[0x00],                                                             // field 0
            &[0x0e],                                                             // wire type 6
            &[0x0c],                                                             // end of a group never opened
            &[0x0b, 0x08, 0x01],                                                 // group not closed
            &[0x0b, 0x14],                                                       // group closed by another number
            &[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], // varint too long
            &[0x08, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80], // never ends
            &[0x0a, 2, 0x08, 0x01],                                              // a file whose name is a varint
        ];
        for b in bad {
            let base = Plan { descriptors: b.to_vec(), methods: vec![] };
            let err = layer(&base, &Plan::default()).unwrap_err();
            assert!(err.contains("the plan's descriptors are malformed"), "{b:?}: {err}");
            let err = layer(&Plan::default(), &base).unwrap_err();
            assert!(err.contains("the overlay's descriptors are malformed"), "{b:?}: {err}");
        }
        // A set whose field 1 is not length-delimited.
        assert!(files(&[0x08, 0x01]).is_err());
        // Deep groups are refused rather than recursed into.
        let mut deep = vec![0x0b; 100];
        deep.extend(std::iter::repeat_n(0x0c, 100));
        assert!(files(&deep).unwrap_err().contains("nested too deeply"));
        // Random bytes: an answer, never a panic.
        let mut rng = Rng(7);
        for _ in 0..2000 {
            let n = rng.below(24);
            let b: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            let _ = files(&b);
        }
    }

    #[test]
    fn new_methods_take_their_place_by_path() {
        let (mut base, mut overlay) = pair();
        base.methods.push(method("/pkg.Svc/Put", MethodKind::ClientStreaming));
        let mut first = method("/a.Svc/First", MethodKind::Unary);
        first.responses = vec![reply(b"first")];
        first.rules = vec![rule(vec![], 0, "live:1:1")];
        let last = method("/z.Svc/Last", MethodKind::ServerStreaming);
        let between = method("/pkg.Svc/Head", MethodKind::Unary);
        overlay.methods = vec![first.clone(), overlay.methods[0].clone(), between.clone(), last.clone()];
        round_trips(&base);
        round_trips(&overlay);
        let plan = layer(&base, &overlay).unwrap();
        round_trips(&plan);
        let paths: Vec<&str> = plan.methods.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(paths, ["/a.Svc/First", "/pkg.Svc/Get", "/pkg.Svc/Head", "/pkg.Svc/Put", "/z.Svc/Last"]);
        assert_eq!(plan.methods[0], first);
        assert_eq!(plan.methods[2], between);
        assert_eq!(plan.methods[3], base.methods[1]);
        assert_eq!(plan.methods[4], last);
        assert_eq!(plan.method("/pkg.Svc/Get").unwrap().rules.len(), 4);

        // Methods only in the base are untouched.
        let plan = layer(&base, &Plan::default()).unwrap();
        assert_eq!(plan.methods, base.methods);
    }

    #[test]
    fn changed_methods_are_errors() {
        let (base, overlay) = pair();
        let mut o = overlay.clone();
        o.methods[0].kind = MethodKind::ServerStreaming;
        let err = layer(&base, &o).unwrap_err();
        assert!(err.contains("/pkg.Svc/Get") && err.contains("server_streaming"), "{err}");

        let mut o = overlay.clone();
        o.methods[0].input_type = "pkg.Other".into();
        let err = layer(&base, &o).unwrap_err();
        assert!(err.contains("/pkg.Svc/Get") && err.contains("pkg.Other"), "{err}");

        let mut o = overlay.clone();
        o.methods[0].output_type = "pkg.Other".into();
        // Even with no rules: the overlay's protos changed a served method.
        o.methods[0].rules.clear();
        let err = layer(&base, &o).unwrap_err();
        assert!(err.contains("/pkg.Svc/Get") && err.contains("pkg.Other"), "{err}");
    }

    #[test]
    fn duplex_flags_must_agree_when_both_have_rules() {
        let bidi = |duplex: bool, rules: bool| {
            let mut m = method("/pkg.Chat/Talk", MethodKind::BidiStreaming);
            m.duplex = duplex;
            if rules {
                m.responses = vec![reply(b"hi")];
                m.rules = vec![rule(vec![], 0, "x:1:1")];
            }
            Plan { descriptors: vec![], methods: vec![m] }
        };
        let err = layer(&bidi(false, true), &bidi(true, true)).unwrap_err();
        assert!(err.contains("/pkg.Chat/Talk") && err.contains("duplex"), "{err}");
        let err = layer(&bidi(true, true), &bidi(false, true)).unwrap_err();
        assert!(err.contains("/pkg.Chat/Talk"), "{err}");
        for (base, overlay, want) in [
            (bidi(true, true), bidi(true, true), true),
            (bidi(false, true), bidi(false, true), false),
            (bidi(false, false), bidi(true, true), true),
            (bidi(true, true), bidi(false, false), true),
            (bidi(false, true), bidi(true, false), false),
            (bidi(true, false), bidi(false, false), true),
        ] {
            let plan = layer(&base, &overlay).unwrap();
            assert_eq!(plan.methods[0].duplex, want);
            round_trips(&plan);
        }
    }

    #[test]
    fn bad_overlays_are_errors_not_panics() {
        let (base, overlay) = pair();
        type Break = fn(&mut Method);
        let cases: [(&str, Break); 7] = [
            ("field index 9", |m| m.rules[0].conditions[0].source = Source::Field(9)),
            ("metadata index 9", |m| m.rules[0].conditions[0].source = Source::Metadata(9)),
            ("regex index 9", |m| m.rules[0].conditions[0].test = Test::Not(Box::new(Test::Op(Op::Regex(9))))),
            ("response index 9", |m| m.rules[0].response = 9),
            ("template field index 9", |m| m.responses[0].templates[0].1 = text_template(vec![Expr::Field(9)])),
            ("template metadata index 9", |m| {
                m.responses[0].templates[0].1 =
                    text_template(vec![Expr::Arith(Box::new(Expr::Now), b'+', Box::new(Expr::Metadata(9)))])
            }),
            ("nested too deeply", |m| {
                let mut t = Test::Op(Op::Exists);
                for _ in 0..100 {
                    t = Test::Not(Box::new(t));
                }
                m.rules[1].conditions[0].test = t;
            }),
        ];
        for (want, break_it) in cases {
            let mut o = overlay.clone();
            break_it(&mut o.methods[0]);
            let err = layer(&base, &o).unwrap_err();
            assert!(err.contains("/pkg.Svc/Get") && err.contains(want), "{want}: {err}");
        }

        let mut twice = overlay.clone();
        twice.methods.push(twice.methods[0].clone());
        assert!(layer(&base, &twice).unwrap_err().contains("twice"));
        assert!(layer(&twice, &base).unwrap_err().contains("twice"));
    }

    #[test]
    fn tables_past_the_limit_are_errors() {
        // Tables of 2^24 entries are too big for a unit test: the same code
        // runs here with a small limit.
        let at = ("things", "/p.S/M");
        let base = [10u32, 11, 12];
        let (table, map) = merge_table(&base, &[12, 13, 10, 13], |x| *x, at, 4).unwrap();
        assert_eq!((table, map), (vec![10, 11, 12, 13], vec![2, 3, 0, 3]));
        let err = merge_table(&base, &[13, 14], |x| *x, at, 4).unwrap_err();
        assert!(err.contains("/p.S/M") && err.contains("5 things"), "{err}");
        assert!(merge_table(&base, &[], |x| *x, at, 2).is_err());
    }

    #[test]
    fn identical_field_paths_are_shared_bit_for_bit() {
        let f =
            |default: f64| FieldPath { kind: ScalarKind::Double, default: Value::F64(default), ..int_field("x", 1) };
        assert_eq!(field_key(&f(f64::NAN)), field_key(&f(f64::NAN)));
        assert_ne!(field_key(&f(0.0)), field_key(&f(-0.0)));
        let g = |message| FieldPath { message, ..int_field("x", 1) };
        assert_ne!(field_key(&g(MessageSel::First)), field_key(&g(MessageSel::Last)));
        assert_ne!(field_key(&g(MessageSel::Nth(0))), field_key(&g(MessageSel::Nth(1))));
        assert_ne!(field_key(&int_field("ab", 1)), field_key(&int_field("a", 1)));
    }

    // ---- random pairs ----

    /// splitmix64: small, deterministic, good enough to pick test cases.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn chance(&mut self, one_in: usize) -> bool {
            self.below(one_in) == 0
        }
        /// A random selection of `pool`, in random order.
        fn subset<T: Clone>(&mut self, pool: &[T]) -> Vec<T> {
            let mut v: Vec<T> = pool.iter().filter(|_| self.chance(2)).cloned().collect();
            for i in (1..v.len()).rev() {
                v.swap(i, self.below(i + 1));
            }
            v
        }
    }

    const PATHS: [&str; 5] = ["/p.S/A", "/p.S/B", "/p.S/C", "/q.T/D", "/q.T/E"];
    const KINDS: [MethodKind; 5] = [
        MethodKind::Unary,
        MethodKind::ServerStreaming,
        MethodKind::ClientStreaming,
        MethodKind::BidiStreaming,
        MethodKind::BidiStreaming,
    ];

    fn field_pool() -> Vec<FieldPath> {
        let at = |message| FieldPath { message, ..string_field("name", 1) };
        vec![
            string_field("name", 1),
            FieldPath { shape: Shape::Repeated, kind: ScalarKind::Int32, ..int_field("tags", 2) },
            FieldPath { numbers: vec![3, 1], ..int_field("user.id", 3) },
            FieldPath { kind: ScalarKind::Double, default: Value::F64(0.0), ..int_field("score", 4) },
            FieldPath {
                shape: Shape::MapValue { key_kind: ScalarKind::String, key: Value::Bytes(b"k".to_vec()) },
                ..string_field("attrs.k", 5)
            },
            FieldPath {
                numbers: vec![],
                kind: ScalarKind::Int32,
                shape: Shape::OneofCase { members: vec![6, 7] },
                message: MessageSel::Last,
                ..int_field("kind", 0)
            },
            FieldPath {
                numbers: vec![],
                kind: ScalarKind::Uint64,
                default: Value::U64(0),
                message: MessageSel::Count,
                ..int_field("count", 0)
            },
            at(MessageSel::First),
            at(MessageSel::Nth(2)),
        ]
    }

    fn random_value(rng: &mut Rng, class: ValueClass) -> Value {
        match class {
            ValueClass::I64 => Value::I64(rng.next() as i64 % 100),
            ValueClass::U64 => Value::U64(rng.next() % 100),
            ValueClass::F64 => Value::F64(rng.below(100) as f64 / 4.0),
            ValueClass::Bool => Value::Bool(rng.chance(2)),
            ValueClass::Bytes => Value::Bytes(vec![b'a' + rng.below(3) as u8; rng.below(3)]),
        }
    }

    /// A test that fits what it reads: `repeated` elements of `class`, or one
    /// value of it.
    fn random_test(rng: &mut Rng, class: ValueClass, repeated: bool, regexes: usize, depth: usize) -> Test {
        let leaf = depth >= 3;
        match rng.below(if leaf { 3 } else { 6 }) {
            0 => Test::Op(Op::Exists),
            1 if repeated => Test::Op(Op::Contains(random_value(rng, class))),
            1 => Test::Op(Op::Eq(random_value(rng, class))),
            2 => match (repeated, class) {
                (false, ValueClass::Bytes) if regexes > 0 && rng.chance(2) => {
                    Test::Op(Op::Regex(rng.below(regexes) as u32))
                }
                (false, ValueClass::Bytes) => Test::Op(Op::Prefix(b"a".to_vec())),
                (false, ValueClass::I64 | ValueClass::U64 | ValueClass::F64) => {
                    Test::Op(Op::Lte(random_value(rng, class)))
                }
                _ => Test::Op(Op::Exists),
            },
            3 => Test::Not(Box::new(random_test(rng, class, repeated, regexes, depth + 1))),
            4 => {
                let list = (0..rng.below(3)).map(|_| random_test(rng, class, repeated, regexes, depth + 1)).collect();
                if rng.chance(2) {
                    Test::Any(list)
                } else {
                    Test::All(list)
                }
            }
            _ if repeated || class == ValueClass::Bytes => {
                Test::Op(Op::Len(Box::new(random_test(rng, ValueClass::U64, false, regexes, depth + 1))))
            }
            _ => Test::Op(Op::Exists),
        }
    }

    fn random_expr(rng: &mut Rng, m: &Method, depth: usize) -> Expr {
        match rng.below(if depth >= 2 { 4 } else { 6 }) {
            0 if !m.fields.is_empty() => {
                let i = rng.below(m.fields.len()) as u32;
                match m.fields[i as usize].is_multi() {
                    true => Expr::Aggregate(i, Agg::Count),
                    false => Expr::Field(i),
                }
            }
            1 if !m.metadata_keys.is_empty() => Expr::Metadata(rng.below(m.metadata_keys.len()) as u32),
            2 => Expr::RandomInt(1, 6),
            4 => Expr::Format(b"%s-%s".to_vec(), vec![random_expr(rng, m, depth + 1), random_expr(rng, m, depth + 1)]),
            5 => Expr::Arith(Box::new(random_expr(rng, m, depth + 1)), b'*', Box::new(random_expr(rng, m, depth + 1))),
            _ => Expr::StreamIndex,
        }
    }

    fn random_template(rng: &mut Rng, m: &Method) -> Template {
        let mut pieces = vec![Piece::Bytes(vec![0x08, 0x01])];
        for _ in 0..rng.below(3) {
            let parts = vec![Part::Lit(b"<".to_vec()), Part::Expr(random_expr(rng, m, 0))];
            pieces.push(match rng.below(3) {
                0 => Piece::Text { key: vec![0x12], parts },
                1 => Piece::Number { key: vec![0x18], kind: ScalarKind::Int64, parts },
                _ => Piece::Nested { key: vec![0x22], pieces: vec![Piece::Text { key: vec![0x0a], parts }] },
            });
        }
        Template { pieces }
    }

    fn random_method(rng: &mut Rng, which: usize, duplex: bool) -> Method {
        let mut m = method(PATHS[which], KINDS[which]);
        m.fields = rng.subset(&field_pool());
        m.metadata_keys = rng.subset(&["x-a".to_string(), "x-b".into(), "x-c".into(), "authorization".into()]);
        m.regexes = rng.subset(&[vec![1], vec![2, 2], vec![3, 3, 3]]);
        m.duplex = duplex && m.kind == MethodKind::BidiStreaming;
        for i in 0..1 + rng.below(3) {
            let mut r = reply(format!("{which}/{i}").as_bytes());
            r.stream = (0..rng.below(3)).map(|j| grpc_frame(&[j as u8])).collect();
            r.times = rng.below(3) as u32;
            for slot in 0..=r.stream.len() {
                if rng.chance(2) {
                    r.templates.push((slot as u32, random_template(rng, &m)));
                }
            }
            m.responses.push(r);
        }
        for i in 0..rng.below(5) {
            let mut conditions = Vec::new();
            for _ in 0..rng.below(4) {
                let use_field = !m.fields.is_empty() && (m.metadata_keys.is_empty() || rng.chance(2));
                if use_field {
                    let f = rng.below(m.fields.len());
                    let (class, repeated) = (m.fields[f].kind.value_class(), m.fields[f].shape == Shape::Repeated);
                    let test = random_test(rng, class, repeated, m.regexes.len(), 0);
                    conditions.push(cond(Source::Field(f as u32), test));
                } else if !m.metadata_keys.is_empty() {
                    let test = random_test(rng, ValueClass::Bytes, false, m.regexes.len(), 0);
                    conditions.push(cond(Source::Metadata(rng.below(m.metadata_keys.len()) as u32), test));
                }
            }
            let response = rng.below(m.responses.len()) as u32;
            m.rules.push(Rule {
                conditions,
                response,
                priority: rng.below(3) as i64,
                origin: format!("r:{i}:1"),
                raw: None,
                skip_validation: rng.below(4) == 0,
            });
        }
        m
    }

    fn random_plan(rng: &mut Rng, duplex: &[bool; 5]) -> Plan {
        let mut methods = Vec::new();
        for w in 0..PATHS.len() {
            if !rng.chance(3) {
                let duplex = duplex[w] ^ rng.chance(8);
                methods.push(random_method(rng, w, duplex));
            }
        }
        let mut files = Vec::new();
        for name in ["a.proto", "b.proto", "c.proto", "d.proto"] {
            if rng.chance(2) {
                files.push(file(name, &format!("pkg{}", rng.below(100))));
            }
        }
        Plan { descriptors: set(&files), methods }
    }

    /// A rule's conditions with every index replaced by what it points at.
    fn resolve_rule(m: &Method, r: &Rule) -> String {
        fn test(m: &Method, t: &Test) -> String {
            match t {
                Test::Op(Op::Regex(i)) => format!("regex {:?}", m.regexes[*i as usize]),
                Test::Op(Op::Len(t)) => format!("len({})", test(m, t)),
                Test::Op(Op::Chars(t)) => format!("chars({})", test(m, t)),
                Test::Op(Op::Format(f)) => format!("format({f:?})"),
                Test::Op(Op::Unique) => "unique".to_string(),
                Test::Op(op) => format!("{op:?}"),
                Test::Not(t) => format!("not({})", test(m, t)),
                Test::Any(l) => format!("any({})", l.iter().map(|t| test(m, t)).collect::<Vec<_>>().join(", ")),
                Test::All(l) => format!("all({})", l.iter().map(|t| test(m, t)).collect::<Vec<_>>().join(", ")),
            }
        }
        let conditions: Vec<String> = r
            .conditions
            .iter()
            .map(|c| {
                let source = match c.source {
                    Source::Field(i) => format!("{:?}", m.fields[i as usize]),
                    Source::Metadata(i) => m.metadata_keys[i as usize].clone(),
                };
                format!("{source}: {}", test(m, &c.test))
            })
            .collect();
        let response = resolve_response(m, &m.responses[r.response as usize]);
        format!("{conditions:?} -> {response} ({} {})", r.priority, r.origin)
    }

    /// A response with the indices of its templates replaced likewise.
    fn resolve_response(m: &Method, r: &Response) -> String {
        fn expr(m: &Method, e: &Expr) -> String {
            match e {
                Expr::Field(i) => format!("{:?}", m.fields[*i as usize]),
                Expr::Aggregate(i, agg) => format!("{agg:?} {:?}", m.fields[*i as usize]),
                Expr::Metadata(i) => format!("meta {}", m.metadata_keys[*i as usize]),
                Expr::Format(f, args) => {
                    format!("format({f:?}, {})", args.iter().map(|a| expr(m, a)).collect::<Vec<_>>().join(", "))
                }
                Expr::Arith(l, op, r) => format!("({} {op} {})", expr(m, l), expr(m, r)),
                e => format!("{e:?}"),
            }
        }
        fn pieces(m: &Method, ps: &[Piece]) -> String {
            let parts = |parts: &[Part]| {
                parts
                    .iter()
                    .map(|p| match p {
                        Part::Lit(b) => format!("{b:?}"),
                        Part::Expr(e) => expr(m, e),
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            ps.iter()
                .map(|p| match p {
                    Piece::Bytes(b) => format!("{b:?}"),
                    Piece::Nested { key, pieces: inner } => format!("{key:?}{{{}}}", pieces(m, inner)),
                    Piece::Text { key, parts: ps } => format!("{key:?}\"{}\"", parts(ps)),
                    Piece::Number { key, kind, parts: ps } => format!("{key:?}{kind:?}({})", parts(ps)),
                })
                .collect::<Vec<_>>()
                .join(" ")
        }
        let templates: Vec<String> =
            r.templates.iter().map(|(slot, t)| format!("{slot}: {}", pieces(m, &t.pieces))).collect();
        format!("{:?} {templates:?}", Response { templates: vec![], ..r.clone() })
    }

    fn check_layered(base: &Plan, overlay: &Plan, plan: &Plan) {
        round_trips(plan);

        let base_names = names(&base.descriptors);
        let mut want = base_names.clone();
        want.extend(names(&overlay.descriptors).into_iter().filter(|n| !base_names.contains(n)));
        assert_eq!(names(&plan.descriptors), want);
        assert!(plan.descriptors.starts_with(&base.descriptors));

        let mut paths: Vec<&str> = base.methods.iter().chain(&overlay.methods).map(|m| m.path.as_str()).collect();
        paths.sort();
        paths.dedup();
        assert_eq!(plan.methods.iter().map(|m| m.path.as_str()).collect::<Vec<_>>(), paths);

        for m in &plan.methods {
            let (b, o) = (base.method(&m.path), overlay.method(&m.path));
            let (b, o) = match (b, o) {
                (Some(b), Some(o)) => (b, o),
                (Some(only), None) | (None, Some(only)) => {
                    assert_eq!(m, only);
                    continue;
                }
                (None, None) => unreachable!(),
            };
            // The base's tables are a prefix, with nothing repeated after it.
            assert!(m.fields.starts_with(&b.fields));
            assert!(m.metadata_keys.starts_with(&b.metadata_keys));
            assert!(m.regexes.starts_with(&b.regexes));
            assert!(m.responses.starts_with(&b.responses));
            assert_eq!(m.responses.len(), b.responses.len() + o.responses.len());
            for (i, f) in m.fields.iter().enumerate().skip(b.fields.len()) {
                assert!(!m.fields[..i].contains(f) && o.fields.contains(f));
            }
            for (i, k) in m.metadata_keys.iter().enumerate().skip(b.metadata_keys.len()) {
                assert!(!m.metadata_keys[..i].contains(k) && o.metadata_keys.contains(k));
            }
            assert!(o.fields.iter().all(|f| m.fields.contains(f)));
            assert!(o.metadata_keys.iter().all(|k| m.metadata_keys.contains(k)));
            for (i, r) in o.responses.iter().enumerate() {
                assert_eq!(resolve_response(o, r), resolve_response(m, &m.responses[b.responses.len() + i]));
            }
            // The overlay's rules first, meaning the same; the base's after.
            assert_eq!(m.rules.len(), o.rules.len() + b.rules.len());
            for (r, layered) in o.rules.iter().zip(&m.rules) {
                assert_eq!(resolve_rule(o, r), resolve_rule(m, layered));
            }
            assert_eq!(m.rules[o.rules.len()..], b.rules[..]);
            for (r, layered) in b.rules.iter().zip(&m.rules[o.rules.len()..]) {
                assert_eq!(resolve_rule(b, r), resolve_rule(m, layered));
            }
        }
    }

    #[test]
    fn random_pairs_round_trip_and_keep_their_meaning() {
        let mut rng = Rng(0x5eed);
        let (mut ok, mut refused) = (0, 0);
        for round in 0..400 {
            let duplex = [rng.chance(2), rng.chance(2), rng.chance(2), rng.chance(2), rng.chance(2)];
            let base = random_plan(&mut rng, &duplex);
            let mut overlay = random_plan(&mut rng, &duplex);
            // Now and then, protos that changed a method.
            for m in &mut overlay.methods {
                if rng.chance(25) {
                    m.output_type = "p.Changed".into();
                }
            }
            round_trips(&base);
            round_trips(&overlay);
            match layer(&base, &overlay) {
                Ok(plan) => {
                    check_layered(&base, &overlay, &plan);
                    ok += 1;
                }
                Err(err) => {
                    let path = PATHS.iter().find(|p| err.contains(*p)).unwrap_or_else(|| panic!("{round}: {err}"));
                    let (b, o) = (base.method(path).unwrap(), overlay.method(path).unwrap());
                    let changed = b.output_type != o.output_type;
                    let modes = !b.rules.is_empty() && !o.rules.is_empty() && b.duplex != o.duplex;
                    assert!(changed || modes, "{round}: {err}");
                    refused += 1;
                }
            }
        }
        assert!(ok > 250 && refused > 10, "{ok} layered, {refused} refused");
    }
}
