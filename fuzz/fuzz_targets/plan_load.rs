//! Fuzzes the plan loader, `Plan::from_bytes`.
//!
//! Loading must never panic, whatever the bytes. A plan that loads must write
//! back (`Plan::to_bytes`) to bytes that load again into an equal plan and that
//! are written back identically, so that the writer and the validating reader
//! agree on every plan the reader accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wirestub_plan::Plan;

fuzz_target!(|data: &[u8]| {
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
});
