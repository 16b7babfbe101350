//! A request head read as a call, for the transports built on `http`
//! types (HTTP/1.1 on hyper, HTTP/2 on h2): the protocol from the content
//! type (or Connect's GET), the method, the deadline and the message
//! encodings, or why the request is refused. The engine's own HTTP/2
//! stack makes the same decisions as it decodes a header block.

use super::compression::{self, Encoding};
use super::grpc::{self, Code, Status};
use super::{classify, connect, Codec, Dialect, Kind, Protocol};
use crate::config::Config;
use crate::served::Served;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use tokio::time::Instant;
use wirestub_plan::MethodKind;

/// What a call needs from its request head.
#[derive(Debug)]
pub struct Setup {
    pub dialect: Dialect,
    /// The method's position in the plan ([`Served::at`]: one past the
    /// last for a method the plan lacks, forwarded to the upstream).
    pub method: usize,
    pub deadline: Option<Instant>,
    /// How request messages are compressed.
    pub encoding: Encoding,
    /// Response messages go out gzip-compressed.
    pub compress: bool,
    /// A GET request's message, from its query.
    pub query: Option<Bytes>,
}

/// Why a request is not a call.
#[derive(Debug)]
pub enum Refusal {
    /// An HTTP answer: 405 (with `Allow`) or 415 (with `Accept-Post`).
    Http(u16),
    /// A status in the request's protocol.
    Status(Dialect, Status),
}

/// The content types served, for 415 answers.
pub const ACCEPT_POST: &str = "application/grpc, application/grpc-web, application/grpc-web+proto, \
     application/grpc-web+json, application/grpc-web-text, application/grpc-web-text+proto, application/proto, \
     application/json, application/connect+proto, application/connect+json";

/// Reads a request head. `grpc`: whether the transport can carry gRPC
/// (HTTP/2 only).
pub fn check(
    method: &Method,
    path: &str,
    query: Option<&str>,
    h: &HeaderMap,
    served: &Served,
    config: &Config,
    grpc: bool,
) -> Result<Setup, Refusal> {
    let get = method == Method::GET;
    if method != Method::POST && !get {
        return Err(Refusal::Http(405));
    }
    let m = served.method(path);
    let (dialect, get) = if get {
        // Connect's GET, for methods marked idempotency_level =
        // NO_SIDE_EFFECTS; the message is in the query.
        let json = Dialect { protocol: Protocol::Connect, codec: Codec::Json };
        match m {
            Some(m) if m.no_side_effects && m.plan.kind == MethodKind::Unary && !m.plan.duplex => {}
            Some(_) => return Err(Refusal::Http(405)),
            None => {
                let status = Status::new(Code::Unimplemented, format!("unknown method {path}"));
                return Err(Refusal::Status(json, status));
            }
        }
        match connect::parse_get(query.unwrap_or("")) {
            Ok(q) => (Dialect { protocol: Protocol::Connect, codec: q.codec }, Some(q)),
            Err(connect::GetError::Codec(_)) => return Err(Refusal::Http(415)),
            Err(e) => return Err(Refusal::Status(json, Status::new(Code::InvalidArgument, e.to_string()))),
        }
    } else {
        let content_type = h.get(http::header::CONTENT_TYPE).map(HeaderValue::as_bytes).unwrap_or(b"");
        match classify(content_type) {
            Kind::Known(d) if d.protocol == Protocol::Grpc && !grpc => return Err(Refusal::Http(415)),
            Kind::Known(d) => (d, None),
            Kind::GrpcOther if grpc => {
                let ct = String::from_utf8_lossy(content_type);
                let message = format!("content-type {ct} is not supported; use application/grpc");
                return Err(Refusal::Status(Dialect::GRPC, Status::new(Code::Unimplemented, message)));
            }
            _ => return Err(Refusal::Http(415)),
        }
    };
    let m = match m {
        Some(m) => m,
        // Forwarded as it comes: messages in envelopes, as bytes.
        None if config.upstream.as_ref().is_some_and(|u| u.route(path).is_some())
            && dialect.enveloped()
            && dialect.codec == Codec::Proto =>
        {
            &served.forwarded
        }
        None => {
            let status = Status::new(Code::Unimplemented, format!("unknown method {path}"));
            return Err(Refusal::Status(dialect, status));
        }
    };
    let unary = m.plan.kind == MethodKind::Unary && !m.plan.duplex;
    if get.is_some() && !(unary && m.no_side_effects) {
        return Err(Refusal::Http(405));
    }
    if !dialect.fits(unary) {
        return Err(Refusal::Http(415));
    }
    if m.builtin.is_some() && dialect.protocol != Protocol::Grpc {
        let status = Status::new(Code::Unimplemented, "health and reflection are served over gRPC only");
        return Err(Refusal::Status(dialect, status));
    }
    if dialect.codec == Codec::Json && m.json.is_none() {
        return Err(Refusal::Status(dialect, Status::new(Code::Unimplemented, "this method has no JSON mapping")));
    }
    let connect = matches!(dialect.protocol, Protocol::Connect | Protocol::ConnectStream);
    let timeout = match connect {
        true => h.get("connect-timeout-ms").map(|v| (connect::parse_timeout(v.as_bytes()), "connect-timeout-ms")),
        false => h.get("grpc-timeout").map(|v| (grpc::parse_timeout(v.as_bytes()), "grpc-timeout")),
    };
    let deadline = match timeout {
        None => None,
        Some((Some(t), _)) => Some(Instant::now() + t),
        Some((None, name)) => {
            return Err(Refusal::Status(dialect, Status::new(Code::Internal, format!("malformed {name} header"))));
        }
    };
    let (encoding, accept) = match dialect.protocol {
        Protocol::Connect => (h.get(http::header::CONTENT_ENCODING), h.get(http::header::ACCEPT_ENCODING)),
        Protocol::ConnectStream => (h.get("connect-content-encoding"), h.get("connect-accept-encoding")),
        _ => (h.get("grpc-encoding"), h.get("grpc-accept-encoding")),
    };
    let named = get.as_ref().and_then(|q| q.compression.as_deref()).map(str::as_bytes);
    let encoding = match named.or(encoding.map(HeaderValue::as_bytes)) {
        None => Encoding::Identity,
        Some(e) => match Encoding::parse(e) {
            Some(e) => e,
            None => return Err(Refusal::Status(dialect, grpc::unsupported_encoding(e))),
        },
    };
    let compress =
        config.compress_responses && accept.is_some_and(|a| compression::negotiate(a.as_bytes()) == Encoding::Gzip);
    Ok(Setup { dialect, method: m.position, deadline, encoding, compress, query: get.map(|q| q.message) })
}
