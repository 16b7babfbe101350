//! Fuzzes the plan loader, `Plan::from_bytes`.
//!
//! Loading must never panic, whatever the bytes. A plan that loads must write
//! back (`Plan::to_bytes`) to bytes that load again into an equal plan and that
//! are written back identically, so that the writer and the validating reader
//! agree on every plan the reader accepts.
//!
//! Almost every mutation of a plan breaks its checksum, which the loader checks
//! first, so each input is also tried with its checksum recomputed: that lets
//! the fuzzer reach the section and method readers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wirestub_plan::Plan;

/// The header length and where in it the checksum sits (see plan/src/lib.rs).
const HEADER_LEN: usize = 32;
const CHECKSUM_AT: usize = 24;

fuzz_target!(|data: &[u8]| {
    round_trip(data);
    if data.len() >= HEADER_LEN {
        let mut fixed = data.to_vec();
        let checksum = fnv1a(&fixed[HEADER_LEN..]);
        fixed[CHECKSUM_AT..HEADER_LEN].copy_from_slice(&checksum.to_le_bytes());
        round_trip(&fixed);
    }
});

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
