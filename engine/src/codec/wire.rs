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
//! Rules on repeated fields and maps need every value rather than the last:
//! [`for_each`] walks the same way and hands over each occurrence of the
//! wanted fields in order, [`for_each_element`] turns the occurrences of a
//! repeated field, packed or not, into its elements (with [`unpack`] for the
//! packed runs), and [`map_entry`] reads the key and value of one map entry.
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
use std::ops::ControlFlow;
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
    GroupValue { field: u32 },
    PackedLength { len: usize, width: u8 },
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
            GroupValue { field } => write!(f, "field {field} at byte {at} is a group, expected a value"),
            PackedLength { len, width } => {
                write!(f, "packed fixed{width} run of {len} bytes at byte {at} is not a whole number of values")
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

/// Reads every field of one message, `buf`, found at offset `base` in the
/// top-level message with `budget` levels of nesting left, and calls
/// `visit(number, value, key_at, end)` for each, until `visit` breaks: `value`
/// is `None` for a group, which has been checked and skipped, and `key_at` and
/// `end` are the offsets in `buf` of the key and of the byte after the value.
/// Every field is read, wanted or not, so the whole message is checked as a
/// decoder checks it.
// Why a closure, always inlined: extract, for_each and map_entry share this
// loop, and inlined into each the closure costs nothing against the loop
// written out (measured, old and new side by side, on the request and paths
// of benches/micro.rs). Why four arguments rather than a struct: with a
// struct, the value went through the stack in `scan` and extract took up to
// 1.8 times as long.
#[inline(always)]
fn walk<'a>(
    buf: &'a [u8],
    base: usize,
    budget: u32,
    mut visit: impl FnMut(u32, Option<Raw<'a>>, usize, usize) -> Result<ControlFlow<()>, Malformed>,
) -> Result<ControlFlow<()>, Malformed> {
    let mut pos = 0;
    while pos < buf.len() {
        let key_at = pos;
        let (number, wire_type) = read_key(buf, &mut pos, base)?;
        // Why: the value is read whether wanted or not, as it must be
        // skipped anyway; for a length-delimited field that is just a slice.
        let value = read_value(buf, &mut pos, base, key_at, number, wire_type, budget)?;
        if visit(number, value, key_at, pos)?.is_break() {
            return Ok(ControlFlow::Break(()));
        }
    }
    Ok(ControlFlow::Continue(()))
}

/// The error for a field on a path found with another wire type than
/// `expected`; a `None` value is a group, wire type 3.
fn wrong_wire_type(field: u32, value: Option<Raw<'_>>, expected: u8, at: usize) -> Malformed {
    let got = value.map_or(3, Raw::wire_type);
    Malformed::new(MalformedKind::WrongWireType { field, got, expected }, at)
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
    // Why the flow is dropped: scan never breaks, as the last value of a
    // field can only be known at the end of the message.
    let walked = walk(buf, base, budget, |field, value, key_at, pos| {
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
                _ => return Err(wrong_wire_type(field, value, expected, base + key_at)),
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
        Ok(ControlFlow::Continue(()))
    });
    walked.map(|_| ())
}

/// Calls `f(number, raw)` for every occurrence, in wire order, of any field
/// whose number is in `leaves`, inside the message reached by `prefix`
/// (field numbers of singular embedded messages from the top level; empty
/// prefix = the top-level message). Every occurrence of a prefix message is
/// visited in order (protobuf merges repeated occurrences of an embedded
/// message, so iterating all of them in order is exactly "all values of the
/// merged message"). `f` returns `false` to stop early. Each leaf occurrence is
/// passed raw, whatever its wire type (the caller interprets: a `Raw::Len`
/// for a scalar field may be a packed run, see [`unpack`]). A prefix field
/// seen with a wire type other than 2 is Malformed, as in [`extract`];
/// malformed input where the walk goes is Err; depth limit as in [`extract`].
/// No heap allocation.
///
/// Why it exists: [`extract`] keeps only the last value of a field, which is
/// right for singular fields, but a rule on a repeated field ("any tag is
/// ...", "the list has 3 entries") or on a map needs every value. As with
/// [`extract`], the message is walked once, zero-copy, never decoded.
///
/// The walk checks what it goes through as [`extract`] does: the top-level
/// message, the prefix messages and the groups in them, in full. When `f`
/// stops the walk, the rest is not read, and so not checked either; that is
/// the point of stopping. As in [`extract`], no `leaves` means no field is
/// wanted, and the message is not walked at all.
///
/// # Errors
///
/// [`Malformed`] as for [`extract`]; also when an occurrence of a leaf is a
/// group, which has no raw value to pass (no scalar, string or message field
/// may be sent as a group). Values passed to `f` before an error came from a
/// message that a decoder rejects as a whole, and are meaningless.
pub fn for_each<'a>(
    msg: &'a [u8],
    prefix: &[u32],
    leaves: &[u32],
    f: &mut dyn FnMut(u32, Raw<'a>) -> bool,
) -> Result<(), Malformed> {
    if leaves.is_empty() {
        return Ok(());
    }
    let walked = find_leaves(msg, 0, RECURSION_LIMIT, prefix, leaves, &mut |number, value, key_at, _| match value {
        Some(raw) => Ok(flow(f(number, raw))),
        None => Err(Malformed::new(MalformedKind::GroupValue { field: number }, key_at)),
    });
    walked.map(|_| ())
}

/// What [`find_leaves`] calls for each leaf occurrence: number, value (`None`
/// for a group) and the offsets in the top-level message of its key and of
/// the byte after its value.
type LeafVisitor<'v, 'a> = dyn FnMut(u32, Option<Raw<'a>>, usize, usize) -> Result<ControlFlow<()>, Malformed> + 'v;

/// The walk behind [`for_each`] and [`for_each_element`], on one message,
/// `buf`, at offset `base` in the top-level message, with `prefix` the steps
/// still to take from it. Unlike `f` of [`for_each`], `visit` sees groups and
/// top-level offsets, so that callers can report errors where they are.
fn find_leaves<'a>(
    buf: &'a [u8],
    base: usize,
    budget: u32,
    prefix: &[u32],
    leaves: &[u32],
    visit: &mut LeafVisitor<'_, 'a>,
) -> Result<ControlFlow<()>, Malformed> {
    let Some((&step, rest)) = prefix.split_first() else {
        return walk(buf, base, budget, |number, value, key_at, end| {
            if !leaves.contains(&number) {
                return Ok(ControlFlow::Continue(()));
            }
            visit(number, value, base + key_at, base + end)
        });
    };
    walk(buf, base, budget, |number, value, key_at, end| {
        if number != step {
            return Ok(ControlFlow::Continue(()));
        }
        let Some(Raw::Len(payload)) = value else {
            return Err(wrong_wire_type(number, value, 2, base + key_at));
        };
        if budget == 0 {
            return Err(Malformed::new(MalformedKind::TooDeep, base + key_at));
        }
        // Why: each occurrence is walked in turn, in wire order, which lists
        // the values of the merged message in the order a decoder gives them.
        find_leaves(payload, base + end - payload.len(), budget - 1, rest, leaves, visit)
    })
}

/// Whether to go on after a callback that returns `false` to stop.
fn flow(go_on: bool) -> ControlFlow<()> {
    if go_on {
        ControlFlow::Continue(())
    } else {
        ControlFlow::Break(())
    }
}

/// Decodes a packed run of scalars of wire type `wire_type` (0 varint,
/// 1 fixed64, 5 fixed32) and calls `f` for each, in order; `f` returns false
/// to stop. Err if the run is malformed (truncated varint or a length that is
/// not a multiple of 4/8).
///
/// Why it exists: since proto3, repeated scalar fields are sent packed, all
/// elements in one length-delimited value, and a decoder must accept both
/// forms whatever the field declares; [`for_each`] hands such a run over as a
/// `Raw::Len`, and this reads it, without allocating. Error offsets are
/// within `run`. A fixed-width run of the wrong length is rejected before
/// `f` sees any element; a varint run is checked as it is read, so stopping
/// early leaves the rest unchecked.
///
/// # Panics
///
/// If `wire_type` is not 0, 1 or 5: no other wire type can be packed, so this
/// is a mistake of the caller, not of the message.
pub fn unpack<'a>(run: &'a [u8], wire_type: u8, f: &mut dyn FnMut(Raw<'a>) -> bool) -> Result<(), Malformed> {
    unpack_at(run, 0, wire_type, f).map(|_| ())
}

/// [`unpack`] of a run found at offset `base` in the top-level message.
fn unpack_at<'a>(
    run: &'a [u8],
    base: usize,
    wire_type: u8,
    f: &mut dyn FnMut(Raw<'a>) -> bool,
) -> Result<ControlFlow<()>, Malformed> {
    match wire_type {
        0 => {
            let mut pos = 0;
            while pos < run.len() {
                let at = pos;
                let v = varint(run, &mut pos).map_err(|e| Malformed::new(MalformedKind::Varint(e), base + at))?;
                if !f(Raw::Varint(v)) {
                    return Ok(ControlFlow::Break(()));
                }
            }
            Ok(ControlFlow::Continue(()))
        }
        1 => unpack_fixed::<8>(run, base, |b| Raw::Fixed64(u64::from_le_bytes(b)), f),
        5 => unpack_fixed::<4>(run, base, |b| Raw::Fixed32(u32::from_le_bytes(b)), f),
        _ => panic!("wire type {wire_type} cannot be packed: only 0, 1 and 5 can"),
    }
}

/// The fixed-width case of [`unpack_at`]: values of `N` bytes made by `make`.
fn unpack_fixed<'a, const N: usize>(
    run: &'a [u8],
    base: usize,
    make: fn([u8; N]) -> Raw<'a>,
    f: &mut dyn FnMut(Raw<'a>) -> bool,
) -> Result<ControlFlow<()>, Malformed> {
    // Why before any element: the length alone shows a partial value at the
    // end, which makes the whole message invalid, so the caller is spared
    // elements of a rejected message where that costs nothing (for a varint
    // run it would take a second pass).
    let chunks = run.chunks_exact(N);
    if !chunks.remainder().is_empty() {
        let kind = MalformedKind::PackedLength { len: run.len(), width: (N * 8) as u8 };
        return Err(Malformed::new(kind, base));
    }
    for chunk in chunks {
        let bytes = chunk.try_into().expect("chunks_exact gives N bytes");
        if !f(make(bytes)) {
            return Ok(ControlFlow::Break(()));
        }
    }
    Ok(ControlFlow::Continue(()))
}

/// For a repeated scalar field (packed or not, or mixed, as decoders must
/// accept both): calls `f` for every element in order, using [`for_each`] and
/// [`unpack`]; an occurrence with wire type 2 for a non-length-delimited
/// kind is a packed run; an occurrence of any other unexpected wire type is
/// Malformed. `wire_type` is the element's natural wire type (0, 1, 2, 5).
///
/// Why it exists: the elements of a repeated field are what a rule on it
/// means, and which encoding the client chose must not change the answer;
/// this gives the list a decoder would build, element by element, so that the
/// caller never has to handle packing. With wire type 2 (string, bytes or
/// message elements) nothing is unpacked: each occurrence is one element.
/// With a wire type other than 0, 1, 2 or 5, as for [`PathSpec`], every
/// occurrence is an error.
///
/// # Errors
///
/// As [`for_each`], plus an occurrence of the wrong wire type ("field 4 has
/// wire type 5, expected 0") and a malformed packed run; errors give offsets
/// in the top-level message. Elements passed to `f` before an error are
/// meaningless, as in [`for_each`].
pub fn for_each_element<'a>(
    msg: &'a [u8],
    prefix: &[u32],
    number: u32,
    wire_type: u8,
    f: &mut dyn FnMut(Raw<'a>) -> bool,
) -> Result<(), Malformed> {
    let walked =
        find_leaves(msg, 0, RECURSION_LIMIT, prefix, &[number], &mut |field, value, key_at, end| match value {
            Some(raw) if raw.wire_type() == wire_type => Ok(flow(f(raw))),
            Some(Raw::Len(run)) if matches!(wire_type, 0 | 1 | 5) => unpack_at(run, end - run.len(), wire_type, f),
            _ => Err(wrong_wire_type(field, value, wire_type, key_at)),
        });
    walked.map(|_| ())
}

/// Reads a map entry message (key = field 1, value = field 2, last one wins
/// for each, either may be absent) and returns (key, value) raw values.
/// Unknown fields inside the entry are skipped. Err if malformed.
///
/// Why it exists: on the wire a map is a repeated embedded message of
/// entries, so [`for_each`] hands over each entry as a `Raw::Len`; this reads
/// the key and value out of one, as a decoder does. An absent key or value is
/// the default of its type, which the caller knows and this does not; for
/// the same reason the caller checks the wire types it gets. Later entries
/// with the same key replace earlier ones, which the caller applies by
/// visiting entries in order.
///
/// # Errors
///
/// [`Malformed`] for anything malformed in the entry, at offsets within
/// `entry`, and for a key or value sent as a group. Groups inside the entry
/// may nest 100 levels below it, as the depth of the entry itself is not
/// known here.
pub fn map_entry<'a>(entry: &'a [u8]) -> Result<(Option<Raw<'a>>, Option<Raw<'a>>), Malformed> {
    let (mut key, mut value) = (None, None);
    // Why the flow is dropped: the walk never breaks, as the last key and
    // value win.
    let walked = walk(entry, 0, RECURSION_LIMIT, |number, raw, key_at, _| {
        let slot = match number {
            1 => &mut key,
            2 => &mut value,
            _ => return Ok(ControlFlow::Continue(())),
        };
        match raw {
            Some(raw) => *slot = Some(raw),
            None => return Err(Malformed::new(MalformedKind::GroupValue { field: number }, key_at)),
        }
        Ok(ControlFlow::Continue(()))
    });
    walked.map(|_| (key, value))
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
        fn packed_fixed32(self, field: u32, values: &[u32]) -> Self {
            let body: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.bytes(field, &body)
        }
        fn packed_fixed64(self, field: u32, values: &[u64]) -> Self {
            let body: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
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

    // ---- every value: for_each, unpack, for_each_element, map_entry ---------

    /// Every occurrence [`for_each`] gives, or its error.
    fn occurrences<'a>(msg: &'a [u8], prefix: &[u32], leaves: &[u32]) -> Result<Vec<(u32, Raw<'a>)>, String> {
        let mut got = Vec::new();
        let mut push = |number, raw| {
            got.push((number, raw));
            true
        };
        for_each(msg, prefix, leaves, &mut push).map_err(|e| e.to_string())?;
        Ok(got)
    }

    /// Every element [`for_each_element`] gives, or its error.
    fn elements<'a>(msg: &'a [u8], prefix: &[u32], number: u32, wire_type: u8) -> Result<Vec<Raw<'a>>, String> {
        let mut got = Vec::new();
        let mut push = |raw| {
            got.push(raw);
            true
        };
        for_each_element(msg, prefix, number, wire_type, &mut push).map_err(|e| e.to_string())?;
        Ok(got)
    }

    /// Every value [`unpack`] gives, or its error.
    fn unpacked(run: &[u8], wire_type: u8) -> Result<Vec<Raw<'_>>, String> {
        let mut got = Vec::new();
        let mut push = |raw| {
            got.push(raw);
            true
        };
        unpack(run, wire_type, &mut push).map_err(|e| e.to_string())?;
        Ok(got)
    }

    fn varints(values: &[u64]) -> Vec<Raw<'static>> {
        values.iter().map(|&v| Raw::Varint(v)).collect()
    }

    #[test]
    fn for_each_gives_every_occurrence_in_wire_order() {
        let inner = Msg::new().varint(1, 666);
        let msg = Msg::new()
            .varint(1, 1)
            .bytes(2, b"a")
            .msg(3, &inner)
            .fixed32(1, 2)
            .group(4, &Msg::new().varint(1, 666).bytes(2, b"in group"))
            .packed(1, &[3, 4])
            .fixed64(2, 5)
            .varint(9, 9)
            .varint(1, 6);
        let want = vec![
            (1, Raw::Varint(1)),
            (2, Raw::Len(b"a")),
            (1, Raw::Fixed32(2)),
            // A packed run is passed as it is, for the caller to unpack.
            (1, Raw::Len(&[3, 4])),
            (2, Raw::Fixed64(5)),
            (1, Raw::Varint(6)),
        ];
        assert_eq!(occurrences(&msg.0, &[], &[1, 2]), Ok(want.clone()));
        // The order of the leaves does not matter, and repeating one does not
        // repeat its values.
        assert_eq!(occurrences(&msg.0, &[], &[2, 1, 2]), Ok(want));
        assert_eq!(occurrences(&msg.0, &[], &[7]), Ok(vec![]));
        assert_eq!(occurrences(&[], &[], &[1]), Ok(vec![]));
        // An embedded message as a leaf is passed whole, not entered.
        assert_eq!(occurrences(&msg.0, &[], &[3]), Ok(vec![(3, Raw::Len(&inner.0))]));
        // Large field numbers work like small ones.
        let msg = Msg::new().varint(536_870_911, 1).varint(100_000, 2).varint(536_870_911, 3);
        assert_eq!(
            occurrences(&msg.0, &[], &[536_870_911]),
            Ok(vec![(536_870_911, Raw::Varint(1)), (536_870_911, Raw::Varint(3))])
        );
    }

    #[test]
    fn for_each_walks_every_occurrence_of_the_prefix_messages() {
        // Field 1 (an embedded message) occurs twice; each occurrence holds
        // values of field 2 and an embedded message 3 with values of field 4.
        let first = Msg::new().varint(2, 10).msg(3, &Msg::new().varint(4, 40)).varint(2, 11);
        let second = Msg::new().varint(2, 12).msg(3, &Msg::new().varint(4, 41).varint(4, 42)).msg(3, &Msg::new());
        let msg = Msg::new().msg(1, &first).varint(2, 99).msg(5, &Msg::new().varint(2, 98)).msg(1, &second);
        let found = |prefix: &[u32], leaves: &[u32]| occurrences(&msg.0, prefix, leaves).unwrap();
        let v = Raw::Varint;
        assert_eq!(found(&[1], &[2]), [(2, v(10)), (2, v(11)), (2, v(12))]);
        assert_eq!(found(&[1, 3], &[4]), [(4, v(40)), (4, v(41)), (4, v(42))]);
        // Leaves are looked for at the end of the prefix only.
        assert_eq!(found(&[1, 3], &[2, 4]), [(4, v(40)), (4, v(41)), (4, v(42))]);
        assert_eq!(found(&[], &[2]), [(2, v(99))]);
        assert_eq!(found(&[5], &[2]), [(2, v(98))]);
        assert_eq!(found(&[6], &[2]), []);
        assert_eq!(found(&[1, 6], &[2]), []);
        // The same through for_each_element, with each occurrence of the
        // prefix message mixing packed and unpacked elements.
        let msg = Msg::new()
            .msg(1, &Msg::new().varint(2, 1).packed(2, &[2, 3]))
            .varint(2, 99)
            .msg(1, &Msg::new().packed(2, &[4]).varint(2, 5));
        assert_eq!(elements(&msg.0, &[1], 2, 0), Ok(varints(&[1, 2, 3, 4, 5])));
        assert_eq!(elements(&msg.0, &[], 2, 0), Ok(varints(&[99])));
    }

    #[test]
    fn for_each_stops_when_asked() {
        // The message ends in a truncated varint, which the walk never reaches
        // when it stops before.
        let msg = Msg::new().varint(1, 1).varint(2, 2).varint(1, 3).raw(&[0x08, 0x80]);
        assert!(occurrences(&msg.0, &[], &[1]).is_err());
        for stop_after in 1..=3 {
            let mut seen = Vec::new();
            let result = for_each(&msg.0, &[], &[1, 2], &mut |n, raw| {
                seen.push((n, raw));
                seen.len() < stop_after
            });
            assert_eq!(result, Ok(()));
            assert_eq!(seen, [(1, Raw::Varint(1)), (2, Raw::Varint(2)), (1, Raw::Varint(3))][..stop_after]);
        }
        // Stopping inside an embedded message stops the whole walk: neither
        // the rest of the top level nor the later occurrence is visited.
        let msg =
            Msg::new().msg(1, &Msg::new().varint(2, 1).varint(2, 2)).msg(1, &Msg::new().varint(2, 3)).raw(&[0x0e]);
        let mut seen = Vec::new();
        let result = for_each(&msg.0, &[1], &[2], &mut |_, raw| {
            seen.push(raw);
            false
        });
        assert_eq!((result, seen), (Ok(()), vec![Raw::Varint(1)]));
        // Elements stop anywhere: inside a packed run, between occurrences.
        let msg = Msg::new().packed(1, &[1, 2, 3]).varint(1, 4).raw(&[0xff]);
        assert!(elements(&msg.0, &[], 1, 0).is_err());
        for stop_after in 1..=4 {
            let mut seen = Vec::new();
            let result = for_each_element(&msg.0, &[], 1, 0, &mut |raw| {
                seen.push(raw);
                seen.len() < stop_after
            });
            assert_eq!(result, Ok(()));
            assert_eq!(seen, varints(&[1, 2, 3, 4])[..stop_after]);
        }
        // Stopping in a varint run leaves its malformed rest unread.
        let mut seen = Vec::new();
        let result = unpack(&[0x05, 0x80], 0, &mut |raw| {
            seen.push(raw);
            false
        });
        assert_eq!((result, seen), (Ok(()), varints(&[5])));
        let mut calls = 0;
        let result = unpack(&[1, 0, 0, 0, 2, 0, 0, 0], 5, &mut |_| {
            calls += 1;
            false
        });
        assert_eq!((result, calls), (Ok(()), 1));
    }

    #[test]
    fn for_each_errors_as_extract_does() {
        // A prefix step must be an embedded message, as in extract.
        let msg = Msg::new().varint(1, 5);
        assert_eq!(occurrences(&msg.0, &[1], &[2]).unwrap_err(), err(&msg.0, &[1, 2], 0));
        assert_eq!(occurrences(&msg.0, &[1], &[2]).unwrap_err(), "field 1 has wire type 0, expected 2");
        let msg = Msg::new().group(1, &Msg::new().varint(2, 1));
        assert_eq!(occurrences(&msg.0, &[1], &[2]).unwrap_err(), "field 1 has wire type 3, expected 2");
        // A group has no raw value to pass.
        let msg = Msg::new().varint(2, 1).group(2, &Msg::new());
        assert_eq!(occurrences(&msg.0, &[], &[2]).unwrap_err(), "field 2 at byte 2 is a group, expected a value");
        // Offsets are in the top-level message, as in extract.
        let msg = Msg::new().varint(5, 1).bytes(1, &[0x10, 0x80]);
        assert_eq!(occurrences(&msg.0, &[1], &[2]).unwrap_err(), "truncated varint at byte 5");
        assert_eq!(err(&msg.0, &[1, 2], 0), "truncated varint at byte 5");
        let msg = Msg::new().varint(5, 1).msg(1, &Msg::new().group(2, &Msg::new()));
        assert_eq!(occurrences(&msg.0, &[1], &[2]).unwrap_err(), "field 2 at byte 4 is a group, expected a value");
        // Malformed input after the last leaf is still an error.
        let msg = Msg::new().varint(1, 1).raw(&[0x12, 0x09]);
        assert!(occurrences(&msg.0, &[], &[1]).is_err());
        // Only walked parts are checked: a sibling message, a leaf's payload.
        let garbage = [0xff, 0x07, 0x00, 0x0c];
        let msg = Msg::new().bytes(3, &garbage).msg(2, &Msg::new().bytes(1, &garbage));
        assert_eq!(occurrences(&msg.0, &[2], &[1]), Ok(vec![(1, Raw::Len(&garbage))]));
        assert!(occurrences(&msg.0, &[3], &[1]).is_err());
        // No leaves ask for nothing, and the message is not walked.
        assert_eq!(occurrences(&[0xff], &[], &[]), Ok(vec![]));
        assert_eq!(occurrences(&msg.0, &[3], &[]), Ok(vec![]));
    }

    #[test]
    fn for_each_nesting_is_limited_as_in_extract() {
        let wrapped = |levels: usize| {
            let mut m = Msg::new().varint(1, 7);
            for _ in 0..levels {
                m = Msg::new().msg(2, &m);
            }
            (m, vec![2; levels])
        };
        let (msg, prefix) = wrapped(100);
        assert_eq!(occurrences(&msg.0, &prefix, &[1]), Ok(vec![(1, Raw::Varint(7))]));
        assert_eq!(elements(&msg.0, &prefix, 1, 0), Ok(varints(&[7])));
        let (msg, prefix) = wrapped(101);
        let e = occurrences(&msg.0, &prefix, &[1]).unwrap_err();
        assert!(e.starts_with("nested deeper than 100 levels"), "{e}");
        let mut path = prefix.clone();
        path.push(1);
        assert_eq!(e, err(&msg.0, &path, 0));
        // Groups count too, in the prefix messages and in the leaves' one.
        let groups = |levels: usize| {
            let mut m = Msg::new().varint(1, 1);
            for _ in 0..levels {
                m = Msg::new().group(3, &m);
            }
            m
        };
        let in_leaves = |levels: usize| Msg::new().msg(2, &groups(levels));
        assert_eq!(occurrences(&in_leaves(99).0, &[2], &[1]), Ok(vec![]));
        let e = occurrences(&in_leaves(100).0, &[2], &[1]).unwrap_err();
        assert!(e.starts_with("nested deeper than 100 levels"), "{e}");
        assert_eq!(e, err(&in_leaves(100).0, &[2, 1], 0));
        let in_prefix = |levels: usize| groups(levels).msg(2, &Msg::new().varint(1, 5));
        assert_eq!(occurrences(&in_prefix(100).0, &[2], &[1]), Ok(vec![(1, Raw::Varint(5))]));
        let e = occurrences(&in_prefix(101).0, &[2], &[1]).unwrap_err();
        assert!(e.starts_with("nested deeper than 100 levels"), "{e}");
    }

    #[test]
    fn unpack_reads_packed_runs() {
        let mut run = Vec::new();
        for v in [0, 1, 300, u64::MAX] {
            enc_varint(v, &mut run);
        }
        assert_eq!(unpacked(&run, 0), Ok(varints(&[0, 1, 300, u64::MAX])));
        // Non-minimal varints are valid, as anywhere else.
        assert_eq!(unpacked(&[0x81, 0x80, 0x00, 0x02], 0), Ok(varints(&[1, 2])));
        let run: Vec<u8> = [7u32, u32::MAX].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(unpacked(&run, 5), Ok(vec![Raw::Fixed32(7), Raw::Fixed32(u32::MAX)]));
        let run: Vec<u8> = [7u64, u64::MAX].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(unpacked(&run, 1), Ok(vec![Raw::Fixed64(7), Raw::Fixed64(u64::MAX)]));
        // The same bytes read as fixed32 give four values.
        assert_eq!(unpacked(&run, 5).unwrap().len(), 4);
        for wire_type in [0, 1, 5] {
            assert_eq!(unpacked(&[], wire_type), Ok(vec![]), "empty run of wire type {wire_type}");
        }
    }

    #[test]
    fn malformed_runs_are_errors() {
        assert_eq!(unpacked(&[0x01, 0x80], 0).unwrap_err(), "truncated varint at byte 1");
        let mut overflow = vec![0x01];
        overflow.extend([0xff; 9]);
        overflow.push(0x02);
        assert_eq!(unpacked(&overflow, 0).unwrap_err(), "varint overflows 64 bits at byte 1");
        let mut long = vec![0x80; 10];
        long.push(0x00);
        assert_eq!(unpacked(&long, 0).unwrap_err(), "varint longer than 10 bytes at byte 0");
        assert_eq!(
            unpacked(&[1, 0, 0, 0, 2], 5).unwrap_err(),
            "packed fixed32 run of 5 bytes at byte 0 is not a whole number of values"
        );
        assert_eq!(
            unpacked(&[1, 0, 0, 0], 1).unwrap_err(),
            "packed fixed64 run of 4 bytes at byte 0 is not a whole number of values"
        );
        // A fixed-width run of the wrong length gives no element at all.
        let mut calls = 0;
        assert!(unpack(&[0; 13], 5, &mut |_| {
            calls += 1;
            true
        })
        .is_err());
        assert_eq!(calls, 0);
    }

    #[test]
    #[should_panic(expected = "wire type 2 cannot be packed")]
    fn unpack_of_a_length_delimited_kind_is_a_caller_bug() {
        let _ = unpack(&[], 2, &mut |_| true);
    }

    #[test]
    fn for_each_element_accepts_packed_unpacked_and_mixed() {
        // Varint elements.
        let want = varints(&[1, 300, u64::MAX]);
        let unpacked = Msg::new().varint(4, 1).varint(4, 300).int(4, -1);
        let packed = Msg::new().packed(4, &[1, 300, u64::MAX]);
        let mixed = Msg::new().varint(4, 1).varint(9, 0).packed(4, &[300]).packed(4, &[]).int(4, -1);
        for msg in [unpacked, packed, mixed] {
            assert_eq!(elements(&msg.0, &[], 4, 0), Ok(want.clone()), "{:02x?}", msg.0);
        }
        // Fixed32 elements.
        let want = vec![Raw::Fixed32(1), Raw::Fixed32(2), Raw::Fixed32(u32::MAX)];
        let unpacked = Msg::new().fixed32(4, 1).fixed32(4, 2).fixed32(4, u32::MAX);
        let packed = Msg::new().packed_fixed32(4, &[1, 2, u32::MAX]);
        let mixed = Msg::new().packed_fixed32(4, &[1]).fixed64(5, 0).fixed32(4, 2).packed_fixed32(4, &[u32::MAX]);
        for msg in [unpacked, packed, mixed] {
            assert_eq!(elements(&msg.0, &[], 4, 5), Ok(want.clone()), "{:02x?}", msg.0);
        }
        // Fixed64 elements.
        let want = vec![Raw::Fixed64(1), Raw::Fixed64(2), Raw::Fixed64(u64::MAX)];
        let unpacked = Msg::new().fixed64(4, 1).fixed64(4, 2).fixed64(4, u64::MAX);
        let packed = Msg::new().packed_fixed64(4, &[1, 2, u64::MAX]);
        let mixed = Msg::new().fixed64(4, 1).packed_fixed64(4, &[2, u64::MAX]).packed_fixed64(4, &[]);
        for msg in [unpacked, packed, mixed] {
            assert_eq!(elements(&msg.0, &[], 4, 1), Ok(want.clone()), "{:02x?}", msg.0);
        }
        // Length-delimited elements are never unpacked: one per occurrence,
        // empty ones included.
        let inner = Msg::new().varint(1, 1);
        let msg = Msg::new().bytes(4, b"a").bytes(4, b"").varint(1, 1).msg(4, &inner);
        assert_eq!(elements(&msg.0, &[], 4, 2), Ok(vec![Raw::Len(b"a"), Raw::Len(b""), Raw::Len(&inner.0)]));
        // An absent field has no elements.
        assert_eq!(elements(&msg.0, &[], 5, 0), Ok(vec![]));
    }

    #[test]
    fn for_each_element_rejects_other_wire_types() {
        let msg = Msg::new().varint(4, 1).fixed32(4, 2);
        assert_eq!(elements(&msg.0, &[], 4, 0).unwrap_err(), "field 4 has wire type 5, expected 0");
        assert_eq!(elements(&msg.0, &[], 4, 5).unwrap_err(), "field 4 has wire type 0, expected 5");
        assert_eq!(elements(&msg.0, &[], 4, 2).unwrap_err(), "field 4 has wire type 0, expected 2");
        let msg = Msg::new().fixed64(4, 1);
        assert_eq!(elements(&msg.0, &[], 4, 5).unwrap_err(), "field 4 has wire type 1, expected 5");
        let msg = Msg::new().group(4, &Msg::new());
        assert_eq!(elements(&msg.0, &[], 4, 0).unwrap_err(), "field 4 has wire type 3, expected 0");
        // As with PathSpec, another wire type makes every occurrence an error.
        let msg = Msg::new().varint(4, 1);
        assert_eq!(elements(&msg.0, &[], 4, 3).unwrap_err(), "field 4 has wire type 0, expected 3");
        assert_eq!(elements(&msg.0, &[], 5, 3), Ok(vec![]));
        // Malformed packed runs, with offsets in the top-level message.
        let msg = Msg::new().varint(1, 1).bytes(4, &[0x01, 0x80]);
        assert_eq!(elements(&msg.0, &[], 4, 0).unwrap_err(), "truncated varint at byte 5");
        let msg = Msg::new().bytes(4, &[1, 2, 3]);
        assert_eq!(
            elements(&msg.0, &[], 4, 5).unwrap_err(),
            "packed fixed32 run of 3 bytes at byte 2 is not a whole number of values"
        );
        let msg = Msg::new().msg(1, &Msg::new().bytes(4, &[1, 2, 3]));
        assert_eq!(
            elements(&msg.0, &[1], 4, 1).unwrap_err(),
            "packed fixed64 run of 3 bytes at byte 4 is not a whole number of values"
        );
        // The same bytes are a valid string element.
        assert_eq!(elements(&msg.0, &[1], 4, 2), Ok(vec![Raw::Len(&[1, 2, 3])]));
    }

    #[test]
    fn map_entries() {
        let entry = |m: Msg| {
            let bytes: &'static [u8] = Box::leak(m.0.into_boxed_slice());
            map_entry(bytes).map_err(|e| e.to_string())
        };
        let (k, v) = (Some(Raw::Len(b"k")), Some(Raw::Varint(7)));
        assert_eq!(entry(Msg::new().bytes(1, b"k").varint(2, 7)), Ok((k, v)));
        assert_eq!(entry(Msg::new().varint(2, 7).bytes(1, b"k")), Ok((k, v)), "value first");
        assert_eq!(entry(Msg::new().varint(2, 7)), Ok((None, v)), "no key");
        assert_eq!(entry(Msg::new().bytes(1, b"k")), Ok((k, None)), "no value");
        assert_eq!(entry(Msg::new()), Ok((None, None)));
        // Last one wins, for each.
        let msg = Msg::new().bytes(1, b"a").varint(2, 1).bytes(1, b"k").fixed32(2, 2);
        assert_eq!(entry(msg), Ok((k, Some(Raw::Fixed32(2)))));
        // Unknown fields of every wire type are skipped, and fields 1 and 2
        // inside a group or a message are not the entry's.
        let unknown = Msg::new()
            .varint(3, 1)
            .fixed64(4, 1)
            .group(5, &Msg::new().varint(1, 666).varint(2, 666))
            .bytes(6, &[0xff, 0x07])
            .msg(7, &Msg::new().varint(1, 666))
            .fixed32(8, 1);
        assert_eq!(entry(unknown.clone().bytes(1, b"k").raw(&unknown.0).varint(2, 7)), Ok((k, v)));
        assert_eq!(entry(unknown.clone()), Ok((None, None)));
        // A message value is passed whole.
        let inner = Msg::new().bytes(1, b"x");
        let bytes = Msg::new().varint(1, 3).msg(2, &inner).0;
        assert_eq!(map_entry(&bytes), Ok((Some(Raw::Varint(3)), Some(Raw::Len(&inner.0)))));
        // Malformed entries, with offsets in the entry.
        assert_eq!(entry(Msg::new().bytes(1, b"k").raw(&[0x10, 0x80])).unwrap_err(), "truncated varint at byte 4");
        assert_eq!(
            entry(Msg::new().raw(&[0x12, 0x05, b'a'])).unwrap_err(),
            "length 5 at byte 1 runs past the end (1 bytes left)"
        );
        assert_eq!(
            entry(Msg::new().group(1, &Msg::new())).unwrap_err(),
            "field 1 at byte 0 is a group, expected a value"
        );
        assert_eq!(
            entry(Msg::new().key(5, 3).varint(1, 1)).unwrap_err(),
            "group of field 5 at byte 0 is not terminated"
        );
        assert_eq!(entry(Msg::new().key(1, 4)).unwrap_err(), "unmatched end group of field 1 at byte 0");

        // A map<string, int32> field 3 of the message at field 1, as a rule
        // reads it: every entry of every occurrence, in order.
        let e1 = Msg::new().bytes(1, b"a").varint(2, 1);
        let e2 = Msg::new().varint(2, 2);
        let e3 = Msg::new().bytes(1, b"a").varint(2, 3);
        let msg = Msg::new().msg(1, &Msg::new().msg(3, &e1).msg(3, &e2)).msg(1, &Msg::new().msg(3, &e3));
        let mut entries = Vec::new();
        for_each(&msg.0, &[1], &[3], &mut |_, raw| {
            let Raw::Len(bytes) = raw else { panic!("{raw:?}") };
            entries.push(map_entry(bytes).unwrap());
            true
        })
        .unwrap();
        assert_eq!(
            entries,
            [
                (Some(Raw::Len(b"a")), Some(Raw::Varint(1))),
                (None, Some(Raw::Varint(2))),
                (Some(Raw::Len(b"a")), Some(Raw::Varint(3))),
            ]
        );
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

    /// All occurrences of `leaves` in the message reached by `prefix`, from
    /// the naive decoder: prefix messages are merged as in [`ref_lookup`].
    fn ref_occurrences<'a>(msg: &'a [u8], prefix: &[u32], leaves: &[u32]) -> Result<Vec<(u32, Raw<'a>)>, ()> {
        let mut fields = ref_fields(msg, RECURSION_LIMIT)?;
        let mut depth_left = RECURSION_LIMIT;
        for &step in prefix {
            let mut merged = Vec::new();
            for (field, node) in fields {
                match node {
                    _ if field != step => {}
                    Node::Scalar(Raw::Len(payload)) if depth_left > 0 => {
                        merged.extend(ref_fields(payload, depth_left - 1)?)
                    }
                    _ => return Err(()),
                }
            }
            fields = merged;
            depth_left = depth_left.saturating_sub(1);
        }
        let mut found = Vec::new();
        for (field, node) in fields {
            match node {
                _ if !leaves.contains(&field) => {}
                Node::Scalar(raw) => found.push((field, raw)),
                Node::Group => return Err(()),
            }
        }
        Ok(found)
    }

    /// A packed run decoded value by value, a partial value being an error.
    fn ref_unpack(run: &[u8], wire_type: u8) -> Result<Vec<Raw<'_>>, ()> {
        let mut pos = 0;
        let mut values = Vec::new();
        while pos < run.len() {
            values.push(match wire_type {
                0 => Raw::Varint(ref_varint(run, &mut pos)?),
                1 => Raw::Fixed64(u64::from_le_bytes(ref_take(run, &mut pos, 8)?.try_into().unwrap())),
                _ => Raw::Fixed32(u32::from_le_bytes(ref_take(run, &mut pos, 4)?.try_into().unwrap())),
            });
        }
        Ok(values)
    }

    /// The elements of a repeated field, as a decoder builds the list.
    fn ref_elements<'a>(occurrences: &[(u32, Raw<'a>)], wire_type: u8) -> Result<Vec<Raw<'a>>, ()> {
        let mut values = Vec::new();
        for &(_, raw) in occurrences {
            match raw {
                _ if raw.wire_type() == wire_type => values.push(raw),
                Raw::Len(run) if matches!(wire_type, 0 | 1 | 5) => values.extend(ref_unpack(run, wire_type)?),
                _ => return Err(()),
            }
        }
        Ok(values)
    }

    /// The last key and value of a map entry, from the naive decoder.
    fn ref_map_entry(entry: &[u8]) -> Result<(Option<Raw<'_>>, Option<Raw<'_>>), ()> {
        let (mut key, mut value) = (None, None);
        for (field, node) in ref_fields(entry, RECURSION_LIMIT)? {
            let slot = match field {
                1 => &mut key,
                2 => &mut value,
                _ => continue,
            };
            match node {
                Node::Scalar(raw) => *slot = Some(raw),
                Node::Group => return Err(()),
            }
        }
        Ok((key, value))
    }

    /// The wire types of fields 1 to 6 in messages with repeated fields:
    /// field 2 is an embedded message, field 3 strings, field 6 a group.
    const REPEATED_SCHEME: [u8; 7] = [0, 0, 2, 2, 5, 1, 3];

    /// A message with repeated fields, scalars packed about a third of the time.
    fn gen_repeated(rng: &mut Rng, depth: u32) -> Msg {
        let mut msg = Msg::new();
        for _ in 0..rng.below(12) {
            let field = 1 + rng.below(6) as u32;
            let kind = if rng.chance(15) { rng.below(7) as u8 } else { REPEATED_SCHEME[field as usize] };
            let count = rng.below(4) as usize;
            msg = match kind {
                0 if rng.chance(3) => {
                    let values: Vec<u64> = (0..count).map(|_| rng.next() >> rng.below(64)).collect();
                    msg.packed(field, &values)
                }
                0 => msg.varint(field, rng.next() >> rng.below(64)),
                1 if rng.chance(3) => {
                    let values: Vec<u64> = (0..count).map(|_| rng.next()).collect();
                    msg.packed_fixed64(field, &values)
                }
                1 => msg.fixed64(field, rng.next()),
                5 if rng.chance(3) => {
                    let values: Vec<u32> = (0..count).map(|_| rng.next() as u32).collect();
                    msg.packed_fixed32(field, &values)
                }
                5 => msg.fixed32(field, rng.next() as u32),
                2 if field == 2 && depth < 4 => msg.msg(field, &gen_repeated(rng, depth + 1)),
                2 => {
                    let bytes: Vec<u8> = (0..rng.below(9)).map(|_| rng.next() as u8).collect();
                    msg.bytes(field, &bytes)
                }
                3 | 4 if depth < 4 => msg.group(field, &gen_repeated(rng, depth + 1)),
                _ => msg.varint(field, 1),
            };
        }
        msg
    }

    #[test]
    fn all_values_agree_with_a_naive_decoder() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let (mut ok, mut failed, mut elements_found, mut nested, mut stopped) = (0, 0, 0, 0, 0);
        let (mut runs_ok, mut runs_failed, mut entries_ok, mut entries_failed) = (0, 0, 0, 0);
        for round in 0..3000 {
            let msg = gen_repeated(&mut rng, 0).0;
            let msg = corrupt(&mut rng, msg);
            // Steps lead through field 2 (the embedded message), mostly.
            let prefix: Vec<u32> =
                (0..rng.below(3)).map(|_| if rng.chance(8) { 1 + rng.below(6) as u32 } else { 2 }).collect();
            let number = 1 + rng.below(6) as u32;
            let scheme = REPEATED_SCHEME[number as usize];
            let wire_type = match rng.below(20) {
                0 => 3,
                1..=2 => [0, 1, 2, 5][rng.below(4) as usize],
                _ if scheme == 3 => [0, 1, 2, 5][rng.below(4) as usize],
                _ => scheme,
            };
            let mut leaves = vec![number];
            if rng.chance(3) {
                leaves.push(1 + rng.below(6) as u32);
            }
            let context = format!("round {round}: {msg:02x?} at {prefix:?} for {leaves:?} of wire type {wire_type}");

            let want = ref_occurrences(&msg, &prefix, &leaves);
            let got = occurrences(&msg, &prefix, &leaves).map_err(|_| ());
            assert_eq!(got, want, "for_each, {context}");

            let want_elements = ref_occurrences(&msg, &prefix, &[number]).and_then(|o| ref_elements(&o, wire_type));
            let got_elements = elements(&msg, &prefix, number, wire_type).map_err(|_| ());
            assert_eq!(got_elements, want_elements, "for_each_element, {context}");

            match &want_elements {
                Ok(values) => {
                    ok += 1;
                    elements_found += values.len();
                    nested += usize::from(!prefix.is_empty() && !values.is_empty());
                    // Stopping early gives the first elements, and no error.
                    if !values.is_empty() {
                        let stop_after = 1 + rng.below(values.len() as u64) as usize;
                        let mut seen = Vec::new();
                        let result = for_each_element(&msg, &prefix, number, wire_type, &mut |raw| {
                            seen.push(raw);
                            seen.len() < stop_after
                        });
                        assert_eq!(result, Ok(()), "stop after {stop_after}, {context}");
                        assert_eq!(seen, values[..stop_after], "stop after {stop_after}, {context}");
                        stopped += 1;
                    }
                }
                Err(()) => failed += 1,
            }

            // Every payload found doubles as a packed run and a map entry.
            for (_, raw) in want.iter().flatten() {
                let Raw::Len(payload) = *raw else { continue };
                for wire_type in [0, 1, 5] {
                    let want = ref_unpack(payload, wire_type);
                    assert_eq!(unpacked(payload, wire_type).map_err(|_| ()), want, "unpack {payload:02x?}");
                    if want.is_ok() {
                        runs_ok += 1;
                    } else {
                        runs_failed += 1;
                    }
                }
                let want = ref_map_entry(payload);
                assert_eq!(map_entry(payload).map_err(|_| ()), want, "map_entry {payload:02x?}");
                if want.is_ok() {
                    entries_ok += 1;
                } else {
                    entries_failed += 1;
                }
            }
        }
        // The generator must exercise both outcomes, find elements, nested
        // ones included, and give valid and invalid runs and entries.
        let stats = format!(
            "ok {ok}, failed {failed}, {elements_found} elements ({nested} nested), stopped {stopped}, \
             runs {runs_ok}/{runs_failed}, entries {entries_ok}/{entries_failed}"
        );
        assert!(ok > 1000 && failed > 300 && elements_found > 1500 && nested > 150 && stopped > 400, "{stats}");
        assert!(runs_ok > 500 && runs_failed > 500 && entries_ok > 300 && entries_failed > 300, "{stats}");
    }
}
