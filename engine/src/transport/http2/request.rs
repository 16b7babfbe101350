//! A request's header block, checked as HPACK decodes it (RFC 9113 §8.2,
//! §8.3), keeping only what serving a gRPC call needs: the method (from
//! `:path`), whether `:method` is POST, the content type, `grpc-timeout`,
//! `grpc-encoding`,
//! `content-length`, and the values of the metadata keys the method's rules
//! read. Nothing is allocated for a well-formed call to a known method
//! whose rules read no metadata.

use crate::protocol::{self, Dialect};
use crate::served::{Served, ServedMethod};
use smallvec::SmallVec;

/// What a request's content-type says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentType {
    Missing,
    /// A protocol the engine speaks.
    Known(Dialect),
    /// Another `application/grpc+...` codec (e.g. `+json`), kept for the error.
    GrpcOther(Box<[u8]>),
    /// None of them.
    Other,
}

/// Request fields only Connect and browsers send.
#[derive(Debug, Default)]
pub struct Extra {
    /// The query of `:path` (a Connect GET carries its message there).
    pub query: Option<Box<[u8]>>,
    /// Raw `connect-timeout-ms` value (the first one).
    pub connect_timeout: Option<Box<[u8]>>,
    /// `origin`, from a browser (CORS).
    pub origin: Option<Box<[u8]>>,
    /// `access-control-request-headers` of a CORS preflight.
    pub cors_headers: Option<Box<[u8]>>,
}

/// The response encodings a client accepts, by the header that says so.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AcceptsGzip {
    /// `grpc-accept-encoding` (gRPC, gRPC-Web).
    pub grpc: bool,
    /// `accept-encoding` (Connect unary).
    pub http: bool,
    /// `connect-accept-encoding` (Connect streaming).
    pub connect: bool,
}

fn gzip(list: &[u8]) -> bool {
    protocol::compression::negotiate(list) == protocol::compression::Encoding::Gzip
}

/// The request head, built field by field.
pub struct RequestHead<'s> {
    served: &'s Served,
    pub method: Option<&'s ServedMethod>,
    /// The path of an unknown method, for the error message.
    pub unknown_path: Option<Box<[u8]>>,
    /// `:method`, when it is not POST (kept for CONNECT checks).
    pub http_method: Option<Box<[u8]>>,
    pub post: bool,
    pub content_type: ContentType,
    /// Raw `grpc-timeout` value (the first one).
    pub timeout: Option<SmallVec<[u8; 12]>>,
    /// A `grpc-encoding`, `connect-content-encoding` or `content-encoding`
    /// other than `identity`.
    pub encoding: Option<Box<[u8]>>,
    /// Which of `grpc-accept-encoding`, `accept-encoding` and
    /// `connect-accept-encoding` name gzip.
    pub accepts_gzip: AcceptsGzip,
    /// What only Connect and browsers send (boxed: a gRPC request's head
    /// stays small).
    pub extra: Option<Box<Extra>>,
    pub content_length: Option<u64>,
    /// Values of the method's metadata keys, in the plan's key order.
    pub metadata: SmallVec<[Option<Box<[u8]>>; 2]>,
    /// Every metadata entry, in order, when the journal asks for them
    /// ([`RequestHead::keep_all`]).
    pub all: Option<Vec<(Box<str>, bytes::Bytes)>>,
    /// The decoded header list size (RFC 9113 §6.5.2).
    pub size: usize,
    /// Why the block is malformed (the first reason found), if it is.
    pub malformed: Option<&'static str>,
    seen_method: bool,
    seen_scheme: bool,
    seen_path: bool,
    seen_authority: bool,
    seen_regular: bool,
    /// Trailers: no pseudo-header allowed, and nothing kept.
    trailers: bool,
}

impl<'s> RequestHead<'s> {
    pub fn new(served: &'s Served) -> Self {
        RequestHead {
            served,
            method: None,
            unknown_path: None,
            http_method: None,
            post: false,
            content_type: ContentType::Missing,
            timeout: None,
            encoding: None,
            accepts_gzip: AcceptsGzip::default(),
            extra: None,
            content_length: None,
            metadata: SmallVec::new(),
            all: None,
            size: 0,
            malformed: None,
            seen_method: false,
            seen_scheme: false,
            seen_path: false,
            seen_authority: false,
            seen_regular: false,
            trailers: false,
        }
    }

    /// Keeps every metadata entry too (for the journal).
    pub fn keep_all(mut self) -> Self {
        self.all = Some(Vec::new());
        self
    }

    /// A head for a trailer block: only checked, nothing kept.
    pub fn trailers(served: &'s Served) -> Self {
        let mut h = RequestHead::new(served);
        h.trailers = true;
        h
    }

    fn bad(&mut self, why: &'static str) {
        if self.malformed.is_none() {
            self.malformed = Some(why);
        }
    }

    /// Takes one decoded field.
    pub fn field(&mut self, name: &[u8], value: &[u8]) {
        self.size += name.len() + value.len() + 32;
        if self.malformed.is_some() {
            return;
        }
        if !valid_value(value) {
            return self.bad("invalid header value");
        }
        if let Some(pseudo) = name.strip_prefix(b":") {
            if self.trailers {
                return self.bad("pseudo-header in trailers");
            }
            if self.seen_regular {
                return self.bad("pseudo-header after a regular header");
            }
            let seen = match pseudo {
                b"method" => {
                    self.post = value == b"POST";
                    if !self.post {
                        self.http_method = Some(value.into());
                    }
                    &mut self.seen_method
                }
                b"scheme" => &mut self.seen_scheme,
                b"authority" => &mut self.seen_authority,
                b"path" => {
                    if value.is_empty() {
                        self.bad("empty :path");
                    }
                    let lookup = |p: &[u8]| std::str::from_utf8(p).ok().and_then(|p| self.served.method(p));
                    // A method's path as is (every call but a Connect GET),
                    // else without its query.
                    let method = lookup(value).or_else(|| {
                        let i = memchr::memchr(b'?', value)?;
                        self.extra.get_or_insert_with(Default::default).query = Some(value[i + 1..].into());
                        lookup(&value[..i])
                    });
                    match method {
                        Some(m) => {
                            self.metadata = SmallVec::from_elem(None, m.plan.metadata_keys.len());
                            self.method = Some(m);
                        }
                        None => self.unknown_path = Some(value.into()),
                    }
                    &mut self.seen_path
                }
                _ => return self.bad("unknown pseudo-header"),
            };
            if std::mem::replace(seen, true) {
                return self.bad("repeated pseudo-header");
            }
            return;
        }
        self.seen_regular = true;
        if !valid_name(name) {
            return self.bad("invalid header name");
        }
        match name {
            b"connection" | b"proxy-connection" | b"keep-alive" | b"transfer-encoding" | b"upgrade" => {
                return self.bad("connection-specific header")
            }
            b"te" if value != b"trailers" => return self.bad("te other than trailers"),
            _ => {}
        }
        if self.trailers {
            return;
        }
        match name {
            b"content-type" if self.content_type == ContentType::Missing => {
                self.content_type = if value == b"application/grpc" {
                    ContentType::Known(Dialect::GRPC)
                } else {
                    match protocol::classify(value) {
                        protocol::Kind::Known(d) => ContentType::Known(d),
                        protocol::Kind::GrpcOther => ContentType::GrpcOther(value.into()),
                        protocol::Kind::Unsupported => ContentType::Other,
                    }
                };
            }
            b"grpc-timeout" if self.timeout.is_none() => self.timeout = Some(SmallVec::from_slice(value)),
            b"connect-timeout-ms" => {
                let extra = self.extra.get_or_insert_with(Default::default);
                if extra.connect_timeout.is_none() {
                    extra.connect_timeout = Some(value.into());
                }
            }
            b"grpc-encoding" | b"connect-content-encoding" | b"content-encoding" if value != b"identity" => {
                self.encoding = Some(value.into())
            }
            b"content-length" => {
                let n = std::str::from_utf8(value).ok().and_then(|v| v.parse::<u64>().ok());
                match (n, self.content_length) {
                    (Some(n), None) => self.content_length = Some(n),
                    (Some(n), Some(m)) if n == m => {}
                    _ => self.bad("invalid content-length"),
                }
            }
            b"te" => {}
            _ => {
                match name {
                    b"grpc-accept-encoding" => self.accepts_gzip.grpc |= gzip(value),
                    b"accept-encoding" => self.accepts_gzip.http |= gzip(value),
                    b"connect-accept-encoding" => self.accepts_gzip.connect |= gzip(value),
                    b"origin" => self.extra.get_or_insert_with(Default::default).origin = Some(value.into()),
                    b"access-control-request-headers" => {
                        self.extra.get_or_insert_with(Default::default).cors_headers = Some(value.into())
                    }
                    _ => {}
                }
                if let Some(all) = &mut self.all {
                    let name = String::from_utf8_lossy(name).into_owned().into_boxed_str();
                    all.push((name, bytes::Bytes::copy_from_slice(value)));
                }
            }
        }
        // Every regular header may be a key the rules read (recordings
        // read `content-type` and `grpc-encoding` too).
        if let Some(m) = self.method.filter(|m| !m.plan.metadata_keys.is_empty()) {
            // GripMock's session header reads as wirestub's.
            let name = match name {
                b"x-gripmock-session" => wirestub_plan::SESSION_KEY.as_bytes(),
                n => n,
            };
            for (i, key) in m.plan.metadata_keys.iter().enumerate() {
                if key.as_bytes() == name && self.metadata[i].is_none() {
                    self.metadata[i] = Some(value.into());
                }
            }
        }
    }

    /// Checks what can only be checked once the block is complete.
    pub fn finish(&mut self) {
        if self.trailers || self.malformed.is_some() {
            return;
        }
        if self.http_method.as_deref() == Some(b"CONNECT") {
            // A CONNECT request has :authority and neither :scheme nor
            // :path (RFC 9113 §8.5); it is answered 405 when well-formed.
            if self.seen_scheme || self.seen_path || !self.seen_authority {
                self.bad("malformed CONNECT request");
            }
            return;
        }
        if !self.seen_method || !self.seen_scheme || !self.seen_path {
            self.bad("missing pseudo-header");
        }
    }
}

/// A field name as RFC 9113 §8.2.1 allows in HTTP/2: lowercase token
/// characters only.
fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.iter().all(|&b| {
            matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.'
                | b'^' | b'_' | b'`' | b'|' | b'~')
        })
}

/// A field value without NUL, CR or LF, and without whitespace at either
/// end (RFC 9113 §8.2.1).
fn valid_value(value: &[u8]) -> bool {
    let ws = |b: &u8| *b == b' ' || *b == b'\t';
    !value.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n')
        && !value.first().is_some_and(ws)
        && !value.last().is_some_and(ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_values() {
        assert!(valid_name(b"x-request-id"));
        assert!(!valid_name(b"X-Request-Id"));
        assert!(!valid_name(b"a b"));
        assert!(!valid_name(b""));
        assert!(valid_value(b"a b"));
        assert!(valid_value(b""));
        assert!(!valid_value(b" a"));
        assert!(!valid_value(b"a\t"));
        assert!(!valid_value(b"a\r\nb"));
        assert!(!valid_value(b"a\0"));
    }
}
