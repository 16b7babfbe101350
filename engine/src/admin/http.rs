//! The admin API's HTTP/1.1 server: request heads parsed with `httparse`,
//! `Content-Length` bodies only, keep-alive (HTTP/1.1 by default, HTTP/1.0
//! on request) and `Connection: close`, `Expect: 100-continue`, pipelined
//! requests answered in order.
//!
//! Limits: heads up to [`MAX_HEAD`] bytes (431 beyond), bodies up to
//! [`MAX_BODY`] (413), chunked bodies refused (411; other transfer codings
//! 501), a whole request within [`READ_TIMEOUT`] of its first byte (408),
//! an idle keep-alive connection closed after [`IDLE_TIMEOUT`], at most
//! [`MAX_CONNECTIONS`] connections at once. Any refusal closes the
//! connection, since the rest of what the client sent cannot be trusted to
//! start a request.

use super::routes::{self, Response};
use super::Options;
use crate::state::State;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body.
pub const MAX_BODY: usize = 1024 * 1024;
/// Most header fields in a request.
const MAX_HEADERS: usize = 100;
/// A request must arrive whole within this time of its first byte.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A keep-alive connection with no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Writing a response may take this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more are closed as soon as accepted.
pub const MAX_CONNECTIONS: usize = 256;

/// Accepts connections until `stop` is notified.
pub(super) async fn accept(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    options: Arc<Options>,
    stop: Arc<tokio::sync::Notify>,
) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            _ = stop.notified() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                    drop(stream);
                    continue;
                }
                open.fetch_add(1, Ordering::Relaxed);
                let (state, options, open) = (state.clone(), options.clone(), open.clone());
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    serve(stream, state, options).await;
                    open.fetch_sub(1, Ordering::Relaxed);
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
    let mut out = Vec::with_capacity(256 + response.body.len());
    let reason = reason(response.status);
    out.extend_from_slice(format!("HTTP/1.{minor} {} {reason}\r\n", response.status).as_bytes());
    out.extend_from_slice(format!("Content-Type: {}\r\n", response.content_type).as_bytes());
    out.extend_from_slice(format!("Content-Length: {}\r\n", response.body.len()).as_bytes());
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
    if !head_only {
        out.extend_from_slice(&response.body);
    }
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
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
/// to close, goes idle or breaks a rule.
async fn serve(mut stream: TcpStream, state: Arc<State>, options: Arc<Options>) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // The head. The deadline starts with the request's first byte.
        let mut deadline = if buf.is_empty() { None } else { Some(Instant::now() + READ_TIMEOUT) };
        let head = loop {
            match parse_head(&buf) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(refusal) => return send_refusal(&mut stream, refusal, 1).await,
            }
            let wait = deadline.unwrap_or_else(|| Instant::now() + IDLE_TIMEOUT);
            match read_more(&mut stream, &mut buf, wait).await {
                Ok(true) => {
                    deadline.get_or_insert_with(|| Instant::now() + READ_TIMEOUT);
                }
                Ok(false) => return,
                Err(()) if deadline.is_some() => {
                    return send_refusal(&mut stream, refuse(408, "the request did not arrive in time"), 1).await
                }
                Err(()) => return,
            }
        };
        let deadline = deadline.unwrap_or_else(|| Instant::now() + READ_TIMEOUT);

        // The body.
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
        let (minor, close) = (head.minor, head.close);
        let (state, options) = (state.clone(), options.clone());
        let response = tokio::task::spawn_blocking(move || {
            routes::handle(&state, &options, &head.method, &head.path, &head.query, &head.headers, &body)
        })
        .await
        .unwrap_or_else(|_| Response::error(500, "the request could not be answered"));
        if !write(&mut stream, &encode(&response, minor, close, head_only)).await || close {
            let _ = stream.shutdown().await;
            return;
        }
    }
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
