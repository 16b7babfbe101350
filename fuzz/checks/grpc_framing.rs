//! The checks of the `grpc_framing` fuzz target (input layout and invariants:
//! `fuzz_targets/grpc_framing.rs`), shared with `tests/fuzz_regressions.rs`,
//! which replays the seed corpus and every past crash through them.

use std::cmp::Ordering;
use wirestub_engine::protocol::grpc::{check_unary, finish_unary, parse_timeout, Code, Framing, Status};

/// Runs the checks on one input.
pub fn check(data: &[u8]) {
    timeout(data);
    let [a, b, c, body @ ..] = data else { return };
    let max_len = if c & 0x80 != 0 { usize::MAX } else { usize::from(u16::from_le_bytes([*a, *b])) };
    let seed = c & 0x7f;
    framing(body, max_len, seed);
}

/// `parse_timeout` against a model of the `grpc-timeout` grammar: 1 to 8
/// ASCII digits and a unit, the duration exact to the nanosecond.
fn timeout(v: &[u8]) {
    let expected = (|| {
        let (&unit, digits) = v.split_last()?;
        if !(1..=8).contains(&digits.len()) || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = digits.iter().fold(0u128, |n, d| n * 10 + u128::from(d - b'0'));
        let nanos: u128 = match unit {
            b'H' => 3_600_000_000_000,
            b'M' => 60_000_000_000,
            b'S' => 1_000_000_000,
            b'm' => 1_000_000,
            b'u' => 1_000,
            b'n' => 1,
            _ => return None,
        };
        Some(n * nanos)
    })();
    assert_eq!(parse_timeout(v).map(|d| d.as_nanos()), expected, "grpc-timeout {:?}", String::from_utf8_lossy(v));
}

/// The verdict on the first `total` bytes of `body`, from the gRPC
/// length-prefixed message format: a flag byte (0 or 1), a big-endian
/// 32-bit length, then exactly that many bytes.
fn model(body: &[u8], total: usize, max_len: usize) -> Result<Framing, Code> {
    if total < 5 {
        return Ok(Framing::Incomplete);
    }
    if body[0] > 1 {
        return Err(Code::Internal);
    }
    let declared = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if declared > max_len {
        return Err(Code::ResourceExhausted);
    }
    match total.cmp(&(5 + declared)) {
        Ordering::Less => Ok(Framing::Incomplete),
        Ordering::Equal => Ok(Framing::One),
        Ordering::Greater => Err(Code::Unimplemented),
    }
}

/// Every status must be sendable: a non-empty message that is a valid
/// `grpc-message` header value once percent-encoded.
fn sendable(s: &Status) -> Code {
    assert!(!s.message.is_empty(), "{:?} without a message", s.code);
    let encoded = wirestub_plan::percent_encode_message(&s.message);
    assert!(http::HeaderValue::from_str(&encoded).is_ok(), "grpc-message {encoded:?} is not a header value");
    s.code
}

/// `check_unary` and `finish_unary` on a request body arriving in chunks.
fn framing(body: &[u8], max_len: usize, seed: u8) {
    let verdict = |total: usize| {
        let got = check_unary(&body[..total], total, max_len);
        let got = got.map_err(|s| sendable(&s));
        assert_eq!(got, model(body, total, max_len), "check_unary after {total} of {} bytes", body.len());
        // The verdict depends on the 5-byte prefix and the count alone, as the
        // server passes only the first chunk when it holds the prefix.
        if total >= 5 {
            let short = check_unary(&body[..5], total, max_len).map_err(|s| s.code);
            assert_eq!(short, got, "check_unary with only the 5-byte prefix, total {total}");
        }
        got
    };

    // Bytes arriving in chunks: once the verdict is an error it stays that
    // error, and once one message is complete any further byte is a second
    // message. So the server may stop at the first non-Incomplete verdict.
    let mut rng = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    let mut total = 0;
    let mut settled: Option<Result<Framing, Code>> = None;
    while total < body.len() {
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        let chunk = if rng % 8 == 0 { body.len() } else { 1 + (rng as usize >> 3) % 16 };
        total = (total + chunk).min(body.len());
        let v = verdict(total);
        match settled {
            None if v != Ok(Framing::Incomplete) => settled = Some(v),
            None => {}
            Some(Ok(Framing::One)) => assert_eq!(v, Err(Code::Unimplemented), "a byte after the message at {total}"),
            Some(Err(code)) => assert_eq!(v, Err(code), "the error changed at {total}"),
            Some(Ok(Framing::Incomplete)) => unreachable!(),
        }
    }

    // The final verdict once the client half-closes.
    let last = verdict(body.len());
    let finish = finish_unary(body, body.len(), max_len).map_err(|s| sendable(&s));
    let expected = match last {
        Ok(Framing::One) => Ok(()),
        Ok(Framing::Incomplete) if body.is_empty() => Err(Code::Unimplemented),
        Ok(Framing::Incomplete) => Err(Code::Internal),
        Err(code) => Err(code),
    };
    assert_eq!(finish, expected, "finish_unary on {} bytes", body.len());
}
