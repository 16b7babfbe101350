//! The admin HTTP API on its own listener: status, services and rules,
//! health probes, Prometheus metrics, the request journal and plan reload.
//!
//! One thread with a current-thread tokio runtime accepts connections and
//! runs one task per connection (`admin/http.rs`: HTTP/1.1 with keep-alive,
//! bounded heads and bodies, deadlines, a connection limit that closes
//! idle connections to make room, probe slots). Each request is answered
//! by [`routes::handle`], a plain function of the parsed request: the
//! probes on the server's thread, everything else on the runtime's
//! blocking pool, since a reload may compile a whole plan and a journal
//! query may decode many messages. Nothing here is on the gRPC request
//! path.

mod http;
mod journal;
mod response;
pub mod routes;
mod ui;

use crate::state::State;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use routes::{handle, Response};

pub use http::DEFAULT_HEAD_TIMEOUT;

/// Routes served beside the built-in ones: the runtime API
/// (`crate::runtime::routes`), which needs the compiler.
pub trait Extension: Send + Sync {
    /// Answers a request no built-in route took, or None (404).
    fn handle(&self, state: &State, request: &Request<'_>) -> Option<Response>;
    /// What `/admin/status` shows of it, under `runtime`.
    fn status(&self) -> serde_json::Value;
}

/// A parsed admin request, for an [`Extension`].
pub struct Request<'a> {
    pub method: &'a str,
    /// The path's segments, percent-decoded.
    pub segments: &'a [&'a str],
    /// Query parameters, decoded, in order.
    pub query: &'a [(String, String)],
    /// Header fields, names in lower case.
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

impl Request<'_> {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The first value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Admin API options.
#[derive(Clone)]
pub struct Options {
    /// Requests other than the probes must carry `Authorization: Bearer
    /// TOKEN`. An empty token is the same as none.
    pub token: Option<String>,
    /// Time a new connection has to send a whole request head, and a
    /// request on a kept-alive connection from its first byte
    /// (`--admin-head-timeout-ms`).
    pub head_timeout: Duration,
    /// More routes (the runtime API).
    pub extension: Option<Arc<dyn Extension>>,
    /// The upstream calls are forwarded to, for the status.
    pub upstream: Option<Arc<crate::config::Upstreams>>,
    /// The listener is on a loopback address: requests must name it
    /// (`Host`), see [`routes::foreign`]. Set by [`Admin::start`].
    pub loopback: bool,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .field("head_timeout", &self.head_timeout)
            .field("extension", &self.extension.is_some())
            .finish()
    }
}

impl Default for Options {
    fn default() -> Options {
        Options { token: None, head_timeout: DEFAULT_HEAD_TIMEOUT, extension: None, upstream: None, loopback: false }
    }
}

/// A running admin server.
pub struct Admin {
    addr: SocketAddr,
    stop: Arc<tokio::sync::Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Admin {
    /// Serves the admin API on `listener` from its own thread, and adds it
    /// to the state's listeners (kind `admin`). Dropping the `Admin` leaves
    /// it serving; [`Admin::shutdown`] stops it.
    pub fn start(listener: std::net::TcpListener, state: Arc<State>, mut options: Options) -> std::io::Result<Admin> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        options.loopback = addr.ip().is_loopback();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().max_blocking_threads(16).build()?;
        let listener = {
            let _context = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopped = stop.clone();
        let options = Arc::new(options);
        let thread_state = state.clone();
        let thread = std::thread::Builder::new().name("wirestub-admin".into()).spawn(move || {
            runtime.block_on(http::accept(listener, thread_state, options, stopped));
            runtime.shutdown_timeout(Duration::from_secs(1));
        })?;
        state.add_listener("admin", addr);
        Ok(Admin { addr, stop, thread: Some(thread) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes the open connections and waits for the
    /// thread (requests being answered get up to a second).
    pub fn shutdown(mut self) {
        self.stop.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::journal::fixture;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;

    /// Reads one response: status, lower-case headers, body.
    fn response(reader: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>, String) {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let status =
            line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').unwrap();
            headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
        }
        let len: usize =
            headers.iter().find(|(k, _)| k == "content-length").map(|(_, v)| v.parse().unwrap()).unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        (status, headers, String::from_utf8(body).unwrap())
    }

    #[test]
    fn serves_http_over_a_socket() {
        let state = Arc::new(fixture::state(4));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let admin =
            Admin::start(listener, state.clone(), Options { token: Some("t0k".into()), ..Options::default() }).unwrap();
        let addr = admin.local_addr();
        assert!(state.listeners().iter().any(|l| l.kind == "admin" && l.addr == addr));

        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        // Two pipelined requests on one keep-alive connection.
        writer
            .write_all(
                b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\nGET /admin/status HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer t0k\r\n\r\n",
            )
            .unwrap();
        let (status, _, body) = response(&mut reader);
        assert_eq!((status, body.as_str()), (200, "{\"status\":\"ok\"}\n"));
        let (status, headers, body) = response(&mut reader);
        assert_eq!(status, 200, "{body}");
        assert!(headers.contains(&("content-type".into(), "application/json".into())));
        assert!(body.contains("\"kind\":\"admin\""), "{body}");
        // No token: 401 with a challenge, and the connection stays usable.
        writer.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let (status, headers, _) = response(&mut reader);
        assert_eq!(status, 401);
        assert!(headers.iter().any(|(k, v)| k == "www-authenticate" && v.starts_with("Bearer")));
        // A body announced with Expect: 100-continue.
        let verify = br#"{"method": "demo.Greeter/SayHello", "times": 0}"#;
        let head = format!(
            "POST /admin/journal/verify HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer t0k\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            verify.len()
        );
        writer.write_all(head.as_bytes()).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "HTTP/1.1 100 Continue\r\n");
        reader.read_line(&mut line).unwrap();
        writer.write_all(verify).unwrap();
        let (status, _, body) = response(&mut reader);
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"ok\":true"), "{body}");
        // HEAD: the headers of GET, no body.
        writer.write_all(b"HEAD /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let mut head = String::new();
        loop {
            let mut l = String::new();
            reader.read_line(&mut l).unwrap();
            head.push_str(&l);
            if l == "\r\n" {
                break;
            }
        }
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && head.contains("Content-Length: 19\r\n"), "{head}");
        // Connection: close ends the connection after the answer.
        writer.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
        let (status, headers, _) = response(&mut reader);
        assert_eq!(status, 200);
        assert!(headers.contains(&("connection".into(), "close".into())));
        let mut rest = Vec::new();
        assert_eq!(reader.read_to_end(&mut rest).unwrap(), 0);

        // Chunked bodies are refused, and the connection closed.
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        writer
            .write_all(b"POST /admin/reload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            .unwrap();
        let (status, _, body) = response(&mut reader);
        assert_eq!(status, 411, "{body}");
        let mut rest = Vec::new();
        assert_eq!(reader.read_to_end(&mut rest).unwrap_or(0), 0);

        admin.shutdown();
        assert!(TcpStream::connect(addr).is_err(), "the listener is closed after shutdown");
    }
}
