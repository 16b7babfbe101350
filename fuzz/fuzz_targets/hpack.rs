//! Fuzzes the HPACK decoder and encoder, `wirestub_engine::codec::hpack`.
//!
//! Input layout: one byte of limits (bits 0-2: the header list size limit,
//! one of 0, 64, 200, 1 KiB, 4 KiB, 16 KiB, 64 KiB or none; bits 3-4: the
//! advertised table size, one of 0, 64, 256 or 4096), then header blocks,
//! each a 16-bit little-endian length (cut to what remains) and that many
//! bytes, decoded in order by the same decoders, as a connection's blocks.
//!
//! Invariants: decoding never panics. A decoder with the limit and one
//! without agree on every block: both fail with the same error (and the
//! connection ends there), or both succeed; the limited one then hands over
//! exactly the longest prefix of the fields whose header list size (names,
//! values and 32 per field) is within the limit, says "oversized" exactly
//! when it left fields out, and its dynamic table stays the size of the
//! other's, never above the advertised size. Every block split in two and
//! written as a name and a value by `encode_literal`, and every `:status`
//! written by `encode_status`, decode back to that one field without touching
//! the dynamic table.
#![no_main]

#[path = "../checks/hpack.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
