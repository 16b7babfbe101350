//! The reference HTTP/2 stack: the same gRPC calls served through the `h2`
//! crate (`engine run --http2 h2`). The native stack ([`crate::transport::http2`]) is
//! the default; this one is kept as the reference the end-to-end cases
//! compare it with, and for anything the native stack is suspected of.
//!
//! Abuse resistance here is h2's own guards, set explicitly below.

use crate::budget::{Held, H2_CALL_COST};
use crate::call::drive::{self, Call, Gone, Inbound, Outbound, Report};
use crate::call::forward::{self, Forward};
use crate::call::{deadline_exceeded, sleep_until};
use crate::config::Config;
use crate::observe::record::CallRecord;
use crate::protocol::grpc::{Code, Status};
use crate::protocol::head::{self, Refusal};
use crate::protocol::reader::{Chunks, Reader, Source};
use crate::protocol::responder::{Responder, Sink};
use crate::protocol::{self, cors, Codec, Head};
use crate::served::generation::Generation;
use crate::served::{status_answer, status_response, Builtin, Prepared};
use crate::state::State;
use crate::transport::outflow;
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

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
                    {
                        // Taken apart here: a request moved into the call's
                        // future would be held there twice, whole and in parts.
                        let (parts, body) = request.into_parts();
                        streams.push(call(state, generation.clone(), config, parts, body, respond))
                    }
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

/// Serves one call to completion: the request head read as a call
/// ([`head::check`]), then the call driven by [`crate::call::drive`] (the
/// engine's own services, health and reflection, here). Failures to send
/// mean the client went away; there is nobody left to tell.
///
/// An `async move` block rather than an `async fn`: an async fn moves its
/// arguments into locals, so the request head would be held twice in
/// every call's future, idle ones included.
#[allow(clippy::manual_async_fn)] // see above: the future's size
fn call<'a>(
    state: &'a State,
    generation: Arc<Generation>,
    config: &'a Config,
    parts: http::request::Parts,
    body: RecvStream,
    respond: SendResponse<Bytes>,
) -> impl std::future::Future<Output = ()> + 'a {
    async move {
        let origin = parts.headers.get(http::header::ORIGIN);
        // A browser's call: every head carries the CORS headers.
        let cors = origin.filter(|_| parts.method != Method::OPTIONS).map(|o| (o.clone(), config.cors_origins.clone()));
        let out = Rc::new(RefCell::new(H2Out { respond, stream: None, head: None, cors }));
        if parts.method == Method::OPTIONS {
            let requested = parts.headers.get(http::header::ACCESS_CONTROL_REQUEST_HEADERS).map(HeaderValue::as_bytes);
            let head = match origin {
                None => {
                    let mut h = HeaderMap::new();
                    h.insert(http::header::ALLOW, HeaderValue::from_static("POST, GET, OPTIONS"));
                    Head { status: 204, headers: h }
                }
                Some(o) => match cors::preflight(&config.cors_origins, o.as_bytes(), requested) {
                    Ok(h) => Head { status: 204, headers: h },
                    Err(h) => Head { status: 403, headers: h },
                },
            };
            let mut sink = H2Sink(out);
            sink.head(head);
            sink.finish(None);
            return;
        }
        let served = &generation.served;
        let (path, query) = (parts.uri.path(), parts.uri.query());
        let head::Setup { dialect, method: index, deadline, encoding, compress, query } =
            match head::check(&parts.method, path, query, &parts.headers, served, config, true) {
                Ok(s) => s,
                Err(Refusal::Http(code)) => {
                    let mut h = HeaderMap::new();
                    match code {
                        405 => h.insert(http::header::ALLOW, HeaderValue::from_static("POST, GET, OPTIONS")),
                        _ => h.insert("accept-post", HeaderValue::from_static(head::ACCEPT_POST)),
                    };
                    let mut sink = H2Sink(out);
                    sink.head(Head { status: code, headers: h });
                    sink.finish(None);
                    return;
                }
                Err(Refusal::Status(dialect, status)) => {
                    let p = status_answer(&status);
                    let r = protocol::without_messages(dialect, &p.headers, &p.trailers);
                    let mut sink = H2Sink(out);
                    sink.head(r.head);
                    if !r.body.is_empty() {
                        sink.data(r.body);
                    }
                    sink.finish(None);
                    return;
                }
            };
        let method = served.at(index);
        // The call's state counts in the budget of bytes held for calls.
        let mut call_held = Held::new(config.max_buffered);
        if let Err(s) = call_held.grow(H2_CALL_COST) {
            let mut r = Responder::new(dialect, H2Sink(out));
            r.refuse(&status_answer(&s));
            return;
        }
        let headers = &parts.headers;
        let stats = config.metrics.then(|| generation.stats.worker(crate::observe::metrics::worker()));
        let journal = state.journal.as_ref().filter(|_| method.builtin.is_none());
        let mut record = CallRecord::start(stats, journal, &generation, index, dialect.name(), headers);
        let source = match query {
            Some(m) => Source::Query(Some(m)),
            None => Source::Body(H2Body(body)),
        };
        let mut input = Reader::new(dialect, source, encoding, config.max_recv_message, config.max_buffered);
        let json = dialect.codec == Codec::Json;
        if json {
            input.decode = method.json.clone().map(protocol::json_decoder);
        }
        let mut responder = Responder::new(dialect, H2Sink(out.clone()));
        responder.compress = compress;
        let work = async {
            match method.builtin {
                Some(b) => builtin(state, &generation, b, deadline, &mut input, &mut responder, &mut record).await,
                None => {
                    let upstream = config.upstream.as_ref().and_then(|u| u.route(path)).map(|upstream| {
                        let json = method.json.as_ref().filter(|_| json);
                        let metadata = forward::metadata_of(headers);
                        let max_held = config.max_buffered;
                        let content_type = dialect.content_type();
                        let f = Forward {
                            upstream,
                            path: path.into(),
                            metadata,
                            deadline,
                            json,
                            max_held,
                            content_type,
                            encoding,
                        };
                        Box::new(f)
                    });
                    let ok = &served.ok;
                    let call = Call { method, metadata: headers, deadline, ok, json, record: &mut record, upstream };
                    drive::run(call, &mut input, &mut responder).await
                }
            }
        };
        // A client's reset ends the call at once.
        let reset = poll_fn(|cx| out.borrow_mut().poll_reset(cx));
        tokio::select! {
            () = work => {}
            () = reset => {}
        }
    }
}

/// Health and reflection, answered by the engine itself.
async fn builtin<I: Inbound, O: Outbound>(
    state: &State,
    generation: &Generation,
    builtin: Builtin,
    deadline: Option<Instant>,
    input: &mut I,
    out: &mut O,
    record: &mut CallRecord<'_>,
) {
    let ok = &generation.served.ok;
    let framed = |m: &[u8]| Bytes::from(wirestub_plan::grpc_frame(m));
    let work = async {
        match builtin {
            Builtin::HealthCheck => {
                let message = input.next().await?.unwrap_or_default();
                let reply = state.health.check(&message)?;
                out.head(ok);
                let item = framed(&reply);
                if out.ready(item.len()).await.is_err() {
                    return Ok(None);
                }
                out.message(item);
                Ok(Some(status_response(0, "")))
            }
            Builtin::HealthWatch => {
                let message = input.next().await?.unwrap_or_default();
                let service = state.health.watched(&message)?;
                out.head(ok);
                let mut changes = state.health.subscribe();
                let mut last: Option<Bytes> = None;
                loop {
                    let now = state.health.status_of(&service);
                    if last.as_ref() != Some(&now) {
                        let item = framed(&now);
                        if out.ready(item.len()).await.is_err() {
                            return Ok(None);
                        }
                        out.message(item);
                        last = Some(now);
                    }
                    if state.is_draining() || changes.changed().await.is_err() {
                        break;
                    }
                }
                Ok(Some(status_response(Code::Unavailable as u8, "the server is shutting down")))
            }
            Builtin::Reflection => {
                let mut headed = false;
                while let Some(message) = input.next().await? {
                    let item = framed(&generation.reflection.answer(&message));
                    if !headed {
                        out.head(ok);
                        headed = true;
                    }
                    if out.ready(item.len()).await.is_err() {
                        return Ok(None);
                    }
                    out.message(item);
                }
                Ok(Some(status_response(0, "")))
            }
        }
    };
    let result: Result<Option<Prepared>, Status> = tokio::select! {
        r = work => r,
        _ = sleep_until(deadline) => Err(deadline_exceeded()),
    };
    let end = match result {
        Ok(None) => return,
        Ok(Some(p)) => p,
        Err(s) => status_answer(&s),
    };
    let message = end.trailers.get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    record.status(end.status, &message);
    out.end(&end);
}

/// h2's request body as [`Chunks`], its flow-control window given back as
/// the reader takes each piece.
struct H2Body(RecvStream);

impl Chunks for H2Body {
    async fn chunk(&mut self) -> Result<Option<Bytes>, Status> {
        match self.0.data().await {
            None => Ok(None),
            Some(Ok(chunk)) => {
                let _ = self.0.flow_control().release_capacity(chunk.len());
                Ok(Some(chunk))
            }
            Some(Err(e)) => Err(Status::new(Code::Internal, format!("request stream failed: {e}"))),
        }
    }
}

/// A call's response on h2: the head waits until the first body bytes or
/// the end (a response with neither is sent as one HEADERS frame that
/// ends the stream, as gRPC's trailers-only responses must be).
struct H2Out {
    respond: SendResponse<Bytes>,
    stream: Option<SendStream<Bytes>>,
    head: Option<Head>,
    /// A browser's origin and the origins allowed (CORS).
    cors: Option<(HeaderValue, Vec<String>)>,
}

impl H2Out {
    fn response(head: Head) -> Response<()> {
        let mut r = Response::new(());
        *r.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::OK);
        *r.headers_mut() = head.headers;
        r
    }

    /// Sends the head, if it is still waiting; the stream, once sent.
    fn stream(&mut self) -> Option<&mut SendStream<Bytes>> {
        if let Some(head) = self.head.take() {
            self.stream = self.respond.send_response(H2Out::response(head), false).ok();
        }
        self.stream.as_mut()
    }

    fn poll_reset(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let r = match &mut self.stream {
            Some(s) => s.poll_reset(cx),
            None => self.respond.poll_reset(cx),
        };
        r.map(|_| ())
    }
}

struct H2Sink(Rc<RefCell<H2Out>>);

impl Sink for H2Sink {
    fn head(&mut self, mut head: Head) {
        let mut o = self.0.borrow_mut();
        if let Some((origin, origins)) = &o.cors {
            cors::decorate(origins, origin.as_bytes(), &mut head.headers);
        }
        o.head = Some(head);
    }

    fn data(&mut self, data: Bytes) {
        if let Some(s) = self.0.borrow_mut().stream() {
            let _ = s.send_data(data, false);
        }
    }

    /// Waits until the client's flow-control window lets a message of
    /// `len` bytes go out (or its first 16 KiB, for big ones), and the
    /// connection's backlog is under its mark, so that a client that does
    /// not read holds a waiting call (ended by its deadline or its reset)
    /// instead of making h2 buffer for it. The answer counts as held
    /// meanwhile.
    async fn ready(&mut self, len: usize) -> Result<(), Gone> {
        let _held = outflow::hold(len).map_err(|_| Gone)?;
        outflow::room(len).await;
        let want = len.min(16 << 10);
        {
            let mut o = self.0.borrow_mut();
            let Some(s) = o.stream() else { return Err(Gone) };
            s.reserve_capacity(len);
        }
        poll_fn(|cx| {
            let mut o = self.0.borrow_mut();
            let Some(s) = o.stream.as_mut() else { return std::task::Poll::Ready(Err(Gone)) };
            loop {
                if s.capacity() >= want {
                    return std::task::Poll::Ready(Ok(()));
                }
                match s.poll_capacity(cx) {
                    std::task::Poll::Ready(Some(Ok(_))) => continue,
                    std::task::Poll::Ready(_) => return std::task::Poll::Ready(Err(Gone)),
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                }
            }
        })
        .await
    }

    fn finish(&mut self, trailers: Option<HeaderMap>) {
        let mut o = self.0.borrow_mut();
        if o.stream.is_none() && trailers.is_none() {
            if let Some(head) = o.head.take() {
                let _ = o.respond.send_response(H2Out::response(head), true);
                return;
            }
        }
        let Some(s) = o.stream() else { return };
        let _ = match trailers {
            Some(t) => s.send_trailers(t),
            None => s.send_data(Bytes::new(), true),
        };
    }

    fn abort(&mut self) {
        self.reset(h2::Reason::INTERNAL_ERROR.into());
    }

    fn reset(&mut self, code: u32) {
        let reason = h2::Reason::from(code);
        let mut o = self.0.borrow_mut();
        match &mut o.stream {
            Some(s) => s.send_reset(reason),
            None => o.respond.send_reset(reason),
        }
    }
}
