//! Fuzzes the engine's HTTP/1.1 transport on the gRPC port,
//! `wirestub_engine::transport::http1::serve` (hyper's server connection,
//! the engine's request handling, CORS, gRPC-Web and Connect calls driven
//! to their end, the idle and write timeouts, draining) over an in-memory
//! connection, on the bundled example's plan, compiled once at start-up.
//! Time is virtual (a paused current-thread runtime): delays, streams'
//! pacing and timeouts pass at once.
//!
//! Input layout: one byte of flags (bits 0-2: the server's configuration,
//! each bit on top of the defaults: bit 0, small limits (64-byte request
//! messages, 4 KiB of held request bytes); bit 1, a list of CORS origins;
//! bit 2, gzip responses for clients that accept them; bit 3: the client
//! shuts its sending side down once it has sent everything, else it keeps
//! it open (hyper, without half-close, drops a connection whose client
//! shuts down before the answer); bit 4: the server is told to stop (drain)
//! 1 s after the client has sent everything; bit 5: the client reads
//! nothing for its first 60 s, past the server's write timeout),
//! one byte of write size (0: everything at once; n: pieces of n bytes,
//! 1 ms apart), then the bytes the client sends. The client reads what the
//! server sends until its end or 1 MiB, then leaves; the connection gets
//! 600 s.
//!
//! Invariants: nothing panics. The server's bytes are HTTP/1.1 responses,
//! one after the other: each head parses and starts with `HTTP/1.1 ` (or
//! `HTTP/1.0 `, hyper's answer to an HTTP/1.0 request) and a status in
//! 100..=599 (no 101); informational ones carry no body, 204 and 304 none
//! either; others one Content-Length or chunked framing (never both, chunks
//! well-formed), or neither: no body when another response follows (the
//! client sent a HEAD request), else a body to the connection's end;
//! nothing follows a response that says `connection: close`; the last
//! response may be cut off. A whole gRPC-Web body (binary or base64 text)
//! is messages then exactly one trailer frame holding `grpc-status`, or
//! empty with `grpc-status` in the headers; a whole Connect streaming body
//! is messages then one end-of-stream JSON object; both come with status
//! 200, and flag a message compressed only when the response names gzip.
//! No request, no output. The connection ends within 60 s of the client
//! leaving, and the process-wide count of held request bytes is back where
//! it was.
#![no_main]

#[path = "../checks/http1_conn.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
