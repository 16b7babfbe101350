//! One connection on the native HTTP/2 stack: the socket loop, frame
//! handling (RFC 9113), flow control both ways, and the gRPC calls of the
//! connection.
//!
//! The loop reads whatever the socket has, handles every complete frame in
//! the read buffer, and answers calls as they complete: a unary call whose
//! answer needs no waiting (the common case in a load test) is answered
//! right there, its HEADERS, DATA and trailer frames appended to the output
//! buffer with no task, no allocation and no copy of the request. Calls
//! that must wait (a delay, a streamed answer paced by the client's window
//! or by `stream_delay_ms`, a duplex call) become futures polled by this
//! same loop. The output buffer is written once per batch of frames read.
//!
//! Everything lives in one task on one worker thread; the state is shared
//! with the call futures through `Rc<RefCell<Conn>>`, borrowed only for the
//! moment of a frame or a send, never across an await.

use super::frame::{self, code, flag, kind, Head};
use super::request::{ContentType, RequestHead};
use crate::budget::{Reported, CALL_COST};
use crate::call::drive;
use crate::call::matcher::Closest;
use crate::call::matcher::Messages;
use crate::call::{self, Answer};
use crate::codec::hpack::Decoder;
use crate::config::Config;
use crate::observe::journal::Entry;
use crate::observe::metrics::WorkerStats;
use crate::protocol::compression::{self, Encoding};
use crate::protocol::grpc::{self, Code, Status};
use crate::protocol::web_text::{self, TextDecoder};
use crate::protocol::{self, connect, Codec, Dialect, Protocol};
use crate::served::generation::Generation;
use crate::served::Builtin;
use crate::served::{status_answer, status_response, Prepared, Served, ServedMethod};
use crate::state::State;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use typed_arena::Arena;
use wirestub_plan::MethodKind;

/// HPACK dynamic table we let the client's encoder use (the RFC default).
const HEADER_TABLE_SIZE: usize = 4096;
/// Output bytes above which the loop stops reading, and call tasks stop
/// sending, until the socket takes them: a client that does not read
/// stalls only itself, and its connection holds at most about this much
/// output (plus one [`SEND_CHUNK`] and the frames of one read).
const OUT_HIGH: usize = 256 << 10;
/// Rounds of read, handle, run tasks and write that one poll of a
/// connection may do before it yields to the other connections of its
/// worker (fairness: a connection whose client reads as fast as the engine
/// writes would otherwise keep the worker to itself).
const MAX_ROUNDS: u32 = 16;
/// What a message waiting in a duplex call's queue counts for besides its
/// bytes (its place in the queue), so that empty messages cannot queue
/// without bound: the queue is held to a stream window of these.
const QUEUED_OVERHEAD: usize = 64;
/// Request bytes buffered per connection (not yet consumed by calls) above
/// which the connection window is not replenished.
const BUFFER_BUDGET: usize = 16 << 20;
/// Streams the client may reset before their request was complete, net of
/// requests completed, before the connection ends (rapid reset,
/// CVE-2023-44487).
const MAX_EARLY_RESETS: u32 = 50;
/// Stream errors the engine may send because of the client's mistakes, and
/// refusals of streams over the limit, over the connection's life
/// (MadeYouReset, CVE-2025-8671).
const MAX_LOCAL_RESETS: u32 = 1024;
/// DATA frames of under five bytes without END_STREAM (no gRPC message is
/// that small), net of requests completed (CVE-2019-9518).
const MAX_TINY_DATA: u32 = 100;
/// SETTINGS and PING frames since the engine last sent a response frame
/// (CVE-2019-9515/9512 from a client that reads its answers).
const MAX_CONTROL_FRAMES: u32 = 20_000;
/// CONTINUATION frames per header block (CVE-2024-27316).
const MAX_CONTINUATIONS: u32 = 16;
/// Bytes of open calls (their [`CALL_COST`] and the metadata kept for
/// them) one connection may hold; a stream past it is refused
/// (REFUSED_STREAM), so that header blocks of a few bytes that expand,
/// through HPACK references, into kilobytes of kept metadata cannot fill
/// the process-wide budget from a few connections.
const CALLS_BUDGET: usize = 2 << 20;
/// A response waiting for window sends once the client grants this much
/// (or the whole message, if smaller).
const SEND_CHUNK: usize = 16 << 10;
/// Time a closing connection keeps reading (and discarding) after its last
/// frame, so the kernel does not answer unread input with a TCP reset that
/// would destroy the GOAWAY in flight.
const LINGER: Duration = Duration::from_millis(250);
/// Bytes a closing connection discards at most: a client still flooding
/// gets its reset sooner.
const LINGER_BYTES: usize = 256 << 10;

/// A connection error: GOAWAY with this code and debug text, then close.
#[derive(Debug, Clone, Copy)]
struct ConnError {
    code: u32,
    debug: &'static str,
}

fn conn_err(code: u32, debug: &'static str) -> ConnError {
    ConnError { code, debug }
}

/// Stream ids hash to themselves (they are distinct and dense).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | *b as u64;
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type Streams<'s> = HashMap<u32, Stream<'s>, BuildHasherDefault<IdHasher>>;

/// Something queued on a stream until the client's window lets it go.
enum Out {
    Data(Bytes),
    /// A trailer block: ends the stream once everything before it is sent.
    Trailers(Bytes),
    /// An empty DATA frame with END_STREAM: ends a response whose protocol
    /// puts its trailers in the body (gRPC-Web, Connect).
    End,
}

/// What a call in a protocol other than gRPC keeps.
#[derive(Default)]
struct Web {
    /// Connect unary: the answer's headers and message, waiting for its
    /// end (the HTTP status and the trailing metadata, sent as headers,
    /// are known only then).
    deferred: bool,
    headers: http::HeaderMap,
    message: Option<Bytes>,
    /// gRPC-Web text: the request body's base64 decoder.
    text: Option<TextDecoder>,
    /// A browser's `origin`: responses carry the CORS headers.
    origin: Option<Box<[u8]>>,
}

/// The request side of a client stream as rules see it (see
/// [`Messages`]): the first messages, the last one and the count.
#[derive(Default)]
struct Aggregate {
    head: Vec<Bytes>,
    last: Option<Bytes>,
    count: usize,
}

struct Stream<'s> {
    method: &'s ServedMethod,
    /// The protocol and codec of the call.
    dialect: Dialect,
    /// What the protocols other than gRPC keep for the call (None for
    /// gRPC: the stream entry stays small).
    web: Option<Box<Web>>,
    /// How the request's messages are compressed (those flagged so, or a
    /// Connect unary body).
    encoding: Encoding,
    /// Response messages go out gzip-compressed.
    compress: bool,
    /// The client has ended its side (END_STREAM).
    recv_done: bool,
    /// The engine has ended its side (END_STREAM written or queued).
    send_done: bool,
    /// Response headers are out (or queued).
    headers_sent: bool,
    /// Bytes the client may still send on this stream.
    recv_window: i64,
    /// Request bytes not yet cut into messages (all of them, for unary).
    body: BytesMut,
    agg: Option<Box<Aggregate>>,
    /// Duplex calls: whole messages waiting for the call's task.
    queue: VecDeque<Bytes>,
    /// What the queue counts for: its bytes plus [`QUEUED_OVERHEAD`] a
    /// message.
    queued: usize,
    /// The answer a task holds while it waits for window (see
    /// `Handle::capacity`), in `buffered`.
    waiting: usize,
    /// Response bytes queued in `pending`, in `buffered`.
    pending_bytes: usize,
    /// A request-side failure for the call's task (duplex calls).
    failed: Option<Status>,
    metadata: smallvec::SmallVec<[Option<Box<[u8]>>; 2]>,
    /// What the call counts for in the connection's `buffered` and
    /// `calls_held`: [`CALL_COST`] and the metadata kept.
    held: usize,
    content_length: Option<u64>,
    received: u64,
    deadline: Option<Instant>,
    /// Bytes the engine may still send on this stream.
    send_window: i64,
    pending: VecDeque<Out>,
    /// A task (future) drives this stream's answer.
    task: bool,
    /// The task's waker, woken on anything the task may be waiting for.
    waker: Option<Waker>,
    /// The plan generation the call started on (None only when driven
    /// without a server, see [`drive`]).
    generation: Option<&'s Arc<Generation>>,
    /// When the call started (the time of the read that opened it).
    started: Instant,
    /// The gRPC status sent, once the engine has chosen it.
    status: Option<u8>,
    /// What the journal keeps of the call, when it is on.
    rec: Option<Box<Recording>>,
}

/// A call being recorded for the journal.
#[derive(Default)]
struct Recording {
    time: Option<std::time::SystemTime>,
    metadata: Vec<(Box<str>, Bytes)>,
    /// Bounded as it is recorded (`--journal-messages`, `--journal-message-bytes`).
    messages: crate::observe::journal::RequestMessages,
    rule: Option<u32>,
    closest: Option<Closest>,
    message: String,
}

impl Stream<'_> {
    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// What the loop starts as a future once the frame that caused it has
/// been handled.
enum Job<'s> {
    /// Wait, then answer (a delay, or a streamed answer).
    Respond { id: u32, answer: Answer<'s>, delay: Duration, deadline: Option<Instant> },
    /// A duplex call: answers each request message as it comes.
    Duplex { id: u32, deadline: Option<Instant> },
    /// `grpc.health.v1.Health/Watch`: the status now and on every change.
    Watch { id: u32, service: String },
}

/// A header block being received in HEADERS and CONTINUATION frames.
struct Continuation {
    stream: u32,
    end_stream: bool,
    self_dependent: bool,
    block: Vec<u8>,
    frames: u32,
}

/// Why and how the connection is ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Serving; new streams accepted.
    No,
    /// GOAWAY NO_ERROR sent: existing calls finish, then close.
    Draining,
    /// Close as soon as the output is written.
    Now,
}

pub struct Conn<'s> {
    served: &'s Served,
    config: &'s Config,
    out: BytesMut,
    decoder: Decoder,
    streams: Streams<'s>,
    /// Highest stream id the engine has accepted (GOAWAY's last stream).
    last_stream: u32,
    /// Highest stream id the client has used (streams after a GOAWAY are
    /// ignored, not accepted).
    highest_seen: u32,
    preface: bool,
    /// The client's first SETTINGS arrived (the handshake is done).
    settings_seen: bool,
    cont: Option<Continuation>,
    recv_window: i64,
    recv_target: i64,
    /// Request bytes held by streams (see [`BUFFER_BUDGET`]).
    buffered: usize,
    reported: Reported,
    /// Bytes of open calls (see [`CALLS_BUDGET`]), also in `buffered`.
    calls_held: usize,
    send_window: i64,
    peer_initial_window: i64,
    peer_max_frame: usize,
    /// Streams with queued output, in the order they blocked.
    blocked: VecDeque<u32>,
    ending: Ending,
    early_resets: u32,
    local_resets: u32,
    tiny_data: u32,
    control_frames: u32,
    jobs: Vec<Job<'s>>,
    /// Streams with a deadline still waiting for their request.
    waiting: BTreeSet<(Instant, u32)>,
    /// Streams opened so far (for the idle check).
    opened: u64,
    /// The server's shared state; None when driven without a server.
    state: Option<&'s State>,
    /// Generations this epoch of the connection has used (see [`serve`]).
    arena: Option<&'s Arena<Arc<Generation>>>,
    /// The generation new calls start on.
    generation: Option<&'s Arc<Generation>>,
    /// Its number, compared with the state's on every new call.
    number: u64,
    /// Generations in the arena.
    plans: usize,
    /// The time of the current read (one clock read per read, not per call).
    now: Instant,
    /// This worker's index into the metrics blocks.
    worker: usize,
    /// Something (a task, or queued data) waits for the output to fall
    /// below [`OUT_HIGH`].
    out_starved: bool,
}

/// The part of a connection that outlives a plan epoch (everything that
/// does not borrow a plan).
struct Carry {
    out: BytesMut,
    decoder: Decoder,
    last_stream: u32,
    highest_seen: u32,
    preface: bool,
    settings_seen: bool,
    cont: Option<Continuation>,
    recv_window: i64,
    recv_target: i64,
    buffered: usize,
    reported: Reported,
    /// Bytes of open calls (see [`CALLS_BUDGET`]), also in `buffered`.
    calls_held: usize,
    send_window: i64,
    peer_initial_window: i64,
    peer_max_frame: usize,
    blocked: VecDeque<u32>,
    ending: Ending,
    early_resets: u32,
    local_resets: u32,
    tiny_data: u32,
    control_frames: u32,
    waiting: BTreeSet<(Instant, u32)>,
    opened: u64,
}

impl Carry {
    /// A new connection: our SETTINGS (and the connection window) queued.
    fn new(config: &Config) -> Carry {
        let window = config.window.min(frame::MAX_WINDOW as u32) as i64;
        let conn_window = (window * 4).min(frame::MAX_WINDOW);
        let mut out = BytesMut::with_capacity(16 << 10);
        frame::put_settings(
            &mut out,
            &[
                (frame::setting::HEADER_TABLE_SIZE, HEADER_TABLE_SIZE as u32),
                (frame::setting::MAX_CONCURRENT_STREAMS, config.max_concurrent_streams),
                (frame::setting::INITIAL_WINDOW_SIZE, window as u32),
                (frame::setting::MAX_HEADER_LIST_SIZE, config.max_header_list_size),
                (frame::setting::ENABLE_PUSH, 0),
            ],
        );
        if conn_window > frame::DEFAULT_WINDOW {
            frame::put_window_update(&mut out, 0, (conn_window - frame::DEFAULT_WINDOW) as u32);
        }
        Carry {
            out,
            decoder: Decoder::new(HEADER_TABLE_SIZE),
            last_stream: 0,
            highest_seen: 0,
            preface: false,
            settings_seen: false,
            cont: None,
            recv_window: conn_window,
            recv_target: conn_window,
            buffered: 0,
            reported: Reported::default(),
            calls_held: 0,
            send_window: frame::DEFAULT_WINDOW,
            peer_initial_window: frame::DEFAULT_WINDOW,
            peer_max_frame: frame::DEFAULT_MAX_FRAME as usize,
            blocked: VecDeque::new(),
            ending: Ending::No,
            early_resets: 0,
            local_resets: 0,
            tiny_data: 0,
            control_frames: 0,
            waiting: BTreeSet::new(),
            opened: 0,
        }
    }
}

impl<'s> Conn<'s> {
    /// Packs the connection away between plan epochs; it has no stream
    /// and no job left.
    fn suspend(self) -> Carry {
        Carry {
            out: self.out,
            decoder: self.decoder,
            last_stream: self.last_stream,
            highest_seen: self.highest_seen,
            preface: self.preface,
            settings_seen: self.settings_seen,
            cont: self.cont,
            recv_window: self.recv_window,
            recv_target: self.recv_target,
            buffered: self.buffered,
            reported: self.reported,
            calls_held: self.calls_held,
            send_window: self.send_window,
            peer_initial_window: self.peer_initial_window,
            peer_max_frame: self.peer_max_frame,
            blocked: self.blocked,
            ending: self.ending,
            early_resets: self.early_resets,
            local_resets: self.local_resets,
            tiny_data: self.tiny_data,
            control_frames: self.control_frames,
            waiting: self.waiting,
            opened: self.opened,
        }
    }

    /// Unpacks a connection into a new epoch serving `generation`.
    fn resume(
        c: Carry,
        config: &'s Config,
        state: &'s State,
        arena: &'s Arena<Arc<Generation>>,
        generation: &'s Arc<Generation>,
    ) -> Conn<'s> {
        let mut conn = Conn::unpack(c, &generation.served, config);
        conn.state = Some(state);
        conn.arena = Some(arena);
        conn.generation = Some(generation);
        conn.number = generation.number;
        conn.plans = 1;
        conn
    }

    /// A connection from its carried part, serving `served`, with no
    /// stream, no job and no server around it.
    fn unpack(c: Carry, served: &'s Served, config: &'s Config) -> Conn<'s> {
        Conn {
            served,
            config,
            out: c.out,
            decoder: c.decoder,
            streams: Streams::default(),
            last_stream: c.last_stream,
            highest_seen: c.highest_seen,
            preface: c.preface,
            settings_seen: c.settings_seen,
            cont: c.cont,
            recv_window: c.recv_window,
            recv_target: c.recv_target,
            buffered: c.buffered,
            reported: c.reported,
            calls_held: c.calls_held,
            send_window: c.send_window,
            peer_initial_window: c.peer_initial_window,
            peer_max_frame: c.peer_max_frame,
            blocked: c.blocked,
            ending: c.ending,
            early_resets: c.early_resets,
            local_resets: c.local_resets,
            tiny_data: c.tiny_data,
            control_frames: c.control_frames,
            jobs: Vec::new(),
            waiting: c.waiting,
            opened: c.opened,
            state: None,
            arena: None,
            generation: None,
            number: 0,
            plans: 0,
            now: Instant::now(),
            worker: crate::observe::metrics::worker(),
            out_starved: false,
        }
    }

    /// Moves new calls to the state's current generation if it changed.
    /// One atomic load per new call; the lock only after a swap.
    fn refresh(&mut self) {
        let (Some(state), Some(arena)) = (self.state, self.arena) else { return };
        if state.number() == self.number {
            return;
        }
        let current = state.current();
        self.number = current.number;
        let generation: &'s Arc<Generation> = arena.alloc(current);
        self.generation = Some(generation);
        self.served = &generation.served;
        self.plans += 1;
    }

    /// This worker's counters for a call's generation, when metrics are on.
    fn stats(&self, generation: Option<&'s Arc<Generation>>) -> Option<WorkerStats<'s>> {
        generation.filter(|_| self.config.metrics).map(|g| g.stats.worker(self.worker))
    }

    /// A connection without a server around it (see [`drive`]).
    fn new(served: &'s Served, config: &'s Config) -> Self {
        Conn::unpack(Carry::new(config), served, config)
    }

    fn stream_window(&self) -> i64 {
        self.config.window.min(frame::MAX_WINDOW as u32) as i64
    }

    // ---------------------------------------------------------------------
    // Reading
    // ---------------------------------------------------------------------

    /// Handles every complete frame at the start of `buf` and returns how
    /// many bytes were used. Stops early when the output is over its high
    /// mark or the connection is ending.
    fn receive(&mut self, buf: &[u8]) -> Result<usize, ConnError> {
        self.now = Instant::now();
        let mut at = 0;
        if !self.preface {
            let n = buf.len().min(frame::PREFACE.len());
            if buf[..n] != frame::PREFACE[..n] {
                return Err(conn_err(code::PROTOCOL_ERROR, "invalid connection preface"));
            }
            if n < frame::PREFACE.len() {
                return Ok(0);
            }
            self.preface = true;
            at = n;
        }
        while self.ending != Ending::Now && self.out.len() < OUT_HIGH {
            let rest = &buf[at..];
            if rest.len() < frame::HEAD_LEN {
                break;
            }
            let head = Head::parse(rest[..frame::HEAD_LEN].try_into().expect("nine bytes"));
            if head.len > frame::DEFAULT_MAX_FRAME {
                return Err(conn_err(code::FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE"));
            }
            let end = frame::HEAD_LEN + head.len as usize;
            if rest.len() < end {
                break;
            }
            self.frame(head, &rest[frame::HEAD_LEN..end])?;
            at += end;
        }
        self.replenish_connection();
        self.reported.sync(self.buffered);
        Ok(at)
    }

    fn frame(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if !self.settings_seen && (head.kind != kind::SETTINGS || head.has(flag::ACK)) {
            return Err(conn_err(code::PROTOCOL_ERROR, "first frame is not SETTINGS"));
        }
        if let Some(c) = &self.cont {
            if head.kind != kind::CONTINUATION || head.stream != c.stream {
                return Err(conn_err(code::PROTOCOL_ERROR, "header block interrupted"));
            }
        }
        match head.kind {
            kind::DATA => self.on_data(head, payload),
            kind::HEADERS => self.on_headers(head, payload),
            kind::PRIORITY => self.on_priority(head, payload),
            kind::RST_STREAM => self.on_rst(head, payload),
            kind::SETTINGS => self.on_settings(head, payload),
            kind::PUSH_PROMISE => Err(conn_err(code::PROTOCOL_ERROR, "PUSH_PROMISE from a client")),
            kind::PING => self.on_ping(head, payload),
            kind::GOAWAY => self.on_goaway(head, payload),
            kind::WINDOW_UPDATE => self.on_window_update(head, payload),
            kind::CONTINUATION => self.on_continuation(head, payload),
            // Unknown frame types are ignored (RFC 9113 §4.1).
            _ => Ok(()),
        }
    }

    fn on_settings(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.stream != 0 {
            return Err(conn_err(code::PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if head.has(flag::ACK) {
            if !payload.is_empty() {
                return Err(conn_err(code::FRAME_SIZE_ERROR, "SETTINGS ACK with a payload"));
            }
            return Ok(());
        }
        let pairs = frame::settings(payload).map_err(|c| conn_err(c, "invalid SETTINGS"))?;
        for (id, value) in pairs {
            match id {
                frame::setting::INITIAL_WINDOW_SIZE => {
                    let delta = value as i64 - self.peer_initial_window;
                    self.peer_initial_window = value as i64;
                    for s in self.streams.values_mut() {
                        s.send_window += delta;
                        if s.send_window > frame::MAX_WINDOW {
                            return Err(conn_err(code::FLOW_CONTROL_ERROR, "stream window overflow"));
                        }
                    }
                    if delta > 0 {
                        self.unblock_all();
                    }
                }
                frame::setting::MAX_FRAME_SIZE => self.peer_max_frame = value as usize,
                _ => {}
            }
        }
        frame::put_settings_ack(&mut self.out);
        self.settings_seen = true;
        self.control_frame()
    }

    fn control_frame(&mut self) -> Result<(), ConnError> {
        self.control_frames += 1;
        if self.control_frames > MAX_CONTROL_FRAMES {
            return Err(conn_err(code::ENHANCE_YOUR_CALM, "too_many_control_frames"));
        }
        Ok(())
    }

    fn on_ping(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.stream != 0 {
            return Err(conn_err(code::PROTOCOL_ERROR, "PING on a stream"));
        }
        let data: &[u8; 8] = payload.try_into().map_err(|_| conn_err(code::FRAME_SIZE_ERROR, "PING not 8 bytes"))?;
        if head.has(flag::ACK) {
            return Ok(());
        }
        frame::put_ping(&mut self.out, true, data);
        self.control_frame()
    }

    fn on_goaway(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.stream != 0 {
            return Err(conn_err(code::PROTOCOL_ERROR, "GOAWAY on a stream"));
        }
        if payload.len() < 8 {
            return Err(conn_err(code::FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes"));
        }
        // The client opens no more streams; the running ones finish.
        if self.ending == Ending::No {
            self.ending = Ending::Draining;
        }
        Ok(())
    }

    fn on_priority(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.stream == 0 {
            return Err(conn_err(code::PROTOCOL_ERROR, "PRIORITY on stream 0"));
        }
        let dependency = frame::priority_dependency(payload).map_err(|c| conn_err(c, "PRIORITY not 5 bytes"))?;
        if dependency == head.stream {
            if self.streams.contains_key(&head.stream) {
                self.stream_error(head.stream, code::PROTOCOL_ERROR)?;
            } else if head.stream > self.highest_seen || head.stream % 2 == 0 {
                // No RST_STREAM may name an idle stream (RFC 9113 §6.4).
                return Err(conn_err(code::PROTOCOL_ERROR, "PRIORITY of an idle stream depends on itself"));
            }
            // A closed stream: nothing to reset.
        }
        Ok(())
    }

    fn on_rst(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.stream == 0 {
            return Err(conn_err(code::PROTOCOL_ERROR, "RST_STREAM on stream 0"));
        }
        frame::u32_payload(payload).map_err(|c| conn_err(c, "RST_STREAM not 4 bytes"))?;
        if head.stream > self.highest_seen {
            return Err(conn_err(code::PROTOCOL_ERROR, "RST_STREAM on an idle stream"));
        }
        if let Some(mut s) = self.streams.remove(&head.stream) {
            let id = head.stream;
            if !s.recv_done {
                self.early_resets += 1;
                if self.early_resets > MAX_EARLY_RESETS {
                    return Err(conn_err(code::ENHANCE_YOUR_CALM, "too_many_resets"));
                }
            }
            self.forget(id, &mut s);
        }
        Ok(())
    }

    fn on_window_update(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        let increment =
            frame::u32_payload(payload).map_err(|c| conn_err(c, "WINDOW_UPDATE not 4 bytes"))? & 0x7fff_ffff;
        if head.stream == 0 {
            if increment == 0 {
                return Err(conn_err(code::PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
            }
            self.send_window += increment as i64;
            if self.send_window > frame::MAX_WINDOW {
                return Err(conn_err(code::FLOW_CONTROL_ERROR, "connection window overflow"));
            }
            self.unblock_all();
            return Ok(());
        }
        if head.stream > self.highest_seen {
            return Err(conn_err(code::PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream"));
        }
        let Some(s) = self.streams.get_mut(&head.stream) else { return Ok(()) };
        if increment == 0 {
            return self.stream_error(head.stream, code::PROTOCOL_ERROR);
        }
        s.send_window += increment as i64;
        if s.send_window > frame::MAX_WINDOW {
            return self.stream_error(head.stream, code::FLOW_CONTROL_ERROR);
        }
        s.wake();
        self.flush_stream(head.stream);
        Ok(())
    }

    fn on_headers(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.stream == 0 || head.stream % 2 == 0 {
            return Err(conn_err(code::PROTOCOL_ERROR, "HEADERS on an invalid stream id"));
        }
        let (fragment, dependency) =
            frame::headers_fragment(head.flags, payload).map_err(|c| conn_err(c, "malformed HEADERS"))?;
        let self_dependent = dependency == Some(head.stream);
        let end_stream = head.has(flag::END_STREAM);
        if head.has(flag::END_HEADERS) {
            return self.header_block(head.stream, end_stream, self_dependent, fragment);
        }
        self.cont =
            Some(Continuation { stream: head.stream, end_stream, self_dependent, block: fragment.to_vec(), frames: 0 });
        Ok(())
    }

    fn on_continuation(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        let Some(c) = self.cont.as_mut() else {
            return Err(conn_err(code::PROTOCOL_ERROR, "CONTINUATION without HEADERS"));
        };
        c.frames += 1;
        if c.frames > MAX_CONTINUATIONS {
            return Err(conn_err(code::ENHANCE_YOUR_CALM, "too_many_continuations"));
        }
        c.block.extend_from_slice(payload);
        if c.block.len() > 4 * self.config.max_header_list_size as usize + 1024 {
            return Err(conn_err(code::ENHANCE_YOUR_CALM, "header_list_way_too_large"));
        }
        if !head.has(flag::END_HEADERS) {
            return Ok(());
        }
        let c = self.cont.take().expect("checked above");
        self.header_block(c.stream, c.end_stream, c.self_dependent, &c.block)
    }

    /// A complete header block: a new request, or a stream's trailers.
    fn header_block(&mut self, id: u32, end_stream: bool, self_dependent: bool, block: &[u8]) -> Result<(), ConnError> {
        let max_list = self.config.max_header_list_size as usize;
        if id <= self.highest_seen {
            // Trailers of a running stream, or a block for a closed one
            // (decoded all the same: the HPACK table must stay in step).
            let mut trailers = RequestHead::trailers(self.served);
            let oversized = self
                .decoder
                .decode(block, max_list, &mut |n, v| trailers.field(n, v))
                .map_err(|_| conn_err(code::COMPRESSION_ERROR, "HPACK decoding failed"))?;
            let Some(s) = self.streams.get(&id) else { return Ok(()) };
            if s.recv_done {
                return self.stream_error(id, code::STREAM_CLOSED);
            }
            if !end_stream || oversized || trailers.malformed.is_some() || self_dependent {
                return self.stream_error(id, code::PROTOCOL_ERROR);
            }
            return self.end_of_request(id);
        }
        self.refresh();
        let mut request = RequestHead::new(self.served);
        if self.journal_on() {
            request = request.keep_all();
        }
        let oversized = self
            .decoder
            .decode(block, 4 * max_list, &mut |n, v| request.field(n, v))
            .map_err(|_| conn_err(code::COMPRESSION_ERROR, "HPACK decoding failed"))?;
        if oversized {
            return Err(conn_err(code::ENHANCE_YOUR_CALM, "header_list_way_too_large"));
        }
        request.finish();
        self.highest_seen = id;
        if self.ending != Ending::No {
            // Streams after the GOAWAY are ignored (RFC 9113 §6.8).
            return Ok(());
        }
        self.opened += 1;
        if self_dependent || request.malformed.is_some() {
            return self.refuse(id, code::PROTOCOL_ERROR);
        }
        if self.streams.len() >= self.config.max_concurrent_streams as usize {
            return self.refuse(id, code::REFUSED_STREAM);
        }
        // What the call would hold: its state and the metadata kept.
        let mut held = CALL_COST + request.metadata.iter().flatten().map(|v| v.len()).sum::<usize>();
        if let Some(all) = &request.all {
            held += all.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        }
        if self.calls_held + held > CALLS_BUDGET {
            return self.refuse(id, code::REFUSED_STREAM);
        }
        // Streams refused above were not acted on; GOAWAY does not count them.
        self.last_stream = id;
        let oversized = request.size > max_list;
        self.open(id, end_stream, request, oversized, held)
    }

    /// Answers a new stream at once with RST_STREAM.
    fn refuse(&mut self, id: u32, code: u32) -> Result<(), ConnError> {
        self.count_local_reset()?;
        frame::put_rst(&mut self.out, id, code);
        Ok(())
    }

    fn count_local_reset(&mut self) -> Result<(), ConnError> {
        self.local_resets += 1;
        if self.local_resets > MAX_LOCAL_RESETS {
            return Err(conn_err(code::ENHANCE_YOUR_CALM, "too_many_internal_resets"));
        }
        Ok(())
    }

    /// A stream error (RFC 9113 §5.4.2): RST_STREAM, and the stream is gone.
    fn stream_error(&mut self, id: u32, code: u32) -> Result<(), ConnError> {
        if let Some(mut s) = self.streams.remove(&id) {
            self.forget(id, &mut s);
        }
        self.count_local_reset()?;
        frame::put_rst(&mut self.out, id, code);
        Ok(())
    }

    /// Releases what a stream that is going away holds.
    fn forget(&mut self, id: u32, s: &mut Stream<'s>) {
        self.buffered -= s.body.len() + s.queued + s.held + s.waiting + s.pending_bytes;
        self.calls_held -= s.held;
        if let Some(rec) = &s.rec {
            self.buffered -= rec.messages.kept_bytes();
        }
        if let Some(agg) = &s.agg {
            self.buffered -= agg.head.iter().chain(agg.last.iter()).map(Bytes::len).sum::<usize>();
        }
        if let Some(d) = s.deadline {
            self.waiting.remove(&(d, id));
        }
        s.wake();
        self.finish_call(s);
    }

    fn journal_on(&self) -> bool {
        self.state.is_some_and(|s| s.journal.is_some())
    }

    /// Counts a call that ends (an unanswered one as CANCELLED) and
    /// records it in the journal.
    fn finish_call(&mut self, s: &mut Stream<'s>) {
        let code = s.status.unwrap_or(1);
        tracing::debug!(target: "wirestub::calls", method = %s.method.plan.path, code, "call ended");
        if let Some(stats) = self.stats(s.generation) {
            let end = if s.task { Instant::now() } else { self.now };
            stats.handled(s.method.position, code, end.saturating_duration_since(s.started));
        }
        let (Some(rec), Some(state), Some(generation)) = (s.rec.take(), self.state, s.generation) else { return };
        let Some(journal) = &state.journal else { return };
        let rec = *rec;
        journal.record(Entry {
            seq: 0,
            time: rec.time.unwrap_or_else(std::time::SystemTime::now),
            generation: generation.clone(),
            method: s.method.position,
            metadata: rec.metadata,
            messages: rec.messages,
            rule: rec.rule,
            status: code,
            message: percent_decode(&rec.message),
            latency: s.started.elapsed(),
            closest: rec.closest,
            protocol: s.dialect.name(),
        });
    }

    /// Notes the status a call ends with (for metrics and the journal).
    fn note_status(&mut self, id: u32, code: u8, message: &str) {
        if let Some(s) = self.streams.get_mut(&id) {
            if s.status.is_none() {
                s.status = Some(code);
                if let Some(rec) = &mut s.rec {
                    rec.message = message.to_string();
                }
            }
        }
    }

    /// Notes the rule that answered (or that none did) for metrics and
    /// the journal.
    fn note_rule(&mut self, id: u32, answer: &Answer<'s>) {
        self.note_rule_parts(id, answer.rule, answer.closest)
    }

    fn note_rule_parts(&mut self, id: u32, rule: Option<u32>, closest: Option<Closest>) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        if s.method.builtin.is_some() {
            return;
        }
        if let Some(g) = s.generation.filter(|_| self.config.metrics) {
            g.stats.worker(self.worker).rule(s.method.position, rule);
        }
        if let Some(rec) = &mut s.rec {
            rec.rule = rule;
            rec.closest = closest;
        }
    }

    /// Answers a call refused before it opened (no stream state): gRPC's
    /// trailers-only block, or the protocol's whole error response. Its
    /// body (a Connect error, a few hundred bytes) goes only when the
    /// windows let it; otherwise the HTTP status alone tells the client.
    fn refuse_with(&mut self, id: u32, dialect: Dialect, p: &Prepared, origin: Option<&[u8]>) {
        if dialect.protocol == Protocol::Grpc {
            frame::put_headers(&mut self.out, id, &p.blocks.trailers_only, true, self.peer_max_frame);
            return;
        }
        let r = protocol::without_messages(dialect, &p.headers, &p.trailers);
        let block = head_block(r.head, origin, &self.config.cors_origins);
        let fits = (r.body.len() as i64) <= self.peer_initial_window.min(self.send_window);
        if r.body.is_empty() || !fits {
            frame::put_headers(&mut self.out, id, &block, true, self.peer_max_frame);
            return;
        }
        frame::put_headers(&mut self.out, id, &block, false, self.peer_max_frame);
        self.send_window -= r.body.len() as i64;
        put_data_frames(&mut self.out, id, &r.body, self.peer_max_frame);
        frame::put_data(&mut self.out, id, &[], true);
    }

    /// Answers `OPTIONS`: a CORS preflight (204 with what the page may
    /// send and read, 403 for an origin not allowed), or the methods
    /// served.
    fn preflight(&mut self, id: u32, origin: Option<&[u8]>, requested: Option<&[u8]>) {
        let mut head = protocol::Head { status: 204, headers: http::HeaderMap::new() };
        match origin {
            None => {
                head.headers.insert(http::header::ALLOW, http::HeaderValue::from_static("POST, GET, OPTIONS"));
            }
            Some(origin) => match protocol::cors::preflight(&self.config.cors_origins, origin, requested) {
                Ok(h) => head.headers = h,
                Err(h) => {
                    head.headers = h;
                    head.status = 403;
                }
            },
        }
        let block = head_block(head, None, &[]);
        frame::put_headers(&mut self.out, id, &block, true, self.peer_max_frame);
        self.control_frames = 0;
    }

    fn open(
        &mut self,
        id: u32,
        end_stream: bool,
        mut request: RequestHead<'s>,
        oversized: bool,
        held: usize,
    ) -> Result<(), ConnError> {
        let early = |code: u8, msg: String| Some(status_response(code, &msg));
        // What Connect and browsers send (None for gRPC).
        let extra = request.extra.take();
        let origin = extra.as_ref().and_then(|e| e.origin.as_deref());
        let mut http_status = None;
        let mut status = None;
        let mut dialect = Dialect::GRPC;
        let mut get: Option<connect::GetRequest> = None;
        let http_method = request.http_method.as_deref();
        if oversized {
            http_status = Some(431);
        } else if http_method == Some(b"OPTIONS") {
            self.preflight(id, origin, extra.as_ref().and_then(|e| e.cors_headers.as_deref()));
            if !end_stream {
                frame::put_rst(&mut self.out, id, code::NO_ERROR);
            }
            return Ok(());
        } else if http_method == Some(b"GET") {
            // Connect's GET, for methods without side effects.
            let query = extra.as_ref().and_then(|e| e.query.as_deref());
            let query = query.map(|q| connect::parse_get(&String::from_utf8_lossy(q)));
            dialect = Dialect { protocol: Protocol::Connect, codec: Codec::Json };
            let gettable = |m: &ServedMethod| m.no_side_effects && m.plan.kind == MethodKind::Unary && !m.plan.duplex;
            match (request.method, query) {
                (None, _) => {}
                (Some(m), _) if !gettable(m) => http_status = Some(405),
                (Some(_), Some(Ok(q))) => {
                    dialect.codec = q.codec;
                    get = Some(q);
                }
                (Some(_), Some(Err(connect::GetError::Codec(_)))) => http_status = Some(415),
                (Some(_), Some(Err(e))) => status = early(Code::InvalidArgument as u8, e.to_string()),
                (Some(_), None) => {
                    status = early(Code::InvalidArgument as u8, "the query has no encoding parameter".into())
                }
            }
        } else if !request.post {
            http_status = Some(405);
        } else {
            match &request.content_type {
                ContentType::Known(d) => {
                    dialect = *d;
                    let unary = request.method.is_none_or(|m| m.plan.kind == MethodKind::Unary && !m.plan.duplex);
                    if !d.fits(unary) {
                        http_status = Some(415);
                    } else if d.codec == Codec::Json && request.method.is_some_and(|m| m.json.is_none()) {
                        status = early(Code::Unimplemented as u8, "this method has no JSON mapping".into());
                    }
                }
                ContentType::GrpcOther(ct) => {
                    let ct = String::from_utf8_lossy(ct);
                    status = early(
                        Code::Unimplemented as u8,
                        format!("content-type {ct} is not supported; use application/grpc"),
                    );
                }
                _ => http_status = Some(415),
            }
        }
        let method = match request.method {
            Some(m) => Some(m),
            None if http_status.is_none() && status.is_none() => {
                let path = String::from_utf8_lossy(request.unknown_path.as_deref().unwrap_or_default());
                status = early(Code::Unimplemented as u8, format!("unknown method {path}"));
                None
            }
            None => None,
        };
        let mut encoding = Encoding::Identity;
        let get_compression = get.as_ref().and_then(|g| g.compression.as_deref()).map(str::as_bytes);
        if status.is_none() && http_status.is_none() {
            if let Some(e) = get_compression.or(request.encoding.as_deref()) {
                match Encoding::parse(e) {
                    Some(e) => encoding = e,
                    None => status = Some(status_answer(&grpc::unsupported_encoding(e))),
                }
            }
        }
        let accepts = request.accepts_gzip;
        let compress = self.config.compress_responses
            && match dialect.protocol {
                Protocol::Grpc | Protocol::GrpcWeb | Protocol::GrpcWebText => accepts.grpc,
                Protocol::Connect => accepts.http,
                Protocol::ConnectStream => accepts.connect,
            };
        let mut deadline = None;
        if status.is_none() && http_status.is_none() {
            let timeout = match dialect.protocol {
                Protocol::Connect | Protocol::ConnectStream => {
                    let t = extra.as_ref().and_then(|e| e.connect_timeout.as_deref());
                    t.map(|t| (connect::parse_timeout(t), "connect-timeout-ms"))
                }
                _ => request.timeout.as_ref().map(|t| (grpc::parse_timeout(t), "grpc-timeout")),
            };
            match timeout {
                Some((Some(t), _)) => deadline = Some(Instant::now() + t),
                Some((None, name)) => status = early(Code::Internal as u8, format!("malformed {name} header")),
                None => {}
            }
        }
        if http_status.is_some() || status.is_some() {
            // Answered from the headers alone; the request body, if any
            // comes, is refused with RST_STREAM NO_ERROR.
            match http_status {
                Some(code) => {
                    let mut headers = http::HeaderMap::new();
                    match code {
                        405 => {
                            headers.insert(http::header::ALLOW, http::HeaderValue::from_static("POST, GET, OPTIONS"))
                        }
                        415 => {
                            headers.insert("accept-post", http::HeaderValue::from_static(protocol::head::ACCEPT_POST))
                        }
                        _ => None,
                    };
                    let head = protocol::Head { status: code, headers };
                    let block = head_block(head, origin, &self.config.cors_origins);
                    frame::put_headers(&mut self.out, id, &block, true, self.peer_max_frame);
                }
                None => self.refuse_with(id, dialect, &status.expect("one of the two"), origin),
            }
            self.control_frames = 0;
            if !end_stream {
                frame::put_rst(&mut self.out, id, code::NO_ERROR);
            }
            return Ok(());
        }
        let method = method.expect("answered above when missing");
        if self.reported.total(self.buffered) + held > self.config.max_buffered {
            let p = status_answer(&grpc::buffers_full(self.config.max_buffered));
            self.refuse_with(id, dialect, &p, origin);
            if !end_stream {
                frame::put_rst(&mut self.out, id, code::NO_ERROR);
            }
            return Ok(());
        }
        self.buffered += held;
        self.calls_held += held;
        let window = self.stream_window();
        let body = match get {
            Some(g) => {
                self.buffered += g.message.len();
                BytesMut::from(&g.message[..])
            }
            None => BytesMut::new(),
        };
        let stream = Stream {
            method,
            dialect,
            web: (dialect.protocol != Protocol::Grpc).then(|| {
                Box::new(Web {
                    text: (dialect.protocol == Protocol::GrpcWebText).then(Default::default),
                    origin: origin.map(Box::from),
                    ..Web::default()
                })
            }),
            encoding,
            compress,
            recv_done: false,
            send_done: false,
            headers_sent: false,
            recv_window: window,
            body,
            agg: None,
            queue: VecDeque::new(),
            queued: 0,
            waiting: 0,
            pending_bytes: 0,
            failed: None,
            metadata: request.metadata,
            held,
            content_length: request.content_length,
            received: 0,
            deadline,
            send_window: self.peer_initial_window,
            pending: VecDeque::new(),
            task: false,
            waker: None,
            generation: self.generation,
            started: self.now,
            status: None,
            rec: request.all.map(|metadata| {
                Box::new(Recording { time: Some(std::time::SystemTime::now()), metadata, ..Recording::default() })
            }),
        };
        self.streams.insert(id, stream);
        if let Some(stats) = self.stats(self.generation) {
            stats.started(method.position);
            stats.protocol(dialect.index());
        }
        if method.plan.duplex {
            self.streams.get_mut(&id).expect("inserted").task = true;
            self.jobs.push(Job::Duplex { id, deadline });
        } else if let Some(d) = deadline.filter(|_| !end_stream) {
            self.waiting.insert((d, id));
        }
        if end_stream {
            return self.end_of_request(id);
        }
        Ok(())
    }

    fn on_data(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.stream == 0 {
            return Err(conn_err(code::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        let len = payload.len() as i64;
        self.recv_window -= len;
        if self.recv_window < 0 {
            return Err(conn_err(code::FLOW_CONTROL_ERROR, "connection window exceeded"));
        }
        let data = frame::data_payload(head.flags, payload).map_err(|c| conn_err(c, "malformed DATA"))?;
        if head.stream > self.highest_seen {
            return Err(conn_err(code::PROTOCOL_ERROR, "DATA on an idle stream"));
        }
        let end_stream = head.has(flag::END_STREAM);
        if data.len() < 5 && !end_stream {
            self.tiny_data += 1;
            if self.tiny_data > MAX_TINY_DATA {
                return Err(conn_err(code::ENHANCE_YOUR_CALM, "too_many_data_frames"));
            }
        }
        let id = head.stream;
        let Some(s) = self.streams.get_mut(&id) else {
            // A stream that has ended (or was reset): its late data is
            // dropped, its window returned with the connection's.
            return Ok(());
        };
        if s.recv_done {
            return self.stream_error(id, code::STREAM_CLOSED);
        }
        s.recv_window -= len;
        if s.recv_window < 0 {
            return self.stream_error(id, code::FLOW_CONTROL_ERROR);
        }
        s.received += data.len() as u64;
        if s.content_length.is_some_and(|n| s.received > n) {
            return self.stream_error(id, code::PROTOCOL_ERROR);
        }
        let max = self.config.max_recv_message;
        let kind = s.method.plan.kind;
        let duplex = s.method.plan.duplex;
        // The common case, a whole unary request in one DATA frame with
        // END_STREAM, is answered straight from the read buffer.
        if end_stream
            && s.body.is_empty()
            && s.web.as_ref().is_none_or(|w| w.text.is_none())
            && !duplex
            && matches!(kind, MethodKind::Unary | MethodKind::ServerStreaming)
        {
            s.recv_done = true;
            if s.content_length.is_some_and(|n| s.received != n) {
                return self.stream_error(id, code::PROTOCOL_ERROR);
            }
            let deadline = s.deadline;
            self.end_waiting(id, deadline);
            return self.answer_unary(id, data);
        }
        if s.failed.is_some() {
            // A duplex call that has failed: its task ends it.
            return Ok(());
        }
        // The connection's own bound is its window (see BUFFER_BUDGET); a
        // duplex call on a connection past twice that (many tiny queued
        // messages, each counting more than its bytes) gets no more.
        let full = if duplex && self.buffered > 2 * BUFFER_BUDGET {
            Some(grpc::connection_buffers_full(2 * BUFFER_BUDGET))
        } else if !data.is_empty() && self.reported.total(self.buffered) + data.len() > self.config.max_buffered {
            Some(grpc::buffers_full(self.config.max_buffered))
        } else {
            None
        };
        if let Some(status) = full {
            if duplex {
                s.failed = Some(status);
                s.wake();
                return Ok(());
            }
            return self.fail_call(id, &status);
        }
        if !data.is_empty() {
            let before = s.body.len();
            match s.web.as_mut().and_then(|w| w.text.as_mut()) {
                Some(t) => {
                    if let Err(e) = t.push(data, &mut s.body) {
                        let status = Status::new(Code::Internal, format!("malformed grpc-web-text body: {e}"));
                        if duplex {
                            s.failed = Some(status);
                            s.wake();
                            return Ok(());
                        }
                        return self.fail_call(id, &status);
                    }
                }
                None => s.body.extend_from_slice(data),
            }
            self.buffered += s.body.len() - before;
        }
        let failure = if duplex || matches!(kind, MethodKind::ClientStreaming | MethodKind::BidiStreaming) {
            deframe(s, max, &mut self.buffered)
        } else if !s.dialect.enveloped() {
            (s.body.len() > max).then(|| grpc::too_large(s.body.len(), max))
        } else if s.body.len() >= 5 {
            grpc::check_unary(&s.body[..5], s.body.len(), max).err()
        } else {
            None
        };
        if let Some(status) = failure {
            if duplex {
                s.failed = Some(status);
                s.wake();
            } else {
                return self.fail_call(id, &status);
            }
        } else if duplex {
            s.wake();
        }
        self.replenish_stream(id);
        if end_stream {
            return self.end_of_request(id);
        }
        Ok(())
    }

    /// Returns window to a stream that keeps receiving. A stream may hold
    /// (received but not yet consumed, plus what it may still send) one
    /// stream window, or the whole message it is in the middle of when
    /// that is larger (up to the message limit, checked on its prefix), so
    /// any message the limit allows can arrive on every kind of call.
    /// Complete messages waiting for a duplex call's task count against
    /// the window: a task that does not keep up stops the client.
    fn replenish_stream(&mut self, id: u32) {
        let window = self.stream_window();
        let max = self.config.max_recv_message;
        let Some(s) = self.streams.get_mut(&id) else { return };
        if s.recv_done {
            return;
        }
        let queued = s.queued;
        let partial = s.body.len();
        // Bytes still missing from the message in progress.
        let (limit, missing) = if partial >= 5 {
            let len = u32::from_be_bytes([s.body[1], s.body[2], s.body[3], s.body[4]]) as usize;
            let whole = 5 + len.min(max);
            (whole.max(window as usize), whole.saturating_sub(partial))
        } else {
            (window as usize, 5 - partial)
        };
        let held = (partial + queued) as i64;
        let target = (limit as i64 - held).min(window);
        let increase = target - s.recv_window;
        if increase <= 0 {
            return;
        }
        // Window in large steps, except what completes the message.
        if increase < window / 2 && s.recv_window >= missing as i64 {
            return;
        }
        s.recv_window += increase;
        frame::put_window_update(&mut self.out, id, increase as u32);
    }

    fn replenish_connection(&mut self) {
        let deficit = self.recv_target - self.recv_window;
        if deficit >= self.recv_target / 2 && self.buffered < BUFFER_BUDGET {
            self.recv_window += deficit;
            frame::put_window_update(&mut self.out, 0, deficit as u32);
        }
    }

    fn end_waiting(&mut self, id: u32, deadline: Option<Instant>) {
        if let Some(d) = deadline {
            self.waiting.remove(&(d, id));
        }
    }

    /// The client has half-closed: the request is complete.
    fn end_of_request(&mut self, id: u32) -> Result<(), ConnError> {
        let Some(s) = self.streams.get_mut(&id) else { return Ok(()) };
        s.recv_done = true;
        self.tiny_data = self.tiny_data.saturating_sub(1);
        self.early_resets = self.early_resets.saturating_sub(1);
        if s.content_length.is_some_and(|n| s.received != n) {
            return self.stream_error(id, code::PROTOCOL_ERROR);
        }
        let deadline = s.deadline;
        self.end_waiting(id, deadline);
        let s = self.streams.get_mut(&id).expect("present");
        if s.method.plan.duplex {
            s.wake();
            return Ok(());
        }
        let body = std::mem::take(&mut s.body);
        self.buffered -= body.len();
        match s.method.plan.kind {
            MethodKind::Unary | MethodKind::ServerStreaming => self.answer_unary(id, &body),
            MethodKind::ClientStreaming | MethodKind::BidiStreaming => {
                if !body.is_empty() {
                    return self.fail_call(id, &Status::new(Code::Internal, "request message is truncated"));
                }
                let s = self.streams.get_mut(&id).expect("present");
                let agg = s.agg.take().unwrap_or_default();
                let held: usize = agg.head.iter().chain(agg.last.iter()).map(Bytes::len).sum();
                self.buffered -= held;
                let head: Vec<&[u8]> = agg.head.iter().map(|b| &b[..]).collect();
                let last = agg.last.as_deref().or(head.last().copied());
                let messages = Messages { head: &head, last, count: agg.count };
                let method = s.method;
                let picked = call::pick_explained(method, &messages, &s.metadata[..], s.rec.is_some());
                self.answer(id, picked)
            }
        }
    }

    /// Answers a unary or server-streaming call from its request body.
    fn answer_unary(&mut self, id: u32, body: &[u8]) -> Result<(), ConnError> {
        let max = self.config.max_recv_message;
        // One lookup for what the call's protocol asks of its body.
        let Some(s) = self.streams.get(&id) else { return Ok(()) };
        let (dialect, encoding, json) = (s.dialect, s.encoding, s.method.json.as_ref());
        let inflated;
        let message = if dialect.protocol != Protocol::Connect {
            if let Err(status) = grpc::finish_unary(body, body.len(), max) {
                return self.fail_call(id, &status);
            }
            if body[0] == 1 {
                match inflate(encoding, &body[5..], max) {
                    Ok(m) => {
                        inflated = m;
                        &inflated[..]
                    }
                    Err(status) => return self.fail_call(id, &status),
                }
            } else {
                &body[5..]
            }
        } else {
            // Connect unary: the body is the message.
            if body.len() > max {
                return self.fail_call(id, &grpc::too_large(body.len(), max));
            }
            match encoding {
                Encoding::Identity => body,
                _ => match inflate(encoding, body, max) {
                    Ok(m) => {
                        inflated = m;
                        &inflated[..]
                    }
                    Err(status) => return self.fail_call(id, &status),
                },
            }
        };
        let transcoded;
        let message = match (dialect.codec, json) {
            (Codec::Json, Some(codec)) => match codec.request(message) {
                Ok(m) => {
                    transcoded = m;
                    &transcoded[..]
                }
                Err(e) => return self.fail_call(id, &invalid_json(&e)),
            },
            _ => message,
        };
        if self.past_deadline(id) {
            return self.fail_call(id, &call::deadline_exceeded());
        }
        let s = self.streams.get_mut(&id).expect("present");
        if let Some(rec) = &mut s.rec {
            let added = rec.messages.push(message);
            self.buffered = self.buffered.saturating_add_signed(added);
        }
        if let Some(builtin) = s.method.builtin {
            return self.answer_builtin(id, builtin, message);
        }
        let one = [message];
        let picked = call::pick_explained(s.method, &Messages::one(&one), &s.metadata[..], s.rec.is_some());
        self.answer(id, picked)
    }

    /// Health checks: answered by the engine itself.
    fn answer_builtin(&mut self, id: u32, builtin: Builtin, message: &[u8]) -> Result<(), ConnError> {
        let Some(state) = self.state else {
            return self.fail_call(id, &Status::new(Code::Unimplemented, "not served here"));
        };
        match builtin {
            Builtin::HealthCheck => match state.health.check(message) {
                Ok(reply) => {
                    let served = self.served;
                    self.note_status(id, 0, "");
                    self.send_headers(id, &served.ok);
                    self.send_data(id, frame_message(&reply));
                    self.send_trailers(id, &served.ok);
                    Ok(())
                }
                Err(status) => self.fail_call(id, &status),
            },
            Builtin::HealthWatch => match state.health.watched(message) {
                Ok(service) => {
                    self.streams.get_mut(&id).expect("present").task = true;
                    self.jobs.push(Job::Watch { id, service });
                    Ok(())
                }
                Err(status) => self.fail_call(id, &status),
            },
            Builtin::Reflection => self.fail_call(id, &Status::new(Code::Internal, "reflection is a stream")),
        }
    }

    /// Sends the chosen answer now when it needs no waiting, or hands it
    /// to a task.
    fn answer(&mut self, id: u32, picked: Result<Answer<'s>, Status>) -> Result<(), ConnError> {
        let answer = match picked {
            Ok(a) => a,
            Err(status) => return self.fail_call(id, &status),
        };
        if self.past_deadline(id) {
            return self.fail_call(id, &call::deadline_exceeded());
        }
        self.note_rule(id, &answer);
        let prepared = answer.prepared;
        if let Some(fault) = call::fault_fires(prepared) {
            if fault.drop {
                return self.reset(id, code::INTERNAL_ERROR);
            }
            let p = call::prepare_fault(fault);
            self.note_status(id, fault.status, &fault.message);
            self.send_trailers_only(id, &p);
            return Ok(());
        }
        let s = &self.streams[&id];
        let kind = s.method.plan.kind;
        let streams = matches!(kind, MethodKind::ServerStreaming | MethodKind::BidiStreaming);
        let delay = prepared.draw_delay();
        let simple = !streams || (prepared.stream.is_empty() && prepared.error_after == 0);
        if delay.is_zero() && simple {
            if prepared.status != 0 {
                self.note_status(id, prepared.status, message_of(prepared));
                self.send_trailers_only(id, prepared);
                return Ok(());
            }
            let fits = answer.body.len() as i64 <= s.send_window.min(self.send_window);
            if !fits && self.reported.total(self.buffered) + answer.body.len() > self.config.max_buffered {
                return self.fail_call(id, &grpc::buffers_full(self.config.max_buffered));
            }
            if fits || s.deadline.is_none() {
                let body = match s.dialect.codec {
                    Codec::Proto => answer.body.clone(),
                    Codec::Json => answer.json_messages(s.method)[0].clone(),
                };
                self.note_status(id, 0, "");
                self.send_headers(id, prepared);
                self.send_data(id, body);
                self.send_trailers(id, prepared);
                return Ok(());
            }
        }
        let deadline = s.deadline;
        self.streams.get_mut(&id).expect("present").task = true;
        self.jobs.push(Job::Respond { id, answer, delay, deadline });
        Ok(())
    }

    /// Whether a call's deadline has passed. The clock is read only for a
    /// call that had less than a millisecond left at the time of the read
    /// that brought its request (the timers' resolution; longer deadlines
    /// are kept by the timers).
    fn past_deadline(&self, id: u32) -> bool {
        let Some(d) = self.streams.get(&id).and_then(|s| s.deadline) else { return false };
        d.saturating_duration_since(self.now) < Duration::from_millis(1) && d <= Instant::now()
    }

    /// Ends a call with an error status the engine chose.
    fn fail_call(&mut self, id: u32, status: &Status) -> Result<(), ConnError> {
        self.note_status(id, status.code as u8, &status.message);
        let p = status_answer(status);
        if self.streams.get(&id).is_some_and(|s| s.headers_sent) {
            self.send_trailers(id, &p);
        } else {
            self.send_trailers_only(id, &p);
        }
        Ok(())
    }

    // ---------------------------------------------------------------------
    // Writing
    // ---------------------------------------------------------------------

    /// Sends the response headers of `p` (its initial metadata).
    fn send_headers(&mut self, id: u32, p: &Prepared) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        if s.headers_sent || s.send_done {
            return;
        }
        match s.dialect.protocol {
            Protocol::Grpc if !s.compress => {
                frame::put_headers(&mut self.out, id, &p.blocks.headers, false, self.peer_max_frame)
            }
            Protocol::Connect => {
                // Sent with the end, when the status is known.
                let w = s.web.get_or_insert_with(Default::default);
                w.deferred = true;
                w.headers = p.headers.clone();
                return;
            }
            _ => {
                let mut head = protocol::stream_head(s.dialect, &p.headers);
                if s.compress {
                    let name = match s.dialect.protocol {
                        Protocol::ConnectStream => "connect-content-encoding",
                        _ => "grpc-encoding",
                    };
                    head.headers.insert(name, http::HeaderValue::from_static("gzip"));
                }
                let origin = s.web.as_ref().and_then(|w| w.origin.as_deref());
                let block = head_block(head, origin, &self.config.cors_origins);
                frame::put_headers(&mut self.out, id, &block, false, self.peer_max_frame);
            }
        }
        s.headers_sent = true;
        self.control_frames = 0;
    }

    /// Ends the stream with a response that carries no message: gRPC's
    /// trailers-only response, or the protocol's equivalent.
    fn send_trailers_only(&mut self, id: u32, p: &Prepared) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        if s.send_done {
            return;
        }
        if s.dialect.protocol != Protocol::Grpc {
            let r = protocol::without_messages(s.dialect, &p.headers, &p.trailers);
            return self.send_whole(id, r);
        }
        s.headers_sent = true;
        s.send_done = true;
        frame::put_headers(&mut self.out, id, &p.blocks.trailers_only, true, self.peer_max_frame);
        self.control_frames = 0;
        self.finish_send(id);
    }

    /// Sends a whole response (head and body) and ends the stream.
    fn send_whole(&mut self, id: u32, r: protocol::Response) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        s.headers_sent = true;
        let origin = s.web.as_ref().and_then(|w| w.origin.as_deref());
        let block = head_block(r.head, origin, &self.config.cors_origins);
        frame::put_headers(&mut self.out, id, &block, r.body.is_empty(), self.peer_max_frame);
        self.control_frames = 0;
        if r.body.is_empty() {
            s.send_done = true;
            return self.finish_send(id);
        }
        self.send_body(id, r.body);
        self.send_end(id);
    }

    /// Ends the stream with an empty DATA frame, after whatever is queued.
    fn send_end(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        if s.send_done {
            return;
        }
        s.send_done = true;
        if s.pending.is_empty() {
            frame::put_data(&mut self.out, id, &[], true);
            self.finish_send(id);
        } else {
            s.pending.push_back(Out::End);
        }
    }

    /// Sends a response message (gRPC-framed), compressed when the call
    /// says so.
    fn send_data(&mut self, id: u32, data: Bytes) {
        self.send_bytes(id, data, true)
    }

    /// Sends body bytes that are not a message (gRPC-Web's trailer frame,
    /// Connect's end of stream or error).
    fn send_body(&mut self, id: u32, data: Bytes) {
        self.send_bytes(id, data, false)
    }

    /// Sends body bytes in the call's protocol, or as much as the windows
    /// allow, queueing the rest.
    fn send_bytes(&mut self, id: u32, data: Bytes, message: bool) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        if s.send_done {
            return;
        }
        let data = match s.dialect.protocol {
            Protocol::Grpc if !s.compress => data,
            Protocol::Connect if message && !s.headers_sent => {
                // Connect unary: the message goes with the end.
                let w = s.web.get_or_insert_with(Default::default);
                w.deferred = true;
                w.message = Some(data.slice(5.min(data.len())..));
                return;
            }
            protocol => {
                let data =
                    if message && s.compress { compression::compress_framed(Encoding::Gzip, data) } else { data };
                if protocol == Protocol::GrpcWebText {
                    let mut b = BytesMut::with_capacity(data.len().div_ceil(3) * 4);
                    web_text::encode(&data, &mut b);
                    b.freeze()
                } else {
                    data
                }
            }
        };
        if s.pending.is_empty() {
            let room = out_room(&self.out);
            let n = data.len().min(s.send_window.max(0) as usize).min(self.send_window.max(0) as usize).min(room);
            if n == data.len() {
                put_data_frames(&mut self.out, id, &data, self.peer_max_frame);
                s.send_window -= n as i64;
                self.send_window -= n as i64;
                self.control_frames = 0;
                return;
            }
            if n > 0 {
                put_data_frames(&mut self.out, id, &data[..n], self.peer_max_frame);
                s.send_window -= n as i64;
                self.send_window -= n as i64;
            }
            if n == room {
                self.out_starved = true;
            }
            s.pending_bytes += data.len() - n;
            self.buffered += data.len() - n;
            s.pending.push_back(Out::Data(data.slice(n..)));
            self.blocked.push_back(id);
        } else {
            s.pending_bytes += data.len();
            self.buffered += data.len();
            s.pending.push_back(Out::Data(data));
        }
    }

    /// Ends the stream with the trailers of `p` (its status and trailing
    /// metadata), after whatever is queued.
    fn send_trailers(&mut self, id: u32, p: &Prepared) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        if s.send_done {
            return;
        }
        match s.dialect.protocol {
            Protocol::Grpc => {}
            Protocol::Connect => {
                let (headers, message) = match s.web.as_mut() {
                    Some(w) if w.deferred => (std::mem::take(&mut w.headers), w.message.take()),
                    _ => (http::HeaderMap::new(), None),
                };
                let mut r = connect::unary(&headers, &p.trailers, message, s.dialect.codec);
                if s.compress && r.head.status == 200 && !r.body.is_empty() {
                    r.body = compression::compress(Encoding::Gzip, &r.body);
                    r.head.headers.insert(http::header::CONTENT_ENCODING, http::HeaderValue::from_static("gzip"));
                }
                return self.send_whole(id, r);
            }
            _ => {
                if !s.headers_sent {
                    return self.send_trailers_only(id, p);
                }
                let end = protocol::stream_end(s.dialect, &p.trailers).unwrap_or_default();
                self.send_body(id, end);
                return self.send_end(id);
            }
        }
        let block = p.blocks.trailers.clone();
        s.send_done = true;
        if s.pending.is_empty() {
            frame::put_headers(&mut self.out, id, &block, true, self.peer_max_frame);
            self.finish_send(id);
        } else {
            s.pending.push_back(Out::Trailers(block));
        }
    }

    /// Ends the stream with RST_STREAM (an injected fault).
    fn reset(&mut self, id: u32, code: u32) -> Result<(), ConnError> {
        self.note_status(id, Code::Internal as u8, "stream reset by an injected fault");
        if let Some(mut s) = self.streams.remove(&id) {
            self.forget(id, &mut s);
            frame::put_rst(&mut self.out, id, code);
        }
        Ok(())
    }

    /// The response is complete: the stream goes, after telling a client
    /// still sending that nothing more is wanted (RFC 9113 §8.1).
    fn finish_send(&mut self, id: u32) {
        let Some(s) = self.streams.get(&id) else { return };
        if !s.pending.is_empty() {
            return;
        }
        let recv_done = s.recv_done;
        let mut s = self.streams.remove(&id).expect("present");
        self.forget(id, &mut s);
        if !recv_done {
            frame::put_rst(&mut self.out, id, code::NO_ERROR);
        }
    }

    /// Sends what a stream has queued, as far as the windows allow.
    fn flush_stream(&mut self, id: u32) {
        let max_frame = self.peer_max_frame;
        let Some(s) = self.streams.get_mut(&id) else { return };
        let mut finished = false;
        while let Some(front) = s.pending.front_mut() {
            match front {
                Out::Data(d) => {
                    let room = out_room(&self.out);
                    let n = d.len().min(s.send_window.max(0) as usize).min(self.send_window.max(0) as usize).min(room);
                    if n == 0 && !d.is_empty() {
                        if room == 0 {
                            self.out_starved = true;
                        }
                        break;
                    }
                    put_data_frames(&mut self.out, id, &d[..n], max_frame);
                    s.send_window -= n as i64;
                    self.send_window -= n as i64;
                    self.control_frames = 0;
                    s.pending_bytes -= n;
                    self.buffered -= n;
                    d.advance(n);
                    if d.is_empty() {
                        s.pending.pop_front();
                    }
                }
                Out::Trailers(block) => {
                    frame::put_headers(&mut self.out, id, block, true, max_frame);
                    s.pending.pop_front();
                    finished = true;
                }
                Out::End => {
                    frame::put_data(&mut self.out, id, &[], true);
                    s.pending.pop_front();
                    finished = true;
                }
            }
        }
        if s.pending.is_empty() {
            s.wake();
        }
        if finished {
            self.finish_send(id);
        }
    }

    fn unblock_all(&mut self) {
        for s in self.streams.values_mut() {
            if s.task {
                s.wake();
            }
        }
        let mut round = std::mem::take(&mut self.blocked);
        while let Some(id) = round.pop_front() {
            self.flush_stream(id);
            if self.streams.get(&id).is_some_and(|s| !s.pending.is_empty()) {
                self.blocked.push_back(id);
            }
        }
    }

    // ---------------------------------------------------------------------
    // Timers and shutdown
    // ---------------------------------------------------------------------

    /// Answers DEADLINE_EXCEEDED to calls whose deadline passed while their
    /// request was still arriving; returns the next such deadline.
    fn expire(&mut self, now: Instant) -> Option<Instant> {
        while let Some(&(at, id)) = self.waiting.first() {
            if at > now {
                return Some(at);
            }
            self.waiting.pop_first();
            if self.streams.get(&id).is_some_and(|s| !s.recv_done && !s.task) {
                let _ = self.fail_call(id, &call::deadline_exceeded());
            }
        }
        None
    }

    fn goaway(&mut self, code: u32, debug: &[u8]) {
        frame::put_goaway(&mut self.out, self.last_stream, code, debug);
    }

    fn fail(&mut self, e: ConnError) {
        tracing::debug!(code = e.code, "connection error: {}", e.debug);
        self.goaway(e.code, e.debug.as_bytes());
        self.end_now();
    }

    fn end_now(&mut self) {
        self.ending = Ending::Now;
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            if let Some(mut s) = self.streams.remove(&id) {
                self.forget(id, &mut s);
            }
        }
    }

    fn drain(&mut self) {
        if self.ending == Ending::No {
            self.ending = Ending::Draining;
            self.goaway(code::NO_ERROR, b"");
        }
    }

    /// Streams whose request cannot make progress: in the middle of a
    /// message, the client may send less of it than the smaller of what
    /// it still needs and half a stream window, though nothing the engine
    /// holds for the stream (whole messages queued for its task) would
    /// return window once consumed. Empty, always (see [`drive_calls`]).
    fn stalled_streams(&self) -> Vec<u32> {
        let window = self.stream_window();
        let max = self.config.max_recv_message;
        let mut stalled: Vec<u32> = self
            .streams
            .iter()
            .filter(|(_, s)| !s.recv_done && s.failed.is_none() && s.queue.is_empty())
            .filter(|(_, s)| {
                let partial = s.body.len();
                let missing = if partial >= 5 {
                    let len = u32::from_be_bytes([s.body[1], s.body[2], s.body[3], s.body[4]]) as usize;
                    (5 + len.min(max)).saturating_sub(partial)
                } else {
                    5 - partial
                };
                s.recv_window < (missing as i64).min(window / 2)
            })
            .map(|(&id, _)| id)
            .collect();
        stalled.sort_unstable();
        stalled
    }
}

/// Cuts complete messages off a client stream's received bytes: into the
/// aggregate view (client streams), or the queue for the call's task
/// (duplex calls). Returns the error that ends the call, if any.
fn deframe(s: &mut Stream<'_>, max: usize, buffered: &mut usize) -> Option<Status> {
    loop {
        if s.body.len() < 5 {
            if s.body.is_empty() {
                // Let go of the buffer the last message was cut from.
                s.body = BytesMut::new();
            }
            return None;
        }
        let (compressed, len) = match grpc::message_prefix(&s.body, max) {
            Ok(p) => p,
            Err(e) => return Some(e),
        };
        if s.body.len() < 5 + len {
            return None;
        }
        let mut message = cut_message(&mut s.body, len);
        *buffered -= 5;
        if compressed {
            let before = message.len();
            match inflate(s.encoding, &message, max) {
                Ok(m) => message = m,
                Err(e) => return Some(e),
            }
            *buffered = (*buffered + message.len()).saturating_sub(before);
        }
        if let (Codec::Json, Some(codec)) = (s.dialect.codec, &s.method.json) {
            let before = message.len();
            match codec.request(&message) {
                Ok(m) => message = m,
                Err(e) => return Some(invalid_json(&e)),
            }
            *buffered = (*buffered + message.len()).saturating_sub(before);
        }
        if let Some(rec) = &mut s.rec {
            *buffered = buffered.saturating_add_signed(rec.messages.push(&message));
        }
        if s.method.plan.duplex {
            s.queued += message.len() + QUEUED_OVERHEAD;
            *buffered += QUEUED_OVERHEAD;
            s.queue.push_back(message);
            continue;
        }
        let keep = s.method.keep;
        let agg = s.agg.get_or_insert_with(Default::default);
        agg.count += 1;
        if agg.head.len() < keep {
            agg.head.push(message);
        } else {
            if let Some(old) = agg.last.replace(message) {
                *buffered -= old.len();
            }
        }
    }
}

/// Cuts the message of `len` bytes (after its 5-byte prefix) off the
/// front of `body`. A message that fills less than half of the buffer it
/// arrived in is copied out, so that a small message kept for long (a
/// client stream's last) never keeps a large buffer alive; a larger one is
/// cut off without a copy. What is left of the buffer, at most one DATA
/// frame's worth, moves to a buffer of its own for the same reason.
fn cut_message(body: &mut BytesMut, len: usize) -> Bytes {
    if 2 * (5 + len) < body.capacity() {
        let m = Bytes::copy_from_slice(&body[5..5 + len]);
        body.advance(5 + len);
        return m;
    }
    let mut m = body.split_to(5 + len);
    if !body.is_empty() {
        *body = BytesMut::from(&body[..]);
    } else {
        *body = BytesMut::new();
    }
    m.split_off(5).freeze()
}

/// A compressed request message, inflated within `max` bytes; a message
/// flagged compressed without an encoding is refused.
fn inflate(encoding: Encoding, data: &[u8], max: usize) -> Result<Bytes, Status> {
    if encoding == Encoding::Identity {
        return Err(grpc::compressed());
    }
    if data.is_empty() {
        // An empty message is sent as is, compressed or not.
        return Ok(Bytes::new());
    }
    compression::decompress(encoding, data, max).map_err(|e| match e {
        compression::Inflated::TooLarge { limit } => Status::new(
            Code::ResourceExhausted,
            format!("request message is larger than the limit of {limit} bytes once decompressed"),
        ),
        compression::Inflated::Corrupt(why) => {
            Status::new(Code::Internal, format!("cannot decompress request message: {why}"))
        }
    })
}

/// INVALID_ARGUMENT for a JSON request message that does not map onto
/// the method's request type.
fn invalid_json(e: &str) -> Status {
    Status::new(Code::InvalidArgument, format!("invalid JSON request message: {e}"))
}

/// A message with its gRPC prefix (uncompressed).
fn frame_message(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(message.len() as u32).to_be_bytes());
    b.extend_from_slice(message);
    b.freeze()
}

/// A prepared response's `grpc-message`, as sent (percent-encoded).
fn message_of(p: &Prepared) -> &str {
    p.trailers.get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// Undoes gRPC's percent-encoding of `grpc-message`.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Response bytes that may still go into the output buffer now: up to one
/// [`SEND_CHUNK`] past [`OUT_HIGH`], so a message is cut no finer than that.
fn out_room(out: &BytesMut) -> usize {
    (OUT_HIGH + SEND_CHUNK).saturating_sub(out.len())
}

/// A response head as an HPACK block (literals without indexing), with
/// the CORS headers when a browser (`origin`) asked.
fn head_block(mut head: protocol::Head, origin: Option<&[u8]>, origins: &[String]) -> Vec<u8> {
    if let Some(origin) = origin {
        protocol::cors::decorate(origins, origin, &mut head.headers);
    }
    let mut b = Vec::with_capacity(64);
    crate::codec::hpack::encode_status(&mut b, head.status);
    for (k, v) in &head.headers {
        crate::codec::hpack::encode_literal(&mut b, k.as_str().as_bytes(), v.as_bytes());
    }
    b
}

fn put_data_frames(out: &mut BytesMut, id: u32, data: &[u8], max_frame: usize) {
    if data.is_empty() {
        return;
    }
    for chunk in data.chunks(max_frame) {
        frame::put_data(out, id, chunk, false);
    }
}

// -------------------------------------------------------------------------
// Call tasks
// -------------------------------------------------------------------------

type Shared<'s> = Rc<RefCell<Conn<'s>>>;
type Task<'s> = Pin<Box<dyn Future<Output = ()> + 's>>;

/// Why a task stops sending early.
enum Stop {
    Status(Status),
    /// The stream is gone (reset by the client, or the connection ends).
    Gone,
}

impl From<Status> for Stop {
    fn from(s: Status) -> Self {
        Stop::Status(s)
    }
}

/// A task's handle on its stream.
#[derive(Clone)]
struct Handle<'s> {
    conn: Shared<'s>,
    id: u32,
}

impl<'s> Handle<'s> {
    /// Resolves when the stream is gone.
    async fn gone(&self) {
        poll_fn(|cx| {
            let mut c = self.conn.borrow_mut();
            match c.streams.get_mut(&self.id) {
                None => Poll::Ready(()),
                Some(s) => {
                    s.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Waits until the stream has nothing queued, the windows let at least
    /// `min(len, SEND_CHUNK)` bytes go, and the connection's output is
    /// below its high-water mark (the client is reading).
    /// The message of `len` bytes the task holds meanwhile counts as held
    /// for the call (`Stream::waiting`); a message that would take the
    /// bytes held past `--max-buffered-bytes` ends the call instead.
    async fn capacity(&self, len: usize) -> Result<(), Stop> {
        let want = len.min(SEND_CHUNK) as i64;
        poll_fn(move |cx| {
            let mut c = self.conn.borrow_mut();
            let c = &mut *c;
            let conn_window = c.send_window;
            let full = c.out.len() >= OUT_HIGH;
            let Some(s) = c.streams.get_mut(&self.id) else { return Poll::Ready(Err(Stop::Gone)) };
            if s.pending.is_empty() && s.send_window.min(conn_window) >= want && !full {
                c.buffered -= s.waiting;
                s.waiting = 0;
                return Poll::Ready(Ok(()));
            }
            if s.waiting != len {
                c.buffered -= s.waiting;
                s.waiting = 0;
                if c.reported.total(c.buffered) + len > c.config.max_buffered {
                    return Poll::Ready(Err(Stop::Status(grpc::buffers_full(c.config.max_buffered))));
                }
                c.buffered += len;
                s.waiting = len;
            }
            s.waker = Some(cx.waker().clone());
            if full {
                c.out_starved = true;
            }
            Poll::Pending
        })
        .await
    }

    fn with<R>(&self, f: impl FnOnce(&mut Conn<'s>) -> R) -> R {
        f(&mut self.conn.borrow_mut())
    }

    /// The next request message of a duplex call, None once the client
    /// has half-closed.
    async fn next_message(&self) -> Result<Option<Bytes>, Stop> {
        poll_fn(move |cx| {
            let mut c = self.conn.borrow_mut();
            let Some(s) = c.streams.get_mut(&self.id) else { return Poll::Ready(Err(Stop::Gone)) };
            if let Some(m) = s.queue.pop_front() {
                s.queued -= m.len() + QUEUED_OVERHEAD;
                c.buffered -= m.len() + QUEUED_OVERHEAD;
                let buffered = c.buffered;
                c.reported.sync(buffered);
                c.replenish_stream(self.id);
                return Poll::Ready(Ok(Some(m)));
            }
            if let Some(e) = s.failed.take() {
                return Poll::Ready(Err(Stop::Status(e)));
            }
            if s.recv_done {
                if !s.body.is_empty() {
                    return Poll::Ready(Err(Stop::Status(Status::new(Code::Internal, "request message is truncated"))));
                }
                return Poll::Ready(Ok(None));
            }
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

fn start_job<'s>(conn: &Shared<'s>, job: Job<'s>) -> Task<'s> {
    match job {
        Job::Respond { id, answer, delay, deadline } => {
            Box::pin(respond(Handle { conn: conn.clone(), id }, answer, delay, deadline))
        }
        Job::Duplex { id, deadline } => Box::pin(duplex(Handle { conn: conn.clone(), id }, deadline)),
        Job::Watch { id, service } => Box::pin(watch(Handle { conn: conn.clone(), id }, service)),
    }
}

/// `Health/Watch`: the service's status now, then again whenever a status
/// changes; once the server drains, NOT_SERVING and the end of the call.
async fn watch(h: Handle<'_>, service: String) {
    let Some(state) = h.with(|c| c.state) else { return };
    let mut changes = state.health.subscribe();
    h.with(|c| {
        c.note_status(h.id, Code::Unavailable as u8, "the server is shutting down");
        let served = c.served;
        c.send_headers(h.id, &served.ok)
    });
    let mut last: Option<Bytes> = None;
    loop {
        let now = state.health.status_of(&service);
        if last.as_ref() != Some(&now) {
            let item = frame_message(&now);
            if h.capacity(item.len()).await.is_err() {
                return;
            }
            h.with(|c| c.send_data(h.id, item));
            last = Some(now);
        }
        if state.is_draining() {
            break;
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            _ = h.gone() => return,
        }
    }
    let end = status_response(Code::Unavailable as u8, "the server is shutting down");
    h.with(|c| c.send_trailers(h.id, &end));
}

/// Answers after a delay, or streams an answer: the call driver's
/// [`drive::respond`], ended early if the client resets the stream.
async fn respond<'s>(h: Handle<'s>, answer: Answer<'s>, delay: Duration, deadline: Option<Instant>) {
    let Some((method, json)) = h.with(|c| c.streams.get(&h.id).map(|s| (s.method, s.dialect.codec == Codec::Json)))
    else {
        return;
    };
    let mut out = NativeOut(h.clone());
    let mut report = NativeReport(h.clone());
    tokio::select! {
        () = drive::respond(answer, delay, deadline, method, json, &mut out, &mut report) => {}
        () = h.gone() => {}
    }
}

/// A duplex call: the call driver's [`drive::duplex`] over the stream's
/// queue of request messages (reflection is answered here, message by
/// message).
async fn duplex<'s>(h: Handle<'s>, deadline: Option<Instant>) {
    let Some((method, metadata, json, ok)) = h.with(|c| {
        let s = c.streams.get(&h.id)?;
        // The metadata rules read, out of the connection's state for the
        // length of the call.
        Some((s.method, s.metadata.clone(), s.dialect.codec == Codec::Json, &c.served.ok))
    }) else {
        return;
    };
    if method.builtin == Some(Builtin::Reflection) {
        return reflect(h, deadline).await;
    }
    let mut input = NativeIn(h.clone());
    let mut out = NativeOut(h.clone());
    let mut report = NativeReport(h.clone());
    let call = drive::Call { method, metadata: &metadata[..], deadline, ok, json, record: &mut report };
    tokio::select! {
        () = drive::duplex(call, &mut input, &mut out) => {}
        () = h.gone() => {}
    }
}

/// Server reflection: each request answered as it comes.
async fn reflect<'s>(h: Handle<'s>, deadline: Option<Instant>) {
    let result: Result<(), Stop> = async {
        loop {
            let next = tokio::select! {
                next = h.next_message() => next?,
                _ = call::sleep_until(deadline) => return Err(call::deadline_exceeded().into()),
            };
            let Some(message) = next else { return Ok(()) };
            let Some(reply) = h.with(|c| Some(c.streams.get(&h.id)?.generation?.reflection.answer(&message))) else {
                return Err(Stop::Gone);
            };
            // Only the framed answer waits for window, not its makings.
            let item = frame_message(&reply);
            drop(reply);
            drop(message);
            h.with(|c| {
                let served = c.served;
                c.send_headers(h.id, &served.ok)
            });
            tokio::select! {
                r = h.capacity(item.len()) => r?,
                _ = call::sleep_until(deadline) => return Err(call::deadline_exceeded().into()),
            }
            h.with(|c| c.send_data(h.id, item));
        }
    }
    .await;
    h.with(|c| {
        let headers_sent = c.streams.get(&h.id).is_some_and(|s| s.headers_sent);
        let served = c.served;
        let owned;
        let end = match result {
            Err(Stop::Gone) => return,
            Ok(()) => &served.ok,
            Err(Stop::Status(e)) => {
                owned = status_answer(&e);
                &owned
            }
        };
        c.note_status(h.id, end.status, message_of(end));
        if headers_sent {
            c.send_trailers(h.id, end);
        } else {
            c.send_trailers_only(h.id, end);
        }
    });
}

/// A stream as the call driver's response side.
struct NativeOut<'s>(Handle<'s>);

impl drive::Outbound for NativeOut<'_> {
    fn head(&mut self, p: &Prepared) {
        let id = self.0.id;
        self.0.with(|c| c.send_headers(id, p));
    }

    async fn ready(&mut self, len: usize) -> Result<(), drive::Halt> {
        self.0.capacity(len).await.map_err(|stop| match stop {
            Stop::Status(s) => drive::Halt::Status(s),
            Stop::Gone => drive::Halt::Gone,
        })
    }

    fn message(&mut self, framed: Bytes) {
        let id = self.0.id;
        self.0.with(|c| c.send_data(id, framed));
    }

    fn end(&mut self, p: &Prepared) {
        let id = self.0.id;
        self.0.with(|c| {
            // Connect unary holds its head back for the end: it counts as
            // sent.
            let headed =
                c.streams.get(&id).is_some_and(|s| s.headers_sent || s.web.as_ref().is_some_and(|w| w.deferred));
            if headed {
                c.send_trailers(id, p);
            } else {
                c.send_trailers_only(id, p);
            }
        });
    }

    fn abort(&mut self) {
        let id = self.0.id;
        self.0.with(|c| c.reset(id, code::INTERNAL_ERROR).ok());
    }
}

/// A stream as what observers learn of its call: the connection keeps it
/// on the stream (and records the request messages as they arrive).
struct NativeReport<'s>(Handle<'s>);

impl drive::Report for NativeReport<'_> {
    fn explain(&self) -> bool {
        self.0.with(|c| c.streams.get(&self.0.id).is_some_and(|s| s.rec.is_some()))
    }

    fn message(&mut self, _: &[u8]) {}

    fn rule(&mut self, rule: Option<u32>, closest: Option<Closest>) {
        let id = self.0.id;
        self.0.with(|c| c.note_rule_parts(id, rule, closest));
    }

    fn status(&mut self, code: u8, message: &str) {
        let id = self.0.id;
        self.0.with(|c| c.note_status(id, code, message));
    }
}

/// A duplex stream's queue of request messages as the call driver's
/// request side.
struct NativeIn<'s>(Handle<'s>);

impl drive::Inbound for NativeIn<'_> {
    async fn next(&mut self) -> Result<Option<Bytes>, Status> {
        self.0.next_message().await.map_err(|stop| match stop {
            Stop::Status(s) => s,
            Stop::Gone => Status::new(Code::Canceled, "the client has left"),
        })
    }
}

// -------------------------------------------------------------------------
// The socket loop
// -------------------------------------------------------------------------

/// Serves one connection until the client or the engine ends it.
pub async fn serve<T>(mut socket: T, state: &State, config: &Config, mut stop: watch::Receiver<bool>)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut carry = Some(Carry::new(config));
    let mut rbuf = BytesMut::with_capacity(32 << 10);
    let started = Instant::now();
    let handshake_deadline = config.handshake_timeout.map(|t| started + t);
    // The idle check runs on a coarse tick: a connection is idle when a
    // whole idle period passed with no stream open and none opened.
    let period = match (config.idle_timeout, config.write_timeout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let tick = period.map(|t| (t / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)));
    let mut idle_for = Duration::ZERO;
    let mut was_empty = true;
    let mut opened_at_tick = 0u64;
    let mut idle_closing = false;
    let mut stalled_for = Duration::ZERO;
    let mut written_at_tick = 0u64;
    let mut written = 0u64;
    let mut unflushed = 0u64;
    let mut next_tick = tick.map(|t| started + t);
    let mut timer = Box::pin(tokio::time::sleep_until(started + Duration::from_secs(3600)));
    let mut timer_at: Option<Instant> = None;
    let mut stopping = Box::pin(async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    let mut stopped = false;
    let mut read_closed = false;
    let mut write_failed = false;

    // The connection runs in epochs. Calls keep the plan generation they
    // started on; new calls take the current one, so after a swap an
    // epoch holds several generations (in `arena`). When no call is left,
    // the epoch ends and the next one starts with the current generation
    // alone, so a connection never keeps old plans for longer than its
    // longest call.
    loop {
        let arena: Arena<Arc<Generation>> = Arena::new();
        let first: &Arc<Generation> = arena.alloc(state.current());
        let Some(carried) = carry.take() else { break };
        let conn: Shared<'_> = Rc::new(RefCell::new(Conn::resume(carried, config, state, &arena, first)));
        let mut tasks: FuturesUnordered<Task<'_>> = FuturesUnordered::new();
        let next_epoch = poll_fn(|cx| {
            let mut rounds = 0;
            loop {
                let mut progress = false;
                if !stopped && stopping.as_mut().poll(cx).is_ready() {
                    stopped = true;
                    conn.borrow_mut().drain();
                    progress = true;
                }
                // Read and handle frames.
                {
                    let mut c = conn.borrow_mut();
                    // Tokio's readiness: try_read's WouldBlock clears it, and only
                    // a poll that returns Pending registers for the next event,
                    // so the loop polls until it does.
                    while !read_closed && c.ending != Ending::Now && c.out.len() < OUT_HIGH {
                        rbuf.reserve(16 << 10);
                        match tokio_util::io::poll_read_buf(Pin::new(&mut socket), cx, &mut rbuf) {
                            Poll::Pending => break,
                            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => read_closed = true,
                            Poll::Ready(Ok(_)) => {
                                progress = true;
                                break;
                            }
                        }
                    }
                    if !rbuf.is_empty() && c.ending != Ending::Now {
                        match c.receive(&rbuf) {
                            Ok(n) => {
                                if n > 0 {
                                    progress = true;
                                }
                                rbuf.advance(n);
                            }
                            Err(e) => {
                                c.fail(e);
                                rbuf.clear();
                            }
                        }
                    }
                    if read_closed && c.ending != Ending::Now {
                        // The client is gone (or half-closed with nothing more
                        // to say): nobody will read answers.
                        c.end_now();
                    }
                }
                // Start the tasks the frames asked for, and run the tasks.
                let jobs = std::mem::take(&mut conn.borrow_mut().jobs);
                for job in jobs {
                    tasks.push(start_job(&conn, job));
                }
                while let Poll::Ready(Some(())) = tasks.poll_next_unpin(cx) {
                    progress = true;
                }
                // Write.
                {
                    let mut c = conn.borrow_mut();
                    while !c.out.is_empty() && !write_failed {
                        match Pin::new(&mut socket).poll_write(cx, &c.out) {
                            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => write_failed = true,
                            Poll::Ready(Ok(n)) => {
                                c.out.advance(n);
                                written += n as u64;
                                progress = true;
                            }
                            Poll::Pending => break,
                        }
                    }
                    // TLS keeps written records until flushed (TCP: no-op).
                    if !write_failed && c.out.is_empty() && unflushed != written {
                        match Pin::new(&mut socket).poll_flush(cx) {
                            Poll::Ready(Ok(())) => unflushed = written,
                            Poll::Ready(Err(_)) => write_failed = true,
                            Poll::Pending => {}
                        }
                    }
                    if write_failed {
                        c.out.clear();
                        if c.ending != Ending::Now {
                            c.end_now();
                        }
                    }
                    // The client took enough output: what waited for room goes.
                    if c.out_starved && c.out.len() < OUT_HIGH {
                        c.out_starved = false;
                        c.unblock_all();
                        progress = true;
                    }
                    // Calls the tasks ended have given back what they held.
                    let buffered = c.buffered;
                    c.reported.sync(buffered);
                }
                // Timers: deadlines of requests still arriving, the handshake,
                // the idle tick.
                let now_needed = timer_at.is_some_and(|_| timer.as_mut().poll(cx).is_ready());
                if now_needed {
                    timer_at = None;
                    let now = Instant::now();
                    let mut c = conn.borrow_mut();
                    c.expire(now);
                    if !c.settings_seen && handshake_deadline.is_some_and(|d| now >= d) {
                        tracing::debug!("handshake timed out");
                        c.ending = Ending::Now;
                        c.out.clear();
                    }
                    if let (Some(t), Some(at)) = (tick, next_tick) {
                        if now >= at {
                            next_tick = Some(now + t);
                            if c.out.is_empty() || written != written_at_tick {
                                stalled_for = Duration::ZERO;
                            } else {
                                stalled_for += t;
                            }
                            written_at_tick = written;
                            if config.write_timeout.is_some_and(|w| stalled_for >= w) {
                                tracing::debug!("output stalled; dropping the connection");
                                c.end_now();
                                c.out.clear();
                            }
                            // Idle for a tick: no stream open at either end of it
                            // and none opened during it.
                            let empty = c.streams.is_empty();
                            if empty && was_empty && c.opened == opened_at_tick {
                                idle_for += t;
                            } else {
                                idle_for = Duration::ZERO;
                            }
                            was_empty = empty;
                            opened_at_tick = c.opened;
                            let idle = config.idle_timeout.unwrap_or(Duration::MAX);
                            if idle_for >= idle && c.ending != Ending::Now {
                                if idle_closing {
                                    tracing::debug!("idle connection did not close in time; dropping it");
                                    c.end_now();
                                    c.out.clear();
                                } else {
                                    tracing::debug!("idle timeout: sending GOAWAY");
                                    idle_closing = true;
                                    idle_for = Duration::ZERO;
                                    c.goaway(code::NO_ERROR, b"");
                                    c.ending = Ending::Draining;
                                }
                            }
                        }
                    }
                    progress = true;
                }
                {
                    let c = conn.borrow();
                    let finished = match c.ending {
                        Ending::Now => c.out.is_empty() && unflushed == written,
                        Ending::Draining => {
                            c.streams.is_empty() && c.out.is_empty() && unflushed == written && tasks.is_empty()
                        }
                        Ending::No => false,
                    };
                    if finished || (write_failed && tasks.is_empty()) {
                        return Poll::Ready(false);
                    }
                    if c.plans > 1 && c.streams.is_empty() && c.jobs.is_empty() && tasks.is_empty() {
                        return Poll::Ready(true);
                    }
                    // Arm the timer for the earliest thing to wake for.
                    let mut at = c.waiting.first().map(|&(d, _)| d);
                    if !c.settings_seen {
                        at = earliest(at, handshake_deadline);
                    }
                    at = earliest(at, next_tick);
                    if at != timer_at {
                        timer_at = at;
                        if let Some(at) = at {
                            timer.as_mut().reset(at);
                            if timer.as_mut().poll(cx).is_ready() {
                                continue;
                            }
                        }
                    }
                }
                if !progress {
                    return Poll::Pending;
                }
                rounds += 1;
                if rounds >= MAX_ROUNDS {
                    // More work is ready, but the other connections of this
                    // worker go first.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
        })
        .await;
        drop(tasks);
        if !next_epoch {
            break;
        }
        match Rc::try_unwrap(conn) {
            Ok(c) => carry = Some(c.into_inner().suspend()),
            Err(_) => break,
        }
    }
    // Say goodbye properly: stop writing, then read until the client
    // closes (or a moment passes), so the last frames are not destroyed by
    // a TCP reset.
    if !write_failed {
        let _ = tokio::time::timeout(LINGER, async {
            let _ = socket.shutdown().await;
            let mut sink = [0u8; 4096];
            let mut discarded = 0;
            while discarded < LINGER_BYTES {
                match tokio::io::AsyncReadExt::read(&mut socket, &mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => discarded += n,
                }
            }
        })
        .await;
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// The most output [`drive_calls`] may see a connection hold unwritten:
/// the high-water mark, one chunk of a message past it, and the small
/// frames (trailers, resets, acknowledgements) that one read of frames or
/// one flush of every blocked stream may add.
#[doc(hidden)]
pub const OUTPUT_BOUND: usize = OUT_HIGH + SEND_CHUNK + (128 << 10);

/// What [`drive_calls`] saw.
#[doc(hidden)]
pub struct Driven {
    /// Everything the connection wrote.
    pub output: Vec<u8>,
    /// The most output the connection held unwritten at any time.
    pub peak_output: usize,
    /// Streams whose request could not make progress at the end (see
    /// `Conn::stalled_streams`).
    pub stalled: Vec<u32>,
}

/// Feeds `chunks` (as if read from a socket, one read each) to a fresh
/// connection with its call tasks run (a few rounds per read, timers not
/// advanced), by a client that takes the output after every round
/// (`reading`) or never. For fuzzing the flow of data both ways: the
/// output held must stay under [`OUTPUT_BOUND`] however much window the
/// client grants, and no request may stall.
#[doc(hidden)]
pub fn drive_calls(served: &Served, config: &Config, chunks: &[&[u8]], reading: bool) -> Driven {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a runtime");
    runtime.block_on(async {
        let conn: Shared<'_> = Rc::new(RefCell::new(Conn::new(served, config)));
        let mut tasks: FuturesUnordered<Task<'_>> = FuturesUnordered::new();
        let mut rbuf = BytesMut::new();
        let mut d = Driven { output: Vec::new(), peak_output: 0, stalled: Vec::new() };
        for chunk in chunks {
            if conn.borrow().ending == Ending::Now {
                break;
            }
            rbuf.extend_from_slice(chunk);
            for _ in 0..8 {
                if !drive_round(&conn, &mut tasks, &mut rbuf, &mut d, reading).await {
                    break;
                }
            }
            let _ = conn.borrow_mut().expire(Instant::now() + Duration::from_secs(86_400));
        }
        // Time passes: the tasks go on (an endless stream, say) until
        // nothing moves, or for long enough to test the output bound.
        for _ in 0..512 {
            if !drive_round(&conn, &mut tasks, &mut rbuf, &mut d, reading).await {
                break;
            }
        }
        let mut c = conn.borrow_mut();
        d.stalled = c.stalled_streams();
        d.output.extend_from_slice(&c.out);
        c.out.clear();
        drop(c);
        drop(tasks);
        d
    })
}

/// One round of [`drive_calls`]: handle what was read, start and run the
/// tasks (after letting the runtime deliver their wake-ups), resume what
/// waited for room, take the output if the client reads. Returns whether
/// anything moved.
async fn drive_round<'s>(
    conn: &Shared<'s>,
    tasks: &mut FuturesUnordered<Task<'s>>,
    rbuf: &mut BytesMut,
    d: &mut Driven,
    reading: bool,
) -> bool {
    tokio::task::yield_now().await;
    let produced = |c: &Conn<'_>, d: &Driven| d.output.len() + c.out.len();
    let before = (rbuf.len(), tasks.len(), produced(&conn.borrow(), d));
    {
        let mut c = conn.borrow_mut();
        if c.ending != Ending::Now {
            match c.receive(rbuf) {
                Ok(n) => rbuf.advance(n),
                Err(e) => {
                    c.fail(e);
                    rbuf.clear();
                }
            }
        }
    }
    let jobs = std::mem::take(&mut conn.borrow_mut().jobs);
    for job in jobs {
        tasks.push(start_job(conn, job));
    }
    poll_fn(|cx| {
        while let Poll::Ready(Some(())) = tasks.poll_next_unpin(cx) {}
        Poll::Ready(())
    })
    .await;
    let mut c = conn.borrow_mut();
    d.peak_output = d.peak_output.max(c.out.len());
    if reading {
        d.output.extend_from_slice(&c.out);
        c.out.clear();
    }
    if c.out_starved && c.out.len() < OUT_HIGH {
        c.out_starved = false;
        c.unblock_all();
        d.peak_output = d.peak_output.max(c.out.len());
    }
    let after = (rbuf.len(), tasks.len(), produced(&c, d));
    after != before
}

/// Feeds `chunks` (as if read from a socket, one read each) to a fresh
/// connection and returns everything it would have written, tasks not
/// run. For fuzzing and tests of the frame layer: any input must end in
/// output or a GOAWAY, never a panic.
#[doc(hidden)]
pub fn drive(served: &Served, config: &Config, chunks: &[&[u8]]) -> Vec<u8> {
    let mut conn = Conn::new(served, config);
    let mut rbuf = BytesMut::new();
    let mut written = Vec::new();
    for chunk in chunks {
        if conn.ending == Ending::Now {
            break;
        }
        rbuf.extend_from_slice(chunk);
        loop {
            match conn.receive(&rbuf) {
                Ok(n) => {
                    rbuf.advance(n);
                    // The output is taken at once, as a reading client would.
                    written.extend_from_slice(&conn.out);
                    conn.out.clear();
                    if n == 0 || conn.ending == Ending::Now {
                        break;
                    }
                }
                Err(e) => {
                    conn.fail(e);
                    written.extend_from_slice(&conn.out);
                    conn.out.clear();
                    break;
                }
            }
        }
        conn.jobs.clear();
        let _ = conn.expire(Instant::now() + Duration::from_secs(86_400));
    }
    written
}
