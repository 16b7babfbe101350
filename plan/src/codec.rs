//! Byte-level writer and validating reader of the plan layout.
//!
//! The METHODS section is a sequence of length-prefixed items:
//!
//! ```text
//! methods      count (4), then each method:
//! method       path (str) | kind (1) | input_type (str) | output_type (str)
//!              | fields (count, FieldPath...) | metadata_keys (count, str...)
//!              | responses (count, Response...) | rules (count, Rule...)
//! FieldPath    name (str) | numbers (count, u32...) | kind (1) | default (Value)
//! Value        tag (1: 0 i64, 1 u64, 2 f64, 3 bool, 4 bytes) | payload
//! Response     status (1) | message (str) | body (bytes) | headers (pairs)
//!              | trailers (pairs) | delay_ms (4)
//! Rule         conditions (count, Condition...) | response (4) | priority (8)
//!              | origin (str)
//! Condition    source tag (1: 0 field, 1 metadata) | index (4) | op tag (1) | operand
//! str, bytes   length (4) | bytes
//! ```

use crate::*;
use std::fmt;

const HEADER_LEN: usize = 8 + 4 + 4 + 4 + 4 + 8;
const ENDIAN_CHECK: u32 = 0x0A0B_0C0D;
const SECTION_DESCRIPTORS: u32 = 1;
const SECTION_METHODS: u32 = 2;
/// Upper bound on any element count, so a corrupt count cannot make the
/// reader reserve absurd amounts of memory before failing.
const MAX_COUNT: u32 = 1 << 24;

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
                "plan format version {v} is not supported (this build reads version {VERSION}); recompile the plan with this compiler"
            ),
            LoadErrorKind::Checksum => write!(f, "plan checksum mismatch: the file is corrupt or truncated"),
            LoadErrorKind::Invalid { at, why } => write!(f, "invalid plan at {at}: {why}"),
        }
    }
}

impl std::error::Error for LoadError {}

/// FNV-1a, 64-bit: enough to catch corruption, not meant as a MAC.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
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
        if version != VERSION {
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
        let mut r = Reader { bytes: methods, pos: 0 };
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
        }
        put_u32(out, m.rules.len() as u32);
        for rule in &m.rules {
            put_u32(out, rule.conditions.len() as u32);
            for c in &rule.conditions {
                match c.source {
                    Source::Field(i) => {
                        out.push(0);
                        put_u32(out, i);
                    }
                    Source::Metadata(i) => {
                        out.push(1);
                        put_u32(out, i);
                    }
                }
                match &c.op {
                    Op::Eq(v) => {
                        out.push(0);
                        put_value(out, v);
                    }
                }
            }
            put_u32(out, rule.response);
            out.extend_from_slice(&rule.priority.to_le_bytes());
            put_bytes(out, rule.origin.as_bytes());
        }
    }
}

// ---- reader ---------------------------------------------------------------

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
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
    fn pairs(&mut self, at: &dyn Fn() -> String) -> Result<Vec<(String, Vec<u8>)>, LoadError> {
        let n = self.count(at)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let k = self.string(at)?;
            let v = self.bytes(at)?.to_vec();
            if !is_valid_metadata_key(&k) || k.starts_with("grpc-") || k.starts_with(':') {
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
            if nn == 0 {
                return Err(LoadError::invalid(at(), "empty field path"));
            }
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
            fields.push(FieldPath { name, numbers, kind, default });
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
            if !body.is_empty() {
                let len_ok = body.len() >= 5
                    && body[0] == 0
                    && u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize == body.len() - 5;
                if !len_ok {
                    return Err(LoadError::invalid(at(), "body is not one framed gRPC message"));
                }
            }
            let headers = r.pairs(&at)?;
            let trailers = r.pairs(&at)?;
            let delay_ms = r.u32(&at)?;
            responses.push(Response { status, message, body, headers, trailers, delay_ms });
        }

        let nrules = r.count(&|| at("rules"))?;
        let mut rules = Vec::with_capacity(nrules);
        for ri in 0..nrules {
            let at = || at(&format!("rule {ri}"));
            let nc = r.count(&at)?;
            let mut conditions = Vec::with_capacity(nc);
            for _ in 0..nc {
                let source = match r.u8(&at)? {
                    0 => {
                        let i = r.u32(&at)?;
                        if i as usize >= fields.len() {
                            return Err(LoadError::invalid(at(), format!("field index {i} out of range")));
                        }
                        Source::Field(i)
                    }
                    1 => {
                        let i = r.u32(&at)?;
                        if i as usize >= metadata_keys.len() {
                            return Err(LoadError::invalid(at(), format!("metadata index {i} out of range")));
                        }
                        Source::Metadata(i)
                    }
                    t => return Err(LoadError::invalid(at(), format!("unknown source tag {t}"))),
                };
                let op = match r.u8(&at)? {
                    0 => Op::Eq(r.value(&at)?),
                    t => return Err(LoadError::invalid(at(), format!("unknown operator tag {t}"))),
                };
                let expected_class = match source {
                    Source::Field(i) => fields[i as usize].kind.value_class(),
                    Source::Metadata(_) => ValueClass::Bytes,
                };
                let Op::Eq(v) = &op;
                if v.class() != expected_class {
                    return Err(LoadError::invalid(at(), "operand does not fit the value it is compared with"));
                }
                conditions.push(Condition { source, op });
            }
            let response = r.u32(&at)?;
            if response as usize >= responses.len() {
                return Err(LoadError::invalid(at(), format!("response index {response} out of range")));
            }
            let priority = r.u64(&at)? as i64;
            let origin = r.string(&at)?;
            rules.push(Rule { conditions, response, priority, origin });
        }
        methods.push(Method { path, kind, input_type, output_type, fields, metadata_keys, responses, rules });
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
                fields: vec![FieldPath {
                    name: "user.id".into(),
                    numbers: vec![1, 2],
                    kind: ScalarKind::String,
                    default: Value::Bytes(vec![]),
                }],
                metadata_keys: vec!["x-tenant".into()],
                responses: vec![
                    Response { body: grpc_frame(b"\x0a\x02hi"), ..Default::default() },
                    Response {
                        status: 5,
                        message: percent_encode_message("not here"),
                        trailers: vec![("x-why".into(), b"gone".to_vec())],
                        ..Default::default()
                    },
                ],
                rules: vec![Rule {
                    conditions: vec![
                        Condition { source: Source::Field(0), op: Op::Eq(Value::Bytes(b"7".to_vec())) },
                        Condition { source: Source::Metadata(0), op: Op::Eq(Value::Bytes(b"a".to_vec())) },
                    ],
                    response: 1,
                    priority: 3,
                    origin: "rules/x.yaml:3:5".into(),
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
    fn percent_encoding() {
        assert_eq!(percent_encode_message("a b%c\u{e9}"), "a b%25c%C3%A9");
    }
}
