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

#[path = "../checks/plan_load.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
