//! The checks of the `gzip` fuzz target (input layout and invariants:
//! `fuzz_targets/gzip.rs`), shared with `tests/fuzz_regressions.rs`,
//! which replays the seed corpus and every past crash through them.

use wirestub_engine::protocol::compression::{compress, decompress, negotiate, Encoding, Inflated};

/// The decompression limit.
const LIMIT: usize = 64 * 1024;

/// Runs the checks on one input.
pub fn check(data: &[u8]) {
    match decompress(Encoding::Gzip, data, LIMIT) {
        Ok(out) => {
            assert!(out.len() <= LIMIT, "{} bytes out, over the limit", out.len());
            assert_eq!(decompress(Encoding::Gzip, data, out.len()).as_ref(), Ok(&out));
            if let Some(less) = out.len().checked_sub(1) {
                assert_eq!(decompress(Encoding::Gzip, data, less), Err(Inflated::TooLarge { limit: less }));
            }
        }
        Err(Inflated::TooLarge { limit }) => assert_eq!(limit, LIMIT),
        Err(Inflated::Corrupt(why)) => assert!(!why.is_empty()),
    }

    match decompress(Encoding::Identity, data, LIMIT) {
        Ok(out) => assert_eq!(&out[..], data),
        Err(e) => assert!(data.len() > LIMIT && e == Inflated::TooLarge { limit: LIMIT }, "{e}"),
    }

    let packed = compress(Encoding::Gzip, data);
    assert_eq!(decompress(Encoding::Gzip, &packed, data.len()).as_deref(), Ok(data));

    let parsed = Encoding::parse(data);
    if let Some(e) = parsed {
        assert!(Encoding::parse(e.name().as_bytes()) == Some(e));
    }
    let negotiated = negotiate(data);
    if parsed == Some(Encoding::Gzip) {
        assert_eq!(negotiated, Encoding::Gzip, "{data:?}");
    }
}
