//! Canonical message bytes: map entries sorted, so that compiling the same
//! inputs twice gives byte-identical plans.
//!
//! prost-reflect keeps map fields in a `HashMap`, so it encodes their entries
//! in a different order on every run. Protobuf gives map entries no order, so
//! sorting them changes nothing for any reader; it only makes plans
//! reproducible (cacheable, diffable).

use prost_reflect::{Kind, MessageDescriptor};

fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Re-encodes `bytes` (a valid encoding of `desc`, as just produced by the
/// encoder) with every map's entries sorted by their canonical bytes,
/// recursively. Returns the input unchanged if it cannot be walked.
pub fn canonicalize(bytes: &[u8], desc: &MessageDescriptor) -> Vec<u8> {
    walk(bytes, desc).unwrap_or_else(|| bytes.to_vec())
}

fn walk(bytes: &[u8], desc: &MessageDescriptor) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut pos = 0;
    // Pending run of entries of one map field: (field number, entries).
    let mut run: Option<(u32, Vec<Vec<u8>>)> = None;
    let flush = |out: &mut Vec<u8>, run: &mut Option<(u32, Vec<Vec<u8>>)>| {
        if let Some((number, mut entries)) = run.take() {
            entries.sort();
            for e in entries {
                put_varint(out, ((number as u64) << 3) | 2);
                put_varint(out, e.len() as u64);
                out.extend_from_slice(&e);
            }
        }
    };
    while pos < bytes.len() {
        let start = pos;
        let key = read_varint(bytes, &mut pos)?;
        let (number, wire) = ((key >> 3) as u32, (key & 7) as u8);
        let field = desc.get_field(number);
        match wire {
            0 => {
                read_varint(bytes, &mut pos)?;
            }
            1 => pos += 8,
            5 => pos += 4,
            2 => {
                let len = read_varint(bytes, &mut pos)? as usize;
                let end = pos.checked_add(len).filter(|&e| e <= bytes.len())?;
                let payload = &bytes[pos..end];
                pos = end;
                if let Some(f) = &field {
                    if let Kind::Message(inner) = f.kind() {
                        let canon = walk(payload, &inner)?;
                        if f.is_map() {
                            match &mut run {
                                Some((n, entries)) if *n == number => entries.push(canon),
                                _ => {
                                    flush(&mut out, &mut run);
                                    run = Some((number, vec![canon]));
                                }
                            }
                        } else {
                            flush(&mut out, &mut run);
                            put_varint(&mut out, key);
                            put_varint(&mut out, canon.len() as u64);
                            out.extend_from_slice(&canon);
                        }
                        continue;
                    }
                }
            }
            _ => return None,
        }
        if pos > bytes.len() {
            return None;
        }
        flush(&mut out, &mut run);
        out.extend_from_slice(&bytes[start..pos]);
    }
    flush(&mut out, &mut run);
    Some(out)
}
