//! Fuzzes the request message reader of every protocol but the native
//! HTTP/2 stack's, `wirestub_engine::protocol::reader::Reader` (the
//! `Inbound` side of a call): the 5-byte envelope of gRPC, gRPC-Web and
//! Connect streaming, gRPC-Web text's base64 under it, a Connect unary body
//! as one message, gzip inflation within the message limit and the budget
//! of held request bytes, over a body that arrives in pieces.
//!
//! Input layout: one byte of setup (bits 0-2, modulo 5: gRPC, gRPC-Web,
//! gRPC-Web text, Connect unary, Connect streaming; bit 3: gzip, else
//! identity; bits 4-5: the message limit, 0 bytes, 16, 1024 or 64 KiB;
//! bit 6: a budget of 64 held bytes, else 1 MiB; bit 7: the body ends with
//! an error instead of its end), one byte of chunking (bits 0-6: pieces of
//! that many bytes, 0 for the whole body at once; bit 7: an empty piece
//! after each), then the body. The reader's `next()` runs on a
//! current-thread runtime until it returns `Ok(None)` or an error.
//!
//! Invariants: nothing panics. Every message is within the limit, and the
//! messages are those of a plain reference reading of the body: the
//! envelope cut one message at a time (flag 0, or 1 with gzip, inflated
//! within the limit; a length over the limit, a flag over 1, a compressed
//! message without an encoding end the call with their own errors; a body
//! ending inside a message with INTERNAL), of the base64-decoded body in
//! text mode (a body that does not decode ends with an error, after a
//! prefix of the messages), the whole body for Connect unary (one message
//! equal to it with identity, within the limit); so with identity, the
//! messages framed again are the start of the body. After `Ok(None)` the
//! reader says `Ok(None)` again; a body that fails ends the call with its
//! error. The body is never read after its end. The process-wide count of
//! held request bytes never goes past the budget, equals at every read what
//! the reader was given and has not returned, and is back to where it was
//! once the reader is dropped; RESOURCE_EXHAUSTED for the budget comes only
//! from a piece that would go past it, after a prefix of the messages.
#![no_main]

#[path = "../checks/message_reader.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
