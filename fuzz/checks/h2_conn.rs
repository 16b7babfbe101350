//! The checks of the `h2_conn` fuzz target (input layout and invariants:
//! `fuzz_targets/h2_conn.rs`), shared with `tests/fuzz_regressions.rs`, which
//! replays the seed corpus and every past crash through them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;
use wirestub_compiler::{compile, Options};
use wirestub_engine::codec::hpack::Decoder;
use wirestub_engine::transport::http2::conn::{drive_calls, OUTPUT_BOUND};
use wirestub_engine::transport::http2::frame::{self, code, flag, kind, Head};
use wirestub_engine::{Config, NoMatch, Served};

/// The bundled example (`protos/`, `rules/` at the repository's root),
/// compiled once.
fn served() -> &'static Served {
    static SERVED: OnceLock<Served> = OnceLock::new();
    SERVED.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let options = Options {
            protos: vec![root.join("protos")],
            rules: vec![root.join("rules")],
            protos_only: Vec::new(),
            lenient: false,
        };
        let out = compile(&options).unwrap_or_else(|d| panic!("the bundled example:\n{}", d.render()));
        wirestub_engine::load(&out.plan.to_bytes(), NoMatch::NotFound)
            .unwrap_or_else(|e| panic!("the bundled example: {e}"))
    })
}

/// The server's limits, by bits 2-3 of the first byte: the defaults, then
/// small ones that refuse streams, oversized headers and messages early,
/// and one whose messages may be four times the stream window.
fn configs() -> &'static [Config; 4] {
    static CONFIGS: OnceLock<[Config; 4]> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let limits = |streams, list, message, window| Config {
            max_concurrent_streams: streams,
            max_header_list_size: list,
            max_recv_message: message,
            window,
            ..Config::default()
        };
        [Config::default(), limits(1, 128, 16, 65_535), limits(4, 1024, 256 << 10, 65_535), limits(0, 64, 0, 65_535)]
    })
}

/// An empty SETTINGS frame: the client's half of the handshake.
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, kind::SETTINGS, 0, 0, 0, 0, 0];

/// What the client's bytes allow the server to send, read from them as the
/// server reads them (every whole frame after the preface, up to the first
/// frame too large to be read).
#[derive(Default)]
struct Client {
    /// The bytes start with the connection preface.
    preface: bool,
    /// The bytes cannot be the start of a connection preface.
    bad_preface: bool,
    /// Odd stream ids the client sent HEADERS on.
    opened: Vec<u32>,
    /// Largest SETTINGS_MAX_FRAME_SIZE the client allowed (at least the
    /// default).
    max_frame: usize,
    /// Largest SETTINGS_INITIAL_WINDOW_SIZE the client set (at least the
    /// default).
    max_initial: i64,
    /// WINDOW_UPDATE increments the client granted, per stream (0: the
    /// connection).
    granted: HashMap<u32, i64>,
    /// DATA payload bytes the client sent, per stream (0: all streams).
    data: HashMap<u32, i64>,
    settings: usize,
    pings: Vec<[u8; 8]>,
}

impl Client {
    fn read(stream: &[u8]) -> Client {
        let mut c = Client {
            max_frame: frame::DEFAULT_MAX_FRAME as usize,
            max_initial: frame::DEFAULT_WINDOW,
            ..Default::default()
        };
        let n = stream.len().min(frame::PREFACE.len());
        if stream[..n] != frame::PREFACE[..n] {
            c.bad_preface = true;
            return c;
        }
        if n < frame::PREFACE.len() {
            return c;
        }
        c.preface = true;
        let mut rest = &stream[n..];
        while let Some((head, payload, tail)) = split_frame(rest, frame::DEFAULT_MAX_FRAME as usize) {
            rest = tail;
            match head.kind {
                kind::HEADERS if head.stream % 2 == 1 => c.opened.push(head.stream),
                kind::DATA => {
                    *c.data.entry(head.stream).or_default() += payload.len() as i64;
                    *c.data.entry(0).or_default() += payload.len() as i64;
                }
                kind::WINDOW_UPDATE if payload.len() == 4 => {
                    let increment = u32::from_be_bytes(payload.try_into().expect("four bytes")) & 0x7fff_ffff;
                    *c.granted.entry(head.stream).or_default() += i64::from(increment);
                }
                kind::PING if !head.has(flag::ACK) => {
                    if let Ok(data) = payload.try_into() {
                        c.pings.push(data);
                    }
                }
                kind::SETTINGS if !head.has(flag::ACK) => {
                    c.settings += 1;
                    for pair in payload.chunks_exact(6) {
                        let value = u32::from_be_bytes([pair[2], pair[3], pair[4], pair[5]]);
                        match u16::from_be_bytes([pair[0], pair[1]]) {
                            frame::setting::MAX_FRAME_SIZE if value < 1 << 24 => {
                                c.max_frame = c.max_frame.max(value as usize)
                            }
                            frame::setting::INITIAL_WINDOW_SIZE => c.max_initial = c.max_initial.max(i64::from(value)),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        c
    }
}

/// One whole frame at the start of `bytes`, of at most `max` bytes of
/// payload: its header, its payload and what follows.
fn split_frame(bytes: &[u8], max: usize) -> Option<(Head, &[u8], &[u8])> {
    let head = Head::parse(bytes.get(..frame::HEAD_LEN)?.try_into().expect("nine bytes"));
    let len = head.len as usize;
    if len > max {
        return None;
    }
    let payload = bytes.get(frame::HEAD_LEN..frame::HEAD_LEN + len)?;
    Some((head, payload, &bytes[frame::HEAD_LEN + len..]))
}

/// A stream as the server's frames leave it.
#[derive(Default)]
struct Sent {
    /// Header blocks sent (a response head, then trailers).
    blocks: u32,
    /// Response headers without END_STREAM are out: DATA may follow.
    open: bool,
    /// END_STREAM sent: only RST_STREAM or WINDOW_UPDATE may follow.
    ended: bool,
    /// RST_STREAM sent: nothing may follow.
    reset: bool,
    data: i64,
    window_updates: i64,
}

/// Runs the checks on one input.
pub fn check(data: &[u8]) {
    let [flags, stride, rest @ ..] = data else { return };
    let config = &configs()[usize::from(flags >> 2 & 3)];
    let mut stream = Vec::with_capacity(frame::PREFACE.len() + EMPTY_SETTINGS.len() + rest.len());
    if flags & 3 != 3 {
        stream.extend_from_slice(frame::PREFACE);
        stream.extend_from_slice(&EMPTY_SETTINGS);
    }
    stream.extend_from_slice(rest);
    let chunks: Vec<&[u8]> = match stride {
        0 => vec![&stream[..]],
        n => stream.chunks(usize::from(*n)).collect(),
    };
    let chunks = if chunks.is_empty() { vec![&[][..]] } else { chunks };
    let reading = flags & 0x10 == 0;
    let driven = drive_calls(served(), config, &chunks, reading);
    assert!(
        driven.peak_output <= OUTPUT_BOUND,
        "the connection held {} bytes of output (bound {OUTPUT_BOUND}), client reading: {reading}",
        driven.peak_output
    );
    assert!(driven.stalled.is_empty(), "streams {:?} cannot receive the rest of their message", driven.stalled);
    check_output(&Client::read(&stream), config, &driven.output);
}

/// The server's bytes: well-formed frames, in an order and on streams
/// HTTP/2 allows, within the windows the client granted.
fn check_output(client: &Client, config: &Config, mut out: &[u8]) {
    let mut streams: HashMap<u32, Sent> = HashMap::new();
    let mut decoder = Decoder::new(4096);
    // The header block being sent in HEADERS and CONTINUATION frames: its
    // stream, its bytes and whether it is the stream's first (the response
    // head).
    let mut block: Option<(u32, Vec<u8>, bool)> = None;
    let mut first = true;
    let mut goaway = false;
    // The highest stream the server answered: GOAWAY must count it.
    let mut answered = 0u32;
    let mut conn_data = 0i64;
    let mut conn_window_updates = 0i64;
    let mut acks = 0usize;
    let mut pongs = 0usize;
    let mut kinds = Vec::new();
    while !out.is_empty() {
        let (head, payload, tail) = split_frame(out, client.max_frame).unwrap_or_else(|| {
            panic!("a truncated or oversized frame after {kinds:?}: {:02x?}", &out[..out.len().min(16)])
        });
        out = tail;
        kinds.push(head.kind);
        assert!(
            matches!(
                head.kind,
                kind::DATA
                    | kind::HEADERS
                    | kind::RST_STREAM
                    | kind::SETTINGS
                    | kind::PING
                    | kind::GOAWAY
                    | kind::WINDOW_UPDATE
                    | kind::CONTINUATION
            ),
            "frame type {:#x} from the server",
            head.kind
        );
        let id = head.stream;
        assert!(!goaway, "a frame after GOAWAY: {kinds:?}");
        if first {
            assert!(head.kind == kind::SETTINGS && !head.has(flag::ACK), "the output starts with {head:?}");
        }
        if let Some((s, _, _)) = &block {
            assert!(head.kind == kind::CONTINUATION && id == *s, "header block on stream {s} interrupted by {head:?}");
        }
        let connection = matches!(head.kind, kind::SETTINGS | kind::PING | kind::GOAWAY)
            || (head.kind == kind::WINDOW_UPDATE && id == 0);
        if connection {
            assert_eq!(id, 0, "{head:?} on a stream");
        } else {
            assert!(client.opened.contains(&id), "{head:?} on stream {id}, which the client never opened");
        }
        let sent = streams.entry(id).or_default();
        if id != 0 {
            assert!(!sent.reset, "{head:?} on stream {id} after RST_STREAM");
            assert!(
                !sent.ended || head.kind == kind::RST_STREAM || head.kind == kind::WINDOW_UPDATE,
                "{head:?} on stream {id} after END_STREAM"
            );
        }
        match head.kind {
            kind::SETTINGS if first => {
                assert!(payload.len() % 6 == 0, "SETTINGS of {} bytes", payload.len());
                assert!(frame::settings(payload).is_ok(), "invalid SETTINGS {payload:02x?}");
            }
            kind::SETTINGS => {
                assert!(head.has(flag::ACK) && payload.is_empty(), "a second SETTINGS that is not an ACK: {head:?}");
                acks += 1;
                assert!(acks <= client.settings, "{acks} SETTINGS ACKs for {} SETTINGS", client.settings);
            }
            kind::PING => {
                assert!(head.has(flag::ACK), "the server sent a PING of its own");
                let data: [u8; 8] =
                    payload.try_into().unwrap_or_else(|_| panic!("PING ACK of {} bytes", payload.len()));
                assert!(client.pings.contains(&data), "PING ACK {data:02x?} answers no PING");
                pongs += 1;
                assert!(pongs <= client.pings.len(), "{pongs} PING ACKs for {} PINGs", client.pings.len());
            }
            kind::GOAWAY => {
                assert!(payload.len() >= 8, "GOAWAY of {} bytes", payload.len());
                goaway = true;
                let last = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                assert!(last == 0 || client.opened.contains(&last), "GOAWAY names stream {last}, never opened");
                assert!(last >= answered, "GOAWAY names stream {last}, but stream {answered} was answered");
                let error = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                assert!(error <= code::HTTP_1_1_REQUIRED, "GOAWAY with error code {error:#x}");
            }
            kind::WINDOW_UPDATE => {
                assert_eq!(payload.len(), 4, "WINDOW_UPDATE of {} bytes", payload.len());
                let increment = u32::from_be_bytes(payload.try_into().expect("four bytes"));
                assert!((1..=frame::MAX_WINDOW as u32).contains(&increment), "WINDOW_UPDATE of {increment}");
                sent.window_updates += i64::from(increment);
                if id == 0 {
                    conn_window_updates += i64::from(increment);
                } else {
                    // A stream's window starts at the advertised size and
                    // only what the client used is given back.
                    let used = client.data.get(&id).copied().unwrap_or(0);
                    assert!(
                        sent.window_updates <= used,
                        "stream {id}: {} bytes returned of {used} received",
                        sent.window_updates
                    );
                }
            }
            kind::RST_STREAM => {
                assert_eq!(payload.len(), 4, "RST_STREAM of {} bytes", payload.len());
                sent.reset = true;
            }
            kind::HEADERS => {
                answered = answered.max(id);
                assert_eq!(head.flags & !(flag::END_STREAM | flag::END_HEADERS), 0, "HEADERS flags {:#x}", head.flags);
                assert!(sent.blocks < 2, "stream {id}: a third header block");
                if sent.blocks == 1 {
                    assert!(head.has(flag::END_STREAM), "stream {id}: trailers without END_STREAM");
                }
                sent.blocks += 1;
                if head.has(flag::END_STREAM) {
                    sent.ended = true;
                } else {
                    sent.open = true;
                }
                block = Some((id, payload.to_vec(), sent.blocks == 1));
            }
            kind::CONTINUATION => {
                let (_, bytes, _) =
                    block.as_mut().unwrap_or_else(|| panic!("CONTINUATION on stream {id} after no HEADERS"));
                assert_eq!(head.flags & !flag::END_HEADERS, 0, "CONTINUATION flags {:#x}", head.flags);
                bytes.extend_from_slice(payload);
            }
            kind::DATA => {
                assert_eq!(head.flags & !flag::END_STREAM, 0, "DATA flags {:#x}", head.flags);
                assert!(sent.open, "DATA on stream {id} before response headers");
                if head.has(flag::END_STREAM) {
                    sent.ended = true;
                }
                sent.data += payload.len() as i64;
                conn_data += payload.len() as i64;
                let granted = client.max_initial + client.granted.get(&id).copied().unwrap_or(0);
                assert!(sent.data <= granted, "stream {id}: {} bytes of DATA sent, {granted} granted", sent.data);
                let granted = frame::DEFAULT_WINDOW + client.granted.get(&0).copied().unwrap_or(0);
                assert!(conn_data <= granted, "{conn_data} bytes of DATA sent on the connection, {granted} granted");
            }
            _ => unreachable!("checked above"),
        }
        if matches!(head.kind, kind::HEADERS | kind::CONTINUATION) && head.has(flag::END_HEADERS) {
            let (s, bytes, head_block) = block.take().expect("a block is being sent");
            header_block(&mut decoder, s, &bytes, head_block);
        }
        first = false;
    }
    assert!(!kinds.is_empty(), "no output, not even SETTINGS");
    assert!(block.is_none(), "the output ends inside a header block");
    // The connection window: what the server's first WINDOW_UPDATE opened,
    // then only what the client used.
    let window = i64::from(config.window.min(frame::MAX_WINDOW as u32));
    let opened = (window * 4).min(frame::MAX_WINDOW) - frame::DEFAULT_WINDOW;
    let used = client.data.get(&0).copied().unwrap_or(0);
    assert!(
        conn_window_updates <= opened.max(0) + used,
        "{conn_window_updates} bytes of connection window given, {used} received"
    );
    if client.bad_preface {
        assert!(goaway, "no GOAWAY after an invalid connection preface: {kinds:?}");
    }
    if !client.preface {
        assert!(
            kinds.iter().all(|&k| k == kind::SETTINGS || k == kind::WINDOW_UPDATE || k == kind::GOAWAY),
            "{kinds:?} before the connection preface"
        );
    }
}

/// A response header block decodes; the first of a stream starts with
/// `:status`, trailers hold no pseudo-header and carry `grpc-status`.
fn header_block(decoder: &mut Decoder, id: u32, block: &[u8], first: bool) {
    let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    decoder
        .decode(block, usize::MAX, &mut |n, v| fields.push((n.to_vec(), v.to_vec())))
        .unwrap_or_else(|e| panic!("stream {id}: response header block {block:02x?}: {e}"));
    if first {
        assert!(
            fields.first().is_some_and(|(n, _)| n == b":status"),
            "stream {id}: response head without :status first"
        );
        assert!(fields[1..].iter().all(|(n, _)| !n.starts_with(b":")), "stream {id}: a second pseudo-header");
    } else {
        assert!(fields.iter().all(|(n, _)| !n.starts_with(b":")), "stream {id}: pseudo-header in trailers");
        assert!(fields.iter().any(|(n, _)| n == b"grpc-status"), "stream {id}: trailers without grpc-status");
    }
}
