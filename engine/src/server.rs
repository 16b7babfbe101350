//! The serving side: thread-per-core workers speaking gRPC over HTTP/2
//! (cleartext) with the `h2` crate.
//!
//! Layout: one acceptor thread hands accepted sockets round-robin to N worker
//! threads. Each worker runs a current-thread runtime; each connection is one
//! task on one worker, and all of its streams are futures polled inside that
//! task (no task per stream). Workers share only the immutable [`Served`]
//! plan; nothing on the request path takes a lock.

use crate::grpc::{self, Code, Status};
use crate::matcher;
use crate::served::{status_response, Prepared, Served};
use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use h2::RecvStream;
use http::{HeaderMap, Request, Response, StatusCode};
use std::future::poll_fn;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Limits and behaviour of the server. The defaults suit load tests.
#[derive(Debug, Clone)]
pub struct Config {
    /// Worker threads; 0 means one per available core.
    pub workers: usize,
    /// Largest request message accepted, from its length prefix.
    pub max_recv_message: usize,
    /// SETTINGS_MAX_CONCURRENT_STREAMS advertised to clients.
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE advertised to clients.
    pub max_header_list_size: u32,
    /// Initial stream window; the connection window is four times this.
    pub window: u32,
    /// How long in-flight calls may take to finish after shutdown starts.
    pub drain_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workers: 0,
            max_recv_message: 4 << 20,
            max_concurrent_streams: 1024,
            max_header_list_size: 16 << 10,
            window: 1 << 20,
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// A running server. Dropping it does not stop it; call [`Server::shutdown`].
pub struct Server {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Starts serving on an already-bound listener (bind port 0 in tests).
    pub fn start(listener: TcpListener, served: Arc<Served>, config: Config) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let workers = match config.workers {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        };
        let (stop, stop_rx) = watch::channel(false);
        let mut senders = Vec::with_capacity(workers);
        let mut threads = Vec::with_capacity(workers + 1);
        for i in 0..workers {
            let (tx, rx) = mpsc::unbounded_channel::<std::net::TcpStream>();
            senders.push(tx);
            let (served, config, stop_rx) = (served.clone(), config.clone(), stop_rx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("wirestub-worker-{i}"))
                    .spawn(move || worker(rx, served, config, stop_rx))?,
            );
        }
        let acceptor_stop = stop_rx.clone();
        threads.push(
            std::thread::Builder::new()
                .name("wirestub-acceptor".into())
                .spawn(move || acceptor(listener, senders, acceptor_stop))?,
        );
        Ok(Server { addr, stop, threads })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, sends GOAWAY on every connection, lets in-flight
    /// calls finish (up to the drain timeout) and joins every thread.
    pub fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("failed to build a tokio runtime")
}

fn acceptor(
    listener: TcpListener,
    workers: Vec<mpsc::UnboundedSender<std::net::TcpStream>>,
    mut stop: watch::Receiver<bool>,
) {
    runtime().block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot use listener: {e}");
                return;
            }
        };
        let mut next = 0;
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let Ok(stream) = stream.into_std() else { continue };
                        let _ = workers[next].send(stream);
                        next = (next + 1) % workers.len();
                    }
                    Err(e) => {
                        // Out of file descriptors and similar: back off
                        // rather than spin.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    });
}

fn worker(
    mut sockets: mpsc::UnboundedReceiver<std::net::TcpStream>,
    served: Arc<Served>,
    config: Config,
    mut stop: watch::Receiver<bool>,
) {
    let local = tokio::task::LocalSet::new();
    let config = std::rc::Rc::new(config);
    runtime().block_on(local.run_until(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                socket = sockets.recv() => match socket {
                    Some(s) => {
                        connections.spawn_local(connection(s, served.clone(), config.clone(), stop.clone()));
                    }
                    None => break,
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        let drain = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(config.drain_timeout, drain).await.is_err() {
            tracing::warn!("drain timeout passed; closing remaining connections");
        }
    }));
}

async fn connection(
    socket: std::net::TcpStream,
    served: Arc<Served>,
    config: std::rc::Rc<Config>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(socket) = tokio::net::TcpStream::from_std(socket) else { return };
    let _ = socket.set_nodelay(true);
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(config.window)
        .initial_connection_window_size(config.window.saturating_mul(4))
        .max_concurrent_streams(config.max_concurrent_streams)
        .max_header_list_size(config.max_header_list_size);
    let mut conn = match builder.handshake::<_, Bytes>(socket).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("handshake failed: {e}");
            return;
        }
    };
    let served = &*served;
    let config = &*config;
    let mut streams = FuturesUnordered::new();
    let mut draining = *stop.borrow();
    if draining {
        conn.graceful_shutdown();
    }
    loop {
        tokio::select! {
            _ = stop.changed(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
            accepted = conn.accept() => match accepted {
                Some(Ok((request, respond))) => streams.push(call(served, config, request, respond)),
                Some(Err(e)) => {
                    tracing::debug!("connection error: {e}");
                    break;
                }
                None => break,
            },
            Some(()) = streams.next(), if !streams.is_empty() => {}
        }
    }
}

/// Serves one call to completion. Failures to send mean the client went
/// away; there is nobody left to tell.
async fn call(served: &Served, config: &Config, request: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
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
        let _ = send(&mut respond, &status_response(s.code as u8, &s.message));
        return;
    }
    let path = parts.uri.path();
    let Some(method) = served.method(path) else {
        let s = Status::new(Code::Unimplemented, format!("unknown method {path}"));
        let _ = send(&mut respond, &status_response(s.code as u8, &s.message));
        return;
    };
    if !Served::is_unary(method) {
        let s = Status::new(
            Code::Unimplemented,
            format!("{} is a {} method; this version serves unary methods only", &path[1..], method.plan.kind.name()),
        );
        let _ = send(&mut respond, &status_response(s.code as u8, &s.message));
        return;
    }
    let deadline = match parts.headers.get("grpc-timeout") {
        None => None,
        Some(v) => match grpc::parse_timeout(v.as_bytes()) {
            Some(t) => Some(Instant::now() + t),
            None => {
                let s = Status::new(Code::Internal, "malformed grpc-timeout header");
                let _ = send(&mut respond, &status_response(s.code as u8, &s.message));
                return;
            }
        },
    };

    // Everything from here on runs under the call's deadline and stops early
    // if the client resets the stream.
    let work = answer(method, config, &parts.headers, body);
    let reset = poll_fn(|cx| respond.poll_reset(cx));
    let outcome = tokio::select! {
        outcome = work => outcome,
        _ = reset => return,
        _ = sleep_until(deadline) => Err(Status::new(Code::DeadlineExceeded, "deadline exceeded")),
    };
    let _ = match outcome {
        Ok(prepared) => send(&mut respond, prepared),
        Err(s) => send(&mut respond, &status_response(s.code as u8, &s.message)),
    };
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Reads the request, picks the response and waits out its delay.
async fn answer<'s>(
    method: &'s crate::served::ServedMethod,
    config: &Config,
    headers: &HeaderMap,
    body: RecvStream,
) -> Result<&'s Prepared, Status> {
    let message = read_unary(body, config.max_recv_message).await?;
    let prepared = match matcher::select(method, &message, headers) {
        Ok(Some(i)) => &method.responses[i as usize],
        Ok(None) => &method.no_match,
        Err(e) => return Err(Status::new(Code::Internal, format!("cannot parse request message: {e}"))),
    };
    if !prepared.delay.is_zero() {
        // A delay longer than the deadline is cut short by the caller, which
        // answers DEADLINE_EXCEEDED at the deadline.
        tokio::time::sleep(prepared.delay).await;
    }
    Ok(prepared)
}

/// Receives the one request message of a unary call, checking framing and
/// size as bytes arrive. The common case (the message in one DATA frame) is
/// zero-copy.
async fn read_unary(mut body: RecvStream, max: usize) -> Result<Bytes, Status> {
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
        return Err(Status::new(Code::Unimplemented, "compressed request messages are not supported"));
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

fn send(respond: &mut SendResponse<Bytes>, prepared: &Prepared) -> Result<(), h2::Error> {
    let mut head = Response::new(());
    *head.headers_mut() = prepared.headers.clone();
    if prepared.status != 0 {
        respond.send_response(head, true)?;
        return Ok(());
    }
    let mut stream = respond.send_response(head, false)?;
    stream.send_data(prepared.body.clone(), false)?;
    stream.send_trailers(prepared.trailers.clone())
}

fn send_http_error(respond: &mut SendResponse<Bytes>, status: StatusCode) -> Result<(), h2::Error> {
    let mut head = Response::new(());
    *head.status_mut() = status;
    respond.send_response(head, true).map(|_| ())
}
