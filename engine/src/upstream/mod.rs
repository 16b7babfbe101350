//! The engine as a client: calls forwarded to a real gRPC server
//! (`--upstream`) over HTTP/2 on the `h2` crate's client, cleartext or
//! TLS. Nothing here decodes a message: a forwarded call is its path, its
//! metadata and its messages as bytes.
//!
//! Connections are kept and reused, one per upstream per worker thread
//! (a thread-local pool: HTTP/2 multiplexes the worker's calls on it, and
//! no lock is shared between workers). A connection that has failed or
//! received GOAWAY is replaced by the next call that needs it. Every
//! failure to reach the upstream is an UNAVAILABLE status naming it.

pub mod answer;
pub mod record;

use crate::config::Upstream;
use crate::protocol::grpc::{Code, Status};
use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::SendStream;
use std::cell::RefCell;
use std::time::Duration;

/// A call opened on the upstream: its response to come, and its request
/// body to send.
pub struct Opened {
    pub response: ResponseFuture,
    pub send: SendStream<Bytes>,
}

/// Request headers that are never forwarded: HTTP/2 connection-specific
/// ones (RFC 9113 §8.2.2), those the engine sets itself, and those of the
/// protocol the client spoke when it was not gRPC (the call goes out as
/// gRPC, uncompressed).
const NOT_FORWARDED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "host",
    "te",
    "content-type",
    "content-length",
    "grpc-timeout",
    "grpc-encoding",
    "grpc-accept-encoding",
    "accept-encoding",
    "content-encoding",
    "connect-protocol-version",
    "connect-timeout-ms",
    "connect-content-encoding",
    "connect-accept-encoding",
    "x-grpc-web",
    "x-user-agent",
    // A browser's, about the page and CORS, not the call.
    "origin",
    "referer",
    "access-control-request-method",
    "access-control-request-headers",
];

/// Whether a request metadata entry goes to the upstream.
pub fn forwarded(name: &str) -> bool {
    !name.starts_with(':') && !name.starts_with("sec-") && !NOT_FORWARDED.contains(&name)
}

/// A `grpc-timeout` value for `t`: at most eight digits (the protocol's
/// limit), in the finest unit that holds it, at least one millisecond.
pub fn timeout_value(t: Duration) -> String {
    let ms = t.as_millis().max(1);
    const MAX: u128 = 99_999_999;
    if ms <= MAX {
        return format!("{ms}m");
    }
    let s = t.as_secs() as u128;
    if s <= MAX {
        return format!("{s}S");
    }
    format!("{}M", (s / 60).min(MAX))
}

thread_local! {
    /// This worker's connections, by upstream address (and scheme).
    static POOL: RefCell<Vec<(String, SendRequest<Bytes>)>> = const { RefCell::new(Vec::new()) };
}

/// The pool's key for an upstream.
fn key(up: &Upstream) -> String {
    format!("{}{}", if up.tls.is_some() { "https://" } else { "http://" }, up.address)
}

fn unavailable(up: &Upstream, what: impl std::fmt::Display) -> Status {
    Status::new(Code::Unavailable, format!("upstream {}: {what}", up.url))
}

/// A connection ready for a new call: this worker's, or a new one.
async fn connection(up: &Upstream) -> Result<SendRequest<Bytes>, Status> {
    let key = key(up);
    let kept = POOL.with(|p| p.borrow().iter().find(|(k, _)| *k == key).map(|(_, s)| s.clone()));
    if let Some(send) = kept {
        match send.ready().await {
            Ok(send) => return Ok(send),
            Err(_) => POOL.with(|p| p.borrow_mut().retain(|(k, _)| *k != key)),
        }
    }
    let connected = tokio::time::timeout(up.connect_timeout, connect(up))
        .await
        .map_err(|_| unavailable(up, format_args!("no connection within {:?}", up.connect_timeout)))
        .and_then(|r| r);
    let noted = match &connected {
        Ok(_) => None,
        Err(status) => Some((std::time::SystemTime::now(), status.message.clone())),
    };
    *up.health.last_error.lock().unwrap_or_else(|e| e.into_inner()) = noted;
    let send = connected?;
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.retain(|(k, _)| *k != key);
        p.push((key, send.clone()));
    });
    send.ready().await.map_err(|e| unavailable(up, e))
}

/// Opens a connection: TCP, TLS when asked, the HTTP/2 handshake; the
/// connection's own future runs as a task of this worker.
async fn connect(up: &Upstream) -> Result<SendRequest<Bytes>, Status> {
    let tcp = tokio::net::TcpStream::connect(&up.address).await.map_err(|e| unavailable(up, e))?;
    tcp.set_nodelay(true).ok();
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(1 << 20).initial_connection_window_size(4 << 20);
    match &up.tls {
        None => {
            let (send, conn) = builder.handshake(tcp).await.map_err(|e| unavailable(up, e))?;
            run(up, conn);
            Ok(send)
        }
        Some((config, name)) => {
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| unavailable(up, format_args!("TLS: {e}")))?;
            if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(unavailable(up, "TLS: the server did not agree to HTTP/2 (ALPN h2)"));
            }
            let (send, conn) = builder.handshake(tls).await.map_err(|e| unavailable(up, e))?;
            run(up, conn);
            Ok(send)
        }
    }
}

/// Runs a connection's own future (its reads and writes) as a task of
/// this worker, counted open until it ends.
fn run<F>(up: &Upstream, conn: F)
where
    F: std::future::Future + Send + 'static,
{
    use std::sync::atomic::Ordering::Relaxed;
    up.health.open.fetch_add(1, Relaxed);
    let health = up.health.clone();
    tokio::spawn(async move {
        conn.await;
        health.open.fetch_sub(1, Relaxed);
    });
}

/// Opens a call on the upstream: `path` with the client's metadata (those
/// entries [`forwarded`] allows) and what is left of its deadline.
pub async fn open(
    up: &Upstream,
    path: &str,
    metadata: &[(Box<str>, Bytes)],
    timeout: Option<Duration>,
) -> Result<Opened, Status> {
    let mut send = connection(up).await?;
    let scheme = if up.tls.is_some() { "https" } else { "http" };
    let uri = format!("{scheme}://{}{path}", up.authority);
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(uri)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(())
        .map_err(|e| Status::new(Code::Internal, format!("cannot forward to {path}: {e}")))?;
    let headers = request.headers_mut();
    if let Some(t) = timeout {
        let value = timeout_value(t);
        headers.insert("grpc-timeout", http::HeaderValue::from_str(&value).expect("digits and a unit"));
    }
    for (name, value) in metadata {
        if !forwarded(name) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(name.as_bytes()), http::HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    let (response, send) = send.send_request(request, false).map_err(|e| unavailable(up, e))?;
    Ok(Opened { response, send })
}

/// The gRPC status for an upstream answer that is not gRPC (an HTTP status
/// other than 200), as the gRPC HTTP mapping says.
pub fn http_status_code(status: u16) -> Code {
    match status {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// How the binary describes an upstream.
pub struct Options<'a> {
    pub url: &'a str,
    pub mode: crate::config::UpstreamMode,
    pub ca: Option<&'a std::path::Path>,
    /// Client certificate and key (mutual TLS).
    pub identity: Option<(&'a std::path::Path, &'a std::path::Path)>,
    /// The name the server's certificate must carry (default: the URL's
    /// host).
    pub server_name: Option<&'a str>,
    pub connect_timeout: Duration,
    pub max_message: usize,
}

impl Upstream {
    /// The upstream as the admin status shows it.
    pub fn status(&self) -> serde_json::Value {
        let open = self.health.open.load(std::sync::atomic::Ordering::Relaxed);
        let last_error = self.health.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let state = match (open, &last_error) {
            (0, Some(_)) => "failing",
            (0, None) => "not connected",
            _ => "connected",
        };
        serde_json::json!({
            "url": self.url,
            "mode": match self.mode { crate::config::UpstreamMode::Fallback => "fallback", crate::config::UpstreamMode::Always => "always" },
            "tls": self.tls.is_some(),
            "state": state,
            "connections": open,
            "last_error": last_error.map(|(at, message)| serde_json::json!({
                "at": crate::observe::journal::rfc3339(at),
                "message": message,
            })),
        })
    }
}

/// Checks an upstream's URL (`http://HOST:PORT` or `https://HOST[:PORT]`,
/// nothing after the authority) and builds its TLS configuration.
pub fn configure(o: &Options<'_>) -> Result<Upstream, String> {
    let bad = |why: &str| format!("upstream `{}`: {why}", o.url);
    let (tls, rest) = if let Some(r) = o.url.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = o.url.strip_prefix("https://") {
        (true, r)
    } else {
        return Err(bad("expected http://HOST:PORT (cleartext HTTP/2) or https://HOST:PORT (TLS)"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
        return Err(bad("expected only a host and a port after the scheme"));
    }
    let uri: http::uri::Authority = authority.parse().map_err(|_| bad("not a valid host and port"))?;
    let host = uri.host().trim_start_matches('[').trim_end_matches(']').to_string();
    let port = match uri.port_u16() {
        Some(p) => p,
        None if tls => 443,
        None => return Err(bad("a cleartext upstream needs a port (http://HOST:PORT)")),
    };
    let address = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    let tls_options = [("upstream-ca", o.ca.is_some()), ("upstream-cert", o.identity.is_some())];
    let tls_options = tls_options.into_iter().chain([("upstream-server-name", o.server_name.is_some())]);
    if let Some((flag, _)) = tls_options.into_iter().find(|(_, given)| *given && !tls) {
        return Err(bad(&format!("`--{flag}` is for TLS, but the upstream is http://; use https://")));
    }
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let tls = match tls {
        false => None,
        true => {
            let config = crate::transport::tls::client_config(o.ca, o.identity)?;
            let name = o.server_name.unwrap_or(&host).to_string();
            let name = rustls::pki_types::ServerName::try_from(name.clone())
                .map_err(|_| format!("upstream server name `{name}` is not a valid DNS name or IP address"))?;
            Some((config, name))
        }
    };
    Ok(Upstream {
        url: o.url.to_string(),
        address,
        authority: authority.to_string(),
        tls,
        mode: o.mode,
        connect_timeout: o.connect_timeout,
        max_message: o.max_message,
        health: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_fit_eight_digits() {
        assert_eq!(timeout_value(Duration::ZERO), "1m");
        assert_eq!(timeout_value(Duration::from_millis(1500)), "1500m");
        assert_eq!(timeout_value(Duration::from_millis(99_999_999)), "99999999m");
        assert_eq!(timeout_value(Duration::from_millis(100_000_000)), "100000S");
        assert_eq!(timeout_value(Duration::from_secs(100_000_000)), "1666666M");
        assert_eq!(timeout_value(Duration::MAX), "99999999M");
    }

    #[test]
    fn browser_and_protocol_headers_stay_here() {
        for name in ["origin", "sec-fetch-mode", "access-control-request-headers", "x-grpc-web", ":path", "te"] {
            assert!(!forwarded(name), "{name}");
        }
        for name in ["authorization", "x-topic", "cookie"] {
            assert!(forwarded(name), "{name}");
        }
    }
}
