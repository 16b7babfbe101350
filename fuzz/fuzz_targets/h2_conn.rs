//! Fuzzes the engine's native HTTP/2 server connection,
//! `wirestub_engine::transport::http2::conn`, through its test entry point
//! `drive_calls`:
//! the connection preface, frame parsing and every frame handler, header
//! blocks split over CONTINUATION frames, HPACK, request header checks, flow
//! control both ways, stream limits and the abuse counters, up to the calls
//! and the call tasks (streamed answers, duplex calls; timers do not
//! advance) on the bundled example's plan, compiled once at start-up.
//!
//! Input layout: one byte of flags (bits 0-1: unless both are set, the
//! client connection preface and an empty SETTINGS frame come before the
//! rest, so mutations reach the frame handlers; bits 2-3: the server's
//! limits, `Config::default()` or, as concurrent streams, header list size,
//! request message size and stream window: 1, 128, 16, 65535; 4, 1 KiB,
//! 256 KiB, 65535; or 0, 64, 0, 65535; bit 4: the client never reads its
//! socket, else it takes the output after every round), one byte of read
//! size (0: everything
//! in one socket read; n: reads of n bytes), then the bytes the client
//! sends.
//!
//! Invariants: nothing panics. The server's bytes are whole frames of
//! SETTINGS, WINDOW_UPDATE, PING, HEADERS, CONTINUATION, DATA, RST_STREAM or
//! GOAWAY, none larger than the client allows; they start with the server's
//! SETTINGS, then only SETTINGS ACKs (no more than the client's SETTINGS)
//! and PING ACKs echoing the client's PINGs; at most one GOAWAY, the last
//! frame, naming a stream the client opened, and always one after an invalid
//! preface. Connection frames are on stream 0; stream frames only on
//! streams the client opened with HEADERS, never after the server's
//! RST_STREAM, and after its END_STREAM only RST_STREAM or WINDOW_UPDATE.
//! A header block is never interrupted and decodes: a response head starting
//! with `:status`, then at most trailers (no pseudo-header, `grpc-status`)
//! with END_STREAM; DATA only between them. DATA stays within the windows
//! the client granted; WINDOW_UPDATE gives back no more than the client
//! sent. However much window the client grants, the output the connection
//! holds unwritten stays under `OUTPUT_BOUND` (a client that does not read
//! cannot make it grow), and no stream in the middle of a request message
//! is left unable to receive the rest of it (the smaller of what it still
//! needs and half a stream window).
#![no_main]

#[path = "../checks/h2_conn.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
