//! Rendering response templates: the compiler left encoded pieces around
//! holes; this fills the holes from the request and the stream position and
//! writes every length prefix, straight into the output bytes.

use crate::call::matcher::Request;
use crate::codec::wire::{Malformed, ValueRef};
use bytes::Bytes;
use std::borrow::Cow;
use wirestub_plan::{Expr, Part, Piece, ScalarKind, Source, Template};

/// What expressions can see besides the request.
pub struct Context<'r, 'a> {
    pub request: &'r Request<'a>,
    /// Position of the message in the response stream, and the number of
    /// messages in the rule's list.
    pub index: u64,
    pub total: u64,
}

/// A value during evaluation.
enum V<'x> {
    Text(Cow<'x, [u8]>),
    Int(i128),
    Num(f64),
    Bool(bool),
}

impl V<'_> {
    fn number(&self) -> Option<f64> {
        match self {
            V::Int(i) => Some(*i as f64),
            V::Num(n) => Some(*n),
            V::Bool(b) => Some(*b as u8 as f64),
            V::Text(t) => std::str::from_utf8(t).ok()?.trim().parse().ok(),
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            V::Text(t) => out.extend_from_slice(t),
            V::Int(i) => out.extend_from_slice(i.to_string().as_bytes()),
            V::Num(n) => out.extend_from_slice(number_text(*n).as_bytes()),
            V::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        }
    }
}

/// Numbers print as JavaScript prints them for the usual cases: integers
/// without a fraction, others in their shortest form.
fn number_text(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e21 {
        format!("{}", n as i128)
    } else {
        format!("{n}")
    }
}

/// Renders a template as one framed gRPC message.
pub fn render(t: &Template, cx: &Context) -> Result<Bytes, Malformed> {
    let mut out = vec![0u8; 5];
    pieces(&t.pieces, cx, &mut out)?;
    let len = (out.len() - 5) as u32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    Ok(Bytes::from(out))
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn pieces(list: &[Piece], cx: &Context, out: &mut Vec<u8>) -> Result<(), Malformed> {
    for p in list {
        match p {
            Piece::Bytes(b) => out.extend_from_slice(b),
            Piece::Nested { key, pieces: inner } => {
                let mut content = Vec::new();
                pieces(inner, cx, &mut content)?;
                out.extend_from_slice(key);
                varint(out, content.len() as u64);
                out.extend_from_slice(&content);
            }
            Piece::Text { key, parts } => {
                let mut text = Vec::new();
                render_parts(parts, cx, &mut text)?;
                out.extend_from_slice(key);
                varint(out, text.len() as u64);
                out.extend_from_slice(&text);
            }
            Piece::Number { key, kind, parts } => {
                let mut text = Vec::new();
                render_parts(parts, cx, &mut text)?;
                let before = out.len();
                out.extend_from_slice(key);
                if !encode_number(&text, *kind, out) {
                    // Text that is not a number of this kind leaves the field
                    // out, which reads as its default.
                    out.truncate(before);
                }
            }
        }
    }
    Ok(())
}

fn render_parts(parts: &[Part], cx: &Context, out: &mut Vec<u8>) -> Result<(), Malformed> {
    for part in parts {
        match part {
            Part::Lit(b) => out.extend_from_slice(b),
            // Written in place: a large payload is built once.
            Part::Expr(Expr::Fill(n, pattern)) => fill(n, pattern, cx, out)?,
            Part::Expr(e) => eval(e, cx)?.write(out),
        }
    }
    Ok(())
}

/// The most bytes one `utils.bytes` writes (`--max-fill-bytes`); set at
/// start, process-wide.
static MAX_FILL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(4 << 20);

/// Bounds `utils.bytes` (the engine's send limit).
pub fn set_max_fill(bytes: usize) {
    MAX_FILL.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

/// `utils.bytes(n, pattern)`: `n` bytes of the pattern repeated, at most
/// [`MAX_FILL`]; a count that is not a number writes nothing.
fn fill(n: &Expr, pattern: &[u8], cx: &Context, out: &mut Vec<u8>) -> Result<(), Malformed> {
    let max = MAX_FILL.load(std::sync::atomic::Ordering::Relaxed);
    let mut count = match eval(n, cx)?.number() {
        Some(c) if c >= 1.0 => (c.min(max as f64) as usize).min(max),
        _ => 0,
    };
    // A text pattern is never cut inside a character (string fields must
    // stay UTF-8): the last repetition ends at a character boundary.
    if let Ok(text) = std::str::from_utf8(pattern) {
        let mut tail = count % pattern.len();
        while !text.is_char_boundary(tail) {
            tail -= 1;
            count -= 1;
        }
    }
    if let [byte] = pattern {
        out.resize(out.len() + count, *byte);
        return Ok(());
    }
    out.reserve(count);
    let start = out.len();
    out.extend_from_slice(&pattern[..pattern.len().min(count)]);
    // Doubling copies: a few calls however long the payload.
    while out.len() - start < count {
        let have = out.len() - start;
        out.extend_from_within(start..start + have.min(count - have));
    }
    Ok(())
}

fn eval<'x>(e: &'x Expr, cx: &'x Context) -> Result<V<'x>, Malformed> {
    Ok(match e {
        Expr::Field(i) => match cx.request.scalar(Source::Field(*i))?.0 {
            ValueRef::I64(v) => V::Int(v as i128),
            ValueRef::U64(v) => V::Int(v as i128),
            ValueRef::F64(v) => V::Num(v),
            ValueRef::Bool(b) => V::Bool(b),
            ValueRef::Bytes(b) => V::Text(Cow::Owned(b.to_vec())),
        },
        Expr::EnumName(i, names) => match cx.request.scalar(Source::Field(*i))?.0 {
            ValueRef::I64(v) => match names.binary_search_by_key(&v, |(n, _)| *n as i64) {
                Ok(at) => V::Text(Cow::Borrowed(&names[at].1)),
                Err(_) => V::Int(v as i128),
            },
            _ => V::Text(Cow::Borrowed(b"")),
        },
        Expr::Metadata(i) => match cx.request.scalar(Source::Metadata(*i))?.0 {
            ValueRef::Bytes(b) => V::Text(Cow::Owned(b.to_vec())),
            _ => V::Text(Cow::Borrowed(b"")),
        },
        Expr::StreamIndex => V::Int(cx.index as i128),
        Expr::StreamTotal => V::Int(cx.total as i128),
        Expr::StreamIsFirst => V::Bool(cx.index == 0),
        Expr::StreamIsLast => V::Bool(cx.index + 1 == cx.total),
        Expr::Now => V::Int(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i128)
                .unwrap_or(0),
        ),
        Expr::Uuid => V::Text(Cow::Owned(crate::rng::uuid().into_bytes())),
        Expr::RandomInt(lo, hi) => {
            let span = (*hi as i128 - *lo as i128 + 1) as u128;
            V::Int(*lo as i128 + (crate::rng::next_u64() as u128 % span) as i128)
        }
        Expr::RandomFloat(lo, hi) => V::Num(lo + crate::rng::unit() * (hi - lo)),
        Expr::Format(f, args) => {
            let mut out = Vec::with_capacity(f.len());
            let mut args = args.iter();
            let mut rest = &f[..];
            while let Some(at) = rest.windows(2).position(|w| w == b"%s") {
                out.extend_from_slice(&rest[..at]);
                if let Some(a) = args.next() {
                    eval(a, cx)?.write(&mut out);
                }
                rest = &rest[at + 2..];
            }
            out.extend_from_slice(rest);
            V::Text(Cow::Owned(out))
        }
        Expr::Fill(n, pattern) => {
            let mut out = Vec::new();
            fill(n, pattern, cx, &mut out)?;
            V::Text(Cow::Owned(out))
        }
        Expr::Aggregate(i, agg) => match cx.request.aggregate(*i, *agg)? {
            Some(n) => V::Num(n),
            None => V::Text(Cow::Borrowed(b"")),
        },
        Expr::Number(n) => V::Num(*n),
        Expr::Str(s) => V::Text(Cow::Borrowed(s)),
        Expr::Arith(l, op, r) => {
            let (Some(a), Some(b)) = (eval(l, cx)?.number(), eval(r, cx)?.number()) else {
                return Ok(V::Text(Cow::Borrowed(b"")));
            };
            V::Num(match op {
                b'+' => a + b,
                b'-' => a - b,
                b'*' => a * b,
                _ => a / b,
            })
        }
    })
}

/// Encodes rendered text as a field value of `kind`; false if it does not
/// read as one.
fn encode_number(text: &[u8], kind: ScalarKind, out: &mut Vec<u8>) -> bool {
    let Ok(t) = std::str::from_utf8(text) else { return false };
    let t = t.trim();
    let int = || -> Option<i128> {
        t.parse::<i128>()
            .ok()
            .or_else(|| t.parse::<f64>().ok().filter(|f| f.fract() == 0.0 && f.abs() < 1.8e19).map(|f| f as i128))
    };
    let fits = |v: i128, lo: i128, hi: i128| (lo..=hi).contains(&v).then_some(v);
    use ScalarKind as K;
    match kind {
        K::Int32 | K::Enum => match int().and_then(|v| fits(v, i32::MIN as i128, i32::MAX as i128)) {
            Some(v) => varint(out, v as i64 as u64),
            None => return false,
        },
        K::Int64 => match int().and_then(|v| fits(v, i64::MIN as i128, i64::MAX as i128)) {
            Some(v) => varint(out, v as i64 as u64),
            None => return false,
        },
        K::Uint32 => match int().and_then(|v| fits(v, 0, u32::MAX as i128)) {
            Some(v) => varint(out, v as u64),
            None => return false,
        },
        K::Uint64 => match int().and_then(|v| fits(v, 0, u64::MAX as i128)) {
            Some(v) => varint(out, v as u64),
            None => return false,
        },
        K::Sint32 => match int().and_then(|v| fits(v, i32::MIN as i128, i32::MAX as i128)) {
            Some(v) => varint(out, ((v as i32) << 1 ^ (v as i32) >> 31) as u32 as u64),
            None => return false,
        },
        K::Sint64 => match int().and_then(|v| fits(v, i64::MIN as i128, i64::MAX as i128)) {
            Some(v) => varint(out, ((v as i64) << 1 ^ (v as i64) >> 63) as u64),
            None => return false,
        },
        K::Bool => match t {
            "true" | "1" => out.push(1),
            "false" | "0" => out.push(0),
            _ => return false,
        },
        K::Fixed32 | K::Sfixed32 => match int().and_then(|v| {
            if kind == K::Fixed32 {
                fits(v, 0, u32::MAX as i128)
            } else {
                fits(v, i32::MIN as i128, i32::MAX as i128)
            }
        }) {
            Some(v) => out.extend_from_slice(&(v as u32).to_le_bytes()),
            None => return false,
        },
        K::Fixed64 | K::Sfixed64 => match int().and_then(|v| {
            if kind == K::Fixed64 {
                fits(v, 0, u64::MAX as i128)
            } else {
                fits(v, i64::MIN as i128, i64::MAX as i128)
            }
        }) {
            Some(v) => out.extend_from_slice(&(v as u64).to_le_bytes()),
            None => return false,
        },
        K::Float => match t.parse::<f32>() {
            Ok(f) => out.extend_from_slice(&f.to_le_bytes()),
            Err(_) => return false,
        },
        K::Double => match t.parse::<f64>() {
            Ok(f) => out.extend_from_slice(&f.to_le_bytes()),
            Err(_) => return false,
        },
        K::String | K::Bytes => return false,
    }
    true
}

/// The longest rendered metadata value sent (a header, not a payload).
pub const MAX_METADATA_VALUE: usize = 8 << 10;

/// Renders templated metadata values: (headers, trailers) to add. A `-bin`
/// key's value is the rendered bytes in base64; another key's is the text,
/// left out when it is empty, longer than [`MAX_METADATA_VALUE`] or not a
/// valid header value.
#[allow(clippy::type_complexity)]
pub fn render_metadata(
    templates: &[wirestub_plan::MetadataTemplate],
    request: &Request<'_>,
) -> Result<(Vec<(String, Vec<u8>)>, Vec<(String, Vec<u8>)>), Malformed> {
    use base64::Engine as _;
    let cx = Context { request, index: 0, total: 0 };
    let (mut headers, mut trailers) = (Vec::new(), Vec::new());
    for t in templates {
        let mut value = Vec::new();
        render_parts(&t.parts, &cx, &mut value)?;
        let value = if t.name.ends_with("-bin") {
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(&value).into_bytes()
        } else {
            value
        };
        if value.is_empty() || value.len() > MAX_METADATA_VALUE || !wirestub_plan::is_valid_metadata_value(&value) {
            continue;
        }
        match t.trailer {
            true => trailers.push((t.name.clone(), value)),
            false => headers.push((t.name.clone(), value)),
        }
    }
    Ok((headers, trailers))
}
