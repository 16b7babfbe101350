//! Fuzzes the reading of an upstream's answer, whose bytes the engine does
//! not trust (`wirestub_engine::upstream::answer`): response messages cut
//! from its body as DATA arrives, and the status of its trailers.
//!
//! Input layout: two bytes give the message limit (`u16`, little-endian),
//! one byte the chunking (bit 7: the encoding is gzip, else identity;
//! bits 0-6: seed of the chunk sizes), and the rest is the response body.
//! The whole input is also tried as a `grpc-status` value.
//!
//! Invariants: nothing panics. Every message returned is framed with flag 0
//! and the length of what follows, within the limit; an uncompressed one
//! is exactly the bytes the body held. Bytes held never pass one message
//! (5 bytes of prefix and the limit) and one chunk. Cutting stops at the
//! first error, and a body that ended between messages finishes cleanly.
//! A status is a number below 256 (UNKNOWN when it is not one). The whole
//! input, as a recording made without protos keeps it, has a wire dump
//! within its length and a similarity in [0, 1] to any other bytes.
#![no_main]

#[path = "../checks/upstream_answer.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
