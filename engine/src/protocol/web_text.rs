//! The base64 layer of gRPC-Web text mode (`application/grpc-web-text`):
//! a streaming decoder for request bodies and an encoder for response
//! flushes.
//!
//! In text mode the whole body (messages and the trailer frame) is base64
//! with the standard alphabet and `=` padding. A sender may encode each
//! flush on its own, so a padded quantum can end in the middle of a body and
//! decoding simply restarts after it; the transport's chunk boundaries fall
//! anywhere, even inside a quantum. [`TextDecoder`] keeps the at most three
//! characters of an unfinished quantum between chunks and refuses anything
//! else than the alphabet, `=` in the last two places of a quantum and ASCII
//! whitespace (skipped), naming the offending byte's offset in the body.

use bytes::BytesMut;
use std::fmt;

/// The standard base64 alphabet (RFC 4648, section 4).
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// [`CLASS`] of a byte outside the alphabet, `=` and whitespace.
const INVALID: u8 = 0xff;
/// [`CLASS`] of `=`.
const PAD: u8 = 0xfe;
/// [`CLASS`] of ASCII whitespace (space, tab, CR, LF, form feed).
const SPACE: u8 = 0xfd;

/// Every byte's class: its 6-bit value for the alphabet, else [`INVALID`],
/// [`PAD`] or [`SPACE`].
const CLASS: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < 64 {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table[b'=' as usize] = PAD;
    let mut i = 0;
    while i < 256 {
        if (i as u8).is_ascii_whitespace() {
            table[i] = SPACE;
        }
        i += 1;
    }
    table
};

/// Why a gRPC-Web text body is not valid base64. Offsets count bytes from
/// the start of the body (across every chunk, whitespace included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextError {
    /// A byte neither in the base64 alphabet, `=`, nor ASCII whitespace.
    InvalidByte { byte: u8, offset: u64 },
    /// A `=` in the first or second place of a quantum: `A===`, `==`, or a
    /// third `=` after a complete `AA==`.
    MisplacedPadding { offset: u64 },
    /// A quantum padded in its third place (`AA=`) whose fourth character,
    /// at `offset`, is not the second `=`.
    IncompletePadding { offset: u64 },
    /// The body ended inside a quantum: `pending` characters (1 to 3) of it
    /// were never completed; `offset` is the body's length.
    Truncated { pending: u8, offset: u64 },
}

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            TextError::InvalidByte { byte, offset } if byte.is_ascii_graphic() => {
                write!(f, "invalid base64 byte '{}' at offset {offset}", byte as char)
            }
            TextError::InvalidByte { byte, offset } => write!(f, "invalid base64 byte 0x{byte:02x} at offset {offset}"),
            TextError::MisplacedPadding { offset } => {
                write!(f, "misplaced base64 padding '=' at offset {offset} (first or second place of a quantum)")
            }
            TextError::IncompletePadding { offset } => {
                write!(f, "base64 padding not completed: expected '=' at offset {offset}")
            }
            TextError::Truncated { pending, offset } => write!(
                f,
                "base64 body ends inside a quantum at offset {offset} ({pending} of 4 characters, padding missing)"
            ),
        }
    }
}

impl std::error::Error for TextError {}

/// Decodes a gRPC-Web text body chunk by chunk.
///
/// Each [`push`](TextDecoder::push) appends to `out` the bytes of every
/// quantum the chunk completes; [`finish`](TextDecoder::finish) then says
/// whether the body ended on a quantum boundary. After an error the decoder
/// stays failed: every later `push` and `finish` returns the same error.
#[derive(Debug, Clone, Default)]
pub struct TextDecoder {
    /// The 6-bit values of the current quantum's data characters.
    sextets: [u8; 3],
    /// Characters of the current quantum read so far, padding included (0 to
    /// 3; a fourth completes it).
    filled: u8,
    /// Data characters among them (`filled` or `filled - 1` after an `=`).
    data: u8,
    /// Body bytes consumed so far, whitespace included.
    offset: u64,
    /// The error that ended decoding, if any.
    failed: Option<TextError>,
}

impl TextDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes the next chunk of the body, appending to `out` the bytes of
    /// every quantum completed so far. On error, `out` holds the bytes of the
    /// quanta completed before the offending byte.
    pub fn push(&mut self, input: &[u8], out: &mut BytesMut) -> Result<(), TextError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        out.reserve((usize::from(self.filled) + input.len()) / 4 * 3);
        let mut i = 0;
        while i < input.len() {
            // The common case: a whole quantum of data characters.
            if self.filled == 0 && input.len() - i >= 4 {
                let [a, b, c, d] = [0, 1, 2, 3].map(|k| CLASS[usize::from(input[i + k])]);
                if (a | b | c | d) < 64 {
                    out.extend_from_slice(&quantum(a, b, c, d));
                    i += 4;
                    continue;
                }
            }
            if let Err(e) = self.byte(input[i], self.offset + i as u64, out) {
                self.offset += i as u64;
                self.failed = Some(e.clone());
                return Err(e);
            }
            i += 1;
        }
        self.offset += input.len() as u64;
        Ok(())
    }

    /// Ends the body: fails if it stopped inside a quantum (or decoding had
    /// already failed).
    pub fn finish(&self) -> Result<(), TextError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.filled {
            0 => Ok(()),
            pending => Err(TextError::Truncated { pending, offset: self.offset }),
        }
    }

    /// One byte of the body, at `offset`.
    fn byte(&mut self, byte: u8, offset: u64, out: &mut BytesMut) -> Result<(), TextError> {
        match CLASS[usize::from(byte)] {
            SPACE => {}
            INVALID => return Err(TextError::InvalidByte { byte, offset }),
            PAD => match (self.filled, self.data) {
                (0 | 1, _) => return Err(TextError::MisplacedPadding { offset }),
                // `AA=`: the fourth character must be `=` too.
                (2, _) => self.filled = 3,
                // `AA==`: one byte.
                (3, 2) => {
                    out.extend_from_slice(&quantum(self.sextets[0], self.sextets[1], 0, 0)[..1]);
                    self.restart();
                }
                // `AAA=`: two bytes.
                _ => {
                    let [a, b, c] = self.sextets;
                    out.extend_from_slice(&quantum(a, b, c, 0)[..2]);
                    self.restart();
                }
            },
            value => {
                if self.data < self.filled {
                    return Err(TextError::IncompletePadding { offset });
                }
                if self.filled == 3 {
                    let [a, b, c] = self.sextets;
                    out.extend_from_slice(&quantum(a, b, c, value));
                    self.restart();
                } else {
                    self.sextets[usize::from(self.filled)] = value;
                    self.filled += 1;
                    self.data += 1;
                }
            }
        }
        Ok(())
    }

    /// Starts a new quantum (after a complete one, padded or not).
    fn restart(&mut self) {
        self.filled = 0;
        self.data = 0;
    }
}

/// The three bytes of four 6-bit values. Bits of a padded quantum's last
/// data character that fall past its bytes are ignored, not checked.
fn quantum(a: u8, b: u8, c: u8, d: u8) -> [u8; 3] {
    [a << 2 | b >> 4, b << 4 | c >> 2, c << 6 | d]
}

/// Appends `data` as one flush of a text-mode body: standard base64 with
/// `=` padding (nothing for no data).
pub fn encode(data: &[u8], out: &mut BytesMut) {
    out.reserve(data.len().div_ceil(3) * 4);
    let sextet = |v: u32, shift: u32| ALPHABET[(v >> shift & 0x3f) as usize];
    let mut chunks = data.chunks_exact(3);
    for c in &mut chunks {
        let v = u32::from(c[0]) << 16 | u32::from(c[1]) << 8 | u32::from(c[2]);
        out.extend_from_slice(&[sextet(v, 18), sextet(v, 12), sextet(v, 6), sextet(v, 0)]);
    }
    match *chunks.remainder() {
        [a] => {
            let v = u32::from(a) << 16;
            out.extend_from_slice(&[sextet(v, 18), sextet(v, 12), b'=', b'=']);
        }
        [a, b] => {
            let v = u32::from(a) << 16 | u32::from(b) << 8;
            out.extend_from_slice(&[sextet(v, 18), sextet(v, 12), sextet(v, 6), b'=']);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `chunks` in order, then finishes.
    fn decode_chunks(chunks: &[&[u8]]) -> Result<Vec<u8>, TextError> {
        let mut decoder = TextDecoder::new();
        let mut out = BytesMut::new();
        for chunk in chunks {
            decoder.push(chunk, &mut out)?;
        }
        decoder.finish()?;
        Ok(out.to_vec())
    }

    fn decode(input: &[u8]) -> Result<Vec<u8>, TextError> {
        decode_chunks(&[input])
    }

    fn encoded(data: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode(data, &mut out);
        out.to_vec()
    }

    #[test]
    fn encode_matches_rfc4648_vectors() {
        let vectors: [(&[u8], &[u8]); 7] = [
            (b"", b""),
            (b"f", b"Zg=="),
            (b"fo", b"Zm8="),
            (b"foo", b"Zm9v"),
            (b"foob", b"Zm9vYg=="),
            (b"fooba", b"Zm9vYmE="),
            (b"foobar", b"Zm9vYmFy"),
        ];
        for (plain, text) in vectors {
            assert_eq!(encoded(plain), text, "encode {plain:?}");
            assert_eq!(decode(text).unwrap(), plain, "decode {text:?}");
        }
        assert_eq!(encoded(&[0xfb, 0xff, 0xbf]), b"+/+/");
        assert_eq!(decode(b"+/+/").unwrap(), [0xfb, 0xff, 0xbf]);
    }

    #[test]
    fn encode_appends() {
        let mut out = BytesMut::from(&b"xy"[..]);
        encode(b"ab", &mut out);
        assert_eq!(&out[..], b"xyYWI=");
    }

    #[test]
    fn round_trips_every_length_and_byte() {
        let data: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        for len in 0..data.len() {
            assert_eq!(decode(&encoded(&data[..len])).unwrap(), &data[..len], "length {len}");
        }
    }

    #[test]
    fn multi_flush_body_decodes_at_every_split() {
        let body = [encoded(b"ab"), encoded(b"cde"), encoded(b"f"), encoded(b"ghijklm")].concat();
        assert_eq!(body, b"YWI=Y2RlZg==Z2hpamtsbQ==");
        let expected = b"abcdefghijklm";
        for split in 0..=body.len() {
            let (first, second) = body.split_at(split);
            assert_eq!(decode_chunks(&[first, second]).unwrap(), expected, "split at {split}");
        }
        // And byte by byte.
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(decode_chunks(&bytes).unwrap(), expected);
    }

    #[test]
    fn decoder_keeps_at_most_three_characters() {
        let mut decoder = TextDecoder::new();
        let mut out = BytesMut::new();
        decoder.push(b"YWJj", &mut out).unwrap();
        assert_eq!(&out[..], b"abc");
        decoder.push(b"ZG", &mut out).unwrap();
        assert_eq!(&out[..], b"abc");
        decoder.push(b"U", &mut out).unwrap();
        assert_eq!(&out[..], b"abc", "three characters stay pending");
        decoder.push(b"=", &mut out).unwrap();
        assert_eq!(&out[..], b"abcde", "a padded quantum is emitted at once");
        decoder.finish().unwrap();
        decoder.push(b"Zg=", &mut out).unwrap();
        assert_eq!(decoder.finish(), Err(TextError::Truncated { pending: 3, offset: 11 }));
        decoder.push(b"=", &mut out).unwrap();
        assert_eq!(&out[..], b"abcdef");
        decoder.finish().unwrap();
    }

    #[test]
    fn whitespace_is_skipped_anywhere() {
        assert_eq!(decode(b"YW\r\nI=\n Y2\tRl\x0c\r\n").unwrap(), b"abcde");
        assert_eq!(decode(b"YWI\r\n=").unwrap(), b"ab");
        assert_eq!(decode(b"Zg=\n=").unwrap(), b"f");
        assert_eq!(decode(b"  \r\n").unwrap(), b"");
        assert_eq!(decode(b"").unwrap(), b"");
    }

    #[test]
    fn non_zero_bits_after_padding_are_accepted() {
        // Canonical "Zg==" and "Zm8=" with the unused low bits set.
        assert_eq!(decode(b"Zh==").unwrap(), b"f");
        assert_eq!(decode(b"Zm9=").unwrap(), b"fo");
    }

    #[test]
    fn rejects_bytes_outside_the_alphabet() {
        assert_eq!(decode(b"YWJj*A=="), Err(TextError::InvalidByte { byte: b'*', offset: 4 }));
        // URL-safe alphabet characters are not standard base64.
        assert_eq!(decode(b"ab-_"), Err(TextError::InvalidByte { byte: b'-', offset: 2 }));
        assert_eq!(decode(b"YW\0I="), Err(TextError::InvalidByte { byte: 0, offset: 2 }));
        assert_eq!(decode(b"YWI=\xc3\xa9"), Err(TextError::InvalidByte { byte: 0xc3, offset: 4 }));
        // Vertical tab is not ASCII whitespace for this purpose.
        assert_eq!(decode(b"YWI=\x0b"), Err(TextError::InvalidByte { byte: 0x0b, offset: 4 }));
    }

    #[test]
    fn rejects_misplaced_padding() {
        assert_eq!(decode(b"A==="), Err(TextError::MisplacedPadding { offset: 1 }));
        assert_eq!(decode(b"===="), Err(TextError::MisplacedPadding { offset: 0 }));
        assert_eq!(decode(b"YWI=="), Err(TextError::MisplacedPadding { offset: 4 }));
        assert_eq!(decode(b"Zg==="), Err(TextError::MisplacedPadding { offset: 4 }));
        assert_eq!(decode(b"YWJj="), Err(TextError::MisplacedPadding { offset: 4 }));
        assert_eq!(decode(b"Zg=A"), Err(TextError::IncompletePadding { offset: 3 }));
        assert_eq!(decode(b"Zg= g"), Err(TextError::IncompletePadding { offset: 4 }));
    }

    #[test]
    fn rejects_a_body_ending_inside_a_quantum() {
        assert_eq!(decode(b"Y"), Err(TextError::Truncated { pending: 1, offset: 1 }));
        assert_eq!(decode(b"YWI=Y2"), Err(TextError::Truncated { pending: 2, offset: 6 }));
        assert_eq!(decode(b"YWI"), Err(TextError::Truncated { pending: 3, offset: 3 }));
        assert_eq!(decode(b"Zg=\r\n"), Err(TextError::Truncated { pending: 3, offset: 5 }));
    }

    #[test]
    fn errors_keep_offsets_across_chunks_and_stick() {
        let mut decoder = TextDecoder::new();
        let mut out = BytesMut::new();
        decoder.push(b"YWJj", &mut out).unwrap();
        decoder.push(b"ZGVm\r\n", &mut out).unwrap();
        let err = decoder.push(b"Z2!p", &mut out).unwrap_err();
        assert_eq!(err, TextError::InvalidByte { byte: b'!', offset: 12 });
        assert_eq!(&out[..], b"abcdef", "output up to the last complete quantum");
        assert_eq!(decoder.push(b"YWJj", &mut out), Err(err.clone()));
        assert_eq!(decoder.finish(), Err(err));
        assert_eq!(&out[..], b"abcdef");
    }

    #[test]
    fn errors_are_the_same_at_every_split() {
        for body in [&b"YWI=Y2Rl!A=="[..], b"YWI=A===", b"YWI=Zg=Zg==", b"YWI=Y2"] {
            let whole = decode(body);
            assert!(whole.is_err());
            for split in 0..=body.len() {
                let (first, second) = body.split_at(split);
                assert_eq!(decode_chunks(&[first, second]), whole, "{body:?} split at {split}");
            }
        }
    }

    #[test]
    fn errors_name_the_problem_and_offset() {
        let text = |input: &[u8]| decode(input).unwrap_err().to_string();
        assert_eq!(text(b"YW*="), "invalid base64 byte '*' at offset 2");
        assert_eq!(text(b"YW\x80="), "invalid base64 byte 0x80 at offset 2");
        assert_eq!(text(b"A==="), "misplaced base64 padding '=' at offset 1 (first or second place of a quantum)");
        assert_eq!(text(b"Zg=A"), "base64 padding not completed: expected '=' at offset 3");
        assert_eq!(
            text(b"YWI=Zg"),
            "base64 body ends inside a quantum at offset 6 (2 of 4 characters, padding missing)"
        );
    }
}
