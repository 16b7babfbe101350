//! Zero-copy reading of request fields straight from protobuf wire bytes.
//!
//! Rules only ever test a handful of scalar fields of a request, so the engine
//! never decodes a request into a message. [`extract`] walks the received bytes
//! once, descends only into the embedded messages that lead to a wanted field,
//! and hands back each wanted value as a number read from, or a slice of, the
//! received buffer, without allocating for up to 16 paths. [`normalize`] then brings a raw value
//! into the form plan values are stored in, so that [`value_eq`] is a plain
//! comparison.
//!
//! The values found are those a full protobuf decoder (prost, in particular)
//! would give for the same fields, and the malformations it rejects are
//! rejected here too, with two deliberate differences that come from not
//! decoding everything:
//!
//! - only the bytes actually walked are checked: the top-level message with
//!   the groups in it, and the embedded messages on a wanted path. Other
//!   length-delimited fields are skipped by their length without looking
//!   inside;
//! - string fields are returned as bytes; checking that they are UTF-8 is left
//!   to the caller, which knows the field's type.
//!
//! The wire format is described at
//! <https://protobuf.dev/programming-guides/encoding/>.

use smallvec::SmallVec;
use std::fmt;
use wirestub_plan::{ScalarKind, Value, ValueClass};

/// A varint never takes more than ten bytes: 64 bits in 7-bit groups.
const MAX_VARINT_LEN: usize = 10;

/// How deep embedded messages and groups may nest below the top-level message.
/// This is the default limit of the reference decoders (C++, Java, prost), so
/// a message they reject is rejected here too; it also keeps a hostile message
/// from exhausting the stack, as groups are skipped recursively.
const RECURSION_LIMIT: u32 = 100;

/// A field value as found on the wire, borrowing from the message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Raw<'a> {
    Varint(u64),
    Fixed64(u64),
    Len(&'a [u8]),
    Fixed32(u32),
}

impl Raw<'_> {
    /// The wire type this value was encoded with: 0, 1, 2 or 5.
    pub fn wire_type(self) -> u8 {
        match self {
            Raw::Varint(_) => 0,
            Raw::Fixed64(_) => 1,
            Raw::Len(_) => 2,
            Raw::Fixed32(_) => 5,
        }
    }
}

/// The six wire types that exist (6 and 7 are invalid on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WireType {
    Varint,
    Fixed64,
    Len,
    StartGroup,
    EndGroup,
    Fixed32,
}

/// Why a message could not be scanned. Display gives a short human reason,
/// e.g. "truncated varint at byte 12", "field 3 has wire type 2, expected 0".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    kind: MalformedKind,
    /// Offset in the top-level message of the varint, key or value at fault.
    at: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum MalformedKind {
    Varint(VarintError),
    KeyTooLarge,
    Truncated { width: u8 },
    LengthPastEnd { len: u64, left: usize },
    InvalidWireType(u8),
    FieldZero,
    UnmatchedEndGroup { field: u32 },
    UnterminatedGroup { field: u32 },
    TooDeep,
    WrongWireType { field: u32, got: u8, expected: u8 },
}

/// Why a varint could not be read. Kept to one byte, apart from
/// [`MalformedKind`], so that the varint reader returns in registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VarintError {
    Truncated,
    TooLong,
    Overflow,
}

impl Malformed {
    // Why cold: errors are rare, and keeping their construction out of line
    // keeps the scanning loops small.
    #[cold]
    fn new(kind: MalformedKind, at: usize) -> Self {
        Malformed { kind, at }
    }

    /// The byte offset in the top-level message where the problem was found.
    pub fn offset(&self) -> usize {
        self.at
    }
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use MalformedKind::*;
        let at = self.at;
        match self.kind {
            Varint(VarintError::Truncated) => write!(f, "truncated varint at byte {at}"),
            Varint(VarintError::TooLong) => write!(f, "varint longer than 10 bytes at byte {at}"),
            Varint(VarintError::Overflow) => write!(f, "varint overflows 64 bits at byte {at}"),
            KeyTooLarge => write!(f, "field key wider than 32 bits at byte {at}"),
            Truncated { width } => write!(f, "truncated fixed{width} at byte {at}"),
            LengthPastEnd { len, left } => {
                write!(f, "length {len} at byte {at} runs past the end ({left} bytes left)")
            }
            InvalidWireType(wt) => write!(f, "invalid wire type {wt} at byte {at}"),
            FieldZero => write!(f, "field number 0 at byte {at}"),
            UnmatchedEndGroup { field } => write!(f, "unmatched end group of field {field} at byte {at}"),
            UnterminatedGroup { field } => write!(f, "group of field {field} at byte {at} is not terminated"),
            TooDeep => write!(f, "nested deeper than {RECURSION_LIMIT} levels at byte {at}"),
            WrongWireType { field, got, expected } => {
                write!(f, "field {field} has wire type {got}, expected {expected}")
            }
        }
    }
}

impl std::error::Error for Malformed {}

/// A path to extract: field numbers from the top-level message down; every
/// step but the last is a singular embedded message field (wire type 2); the
/// last step is a scalar whose expected wire type is given (0, 1, 2 or 5).
/// With any other wire type, every occurrence of the last field is an error.
#[derive(Debug, Clone, Copy)]
pub struct PathSpec<'p> {
    pub numbers: &'p [u32],
    pub wire_type: u8,
}

/// Reads a base-128 varint at `*pos` and moves `*pos` past it. Returns `None`,
/// leaving `*pos` alone, if the varint is truncated, longer than ten bytes, or
/// does not fit in 64 bits.
#[inline]
pub fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    varint(buf, pos).ok()
}

/// [`read_varint`] with the reason for a failure.
#[inline]
fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, VarintError> {
    match buf.get(*pos) {
        // Why: keys of fields 1 to 15, lengths under 128 and small numbers all
        // take one byte, and they make up most of any message.
        Some(&b) if b < 0x80 => {
            *pos += 1;
            Ok(u64::from(b))
        }
        Some(_) => varint_slow(&buf[*pos..], pos),
        None => Err(VarintError::Truncated),
    }
}

/// The multi-byte case of [`varint`]; `rest` starts at `*pos`.
fn varint_slow(rest: &[u8], pos: &mut usize) -> Result<u64, VarintError> {
    let mut value = 0u64;
    for (i, &b) in rest.iter().take(MAX_VARINT_LEN).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            // Why: the tenth byte carries only bit 63; anything more would
            // overflow, and prost and Go reject such varints.
            if i == MAX_VARINT_LEN - 1 && b > 1 {
                return Err(VarintError::Overflow);
            }
            *pos += i + 1;
            return Ok(value);
        }
    }
    Err(if rest.len() >= MAX_VARINT_LEN { VarintError::TooLong } else { VarintError::Truncated })
}

/// Reads a field key at `*pos` (offset `base + *pos` in the top-level message)
/// and returns its field number and wire type.
#[inline]
fn read_key(buf: &[u8], pos: &mut usize, base: usize) -> Result<(u32, WireType), Malformed> {
    let at = base + *pos;
    let key = varint(buf, pos).map_err(|e| Malformed::new(MalformedKind::Varint(e), at))?;
    // Why: keys are uint32 on the wire; decoders reject anything wider.
    let Ok(key) = u32::try_from(key) else {
        return Err(Malformed::new(MalformedKind::KeyTooLarge, at));
    };
    let wire_type = match key & 7 {
        0 => WireType::Varint,
        1 => WireType::Fixed64,
        2 => WireType::Len,
        3 => WireType::StartGroup,
        4 => WireType::EndGroup,
        5 => WireType::Fixed32,
        other => return Err(Malformed::new(MalformedKind::InvalidWireType(other as u8), at)),
    };
    let field = key >> 3;
    if field == 0 {
        return Err(Malformed::new(MalformedKind::FieldZero, at));
    }
    Ok((field, wire_type))
}

/// Reads `N` little-endian bytes at `*pos`.
#[inline]
fn fixed<const N: usize>(buf: &[u8], pos: &mut usize, base: usize) -> Result<[u8; N], Malformed> {
    match buf.get(*pos..).and_then(<[u8]>::first_chunk::<N>) {
        Some(bytes) => {
            *pos += N;
            Ok(*bytes)
        }
        None => Err(Malformed::new(MalformedKind::Truncated { width: (N * 8) as u8 }, base + *pos)),
    }
}

/// Reads the value of a field whose key (at `key_at`, relative to `buf`) has
/// just been read, and moves `*pos` past it. Groups are skipped and give
/// `None`, as no scalar is ever read from one.
// Why always: inlined, the value travels in registers rather than through a
// returned `Result` in memory, which made up most of the scan time. The
// recursion through `skip_group` is cut there.
#[inline(always)]
fn read_value<'a>(
    buf: &'a [u8],
    pos: &mut usize,
    base: usize,
    key_at: usize,
    field: u32,
    wire_type: WireType,
    budget: u32,
) -> Result<Option<Raw<'a>>, Malformed> {
    let at = *pos;
    Ok(Some(match wire_type {
        WireType::Varint => {
            Raw::Varint(varint(buf, pos).map_err(|e| Malformed::new(MalformedKind::Varint(e), base + at))?)
        }
        WireType::Fixed64 => Raw::Fixed64(u64::from_le_bytes(fixed(buf, pos, base)?)),
        WireType::Fixed32 => Raw::Fixed32(u32::from_le_bytes(fixed(buf, pos, base)?)),
        WireType::Len => {
            let len = varint(buf, pos).map_err(|e| Malformed::new(MalformedKind::Varint(e), base + at))?;
            let rest = &buf[*pos..];
            // Why: compare as u64 so that a huge length cannot wrap around.
            if len > rest.len() as u64 {
                let kind = MalformedKind::LengthPastEnd { len, left: rest.len() };
                return Err(Malformed::new(kind, base + at));
            }
            let payload = &rest[..len as usize];
            *pos += payload.len();
            Raw::Len(payload)
        }
        WireType::StartGroup => {
            skip_group(buf, pos, base, key_at, field, budget)?;
            return Ok(None);
        }
        // Why: an end group is only valid as the terminator that skip_group
        // consumes; met anywhere else it closes a group that was never opened.
        WireType::EndGroup => {
            return Err(Malformed::new(MalformedKind::UnmatchedEndGroup { field }, base + key_at));
        }
    }))
}

/// Skips the body of a group of `field` whose start key was at `key_at`, up to
/// and including its matching end group key.
#[inline(never)]
fn skip_group(
    buf: &[u8],
    pos: &mut usize,
    base: usize,
    key_at: usize,
    field: u32,
    budget: u32,
) -> Result<(), Malformed> {
    if budget == 0 {
        return Err(Malformed::new(MalformedKind::TooDeep, base + key_at));
    }
    while *pos < buf.len() {
        let inner_at = *pos;
        let (inner, wire_type) = read_key(buf, pos, base)?;
        if wire_type == WireType::EndGroup {
            // Why: decoders require the end key to name the group it closes.
            if inner != field {
                let kind = MalformedKind::UnmatchedEndGroup { field: inner };
                return Err(Malformed::new(kind, base + inner_at));
            }
            return Ok(());
        }
        read_value(buf, pos, base, inner_at, inner, wire_type, budget - 1)?;
    }
    Err(Malformed::new(MalformedKind::UnterminatedGroup { field }, base + key_at))
}

/// Indices into the `paths` given to [`extract`]; inline up to 16 so that the
/// common case does not allocate.
type Active = SmallVec<[u32; 16]>;

/// The indices of the first 16 paths, so that the top level of the common
/// case scans a constant rather than a list built for the call.
const FIRST_PATHS: [u32; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// Scans `msg` once and stores in `out[i]` the last value of `paths[i]`
/// (None if absent). The results equal what a full protobuf decoder
/// followed by reading the field would give:
/// - last one wins for scalars;
/// - an embedded message that occurs several times is merged, so for a nested
///   path the leaf value is the last one found across all occurrences, in order;
/// - unknown fields of every wire type are skipped, including groups
///   (start group 3 ... matching end group 4, nested) and packed fields;
/// - malformed input (truncated varint or length, varint longer than 10 bytes,
///   length past the end, wire type 6 or 7, field number 0, unmatched end group)
///   gives Err — but only for the parts actually walked: sibling fields are
///   skipped by length, nested messages not on a path are not inspected.
/// - a field on a path seen with an unexpected wire type is Err (a real decoder
///   rejects that too).
///
/// `out.len() == paths.len()`. No heap allocation for up to 16 paths.
///
/// A path with no numbers names no field and stays `None`; when no path names
/// a field the message is not walked at all.
///
/// # Errors
///
/// [`Malformed`] for the cases above and, as in prost, for a varint whose
/// tenth byte overflows 64 bits, a key wider than 32 bits, and messages and
/// groups nested more than 100 deep. `out` then holds what was found before
/// the error, which is meaningless.
///
/// # Panics
///
/// If `out` and `paths` differ in length.
pub fn extract<'a>(msg: &'a [u8], paths: &[PathSpec<'_>], out: &mut [Option<Raw<'a>>]) -> Result<(), Malformed> {
    assert_eq!(paths.len(), out.len(), "extract needs one output slot per path");
    out.fill(None);
    if paths.iter().all(|path| path.numbers.is_empty()) {
        return Ok(());
    }
    match FIRST_PATHS.get(..paths.len()) {
        Some(all) => scan(msg, 0, 0, RECURSION_LIMIT, paths, all, out),
        None => {
            let all: Vec<u32> = (0..paths.len()).map(path_index).collect();
            scan(msg, 0, 0, RECURSION_LIMIT, paths, &all, out)
        }
    }
}

/// A path index as stored in [`Active`] lists.
fn path_index(i: usize) -> u32 {
    // Why u32: it halves the lists against usize; four billion paths would
    // not fit in memory anyway.
    u32::try_from(i).expect("fewer than 2^32 paths")
}

/// Walks one message, `buf`, found at offset `base` in the top-level message
/// and `depth` embedded messages down, for the `active` paths: those whose
/// first `depth` numbers lead here.
fn scan<'a>(
    buf: &'a [u8],
    base: usize,
    depth: usize,
    budget: u32,
    paths: &[PathSpec<'_>],
    active: &[u32],
    out: &mut [Option<Raw<'a>>],
) -> Result<(), Malformed> {
    let mut pos = 0;
    while pos < buf.len() {
        let key_at = pos;
        let (field, wire_type) = read_key(buf, &mut pos, base)?;
        // Why: the value is read whether wanted or not, as it must be
        // skipped anyway; for a length-delimited field that is just a slice.
        let value = read_value(buf, &mut pos, base, key_at, field, wire_type, budget)?;

        // The payload to descend into, if this field leads to deeper paths.
        let mut inner = None;
        for &i in active {
            let i = i as usize;
            let path = &paths[i];
            // Why get: the top-level list also holds paths with no numbers.
            if path.numbers.get(depth) != Some(&field) {
                continue;
            }
            let is_leaf = path.numbers.len() == depth + 1;
            let expected = if is_leaf { path.wire_type } else { 2 };
            match value {
                Some(raw) if raw.wire_type() == expected => {
                    if is_leaf {
                        out[i] = Some(raw);
                    } else {
                        inner = Some(raw);
                    }
                }
                _ => {
                    // No value means the field was a group: wire type 3.
                    let got = value.map_or(3, Raw::wire_type);
                    let kind = MalformedKind::WrongWireType { field, got, expected };
                    return Err(Malformed::new(kind, base + key_at));
                }
            }
        }

        if let Some(Raw::Len(payload)) = inner {
            if budget == 0 {
                return Err(Malformed::new(MalformedKind::TooDeep, base + key_at));
            }
            // Why: all paths through this field are walked in one recursion,
            // so each occurrence of an embedded message is read only once.
            // Walking every occurrence in order, with later values overwriting
            // earlier ones, is exactly what merging the occurrences gives.
            let mut deeper = Active::new();
            for &i in active {
                let numbers = paths[i as usize].numbers;
                if numbers.len() > depth + 1 && numbers[depth] == field {
                    deeper.push(i);
                }
            }
            let payload_at = base + pos - payload.len();
            scan(payload, payload_at, depth + 1, budget - 1, paths, &deeper, out)?;
        }
    }
    Ok(())
}

/// A scalar decoded for comparison, borrowing strings/bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    I64(i64),
    U64(u64),
    F64(f64),
    Bool(bool),
    Bytes(&'a [u8]),
}

impl ValueRef<'_> {
    /// The class of the value, to check it against [`ScalarKind::value_class`].
    pub fn class(self) -> ValueClass {
        match self {
            ValueRef::I64(_) => ValueClass::I64,
            ValueRef::U64(_) => ValueClass::U64,
            ValueRef::F64(_) => ValueClass::F64,
            ValueRef::Bool(_) => ValueClass::Bool,
            ValueRef::Bytes(_) => ValueClass::Bytes,
        }
    }
}

/// Normalises a raw wire value of the given scalar kind exactly as protobuf
/// decoders do: int32 and enum truncate the varint to 32 bits and sign-extend
/// (negative int32 are sent as 10-byte varints), uint32 truncates to 32 bits,
/// sint32/sint64 zigzag-decode (sint32 on the low 32 bits), bool is varint != 0,
/// float widens to f64, sfixed32 sign-extends, fixed32 zero-extends, string and
/// bytes are the raw slice. The `ValueClass` of the result equals
/// `kind.value_class()` (see plan/src/lib.rs).
///
/// A raw value of another wire type than `kind.wire_type()`, which [`extract`]
/// never returns for a path built from the kind, gives the zero of the class.
pub fn normalize<'a>(raw: Raw<'a>, kind: ScalarKind) -> ValueRef<'a> {
    use ScalarKind as K;
    match (kind, raw) {
        (K::Int64, Raw::Varint(v)) => ValueRef::I64(v as i64),
        (K::Int32 | K::Enum, Raw::Varint(v)) => ValueRef::I64(i64::from(v as i32)),
        (K::Uint64, Raw::Varint(v)) => ValueRef::U64(v),
        (K::Uint32, Raw::Varint(v)) => ValueRef::U64(u64::from(v as u32)),
        (K::Sint32, Raw::Varint(v)) => {
            let n = v as u32;
            ValueRef::I64(i64::from((n >> 1) as i32 ^ -((n & 1) as i32)))
        }
        (K::Sint64, Raw::Varint(v)) => ValueRef::I64((v >> 1) as i64 ^ -((v & 1) as i64)),
        (K::Bool, Raw::Varint(v)) => ValueRef::Bool(v != 0),
        (K::Fixed64, Raw::Fixed64(v)) => ValueRef::U64(v),
        (K::Sfixed64, Raw::Fixed64(v)) => ValueRef::I64(v as i64),
        (K::Double, Raw::Fixed64(v)) => ValueRef::F64(f64::from_bits(v)),
        (K::Fixed32, Raw::Fixed32(v)) => ValueRef::U64(u64::from(v)),
        (K::Sfixed32, Raw::Fixed32(v)) => ValueRef::I64(i64::from(v as i32)),
        (K::Float, Raw::Fixed32(v)) => ValueRef::F64(f64::from(f32::from_bits(v))),
        (K::String | K::Bytes, Raw::Len(bytes)) => ValueRef::Bytes(bytes),
        (kind, _) => match kind.value_class() {
            ValueClass::I64 => ValueRef::I64(0),
            ValueClass::U64 => ValueRef::U64(0),
            ValueClass::F64 => ValueRef::F64(0.0),
            ValueClass::Bool => ValueRef::Bool(false),
            ValueClass::Bytes => ValueRef::Bytes(&[]),
        },
    }
}

/// Compares a normalised wire value with a plan value of the same class
/// (F64 compares with ==, so NaN never equals). Values of different classes
/// are never equal.
pub fn value_eq(a: ValueRef<'_>, b: &Value) -> bool {
    match (a, b) {
        (ValueRef::I64(x), Value::I64(y)) => x == *y,
        (ValueRef::U64(x), Value::U64(y)) => x == *y,
        (ValueRef::F64(x), Value::F64(y)) => x == *y,
        (ValueRef::Bool(x), Value::Bool(y)) => x == *y,
        (ValueRef::Bytes(x), Value::Bytes(y)) => x == y.as_slice(),
        _ => false,
    }
}

/// The ValueRef view of a plan Value (for defaults of absent fields).
pub fn as_ref(v: &Value) -> ValueRef<'_> {
    match v {
        Value::I64(x) => ValueRef::I64(*x),
        Value::U64(x) => ValueRef::U64(*x),
        Value::F64(x) => ValueRef::F64(*x),
        Value::Bool(x) => ValueRef::Bool(*x),
        Value::Bytes(x) => ValueRef::Bytes(x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- encoding helpers ------------------------------------------------

    fn enc_varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    /// A message under construction; every method appends one field.
    #[derive(Debug, Clone, Default)]
    struct Msg(Vec<u8>);

    impl Msg {
        fn new() -> Self {
            Msg::default()
        }
        fn key(mut self, field: u32, wire_type: u8) -> Self {
            enc_varint(u64::from(field) << 3 | u64::from(wire_type), &mut self.0);
            self
        }
        fn raw(mut self, bytes: &[u8]) -> Self {
            self.0.extend_from_slice(bytes);
            self
        }
        fn varint(self, field: u32, v: u64) -> Self {
            let mut m = self.key(field, 0);
            enc_varint(v, &mut m.0);
            m
        }
        /// int32, int64 and enum: negative numbers are sign-extended to 64 bits.
        fn int(self, field: u32, v: i64) -> Self {
            self.varint(field, v as u64)
        }
        fn sint(self, field: u32, v: i64) -> Self {
            self.varint(field, ((v << 1) ^ (v >> 63)) as u64)
        }
        fn fixed64(self, field: u32, v: u64) -> Self {
            self.key(field, 1).raw(&v.to_le_bytes())
        }
        fn fixed32(self, field: u32, v: u32) -> Self {
            self.key(field, 5).raw(&v.to_le_bytes())
        }
        fn bytes(self, field: u32, v: &[u8]) -> Self {
            let mut m = self.key(field, 2);
            enc_varint(v.len() as u64, &mut m.0);
            m.raw(v)
        }
        fn msg(self, field: u32, inner: &Msg) -> Self {
            self.bytes(field, &inner.0)
        }
        fn group(self, field: u32, inner: &Msg) -> Self {
            self.key(field, 3).raw(&inner.0).key(field, 4)
        }
        fn packed(self, field: u32, values: &[u64]) -> Self {
            let mut body = Vec::new();
            for &v in values {
                enc_varint(v, &mut body);
            }
            self.bytes(field, &body)
        }
    }

    /// Extracts one path.
    fn get<'a>(msg: &'a [u8], numbers: &[u32], wire_type: u8) -> Result<Option<Raw<'a>>, Malformed> {
        let mut out = [None];
        extract(msg, &[PathSpec { numbers, wire_type }], &mut out)?;
        Ok(out[0])
    }

    /// Extracts one path and normalises it as `kind`.
    fn get_as<'a>(msg: &'a [u8], numbers: &[u32], kind: ScalarKind) -> Option<ValueRef<'a>> {
        get(msg, numbers, kind.wire_type()).unwrap().map(|raw| normalize(raw, kind))
    }

    fn err(msg: &[u8], numbers: &[u32], wire_type: u8) -> String {
        get(msg, numbers, wire_type).unwrap_err().to_string()
    }

    // ---- scalars -------------------------------------------------------------

    #[test]
    fn every_scalar_kind_normalises_as_decoders_do() {
        use ScalarKind as K;
        use ValueRef as V;
        let cases: Vec<(Msg, K, ValueRef<'static>)> = vec![
            (Msg::new().int(1, 7), K::Int32, V::I64(7)),
            (Msg::new().int(1, -5), K::Int32, V::I64(-5)),
            (Msg::new().int(1, i32::MIN.into()), K::Int32, V::I64(i32::MIN.into())),
            // Bits above 32 are dropped, whatever they are.
            (Msg::new().varint(1, 0x1_0000_0005), K::Int32, V::I64(5)),
            (Msg::new().varint(1, 0xffff_ffff), K::Int32, V::I64(-1)),
            (Msg::new().int(1, -5), K::Int64, V::I64(-5)),
            (Msg::new().int(1, i64::MIN), K::Int64, V::I64(i64::MIN)),
            (Msg::new().varint(1, u64::from(u32::MAX)), K::Uint32, V::U64(u32::MAX.into())),
            (Msg::new().varint(1, 0x1_0000_0007), K::Uint32, V::U64(7)),
            (Msg::new().varint(1, u64::MAX), K::Uint64, V::U64(u64::MAX)),
            (Msg::new().sint(1, -1), K::Sint32, V::I64(-1)),
            (Msg::new().sint(1, i32::MIN.into()), K::Sint32, V::I64(i32::MIN.into())),
            (Msg::new().sint(1, i32::MAX.into()), K::Sint32, V::I64(i32::MAX.into())),
            // sint32 zigzag-decodes the low 32 bits only.
            (Msg::new().varint(1, 0x7_0000_0003), K::Sint32, V::I64(-2)),
            (Msg::new().sint(1, -1), K::Sint64, V::I64(-1)),
            (Msg::new().sint(1, 1), K::Sint64, V::I64(1)),
            (Msg::new().sint(1, i64::MIN), K::Sint64, V::I64(i64::MIN)),
            (Msg::new().sint(1, i64::MAX), K::Sint64, V::I64(i64::MAX)),
            (Msg::new().varint(1, 0), K::Bool, V::Bool(false)),
            (Msg::new().varint(1, 1), K::Bool, V::Bool(true)),
            (Msg::new().varint(1, 2), K::Bool, V::Bool(true)),
            (Msg::new().int(1, -3), K::Enum, V::I64(-3)),
            (Msg::new().fixed32(1, u32::MAX), K::Fixed32, V::U64(u32::MAX.into())),
            (Msg::new().fixed32(1, (-7i32) as u32), K::Sfixed32, V::I64(-7)),
            (Msg::new().fixed64(1, u64::MAX), K::Fixed64, V::U64(u64::MAX)),
            (Msg::new().fixed64(1, (-7i64) as u64), K::Sfixed64, V::I64(-7)),
            (Msg::new().fixed32(1, 1.5f32.to_bits()), K::Float, V::F64(1.5)),
            (Msg::new().fixed32(1, (-0.1f32).to_bits()), K::Float, V::F64(f64::from(-0.1f32))),
            (Msg::new().fixed64(1, (-2.25f64).to_bits()), K::Double, V::F64(-2.25)),
            (Msg::new().bytes(1, b"hello"), K::String, V::Bytes(b"hello")),
            (Msg::new().bytes(1, b""), K::Bytes, V::Bytes(b"")),
            (Msg::new().bytes(1, &[0, 255]), K::Bytes, V::Bytes(&[0, 255])),
        ];
        for (msg, kind, want) in cases {
            let got = get_as(&msg.0, &[1], kind);
            assert_eq!(got, Some(want), "{} from {:02x?}", kind.name(), msg.0);
            assert_eq!(want.class(), kind.value_class());
        }
    }

    #[test]
    fn negative_int32_is_a_ten_byte_varint() {
        let msg = Msg::new().int(1, -1);
        assert_eq!(msg.0.len(), 1 + 10);
        assert_eq!(get_as(&msg.0, &[1], ScalarKind::Int32), Some(ValueRef::I64(-1)));
    }

    #[test]
    fn float_nan_survives_and_never_equals() {
        let msg = Msg::new().fixed32(1, f32::NAN.to_bits());
        let Some(ValueRef::F64(x)) = get_as(&msg.0, &[1], ScalarKind::Float) else { panic!() };
        assert!(x.is_nan());
        assert!(!value_eq(ValueRef::F64(x), &Value::F64(f64::NAN)));
    }

    const ALL_KINDS: [ScalarKind; 16] = {
        use ScalarKind::*;
        [
            Double, Float, Int64, Uint64, Int32, Fixed64, Fixed32, Bool, String, Bytes, Uint32, Enum, Sfixed32,
            Sfixed64, Sint32, Sint64,
        ]
    };

    #[test]
    fn normalize_gives_the_kind_class_for_any_raw_value() {
        let raws = [Raw::Varint(u64::MAX), Raw::Fixed64(3), Raw::Fixed32(3), Raw::Len(b"x")];
        for kind in ALL_KINDS {
            for raw in raws {
                let v = normalize(raw, kind);
                assert_eq!(v.class(), kind.value_class(), "{} of {raw:?}", kind.name());
            }
        }
        // A mismatched raw value is the zero of the class.
        assert_eq!(normalize(Raw::Len(b"7"), ScalarKind::Int32), ValueRef::I64(0));
        assert_eq!(normalize(Raw::Varint(7), ScalarKind::String), ValueRef::Bytes(b""));
    }

    #[test]
    fn value_eq_and_as_ref() {
        let values = [Value::I64(-3), Value::U64(3), Value::F64(0.5), Value::Bool(true), Value::Bytes(b"ab".to_vec())];
        for (i, a) in values.iter().enumerate() {
            for (j, b) in values.iter().enumerate() {
                assert_eq!(value_eq(as_ref(a), b), i == j, "{a:?} vs {b:?}");
            }
        }
        assert!(!value_eq(ValueRef::I64(3), &Value::U64(3)));
        assert!(!value_eq(ValueRef::Bytes(b"ab"), &Value::Bytes(b"abc".to_vec())));
        assert!(value_eq(ValueRef::F64(0.0), &Value::F64(-0.0)));
        assert!(!value_eq(as_ref(&Value::F64(f64::NAN)), &Value::F64(f64::NAN)));
        assert_eq!(as_ref(&Value::Bytes(vec![])), ValueRef::Bytes(b""));
    }

    #[test]
    fn read_varint_public() {
        let buf = [0x05, 0xac, 0x02, 0x80];
        let mut pos = 0;
        assert_eq!(read_varint(&buf, &mut pos), Some(5));
        assert_eq!(read_varint(&buf, &mut pos), Some(300));
        assert_eq!(pos, 3);
        assert_eq!(read_varint(&buf, &mut pos), None, "truncated");
        assert_eq!(pos, 3, "unchanged on failure");
        let mut past_end = 9;
        assert_eq!(read_varint(&buf, &mut past_end), None);
        let max = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        let mut pos = 0;
        assert_eq!(read_varint(&max, &mut pos), Some(u64::MAX));
        assert_eq!(pos, 10);
        // Non-minimal encodings are valid.
        let mut pos = 0;
        assert_eq!(read_varint(&[0x81, 0x80, 0x00], &mut pos), Some(1));
        assert_eq!(pos, 3);
    }

    // ---- field semantics -------------------------------------------------

    #[test]
    fn last_one_wins() {
        let msg = Msg::new().varint(1, 1).bytes(2, b"a").varint(1, 2).bytes(2, b"b").varint(1, 3);
        assert_eq!(get(&msg.0, &[1], 0).unwrap(), Some(Raw::Varint(3)));
        assert_eq!(get(&msg.0, &[2], 2).unwrap(), Some(Raw::Len(b"b")));
    }

    #[test]
    fn absent_is_none() {
        let msg = Msg::new().varint(1, 1).msg(2, &Msg::new().varint(1, 1));
        assert_eq!(get(&msg.0, &[3], 0).unwrap(), None);
        assert_eq!(get(&msg.0, &[2, 2], 0).unwrap(), None);
        assert_eq!(get(&msg.0, &[3, 1], 0).unwrap(), None);
        assert_eq!(get(&[], &[1], 0).unwrap(), None);
        assert_eq!(get(&msg.0, &[], 0).unwrap(), None, "an empty path names no field");
    }

    #[test]
    fn nested_two_levels() {
        let leaf = Msg::new().varint(1, 9).bytes(3, b"deep");
        let mid = Msg::new().bytes(1, b"x").msg(2, &leaf);
        let msg = Msg::new().varint(2, 4).msg(1, &mid).fixed32(3, 1);
        assert_eq!(get(&msg.0, &[1, 2, 3], 2).unwrap(), Some(Raw::Len(b"deep")));
        assert_eq!(get(&msg.0, &[1, 2, 1], 0).unwrap(), Some(Raw::Varint(9)));
        assert_eq!(get(&msg.0, &[1, 1], 2).unwrap(), Some(Raw::Len(b"x")));
    }

    #[test]
    fn repeated_embedded_messages_merge() {
        // Leaf in the first occurrence only: it survives the second.
        let msg = Msg::new().msg(1, &Msg::new().varint(2, 5)).msg(1, &Msg::new().varint(3, 6));
        assert_eq!(get(&msg.0, &[1, 2], 0).unwrap(), Some(Raw::Varint(5)));
        assert_eq!(get(&msg.0, &[1, 3], 0).unwrap(), Some(Raw::Varint(6)));
        // Leaf in both: the later one wins.
        let msg = Msg::new().msg(1, &Msg::new().varint(2, 5)).varint(9, 0).msg(1, &Msg::new().varint(2, 7));
        assert_eq!(get(&msg.0, &[1, 2], 0).unwrap(), Some(Raw::Varint(7)));
        // Merging also applies two levels down.
        let msg = Msg::new()
            .msg(1, &Msg::new().msg(2, &Msg::new().varint(3, 1).varint(4, 1)))
            .msg(1, &Msg::new().msg(2, &Msg::new().varint(3, 2)));
        assert_eq!(get(&msg.0, &[1, 2, 3], 0).unwrap(), Some(Raw::Varint(2)));
        assert_eq!(get(&msg.0, &[1, 2, 4], 0).unwrap(), Some(Raw::Varint(1)));
    }

    #[test]
    fn several_paths_in_one_pass() {
        let inner = Msg::new().varint(1, 11).bytes(2, b"two").msg(3, &Msg::new().fixed64(1, 31));
        let msg = Msg::new().msg(1, &inner).fixed32(2, 20).msg(1, &Msg::new().varint(1, 12));
        let specs = [
            PathSpec { numbers: &[1, 1], wire_type: 0 },
            PathSpec { numbers: &[1, 2], wire_type: 2 },
            PathSpec { numbers: &[2], wire_type: 5 },
            PathSpec { numbers: &[1, 3, 1], wire_type: 1 },
            PathSpec { numbers: &[1, 4], wire_type: 0 },
            PathSpec { numbers: &[1, 1], wire_type: 0 },
        ];
        let mut out = [Some(Raw::Varint(99)); 6];
        extract(&msg.0, &specs, &mut out).unwrap();
        assert_eq!(
            out,
            [
                Some(Raw::Varint(12)),
                Some(Raw::Len(b"two")),
                Some(Raw::Fixed32(20)),
                Some(Raw::Fixed64(31)),
                None,
                Some(Raw::Varint(12)),
            ]
        );
    }

    #[test]
    fn more_than_sixteen_paths() {
        let mut msg = Msg::new();
        for n in 1..=40 {
            msg = msg.varint(n, u64::from(n) * 10);
        }
        let numbers: Vec<[u32; 1]> = (1..=40).rev().map(|n| [n]).collect();
        let specs: Vec<PathSpec> = numbers.iter().map(|n| PathSpec { numbers: n, wire_type: 0 }).collect();
        let mut out = vec![None; specs.len()];
        extract(&msg.0, &specs, &mut out).unwrap();
        for (spec, got) in specs.iter().zip(&out) {
            assert_eq!(*got, Some(Raw::Varint(u64::from(spec.numbers[0]) * 10)));
        }
    }

    #[test]
    fn unknown_fields_of_every_wire_type_are_skipped() {
        // Field 1 inside the group and inside the embedded message 15 must not
        // be taken for the top-level field 1.
        let nested_group = Msg::new().varint(1, 666).fixed32(2, 1);
        let group = Msg::new().varint(1, 666).bytes(2, b"in group").group(5, &nested_group).fixed64(3, 1);
        let msg = Msg::new()
            .varint(9, 300)
            .fixed64(10, 1)
            .bytes(11, b"skip me")
            .group(12, &group)
            .fixed32(13, 1)
            .packed(14, &[1, 300, u64::MAX])
            .msg(15, &Msg::new().varint(1, 666))
            .group(16, &Msg::new())
            .varint(1, 42)
            .varint(100_000, 1)
            .group(536_870_911, &Msg::new().varint(1, 666));
        assert_eq!(get(&msg.0, &[1], 0).unwrap(), Some(Raw::Varint(42)));
    }

    #[test]
    fn only_walked_parts_are_checked() {
        let garbage = [0xff, 0x07, 0x00, 0x0c];
        // A sibling field is skipped by its length, its content never read.
        let msg = Msg::new().bytes(2, &garbage).varint(1, 1);
        assert_eq!(get(&msg.0, &[1], 0).unwrap(), Some(Raw::Varint(1)));
        // A nested message off the path is not inspected...
        let msg = Msg::new().bytes(3, &garbage).msg(2, &Msg::new().varint(1, 1));
        assert_eq!(get(&msg.0, &[2, 1], 0).unwrap(), Some(Raw::Varint(1)));
        // ...but one on the path is.
        assert!(get(&msg.0, &[3, 1], 0).is_err());
        // A string leaf is not parsed either.
        assert_eq!(get(&msg.0, &[3], 2).unwrap(), Some(Raw::Len(&garbage)));
    }

    // ---- errors ----------------------------------------------------------

    #[test]
    fn wrong_wire_type_on_a_path_is_an_error() {
        let msg = Msg::new().bytes(3, b"x");
        assert_eq!(err(&msg.0, &[3], 0), "field 3 has wire type 2, expected 0");
        // An embedded message step must be length-delimited.
        let msg = Msg::new().varint(1, 5);
        assert_eq!(err(&msg.0, &[1, 2], 0), "field 1 has wire type 0, expected 2");
        let msg = Msg::new().group(1, &Msg::new().varint(2, 1));
        assert_eq!(err(&msg.0, &[1, 2], 0), "field 1 has wire type 3, expected 2");
        // The wrong type in a nested message names the nested field.
        let msg = Msg::new().msg(1, &Msg::new().fixed32(2, 1));
        let e = get(&msg.0, &[1, 2], 1).unwrap_err();
        assert_eq!(e.to_string(), "field 2 has wire type 5, expected 1");
        assert_eq!(e.offset(), 2);
        // A valid occurrence does not excuse a later wrong one.
        let msg = Msg::new().varint(1, 5).fixed64(1, 5);
        assert!(get(&msg.0, &[1], 0).is_err());
    }

    #[test]
    fn malformed_input_is_an_error() {
        let one = |bytes: &[u8]| err(bytes, &[1], 0);
        // Truncated varint value, key and length.
        assert_eq!(one(&[0x08, 0x80]), "truncated varint at byte 1");
        assert_eq!(one(&[0x08, 0x01, 0x80]), "truncated varint at byte 2");
        assert_eq!(one(&[0x12]), "truncated varint at byte 1");
        assert_eq!(one(&[0x12, 0x81]), "truncated varint at byte 1");
        // Truncated fixed values.
        assert_eq!(one(&[0x0d, 1, 2, 3]), "truncated fixed32 at byte 1");
        assert_eq!(one(&[0x09, 1, 2, 3, 4, 5, 6, 7]), "truncated fixed64 at byte 1");
        // Varint longer than ten bytes, and a tenth byte that overflows.
        let mut long = vec![0x08];
        long.extend([0x80; 10]);
        long.push(0x00);
        assert_eq!(one(&long), "varint longer than 10 bytes at byte 1");
        let mut overflow = vec![0x08];
        overflow.extend([0xff; 9]);
        overflow.push(0x02);
        assert_eq!(one(&overflow), "varint overflows 64 bits at byte 1");
        // Length past the end, including one too large for any buffer.
        assert_eq!(one(&[0x12, 0x05, b'a']), "length 5 at byte 1 runs past the end (1 bytes left)");
        let huge = Msg::new().key(2, 2).raw(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(one(&huge.0).starts_with("length 18446744073709551615 at byte 1"));
        // Invalid wire types and field number zero.
        assert_eq!(one(&[0x0e, 0x00]), "invalid wire type 6 at byte 0");
        assert_eq!(one(&[0x08, 0x01, 0x0f]), "invalid wire type 7 at byte 2");
        assert_eq!(one(&[0x00, 0x01]), "field number 0 at byte 0");
        assert_eq!(one(&[0x02, 0x00]), "field number 0 at byte 0");
        // A key wider than 32 bits.
        let wide = Msg::new().raw(&[0x80, 0x80, 0x80, 0x80, 0x10, 0x01]);
        assert_eq!(one(&wide.0), "field key wider than 32 bits at byte 0");
        // End groups: unmatched at top level, of the wrong field, missing.
        assert_eq!(one(&Msg::new().key(2, 4).0), "unmatched end group of field 2 at byte 0");
        assert_eq!(one(&Msg::new().key(2, 3).key(3, 4).0), "unmatched end group of field 3 at byte 1");
        let nested = Msg::new().key(2, 3).key(3, 3).key(2, 4).key(3, 4);
        assert_eq!(one(&nested.0), "unmatched end group of field 2 at byte 2");
        assert_eq!(one(&Msg::new().key(2, 3).varint(1, 1).0), "group of field 2 at byte 0 is not terminated");
        // An embedded message on the path is a message of its own: an end
        // group in it closes nothing.
        let msg = Msg::new().msg(1, &Msg::new().key(4, 4));
        assert_eq!(err(&msg.0, &[1, 2], 0), "unmatched end group of field 4 at byte 2");
        assert_eq!(get(&msg.0, &[2], 0).unwrap(), None);
        // Errors inside a nested message on the path report top-level offsets.
        let msg = Msg::new().varint(5, 1).bytes(1, &[0x10, 0x80]);
        assert_eq!(err(&msg.0, &[1, 2], 0), "truncated varint at byte 5");
    }

    #[test]
    fn malformed_after_the_wanted_field_is_still_an_error() {
        // A decoder reads the whole top-level message, and so does extract.
        let msg = Msg::new().varint(1, 1).raw(&[0x12, 0x09]);
        assert!(get(&msg.0, &[1], 0).is_err());
    }

    #[test]
    fn nesting_is_limited() {
        let nest = |levels: usize| {
            let mut m = Msg::new().varint(1, 1);
            for _ in 0..levels {
                m = Msg::new().group(2, &m);
            }
            m
        };
        assert!(get(&nest(100).0, &[1], 0).is_ok());
        assert_eq!(err(&nest(101).0, &[1], 0), "nested deeper than 100 levels at byte 100");
        // Deep enough to overflow the stack without the limit.
        let levels = 1_000_000;
        let deep = Msg::new().raw(&vec![0x13; levels]).raw(&vec![0x14; levels]);
        assert!(get(&deep.0, &[1], 0).is_err());

        // Embedded messages on a path count too.
        let wrapped = |levels: usize| {
            let mut m = Msg::new().varint(1, 7);
            for _ in 0..levels {
                m = Msg::new().msg(2, &m);
            }
            let mut path = vec![2; levels];
            path.push(1);
            (m, path)
        };
        let (msg, path) = wrapped(100);
        assert_eq!(get(&msg.0, &path, 0).unwrap(), Some(Raw::Varint(7)));
        let (msg, path) = wrapped(101);
        assert!(err(&msg.0, &path, 0).starts_with("nested deeper than 100 levels"));
    }

    #[test]
    fn every_prefix_of_a_message_is_handled() {
        let inner = Msg::new().varint(1, u64::MAX).bytes(2, b"text").group(3, &Msg::new().fixed32(1, 1));
        let msg = Msg::new()
            .int(1, -1)
            .fixed64(2, 2)
            .msg(3, &inner)
            .fixed32(4, 4)
            .group(5, &Msg::new().msg(1, &inner))
            .packed(6, &[1, 2, 3])
            .msg(3, &inner)
            .varint(100_000, 1);
        let specs = [
            PathSpec { numbers: &[1], wire_type: 0 },
            PathSpec { numbers: &[3, 2], wire_type: 2 },
            PathSpec { numbers: &[3, 1], wire_type: 0 },
            PathSpec { numbers: &[6], wire_type: 2 },
        ];
        let mut out = [None; 4];
        extract(&msg.0, &specs, &mut out).unwrap();
        assert!(out.iter().all(Option::is_some));
        let mut errors = 0;
        for len in 0..msg.0.len() {
            if extract(&msg.0[..len], &specs, &mut out).is_err() {
                errors += 1;
            }
        }
        // Most cuts land inside a field; those on a field boundary are valid.
        assert!(errors > msg.0.len() / 2, "{errors} errors");
    }

    // ---- comparison with a naive decoder ------------------------------------

    /// A tiny xorshift generator, enough to vary test messages reproducibly.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, one_in: u64) -> bool {
            self.below(one_in) == 0
        }
    }

    /// A field as a naive, allocating decoder sees it.
    #[derive(Debug, Clone, Copy)]
    enum Node<'a> {
        Scalar(Raw<'a>),
        Group,
    }

    /// Decodes a whole message level, byte by byte: a list of fields with
    /// groups checked and dropped. `Err` for anything a decoder rejects.
    fn ref_fields(buf: &[u8], depth_left: u32) -> Result<Vec<(u32, Node<'_>)>, ()> {
        let mut pos = 0;
        let fields = ref_fields_until(buf, &mut pos, None, depth_left)?;
        Ok(fields)
    }

    fn ref_varint(buf: &[u8], pos: &mut usize) -> Result<u64, ()> {
        // Why u128: detect overflow independently of the scanner's check.
        let mut v: u128 = 0;
        for i in 0..10 {
            let b = *buf.get(*pos).ok_or(())?;
            *pos += 1;
            v |= u128::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return u64::try_from(v).map_err(|_| ());
            }
        }
        Err(())
    }

    fn ref_take<'a>(buf: &'a [u8], pos: &mut usize, n: u64) -> Result<&'a [u8], ()> {
        let n = usize::try_from(n).map_err(|_| ())?;
        let end = pos.checked_add(n).filter(|&e| e <= buf.len()).ok_or(())?;
        let s = &buf[*pos..end];
        *pos = end;
        Ok(s)
    }

    fn ref_fields_until<'a>(
        buf: &'a [u8],
        pos: &mut usize,
        group: Option<u32>,
        depth_left: u32,
    ) -> Result<Vec<(u32, Node<'a>)>, ()> {
        let mut fields = Vec::new();
        loop {
            if *pos == buf.len() {
                return if group.is_none() { Ok(fields) } else { Err(()) };
            }
            let key = ref_varint(buf, pos)?;
            if key > u64::from(u32::MAX) || key >> 3 == 0 {
                return Err(());
            }
            let field = (key >> 3) as u32;
            let node = match key & 7 {
                0 => Node::Scalar(Raw::Varint(ref_varint(buf, pos)?)),
                1 => Node::Scalar(Raw::Fixed64(u64::from_le_bytes(ref_take(buf, pos, 8)?.try_into().unwrap()))),
                2 => {
                    let len = ref_varint(buf, pos)?;
                    Node::Scalar(Raw::Len(ref_take(buf, pos, len)?))
                }
                3 => {
                    if depth_left == 0 {
                        return Err(());
                    }
                    ref_fields_until(buf, pos, Some(field), depth_left - 1)?;
                    Node::Group
                }
                4 => return if group == Some(field) { Ok(fields) } else { Err(()) },
                5 => Node::Scalar(Raw::Fixed32(u32::from_le_bytes(ref_take(buf, pos, 4)?.try_into().unwrap()))),
                _ => return Err(()),
            };
            fields.push((field, node));
        }
    }

    /// Looks a path up in decoded fields: embedded messages are merged by
    /// decoding every occurrence and concatenating their fields.
    fn ref_lookup<'a>(fields: &[(u32, Node<'a>)], path: PathSpec<'_>, depth_left: u32) -> Result<Option<Raw<'a>>, ()> {
        let (&first, rest) = path.numbers.split_first().unwrap();
        let found = fields.iter().filter(|(f, _)| *f == first).map(|(_, node)| *node);
        if rest.is_empty() {
            let mut last = None;
            for node in found {
                match node {
                    Node::Scalar(raw) if raw.wire_type() == path.wire_type => last = Some(raw),
                    _ => return Err(()),
                }
            }
            return Ok(last);
        }
        let mut merged = Vec::new();
        for node in found {
            match node {
                Node::Scalar(Raw::Len(payload)) if depth_left > 0 => {
                    merged.extend(ref_fields(payload, depth_left - 1)?)
                }
                _ => return Err(()),
            }
        }
        ref_lookup(&merged, PathSpec { numbers: rest, wire_type: path.wire_type }, depth_left.saturating_sub(1))
    }

    fn ref_extract<'a>(msg: &'a [u8], paths: &[PathSpec<'_>]) -> Result<Vec<Option<Raw<'a>>>, ()> {
        paths
            .iter()
            .map(|&path| {
                if path.numbers.is_empty() {
                    return Ok(None);
                }
                ref_lookup(&ref_fields(msg, RECURSION_LIMIT)?, path, RECURSION_LIMIT)
            })
            .collect()
    }

    /// The wire type each field number usually has in generated messages, so
    /// that paths often find values rather than type errors. Field 2 is an
    /// embedded message and field 6 a group.
    const SCHEME: [u8; 7] = [0, 0, 2, 2, 5, 1, 3];

    fn gen_message(rng: &mut Rng, depth: u32) -> Msg {
        let mut msg = Msg::new();
        for _ in 0..rng.below(10) {
            let field = 1 + rng.below(6) as u32;
            // Usually the scheme's type, sometimes any.
            let kind = if rng.chance(12) { rng.below(7) as u8 } else { SCHEME[field as usize] };
            msg = match kind {
                0 => msg.varint(field, rng.next() >> rng.below(64)),
                1 => msg.fixed64(field, rng.next()),
                5 => msg.fixed32(field, rng.next() as u32),
                2 if field == 2 && depth < 4 => msg.msg(field, &gen_message(rng, depth + 1)),
                2 if rng.chance(3) => msg.packed(field, &[rng.next() >> 40, rng.next()]),
                2 => {
                    let bytes: Vec<u8> = (0..rng.below(5)).map(|_| rng.next() as u8).collect();
                    msg.bytes(field, &bytes)
                }
                3 | 4 if depth < 4 => msg.group(field, &gen_message(rng, depth + 1)),
                _ => msg.varint(field, 1),
            };
        }
        msg
    }

    fn corrupt(rng: &mut Rng, mut bytes: Vec<u8>) -> Vec<u8> {
        if bytes.is_empty() {
            return bytes;
        }
        match rng.below(8) {
            0 => bytes.truncate(rng.below(bytes.len() as u64) as usize),
            1 => {
                let i = rng.below(bytes.len() as u64) as usize;
                bytes[i] ^= 1 << rng.below(8);
            }
            2 => {
                let i = rng.below(bytes.len() as u64 + 1) as usize;
                bytes.insert(i, rng.next() as u8);
            }
            _ => {}
        }
        bytes
    }

    #[test]
    fn agrees_with_a_naive_decoder() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut ok, mut failed, mut found, mut found_nested) = (0, 0, 0, 0);
        for round in 0..3000 {
            let msg = gen_message(&mut rng, 0).0;
            let msg = corrupt(&mut rng, msg);
            let mut numbers = [[0u32; 3]; 5];
            let mut specs = Vec::new();
            for n in numbers.iter_mut().take(rng.below(6) as usize) {
                let len = 1 + rng.below(3) as usize;
                for (i, slot) in n.iter_mut().enumerate().take(len) {
                    // Steps lead through field 2 (the embedded message), mostly.
                    let last = i + 1 == len;
                    *slot = if !last && !rng.chance(8) { 2 } else { 1 + rng.below(6) as u32 };
                }
                let leaf = n[len - 1] as usize;
                let scheme = SCHEME[leaf];
                let wire_type =
                    if scheme == 3 || rng.chance(10) { [0, 1, 2, 5][rng.below(4) as usize] } else { scheme };
                specs.push(PathSpec { numbers: &n[..len], wire_type });
            }
            let mut out = vec![None; specs.len()];
            let got = extract(&msg, &specs, &mut out).map(|()| out).map_err(|_| ());
            let want = ref_extract(&msg, &specs);
            assert_eq!(got, want, "round {round}: {msg:02x?} with {specs:?}");
            match got {
                Ok(values) => {
                    ok += 1;
                    for (spec, value) in specs.iter().zip(&values) {
                        if value.is_some() {
                            found += 1;
                            found_nested += usize::from(spec.numbers.len() > 1);
                        }
                    }
                }
                Err(()) => failed += 1,
            }
        }
        // The generator must exercise both outcomes, and find values, nested
        // ones included.
        assert!(
            ok > 1000 && failed > 300 && found > 500 && found_nested > 100,
            "ok {ok}, failed {failed}, found {found} ({found_nested} nested)"
        );
    }
}
