//! Fuzzes the zero-copy field scanner, `wirestub_engine::codec::wire`.
//!
//! Input layout: one byte giving the number of paths (0 to 20, so that lists
//! longer than the 16 kept inline are covered too), then for each path one
//! shape byte (bits 0-1: depth - 1, bits 2-4: expected wire type, invalid ones
//! included) followed by one byte per field number; the rest is the message.
//!
//! Whatever the bytes, `extract` must not panic and an error must point inside
//! the message. When it succeeds, every value found must normalise under every
//! scalar kind to that kind's class and compare equal to itself, and each path
//! extracted alone must give the same value, since the walk for one path is
//! part of the walk for all of them.
#![no_main]

#[path = "../checks/wire_scan.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
