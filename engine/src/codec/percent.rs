//! Percent-decoding (`%XX` escapes, and `+` for a space in query strings),
//! as `grpc-message`, URL paths and queries use it: a `%` not followed by
//! two hex digits stays as it is.

/// The decoded bytes.
pub fn decode_bytes(s: &str, plus_is_space: bool) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' => match (bytes.get(i + 1).and_then(|&b| hex(b)), bytes.get(i + 2).and_then(|&b| hex(b))) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// The decoded text (invalid UTF-8 replaced).
pub fn decode(s: &str, plus_is_space: bool) -> String {
    String::from_utf8_lossy(&decode_bytes(s, plus_is_space)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_spaces() {
        assert_eq!(decode("a%2Fb%zz%4", false), "a/b%zz%4");
        assert_eq!(decode("a+b%20c", true), "a b c");
        assert_eq!(decode("a+b", false), "a+b");
        assert_eq!(decode("%ff", false), "\u{fffd}");
        assert_eq!(decode("a%20b%25", false), "a b%");
        assert_eq!(decode("100%", false), "100%");
        assert_eq!(decode_bytes("%00%ff", false), vec![0, 255]);
    }
}
