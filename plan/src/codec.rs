//! Byte-level writer and validating reader of the plan layout.
//!
//! The METHODS section is a sequence of length-prefixed items:
//!
//! ```text
//! methods      count (4), then each method:
//! method       path (str) | kind (1) | input_type (str) | output_type (str)
//!              | fields (count, FieldPath...) | metadata_keys (count, str...)
//!              | responses (count, Response...) | regexes (count, bytes...) [v2]
//!              | rules (count, Rule...) | duplex (1) [v3]
//! FieldPath    name (str) | numbers (count, u32...) | kind (1) | default (Value)
//!              | shape (tag 1: 0 singular, 1 repeated, 2 map value: key kind (1)
//!                key (Value), 3 oneof case: members (count, u32...))  [v2]
//!              | message (tag 1: 0 single, 1 first, 2 last, 3 nth: index (4),
//!                4 count, 5 each [v7])  [v3]
//!              | picks (count, step (4) elem (tag 1: 0 index: i32 (4), 1 any,
//!                2 all))  [v7]
//! Value        tag (1: 0 i64, 1 u64, 2 f64, 3 bool, 4 bytes) | payload
//! Response     status (1) | message (str) | body (bytes) | headers (pairs)
//!              | trailers (pairs) | delay_ms (4)
//!              | stream (count, bytes...) | stream_delay_ms (4) | stream_repeat (4)
//!              | stream_random_order (1) | error_after (4)  [v3]
//!              | templates (count, slot (4) Template...)  [v4]
//!              | latency (tag 1: 0 fixed, 1 uniform, 2 normal, 3 log-normal;
//!                then two f64 for 1-3) | fault (1: 0 none, 1: rate (8)
//!                drop (1) status (1) message (str)) | times (4)  [v5]
//!              | metadata templates (count, trailer (1) name (str) parts)  [v6]
//!              | transport fault (1: 0 none, 1: after (4) action (tag 1:
//!                0 reset: code (4), 1 goaway: graceful (1), 2 close,
//!                3 stall write: ms (4), 4 stall read: ms (4), 5 trickle:
//!                bytes (4) every ms (4), 6 malformed))  [v7]
//! Template     pieces (count, Piece...)
//! Piece        tag (1: 0 bytes: bytes, 1 nested: key (bytes) pieces,
//!              2 text: key (bytes) parts, 3 number: key (bytes) kind (1) parts)
//! Part         tag (1: 0 literal: bytes, 1 expr: Expr)
//! Expr         tag (1: 0 field (4), 1 metadata (4), 2 stream index, 3 total,
//!              4 is-first, 5 is-last, 6 now, 7 uuid, 8 random int (8, 8),
//!              9 random float (8, 8), 10 format: bytes (count, Expr...),
//!              11 number (8), 12 string: bytes, 13 arith: Expr op (1) Expr,
//!              14 enum name: field (4) (count, number (4) name (bytes)...),
//!              15 fill: Expr pattern (bytes) [v6], 16 aggregate: field (4)
//!              agg (1: 0 count, 1 sum, 2 min, 3 max) [v7])
//! Rule         conditions (count, Condition...) | response (4) | priority (8)
//!              | origin (str)
//! Condition    source tag (1: 0 field, 1 metadata) | index (4) | Test
//! Test         tag (1: 0 op, 1 not, 2 any, 3 all) | Op, Test or (count, Test...)
//! Op           tag (1: 0 eq, 1 in, 2 gt, 3 gte, 4 lt, 5 lte, 6 exists,
//!              7 contains, 8 prefix, 9 suffix, 10 regex, 11 len) | operand
//! str, bytes   length (4) | bytes
//! ```
//!
//! Version 6 had no picks into repeated fields, no `each` message selector
//! and no aggregates.
//! Version 5 had no raw recordings, metadata templates, enum names or fills.
//! Version 4 had no latency distributions, faults or call limits.
//! Version 3 had no templates.
//! Version 2 had no message selectors, streams or duplex flag.
//! Version 1 had no shapes (all singular), no regexes, and a condition was
//! a source followed directly by an op with tag 0 (eq); v1 files still load.

use crate::*;
use std::fmt;

const HEADER_LEN: usize = 8 + 4 + 4 + 4 + 4 + 8;
const ENDIAN_CHECK: u32 = 0x0A0B_0C0D;
const SECTION_DESCRIPTORS: u32 = 1;
const SECTION_METHODS: u32 = 2;
/// Upper bound on any element count, so a corrupt count cannot make the
/// reader reserve absurd amounts of memory before failing.
const MAX_COUNT: u32 = 1 << 24;
/// Deepest nesting of tests accepted, so a crafted plan cannot exhaust the
/// stack of the reader or of the engine.
pub const MAX_TEST_DEPTH: usize = 32;

/// Why a plan could not be loaded. The message names the part that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    kind: LoadErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LoadErrorKind {
    TooShort,
    NotAPlan,
    WrongEndian,
    Version(u32),
    Checksum,
    Invalid { at: String, why: String },
}

impl LoadError {
    fn invalid(at: impl Into<String>, why: impl Into<String>) -> Self {
        LoadError { kind: LoadErrorKind::Invalid { at: at.into(), why: why.into() } }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            LoadErrorKind::TooShort => write!(f, "file is too short to be a plan (truncated?)"),
            LoadErrorKind::NotAPlan => write!(f, "not a plan file (bad magic bytes)"),
            LoadErrorKind::WrongEndian => write!(f, "plan was written with an unsupported byte order"),
            LoadErrorKind::Version(v) => write!(
                f,
                "plan format version {v} is not supported (this build reads versions {OLDEST_VERSION} to {VERSION}); recompile the plan with this compiler"
            ),
            LoadErrorKind::Checksum => write!(f, "plan checksum mismatch: the file is corrupt or truncated"),
            LoadErrorKind::Invalid { at, why } => write!(f, "invalid plan at {at}: {why}"),
        }
    }
}

impl std::error::Error for LoadError {}

/// FNV-1a, 64-bit: enough to catch corruption, not meant as a MAC. The
/// engine names plans and runtime files with it too.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A plan's identity, as the engine reports it: the FNV-1a of its bytes,
/// in 16 hex digits. It tells plans apart and catches a plan cut short or
/// damaged on its way; it does not prove who made it.
pub fn identity(bytes: &[u8]) -> String {
    format!("{:016x}", fnv1a(bytes))
}

impl Plan {
    /// Serializes the plan. The output is deterministic for a given plan.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut methods = Vec::new();
        write_methods(&mut methods, &self.methods);
        let sections: [(u32, &[u8]); 2] = [(SECTION_DESCRIPTORS, &self.descriptors), (SECTION_METHODS, &methods)];

        let table_len = sections.len() * 12;
        let mut body = Vec::with_capacity(table_len + self.descriptors.len() + methods.len());
        let mut offset = HEADER_LEN + table_len;
        for (kind, bytes) in &sections {
            body.extend_from_slice(&kind.to_le_bytes());
            body.extend_from_slice(&(offset as u32).to_le_bytes());
            body.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            offset += bytes.len();
        }
        for (_, bytes) in &sections {
            body.extend_from_slice(bytes);
        }

        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&ENDIAN_CHECK.to_le_bytes());
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
        out.extend_from_slice(&fnv1a(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Loads and fully validates a plan. Never panics, whatever the input.
    pub fn from_bytes(bytes: &[u8]) -> Result<Plan, LoadError> {
        if bytes.len() < 8 {
            return Err(LoadError { kind: LoadErrorKind::TooShort });
        }
        if bytes[..8] != MAGIC {
            return Err(LoadError { kind: LoadErrorKind::NotAPlan });
        }
        if bytes.len() < HEADER_LEN {
            return Err(LoadError { kind: LoadErrorKind::TooShort });
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        if u32_at(8) != ENDIAN_CHECK {
            return Err(LoadError { kind: LoadErrorKind::WrongEndian });
        }
        let version = u32_at(12);
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(LoadError { kind: LoadErrorKind::Version(version) });
        }
        if u32_at(16) != 0 {
            return Err(LoadError::invalid("header", "reserved word is not zero"));
        }
        let count = u32_at(20) as usize;
        let checksum = u64::from_le_bytes(bytes[24..32].try_into().unwrap());
        if fnv1a(&bytes[HEADER_LEN..]) != checksum {
            return Err(LoadError { kind: LoadErrorKind::Checksum });
        }
        if count > 64 || HEADER_LEN + count * 12 > bytes.len() {
            return Err(LoadError::invalid("section table", "section count out of range"));
        }
        let mut descriptors = None;
        let mut methods = None;
        for i in 0..count {
            let at = HEADER_LEN + i * 12;
            let (kind, off, len) = (u32_at(at), u32_at(at + 4) as usize, u32_at(at + 8) as usize);
            let section = off
                .checked_add(len)
                .filter(|&end| off >= HEADER_LEN + count * 12 && end <= bytes.len())
                .map(|end| &bytes[off..end])
                .ok_or_else(|| LoadError::invalid(format!("section {i}"), "extends past the end of the file"))?;
            match kind {
                SECTION_DESCRIPTORS if descriptors.is_none() => descriptors = Some(section),
                SECTION_METHODS if methods.is_none() => methods = Some(section),
                SECTION_DESCRIPTORS | SECTION_METHODS => {
                    return Err(LoadError::invalid(format!("section {i}"), "duplicate section"))
                }
                // Unknown sections are reserved for optional data of later
                // versions that keep the same layout for these two.
                _ => {}
            }
        }
        let descriptors = descriptors.ok_or_else(|| LoadError::invalid("section table", "no DESCRIPTORS section"))?;
        let methods = methods.ok_or_else(|| LoadError::invalid("section table", "no METHODS section"))?;
        let mut r = Reader { bytes: methods, pos: 0, version };
        let methods = read_methods(&mut r)?;
        if r.pos != r.bytes.len() {
            return Err(LoadError::invalid("METHODS section", "trailing bytes"));
        }
        Ok(Plan { descriptors: descriptors.to_vec(), methods })
    }
}

// ---- writer ---------------------------------------------------------------

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, v: &[u8]) {
    put_u32(out, v.len() as u32);
    out.extend_from_slice(v);
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
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
        Value::Bool(x) => {
            out.push(3);
            out.push(*x as u8);
        }
        Value::Bytes(x) => {
            out.push(4);
            put_bytes(out, x);
        }
    }
}

fn put_pairs(out: &mut Vec<u8>, pairs: &[(String, Vec<u8>)]) {
    put_u32(out, pairs.len() as u32);
    for (k, v) in pairs {
        put_bytes(out, k.as_bytes());
        put_bytes(out, v);
    }
}

fn put_test(out: &mut Vec<u8>, t: &Test) {
    match t {
        Test::Op(op) => {
            out.push(0);
            put_op(out, op);
        }
        Test::Not(inner) => {
            out.push(1);
            put_test(out, inner);
        }
        Test::Any(list) | Test::All(list) => {
            out.push(if matches!(t, Test::Any(_)) { 2 } else { 3 });
            put_u32(out, list.len() as u32);
            for t in list {
                put_test(out, t);
            }
        }
    }
}

fn put_op(out: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Eq(v) => {
            out.push(0);
            put_value(out, v);
        }
        Op::In(vs) => {
            out.push(1);
            put_u32(out, vs.len() as u32);
            for v in vs {
                put_value(out, v);
            }
        }
        Op::Gt(v) | Op::Gte(v) | Op::Lt(v) | Op::Lte(v) => {
            out.push(match op {
                Op::Gt(_) => 2,
                Op::Gte(_) => 3,
                Op::Lt(_) => 4,
                _ => 5,
            });
            put_value(out, v);
        }
        Op::Exists => out.push(6),
        Op::Contains(v) => {
            out.push(7);
            put_value(out, v);
        }
        Op::Prefix(b) | Op::Suffix(b) => {
            out.push(if matches!(op, Op::Prefix(_)) { 8 } else { 9 });
            put_bytes(out, b);
        }
        Op::Regex(i) => {
            out.push(10);
            put_u32(out, *i);
        }
        Op::Len(t) => {
            out.push(11);
            put_test(out, t);
        }
        Op::Chars(t) => {
            out.push(12);
            put_test(out, t);
        }
        Op::Format(f) => {
            out.push(13);
            out.push(*f as u8);
        }
        Op::Unique => out.push(14),
    }
}

fn put_pieces(out: &mut Vec<u8>, pieces: &[Piece]) {
    put_u32(out, pieces.len() as u32);
    for p in pieces {
        match p {
            Piece::Bytes(b) => {
                out.push(0);
                put_bytes(out, b);
            }
            Piece::Nested { key, pieces } => {
                out.push(1);
                put_bytes(out, key);
                put_pieces(out, pieces);
            }
            Piece::Text { key, parts } => {
                out.push(2);
                put_bytes(out, key);
                put_parts(out, parts);
            }
            Piece::Number { key, kind, parts } => {
                out.push(3);
                put_bytes(out, key);
                out.push(*kind as u8);
                put_parts(out, parts);
            }
        }
    }
}

fn put_parts(out: &mut Vec<u8>, parts: &[Part]) {
    put_u32(out, parts.len() as u32);
    for p in parts {
        match p {
            Part::Lit(b) => {
                out.push(0);
                put_bytes(out, b);
            }
            Part::Expr(e) => {
                out.push(1);
                put_expr(out, e);
            }
        }
    }
}

fn put_expr(out: &mut Vec<u8>, e: &Expr) {
    match e {
        Expr::Field(i) => {
            out.push(0);
            put_u32(out, *i);
        }
        Expr::Metadata(i) => {
            out.push(1);
            put_u32(out, *i);
        }
        Expr::StreamIndex => out.push(2),
        Expr::StreamTotal => out.push(3),
        Expr::StreamIsFirst => out.push(4),
        Expr::StreamIsLast => out.push(5),
        Expr::Now => out.push(6),
        Expr::Uuid => out.push(7),
        Expr::RandomInt(a, b) => {
            out.push(8);
            out.extend_from_slice(&a.to_le_bytes());
            out.extend_from_slice(&b.to_le_bytes());
        }
        Expr::RandomFloat(a, b) => {
            out.push(9);
            out.extend_from_slice(&a.to_bits().to_le_bytes());
            out.extend_from_slice(&b.to_bits().to_le_bytes());
        }
        Expr::Format(f, args) => {
            out.push(10);
            put_bytes(out, f);
            put_u32(out, args.len() as u32);
            for a in args {
                put_expr(out, a);
            }
        }
        Expr::Number(n) => {
            out.push(11);
            out.extend_from_slice(&n.to_bits().to_le_bytes());
        }
        Expr::Str(b) => {
            out.push(12);
            put_bytes(out, b);
        }
        Expr::Arith(l, op, r) => {
            out.push(13);
            put_expr(out, l);
            out.push(*op);
            put_expr(out, r);
        }
        Expr::Fill(n, pattern) => {
            out.push(15);
            put_expr(out, n);
            put_bytes(out, pattern);
        }
        Expr::Aggregate(i, agg) => {
            out.push(16);
            put_u32(out, *i);
            out.push(*agg as u8);
        }
        Expr::EnumName(i, names) => {
            out.push(14);
            put_u32(out, *i);
            put_u32(out, names.len() as u32);
            for (n, name) in names {
                put_u32(out, *n as u32);
                put_bytes(out, name);
            }
        }
    }
}

fn write_methods(out: &mut Vec<u8>, methods: &[Method]) {
    put_u32(out, methods.len() as u32);
    for m in methods {
        put_bytes(out, m.path.as_bytes());
        out.push(m.kind as u8);
        put_bytes(out, m.input_type.as_bytes());
        put_bytes(out, m.output_type.as_bytes());
        put_u32(out, m.fields.len() as u32);
        for f in &m.fields {
            put_bytes(out, f.name.as_bytes());
            put_u32(out, f.numbers.len() as u32);
            for n in &f.numbers {
                put_u32(out, *n);
            }
            out.push(f.kind as u8);
            put_value(out, &f.default);
            match &f.shape {
                Shape::Singular => out.push(0),
                Shape::Repeated => out.push(1),
                Shape::MapValue { key_kind, key } => {
                    out.push(2);
                    out.push(*key_kind as u8);
                    put_value(out, key);
                }
                Shape::OneofCase { members } => {
                    out.push(3);
                    put_u32(out, members.len() as u32);
                    for n in members {
                        put_u32(out, *n);
                    }
                }
            }
            match f.message {
                MessageSel::Single => out.push(0),
                MessageSel::First => out.push(1),
                MessageSel::Last => out.push(2),
                MessageSel::Nth(n) => {
                    out.push(3);
                    put_u32(out, n);
                }
                MessageSel::Count => out.push(4),
                MessageSel::Each => out.push(5),
            }
            put_u32(out, f.picks.len() as u32);
            for p in &f.picks {
                put_u32(out, p.step);
                match p.elem {
                    Elem::Index(i) => {
                        out.push(0);
                        put_u32(out, i as u32);
                    }
                    Elem::Any => out.push(1),
                    Elem::All => out.push(2),
                }
            }
        }
        put_u32(out, m.metadata_keys.len() as u32);
        for k in &m.metadata_keys {
            put_bytes(out, k.as_bytes());
        }
        put_u32(out, m.responses.len() as u32);
        for r in &m.responses {
            out.push(r.status);
            put_bytes(out, r.message.as_bytes());
            put_bytes(out, &r.body);
            put_pairs(out, &r.headers);
            put_pairs(out, &r.trailers);
            put_u32(out, r.delay_ms);
            put_u32(out, r.stream.len() as u32);
            for item in &r.stream {
                put_bytes(out, item);
            }
            put_u32(out, r.stream_delay_ms);
            put_u32(out, r.stream_repeat);
            out.push(r.stream_random_order as u8);
            put_u32(out, r.error_after);
            put_u32(out, r.templates.len() as u32);
            for (slot, t) in &r.templates {
                put_u32(out, *slot);
                put_pieces(out, &t.pieces);
            }
            let f64s = |out: &mut Vec<u8>, a: f64, b: f64| {
                out.extend_from_slice(&a.to_bits().to_le_bytes());
                out.extend_from_slice(&b.to_bits().to_le_bytes());
            };
            match r.latency {
                Latency::Fixed => out.push(0),
                Latency::Uniform { min, max } => {
                    out.push(1);
                    f64s(out, min, max);
                }
                Latency::Normal { mean, stddev } => {
                    out.push(2);
                    f64s(out, mean, stddev);
                }
                Latency::LogNormal { median, p99 } => {
                    out.push(3);
                    f64s(out, median, p99);
                }
            }
            match &r.fault {
                None => out.push(0),
                Some(f) => {
                    out.push(1);
                    out.extend_from_slice(&f.rate.to_bits().to_le_bytes());
                    out.push(f.drop as u8);
                    out.push(f.status);
                    put_bytes(out, f.message.as_bytes());
                }
            }
            put_u32(out, r.times);
            put_u32(out, r.metadata_templates.len() as u32);
            for t in &r.metadata_templates {
                out.push(t.trailer as u8);
                put_bytes(out, t.name.as_bytes());
                put_parts(out, &t.parts);
            }
            match r.fault.as_ref().and_then(|f| f.transport) {
                None => out.push(0),
                Some(t) => {
                    out.push(1);
                    put_u32(out, t.after);
                    match t.action {
                        Transport::Reset(code) => {
                            out.push(0);
                            put_u32(out, code);
                        }
                        Transport::GoAway { graceful } => {
                            out.push(1);
                            out.push(graceful as u8);
                        }
                        Transport::Close => out.push(2),
                        Transport::StallWrite(ms) => {
                            out.push(3);
                            put_u32(out, ms);
                        }
                        Transport::StallRead(ms) => {
                            out.push(4);
                            put_u32(out, ms);
                        }
                        Transport::Trickle { bytes, every_ms } => {
                            out.push(5);
                            put_u32(out, bytes);
                            put_u32(out, every_ms);
                        }
                        Transport::Malformed => out.push(6),
                    }
                }
            }
        }
        put_u32(out, m.regexes.len() as u32);
        for r in &m.regexes {
            put_bytes(out, r);
        }
        put_u32(out, m.rules.len() as u32);
        for rule in &m.rules {
            put_u32(out, rule.conditions.len() as u32);
            for c in &rule.conditions {
                put_source(out, c.source);
                put_test(out, &c.test);
            }
            put_u32(out, rule.response);
            out.extend_from_slice(&rule.priority.to_le_bytes());
            put_bytes(out, rule.origin.as_bytes());
            match &rule.raw {
                None => out.push(0),
                Some(raw) => {
                    out.push(1);
                    put_u32(out, raw.messages.len() as u32);
                    for m in &raw.messages {
                        put_bytes(out, m);
                    }
                    put_u32(out, raw.metadata_keys.len() as u32);
                    for k in &raw.metadata_keys {
                        put_bytes(out, k.as_bytes());
                    }
                    put_bytes(out, raw.content_type.as_bytes());
                    put_bytes(out, raw.encoding.as_bytes());
                }
            }
            out.push(rule.skip_validation as u8);
        }
        out.push(m.duplex as u8);
        put_u32(out, m.checks.len() as u32);
        for c in &m.checks {
            put_source(out, c.source);
            put_test(out, &c.test);
            put_u32(out, c.guards.len() as u32);
            for g in &c.guards {
                put_u32(out, *g);
            }
            put_bytes(out, c.rule_id.as_bytes());
            put_bytes(out, c.message.as_bytes());
            for steps in [&c.path, &c.rule] {
                put_u32(out, steps.len() as u32);
                for (number, name, kind) in steps {
                    put_u32(out, *number);
                    put_bytes(out, name.as_bytes());
                    out.push(*kind);
                }
            }
            out.push(c.pgv as u8);
            out.push(c.map_key.map_or(0, |k| k as u8));
            out.push(c.for_key as u8);
        }
        put_u32(out, m.cel_checks.len() as u32);
        for c in &m.cel_checks {
            put_u32(out, c.numbers.len() as u32);
            for n in &c.numbers {
                put_u32(out, *n);
            }
            out.push(c.field as u8);
            put_bytes(out, c.expression.as_bytes());
            put_bytes(out, c.rule_id.as_bytes());
            put_bytes(out, c.message.as_bytes());
            put_u32(out, c.path.len() as u32);
            for (number, name, kind) in &c.path {
                put_u32(out, *number);
                put_bytes(out, name.as_bytes());
                out.push(*kind);
            }
            put_bytes(out, c.rule.as_bytes());
            put_bytes(out, c.rules.as_bytes());
            out.push(c.skip_zero as u8);
            put_u32(out, c.each.map_or(u32::MAX, |(step, _)| step));
            out.push(c.each.map_or(0, |(_, kind)| kind));
        }
    }
}

fn put_source(out: &mut Vec<u8>, source: Source) {
    match source {
        Source::Field(i) => {
            out.push(0);
            put_u32(out, i);
        }
        Source::Metadata(i) => {
            out.push(1);
            put_u32(out, i);
        }
    }
}

// ---- reader ---------------------------------------------------------------

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    version: u32,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, at: &dyn Fn() -> String) -> Result<&'a [u8], LoadError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(LoadError::invalid(at(), "truncated")),
        }
    }
    fn u8(&mut self, at: &dyn Fn() -> String) -> Result<u8, LoadError> {
        Ok(self.take(1, at)?[0])
    }
    fn u32(&mut self, at: &dyn Fn() -> String) -> Result<u32, LoadError> {
        Ok(u32::from_le_bytes(self.take(4, at)?.try_into().unwrap()))
    }
    fn u64(&mut self, at: &dyn Fn() -> String) -> Result<u64, LoadError> {
        Ok(u64::from_le_bytes(self.take(8, at)?.try_into().unwrap()))
    }
    fn count(&mut self, at: &dyn Fn() -> String) -> Result<usize, LoadError> {
        let n = self.u32(at)?;
        // Every element takes at least one byte, so a count larger than what
        // is left is corrupt; checking here bounds every allocation below.
        if n > MAX_COUNT || n as usize > self.bytes.len() - self.pos {
            return Err(LoadError::invalid(at(), format!("count {n} is larger than the data")));
        }
        Ok(n as usize)
    }
    fn bytes(&mut self, at: &dyn Fn() -> String) -> Result<&'a [u8], LoadError> {
        let n = self.u32(at)? as usize;
        self.take(n, at)
    }
    fn string(&mut self, at: &dyn Fn() -> String) -> Result<String, LoadError> {
        let b = self.bytes(at)?;
        String::from_utf8(b.to_vec()).map_err(|_| LoadError::invalid(at(), "not UTF-8"))
    }
    fn value(&mut self, at: &dyn Fn() -> String) -> Result<Value, LoadError> {
        Ok(match self.u8(at)? {
            0 => Value::I64(self.u64(at)? as i64),
            1 => Value::U64(self.u64(at)?),
            2 => Value::F64(f64::from_bits(self.u64(at)?)),
            3 => match self.u8(at)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(LoadError::invalid(at(), format!("bad bool {b}"))),
            },
            4 => Value::Bytes(self.bytes(at)?.to_vec()),
            t => return Err(LoadError::invalid(at(), format!("unknown value tag {t}"))),
        })
    }
    /// Metadata pairs. Keys starting with `grpc-` are the protocol's; the
    /// only one a plan may carry is `grpc-status-details-bin`, in trailers.
    fn pairs(&mut self, at: &dyn Fn() -> String, trailers: bool) -> Result<Vec<(String, Vec<u8>)>, LoadError> {
        let n = self.count(at)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let k = self.string(at)?;
            let v = self.bytes(at)?.to_vec();
            let reserved = k.starts_with("grpc-") && !(trailers && k == "grpc-status-details-bin");
            if !is_valid_metadata_key(&k) || reserved {
                return Err(LoadError::invalid(at(), format!("invalid metadata key {k:?}")));
            }
            if !is_valid_metadata_value(&v) {
                return Err(LoadError::invalid(at(), format!("invalid value for metadata key {k:?}")));
            }
            out.push((k, v));
        }
        Ok(out)
    }
}

impl Reader<'_> {
    /// A rule's recorded request (version 6 on): tag 0 none, 1 present.
    fn raw(&mut self, at: &dyn Fn() -> String) -> Result<Option<Box<RawRequest>>, LoadError> {
        match self.u8(at)? {
            0 => Ok(None),
            1 => {
                let n = self.count(at)?;
                let mut messages = Vec::with_capacity(n);
                for _ in 0..n {
                    messages.push(self.bytes(at)?.to_vec());
                }
                let n = self.count(at)?;
                let mut metadata_keys: Vec<String> = Vec::with_capacity(n);
                for _ in 0..n {
                    let k = self.string(at)?;
                    if !is_valid_metadata_key(&k) || metadata_keys.last().is_some_and(|p| *p >= k) {
                        return Err(LoadError::invalid(
                            at(),
                            format!("recorded metadata name {k:?} invalid or out of order"),
                        ));
                    }
                    metadata_keys.push(k);
                }
                let content_type = self.string(at)?;
                let encoding = self.string(at)?;
                if !is_valid_metadata_value(content_type.as_bytes()) || !is_valid_metadata_value(encoding.as_bytes()) {
                    return Err(LoadError::invalid(at(), "recorded content type or encoding invalid"));
                }
                Ok(Some(Box::new(RawRequest { messages, metadata_keys, content_type, encoding })))
            }
            t => Err(LoadError::invalid(at(), format!("unknown recorded-request tag {t}"))),
        }
    }

    fn pieces(&mut self, at: &dyn Fn() -> String, depth: usize) -> Result<Vec<Piece>, LoadError> {
        if depth > MAX_TEST_DEPTH * 2 {
            return Err(LoadError::invalid(at(), "template nested too deeply"));
        }
        let n = self.count(at)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(match self.u8(at)? {
                0 => Piece::Bytes(self.bytes(at)?.to_vec()),
                1 => Piece::Nested { key: self.key(at)?, pieces: self.pieces(at, depth + 1)? },
                2 => Piece::Text { key: self.key(at)?, parts: self.parts(at)? },
                3 => {
                    let key = self.key(at)?;
                    let kind = ScalarKind::from_u8(self.u8(at)?)
                        .filter(|k| !matches!(k, ScalarKind::String | ScalarKind::Bytes))
                        .ok_or_else(|| LoadError::invalid(at(), "bad kind of a number hole"))?;
                    Piece::Number { key, kind, parts: self.parts(at)? }
                }
                t => return Err(LoadError::invalid(at(), format!("unknown template piece {t}"))),
            });
        }
        Ok(out)
    }

    /// An encoded field key: one varint of at most 5 bytes.
    fn key(&mut self, at: &dyn Fn() -> String) -> Result<Vec<u8>, LoadError> {
        let k = self.bytes(at)?;
        let ok = !k.is_empty()
            && k.len() <= 5
            && k[..k.len() - 1].iter().all(|b| b & 0x80 != 0)
            && k[k.len() - 1] & 0x80 == 0;
        if !ok {
            return Err(LoadError::invalid(at(), "template field key is not a varint"));
        }
        Ok(k.to_vec())
    }

    fn parts(&mut self, at: &dyn Fn() -> String) -> Result<Vec<Part>, LoadError> {
        let n = self.count(at)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(match self.u8(at)? {
                0 => Part::Lit(self.bytes(at)?.to_vec()),
                1 => Part::Expr(self.expr(at, 0)?),
                t => return Err(LoadError::invalid(at(), format!("unknown template part {t}"))),
            });
        }
        Ok(out)
    }

    fn expr(&mut self, at: &dyn Fn() -> String, depth: usize) -> Result<Expr, LoadError> {
        if depth > MAX_TEST_DEPTH {
            return Err(LoadError::invalid(at(), "template expression nested too deeply"));
        }
        Ok(match self.u8(at)? {
            0 => Expr::Field(self.u32(at)?),
            1 => Expr::Metadata(self.u32(at)?),
            2 => Expr::StreamIndex,
            3 => Expr::StreamTotal,
            4 => Expr::StreamIsFirst,
            5 => Expr::StreamIsLast,
            6 => Expr::Now,
            7 => Expr::Uuid,
            8 => {
                let (a, b) = (self.u64(at)? as i64, self.u64(at)? as i64);
                if a > b {
                    return Err(LoadError::invalid(at(), "random range is empty"));
                }
                Expr::RandomInt(a, b)
            }
            9 => Expr::RandomFloat(f64::from_bits(self.u64(at)?), f64::from_bits(self.u64(at)?)),
            10 => {
                let f = self.bytes(at)?.to_vec();
                let n = self.count(at)?;
                let mut args = Vec::with_capacity(n);
                for _ in 0..n {
                    args.push(self.expr(at, depth + 1)?);
                }
                Expr::Format(f, args)
            }
            11 => Expr::Number(f64::from_bits(self.u64(at)?)),
            12 => Expr::Str(self.bytes(at)?.to_vec()),
            13 => {
                let l = self.expr(at, depth + 1)?;
                let op = self.u8(at)?;
                if !b"+-*/".contains(&op) {
                    return Err(LoadError::invalid(at(), format!("unknown arithmetic operator {op}")));
                }
                Expr::Arith(Box::new(l), op, Box::new(self.expr(at, depth + 1)?))
            }
            14 if self.version >= 6 => {
                let field = self.u32(at)?;
                let n = self.count(at)?;
                let mut names: Vec<(i32, Vec<u8>)> = Vec::with_capacity(n);
                for _ in 0..n {
                    let number = self.u32(at)? as i32;
                    if names.last().is_some_and(|(p, _)| *p >= number) {
                        return Err(LoadError::invalid(at(), "enum names out of order"));
                    }
                    names.push((number, self.bytes(at)?.to_vec()));
                }
                Expr::EnumName(field, names)
            }
            15 if self.version >= 6 => {
                let n = self.expr(at, depth + 1)?;
                let pattern = self.bytes(at)?.to_vec();
                if pattern.is_empty() {
                    return Err(LoadError::invalid(at(), "fill pattern is empty"));
                }
                Expr::Fill(Box::new(n), pattern)
            }
            16 if self.version >= 7 => {
                let field = self.u32(at)?;
                let agg = match self.u8(at)? {
                    0 => Agg::Count,
                    1 => Agg::Sum,
                    2 => Agg::Min,
                    3 => Agg::Max,
                    t => return Err(LoadError::invalid(at(), format!("unknown aggregate {t}"))),
                };
                Expr::Aggregate(field, agg)
            }
            t => return Err(LoadError::invalid(at(), format!("unknown template expression {t}"))),
        })
    }

    fn test(&mut self, at: &dyn Fn() -> String, depth: usize) -> Result<Test, LoadError> {
        if depth > MAX_TEST_DEPTH {
            return Err(LoadError::invalid(at(), "tests nested too deeply"));
        }
        Ok(match self.u8(at)? {
            0 => Test::Op(self.op(at, depth)?),
            1 => Test::Not(Box::new(self.test(at, depth + 1)?)),
            t @ (2 | 3) => {
                let n = self.count(at)?;
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    list.push(self.test(at, depth + 1)?);
                }
                if t == 2 {
                    Test::Any(list)
                } else {
                    Test::All(list)
                }
            }
            t => return Err(LoadError::invalid(at(), format!("unknown test tag {t}"))),
        })
    }

    fn op(&mut self, at: &dyn Fn() -> String, depth: usize) -> Result<Op, LoadError> {
        Ok(match self.u8(at)? {
            0 => Op::Eq(self.value(at)?),
            1 => {
                let n = self.count(at)?;
                let mut vs = Vec::with_capacity(n);
                for _ in 0..n {
                    vs.push(self.value(at)?);
                }
                Op::In(vs)
            }
            2 => Op::Gt(self.value(at)?),
            3 => Op::Gte(self.value(at)?),
            4 => Op::Lt(self.value(at)?),
            5 => Op::Lte(self.value(at)?),
            6 => Op::Exists,
            7 => Op::Contains(self.value(at)?),
            8 => Op::Prefix(self.bytes(at)?.to_vec()),
            9 => Op::Suffix(self.bytes(at)?.to_vec()),
            10 => Op::Regex(self.u32(at)?),
            11 => Op::Len(Box::new(self.test(at, depth + 1)?)),
            12 if self.version >= 7 => Op::Chars(Box::new(self.test(at, depth + 1)?)),
            14 if self.version >= 7 => Op::Unique,
            13 if self.version >= 7 => {
                Op::Format(Format::from_u8(self.u8(at)?).ok_or_else(|| LoadError::invalid(at(), "unknown format"))?)
            }
            t => return Err(LoadError::invalid(at(), format!("unknown operator tag {t}"))),
        })
    }
}

/// Checks that every expression of a template refers to a field and a
/// metadata key the method has, that single values are read from paths
/// with one value and aggregates from paths with many (numeric ones for
/// all but `count`).
fn check_template(t: &Template, fields: &[FieldPath], keys: usize) -> Result<(), String> {
    fn expr(e: &Expr, fields: &[FieldPath], keys: usize) -> Result<(), String> {
        match e {
            Expr::Field(i) | Expr::EnumName(i, _) | Expr::Aggregate(i, _) if *i as usize >= fields.len() => {
                Err(format!("template field index {i} out of range"))
            }
            Expr::Field(i) | Expr::EnumName(i, _) if fields[*i as usize].is_multi() => {
                Err(format!("template field {i} reads several values"))
            }
            Expr::Aggregate(i, agg) => {
                let f = &fields[*i as usize];
                let numeric = matches!(f.kind.value_class(), ValueClass::I64 | ValueClass::U64 | ValueClass::F64);
                match (f.is_multi(), *agg == Agg::Count || numeric) {
                    (true, true) => Ok(()),
                    _ => Err(format!("template aggregate over field {i} does not fit it")),
                }
            }
            Expr::Metadata(i) if *i as usize >= keys => Err(format!("template metadata index {i} out of range")),
            Expr::Format(_, args) => args.iter().try_for_each(|a| expr(a, fields, keys)),
            Expr::Arith(l, _, r) => expr(l, fields, keys).and_then(|_| expr(r, fields, keys)),
            Expr::Fill(n, _) => expr(n, fields, keys),
            _ => Ok(()),
        }
    }
    fn pieces(ps: &[Piece], fields: &[FieldPath], keys: usize) -> Result<(), String> {
        for p in ps {
            match p {
                Piece::Bytes(_) => {}
                Piece::Nested { pieces: inner, .. } => pieces(inner, fields, keys)?,
                Piece::Text { parts, .. } | Piece::Number { parts, .. } => {
                    for part in parts {
                        if let Part::Expr(e) = part {
                            expr(e, fields, keys)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
    pieces(&t.pieces, fields, keys)
}

/// What a test sees of its source: one value of a class, or the elements of
/// a repeated field.
#[derive(Debug, Clone, Copy, PartialEq)]
enum View {
    Scalar(ValueClass),
    Repeated(ValueClass),
}

/// Checks that every operand fits the value it will be compared with, so
/// the engine can compare without checking classes.
fn check_test(test: &Test, view: View, regexes: usize) -> Result<(), String> {
    let numeric = |c: ValueClass| matches!(c, ValueClass::I64 | ValueClass::U64 | ValueClass::F64);
    match test {
        Test::Not(t) => check_test(t, view, regexes),
        Test::Any(list) | Test::All(list) => list.iter().try_for_each(|t| check_test(t, view, regexes)),
        Test::Op(op) => {
            let ok = match (op, view) {
                (Op::Exists, _) => true,
                (Op::Eq(v), View::Scalar(c)) => v.class() == c,
                (Op::In(vs), View::Scalar(c)) => vs.iter().all(|v| v.class() == c),
                (Op::Gt(v) | Op::Gte(v) | Op::Lt(v) | Op::Lte(v), View::Scalar(c)) => {
                    (numeric(c) && v.class() == c) || (c == ValueClass::Bytes && v.class() == ValueClass::F64)
                }
                (Op::Contains(v), View::Repeated(c)) => v.class() == c,
                (Op::Contains(v), View::Scalar(ValueClass::Bytes)) => v.class() == ValueClass::Bytes,
                (Op::Prefix(_) | Op::Suffix(_), View::Scalar(ValueClass::Bytes)) => true,
                (Op::Regex(i), View::Scalar(ValueClass::Bytes)) => (*i as usize) < regexes,
                (Op::Len(t), View::Repeated(_) | View::Scalar(ValueClass::Bytes)) => {
                    return check_test(t, View::Scalar(ValueClass::U64), regexes)
                }
                (Op::Chars(t), View::Scalar(ValueClass::Bytes)) => {
                    return check_test(t, View::Scalar(ValueClass::U64), regexes)
                }
                (Op::Format(_), View::Scalar(ValueClass::Bytes)) => true,
                (Op::Unique, View::Repeated(_)) => true,
                _ => false,
            };
            if ok {
                Ok(())
            } else {
                Err(format!("operator `{}` does not fit the value it tests", op.name()))
            }
        }
    }
}

/// One uncompressed gRPC message: flag 0, then a length that matches.
fn is_framed_message(b: &[u8]) -> bool {
    b.len() >= 5 && b[0] == 0 && u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize == b.len() - 5
}

fn read_methods(r: &mut Reader) -> Result<Vec<Method>, LoadError> {
    let n = r.count(&|| "METHODS section".to_string())?;
    let mut methods: Vec<Method> = Vec::with_capacity(n);
    for mi in 0..n {
        let here = |what: &str| format!("method {mi}: {what}");
        let path = r.string(&|| here("path"))?;
        if !path.starts_with('/') || path[1..].split('/').count() != 2 {
            return Err(LoadError::invalid(here("path"), format!("{path:?} is not /package.Service/Method")));
        }
        if let Some(prev) = methods.last() {
            if prev.path >= path {
                return Err(LoadError::invalid(here("path"), "methods are not sorted by path"));
            }
        }
        let at = |what: &str| format!("method {path}: {what}");
        let kind = match r.u8(&|| at("kind"))? {
            0 => MethodKind::Unary,
            1 => MethodKind::ServerStreaming,
            2 => MethodKind::ClientStreaming,
            3 => MethodKind::BidiStreaming,
            k => return Err(LoadError::invalid(at("kind"), format!("unknown method kind {k}"))),
        };
        let input_type = r.string(&|| at("input type"))?;
        let output_type = r.string(&|| at("output type"))?;

        let nf = r.count(&|| at("fields"))?;
        let mut fields = Vec::with_capacity(nf);
        for fi in 0..nf {
            let at = || at(&format!("field path {fi}"));
            let name = r.string(&at)?;
            let nn = r.count(&at)?;
            let mut numbers = Vec::with_capacity(nn);
            for _ in 0..nn {
                let num = r.u32(&at)?;
                if num == 0 || num >= 1 << 29 {
                    return Err(LoadError::invalid(at(), format!("field number {num} out of range")));
                }
                numbers.push(num);
            }
            let kind =
                ScalarKind::from_u8(r.u8(&at)?).ok_or_else(|| LoadError::invalid(at(), "unknown scalar kind"))?;
            let default = r.value(&at)?;
            if default.class() != kind.value_class() {
                return Err(LoadError::invalid(at(), "default value does not fit the field type"));
            }
            let shape = if r.version < 2 {
                Shape::Singular
            } else {
                match r.u8(&at)? {
                    0 => Shape::Singular,
                    1 => Shape::Repeated,
                    2 => {
                        let key_kind = ScalarKind::from_u8(r.u8(&at)?)
                            .ok_or_else(|| LoadError::invalid(at(), "unknown map key kind"))?;
                        let key = r.value(&at)?;
                        if key.class() != key_kind.value_class() {
                            return Err(LoadError::invalid(at(), "map key does not fit its kind"));
                        }
                        Shape::MapValue { key_kind, key }
                    }
                    3 => {
                        let n = r.count(&at)?;
                        let mut members = Vec::with_capacity(n);
                        for _ in 0..n {
                            members.push(r.u32(&at)?);
                        }
                        if kind != ScalarKind::Int32 {
                            return Err(LoadError::invalid(at(), "a oneof case reads as int32"));
                        }
                        Shape::OneofCase { members }
                    }
                    t => return Err(LoadError::invalid(at(), format!("unknown shape tag {t}"))),
                }
            };
            let message = if r.version < 3 {
                MessageSel::Single
            } else {
                match r.u8(&at)? {
                    0 => MessageSel::Single,
                    1 => MessageSel::First,
                    2 => MessageSel::Last,
                    3 => MessageSel::Nth(r.u32(&at)?),
                    4 => MessageSel::Count,
                    5 if r.version >= 7 => MessageSel::Each,
                    t => return Err(LoadError::invalid(at(), format!("unknown message selector {t}"))),
                }
            };
            let mut picks = Vec::new();
            if r.version >= 7 {
                let n = r.count(&at)?;
                if n > MAX_PICKS {
                    return Err(LoadError::invalid(at(), format!("more than {MAX_PICKS} picks")));
                }
                for _ in 0..n {
                    let step = r.u32(&at)?;
                    let elem = match r.u8(&at)? {
                        0 => Elem::Index(r.u32(&at)? as i32),
                        1 => Elem::Any,
                        2 => Elem::All,
                        t => return Err(LoadError::invalid(at(), format!("unknown pick {t}"))),
                    };
                    if picks.last().is_some_and(|p: &Pick| p.step >= step) || step as usize >= numbers.len() {
                        return Err(LoadError::invalid(at(), "picks out of order or past the path"));
                    }
                    picks.push(Pick { step, elem });
                }
                let quantifiers = picks.iter().filter(|p| matches!(p.elem, Elem::Any | Elem::All)).count();
                let fits_shape = match shape {
                    Shape::Singular => true,
                    // A repeated leaf is read whole in each element picked.
                    Shape::Repeated => picks.last().is_none_or(|p| p.step as usize + 1 < numbers.len()),
                    _ => picks.is_empty(),
                };
                if quantifiers > 1 || !fits_shape || (message == MessageSel::Count && !picks.is_empty()) {
                    return Err(LoadError::invalid(at(), "picks do not fit the path"));
                }
            }
            if message == MessageSel::Count && !(numbers.is_empty() && kind == ScalarKind::Uint64) {
                return Err(LoadError::invalid(at(), "a message count is a uint64 with no field path"));
            }
            // Only a oneof case or a count may name no field.
            if numbers.is_empty() && !matches!(shape, Shape::OneofCase { .. }) && message != MessageSel::Count {
                return Err(LoadError::invalid(at(), "empty field path"));
            }
            fields.push(FieldPath { name, numbers, kind, default, shape, message, picks });
        }

        let nk = r.count(&|| at("metadata keys"))?;
        let mut metadata_keys = Vec::with_capacity(nk);
        for _ in 0..nk {
            let k = r.string(&|| at("metadata key"))?;
            if !is_valid_metadata_key(&k) {
                return Err(LoadError::invalid(at("metadata key"), format!("invalid key {k:?}")));
            }
            metadata_keys.push(k);
        }

        let nr = r.count(&|| at("responses"))?;
        let mut responses = Vec::with_capacity(nr);
        for ri in 0..nr {
            let at = || at(&format!("response {ri}"));
            let status = r.u8(&at)?;
            if status > 16 {
                return Err(LoadError::invalid(at(), format!("status {status} out of range")));
            }
            let message = r.string(&at)?;
            if !is_valid_metadata_value(message.as_bytes()) {
                return Err(LoadError::invalid(at(), "grpc-message is not percent-encoded"));
            }
            let body = r.bytes(&at)?.to_vec();
            if !body.is_empty() && !is_framed_message(&body) {
                return Err(LoadError::invalid(at(), "body is not one framed gRPC message"));
            }
            let headers = r.pairs(&at, false)?;
            let trailers = r.pairs(&at, true)?;
            let delay_ms = r.u32(&at)?;
            let mut response = Response { status, message, body, headers, trailers, delay_ms, ..Default::default() };
            if r.version >= 3 {
                let n = r.count(&at)?;
                for _ in 0..n {
                    let item = r.bytes(&at)?.to_vec();
                    if !is_framed_message(&item) {
                        return Err(LoadError::invalid(at(), "stream item is not one framed gRPC message"));
                    }
                    response.stream.push(item);
                }
                response.stream_delay_ms = r.u32(&at)?;
                response.stream_repeat = r.u32(&at)?;
                response.stream_random_order = match r.u8(&at)? {
                    0 => false,
                    1 => true,
                    b => return Err(LoadError::invalid(at(), format!("bad bool {b}"))),
                };
                response.error_after = r.u32(&at)?;
            }
            if r.version >= 4 {
                let n = r.count(&at)?;
                for _ in 0..n {
                    let slot = r.u32(&at)?;
                    if slot as usize > response.stream.len() {
                        return Err(LoadError::invalid(at(), format!("template slot {slot} has no message")));
                    }
                    let pieces = r.pieces(&at, 0)?;
                    let template = Template { pieces };
                    check_template(&template, &fields, metadata_keys.len())
                        .map_err(|why| LoadError::invalid(at(), why))?;
                    response.templates.push((slot, template));
                }
            }
            if r.version >= 5 {
                let ms = |r: &mut Reader, at: &dyn Fn() -> String| -> Result<f64, LoadError> {
                    let v = f64::from_bits(r.u64(at)?);
                    if !(v.is_finite() && (0.0..=86_400_000.0).contains(&v)) {
                        return Err(LoadError::invalid(at(), format!("latency parameter {v} out of range")));
                    }
                    Ok(v)
                };
                response.latency = match r.u8(&at)? {
                    0 => Latency::Fixed,
                    1 => Latency::Uniform { min: ms(r, &at)?, max: ms(r, &at)? },
                    2 => Latency::Normal { mean: ms(r, &at)?, stddev: ms(r, &at)? },
                    3 => Latency::LogNormal { median: ms(r, &at)?, p99: ms(r, &at)? },
                    t => return Err(LoadError::invalid(at(), format!("unknown latency tag {t}"))),
                };
                let ordered = match response.latency {
                    Latency::Uniform { min, max } => min <= max,
                    Latency::LogNormal { median, p99 } => median > 0.0 && median <= p99,
                    _ => true,
                };
                if !ordered {
                    return Err(LoadError::invalid(at(), "latency bounds out of order"));
                }
                response.fault = match r.u8(&at)? {
                    0 => None,
                    1 => {
                        let rate = f64::from_bits(r.u64(&at)?);
                        if !(rate > 0.0 && rate <= 1.0) {
                            return Err(LoadError::invalid(at(), format!("fault rate {rate} is not in (0, 1]")));
                        }
                        let drop = match r.u8(&at)? {
                            0 => false,
                            1 => true,
                            b => return Err(LoadError::invalid(at(), format!("bad bool {b}"))),
                        };
                        let status = r.u8(&at)?;
                        let message = r.string(&at)?;
                        if status == 0 || status > 16 || !is_valid_metadata_value(message.as_bytes()) {
                            return Err(LoadError::invalid(at(), "fault status or message invalid"));
                        }
                        Some(Fault { rate, drop, status, message, transport: None })
                    }
                    t => return Err(LoadError::invalid(at(), format!("unknown fault tag {t}"))),
                };
                response.times = r.u32(&at)?;
            }
            if r.version >= 6 {
                let n = r.count(&at)?;
                for _ in 0..n {
                    let trailer = match r.u8(&at)? {
                        0 => false,
                        1 => true,
                        b => return Err(LoadError::invalid(at(), format!("bad bool {b}"))),
                    };
                    let name = r.string(&at)?;
                    if !is_valid_metadata_key(&name) || name.starts_with("grpc-") {
                        return Err(LoadError::invalid(at(), format!("invalid metadata key {name:?}")));
                    }
                    let parts = r.parts(&at)?;
                    let as_template = Template { pieces: vec![Piece::Text { key: vec![10], parts: parts.clone() }] };
                    check_template(&as_template, &fields, metadata_keys.len())
                        .map_err(|why| LoadError::invalid(at(), why))?;
                    response.metadata_templates.push(MetadataTemplate { trailer, name, parts });
                }
            }
            if r.version >= 7 && r.u8(&at)? == 1 {
                let after = r.u32(&at)?;
                let action = match r.u8(&at)? {
                    0 => Transport::Reset(r.u32(&at)?),
                    1 => Transport::GoAway { graceful: r.u8(&at)? != 0 },
                    2 => Transport::Close,
                    3 => Transport::StallWrite(r.u32(&at)?),
                    4 => Transport::StallRead(r.u32(&at)?),
                    5 => Transport::Trickle { bytes: r.u32(&at)?, every_ms: r.u32(&at)? },
                    6 => Transport::Malformed,
                    t => return Err(LoadError::invalid(at(), format!("unknown transport fault {t}"))),
                };
                let sane = match action {
                    Transport::Reset(code) => code <= 0xff,
                    Transport::StallWrite(ms) | Transport::StallRead(ms) => ms <= 86_400_000,
                    Transport::Trickle { bytes, every_ms } => bytes >= 1 && every_ms <= 60_000,
                    _ => true,
                };
                match &mut response.fault {
                    Some(f) if sane && !f.drop => f.transport = Some(TransportFault { after, action }),
                    _ => return Err(LoadError::invalid(at(), "transport fault without a fault, or out of range")),
                }
            }
            responses.push(response);
        }

        let mut regexes = Vec::new();
        if r.version >= 2 {
            let n = r.count(&|| at("regexes"))?;
            for _ in 0..n {
                regexes.push(r.bytes(&|| at("regex"))?.to_vec());
            }
        }

        let nrules = r.count(&|| at("rules"))?;
        let mut rules = Vec::with_capacity(nrules);
        for ri in 0..nrules {
            let at = || at(&format!("rule {ri}"));
            let nc = r.count(&at)?;
            let mut conditions = Vec::with_capacity(nc);
            for _ in 0..nc {
                let (source, view) = match r.u8(&at)? {
                    0 => {
                        let i = r.u32(&at)?;
                        let f = fields
                            .get(i as usize)
                            .ok_or_else(|| LoadError::invalid(at(), format!("field index {i} out of range")))?;
                        let class = f.kind.value_class();
                        let view = match f.shape {
                            Shape::Repeated => View::Repeated(class),
                            _ => View::Scalar(class),
                        };
                        if f.message == MessageSel::Each {
                            return Err(LoadError::invalid(at(), "a condition reads every message of a stream"));
                        }
                        (Source::Field(i), view)
                    }
                    1 => {
                        let i = r.u32(&at)?;
                        if i as usize >= metadata_keys.len() {
                            return Err(LoadError::invalid(at(), format!("metadata index {i} out of range")));
                        }
                        (Source::Metadata(i), View::Scalar(ValueClass::Bytes))
                    }
                    t => return Err(LoadError::invalid(at(), format!("unknown source tag {t}"))),
                };
                let test = if r.version < 2 {
                    match r.u8(&at)? {
                        0 => Test::Op(Op::Eq(r.value(&at)?)),
                        t => return Err(LoadError::invalid(at(), format!("unknown operator tag {t}"))),
                    }
                } else {
                    r.test(&at, 0)?
                };
                check_test(&test, view, regexes.len()).map_err(|why| LoadError::invalid(at(), why))?;
                conditions.push(Condition { source, test });
            }
            let response = r.u32(&at)?;
            if response as usize >= responses.len() {
                return Err(LoadError::invalid(at(), format!("response index {response} out of range")));
            }
            let priority = r.u64(&at)? as i64;
            let origin = r.string(&at)?;
            let raw = if r.version >= 6 { r.raw(&at)? } else { None };
            let skip_validation = r.version >= 7 && r.u8(&at)? != 0;
            rules.push(Rule { conditions, response, priority, origin, raw, skip_validation });
        }
        let duplex = if r.version >= 3 {
            match r.u8(&|| at("duplex"))? {
                0 => false,
                1 if kind == MethodKind::BidiStreaming => true,
                b => {
                    return Err(LoadError::invalid(
                        at("duplex"),
                        format!("bad duplex flag {b} for a {} method", kind.name()),
                    ))
                }
            }
        } else {
            false
        };
        let mut checks = Vec::new();
        if r.version >= 7 {
            let n = r.count(&|| at("checks"))?;
            for ci in 0..n {
                let at = || at(&format!("check {ci}"));
                let (source, view) = match r.u8(&at)? {
                    0 => {
                        let i = r.u32(&at)?;
                        let f = fields
                            .get(i as usize)
                            .ok_or_else(|| LoadError::invalid(at(), format!("field index {i} out of range")))?;
                        let view = match f.shape {
                            Shape::Repeated => View::Repeated(f.kind.value_class()),
                            _ => View::Scalar(f.kind.value_class()),
                        };
                        (Source::Field(i), view)
                    }
                    t => return Err(LoadError::invalid(at(), format!("a check reads a field, not source {t}"))),
                };
                let test = r.test(&at, 0)?;
                check_test(&test, view, regexes.len()).map_err(|why| LoadError::invalid(at(), why))?;
                let ng = r.count(&at)?;
                let mut guards = Vec::with_capacity(ng);
                for _ in 0..ng {
                    let g = r.u32(&at)?;
                    if g as usize >= fields.len() {
                        return Err(LoadError::invalid(at(), format!("guard index {g} out of range")));
                    }
                    guards.push(g);
                }
                let rule_id = r.string(&at)?;
                let message = r.string(&at)?;
                let steps = |r: &mut Reader| -> Result<Vec<(u32, String, u8)>, LoadError> {
                    let n = r.count(&at)?;
                    let mut out = Vec::with_capacity(n);
                    for _ in 0..n {
                        out.push((r.u32(&at)?, r.string(&at)?, r.u8(&at)?));
                    }
                    Ok(out)
                };
                let path = steps(r)?;
                let rule = steps(r)?;
                let pgv = r.u8(&at)? != 0;
                let map_key = match r.u8(&at)? {
                    0 => None,
                    k => Some(ScalarKind::from_u8(k).ok_or_else(|| LoadError::invalid(at(), "unknown map key kind"))?),
                };
                let for_key = r.u8(&at)? != 0;
                checks.push(Check { source, test, guards, rule_id, message, path, rule, pgv, map_key, for_key });
            }
        }
        let mut cel_checks = Vec::new();
        if r.version >= 7 {
            let n = r.count(&|| at("CEL checks"))?;
            for ci in 0..n {
                let at = || at(&format!("CEL check {ci}"));
                let nn = r.count(&at)?;
                let mut numbers = Vec::with_capacity(nn);
                for _ in 0..nn {
                    numbers.push(r.u32(&at)?);
                }
                let field = r.u8(&at)? != 0;
                if field && numbers.is_empty() {
                    return Err(LoadError::invalid(at(), "a field's CEL rule names no field"));
                }
                let expression = r.string(&at)?;
                let rule_id = r.string(&at)?;
                let message = r.string(&at)?;
                let np = r.count(&at)?;
                let mut path = Vec::with_capacity(np);
                for _ in 0..np {
                    path.push((r.u32(&at)?, r.string(&at)?, r.u8(&at)?));
                }
                // Version 8: predefined and standard rules' values, the
                // zero-value skip, rules inside elements.
                let (mut rule, mut rules, mut skip_zero, mut each) = (String::new(), String::new(), false, None);
                if r.version >= 8 {
                    rule = r.string(&at)?;
                    rules = r.string(&at)?;
                    skip_zero = r.u8(&at)? != 0;
                    let (step, key_kind) = (r.u32(&at)?, r.u8(&at)?);
                    each = match step {
                        u32::MAX => None,
                        s if (s as usize) < numbers.len() => Some((s, key_kind)),
                        _ => return Err(LoadError::invalid(at(), "a CEL rule's elements are past its field path")),
                    };
                }
                cel_checks.push(CelCheck {
                    numbers,
                    field,
                    expression,
                    rule_id,
                    message,
                    path,
                    rule,
                    rules,
                    skip_zero,
                    each,
                });
            }
        }
        methods.push(Method {
            path,
            kind,
            input_type,
            output_type,
            fields,
            metadata_keys,
            responses,
            rules,
            regexes,
            duplex,
            checks,
            cel_checks,
        });
    }
    Ok(methods)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Plan {
        Plan {
            descriptors: vec![1, 2, 3],
            methods: vec![Method {
                path: "/pkg.Svc/Get".into(),
                kind: MethodKind::Unary,
                input_type: "pkg.Req".into(),
                output_type: "pkg.Resp".into(),
                fields: vec![
                    FieldPath {
                        name: "user.id".into(),
                        numbers: vec![1, 2],
                        kind: ScalarKind::String,
                        default: Value::Bytes(vec![]),
                        shape: Shape::Singular,
                        message: MessageSel::Single,
                        picks: Vec::new(),
                    },
                    FieldPath {
                        name: "tags".into(),
                        numbers: vec![3],
                        kind: ScalarKind::Int32,
                        default: Value::I64(0),
                        shape: Shape::Repeated,
                        message: MessageSel::Single,
                        picks: Vec::new(),
                    },
                    FieldPath {
                        name: "attrs.color".into(),
                        numbers: vec![4],
                        kind: ScalarKind::Double,
                        default: Value::F64(0.0),
                        shape: Shape::MapValue { key_kind: ScalarKind::String, key: Value::Bytes(b"color".to_vec()) },
                        message: MessageSel::Single,
                        picks: Vec::new(),
                    },
                    FieldPath {
                        name: "result".into(),
                        numbers: vec![],
                        kind: ScalarKind::Int32,
                        default: Value::I64(0),
                        shape: Shape::OneofCase { members: vec![5, 6] },
                        message: MessageSel::Last,
                        picks: Vec::new(),
                    },
                    FieldPath {
                        name: "items[-1].tags[*].size".into(),
                        numbers: vec![7, 2, 1],
                        kind: ScalarKind::Uint32,
                        default: Value::U64(0),
                        shape: Shape::Singular,
                        message: MessageSel::Single,
                        picks: vec![Pick { step: 0, elem: Elem::Index(-1) }, Pick { step: 1, elem: Elem::Any }],
                    },
                    FieldPath {
                        name: "items[*].n".into(),
                        numbers: vec![1],
                        kind: ScalarKind::Int64,
                        default: Value::I64(0),
                        shape: Shape::Singular,
                        message: MessageSel::Each,
                        picks: vec![],
                    },
                ],
                metadata_keys: vec!["x-tenant".into()],
                responses: vec![
                    Response {
                        body: grpc_frame(b"\x0a\x02hi"),
                        stream: vec![grpc_frame(b"a"), grpc_frame(b"")],
                        stream_delay_ms: 5,
                        stream_repeat: 0,
                        stream_random_order: true,
                        latency: Latency::LogNormal { median: 20.0, p99: 250.0 },
                        fault: Some(Fault {
                            rate: 0.25,
                            drop: false,
                            status: 14,
                            message: "x".into(),
                            transport: Some(TransportFault {
                                after: 2,
                                action: Transport::Trickle { bytes: 3, every_ms: 7 },
                            }),
                        }),
                        times: 2,
                        templates: vec![(
                            0,
                            Template {
                                pieces: vec![Piece::Text {
                                    key: vec![10],
                                    parts: vec![
                                        Part::Expr(Expr::Aggregate(4, Agg::Sum)),
                                        Part::Expr(Expr::Aggregate(5, Agg::Max)),
                                        Part::Expr(Expr::Aggregate(1, Agg::Count)),
                                    ],
                                }],
                            },
                        )],
                        ..Default::default()
                    },
                    Response {
                        status: 5,
                        message: percent_encode_message("not here"),
                        trailers: vec![("x-why".into(), b"gone".to_vec())],
                        ..Default::default()
                    },
                ],
                rules: vec![
                    Rule {
                        conditions: vec![
                            Condition { source: Source::Field(0), test: Test::Op(Op::Eq(Value::Bytes(b"7".to_vec()))) },
                            Condition { source: Source::Metadata(0), test: Test::Op(Op::Regex(0)) },
                            Condition {
                                source: Source::Field(1),
                                test: Test::All(vec![
                                    Test::Op(Op::Contains(Value::I64(-3))),
                                    Test::Op(Op::Len(Box::new(Test::Op(Op::Gte(Value::U64(2)))))),
                                ]),
                            },
                            Condition {
                                source: Source::Field(2),
                                test: Test::Not(Box::new(Test::Any(vec![
                                    Test::Op(Op::Gt(Value::F64(1.5))),
                                    Test::Op(Op::In(vec![Value::F64(0.5), Value::F64(-1.0)])),
                                ]))),
                            },
                            Condition { source: Source::Field(3), test: Test::Op(Op::Eq(Value::I64(6))) },
                            Condition { source: Source::Field(4), test: Test::Op(Op::Gt(Value::U64(6))) },
                            Condition { source: Source::Metadata(0), test: Test::Op(Op::Lt(Value::F64(10.0))) },
                        ],
                        response: 1,
                        priority: 3,
                        origin: "rules/x.yaml:3:5".into(),
                        raw: None,
                        skip_validation: true,
                    },
                    Rule {
                        conditions: vec![],
                        response: 0,
                        priority: 0,
                        origin: "rec/x.yaml:9:5".into(),
                        raw: Some(Box::new(RawRequest {
                            messages: vec![b"\x0a\x02hi".to_vec(), vec![]],
                            metadata_keys: vec!["authorization".into(), "x-id".into()],
                            content_type: "application/grpc".into(),
                            encoding: String::new(),
                        })),
                        skip_validation: false,
                    },
                ],
                regexes: vec![vec![1, 2, 3, 4]],
                duplex: false,
                checks: vec![Check {
                    source: Source::Field(0),
                    test: Test::Op(Op::Chars(Box::new(Test::Op(Op::Gte(Value::U64(3)))))),
                    guards: vec![1],
                    rule_id: "string.min_len".into(),
                    message: "must be at least 3 characters".into(),
                    path: vec![(1, "user".into(), 11), (2, "id".into(), 9)],
                    rule: vec![(14, "string".into(), 11), (2, "min_len".into(), 4)],
                    pgv: true,
                    map_key: Some(ScalarKind::String),
                    for_key: true,
                }],
                cel_checks: vec![CelCheck {
                    numbers: vec![1],
                    field: true,
                    expression: "this.size() > 0".into(),
                    rule_id: "id.nonempty".into(),
                    message: "must not be empty".into(),
                    path: vec![(1, "user".into(), 11)],
                    rule: "5u".into(),
                    rules: "{'gt': duration('1.5s')}".into(),
                    skip_zero: true,
                    each: Some((0, 9)),
                }],
            }],
        }
    }

    #[test]
    fn round_trip() {
        let plan = sample();
        let bytes = plan.to_bytes();
        assert_eq!(Plan::from_bytes(&bytes).unwrap(), plan);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().to_bytes();
        for n in 0..bytes.len() {
            assert!(Plan::from_bytes(&bytes[..n]).is_err(), "prefix of {n} bytes loaded");
        }
    }

    #[test]
    fn every_single_byte_corruption_is_an_error() {
        let bytes = sample().to_bytes();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(Plan::from_bytes(&b).is_err(), "corruption at {i} loaded");
        }
    }

    #[test]
    fn wrong_version_is_named() {
        let mut bytes = sample().to_bytes();
        bytes[12] = 99;
        let err = Plan::from_bytes(&bytes).unwrap_err().to_string();
        assert!(err.contains("version 99"), "{err}");
    }

    #[test]
    fn bad_index_is_rejected_even_with_a_good_checksum() {
        let mut plan = sample();
        plan.methods[0].rules[0].response = 9;
        let err = Plan::from_bytes(&plan.to_bytes()).unwrap_err().to_string();
        assert!(err.contains("response index 9 out of range"), "{err}");
    }

    #[test]
    fn operands_must_fit_their_source() {
        let bad = [
            (Source::Field(0), Test::Op(Op::Gt(Value::I64(3)))),
            (Source::Field(1), Test::Op(Op::Eq(Value::I64(3)))),
            (Source::Field(1), Test::Op(Op::Contains(Value::Bytes(vec![])))),
            (Source::Field(2), Test::Op(Op::Regex(0))),
            (Source::Field(0), Test::Op(Op::Regex(7))),
            (Source::Field(0), Test::Op(Op::Len(Box::new(Test::Op(Op::Eq(Value::I64(1))))))),
            (Source::Metadata(0), Test::Not(Box::new(Test::Op(Op::Eq(Value::I64(1)))))),
        ];
        for (source, test) in bad {
            let mut plan = sample();
            plan.methods[0].rules[0].conditions = vec![Condition { source, test: test.clone() }];
            let err = Plan::from_bytes(&plan.to_bytes()).unwrap_err().to_string();
            assert!(err.contains("does not fit"), "{test:?}: {err}");
        }
    }

    #[test]
    fn deeply_nested_tests_are_refused() {
        let mut t = Test::Op(Op::Exists);
        for _ in 0..100 {
            t = Test::Not(Box::new(t));
        }
        let mut plan = sample();
        plan.methods[0].rules[0].conditions = vec![Condition { source: Source::Field(0), test: t }];
        let err = Plan::from_bytes(&plan.to_bytes()).unwrap_err().to_string();
        assert!(err.contains("nested too deeply"), "{err}");
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(percent_encode_message("a b%c\u{e9}"), "a b%25c%C3%A9");
    }
}
