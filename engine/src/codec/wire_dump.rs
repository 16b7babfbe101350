//! A readable rendering of protobuf bytes without their schema, for the
//! comments of recordings made without descriptors: each field as
//! `number: value` by wire type; a length-delimited field as an embedded
//! message when its bytes parse as one, else as text when printable, else
//! as its length and first bytes in hex.

use std::fmt::Write;

/// Deepest embedded message shown; deeper ones show as bytes.
const MAX_DEPTH: usize = 8;

/// `bytes` as `1: "text" 2: 150 3: {1: 7}`, cut to about `max` characters.
pub fn dump(bytes: &[u8], max: usize) -> String {
    let mut out = String::new();
    if bytes.is_empty() {
        return "(empty)".into();
    }
    match fields(bytes, 0, &mut out) {
        true => {}
        false => {
            out.clear();
            bytes_of(bytes, &mut out);
        }
    }
    if out.len() > max {
        let mut cut = max;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..70).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        if shift == 63 && byte > 1 {
            return None;
        }
        v |= ((byte & 0x7f) as u64) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// Writes the fields of a message; false if the bytes are not one.
fn fields(b: &[u8], depth: usize, out: &mut String) -> bool {
    let mut at = 0;
    let mut first = true;
    while at < b.len() {
        let Some(key) = varint(b, &mut at) else { return false };
        let (number, wire) = (key >> 3, key & 7);
        if number == 0 || number >= 1 << 29 {
            return false;
        }
        if !first {
            out.push(' ');
        }
        first = false;
        let _ = write!(out, "{number}: ");
        match wire {
            0 => match varint(b, &mut at) {
                Some(v) => {
                    let _ = write!(out, "{v}");
                }
                None => return false,
            },
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                let Some(v) = b.get(at..at + n) else { return false };
                at += n;
                let _ = write!(out, "0x");
                for byte in v.iter().rev() {
                    let _ = write!(out, "{byte:02x}");
                }
            }
            2 => {
                let Some(len) = varint(b, &mut at) else { return false };
                let Some(v) = usize::try_from(len).ok().and_then(|l| b.get(at..at.checked_add(l)?)) else {
                    return false;
                };
                at += v.len();
                let mut inner = String::new();
                if let Some(text) = std::str::from_utf8(v).ok().filter(|t| t.chars().all(|c| !c.is_control())) {
                    let _ = write!(out, "{text:?}");
                } else if depth < MAX_DEPTH && !v.is_empty() && fields(v, depth + 1, &mut inner) {
                    let _ = write!(out, "{{{inner}}}");
                } else {
                    bytes_of(v, out);
                }
            }
            _ => return false,
        }
    }
    true
}

fn bytes_of(v: &[u8], out: &mut String) {
    let _ = write!(out, "<{} bytes", v.len());
    if !v.is_empty() {
        out.push(' ');
        for byte in v.iter().take(16) {
            let _ = write!(out, "{byte:02x}");
        }
        if v.len() > 16 {
            out.push('…');
        }
    }
    out.push('>');
}

#[cfg(test)]
mod tests {
    use super::dump;

    #[test]
    fn fields_by_wire_type() {
        // 1: "hi", 2: 150, 3: {1: 7}, 4: fixed32 1
        let b = b"\x0a\x02hi\x10\x96\x01\x1a\x02\x08\x07\x25\x01\x00\x00\x00";
        assert_eq!(dump(b, 200), "1: \"hi\" 2: 150 3: {1: 7} 4: 0x00000001");
        assert_eq!(dump(b"", 10), "(empty)");
        assert_eq!(dump(b"\xff", 20), "<1 bytes ff>");
        assert!(dump(&[b'\x0a', 100, b'a'], 10).starts_with("<3 bytes"));
        assert!(dump(&b"\x0a\x40".iter().chain([b'x'; 64].iter()).copied().collect::<Vec<_>>(), 20).ends_with('…'));
    }
}
