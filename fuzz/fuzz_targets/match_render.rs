//! Fuzzes the engine's request path end to end, short of HTTP/2: rule
//! selection (`matcher::Request::read` and `select`) and template rendering
//! (`template::render`) on arbitrary request messages and metadata, for
//! every method of real plans: the bundled example and every
//! `tests/cases/<case>/` with its own protos and rules, compiled once at
//! start-up (operators, regular expressions, the rule index, Aho-Corasick
//! literals, map entries, oneofs, client-stream aggregates, templates).
//!
//! Input layout: one byte picks the method (modulo the number of methods),
//! one byte gives the length of the metadata block, one byte the number of
//! messages of a client stream (modulo 5); then the metadata block, whose
//! i-th line is the value of the i-th metadata key the method's rules read;
//! then the request. For unary and server-streaming methods the request is
//! one message; for client streams each message but the last is a 2-byte
//! little-endian length and its bytes, the last one is the rest, and the
//! messages are kept as the server keeps them (the first ones rules can name,
//! and the last), or matched one by one for duplex methods.
//!
//! Invariants: nothing panics; a malformed request is an error, never a
//! crash; a chosen response is one of the method's, and every message
//! rendered from a template is exactly one uncompressed gRPC frame.
#![no_main]

#[path = "../checks/match_render.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
