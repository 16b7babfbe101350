//! The serving side: thread-per-core workers speaking gRPC over HTTP/2
//! (cleartext) with the `h2` crate.
//!
//! Layout: one acceptor thread hands accepted sockets round-robin to N worker
//! threads. Each worker runs a current-thread runtime; each connection is one
//! task on one worker, and all of its streams are futures polled inside that
//! task (no task per stream). Workers share only the immutable [`Served`]
//! plan; nothing on the request path takes a lock.
//!
//! Abuse resistance lives at connection setup and in h2's own guards (see
//! [`Config`] and `connection`): the acceptor counts open connections and
//! closes those over `max_connections`; each connection must finish the
//! HTTP/2 handshake within `handshake_timeout` and is sent GOAWAY after
//! `idle_timeout` without a call; h2 enforces stream, header, reset and
//! buffer limits and answers floods with GOAWAY or RST_STREAM.

use crate::config::{Config, Stack};
use crate::state::State;
use crate::transport::sniff::{self, Version};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Connections the kernel may hold completed but not yet accepted (the
/// kernel caps it at `net.core.somaxconn`).
const ACCEPT_BACKLOG: i32 = 4096;

/// A listening socket on `addr` (the first address it resolves to) with a
/// deep accept queue, so that hundreds of clients connecting at once are
/// all accepted at once.
pub fn listen(addr: &str) -> io::Result<TcpListener> {
    use std::net::ToSocketAddrs;
    let addr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the address resolves to nothing"))?;
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(ACCEPT_BACKLOG)?;
    Ok(socket.into())
}

/// One open connection, counted against `max_connections` from accept to
/// the end of its task.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The sockets to serve gRPC on: cleartext, TLS, or both.
#[derive(Default)]
pub struct Listeners {
    pub plain: Option<TcpListener>,
    /// A listener whose connections start with a TLS handshake.
    pub tls: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
}

/// A running server. Dropping it does not stop it; call [`Server::shutdown`].
pub struct Server {
    plain: Option<SocketAddr>,
    tls: Option<SocketAddr>,
    state: Arc<State>,
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// An accepted connection on its way to a worker.
struct Accepted {
    socket: std::net::TcpStream,
    slot: Slot,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Server {
    /// Starts serving `state`'s current plan on the listeners (bind port 0
    /// in tests). The worker count is `state.workers`.
    pub fn start(listeners: Listeners, state: Arc<State>, config: Config) -> io::Result<Server> {
        let mut sockets = Vec::new();
        let (mut plain, mut tls) = (None, None);
        if let Some(l) = listeners.plain {
            l.set_nonblocking(true)?;
            let addr = l.local_addr()?;
            state.add_listener("grpc", addr);
            plain = Some(addr);
            sockets.push((l, None));
        }
        if let Some((l, tls_config)) = listeners.tls {
            l.set_nonblocking(true)?;
            let addr = l.local_addr()?;
            state.add_listener("grpc+tls", addr);
            tls = Some(addr);
            sockets.push((l, Some(tokio_rustls::TlsAcceptor::from(tls_config))));
        }
        if sockets.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no listener to serve on"));
        }
        if let Some(journal) = &state.journal {
            journal.set_limits(config.journal);
        }
        // A service named for validation that the plan lacks is most likely
        // a misspelling: said once, at start (a later plan may add it).
        let generation = state.current();
        for (service, _) in &config.validation_services {
            let prefix = format!("/{service}/");
            if !generation.served.methods.iter().any(|m| m.plan.path.starts_with(&prefix)) {
                tracing::warn!(%service, "--validation-for names a service the plan does not have");
            }
        }
        drop(generation);
        let workers = state.workers.max(1);
        let (stop, stop_rx) = watch::channel(false);
        let mut senders = Vec::with_capacity(workers);
        let mut threads = Vec::with_capacity(workers + 1);
        for i in 0..workers {
            let (tx, rx) = mpsc::unbounded_channel::<Accepted>();
            senders.push(tx);
            let (state, config, stop_rx) = (state.clone(), config.clone(), stop_rx.clone());
            threads.push(std::thread::Builder::new().name(format!("wirestub-worker-{i}")).spawn(move || {
                crate::call::raw::set_threshold(config.raw_threshold);
                crate::call::template::set_max_fill(config.max_fill);
                crate::call::validate::set_enabled(config.validation, &config.validation_services);
                crate::call::validate::set_source(config.validation_source);
                crate::call::validate::set_per_message(config.validation_per_message);
                if let Some(seed) = config.seed {
                    crate::rng::seed(seed.wrapping_add(i as u64));
                }
                crate::observe::metrics::set_worker(i);
                worker(rx, state, config, stop_rx)
            })?);
        }
        let acceptor_stop = stop_rx.clone();
        let max_connections = config.max_connections;
        threads.push(
            std::thread::Builder::new()
                .name("wirestub-acceptor".into())
                .spawn(move || acceptor(sockets, senders, max_connections, acceptor_stop))?,
        );
        Ok(Server { plain, tls, state, stop, threads })
    }

    /// The cleartext listener's address (the TLS one when there is none).
    pub fn local_addr(&self) -> SocketAddr {
        self.plain.or(self.tls).expect("a server has a listener")
    }

    /// The TLS listener's address.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Health goes NOT_SERVING, the server stops accepting, sends GOAWAY on
    /// every connection, lets in-flight calls finish (up to the drain
    /// timeout) and joins every thread.
    pub fn shutdown(self) {
        self.state.start_draining();
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
    listeners: Vec<(TcpListener, Option<tokio_rustls::TlsAcceptor>)>,
    workers: Vec<mpsc::UnboundedSender<Accepted>>,
    max_connections: usize,
    stop: watch::Receiver<bool>,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let workers = Arc::new(workers);
    runtime().block_on(async move {
        let local = tokio::task::LocalSet::new();
        for (listener, tls) in listeners {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("cannot use listener: {e}");
                    continue;
                }
            };
            let (open, next, workers, mut stop) = (open.clone(), next.clone(), workers.clone(), stop.clone());
            local.spawn_local(async move {
                let mut refusing = false;
                loop {
                    tokio::select! {
                        _ = stop.changed() => break,
                        accepted = listener.accept() => match accepted {
                            Ok((stream, peer)) => {
                                // Counted before the check, so that the slot's drop
                                // undoes it on every path.
                                let slot = Slot(open.clone());
                                if open.fetch_add(1, Ordering::Relaxed) >= max_connections {
                                    // Closed at once, without a word: no HTTP/2 has
                                    // been spoken yet. Logged when refusing starts,
                                    // not per connection, so a flood cannot fill logs.
                                    if !refusing {
                                        tracing::warn!("{max_connections} connections open: closing new ones");
                                    }
                                    refusing = true;
                                    tracing::debug!(%peer, "connection over --max-connections closed");
                                    continue;
                                }
                                refusing = false;
                                let Ok(socket) = stream.into_std() else { continue };
                                let n = next.fetch_add(1, Ordering::Relaxed) % workers.len();
                                let _ = workers[n].send(Accepted { socket, slot, tls: tls.clone() });
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
        local.await;
    });
}

fn worker(
    mut sockets: mpsc::UnboundedReceiver<Accepted>,
    state: Arc<State>,
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
                    Some(accepted) => {
                        connections.spawn_local(connection(accepted, state.clone(), config.clone(), stop.clone()));
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

/// Drives one connection on the configured HTTP/2 stack, after the TLS
/// handshake for a TLS listener. `slot` holds its place under
/// `max_connections` until the task ends.
async fn connection(accepted: Accepted, state: Arc<State>, config: std::rc::Rc<Config>, stop: watch::Receiver<bool>) {
    let Accepted { socket, slot, tls } = accepted;
    let _slot = slot;
    let Ok(socket) = tokio::net::TcpStream::from_std(socket) else { return };
    let _ = socket.set_nodelay(true);
    let Some(tls) = tls else {
        return serve(socket, None, state, config, stop).await;
    };
    let handshake = tls.accept(socket);
    let stream = match config.handshake_timeout {
        Some(t) => match tokio::time::timeout(t, handshake).await {
            Ok(r) => r,
            Err(_) => {
                tracing::debug!("TLS handshake timed out");
                return;
            }
        },
        None => handshake.await,
    };
    match stream {
        Ok(stream) => {
            let version = match stream.get_ref().1.alpn_protocol() {
                Some(b"h2") => Some(Version::Http2),
                Some(b"http/1.1") => Some(Version::Http1),
                _ => None,
            };
            serve(stream, version, state, config, stop).await
        }
        // A client that fails the handshake (bad or missing certificate,
        // no common protocol) is the client's problem: debug, not warn.
        Err(e) => tracing::debug!("TLS handshake failed: {e}"),
    }
}

/// Serves a connection in the HTTP version its first bytes (or TLS's
/// ALPN, when it settled it) say.
async fn serve<T>(
    mut io: T,
    version: Option<Version>,
    state: Arc<State>,
    config: std::rc::Rc<Config>,
    stop: watch::Receiver<bool>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (version, head) = match version {
        Some(v) => (v, bytes::BytesMut::new()),
        None => {
            let sniffed = sniff::sniff(&mut io);
            let sniffed = match config.handshake_timeout {
                Some(t) => match tokio::time::timeout(t, sniffed).await {
                    Ok(s) => s,
                    Err(_) => {
                        tracing::debug!("handshake timed out before the client's first bytes");
                        return;
                    }
                },
                None => sniffed.await,
            };
            match sniffed {
                Some(s) => s,
                None => return,
            }
        }
    };
    let io = sniff::Prefixed::new(head, io);
    match (version, config.stack) {
        (Version::Http1, _) => crate::transport::http1::serve(io, state, config, stop).await,
        (Version::Http2, Stack::Native) => crate::transport::http2::conn::serve(io, &state, &config, stop).await,
        (Version::Http2, Stack::H2) => crate::transport::h2_ref::connection(io, &state, &config, stop).await,
    }
}
