//! Fuzzes the reading of a call stored in the shared journal's Redis
//! stream (`wirestub_engine::observe::shared_journal::SharedCall`), which a
//! replica reads back from a store others write to.
//!
//! Input layout: the first byte is the call's number, the rest the stored
//! text (JSON, when it is an object).
//!
//! Invariants: nothing panics. A call's view has its number as `seq` and no
//! stored-only mark (`@metadata`, `@unmatched`); its metadata object has a
//! key for every stored pair's key; a filter made of one of its own
//! metadata pairs, of its method, of its status or of its first request
//! object selects it, and one on another status does not.
#![no_main]

#[path = "../checks/shared_journal_call.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
