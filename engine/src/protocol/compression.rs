//! Message compression for gRPC, Connect and gRPC-Web: the encodings the
//! engine knows (`identity`, `gzip`), choosing one from a peer's accept
//! list, and gzip both ways.
//!
//! Decompression is bounded: a message is inflated only until it exceeds
//! the caller's size limit, so a small compressed message that expands to
//! gigabytes (a "zip bomb") costs O(limit) memory and time, never its full
//! expansion.

use bytes::Bytes;
use flate2::bufread::{GzEncoder, MultiGzDecoder};
use flate2::Compression;
use std::fmt;
use std::io::{self, BufRead, Read};

/// A message encoding (`grpc-encoding`, `connect-content-encoding`,
/// `content-encoding` of a Connect unary body).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
}

impl Encoding {
    /// The encoding named `name` (ASCII case-insensitive, surrounding
    /// spaces and tabs ignored); None for any other.
    pub fn parse(name: &[u8]) -> Option<Encoding> {
        let name = name.trim_ascii();
        if name.eq_ignore_ascii_case(b"identity") {
            Some(Encoding::Identity)
        } else if name.eq_ignore_ascii_case(b"gzip") {
            Some(Encoding::Gzip)
        } else {
            None
        }
    }

    /// The encoding's name in headers.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Identity => "identity",
            Encoding::Gzip => "gzip",
        }
    }
}

/// The encoding for responses to a peer whose accept list is `accept`
/// (`grpc-accept-encoding: identity, deflate, gzip`,
/// `accept-encoding: gzip;q=1.0, br`): Gzip if one of its comma-separated
/// entries names gzip (ASCII case-insensitive, parameters after `;`
/// ignored, except a `q` of zero, which refuses it), else Identity.
pub fn negotiate(accept: &[u8]) -> Encoding {
    let gzip = accept.split(|&b| b == b',').any(|entry| {
        let mut parts = entry.split(|&b| b == b';');
        let name = parts.next().unwrap_or_default();
        Encoding::parse(name) == Some(Encoding::Gzip) && !parts.any(refuses)
    });
    if gzip {
        Encoding::Gzip
    } else {
        Encoding::Identity
    }
}

/// Whether an accept list parameter is a weight of zero (`q=0`, `q=0.000`),
/// which means "not acceptable".
fn refuses(param: &[u8]) -> bool {
    let param = param.trim_ascii();
    let Some((key, value)) = param.split_first_chunk::<2>() else { return false };
    if !key.eq_ignore_ascii_case(b"q=") {
        return false;
    }
    match value.trim_ascii() {
        [b'0'] => true,
        [b'0', b'.', zeros @ ..] => zeros.len() <= 3 && zeros.iter().all(|&b| b == b'0'),
        _ => false,
    }
}

/// Why a message could not be decompressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inflated {
    /// The message is (or would expand to) more than `limit` bytes.
    TooLarge { limit: usize },
    /// The compressed data is not a valid stream of the encoding.
    Corrupt(String),
}

impl fmt::Display for Inflated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Inflated::TooLarge { limit } => {
                write!(f, "decompressed message is larger than the limit of {limit} bytes")
            }
            Inflated::Corrupt(why) => write!(f, "invalid compressed message: {why}"),
        }
    }
}

impl std::error::Error for Inflated {}

/// Decodes one message of `encoding`, refusing one whose decoded size is
/// over `limit` bytes.
///
/// Gzip data is one or more gzip members (RFC 1952), each with its CRC and
/// length checked; nothing may follow the last one. Inflating stops as soon
/// as `limit + 1` bytes come out, so memory and time stay O(limit) whatever
/// the data expands to; a stream cut off or corrupt after that point is
/// still `TooLarge`. Identity data is returned as is (copied).
pub fn decompress(encoding: Encoding, data: &[u8], limit: usize) -> Result<Bytes, Inflated> {
    match encoding {
        Encoding::Identity if data.len() > limit => Err(Inflated::TooLarge { limit }),
        Encoding::Identity => Ok(Bytes::copy_from_slice(data)),
        Encoding::Gzip => gunzip(data, limit).map(Bytes::from),
    }
}

/// Inflates the gzip members read from `input`, up to `limit` bytes.
fn gunzip<R: BufRead>(input: R, limit: usize) -> Result<Vec<u8>, Inflated> {
    let mut input = input;
    // Without this, an empty body would decode as an empty message: a
    // compressed message has at least one member's header.
    match input.fill_buf() {
        Ok([]) => return Err(Inflated::Corrupt("empty gzip stream".into())),
        Ok(_) => {}
        Err(e) => return Err(Inflated::Corrupt(e.to_string())),
    }
    let mut decoder = MultiGzDecoder::new(input);
    match read_bounded(&mut decoder, limit) {
        Ok(Some(out)) => Ok(out),
        Ok(None) => Err(Inflated::TooLarge { limit }),
        Err(e) => Err(Inflated::Corrupt(e.to_string())),
    }
}

/// Reads `reader` to its end if that is at most `limit` bytes (None if
/// more), never holding more than `limit + 1` bytes nor asking for more.
fn read_bounded(reader: &mut impl Read, limit: usize) -> io::Result<Option<Vec<u8>>> {
    /// The first allocation, and the least growth, of the output.
    const STEP: usize = 16 * 1024;
    let cap = limit.saturating_add(1);
    let mut out: Vec<u8> = Vec::new();
    let mut len = 0;
    while len < cap {
        if len == out.len() {
            // Double, within `cap`: O(limit) memory even for a bomb.
            let grown = out.len().saturating_mul(2).max(STEP).min(cap);
            out.reserve_exact(grown - out.len());
            out.resize(grown, 0);
        }
        match reader.read(&mut out[len..]) {
            Ok(0) => {
                out.truncate(len);
                return Ok(Some(out));
            }
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    // `limit + 1` bytes came out (or `limit` is usize::MAX and the output
    // filled the address space, which an allocation failure stops first).
    Ok(None)
}

/// Encodes one message: gzip at the fast level, or the data itself for
/// identity.
pub fn compress(encoding: Encoding, data: &[u8]) -> Bytes {
    match encoding {
        Encoding::Identity => Bytes::copy_from_slice(data),
        Encoding::Gzip => {
            let mut out = Vec::with_capacity(data.len() / 2 + 32);
            GzEncoder::new(data, Compression::fast())
                .read_to_end(&mut out)
                .expect("gzip to memory from memory cannot fail");
            Bytes::from(out)
        }
    }
}

/// A gRPC-framed message compressed with `encoding`, framed again with
/// the compressed flag (gRPC, gRPC-Web and Connect streaming share the
/// envelope). Identity leaves it as is.
pub fn compress_framed(encoding: Encoding, framed: Bytes) -> Bytes {
    if encoding == Encoding::Identity || framed.len() < 5 {
        return framed;
    }
    let packed = compress(encoding, &framed[5..]);
    let mut b = bytes::BytesMut::with_capacity(5 + packed.len());
    b.extend_from_slice(&[1]);
    b.extend_from_slice(&(packed.len() as u32).to_be_bytes());
    b.extend_from_slice(&packed);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::io::BufReader;

    fn gzip(data: &[u8]) -> Vec<u8> {
        compress(Encoding::Gzip, data).to_vec()
    }

    fn corrupt(data: &[u8]) -> String {
        match decompress(Encoding::Gzip, data, 1 << 20) {
            Err(Inflated::Corrupt(why)) => why,
            other => panic!("expected Corrupt for {data:?}, got {other:?}"),
        }
    }

    #[test]
    fn parse_and_name() {
        assert_eq!(Encoding::parse(b"gzip"), Some(Encoding::Gzip));
        assert_eq!(Encoding::parse(b"GZip"), Some(Encoding::Gzip));
        assert_eq!(Encoding::parse(b" gzip\t"), Some(Encoding::Gzip));
        assert_eq!(Encoding::parse(b"identity"), Some(Encoding::Identity));
        assert_eq!(Encoding::parse(b"IDENTITY"), Some(Encoding::Identity));
        for other in [&b""[..], b"deflate", b"br", b"x-gzip", b"gzip2", b"gzi", b"gzip;q=1", b"identity,gzip"] {
            assert_eq!(Encoding::parse(other), None, "{other:?}");
        }
        for e in [Encoding::Identity, Encoding::Gzip] {
            assert_eq!(Encoding::parse(e.name().as_bytes()), Some(e));
        }
    }

    #[test]
    fn negotiate_cases() {
        let cases: [(&[u8], Encoding); 16] = [
            (b"gzip", Encoding::Gzip),
            (b"identity, deflate, gzip", Encoding::Gzip),
            (b"identity,deflate,gzip", Encoding::Gzip),
            (b"gzip;q=1.0, br", Encoding::Gzip),
            (b"br, GZIP ; q=0.5", Encoding::Gzip),
            (b"gzip;level=9", Encoding::Gzip),
            (b"gzip;q=0.001", Encoding::Gzip),
            (b"gzip;q=0", Encoding::Identity),
            (b"gzip; Q=0.000", Encoding::Identity),
            (b"gzip;q=0, gzip", Encoding::Gzip),
            (b"", Encoding::Identity),
            (b"identity", Encoding::Identity),
            (b"identity, deflate, br", Encoding::Identity),
            (b"x-gzip, gzipped, *", Encoding::Identity),
            (b",,, ,", Encoding::Identity),
            (b"deflate;gzip", Encoding::Identity),
        ];
        for (accept, expected) in cases {
            assert_eq!(negotiate(accept), expected, "{:?}", String::from_utf8_lossy(accept));
        }
    }

    #[test]
    fn round_trip() {
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog ".repeat(1000);
        let noise: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for data in [&b""[..], b"x", &text, &noise] {
            for e in [Encoding::Identity, Encoding::Gzip] {
                let packed = compress(e, data);
                assert_eq!(decompress(e, &packed, data.len()).unwrap(), data, "{e:?}, {} bytes", data.len());
            }
        }
        assert!(gzip(&text).len() < text.len() / 10, "gzip compresses");
        assert_eq!(&gzip(b"")[..2], [0x1f, 0x8b], "a gzip member even for no data");
    }

    #[test]
    fn identity_is_the_input_within_the_limit() {
        assert_eq!(decompress(Encoding::Identity, b"abc", 3).unwrap(), &b"abc"[..]);
        assert_eq!(decompress(Encoding::Identity, b"abc", 2), Err(Inflated::TooLarge { limit: 2 }));
        assert_eq!(decompress(Encoding::Identity, b"", 0).unwrap(), &b""[..]);
        assert_eq!(compress(Encoding::Identity, b"abc"), &b"abc"[..]);
    }

    #[test]
    fn limit_exactly_hit_vs_exceeded() {
        for len in [0, 1, 1000, 16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1, 100_000] {
            let data = vec![7u8; len];
            let packed = gzip(&data);
            assert_eq!(decompress(Encoding::Gzip, &packed, len).unwrap(), data, "{len} bytes, limit {len}");
            assert_eq!(decompress(Encoding::Gzip, &packed, usize::MAX).unwrap(), data);
            if len > 0 {
                assert_eq!(decompress(Encoding::Gzip, &packed, len - 1), Err(Inflated::TooLarge { limit: len - 1 }));
            }
        }
    }

    #[test]
    fn concatenated_members_are_one_message() {
        let packed = [gzip(b"hello, "), gzip(b""), gzip(b"world")].concat();
        assert_eq!(decompress(Encoding::Gzip, &packed, 12).unwrap(), &b"hello, world"[..]);
        assert_eq!(decompress(Encoding::Gzip, &packed, 11), Err(Inflated::TooLarge { limit: 11 }));
    }

    #[test]
    fn corrupt_streams_are_refused() {
        let good = gzip(b"hello, world, hello, world");
        corrupt(b"");
        corrupt(b"hello");
        corrupt(&good[..5]);
        corrupt(&good[..good.len() - 1]);
        corrupt(&good[..good.len() - 8]);
        // A wrong CRC, a wrong length, a bad header magic.
        for at in [good.len() - 8, good.len() - 1, 0] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            corrupt(&bad);
        }
        // Trailing bytes that are not a gzip member.
        corrupt(&[&good[..], b"xx"].concat());
        // An invalid deflate block type (0b11) right after the header.
        let mut bad = good[..10].to_vec();
        bad.extend_from_slice(&[0x07, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        corrupt(&bad);
        let message = decompress(Encoding::Gzip, b"", 10).unwrap_err().to_string();
        assert!(message.starts_with("invalid compressed message: "), "{message}");
    }

    /// Counts the bytes a reader hands out.
    struct Counting<'a, R> {
        inner: R,
        read: &'a Cell<usize>,
    }

    impl<R: Read> Read for Counting<'_, R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read.set(self.read.get() + n);
            Ok(n)
        }
    }

    #[test]
    fn a_gigabyte_bomb_is_refused_after_reading_little() {
        // One member of 64 MiB of zeros (about 64 KiB), repeated 16 times:
        // 1 GiB from about 1 MiB.
        const MEMBER: usize = 64 << 20;
        let mut member = Vec::new();
        let mut encoder = flate2::write::GzEncoder::new(&mut member, Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..MEMBER >> 20 {
            io::Write::write_all(&mut encoder, &zeros).unwrap();
        }
        encoder.finish().unwrap();
        assert!(member.len() < 128 * 1024, "member of {} bytes", member.len());
        let bomb = member.repeat(16);

        let limit = 4 << 20;
        assert_eq!(decompress(Encoding::Gzip, &bomb, limit), Err(Inflated::TooLarge { limit }));

        // Inflating stopped at the limit: only the compressed bytes that
        // make up about 4 MiB (4 KiB) were read, plus one 1 KiB buffer.
        let read = Cell::new(0);
        let input = BufReader::with_capacity(1024, Counting { inner: &bomb[..], read: &read });
        assert_eq!(gunzip(input, limit), Err(Inflated::TooLarge { limit }));
        assert!(read.get() < 16 * 1024, "read {} of {} compressed bytes", read.get(), bomb.len());
    }

    #[test]
    fn read_bounded_allocates_within_the_limit() {
        for (len, limit) in [(0, 0), (5, 0), (5, 4), (5, 5), (100_000, 99_999), (100_000, 100_000), (10, 1 << 30)] {
            let data = vec![1u8; len];
            let got = read_bounded(&mut &data[..], limit).unwrap();
            if len <= limit {
                let got = got.expect("within the limit");
                assert_eq!(got, data);
                assert!(got.capacity() <= (limit + 1).max(16 * 1024), "({len}, {limit}): {}", got.capacity());
            } else {
                assert_eq!(got, None, "({len}, {limit})");
            }
        }
    }

    #[test]
    fn errors_display() {
        assert_eq!(
            Inflated::TooLarge { limit: 10 }.to_string(),
            "decompressed message is larger than the limit of 10 bytes"
        );
        assert_eq!(Inflated::Corrupt("bad".into()).to_string(), "invalid compressed message: bad");
    }
}
