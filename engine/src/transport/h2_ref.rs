//! The reference HTTP/2 stack: the same gRPC calls served through the `h2`
//! crate (`engine run --http2 h2`). The native stack ([`crate::transport::http2`]) is
//! the default; this one is kept as the reference the end-to-end cases
//! compare it with, and for anything the native stack is suspected of.
//!
//! Abuse resistance here is h2's own guards, set explicitly below.

use crate::budget::{Held, H2_CALL_COST};
use crate::call::matcher::Messages;
use crate::call::{deadline_exceeded, pick, prepare_fault, sleep_until, Answer};
use crate::config::Config;
use crate::observe::metrics::WorkerStats;
use crate::protocol::grpc::{self, Code, Status};
use crate::served::generation::Generation;
use crate::served::{status_answer, status_response, Builtin, Prepared};
use crate::state::State;
use crate::transport::outflow;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, Request, Response, StatusCode};
use std::cell::Cell;
use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use wirestub_plan::MethodKind;

// h2's own abuse guards (h2 0.4.20), set explicitly rather than left to
// h2's defaults, which "could change". Each breach ends the connection with
// GOAWAY ENHANCE_YOUR_CALM and the debug data named. What the engine sends
// in each case is pinned by tests/python/test_abuse.py.

/// Rapid reset (CVE-2023-44487): streams the client opens and resets before
/// the engine has accepted them, queued at once (`too_many_resets`).
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// MadeYouReset (CVE-2025-8671): streams h2 resets because of the client's
/// errors, counted over the connection's whole life, refusals of streams
/// over `max_concurrent_streams` included (`too_many_internal_resets`).
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// Memory for streams the engine reset: at most this many are remembered
/// (to ignore their late frames), each for `RESET_STREAM_DURATION`.
const MAX_CONCURRENT_RESET_STREAMS: usize = 50;
const RESET_STREAM_DURATION: Duration = Duration::from_secs(1);
/// Response bytes h2 buffers per stream: a stream with this much unwritten
/// is granted no more send capacity, so its sender waits (see
/// `wait_capacity`) instead of buffering for a client that does not read.
const MAX_SEND_BUFFER_SIZE: usize = 400 << 10;
/// HPACK dynamic table the client's encoder may make us keep (the RFC
/// default). h2 answers a table size update above it with GOAWAY
/// PROTOCOL_ERROR (RFC 7541 says COMPRESSION_ERROR).
const HEADER_TABLE_SIZE: u32 = 4096;

/// Drives one connection: the handshake, then every stream as a future in
/// this task, until the client or the engine closes it.
pub(crate) async fn connection<T>(socket: T, state: &State, config: &Config, stop: watch::Receiver<bool>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let flow = std::rc::Rc::new(outflow::Outflow::new(config.max_buffered));
    let socket = outflow::Counted { inner: socket, flow: flow.clone() };
    outflow::scope(flow.clone(), serve(socket, &flow, state, config, stop)).await
}

/// [`connection`] on a socket whose writes are counted.
async fn serve<T>(socket: T, flow: &outflow::Outflow, state: &State, config: &Config, mut stop: watch::Receiver<bool>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // Calls take the generation current when they start and keep it.
    let mut generation = state.current();
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(config.window)
        .initial_connection_window_size(config.window.saturating_mul(4))
        // Unbounded in h2 by default; over it, h2 refuses the stream
        // (RST_STREAM REFUSED_STREAM).
        .max_concurrent_streams(config.max_concurrent_streams)
        // h2's default is 16 MiB. A header block over it is answered with
        // HTTP 431 and RST_STREAM; over four times it (HPACK bombs
        // included, decoded sizes count), GOAWAY ENHANCE_YOUR_CALM. It
        // also caps CONTINUATION frames per block (CVE-2024-27316: size /
        // 16 KiB frames + 25%, at least 5; over that, GOAWAY
        // ENHANCE_YOUR_CALM).
        .max_header_list_size(config.max_header_list_size)
        .header_table_size(HEADER_TABLE_SIZE)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .max_concurrent_reset_streams(MAX_CONCURRENT_RESET_STREAMS)
        .reset_stream_duration(RESET_STREAM_DURATION)
        .max_send_buffer_size(MAX_SEND_BUFFER_SIZE);
    // Left to h2: tiny DATA frame floods (CVE-2019-9518) meet its automatic
    // data_frame_budget (half the connection window; at most 100 empty
    // frames). SETTINGS and PING floods (CVE-2019-9515/9512) have no limit
    // in h2, only backpressure: it keeps at most one pending SETTINGS ACK
    // and one pending PONG and reads nothing more until they are written,
    // so a flooder that does not read stalls only itself (and then meets
    // the idle timeout); one that reads is answered for as long as it goes.
    let handshake = builder.handshake::<_, Bytes>(socket);
    let handshake = match config.handshake_timeout {
        Some(t) => match tokio::time::timeout(t, handshake).await {
            Ok(h) => h,
            Err(_) => {
                tracing::debug!("handshake timed out");
                return;
            }
        },
        None => handshake.await,
    };
    let mut conn = match handshake {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("handshake failed: {e}");
            return;
        }
    };
    let mut streams = FuturesUnordered::new();
    let mut draining = *stop.borrow();
    if draining {
        conn.graceful_shutdown();
    }
    // Armed while no call is in progress (the branch below is disabled
    // otherwise) and re-armed when the last call ends, so the request path
    // pays one timer reset per idle period, not one per call.
    let idle = config.idle_timeout;
    let timer = tokio::time::sleep(idle.unwrap_or(Duration::ZERO));
    tokio::pin!(timer);
    let mut idle_closing = false;
    // The write-stall check: a connection whose output is backed up and
    // whose socket took nothing for `write_timeout` is dropped.
    let stall_tick = config.write_timeout.map(|t| (t / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)));
    let mut ticks = tokio::time::interval(stall_tick.unwrap_or(Duration::from_secs(3600)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stalled_for = Duration::ZERO;
    let mut written_at_tick = flow.written();
    loop {
        tokio::select! {
            _ = ticks.tick(), if stall_tick.is_some() => {
                let written = flow.written();
                if flow.backed_up() && written == written_at_tick {
                    stalled_for += stall_tick.unwrap_or_default();
                } else {
                    stalled_for = Duration::ZERO;
                }
                written_at_tick = written;
                if config.write_timeout.is_some_and(|w| stalled_for >= w) {
                    tracing::debug!("output stalled; dropping the connection");
                    break;
                }
            }
            _ = stop.changed(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
            accepted = conn.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    if state.number() != generation.number {
                        generation = state.current();
                    }
                    streams.push(call(state, generation.clone(), config, request, respond))
                }
                Some(Err(e)) => {
                    tracing::debug!("connection error: {e}");
                    break;
                }
                None => break,
            },
            Some(()) = streams.next(), if !streams.is_empty() => {
                if let Some(t) = idle.filter(|_| streams.is_empty()) {
                    timer.as_mut().reset(Instant::now() + t);
                }
            }
            () = timer.as_mut(), if idle.is_some() && streams.is_empty() => {
                if idle_closing {
                    // The GOAWAY could not be written within another idle
                    // period (a client that reads nothing): just drop it.
                    tracing::debug!("idle connection did not close in time; dropping it");
                    break;
                }
                tracing::debug!("idle timeout: sending GOAWAY");
                idle_closing = true;
                // Not graceful_shutdown: that waits for a PING round trip
                // a dead peer never completes. Nothing is in flight anyway.
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                timer.as_mut().reset(Instant::now() + idle.unwrap_or_default());
            }
        }
    }
}

/// Serves one call to completion. Failures to send mean the client went
/// away; there is nobody left to tell.
async fn call(
    state: &State,
    generation: Arc<Generation>,
    config: &Config,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let served = &generation.served;
    let (parts, body) = request.into_parts();
    if parts.method != http::Method::POST {
        let _ = send_http_error(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
        return;
    }
    let content_type = parts.headers.get(http::header::CONTENT_TYPE).map(|v| v.as_bytes()).unwrap_or(b"");
    if !content_type.starts_with(b"application/grpc") {
        let _ = send_http_error(&mut respond, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        return;
    }
    if !matches!(content_type, b"application/grpc" | b"application/grpc+proto") {
        let ct = String::from_utf8_lossy(content_type);
        let s = Status::new(Code::Unimplemented, format!("content-type {ct} is not supported; use application/grpc"));
        let _ = send_status(&mut respond, &s);
        return;
    }
    let path = parts.uri.path();
    let Some(method) = served.method(path) else {
        let _ = send_status(&mut respond, &Status::new(Code::Unimplemented, format!("unknown method {path}")));
        return;
    };
    if let Some(e) = parts.headers.get("grpc-encoding").filter(|e| e.as_bytes() != b"identity") {
        let _ = send_status(&mut respond, &grpc::unsupported_encoding(e.as_bytes()));
        return;
    }
    let deadline = match parts.headers.get("grpc-timeout") {
        None => None,
        Some(v) => match grpc::parse_timeout(v.as_bytes()) {
            Some(t) => Some(Instant::now() + t),
            None => {
                let _ = send_status(&mut respond, &Status::new(Code::Internal, "malformed grpc-timeout header"));
                return;
            }
        },
    };
    // The call's state counts in the budget of bytes held for calls.
    let mut call_held = Held::new(config.max_buffered);
    if let Err(s) = call_held.grow(H2_CALL_COST) {
        let _ = send_status(&mut respond, &s);
        return;
    }
    let headers = &parts.headers;
    let tally = Tally {
        stats: config.metrics.then(|| generation.stats.worker(crate::observe::metrics::worker())),
        method: method.position,
        started: Instant::now(),
        code: Cell::new(Code::Canceled as u8),
    };
    if let Some(s) = &tally.stats {
        s.started(method.position);
    }

    if let Some(builtin) = method.builtin {
        tally.set(builtin_call(state, &generation, builtin, config, body, respond, deadline).await);
        return;
    }
    if method.plan.duplex {
        tally.set(duplex(method, config, headers, body, respond, deadline, &tally).await);
        return;
    }

    // Read the request, pick the response and wait out its delay, under the
    // deadline and stopping early if the client resets the stream.
    let work = async {
        let answer = match method.plan.kind {
            MethodKind::Unary | MethodKind::ServerStreaming => {
                let message = read_unary(body, config).await?;
                let one = [&message[..]];
                let answer = pick(method, &Messages::one(&one), headers)?;
                tally.rule(answer.rule);
                answer
            }
            MethodKind::ClientStreaming | MethodKind::BidiStreaming => {
                let mut reader = MessageReader::new(body, config);
                let mut head = Vec::new();
                let mut last: Option<Bytes> = None;
                let mut count = 0usize;
                // The messages kept for the rules stay in the budget.
                let mut kept = Held::new(config.max_buffered);
                while let Some(m) = reader.next().await? {
                    count += 1;
                    kept.grow(m.len())?;
                    if head.len() < method.keep {
                        head.push(m);
                    } else if let Some(old) = last.replace(m) {
                        kept.shrink(old.len());
                    }
                }
                let head_refs: Vec<&[u8]> = head.iter().map(|b| &b[..]).collect();
                let last = last.as_deref().or(head_refs.last().copied());
                let answer = pick(method, &Messages { head: &head_refs, last, count }, headers)?;
                tally.rule(answer.rule);
                answer
            }
        };
        let delay = answer.prepared.draw_delay();
        if !delay.is_zero() {
            // A delay longer than the deadline is cut short below, which
            // answers DEADLINE_EXCEEDED at the deadline.
            tokio::time::sleep(delay).await;
        }
        Ok::<_, Status>(answer)
    };
    let reset = poll_fn(|cx| respond.poll_reset(cx));
    let outcome = tokio::select! {
        outcome = work => outcome,
        _ = reset => return,
        _ = sleep_until(deadline) => Err(Status::new(Code::DeadlineExceeded, "deadline exceeded")),
    };
    // A deadline shorter than the timers' resolution may pass unnoticed
    // while the work above completes.
    let outcome = match outcome {
        Ok(_) if deadline.is_some_and(|d| d <= Instant::now()) => Err(deadline_exceeded()),
        o => o,
    };
    let answer = match outcome {
        Ok(a) => a,
        Err(s) => {
            tally.set(s.code as u8);
            let _ = send_status(&mut respond, &s);
            return;
        }
    };
    let prepared = answer.prepared;
    if let Some(fault) = prepared.fault.as_ref().filter(|f| crate::rng::unit() < f.rate) {
        if fault.drop {
            tally.set(Code::Internal as u8);
            respond.send_reset(h2::Reason::INTERNAL_ERROR);
        } else {
            tally.set(fault.status);
            let _ = send(&mut respond, &Answer::of(&prepare_fault(fault)));
        }
        return;
    }
    let streams = method.plan.kind == MethodKind::ServerStreaming || method.plan.kind == MethodKind::BidiStreaming;
    if !streams || (prepared.stream.is_empty() && prepared.error_after == 0) {
        tally.set(send_one(&mut respond, &answer, deadline).await);
        return;
    }
    tally.set(send_stream(&mut respond, &answer, deadline).await);
}

/// Counts one call for the metrics: started when made; handled, with the
/// last code set (CANCELLED if none), when dropped, so calls cut short by a
/// reset or a closing connection are counted too.
struct Tally<'g> {
    stats: Option<WorkerStats<'g>>,
    method: usize,
    started: Instant,
    code: Cell<u8>,
}

impl Tally<'_> {
    fn set(&self, code: u8) {
        self.code.set(code);
    }

    fn rule(&self, rule: Option<u32>) {
        if let Some(s) = &self.stats {
            s.rule(self.method, rule);
        }
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        if let Some(s) = &self.stats {
            s.handled(self.method, self.code.get(), self.started.elapsed());
        }
    }
}

/// Health and reflection, answered by the engine itself.
async fn builtin_call(
    state: &State,
    generation: &Generation,
    builtin: Builtin,
    config: &Config,
    body: RecvStream,
    mut respond: SendResponse<Bytes>,
    deadline: Option<Instant>,
) -> u8 {
    let ok = &generation.served.ok;
    let framed = |m: &[u8]| Bytes::from(wirestub_plan::grpc_frame(m));
    match builtin {
        Builtin::HealthCheck => {
            let reply = match read_unary(body, config).await {
                Ok(message) => state.health.check(&message),
                Err(e) => Err(e),
            };
            match reply {
                Ok(reply) => {
                    let answer = Answer { body: framed(&reply), ..Answer::of(ok) };
                    send_one(&mut respond, &answer, deadline).await
                }
                Err(e) => {
                    let _ = send_status(&mut respond, &e);
                    e.code as u8
                }
            }
        }
        Builtin::HealthWatch => {
            let service = match read_unary(body, config).await {
                Ok(message) => state.health.watched(&message),
                Err(e) => Err(e),
            };
            let service = match service {
                Ok(s) => s,
                Err(e) => {
                    let _ = send_status(&mut respond, &e);
                    return e.code as u8;
                }
            };
            let mut head = Response::new(());
            *head.headers_mut() = ok.headers.clone();
            let Ok(mut stream) = respond.send_response(head, false) else { return Code::Canceled as u8 };
            let mut changes = state.health.subscribe();
            let mut last: Option<Bytes> = None;
            loop {
                let now = state.health.status_of(&service);
                if last.as_ref() != Some(&now) {
                    let item = framed(&now);
                    if wait_capacity(&mut stream, item.len(), None).await.is_err()
                        || stream.send_data(item, false).is_err()
                    {
                        return Code::Canceled as u8;
                    }
                    last = Some(now);
                }
                if state.is_draining() {
                    break;
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { break },
                    _ = poll_fn(|cx| stream.poll_reset(cx)) => return Code::Canceled as u8,
                }
            }
            let end = status_response(Code::Unavailable as u8, "the server is shutting down");
            let _ = stream.send_trailers(end.trailers);
            Code::Unavailable as u8
        }
        Builtin::Reflection => {
            let mut reader = MessageReader::new(body, config);
            let mut stream: Option<SendStream<Bytes>> = None;
            let result: Result<(), Stop<'_>> = async {
                while let Some(message) = tokio::select! {
                    next = reader.next() => next?,
                    _ = sleep_until(deadline) => return Err(deadline_exceeded().into()),
                } {
                    let item = framed(&generation.reflection.answer(&message));
                    let s = match &mut stream {
                        Some(s) => s,
                        None => {
                            let mut head = Response::new(());
                            *head.headers_mut() = ok.headers.clone();
                            stream.insert(respond.send_response(head, false).map_err(|_| Stop::Gone)?)
                        }
                    };
                    wait_capacity(s, item.len(), deadline).await?;
                    s.send_data(item, false).map_err(|_| Stop::Gone)?;
                }
                Ok(())
            }
            .await;
            finish_stream(&mut respond, stream, result)
        }
    }
}

/// Receives the one request message of a unary or server-streaming call,
/// checking framing and size as bytes arrive. The common case (the message
/// in one DATA frame) is zero-copy.
async fn read_unary(mut body: RecvStream, config: &Config) -> Result<Bytes, Status> {
    let max = config.max_recv_message;
    let mut held = Held::new(config.max_buffered);
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut total = 0usize;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| Status::new(Code::Internal, format!("request stream failed: {e}")))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if chunk.is_empty() {
            continue;
        }
        total += chunk.len();
        held.grow(chunk.len())?;
        match (&mut first, &mut joined) {
            (None, _) => first = Some(chunk),
            (Some(f), None) => {
                let mut j = BytesMut::with_capacity(total.max(5 + declared_len(f, &chunk)));
                j.extend_from_slice(f);
                j.extend_from_slice(&chunk);
                joined = Some(j);
            }
            (Some(_), Some(j)) => j.extend_from_slice(&chunk),
        }
        let buf: &[u8] = match (&first, &joined) {
            (_, Some(j)) => j,
            (Some(f), None) => f,
            _ => &[],
        };
        if buf.len() >= 5 {
            grpc::check_unary(&buf[..5], total, max)?;
        }
    }
    let all = match (first, joined) {
        (_, Some(j)) => j.freeze(),
        (Some(f), None) => f,
        (None, None) => Bytes::new(),
    };
    grpc::finish_unary(&all, total, max)?;
    if all[0] == 1 {
        return Err(grpc::compressed());
    }
    Ok(all.slice(5..))
}

/// The message length announced by a prefix split over two chunks, for
/// sizing the join buffer (bounded by the caller's size check).
fn declared_len(a: &[u8], b: &[u8]) -> usize {
    let mut p = [0u8; 5];
    for (i, byte) in a.iter().chain(b.iter()).take(5).enumerate() {
        p[i] = *byte;
    }
    (u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as usize).min(64 << 10)
}

/// Splits a request stream into gRPC messages as they arrive.
struct MessageReader {
    body: RecvStream,
    buf: BytesMut,
    max: usize,
    ended: bool,
    /// The bytes in `buf`, in the process-wide count.
    held: Held,
}

impl MessageReader {
    fn new(body: RecvStream, config: &Config) -> Self {
        let held = Held::new(config.max_buffered);
        MessageReader { body, buf: BytesMut::new(), max: config.max_recv_message, ended: false, held }
    }

    /// The next message, or None once the client has half-closed.
    async fn next(&mut self) -> Result<Option<Bytes>, Status> {
        loop {
            if self.buf.len() >= 5 {
                let (compressed, len) = grpc::message_prefix(&self.buf, self.max)?;
                if self.buf.len() >= 5 + len {
                    if compressed {
                        return Err(grpc::compressed());
                    }
                    // As on the native stack: a small message is copied
                    // out rather than keep a large buffer alive.
                    let message = if 2 * (5 + len) < self.buf.capacity() {
                        let m = Bytes::copy_from_slice(&self.buf[5..5 + len]);
                        self.buf.advance(5 + len);
                        m
                    } else {
                        let mut m = self.buf.split_to(5 + len);
                        self.buf = BytesMut::from(&self.buf[..]);
                        m.split_off(5).freeze()
                    };
                    self.held.shrink(5 + len);
                    return Ok(Some(message));
                }
            }
            if self.ended {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(Status::new(Code::Internal, "request message is truncated"));
            }
            match self.body.data().await {
                Some(Ok(chunk)) => {
                    let _ = self.body.flow_control().release_capacity(chunk.len());
                    self.held.grow(chunk.len())?;
                    self.buf.extend_from_slice(&chunk);
                }
                Some(Err(e)) => return Err(Status::new(Code::Internal, format!("request stream failed: {e}"))),
                None => self.ended = true,
            }
        }
    }
}

/// Why a streaming response stops early.
enum Stop<'m> {
    /// The engine ends the call with this status.
    Status(Status),
    /// A rule's error response ends the call.
    Rule(&'m Prepared),
    /// The client reset the stream or went away: nothing more to send.
    Gone,
}

impl From<Status> for Stop<'_> {
    fn from(s: Status) -> Self {
        Stop::Status(s)
    }
}

/// Answers each request message of a duplex call as it arrives, with the
/// rule that matches that message, then ends with OK when the client
/// half-closes. A rule's error status ends the call.
async fn duplex(
    method: &crate::served::ServedMethod,
    config: &Config,
    headers: &HeaderMap,
    body: RecvStream,
    mut respond: SendResponse<Bytes>,
    deadline: Option<Instant>,
    tally: &Tally<'_>,
) -> u8 {
    let mut reader = MessageReader::new(body, config);
    let mut stream: Option<SendStream<Bytes>> = None;
    let result: Result<(), Stop<'_>> = async {
        loop {
            let next = tokio::select! {
                next = reader.next() => next?,
                _ = sleep_until(deadline) => return Err(deadline_exceeded().into()),
            };
            let Some(message) = next else { return Ok(()) };
            let one = [&message[..]];
            let answer = pick(method, &Messages::one(&one), headers)?;
            tally.rule(answer.rule);
            let prepared = answer.prepared;
            let delay = prepared.draw_delay();
            if !delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = sleep_until(deadline) => return Err(deadline_exceeded().into()),
                }
            }
            if prepared.status != 0 && prepared.error_after == 0 {
                return Err(Stop::Rule(prepared));
            }
            let s = match &mut stream {
                Some(s) => s,
                None => {
                    let mut head = Response::new(());
                    *head.headers_mut() = prepared.headers.clone();
                    stream.insert(respond.send_response(head, false).map_err(|_| Stop::Gone)?)
                }
            };
            send_items(s, &answer, deadline).await?;
            if prepared.status != 0 {
                return Err(Stop::Rule(prepared));
            }
        }
    }
    .await;
    finish_stream(&mut respond, stream, result)
}

/// Ends a call that answers message by message: trailers after the
/// messages sent (OK, a rule's status or the engine's), or a whole
/// response when none was sent. Returns the status sent.
fn finish_stream(
    respond: &mut SendResponse<Bytes>,
    stream: Option<SendStream<Bytes>>,
    result: Result<(), Stop<'_>>,
) -> u8 {
    let ok = status_response(0, "");
    match (result, stream) {
        (Err(Stop::Gone), _) => Code::Canceled as u8,
        (Ok(()), Some(mut s)) => {
            let _ = s.send_trailers(ok.trailers.clone());
            0
        }
        (Ok(()), None) => {
            let _ = send(respond, &Answer::of(&ok));
            0
        }
        (Err(Stop::Rule(p)), Some(mut s)) => {
            let _ = s.send_trailers(p.trailers.clone());
            p.status
        }
        (Err(Stop::Rule(p)), None) => {
            let _ = send(respond, &Answer::of(p));
            p.status
        }
        (Err(Stop::Status(e)), Some(mut s)) => {
            let _ = s.send_trailers(status_answer(&e).trailers);
            e.code as u8
        }
        (Err(Stop::Status(e)), None) => {
            let _ = send_status(respond, &e);
            e.code as u8
        }
    }
}

fn send(respond: &mut SendResponse<Bytes>, answer: &Answer) -> Result<(), h2::Error> {
    let prepared = answer.prepared;
    let mut head = Response::new(());
    if prepared.status != 0 {
        *head.headers_mut() = prepared.trailers_only.clone();
        respond.send_response(head, true)?;
        return Ok(());
    }
    *head.headers_mut() = prepared.headers.clone();
    let mut stream = respond.send_response(head, false)?;
    stream.send_data(answer.body.clone(), false)?;
    stream.send_trailers(prepared.trailers.clone())
}

/// Sends a response of at most one message: trailers-only for an error;
/// otherwise headers, the message once the client's window lets it go out,
/// and trailers. A client whose window stays shut gets DEADLINE_EXCEEDED at
/// its deadline instead of the message, rather than the message waiting in
/// h2's buffers for as long as the connection lives.
/// Returns the status sent (CANCELLED when the client went away).
async fn send_one(respond: &mut SendResponse<Bytes>, answer: &Answer<'_>, deadline: Option<Instant>) -> u8 {
    let prepared = answer.prepared;
    let gone = Code::Canceled as u8;
    if prepared.status != 0 {
        let _ = send(respond, answer);
        return prepared.status;
    }
    let mut head = Response::new(());
    *head.headers_mut() = prepared.headers.clone();
    let Ok(mut stream) = respond.send_response(head, false) else { return gone };
    let (code, trailers) = match wait_capacity(&mut stream, answer.body.len(), deadline).await {
        Ok(()) => match stream.send_data(answer.body.clone(), false) {
            Ok(()) => (prepared.status, prepared.trailers.clone()),
            Err(_) => return gone,
        },
        Err(Stop::Status(e)) => (e.code as u8, status_answer(&e).trailers),
        Err(_) => return gone,
    };
    let _ = stream.send_trailers(trailers);
    code
}

fn send_status(respond: &mut SendResponse<Bytes>, status: &Status) -> Result<(), h2::Error> {
    send(respond, &Answer::of(&status_answer(status)))
}

/// Sends a streaming response: headers, the items (passes, order, pauses
/// as the rule says), then the trailers; for an error status, the error
/// after `error_after` items.
async fn send_stream(respond: &mut SendResponse<Bytes>, answer: &Answer<'_>, deadline: Option<Instant>) -> u8 {
    let prepared = answer.prepared;
    let mut head = Response::new(());
    *head.headers_mut() = prepared.headers.clone();
    let Ok(mut stream) = respond.send_response(head, false) else { return Code::Canceled as u8 };
    let (code, trailers) = match send_items(&mut stream, answer, deadline).await {
        Ok(()) => (prepared.status, prepared.trailers.clone()),
        Err(Stop::Status(e)) => (e.code as u8, status_answer(&e).trailers),
        Err(Stop::Rule(p)) => (p.status, p.trailers.clone()),
        Err(Stop::Gone) => return Code::Canceled as u8,
    };
    let _ = stream.send_trailers(trailers);
    code
}

/// Sends the messages of one response, honouring flow control: each message
/// waits until the client has window for it, so a slow reader is never
/// answered by unbounded buffering here.
async fn send_items<'m>(
    stream: &mut SendStream<Bytes>,
    answer: &Answer<'m>,
    deadline: Option<Instant>,
) -> Result<(), Stop<'m>> {
    let prepared = answer.prepared;
    let items = answer.messages();
    // An error without stream items has no message to send before it.
    if prepared.stream.is_empty() && prepared.status != 0 {
        return Ok(());
    }
    let limit = if prepared.status != 0 { Some(prepared.error_after as u64) } else { None };
    let mut sent = 0u64;
    let mut pass = 0u32;
    let mut order: Vec<usize> = (0..items.len()).collect();
    loop {
        if prepared.stream_repeat != 0 && pass >= prepared.stream_repeat && limit.is_none() {
            return Ok(());
        }
        pass += 1;
        if prepared.stream_random_order {
            crate::rng::shuffle(&mut order);
        }
        for &i in &order {
            if limit.is_some_and(|l| sent >= l) {
                return Ok(());
            }
            if sent > 0 && !prepared.stream_delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(prepared.stream_delay) => {}
                    _ = poll_fn(|cx| stream.poll_reset(cx)) => return Err(Stop::Gone),
                    _ = sleep_until(deadline) => return Err(deadline_exceeded().into()),
                }
            }
            let item = items[i].clone();
            wait_capacity(stream, item.len(), deadline).await?;
            stream.send_data(item, false).map_err(|_| Stop::Gone)?;
            sent += 1;
        }
    }
}

/// Waits until the client's flow-control window lets a message of `len`
/// bytes go out (or its first 16 KiB, for big ones), so that a client that
/// does not read holds a waiting call, ended by its deadline or its reset,
/// instead of making h2 buffer for it. When the window is open this returns
/// at once, without yielding.
async fn wait_capacity<'m>(
    stream: &mut SendStream<Bytes>,
    len: usize,
    deadline: Option<Instant>,
) -> Result<(), Stop<'m>> {
    // The answer counts as held until it is handed to h2.
    let _held = outflow::hold(len)?;
    tokio::select! {
        _ = outflow::room(len) => {}
        _ = sleep_until(deadline) => return Err(deadline_exceeded().into()),
    }
    let want = len.min(16 << 10);
    stream.reserve_capacity(len);
    while stream.capacity() < want {
        tokio::select! {
            cap = poll_fn(|cx| stream.poll_capacity(cx)) => match cap {
                Some(Ok(_)) => {}
                _ => return Err(Stop::Gone),
            },
            _ = sleep_until(deadline) => return Err(deadline_exceeded().into()),
        }
    }
    Ok(())
}

fn send_http_error(respond: &mut SendResponse<Bytes>, status: StatusCode) -> Result<(), h2::Error> {
    let mut head = Response::new(());
    *head.status_mut() = status;
    respond.send_response(head, true).map(|_| ())
}
