//! The checks of the `web_text` fuzz target (input layout and invariants:
//! `fuzz_targets/web_text.rs`), shared with `tests/fuzz_regressions.rs`,
//! which replays the seed corpus and every past crash through them.

use bytes::BytesMut;
use wirestub_engine::protocol::web_text::{encode, TextDecoder, TextError};

/// The standard base64 alphabet, for the model.
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Runs the checks on one input.
pub fn check(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else { return };
    let split = usize::from(selector) % (body.len() + 1);
    let (first, second) = body.split_at(split);

    let whole = decode(&[body]);
    let halves = decode(&[first, second]);
    assert_eq!(halves, whole, "split at {split} of {body:?}");
    match (&whole, model(body)) {
        ((Ok(()), out), Some(expected)) => assert_eq!(out, &expected, "{body:?}"),
        ((Err(e), _), None) => {
            assert!(e.to_string().contains(" at offset "), "{e}");
        }
        (got, expected) => panic!("{body:?}: decoded {got:?}, model {expected:?}"),
    }

    let mut text = BytesMut::new();
    encode(first, &mut text);
    assert_eq!(text.len(), first.len().div_ceil(3) * 4);
    encode(second, &mut text);
    assert!(text.iter().all(|b| ALPHABET.contains(b) || *b == b'='), "{text:?}");
    assert_eq!(decode(&[&text]), (Ok(()), body.to_vec()), "encoded {text:?}");
}

/// Pushes `chunks` to one decoder, then finishes: the outcome and the
/// output so far.
fn decode(chunks: &[&[u8]]) -> (Result<(), TextError>, Vec<u8>) {
    let mut decoder = TextDecoder::new();
    let mut out = BytesMut::new();
    let result = chunks.iter().try_for_each(|chunk| decoder.push(chunk, &mut out)).and_then(|()| decoder.finish());
    (result, out.to_vec())
}

/// What the body decodes to, straight from the format's rules: None if it
/// is not valid.
fn model(body: &[u8]) -> Option<Vec<u8>> {
    let chars: Vec<u8> = body.iter().copied().filter(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0c)).collect();
    if !chars.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::new();
    for quantum in chars.chunks(4) {
        let (data, padding) = match quantum {
            [a, b, b'=', b'='] => (vec![*a, *b], 2),
            [a, b, c, b'='] => (vec![*a, *b, *c], 1),
            _ => (quantum.to_vec(), 0),
        };
        let mut bits = 0u32;
        for c in data {
            bits = bits << 6 | ALPHABET.iter().position(|&a| a == c)? as u32;
        }
        bits <<= 6 * padding;
        out.extend_from_slice(&bits.to_be_bytes()[1..4 - padding]);
    }
    Some(out)
}
