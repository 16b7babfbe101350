//! Fuzzes the engine's gRPC protocol checks that do not depend on HTTP/2
//! (`wirestub_engine::protocol::grpc`): `grpc-timeout` parsing and the framing checks
//! on a unary request body (`check_unary`, `finish_unary`).
//!
//! Input layout: the whole input is also tried as a `grpc-timeout` value.
//! Then two bytes give the size limit (`u16`, little-endian), one byte the
//! chunking (bit 7: no limit, `usize::MAX`; bits 0-6: seed of the chunk
//! sizes), and the rest is the request body.
//!
//! Invariants: `parse_timeout` accepts exactly 1 to 8 ASCII digits and a unit
//! (H, M, S, m, u, n), with the exact duration. `check_unary` agrees with the
//! message format (flag 0 or 1, big-endian length, then exactly that many
//! bytes): a verdict of `One` means the body is 5 + the declared length bytes,
//! under the limit; it depends only on the 5-byte prefix and the byte count;
//! as bytes arrive in chunks an error never changes and a complete message is
//! followed only by the "second message" error. `finish_unary` accepts exactly
//! one complete message and tells an empty body from a truncated one. Every
//! status has a message that is a valid `grpc-message` once percent-encoded.
#![no_main]

#[path = "../checks/grpc_framing.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
