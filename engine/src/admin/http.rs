//! The admin API's HTTP/1.1 server: request heads parsed with `httparse`,
//! `Content-Length` bodies only, keep-alive (HTTP/1.1 by default, HTTP/1.0
//! on request) and `Connection: close`, `Expect: 100-continue`, pipelined
//! requests answered in order.
//!
//! Limits: heads up to [`MAX_HEAD`] bytes (431 beyond), bodies up to
//! [`MAX_BODY`] (413), chunked bodies refused (411; other transfer codings
//! 501). A new connection must send a whole request head within the head
//! timeout (`--admin-head-timeout-ms`, [`DEFAULT_HEAD_TIMEOUT`]) of being
//! accepted, or it is closed (408 once it has sent part of one); on a
//! keep-alive connection the next head may start up to [`IDLE_TIMEOUT`]
//! later, and must then be whole within the head timeout of its first
//! byte; a body must arrive within [`READ_TIMEOUT`] of its head. Any
//! refusal closes the connection, since the rest of what the client sent
//! cannot be trusted to start a request.
//!
//! Connections: at most [`MAX_CONNECTIONS`] at once. A connection that
//! comes when they are all taken closes the oldest one that has no request
//! in progress (idle first, then one still sending its head), so idle or
//! slow clients cannot lock the API out. When every connection is busy
//! with a request, up to [`PROBE_SLOTS`] more are accepted for the probes
//! only (`/healthz`, `/readyz`, `/metrics`; anything else gets 503), and
//! closed after their answer. The probes are answered on the server's own
//! thread; other routes on the blocking pool, journal queries at most
//! [`JOURNAL_QUERIES`] at a time, so the probes never wait behind them.

use super::journal;
use super::routes::{self, Response};
use super::Options;
use crate::state::State;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body.
pub const MAX_BODY: usize = 1024 * 1024;
/// Most header fields in a request.
const MAX_HEADERS: usize = 100;
/// Default time a new connection has to send a whole request head (and a
/// later request, from its first byte).
pub const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// A request's body must arrive within this time of its head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A keep-alive connection with no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Writing a response may take this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections beyond [`MAX_CONNECTIONS`], for the probes only, when every
/// other connection has a request in progress.
pub const PROBE_SLOTS: usize = 8;
/// Journal queries answered at once (each holds up to a page of JSON).
pub const JOURNAL_QUERIES: usize = 2;
/// How long a journal query waits for one of those; then 503.
const JOURNAL_QUERY_WAIT: Duration = Duration::from_secs(5);
/// How long a journal page may take to be written (the permit is held
/// meanwhile); then the connection is closed.
const JOURNAL_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a connection is in its request cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first byte of a request.
    Idle,
    /// Part of a request head received.
    Head,
    /// Reading a body, answering or writing.
    Busy,
}

#[derive(Debug)]
struct Conn {
    phase: Phase,
    /// When it entered its phase.
    since: Instant,
    /// In one of the probe slots.
    probe_only: bool,
    close: Arc<Notify>,
}

/// The open connections.
#[derive(Debug, Default)]
struct Table {
    conns: HashMap<u64, Conn>,
    next: u64,
}

impl Table {
    fn count(&self, probe_only: bool) -> usize {
        self.conns.values().filter(|c| c.probe_only == probe_only).count()
    }

    /// The connection to close to make room: the one idle longest, else
    /// the one that has been sending its head longest; never one with a
    /// request in progress.
    fn victim(&self, probe_only: bool) -> Option<u64> {
        self.conns
            .iter()
            .filter(|(_, c)| c.probe_only == probe_only && c.phase != Phase::Busy)
            .min_by_key(|(id, c)| (c.phase == Phase::Head, c.since, **id))
            .map(|(id, _)| *id)
    }

    fn evict(&mut self, id: u64) {
        if let Some(c) = self.conns.remove(&id) {
            c.close.notify_one();
        }
    }

    /// Makes room for a new connection: its id, whether it is for the
    /// probes only, and what tells it to close; None to refuse it.
    fn admit(&mut self, now: Instant) -> Option<(u64, bool, Arc<Notify>)> {
        let probe_only = if self.count(false) < MAX_CONNECTIONS {
            false
        } else if let Some(v) = self.victim(false) {
            self.evict(v);
            false
        } else if self.count(true) < PROBE_SLOTS {
            true
        } else {
            self.evict(self.victim(true)?);
            true
        };
        let id = self.next;
        self.next += 1;
        let close = Arc::new(Notify::new());
        self.conns.insert(id, Conn { phase: Phase::Idle, since: now, probe_only, close: close.clone() });
        Some((id, probe_only, close))
    }
}

/// A connection's entry in the table, removed when the connection ends.
struct Entry {
    table: Arc<Mutex<Table>>,
    id: u64,
    probe_only: bool,
    close: Arc<Notify>,
}

impl Entry {
    fn set(&self, phase: Phase) {
        let mut table = lock(&self.table);
        if let Some(c) = table.conns.get_mut(&self.id) {
            if c.phase != phase {
                c.phase = phase;
                c.since = Instant::now();
            }
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        lock(&self.table).conns.remove(&self.id);
    }
}

fn lock(table: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(|e| e.into_inner())
}

/// What every connection shares.
struct Shared {
    state: Arc<State>,
    options: Arc<Options>,
    journal_queries: Semaphore,
}

/// Accepts connections until `stop` is notified.
pub(super) async fn accept(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    options: Arc<Options>,
    stop: Arc<tokio::sync::Notify>,
) {
    let table = Arc::new(Mutex::new(Table::default()));
    let shared = Arc::new(Shared { state, options, journal_queries: Semaphore::new(JOURNAL_QUERIES) });
    loop {
        let accepted = tokio::select! {
            _ = stop.notified() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let Some((id, probe_only, close)) = lock(&table).admit(Instant::now()) else {
                    drop(stream);
                    continue;
                };
                let entry = Entry { table: table.clone(), id, probe_only, close };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    serve(stream, shared, entry).await;
                });
            }
            // Out of file descriptors and the like: wait a little rather
            // than spin.
            Err(e) => {
                tracing::warn!(error = %e, "admin API: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Head {
    pub method: String,
    /// The request target's path, still percent-encoded.
    pub path: String,
    /// The query string without `?`, still percent-encoded.
    pub query: String,
    /// Header names lower-case; values as text (invalid UTF-8 replaced).
    pub headers: Vec<(String, String)>,
    /// HTTP/1.x minor version.
    pub minor: u8,
    /// Bytes the head takes.
    pub len: usize,
    pub content_length: usize,
    /// The client asked to close after this request (or did not ask to
    /// keep an HTTP/1.0 connection open).
    pub close: bool,
    pub expect_continue: bool,
}

/// A refusal: an HTTP status and a message.
pub(super) type Refusal = (u16, String);

fn refuse(status: u16, message: impl Into<String>) -> Refusal {
    (status, message.into())
}

fn has_token(value: &str, token: &str) -> bool {
    value.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Parses a request head from the start of `buf`: `Ok(None)` while it is
/// incomplete, `Err` for a request to refuse.
pub(super) fn parse_head(buf: &[u8]) -> Result<Option<Head>, Refusal> {
    let window = &buf[..buf.len().min(MAX_HEAD)];
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(refuse(431, format!("the request head is larger than {MAX_HEAD} bytes")))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refuse(431, format!("the request has more than {MAX_HEADERS} header fields")))
        }
        Err(e) => return Err(refuse(400, format!("malformed request: {e}"))),
    };
    let method = req.method.unwrap_or("").to_string();
    let target = req.path.unwrap_or("");
    let minor = req.version.unwrap_or(1);
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).trim().to_string()))
        .collect();
    // Origin form, or absolute form (its scheme and authority dropped).
    let target = match target.find("://") {
        Some(i) if !target.starts_with('/') => {
            let rest = &target[i + 3..];
            rest.find(['/', '?']).map(|j| &rest[j..]).unwrap_or("/")
        }
        _ => target,
    };
    if !target.starts_with('/') && !target.starts_with('?') {
        return Err(refuse(400, format!("unsupported request target `{target}`")));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (if p.is_empty() { "/" } else { p }, q),
        None => (target, ""),
    };
    let path = path.split('#').next().unwrap_or(path);
    let query = query.split('#').next().unwrap_or(query);
    let mut content_length: Option<usize> = None;
    let (mut close, mut keep_alive, mut expect_continue) = (false, false, false);
    for (name, value) in &headers {
        match name.as_str() {
            "transfer-encoding" if has_token(value, "chunked") => {
                return Err(refuse(411, "chunked request bodies are not supported: send Content-Length"))
            }
            "transfer-encoding" => return Err(refuse(501, format!("transfer coding `{value}` is not supported"))),
            "content-length" => {
                for v in value.split(',') {
                    let v = v.trim();
                    let n = match v.parse::<u64>() {
                        Ok(n) if v.bytes().all(|b| b.is_ascii_digit()) => n,
                        _ => return Err(refuse(400, format!("invalid Content-Length `{value}`"))),
                    };
                    if n > MAX_BODY as u64 {
                        return Err(refuse(413, format!("the request body is larger than {MAX_BODY} bytes")));
                    }
                    if content_length.is_some_and(|c| c as u64 != n) {
                        return Err(refuse(400, "conflicting Content-Length values"));
                    }
                    content_length = Some(n as usize);
                }
            }
            "connection" => {
                close |= has_token(value, "close");
                keep_alive |= has_token(value, "keep-alive");
            }
            "expect" if value.eq_ignore_ascii_case("100-continue") => expect_continue = true,
            "expect" => return Err(refuse(417, format!("unsupported expectation `{value}`"))),
            _ => {}
        }
    }
    if minor == 0 && !keep_alive {
        close = true;
    }
    let content_length = content_length.unwrap_or(0);
    Ok(Some(Head {
        method,
        path: path.to_string(),
        query: query.to_string(),
        headers,
        minor,
        len,
        content_length,
        close,
        expect_continue: expect_continue && minor >= 1,
    }))
}

/// The bytes of a response. `head_only` leaves the body out (HEAD).
pub(super) fn encode(response: &Response, minor: u8, close: bool, head_only: bool) -> Vec<u8> {
    let mut out = encode_head(response, minor, close);
    if !head_only {
        out.extend_from_slice(&response.body);
    }
    out
}

/// The status line and header fields of a response.
fn encode_head(response: &Response, minor: u8, close: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let reason = reason(response.status);
    out.extend_from_slice(format!("HTTP/1.{minor} {} {reason}\r\n", response.status).as_bytes());
    // A 204 has no content, and no Content-Length (RFC 9110 §8.6).
    if response.status != 204 {
        out.extend_from_slice(format!("Content-Type: {}\r\n", response.content_type).as_bytes());
        out.extend_from_slice(format!("Content-Length: {}\r\n", response.body.len()).as_bytes());
    }
    out.extend_from_slice(b"Cache-Control: no-store\r\n");
    for (name, value) in &response.headers {
        // Values are made by the routes; strip line breaks all the same.
        let value: String = value.chars().filter(|c| *c != '\r' && *c != '\n').collect();
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    match (close, minor) {
        (true, _) => out.extend_from_slice(b"Connection: close\r\n"),
        (false, 0) => out.extend_from_slice(b"Connection: keep-alive\r\n"),
        (false, _) => {}
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Reads more bytes into `buf`; false on end of stream, error or deadline.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant) -> Result<bool, ()> {
    let mut chunk = [0u8; 8192];
    match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Ok(false),
        Ok(Ok(n)) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(true)
        }
        Err(_) => Err(()),
    }
}

async fn write(stream: &mut TcpStream, bytes: &[u8]) -> bool {
    matches!(tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(bytes)).await, Ok(Ok(())))
}

/// Sends a refusal and ends the connection.
async fn send_refusal(stream: &mut TcpStream, (status, message): Refusal, minor: u8) {
    let response = Response::error(status, &message);
    let _ = write(stream, &encode(&response, minor, true, false)).await;
    let _ = stream.shutdown().await;
}

/// Serves one connection: requests in order until the client closes, asks
/// to close, goes idle, breaks a rule or is closed to make room.
async fn serve(mut stream: TcpStream, shared: Arc<Shared>, entry: Entry) {
    let head_timeout = shared.options.head_timeout;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut first = true;
    loop {
        // The head: whole within the head timeout of the connection's
        // start, or of the request's first byte on a kept-alive one.
        let mut deadline = (first || !buf.is_empty()).then(|| Instant::now() + head_timeout);
        entry.set(if buf.is_empty() { Phase::Idle } else { Phase::Head });
        let head = loop {
            match parse_head(&buf) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(refusal) => return send_refusal(&mut stream, refusal, 1).await,
            }
            let wait = deadline.unwrap_or_else(|| Instant::now() + IDLE_TIMEOUT);
            let read = tokio::select! {
                // Closed to make room for a new connection.
                _ = entry.close.notified() => return,
                read = read_more(&mut stream, &mut buf, wait) => read,
            };
            match read {
                Ok(true) => {
                    deadline.get_or_insert_with(|| Instant::now() + head_timeout);
                    entry.set(Phase::Head);
                }
                Ok(false) => return,
                Err(()) if !buf.is_empty() => {
                    return send_refusal(&mut stream, refuse(408, "the request head did not arrive in time"), 1).await
                }
                Err(()) => return,
            }
        };
        first = false;
        entry.set(Phase::Busy);
        if entry.probe_only && !routes::is_probe(&head.path) {
            let refusal = refuse(
                503,
                "the admin API is at its connection limit: only /healthz, /readyz and /metrics are answered",
            );
            return send_refusal(&mut stream, refusal, head.minor).await;
        }

        // A request without the token is answered before its body is read
        // (and the connection closed), so clients without it cannot hold a
        // connection slot with a slow body.
        if !routes::is_public(&head.path) {
            if let Some(refused) = routes::authorize(&shared.options, &head.headers) {
                let _ = write(&mut stream, &encode(&refused, head.minor, true, false)).await;
                let _ = stream.shutdown().await;
                return;
            }
        }

        // The body.
        let deadline = Instant::now() + READ_TIMEOUT;
        let end = head.len + head.content_length;
        if head.expect_continue && buf.len() < end && !write(&mut stream, b"HTTP/1.1 100 Continue\r\n\r\n").await {
            return;
        }
        while buf.len() < end {
            match read_more(&mut stream, &mut buf, deadline).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(()) => {
                    return send_refusal(
                        &mut stream,
                        refuse(408, "the request body did not arrive in time"),
                        head.minor,
                    )
                    .await
                }
            }
        }
        let body = buf[head.len..end].to_vec();
        buf.drain(..end);

        let head_only = head.method == "HEAD";
        // A probe slot serves one request.
        let (minor, close) = (head.minor, head.close || entry.probe_only);
        // A journal query holds its permit until its page is written, for
        // at most JOURNAL_WRITE_TIMEOUT; one that waits longer than
        // JOURNAL_QUERY_WAIT for a permit is told to come back (so clients
        // that do not read their pages cannot queue the others forever).
        let permit = match journal::is_journal_query(&head.path) {
            true => match tokio::time::timeout(JOURNAL_QUERY_WAIT, shared.journal_queries.acquire()).await {
                Ok(Ok(p)) => Some(p),
                Ok(Err(_)) => return,
                Err(_) => {
                    send_refusal(&mut stream, refuse(503, "journal queries are busy; try again"), minor).await;
                    return;
                }
            },
            false => None,
        };
        let response = answer(&shared, head, body).await;
        let head = encode_head(&response, minor, close);
        let writes =
            async { write(&mut stream, &head).await && (head_only || write(&mut stream, &response.body).await) };
        let sent = match permit {
            Some(_) => tokio::time::timeout(JOURNAL_WRITE_TIMEOUT, writes).await.unwrap_or(false),
            None => writes.await,
        };
        drop(response);
        drop(permit);
        if !sent || close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// Answers one request: a probe on this thread, anything else on the
/// blocking pool.
async fn answer(shared: &Arc<Shared>, head: Head, body: Vec<u8>) -> Response {
    let handle = |shared: &Shared, head: &Head, body: &[u8]| {
        routes::handle(&shared.state, &shared.options, &head.method, &head.path, &head.query, &head.headers, body)
    };
    if routes::is_probe(&head.path) {
        return handle(shared, &head, &body);
    }
    let task = shared.clone();
    tokio::task::spawn_blocking(move || handle(&task, &head, &body))
        .await
        .unwrap_or_else(|_| Response::error(500, "the request could not be answered"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<Head>, Refusal> {
        parse_head(text.as_bytes())
    }

    #[test]
    fn parses_a_request_head() {
        let h = head("GET /admin/journal?method=%2Fa.B%2FC&x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            .unwrap()
            .unwrap();
        assert_eq!(h.method, "GET");
        assert_eq!(h.path, "/admin/journal");
        assert_eq!(h.query, "method=%2Fa.B%2FC&x=1");
        assert_eq!(h.content_length, 3);
        assert!(!h.close);
        assert_eq!(
            h.len,
            "GET /admin/journal?method=%2Fa.B%2FC&x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n".len()
        );
    }

    #[test]
    fn incomplete_heads_wait_and_oversized_ones_are_refused() {
        assert_eq!(head("GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        let big = format!("GET / HTTP/1.1\r\nX-Big: {}", "a".repeat(MAX_HEAD));
        assert_eq!(head(&big).unwrap_err().0, 431);
        let many: String = (0..MAX_HEADERS + 1).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(head(&format!("GET / HTTP/1.1\r\n{many}\r\n")).unwrap_err().0, 431);
    }

    #[test]
    fn framing_rules() {
        assert_eq!(head("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err().0, 411);
        assert_eq!(head("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n").unwrap_err().0, 501);
        assert_eq!(head("POST / HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n").unwrap_err().0, 413);
        assert_eq!(head("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n").unwrap_err().0, 400);
        assert_eq!(head("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n").unwrap_err().0, 400);
        assert_eq!(head("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n").unwrap_err().0, 400);
        assert_eq!(head("GARBAGE\r\n\r\n").unwrap_err().0, 400);
        assert_eq!(head("GET * HTTP/1.1\r\n\r\n").unwrap_err().0, 400);
    }

    #[test]
    fn connection_handling() {
        assert!(head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap().unwrap().close);
        assert!(head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap().close);
        assert!(!head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap().unwrap().close);
        let h = head("GET http://host:1/admin/status?a=b HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.path.as_str(), h.query.as_str(), h.expect_continue), ("/admin/status", "a=b", true));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len)
                .map(|i| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    const ALPHABET: &[u8] = b" \r\n:/?%aZ09\x00\xff";
                    if i < 4 {
                        b"GET "[i]
                    } else {
                        ALPHABET[(seed % ALPHABET.len() as u64) as usize]
                    }
                })
                .collect();
            let _ = parse_head(&bytes);
        }
    }

    #[test]
    fn a_full_table_closes_idle_connections_first_then_keeps_slots_for_probes() {
        let t0 = Instant::now();
        let mut table = Table::default();
        let ids: Vec<u64> = (0..MAX_CONNECTIONS)
            .map(|i| table.admit(t0 + Duration::from_millis(i as u64)).map(|(id, probe, _)| (id, probe)).unwrap())
            .map(|(id, probe)| {
                assert!(!probe);
                id
            })
            .collect();
        let set = |table: &mut Table, id: u64, phase: Phase, at: u64| {
            let c = table.conns.get_mut(&id).unwrap();
            c.phase = phase;
            c.since = t0 + Duration::from_secs(at);
        };
        // Connection 0 is busy, 1 sends a head: 2 is the oldest idle one.
        set(&mut table, ids[0], Phase::Busy, 0);
        set(&mut table, ids[1], Phase::Head, 0);
        let close = table.conns[&ids[2]].close.clone();
        let (new, probe, _) = table.admit(t0).unwrap();
        assert!(!probe && !table.conns.contains_key(&ids[2]) && table.conns.contains_key(&new));
        assert!(futures_util::FutureExt::now_or_never(close.notified()).is_some(), "told to close");
        // With every other connection busy, one sending a head goes next.
        for &id in &ids[3..] {
            set(&mut table, id, Phase::Busy, 1);
        }
        set(&mut table, new, Phase::Busy, 1);
        table.admit(t0).unwrap();
        assert!(!table.conns.contains_key(&ids[1]));
        // All busy: probe slots, then the oldest probe slot not yet busy.
        let last = table.conns.keys().copied().max().unwrap();
        set(&mut table, last, Phase::Busy, 1);
        let probes: Vec<u64> = (0..PROBE_SLOTS)
            .map(|_| {
                let (id, probe, _) = table.admit(t0).unwrap();
                assert!(probe);
                id
            })
            .collect();
        assert_eq!(table.count(false), MAX_CONNECTIONS);
        let (_, probe, _) = table.admit(t0).unwrap();
        assert!(probe && !table.conns.contains_key(&probes[0]));
        for id in table.conns.keys().copied().collect::<Vec<_>>() {
            table.conns.get_mut(&id).unwrap().phase = Phase::Busy;
        }
        assert!(table.admit(t0).is_none(), "everything busy: refused");
        assert_eq!(table.conns.len(), MAX_CONNECTIONS + PROBE_SLOTS);
    }

    #[test]
    fn encodes_responses() {
        let r = Response::error(401, "no");
        let text = String::from_utf8(encode(&r, 1, true, false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"error\":\"no\"}\n"), "{text}");
        let text = String::from_utf8(encode(&r, 1, false, true)).unwrap();
        assert!(text.ends_with("\r\n\r\n") && text.contains("Content-Length: 15\r\n"), "{text}");
    }
}
