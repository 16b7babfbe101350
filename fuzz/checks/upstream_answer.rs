//! The checks of the `upstream_answer` fuzz target (input layout and
//! invariants: `fuzz_targets/upstream_answer.rs`), shared with
//! `tests/fuzz_regressions.rs`, which replays the seed corpus and every
//! past crash through them.

use wirestub_engine::protocol::compression::Encoding;
use wirestub_engine::upstream::answer::{status, Messages};

pub fn check(data: &[u8]) {
    if let Ok(v) = http::HeaderValue::from_bytes(data) {
        let mut block = http::HeaderMap::new();
        block.insert("grpc-status", v);
        let s = status(&block);
        let text = std::str::from_utf8(data).ok().map(str::trim);
        if let Some(n) = text.and_then(|t| t.parse::<u8>().ok()) {
            assert_eq!(s, n);
        } else {
            assert_eq!(s, 2);
        }
    }
    recorded(data);
    if data.len() < 3 {
        return;
    }
    let max = u16::from_le_bytes([data[0], data[1]]) as usize;
    let gzip = data[2] & 0x80 != 0;
    let mut seed = (data[2] & 0x7f) as u32 + 1;
    let body = &data[3..];
    let encoding = if gzip { Encoding::Gzip } else { Encoding::Identity };
    let mut messages = Messages::new(max, encoding);
    let mut at = 0;
    // What the messages returned so far took of the body.
    let mut consumed = 0;
    let mut failed = false;
    while at < body.len() && !failed {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let size = 1 + (seed >> 16) as usize % 97;
        let chunk = &body[at..(at + size).min(body.len())];
        at += chunk.len();
        messages.push(chunk);
        assert!(messages.held() <= 5 + max + chunk.len(), "held {} with limit {max}", messages.held());
        loop {
            match messages.cut() {
                Ok(Some(m)) => {
                    assert!(m.len() >= 5 && m[0] == 0);
                    let len = u32::from_be_bytes([m[1], m[2], m[3], m[4]]) as usize;
                    assert_eq!(len, m.len() - 5);
                    assert!(len <= max);
                    let declared = u32::from_be_bytes([
                        body[consumed + 1],
                        body[consumed + 2],
                        body[consumed + 3],
                        body[consumed + 4],
                    ]) as usize;
                    assert!(body[consumed] <= 1, "a reserved flag was accepted");
                    if body[consumed] == 0 {
                        assert_eq!(&m[5..], &body[consumed + 5..consumed + 5 + declared]);
                    }
                    consumed += 5 + declared;
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(!e.is_empty());
                    failed = true;
                    break;
                }
            }
        }
    }
    if !failed {
        assert_eq!(messages.finish().is_ok(), consumed == body.len());
    }
}

/// What a recording made without protos does with an answer's bytes: its
/// wire dump stays within its length and never panics; compared with a
/// recording of the same bytes it is identical, and with any other its
/// similarity lies in [0, 1].
fn recorded(data: &[u8]) {
    use wirestub_engine::call::raw;
    let shown = wirestub_engine::codec::wire_dump::dump(data, 160);
    assert!(shown.len() <= 160 + '…'.len_utf8(), "{} chars", shown.len());
    let (a, b) = data.split_at(data.len() / 2);
    let whole = raw::recording(0, &[data.to_vec()]);
    assert_eq!(raw::Call::new(&[a, b]).similarity(&whole), 1.0);
    let half = raw::recording(0, &[a.to_vec()]);
    let s = raw::Call::new(&[b]).similarity(&half);
    assert!((0.0..=1.0).contains(&s), "{s}");
}
