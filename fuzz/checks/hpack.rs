//! The checks of the `hpack` fuzz target (input layout and invariants:
//! `fuzz_targets/hpack.rs`), shared with `tests/fuzz_regressions.rs`, which
//! replays the seed corpus and every past crash through them.

use wirestub_engine::codec::hpack::{encode_literal, encode_status, DecodeError, Decoder};

const LIST_LIMITS: [usize; 8] = [0, 64, 200, 1 << 10, 4 << 10, 16 << 10, 64 << 10, usize::MAX];
const TABLE_SIZES: [usize; 4] = [0, 64, 256, 4096];

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// Runs the checks on one input.
pub fn check(data: &[u8]) {
    let Some((&limits, mut rest)) = data.split_first() else { return };
    let max_list_size = LIST_LIMITS[usize::from(limits & 7)];
    let table_size = TABLE_SIZES[usize::from(limits >> 3 & 3)];
    let mut limited = Decoder::new(table_size);
    let mut full = Decoder::new(table_size);
    let mut failed = false;
    while !rest.is_empty() {
        let block;
        (block, rest) = match rest {
            [a, b, tail @ ..] => tail.split_at(usize::from(u16::from_le_bytes([*a, *b])).min(tail.len())),
            _ => (rest, &[][..]),
        };
        if !failed {
            failed = !same_block(&mut limited, &mut full, block, max_list_size, table_size);
        }
        encoder(block);
    }
}

fn decode(d: &mut Decoder, block: &[u8], max_list_size: usize) -> Result<(Fields, bool), DecodeError> {
    let mut fields = Vec::new();
    let oversized = d.decode(block, max_list_size, &mut |n, v| fields.push((n.to_vec(), v.to_vec())))?;
    Ok((fields, oversized))
}

/// One block through both decoders; false when it is rejected.
fn same_block(limited: &mut Decoder, full: &mut Decoder, block: &[u8], max_list_size: usize, table: usize) -> bool {
    let got = decode(limited, block, max_list_size);
    let all = decode(full, block, usize::MAX);
    match (all, got) {
        (Err(a), Err(b)) => {
            assert_eq!(a, b, "the list limit changed the error");
            assert!(!a.0.is_empty() && !a.to_string().is_empty());
            return false;
        }
        (Ok((all, false)), Ok((got, oversized))) => {
            let mut size = 0usize;
            let within = all
                .iter()
                .take_while(|(n, v)| {
                    size = size.saturating_add(n.len() + v.len() + 32);
                    size <= max_list_size
                })
                .count();
            assert_eq!(got, all[..within], "the fields handed over under limit {max_list_size}");
            assert_eq!(oversized, within < all.len(), "the oversized verdict under limit {max_list_size}");
        }
        (all, got) => panic!("without limit: {all:?}; with limit {max_list_size}: {got:?}"),
    }
    assert_eq!(limited.table_size(), full.table_size(), "the list limit changed the dynamic table");
    assert!(full.table_size() <= table, "dynamic table of {} octets over {table}", full.table_size());
    true
}

/// `encode_literal` and `encode_status` on values taken from the block.
fn encoder(block: &[u8]) {
    let (name, value) = block.split_at(block.len() / 2);
    let mut buf = Vec::new();
    encode_literal(&mut buf, name, value);
    let mut d = Decoder::new(4096);
    let got = decode(&mut d, &buf, usize::MAX);
    assert_eq!(got, Ok((vec![(name.to_vec(), value.to_vec())], false)), "encode_literal({name:?}, {value:?})");
    let status = u16::from_le_bytes([block.first().copied().unwrap_or(0), block.last().copied().unwrap_or(0)]);
    buf.clear();
    encode_status(&mut buf, status);
    let got = decode(&mut d, &buf, usize::MAX);
    assert_eq!(got, Ok((vec![(b":status".to_vec(), status.to_string().into_bytes())], false)), "status {status}");
    assert_eq!(d.table_size(), 0, "the encoder's fields touched the dynamic table");
}
