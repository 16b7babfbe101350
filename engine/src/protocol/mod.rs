//! Protocols carried over a transport: how a request becomes a call's
//! inputs and a call's outputs become a response. [`grpc`] holds the
//! gRPC status codes, `grpc-timeout` and message framing; [`web`] the
//! gRPC-Web trailer frame; [`connect`] the Connect error body, end-of-stream
//! message and HTTP status mapping.
//!
//! A call's outcome exists once, as the gRPC trailer map of its prepared
//! response (`grpc-status`, `grpc-message`, `grpc-status-details-bin` and
//! the trailing metadata); each protocol maps that map into its own
//! framing ([`Response`]). The gRPC answer over the engine's own HTTP/2
//! stack skips this and sends the header blocks encoded at plan load.

pub mod compression;
pub mod connect;
pub mod cors;
pub mod grpc;
pub mod head;
pub mod reader;
pub mod responder;
pub mod web;
pub mod web_text;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};

/// The protocol of a call, from its request's content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `application/grpc`.
    Grpc,
    /// `application/grpc-web`, `+proto`, `+json`.
    GrpcWeb,
    /// `application/grpc-web-text`, `+proto`: the body is base64.
    GrpcWebText,
    /// Connect unary: `application/proto`, `application/json`.
    Connect,
    /// Connect streaming: `application/connect+proto`, `+json`.
    ConnectStream,
}

/// How messages are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Proto,
    Json,
}

/// A protocol with its message codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dialect {
    pub protocol: Protocol,
    pub codec: Codec,
}

impl Dialect {
    pub const GRPC: Dialect = Dialect { protocol: Protocol::Grpc, codec: Codec::Proto };

    /// Whether messages travel with the 5-byte envelope (every protocol
    /// but Connect unary, whose body is the message).
    pub fn enveloped(self) -> bool {
        self.protocol != Protocol::Connect
    }

    /// Whether the protocol can carry a call of this shape: Connect unary
    /// content types serve unary methods only, Connect streaming ones
    /// streaming methods only.
    pub fn fits(self, unary: bool) -> bool {
        match self.protocol {
            Protocol::Connect => unary,
            Protocol::ConnectStream => !unary,
            _ => true,
        }
    }

    /// The response's content type.
    pub fn content_type(self) -> &'static str {
        match (self.protocol, self.codec) {
            (Protocol::Grpc, _) => "application/grpc",
            (Protocol::GrpcWeb, Codec::Proto) => "application/grpc-web+proto",
            (Protocol::GrpcWeb, Codec::Json) => "application/grpc-web+json",
            (Protocol::GrpcWebText, _) => "application/grpc-web-text+proto",
            (Protocol::Connect, Codec::Proto) => "application/proto",
            (Protocol::Connect, Codec::Json) => "application/json",
            (Protocol::ConnectStream, Codec::Proto) => "application/connect+proto",
            (Protocol::ConnectStream, Codec::Json) => "application/connect+json",
        }
    }

    /// Its position in [`crate::observe::metrics::PROTOCOLS`].
    pub fn index(self) -> usize {
        match self.protocol {
            Protocol::Grpc => 0,
            Protocol::GrpcWeb | Protocol::GrpcWebText => 1,
            Protocol::Connect | Protocol::ConnectStream => 2,
        }
    }

    /// The name metrics and the journal use.
    pub fn name(self) -> &'static str {
        match self.protocol {
            Protocol::Grpc => "grpc",
            Protocol::GrpcWeb | Protocol::GrpcWebText => "grpc-web",
            Protocol::Connect | Protocol::ConnectStream => "connect",
        }
    }
}

/// What a request's content type says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Known(Dialect),
    /// Another `application/grpc+...` codec: gRPC says UNIMPLEMENTED.
    GrpcOther,
    /// Nothing the engine speaks: HTTP 415.
    Unsupported,
}

/// Classifies a content type (case-insensitive, parameters such as
/// `; charset=utf-8` ignored).
pub fn classify(content_type: &[u8]) -> Kind {
    let end = content_type.iter().position(|&b| b == b';').unwrap_or(content_type.len());
    let t = content_type[..end].trim_ascii();
    let mut lower = [0u8; 40];
    if t.len() > lower.len() {
        return Kind::Unsupported;
    }
    let lower = &mut lower[..t.len()];
    lower.copy_from_slice(t);
    lower.make_ascii_lowercase();
    let d = |protocol, codec| Kind::Known(Dialect { protocol, codec });
    match &*lower {
        b"application/grpc" | b"application/grpc+proto" => d(Protocol::Grpc, Codec::Proto),
        b"application/grpc-web" | b"application/grpc-web+proto" => d(Protocol::GrpcWeb, Codec::Proto),
        b"application/grpc-web+json" => d(Protocol::GrpcWeb, Codec::Json),
        b"application/grpc-web-text" | b"application/grpc-web-text+proto" => d(Protocol::GrpcWebText, Codec::Proto),
        b"application/proto" => d(Protocol::Connect, Codec::Proto),
        b"application/json" => d(Protocol::Connect, Codec::Json),
        b"application/connect+proto" => d(Protocol::ConnectStream, Codec::Proto),
        b"application/connect+json" => d(Protocol::ConnectStream, Codec::Json),
        t if t.starts_with(b"application/grpc+") => Kind::GrpcOther,
        _ => Kind::Unsupported,
    }
}

/// An HTTP response head: status and headers (no pseudo-headers).
#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    pub headers: HeaderMap,
}

/// A whole response a protocol makes of a call that ends without messages
/// (or, for Connect unary, with its one message): the head, and a body
/// that ends the response.
#[derive(Debug, Clone)]
pub struct Response {
    pub head: Head,
    pub body: Bytes,
}

/// The head of a response that will carry messages (gRPC-Web, Connect
/// streaming): 200, the dialect's content type and the initial metadata
/// (`headers` is a prepared response's header map, whose content type is
/// replaced).
pub fn stream_head(d: Dialect, headers: &HeaderMap) -> Head {
    let mut h = HeaderMap::with_capacity(headers.len() + 1);
    h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(d.content_type()));
    for (k, v) in headers {
        if k != http::header::CONTENT_TYPE {
            h.append(k, v.clone());
        }
    }
    Head { status: 200, headers: h }
}

/// The bytes that end a streamed response, after its messages: the
/// gRPC-Web trailer frame or the Connect end-of-stream message. (gRPC
/// ends with HTTP trailers instead: None.)
pub fn stream_end(d: Dialect, trailers: &HeaderMap) -> Option<Bytes> {
    match d.protocol {
        Protocol::GrpcWeb | Protocol::GrpcWebText => Some(web::trailer_frame(trailers)),
        Protocol::ConnectStream => Some(connect::end_stream(trailers)),
        Protocol::Grpc | Protocol::Connect => None,
    }
}

/// A response with no messages: an error, or an empty answer, from the
/// prepared response's headers and trailers (gRPC's trailers-only).
pub fn without_messages(d: Dialect, headers: &HeaderMap, trailers: &HeaderMap) -> Response {
    match d.protocol {
        Protocol::Connect => {
            connect::unary(&connect::accept_encoding_header(headers, "accept-encoding"), trailers, None, d.codec)
        }
        Protocol::ConnectStream => {
            let headers = connect::accept_encoding_header(headers, "connect-accept-encoding");
            Response { head: stream_head(d, &headers), body: connect::end_stream(trailers) }
        }
        Protocol::Grpc | Protocol::GrpcWeb | Protocol::GrpcWebText => {
            // Trailers-only: the status travels in the headers.
            let mut head = stream_head(d, headers);
            for (k, v) in trailers {
                head.headers.append(k, v.clone());
            }
            Response { head, body: Bytes::new() }
        }
    }
}

/// Turns JSON request messages into protobuf bytes for a method, with
/// INVALID_ARGUMENT naming what is wrong.
pub fn json_decoder(codec: crate::codec::json::JsonCodec) -> reader::Decode {
    Box::new(move |m: Bytes| codec.request(&m).map_err(|e| reader::invalid_json(&e)))
}

/// `grpc-status` of a trailer map (2, UNKNOWN, when missing or malformed).
pub fn status_of(trailers: &HeaderMap) -> u8 {
    trailers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<u8>().ok()).unwrap_or(2)
}

/// Whether a trailer key is the status itself rather than metadata.
pub fn is_status_key(k: &str) -> bool {
    matches!(k, "grpc-status" | "grpc-message" | "grpc-status-details-bin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_classify() {
        let k = |s: &str| classify(s.as_bytes());
        assert_eq!(k("application/grpc"), Kind::Known(Dialect::GRPC));
        assert_eq!(k("Application/GRPC+proto"), Kind::Known(Dialect::GRPC));
        assert_eq!(k("application/grpc+json"), Kind::GrpcOther);
        assert_eq!(
            k("application/json; charset=utf-8"),
            Kind::Known(Dialect { protocol: Protocol::Connect, codec: Codec::Json })
        );
        assert_eq!(
            k("application/grpc-web-text"),
            Kind::Known(Dialect { protocol: Protocol::GrpcWebText, codec: Codec::Proto })
        );
        assert_eq!(
            k("application/connect+json"),
            Kind::Known(Dialect { protocol: Protocol::ConnectStream, codec: Codec::Json })
        );
        assert_eq!(k("text/plain"), Kind::Unsupported);
        assert_eq!(k(""), Kind::Unsupported);
        assert_eq!(k(&"a".repeat(100)), Kind::Unsupported);
    }
}
