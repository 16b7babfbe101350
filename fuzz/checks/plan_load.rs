//! The checks of the `plan_load` fuzz target (input layout and invariants:
//! `fuzz_targets/plan_load.rs`), shared with `tests/fuzz_regressions.rs`,
//! which replays the seed corpus and every past crash through them.

use wirestub_plan::Plan;

/// The header length and where in it the checksum sits (see plan/src/lib.rs).
const HEADER_LEN: usize = 32;
const CHECKSUM_AT: usize = 24;

/// Runs the checks on one input.
pub fn check(data: &[u8]) {
    round_trip(data);
    if data.len() >= HEADER_LEN {
        let mut fixed = data.to_vec();
        let checksum = fnv1a(&fixed[HEADER_LEN..]);
        fixed[CHECKSUM_AT..HEADER_LEN].copy_from_slice(&checksum.to_le_bytes());
        round_trip(&fixed);
    }
}

fn round_trip(data: &[u8]) {
    let Ok(plan) = Plan::from_bytes(data) else { return };
    let bytes = plan.to_bytes();
    let again = match Plan::from_bytes(&bytes) {
        Ok(again) => again,
        Err(e) => panic!("a plan written by to_bytes does not load: {e}"),
    };
    // `==` fails on NaN values, which plans may hold; their rendering does
    // not, and the byte comparison below pins their exact bits.
    assert!(plan == again || format!("{plan:?}") == format!("{again:?}"), "the plan changed in a round trip");
    assert!(again.to_bytes() == bytes, "writing the reloaded plan gives other bytes");
}

/// FNV-1a, 64-bit, as the plan checksum.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
