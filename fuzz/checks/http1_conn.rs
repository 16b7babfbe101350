//! The checks of the `http1_conn` fuzz target (input layout and invariants:
//! `fuzz_targets/http1_conn.rs`), shared with `tests/fuzz_regressions.rs`,
//! which replays the seed corpus and every past crash through them.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;
use wirestub_compiler::{compile, Options};
use wirestub_engine::observe::metrics::BUFFERED_REQUEST_BYTES;
use wirestub_engine::protocol::web_text::TextDecoder;
use wirestub_engine::transport::http1;
use wirestub_engine::{Config, NoMatch, State};

/// The client reads no more than this; then it leaves (an endless stream).
const READ_CAP: usize = 1 << 20;

/// The longest a connection runs (virtual time), whatever the client asks.
const RUN: Duration = Duration::from_secs(600);

/// How soon the server must end once the client has left (virtual time).
const AFTER_CLIENT: Duration = Duration::from_secs(60);

/// How long the client waits before it reads, when it reads late (bit 5):
/// past the server's write timeout.
const LATE_READ: Duration = Duration::from_secs(60);

/// When the server is told to stop (bit 4), after the client has sent
/// everything: time for the server to read it and start its answers.
const DRAIN_AFTER: Duration = Duration::from_secs(1);

/// The pause between two pieces of what the client sends.
const BETWEEN_PIECES: Duration = Duration::from_millis(1);

/// Bytes either way the in-memory connection buffers.
const PIPE: usize = 16 << 10;

/// The shared state serving the bundled example (`protos/`, `rules/` at the
/// repository's root), compiled once.
fn state() -> &'static Arc<State> {
    static STATE: OnceLock<Arc<State>> = OnceLock::new();
    STATE.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let options = Options {
            protos: vec![root.join("protos")],
            rules: vec![root.join("rules")],
            protos_only: Vec::new(),
            lenient: false,
        };
        let out = compile(&options).unwrap_or_else(|d| panic!("the bundled example:\n{}", d.render()));
        let state = State::new(out.plan, None, "fuzz".into(), NoMatch::NotFound, 1, 16)
            .unwrap_or_else(|e| panic!("the bundled example: {e}"));
        Arc::new(state)
    })
}

/// The server's limits and switches, by bits 0-2 of the first byte.
fn config(bits: u8) -> Config {
    let mut c = Config { seed: Some(1), ..Config::default() };
    if bits & 1 != 0 {
        c.max_recv_message = 64;
        c.max_buffered = 4 << 10;
    }
    if bits & 2 != 0 {
        c.cors_origins = vec!["https://app.example".into(), "http://localhost:3000".into()];
    }
    if bits & 4 != 0 {
        c.compress_responses = true;
    }
    c
}

/// The process-wide count of request bytes held for calls.
fn held_everywhere() -> i64 {
    BUFFERED_REQUEST_BYTES.load(Ordering::Relaxed)
}

/// Runs the checks on one input.
pub fn check(data: &[u8]) {
    let [flags, stride, sent @ ..] = data else { return };
    let config = Rc::new(config(flags & 7));
    let shutdown = flags & 8 != 0;
    let drain = flags & 0x10 != 0;
    let late = flags & 0x20 != 0;
    let pieces: Vec<&[u8]> = match stride {
        0 => vec![sent],
        n => sent.chunks(usize::from(*n)).collect(),
    };
    let state = state().clone();
    // What the client reads, kept when the run is cut short.
    let output = RefCell::new(Vec::new());
    let baseline = held_everywhere();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    let (stop_tx, stop_rx) = watch::channel(false);
    runtime.block_on(async {
        let (client_io, server_io) = tokio::io::duplex(PIPE);
        let server = http1::serve(server_io, state, config, stop_rx);
        tokio::pin!(server);
        let mut server_ended = false;
        let client = client(client_io, &pieces, shutdown, late, &output, drain.then_some(&stop_tx));
        // The client's socket is dropped when this ends, on time or not.
        let _ = tokio::time::timeout(RUN, async {
            tokio::pin!(client);
            loop {
                tokio::select! {
                    biased;
                    () = &mut server, if !server_ended => server_ended = true,
                    () = &mut client => break,
                }
            }
        })
        .await;
        if !server_ended {
            let left = tokio::time::Instant::now();
            if tokio::time::timeout(AFTER_CLIENT, &mut server).await.is_err() {
                panic!("the connection still runs {AFTER_CLIENT:?} after the client left (at {left:?})");
            }
        }
    });
    drop(runtime);
    let left = held_everywhere() - baseline;
    assert_eq!(left, 0, "{left} request bytes still counted as held once the connection is gone");
    let output = output.borrow();
    check_output(&output, sent);
}

/// The client: sends `pieces` (then shuts its side down when `shutdown`,
/// and tells the server to stop through `drain` a little later) while it
/// reads what the server sends, to its end or [`READ_CAP`]; returns
/// (dropping its socket) when it stops reading.
async fn client(
    io: DuplexStream,
    pieces: &[&[u8]],
    shutdown: bool,
    late: bool,
    output: &RefCell<Vec<u8>>,
    drain: Option<&watch::Sender<bool>>,
) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let write = async {
        for (i, piece) in pieces.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(BETWEEN_PIECES).await;
            }
            if wr.write_all(piece).await.is_err() {
                break;
            }
        }
        if shutdown {
            let _ = wr.shutdown().await;
        }
        if let Some(stop) = drain {
            tokio::time::sleep(DRAIN_AFTER).await;
            let _ = stop.send(true);
        }
        std::future::pending::<()>().await
    };
    let read = async {
        if late {
            tokio::time::sleep(LATE_READ).await;
        }
        let mut buf = vec![0; 16 << 10];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let mut out = output.borrow_mut();
                    out.extend_from_slice(&buf[..n]);
                    if out.len() >= READ_CAP {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        biased;
        () = read => {}
        () = write => {}
    }
}

/// The server's bytes: HTTP/1.1 responses one after the other, each framed
/// so that the next one starts where it ends, none after one that closes
/// the connection. The last may be cut off anywhere. `sent`: the client's
/// bytes.
fn check_output(out: &[u8], sent: &[u8]) {
    // hyper answers an HTTP/1.0 request in HTTP/1.0.
    let http10 = contains(sent, b"HTTP/1.0");
    let mut rest = out;
    let mut n = 0;
    while !rest.is_empty() {
        let at = out.len() - rest.len();
        let context = move || format!("response {n} at byte {at} of {}", out.len());
        assert!(
            starts_response(rest, http10),
            "{} starts with {:?}",
            context(),
            String::from_utf8_lossy(&rest[..rest.len().min(16)])
        );
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut r = httparse::Response::new(&mut headers);
        let head = match r.parse(rest) {
            Ok(httparse::Status::Complete(len)) => len,
            // Cut off in the head.
            Ok(httparse::Status::Partial) => return,
            Err(e) => panic!("{}: {e}: {:?}", context(), String::from_utf8_lossy(&rest[..rest.len().min(256)])),
        };
        assert!(r.version == Some(1) || (http10 && r.version == Some(0)), "{}: HTTP/1.{:?}", context(), r.version);
        let status = r.code.expect("a complete head has a status");
        assert!((100..=599).contains(&status) && status != 101, "{}: status {status}", context());
        let head_fields: Vec<(String, Vec<u8>)> =
            r.headers.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())).collect();
        let header = |name: &str| -> Vec<&[u8]> {
            head_fields.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_slice()).collect()
        };
        let close = header("connection").iter().any(|v| v.eq_ignore_ascii_case(b"close"));
        let lengths = header("content-length");
        let codings = header("transfer-encoding");
        let content_type = header("content-type").first().copied().unwrap_or_default();
        let after_head = &rest[head..];
        if status < 200 {
            assert!(lengths.is_empty() && codings.is_empty(), "{}: a {status} with a body", context());
            rest = after_head;
            continue;
        }
        n += 1;
        if status == 204 || status == 304 {
            assert!(codings.is_empty(), "{}: a {status} with Transfer-Encoding", context());
            assert!(lengths.iter().all(|l| *l == b"0"), "{}: a {status} with a body", context());
            rest = after_head;
        } else {
            assert!(
                lengths.len() + codings.len() <= 1,
                "{}: Content-Length {lengths:?} and Transfer-Encoding {codings:?}",
                context()
            );
            let (body, tail) = if let Some(coding) = codings.first() {
                assert_eq!(*coding, b"chunked", "{}: Transfer-Encoding {coding:?}", context());
                match dechunk(after_head) {
                    Chunked::Whole(body, tail) => (body, tail),
                    Chunked::Cut => return,
                    Chunked::Bad(why) => panic!("{}: chunked body: {why}", context()),
                }
            } else if let Some(length) = lengths.first() {
                let length = std::str::from_utf8(length)
                    .ok()
                    .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|l| l.parse::<usize>().ok())
                    .unwrap_or_else(|| panic!("{}: Content-Length {length:?}", context()));
                if after_head.len() < length {
                    return;
                }
                (after_head[..length].to_vec(), &after_head[length..])
            } else if !after_head.is_empty() && starts_response(after_head, http10) {
                // No body: the answer to a HEAD request.
                assert!(contains(sent, b"HEAD"), "{}: a response without framing, and no HEAD request", context());
                (Vec::new(), after_head)
            } else {
                // Delimited by the connection's end (an HTTP/1.0 request):
                // nothing can follow.
                return;
            };
            check_body(content_type, status, &head_fields, &body)
                .unwrap_or_else(|why| panic!("{}: {why}; body {:02x?}", context(), &body[..body.len().min(128)]));
            rest = tail;
        }
        assert!(
            !close || rest.is_empty(),
            "{}: {} bytes after a response that closes the connection",
            context(),
            rest.len()
        );
    }
}

/// Whether `bytes` start with (or are the start of) a status line:
/// `HTTP/1.1 ` (or `HTTP/1.0 ` when `http10`) and a three-digit status.
fn starts_response(bytes: &[u8], http10: bool) -> bool {
    let start = &bytes[..bytes.len().min(12)];
    let version = &start[..start.len().min(9)];
    let ok = |line: &[u8]| line.starts_with(version);
    (ok(b"HTTP/1.1 ") || (http10 && ok(b"HTTP/1.0 "))) && start.iter().skip(9).all(u8::is_ascii_digit)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A chunked body read from the start of some bytes.
enum Chunked<'a> {
    /// The body, and the bytes after it.
    Whole(Vec<u8>, &'a [u8]),
    /// The bytes end inside it.
    Cut,
    Bad(String),
}

/// Reads a chunked body as hyper writes it: hexadecimal sizes, no
/// extensions, maybe trailer fields after the last chunk.
fn dechunk(mut rest: &[u8]) -> Chunked<'_> {
    let mut body = Vec::new();
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            // A size line is short: a long run without CRLF is bad.
            return if rest.len() > 18 { Chunked::Bad(format!("size line {:?}", &rest[..18])) } else { Chunked::Cut };
        };
        let line = &rest[..eol];
        if line.is_empty() || line.len() > 16 || !line.iter().all(u8::is_ascii_hexdigit) {
            return Chunked::Bad(format!("size line {:?}", String::from_utf8_lossy(line)));
        }
        let size =
            usize::from_str_radix(std::str::from_utf8(line).expect("hex digits"), 16).expect("at most 16 digits");
        rest = &rest[eol + 2..];
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else { return Chunked::Cut };
                let field = &rest[..eol];
                rest = &rest[eol + 2..];
                if field.is_empty() {
                    return Chunked::Whole(body, rest);
                }
                if !field.contains(&b':') {
                    return Chunked::Bad(format!("trailer field {:?}", String::from_utf8_lossy(field)));
                }
            }
        }
        if rest.len() < size + 2 {
            return Chunked::Cut;
        }
        body.extend_from_slice(&rest[..size]);
        if &rest[size..size + 2] != b"\r\n" {
            return Chunked::Bad(format!("chunk of {size} bytes not followed by CRLF"));
        }
        rest = &rest[size + 2..];
    }
}

/// A whole response body, in its protocol's framing: gRPC-Web (binary or
/// base64 text) messages and then one trailer frame holding `grpc-status`,
/// or nothing with the status in the headers; Connect streaming messages
/// and then one end-of-stream message holding a JSON object. Messages are
/// flagged compressed only when the response names gzip.
fn check_body(content_type: &[u8], status: u16, headers: &[(String, Vec<u8>)], body: &[u8]) -> Result<(), String> {
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice());
    let ct = String::from_utf8_lossy(content_type).to_ascii_lowercase();
    let (end_flag, encoding) = match ct.as_str() {
        "application/grpc-web+proto" | "application/grpc-web+json" | "application/grpc-web-text+proto" => {
            (0x80u8, header("grpc-encoding"))
        }
        "application/connect+proto" | "application/connect+json" => (0x02, header("connect-content-encoding")),
        _ => return Ok(()),
    };
    if status != 200 {
        return Err(format!("{ct} with status {status}"));
    }
    let gzip = encoding == Some(b"gzip");
    let decoded;
    let body = if ct == "application/grpc-web-text+proto" {
        let mut d = TextDecoder::new();
        let mut out = bytes::BytesMut::new();
        d.push(body, &mut out).and_then(|()| d.finish()).map_err(|e| format!("base64: {e}"))?;
        decoded = out;
        &decoded[..]
    } else {
        body
    };
    if body.is_empty() {
        // gRPC-Web trailers-only: the status is in the headers.
        return match (end_flag, header("grpc-status")) {
            (0x80, Some(_)) => Ok(()),
            _ => Err("an empty body without grpc-status in the headers".into()),
        };
    }
    let mut rest = body;
    let mut messages = 0;
    loop {
        if rest.len() < 5 {
            return Err(format!("{} bytes after {messages} messages, not a frame", rest.len()));
        }
        let flag = rest[0];
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let Some(payload) = rest.get(5..5 + len) else {
            return Err(format!("a frame of {len} bytes with {} left", rest.len() - 5));
        };
        rest = &rest[5 + len..];
        match flag {
            0 => messages += 1,
            1 if gzip => messages += 1,
            f if f == end_flag => {
                if !rest.is_empty() {
                    return Err(format!("{} bytes after the end frame", rest.len()));
                }
                return end_frame(end_flag, payload);
            }
            f => return Err(format!("a frame flagged {f:#x} (gzip: {gzip})")),
        }
    }
}

/// The gRPC-Web trailer frame (`name:value` lines, `grpc-status` among
/// them) or the Connect end-of-stream message (a JSON object).
fn end_frame(flag: u8, payload: &[u8]) -> Result<(), String> {
    if flag == 0x02 {
        return match serde_json::from_slice::<serde_json::Value>(payload) {
            Ok(serde_json::Value::Object(_)) => Ok(()),
            _ => Err(format!("end-of-stream message {:?}", String::from_utf8_lossy(payload))),
        };
    }
    let text = std::str::from_utf8(payload).map_err(|_| "a trailer frame that is not UTF-8".to_string())?;
    let lines: Vec<&str> = text.split_terminator("\r\n").collect();
    if !text.ends_with("\r\n") || lines.iter().any(|l| !l.contains(':')) {
        return Err(format!("trailer frame {text:?}"));
    }
    let status = lines.iter().find_map(|l| l.strip_prefix("grpc-status:"));
    match status {
        Some(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        _ => Err(format!("trailer frame without a grpc-status: {text:?}")),
    }
}
