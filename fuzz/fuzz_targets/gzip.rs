//! Fuzzes bounded message decompression and encoding negotiation,
//! `wirestub_engine::protocol::compression`.
//!
//! Input layout: the whole input is the compressed message (and is also
//! tried as an encoding name and as an accept list).
//!
//! Invariants: nothing panics. Gzip decompression with a 64 KiB limit
//! returns at most 64 KiB, or refuses the message as too large or corrupt;
//! a message it returns is returned again with its own size as the limit
//! and refused as too large with one byte less. Identity returns the input
//! itself within the limit. The input gzip-compressed decompresses back to
//! it. `negotiate` picks gzip for an accept list that is just a gzip name.
#![no_main]

#[path = "../checks/gzip.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
