//! One connection on the native HTTP/2 stack: the socket loop, frame
//! handling (RFC 9113), flow control both ways and the connection's
//! limits, here; its calls in [`calls`] (a request head made a call, its
//! messages, its answer written in its protocol) and [`tasks`] (the futures
//! of calls that wait).
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
use crate::call::drive::message_of;
use crate::call::matcher::Closest;
use crate::call::matcher::Messages;
use crate::call::{self, Answer};
use crate::call::{drive, forward};
use crate::codec::hpack::Decoder;
use crate::config::{Config, UpstreamMode};
use crate::observe::journal::{Entry, Upstreamed};
use crate::observe::metrics::WorkerStats;
use crate::protocol::compression::{self, Encoding};
use crate::protocol::grpc::{self, Code, Status};
use crate::protocol::reader::{self, inflate, invalid_json};
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
use wirestub_plan::{MethodKind, TransportFault};

mod calls;
mod faults;
mod tasks;

use calls::*;
use tasks::*;

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
// Holding a client stream for the upstream never stops the connection's
// window.
const _: () = assert!(forward::HOLD <= BUFFER_BUDGET / 2);

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
    /// What the kept messages count for in the connection's `buffered`.
    held: usize,
    /// Aggregates over every message (see [`ServedMethod::each`]).
    folds: Vec<Result<crate::call::picks::Fold, crate::codec::wire::Malformed>>,
    /// Validation checks the messages failed as they came.
    violations: Vec<crate::call::matcher::Broken>,
    /// A message could not be read for validation.
    malformed: Option<crate::codec::wire::Malformed>,
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
    /// Request messages go to a task as they arrive (`queue`): a duplex
    /// call, or one forwarded to the upstream from its start.
    piped: bool,
    /// What forwarding the call to the upstream takes (None without one).
    forward: Option<Box<Forwarding>>,
}

/// What a call keeps so that it can be forwarded to the upstream.
struct Forwarding {
    path: Box<str>,
    /// Every metadata entry of the request, in order.
    metadata: Vec<(Box<str>, Bytes)>,
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
    similarity: Option<f32>,
    message: String,
    upstream: Option<Box<Upstreamed>>,
    fault: Option<Box<str>>,
    violations: Option<Box<[crate::call::matcher::Broken]>>,
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
    /// Forwarded to the upstream: `first` are the request messages read
    /// so far (those the engine looked for a rule in).
    Forward { id: u32, first: Vec<Bytes>, deadline: Option<Instant> },
    /// A claim of `times` counts in the shared store before the answer:
    /// the request's messages are kept for it.
    Claim { id: u32, claim: Box<crate::shared::Claim>, held: Held },
}

/// The request messages a claim's call is answered from afterwards.
enum Held {
    Unary(Bytes),
    Stream(Box<Aggregate>),
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
    /// Transport faults a rule injected that are still in force.
    faults: Option<Box<faults::ConnFaults>>,
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
    faults: Option<Box<faults::ConnFaults>>,
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
            faults: None,
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
            faults: self.faults,
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
            faults: c.faults,
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
            } else if head.stream > self.highest_seen || head.stream.is_multiple_of(2) {
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
        if head.stream == 0 || head.stream.is_multiple_of(2) {
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
        if self.journal_on() || self.config.upstream.is_some() {
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
            self.buffered -= agg.held;
        }
        if let Some(d) = s.deadline {
            self.waiting.remove(&(d, id));
        }
        s.wake();
        self.finish_call(s);
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
        let duplex = s.piped;
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
                        let status = reader::malformed_text(&e);
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
        } else if call::validate::per_message() && s.agg.as_ref().is_some_and(|a| !a.violations.is_empty()) {
            // `--validation-mode per-message`: the first invalid message
            // ends the call at once.
            let method = s.method;
            let agg = s.agg.take().unwrap_or_default();
            self.buffered -= agg.held;
            // The client is still sending: answering ends the stream with
            // RST_STREAM(NO_ERROR) (RFC 9113 §8.1), and what it sends
            // after is not read.
            let answer = call::validate::invalid(method, agg.violations);
            return self.answer(id, Ok(answer));
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
                    // An injected stall: nothing is read or handled until it lapses.
                    let read_stalled = c.faults.as_mut().is_some_and(|f| f.read_stalled(Instant::now()));
                    // Tokio's readiness: try_read's WouldBlock clears it, and only
                    // a poll that returns Pending registers for the next event,
                    // so the loop polls until it does.
                    while !read_closed && !read_stalled && c.ending != Ending::Now && c.out.len() < OUT_HIGH {
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
                    if !rbuf.is_empty() && !read_stalled && c.ending != Ending::Now {
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
                    let c = &mut *c;
                    // An injected stall or trickle limits what goes now.
                    let mut budget = match &mut c.faults {
                        Some(f) => {
                            let streams = &c.streams;
                            f.write_budget(Instant::now(), |id| streams.contains_key(&id), written, c.out.len())
                        }
                        None => None,
                    };
                    while !c.out.is_empty() && !write_failed && budget != Some(0) {
                        let chunk = budget.map_or(c.out.len(), |b| b.min(c.out.len()));
                        match Pin::new(&mut socket).poll_write(cx, &c.out[..chunk]) {
                            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => write_failed = true,
                            Poll::Ready(Ok(n)) => {
                                c.out.advance(n);
                                written += n as u64;
                                progress = true;
                                if let (Some(b), Some(f)) = (&mut budget, &mut c.faults) {
                                    f.wrote(Instant::now(), n);
                                    *b = 0;
                                }
                            }
                            Poll::Pending => break,
                        }
                    }
                    if c.faults.as_ref().is_some_and(|f| f.is_idle()) {
                        c.faults = None;
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
                            // An injected stall is not the client's.
                            if c.out.is_empty() || written != written_at_tick || c.faults.is_some() {
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
                    at = earliest(at, c.faults.as_ref().and_then(|f| f.wake_at(Instant::now())));
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
