//! Fuzzes the base64 layer of gRPC-Web text mode,
//! `wirestub_engine::protocol::web_text`.
//!
//! Input layout: one byte choosing where the body is split in two (taken
//! modulo the body's length + 1), then the body.
//!
//! Invariants: decoding never panics. The body pushed in two chunks gives
//! exactly what it gives in one push: the same bytes when it decodes, the
//! same error (offset included) and the same partial output when it does
//! not. The body decodes exactly when a model of the format accepts it
//! (ASCII whitespace dropped, then quanta of four alphabet characters, the
//! last one or two of which may be `=`, padded quanta allowed anywhere), to
//! the model's bytes. The two halves encoded as two flushes (`encode`) and
//! concatenated decode back to the body, at every length.
#![no_main]

#[path = "../checks/web_text.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
