//! HTTP/1.1 on the gRPC port, on hyper's server connection: gRPC-Web and
//! Connect calls from browsers and HTTP/1.1 clients (gRPC itself needs
//! HTTP/2 and is refused with 415). Each request becomes a call driven by
//! [`crate::call::drive`]; its response body *is* the call: hyper polls
//! the body, the body polls the call, so the call advances only as fast
//! as the client reads, and at most [`HIGH`] bytes wait in between.
//!
//! Bounds: hyper's header limits (`max_buf_size`), the time to send a
//! request head (`--handshake-timeout-ms`), idle keep-alive connections
//! (`--idle-timeout-ms`), a client that stops reading
//! (`--write-timeout-ms`), request messages (`--max-recv-bytes`) and the
//! bytes held for requests (`--max-buffered-bytes`).

use crate::call::drive::{self, Call, Gone};
use crate::call::forward::{self, Forward};
use crate::config::Config;
use crate::observe::record::CallRecord;
use crate::protocol::grpc::{Code, Status};
use crate::protocol::head::{self, Refusal, Setup};
use crate::protocol::reader::{Chunks, Reader, Source};
use crate::protocol::responder::{Responder, Sink};
use crate::protocol::{self, cors, Codec, Dialect, Head};
use crate::served::generation::Generation;
use crate::served::{status_answer, Prepared};
use crate::state::State;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

/// Response bytes queued for the socket above which a call waits.
pub const HIGH: usize = 64 << 10;

/// Largest request head (and hyper's read buffer).
const MAX_HEAD: usize = 64 << 10;

/// What every request of a connection shares.
struct Ctx {
    state: Arc<State>,
    config: Rc<Config>,
    generation: RefCell<Arc<Generation>>,
    /// Requests in progress (for the idle check).
    active: Cell<usize>,
    last_active: Cell<Instant>,
}

impl Ctx {
    fn generation(&self) -> Arc<Generation> {
        let mut g = self.generation.borrow_mut();
        if g.number != self.state.number() {
            *g = self.state.current();
        }
        g.clone()
    }
}

/// Serves HTTP/1.1 requests on one connection until the client closes it,
/// it idles or stalls past its limits, or the server stops.
pub async fn serve<T>(io: T, state: Arc<State>, config: Rc<Config>, mut stop: watch::Receiver<bool>)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let watched = Watched::new(io);
    let activity = watched.activity.clone();
    let ctx = Rc::new(Ctx {
        generation: RefCell::new(state.current()),
        state,
        config: config.clone(),
        active: Cell::new(0),
        last_active: Cell::new(Instant::now()),
    });
    let service_ctx = ctx.clone();
    let service = hyper::service::service_fn(move |req| {
        let ctx = service_ctx.clone();
        async move { Ok::<_, Infallible>(handle(req, ctx).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Half-closed clients (the request sent, their side shut) still get
    // their answer.
    builder.max_buf_size(MAX_HEAD).timer(hyper_util::rt::TokioTimer::new()).keep_alive(true).half_close(true);
    builder.header_read_timeout(config.handshake_timeout);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(watched), service);
    tokio::pin!(conn);
    let tick = Duration::from_millis(250);
    let mut ticks = tokio::time::interval(tick);
    let mut draining = *stop.borrow();
    if draining {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("HTTP/1.1 connection ended: {e}");
                }
                return;
            }
            _ = stop.changed(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = ticks.tick() => {
                let now = Instant::now();
                if let (Some(t), Some(since)) = (config.write_timeout, activity.write_blocked_since.get()) {
                    if now.saturating_duration_since(since) >= t {
                        tracing::debug!("HTTP/1.1 client stopped reading; connection dropped");
                        return;
                    }
                }
                if ctx.active.get() == 0 {
                    let last = ctx.last_active.get().max(activity.last_read.get());
                    if config.idle_timeout.is_some_and(|t| now.saturating_duration_since(last) >= t) {
                        return;
                    }
                }
            }
        }
    }
}

/// Answers one request, with the CORS headers a page needs to read the
/// answer when it comes from a browser.
async fn handle(req: Request<Incoming>, ctx: Rc<Ctx>) -> Response<CallBody> {
    let origin = req.headers().get(http::header::ORIGIN).cloned();
    if req.method() == Method::OPTIONS {
        return preflight(&req, &ctx.config, origin.as_ref());
    }
    let mut r = match transfer_coding_refused(&req) {
        Some(r) => r,
        None => call(req, &ctx).await,
    };
    if let Some(origin) = origin {
        cors::decorate(&ctx.config.cors_origins, origin.as_bytes(), r.headers_mut());
    }
    r
}

/// A request body in a transfer coding other than chunked alone (RFC 9112
/// §6.1: such a body cannot be read, so the connection cannot go on):
/// 501, and the connection closes.
fn transfer_coding_refused(req: &Request<Incoming>) -> Option<Response<CallBody>> {
    let te = req.headers().get_all(http::header::TRANSFER_ENCODING);
    let mut codings = te.iter().flat_map(|v| v.as_bytes().split(|&b| b == b',')).map(<[u8]>::trim_ascii);
    let only_chunked = match (codings.next(), codings.next()) {
        (None, _) => true,
        (Some(c), None) => c.eq_ignore_ascii_case(b"chunked"),
        _ => false,
    };
    if only_chunked {
        return None;
    }
    let mut r = plain(StatusCode::NOT_IMPLEMENTED);
    r.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    Some(r)
}

/// The answer to `OPTIONS`: a CORS preflight, or the methods served.
fn preflight(req: &Request<Incoming>, config: &Config, origin: Option<&HeaderValue>) -> Response<CallBody> {
    let mut r = plain(StatusCode::NO_CONTENT);
    let Some(origin) = origin else {
        r.headers_mut().insert(http::header::ALLOW, HeaderValue::from_static("POST, GET, OPTIONS"));
        return r;
    };
    let requested = req.headers().get(http::header::ACCESS_CONTROL_REQUEST_HEADERS).map(HeaderValue::as_bytes);
    match cors::preflight(&config.cors_origins, origin.as_bytes(), requested) {
        Ok(h) => *r.headers_mut() = h,
        Err(h) => {
            *r.headers_mut() = h;
            *r.status_mut() = StatusCode::FORBIDDEN;
        }
    }
    if !req.body().is_end_stream() {
        r.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// Answers one call.
async fn call(req: Request<Incoming>, ctx: &Rc<Ctx>) -> Response<CallBody> {
    let (parts, body) = req.into_parts();
    let mut body = Incoming1::new(body);
    let generation = ctx.generation();
    let (path, query) = (parts.uri.path(), parts.uri.query());
    let setup = head::check(&parts.method, path, query, &parts.headers, &generation.served, &ctx.config, false);
    let setup = match setup {
        Ok(s) => s,
        Err(refusal) => {
            let mut r = refuse(refusal);
            // Sent once the body has been read (up to a bound), so the
            // connection can serve the next request.
            if !body.drain(DRAIN_LIMIT).await {
                r.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            return r;
        }
    };
    let Setup { dialect, method: index, deadline, encoding, compress, query } = setup;
    let path = path.to_string();
    let pipe = Rc::new(RefCell::new(Pipe::default()));
    let sink = PipeSink(pipe.clone());
    let config = ctx.config.clone();
    let state = ctx.state.clone();
    ctx.active.set(ctx.active.get() + 1);
    let guard = Active(ctx.clone());
    let done = body.done.clone();
    let headers = parts.headers;
    let driver = async move {
        let _guard = guard;
        let generation = generation;
        let method = generation.served.at(index);
        let stats = config.metrics.then(|| generation.stats.worker(crate::observe::metrics::worker()));
        let mut record = CallRecord::start(stats, state.journal.as_ref(), &generation, index, dialect.name(), &headers);
        let source = match query {
            Some(m) => Source::Query(Some(m)),
            None => Source::Body(body),
        };
        let mut input = Reader::new(dialect, source, encoding, config.max_recv_message, config.max_buffered);
        let json = dialect.codec == Codec::Json;
        if json {
            input.decode = method.json.clone().map(protocol::json_decoder);
        }
        let mut out = Responder::new(dialect, sink);
        out.compress = compress;
        let ok = &generation.served.ok;
        let upstream = config.upstream.as_ref().and_then(|u| u.route(&path)).map(|upstream| {
            let json = method.json.as_ref().filter(|_| json);
            let (metadata, max_held) = (forward::metadata_of(&headers), config.max_buffered);
            let content_type = dialect.content_type();
            let path = path.as_str().into();
            Box::new(Forward { upstream, path, metadata, deadline, json, max_held, content_type, encoding })
        });
        let call = Call { method, metadata: &headers, deadline, ok, json, record: &mut record, upstream };
        drive::run(call, &mut input, &mut out).await;
    };
    respond(pipe, Box::pin(driver), done).await
}

/// Request body bytes read and dropped so that the connection can serve
/// the next request after a refusal.
const DRAIN_LIMIT: usize = 64 << 10;

/// Counts a request in progress for its connection's idle check.
struct Active(Rc<Ctx>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get() - 1);
        self.0.last_active.set(Instant::now());
    }
}

/// Runs the call until its head is known, then hands hyper a body that
/// runs the rest.
async fn respond(
    pipe: Rc<RefCell<Pipe>>,
    mut driver: Pin<Box<dyn Future<Output = ()>>>,
    request_done: Rc<Cell<bool>>,
) -> Response<CallBody> {
    let finished = poll_fn(|cx| {
        if pipe.borrow().head.is_some() {
            return Poll::Ready(false);
        }
        match driver.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(true),
            Poll::Pending if pipe.borrow().head.is_some() => Poll::Ready(false),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    let head = pipe.borrow_mut().head.take();
    let Some(head) = head else {
        // The call ended without a word (aborted): close the connection.
        let mut r = plain(StatusCode::INTERNAL_SERVER_ERROR);
        r.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    };
    let body = CallBody { driver: (!finished).then_some(driver), pipe };
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::OK);
    *r.headers_mut() = head.headers;
    if !request_done.get() {
        // The client may still be sending: this response ends the
        // connection.
        r.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// A response with no body.
fn plain(status: StatusCode) -> Response<CallBody> {
    let mut r = Response::new(CallBody::empty());
    *r.status_mut() = status;
    r
}

/// 415, naming the content types served over HTTP/1.1.
fn unsupported_media_type() -> Response<CallBody> {
    let mut r = plain(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    r.headers_mut().insert("accept-post", HeaderValue::from_static(head::ACCEPT_POST));
    r
}

/// The response refusing a request.
fn refuse(refusal: Refusal) -> Response<CallBody> {
    match refusal {
        Refusal::Http(405) => method_not_allowed(),
        Refusal::Http(_) => unsupported_media_type(),
        Refusal::Status(dialect, status) => refused(dialect, &status_answer(&status)),
    }
}

/// A call refused before it started, in its protocol's terms.
fn refused(dialect: Dialect, p: &Prepared) -> Response<CallBody> {
    let pipe = Rc::new(RefCell::new(Pipe::default()));
    Responder::new(dialect, PipeSink(pipe.clone())).refuse(p);
    let head = pipe.borrow_mut().head.take().unwrap_or(Head { status: 500, headers: HeaderMap::new() });
    let mut r = Response::new(CallBody { driver: None, pipe });
    *r.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::OK);
    *r.headers_mut() = head.headers;
    r
}

/// What a call has produced and the body has not yet handed to hyper.
#[derive(Default)]
struct Pipe {
    head: Option<Head>,
    frames: VecDeque<Frame<Bytes>>,
    queued: usize,
    finished: bool,
    aborted: bool,
    waiter: Option<Waker>,
}

/// The call's side of the pipe.
struct PipeSink(Rc<RefCell<Pipe>>);

impl Sink for PipeSink {
    fn head(&mut self, head: Head) {
        self.0.borrow_mut().head = Some(head);
    }

    fn data(&mut self, data: Bytes) {
        let mut p = self.0.borrow_mut();
        p.queued += data.len();
        p.frames.push_back(Frame::data(data));
    }

    fn ready(&mut self, _len: usize) -> impl Future<Output = Result<(), Gone>> {
        let pipe = self.0.clone();
        poll_fn(move |cx| {
            let mut p = pipe.borrow_mut();
            if p.queued < HIGH {
                return Poll::Ready(Ok(()));
            }
            p.waiter = Some(cx.waker().clone());
            Poll::Pending
        })
    }

    fn finish(&mut self, trailers: Option<HeaderMap>) {
        let mut p = self.0.borrow_mut();
        if let Some(t) = trailers {
            p.frames.push_back(Frame::trailers(t));
        }
        p.finished = true;
    }

    fn abort(&mut self) {
        self.0.borrow_mut().aborted = true;
    }
}

/// A response body that runs its call as hyper asks for more.
pub struct CallBody {
    driver: Option<Pin<Box<dyn Future<Output = ()>>>>,
    pipe: Rc<RefCell<Pipe>>,
}

impl CallBody {
    fn empty() -> Self {
        let pipe = Pipe { finished: true, ..Pipe::default() };
        CallBody { driver: None, pipe: Rc::new(RefCell::new(pipe)) }
    }
}

impl Body for CallBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        loop {
            {
                let mut p = self.pipe.borrow_mut();
                if let Some(f) = p.frames.pop_front() {
                    if let Some(d) = f.data_ref() {
                        p.queued -= d.len();
                    }
                    if p.queued < HIGH {
                        if let Some(w) = p.waiter.take() {
                            w.wake();
                        }
                    }
                    return Poll::Ready(Some(Ok(f)));
                }
                if p.aborted {
                    return Poll::Ready(Some(Err(io::Error::other("call aborted by an injected fault"))));
                }
                if p.finished {
                    return Poll::Ready(None);
                }
            }
            let Some(driver) = self.driver.as_mut() else { return Poll::Ready(None) };
            match driver.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.driver = None;
                    self.pipe.borrow_mut().finished = true;
                }
                Poll::Pending if self.pipe.borrow().frames.is_empty() && !self.pipe.borrow().aborted => {
                    return Poll::Pending
                }
                Poll::Pending => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let p = self.pipe.borrow();
        p.finished && p.frames.is_empty() && !p.aborted
    }

    fn size_hint(&self) -> SizeHint {
        let p = self.pipe.borrow();
        if self.driver.is_none() && p.finished && !p.aborted && p.frames.iter().all(Frame::is_data) {
            return SizeHint::with_exact(p.queued as u64);
        }
        SizeHint::default()
    }
}

/// 405, naming the methods served.
fn method_not_allowed() -> Response<CallBody> {
    let mut r = plain(StatusCode::METHOD_NOT_ALLOWED);
    r.headers_mut().insert(http::header::ALLOW, HeaderValue::from_static("POST, GET, OPTIONS"));
    r
}

/// hyper's request body as [`Chunks`], noting when it has been read to
/// its end (a response to a request whose body was left unread must
/// close the connection: the client may still be sending it).
struct Incoming1 {
    body: Incoming,
    done: Rc<Cell<bool>>,
}

impl Incoming1 {
    fn new(body: Incoming) -> Self {
        let done = Rc::new(Cell::new(body.is_end_stream()));
        Incoming1 { body, done }
    }

    /// Reads and drops the body, up to `limit` bytes; whether it ended.
    async fn drain(&mut self, limit: usize) -> bool {
        let mut seen = 0usize;
        while seen <= limit {
            match self.chunk().await {
                Ok(Some(c)) => seen += c.len(),
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
        false
    }
}

impl Chunks for Incoming1 {
    async fn chunk(&mut self) -> Result<Option<Bytes>, Status> {
        if self.done.get() {
            return Ok(None);
        }
        loop {
            let frame = poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)).await;
            match frame {
                None => {
                    self.done.set(true);
                    return Ok(None);
                }
                Some(Err(e)) => {
                    return Err(Status::new(Code::InvalidArgument, format!("request body is malformed: {e}")))
                }
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        if !d.is_empty() {
                            return Ok(Some(d));
                        }
                    }
                }
            }
        }
    }
}

/// The socket's activity, for the idle and stall checks.
struct Activity {
    last_read: Cell<Instant>,
    write_blocked_since: Cell<Option<Instant>>,
}

/// A socket that notes when it last read and since when its writes wait.
struct Watched<T> {
    io: T,
    activity: Rc<Activity>,
}

impl<T> Watched<T> {
    fn new(io: T) -> Self {
        Watched {
            io,
            activity: Rc::new(Activity { last_read: Cell::new(Instant::now()), write_blocked_since: Cell::new(None) }),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.last_read.set(Instant::now());
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        self.note(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T> Watched<T> {
    fn note<R>(&self, r: &Poll<R>) {
        match r {
            Poll::Pending => {
                if self.activity.write_blocked_since.get().is_none() {
                    self.activity.write_blocked_since.set(Some(Instant::now()));
                }
            }
            Poll::Ready(_) => self.activity.write_blocked_since.set(None),
        }
    }
}
