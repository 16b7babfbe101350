//! The Connect protocol's side of a call (connectrpc.com/docs/protocol):
//! unary responses carry the message as the whole body, their trailing
//! metadata as `trailer-` headers and an error as a JSON body with an
//! HTTP status mapped from the code; streaming responses end with an
//! end-of-stream message (flag `0x02`) holding the error and trailing
//! metadata as JSON. Everything is read from the gRPC trailer map of a
//! prepared response, so a rule answers the same over every protocol.

use super::{is_status_key, status_of, Codec, Head, Response};
use crate::codec::percent;
use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use prost::Message as _;
use serde_json::{json, Map, Value};
use std::time::Duration;

/// The flag of the end-of-stream message.
pub const END_STREAM_FLAG: u8 = 0x02;

/// The Connect name of a gRPC code.
pub fn code_name(code: u8) -> &'static str {
    match code {
        0 => "ok",
        1 => "canceled",
        3 => "invalid_argument",
        4 => "deadline_exceeded",
        5 => "not_found",
        6 => "already_exists",
        7 => "permission_denied",
        8 => "resource_exhausted",
        9 => "failed_precondition",
        10 => "aborted",
        11 => "out_of_range",
        12 => "unimplemented",
        13 => "internal",
        14 => "unavailable",
        15 => "data_loss",
        16 => "unauthenticated",
        _ => "unknown",
    }
}

/// The HTTP status a unary error is sent with.
pub fn http_status(code: u8) -> u16 {
    match code {
        0 => 200,
        1 => 499,
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        _ => 500,
    }
}

/// Parses `connect-timeout-ms`: 1 to 10 ASCII digits.
pub fn parse_timeout(v: &[u8]) -> Option<Duration> {
    if v.is_empty() || v.len() > 10 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let ms: u64 = std::str::from_utf8(v).ok()?.parse().ok()?;
    Some(Duration::from_millis(ms))
}

/// `google.rpc.Status`, as `grpc-status-details-bin` carries it.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<Any>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
struct Any {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// The error object of a trailer map whose status is not OK:
/// `{code, message, details[{type, value}]}`.
pub fn error_json(trailers: &HeaderMap) -> Value {
    let code = status_of(trailers);
    let mut e = Map::new();
    e.insert("code".into(), Value::from(code_name(code)));
    let message = trailers.get("grpc-message").and_then(|v| v.to_str().ok()).map(|m| percent::decode(m, false));
    if let Some(m) = message.filter(|m| !m.is_empty()) {
        e.insert("message".into(), Value::from(m));
    }
    let details = trailers
        .get("grpc-status-details-bin")
        .and_then(|v| {
            base64::engine::general_purpose::STANDARD_NO_PAD.decode(v.as_bytes().trim_ascii_end_matches()).ok()
        })
        .and_then(|b| RpcStatus::decode(&b[..]).ok())
        .map(|s| s.details)
        .unwrap_or_default();
    if !details.is_empty() {
        let raw = base64::engine::general_purpose::STANDARD_NO_PAD;
        let list: Vec<Value> = details
            .iter()
            .map(|d| {
                let name = d.type_url.rsplit('/').next().unwrap_or_default();
                json!({ "type": name, "value": raw.encode(&d.value) })
            })
            .collect();
        e.insert("details".into(), Value::from(list));
    }
    Value::Object(e)
}

/// Trailing metadata (the trailer map without the status keys), as
/// Connect's JSON `metadata`: each key with the list of its values.
fn metadata_json(trailers: &HeaderMap) -> Option<Value> {
    let mut m = Map::new();
    for (k, v) in trailers {
        if is_status_key(k.as_str()) {
            continue;
        }
        let Ok(v) = v.to_str() else { continue };
        let list = m.entry(k.as_str()).or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(a) = list {
            a.push(Value::from(v));
        }
    }
    (!m.is_empty()).then_some(Value::Object(m))
}

/// The end-of-stream message of a streamed response, enveloped.
pub fn end_stream(trailers: &HeaderMap) -> Bytes {
    let mut end = Map::new();
    if status_of(trailers) != 0 {
        end.insert("error".into(), error_json(trailers));
    }
    if let Some(m) = metadata_json(trailers) {
        end.insert("metadata".into(), m);
    }
    let json = serde_json::to_vec(&Value::Object(end)).unwrap_or_else(|_| b"{}".to_vec());
    let mut b = BytesMut::with_capacity(5 + json.len());
    b.put_u8(END_STREAM_FLAG);
    b.put_u32(json.len() as u32);
    b.put_slice(&json);
    b.freeze()
}

/// A whole unary response: the message (`Some`, unenveloped) with 200, or
/// the error of `trailers`; initial metadata as headers, trailing
/// metadata as `trailer-` headers.
pub fn unary(headers: &HeaderMap, trailers: &HeaderMap, message: Option<Bytes>, codec: Codec) -> Response {
    let code = status_of(trailers);
    let mut h = HeaderMap::with_capacity(headers.len() + trailers.len());
    let ok = code == 0;
    let content_type = match (ok, codec) {
        (true, Codec::Proto) => "application/proto",
        _ => "application/json",
    };
    h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    for (k, v) in headers {
        if k != http::header::CONTENT_TYPE {
            h.append(k, v.clone());
        }
    }
    for (k, v) in trailers {
        if is_status_key(k.as_str()) {
            continue;
        }
        if let Ok(name) = HeaderName::from_bytes(format!("trailer-{}", k.as_str()).as_bytes()) {
            h.append(name, v.clone());
        }
    }
    let body = if ok {
        message.unwrap_or_default()
    } else {
        Bytes::from(serde_json::to_vec(&error_json(trailers)).unwrap_or_default())
    };
    Response { head: Head { status: http_status(code), headers: h }, body }
}

/// Trims trailing ASCII whitespace and base64 padding from a header value.
trait TrimEnd {
    fn trim_ascii_end_matches(&self) -> &[u8];
}

impl TrimEnd for [u8] {
    fn trim_ascii_end_matches(&self) -> &[u8] {
        let mut s = self.trim_ascii();
        while let [rest @ .., b'='] = s {
            s = rest;
        }
        s
    }
}

/// Headers with gRPC's `grpc-accept-encoding` (sent with a refused
/// encoding) under Connect's name for it: `accept-encoding` for unary,
/// `connect-accept-encoding` for streams.
pub fn accept_encoding_header(headers: &HeaderMap, name: &'static str) -> HeaderMap {
    let mut h = headers.clone();
    if let Some(v) = h.remove("grpc-accept-encoding") {
        h.insert(name, v);
    }
    h
}

/// Why a GET query is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GetError {
    /// A codec other than proto or json: 415.
    Codec(String),
    /// Anything else: invalid_argument.
    Query(String),
}

impl std::fmt::Display for GetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GetError::Codec(m) | GetError::Query(m) => f.write_str(m),
        }
    }
}

/// A Connect GET request (`?connect=v1&encoding=…&message=…`), for
/// methods without side effects: what the query says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetRequest {
    pub codec: Codec,
    /// The message, decoded from the query (still compressed when
    /// `compression` says so).
    pub message: Bytes,
    /// The `compression` parameter, when not `identity`.
    pub compression: Option<String>,
}

/// Reads a Connect GET query; the error names the parameter at fault.
pub fn parse_get(query: &str) -> Result<GetRequest, GetError> {
    let mut encoding = None;
    let mut message = None;
    let mut base64 = false;
    let mut compression = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent::decode_bytes(v, true);
        match k {
            "encoding" => encoding = Some(v),
            "message" => message = Some(v),
            "base64" => base64 = v == b"1",
            "compression" => compression = Some(String::from_utf8_lossy(&v).into_owned()),
            "connect" if v != b"v1" => {
                let v = String::from_utf8_lossy(&v);
                return Err(GetError::Query(format!("connect={v} is not supported: use connect=v1")));
            }
            _ => {}
        }
    }
    let codec = match encoding.as_deref() {
        Some(b"proto") => Codec::Proto,
        Some(b"json") => Codec::Json,
        Some(other) => {
            let other = String::from_utf8_lossy(other);
            return Err(GetError::Codec(format!("encoding={other} is not supported: use proto or json")));
        }
        None => return Err(GetError::Query("the query has no encoding parameter".into())),
    };
    let Some(message) = message else { return Err(GetError::Query("the query has no message parameter".into())) };
    let message = if base64 {
        let text: Vec<u8> = message
            .iter()
            .filter(|&&b| b != b'=')
            .map(|&b| match b {
                b'+' | b' ' => b'-',
                b'/' => b'_',
                b => b,
            })
            .collect();
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&text)
            .map_err(|e| GetError::Query(format!("the message parameter is not base64: {e}")))?
    } else {
        message
    };
    let compression = compression.filter(|c| c != "identity");
    Ok(GetRequest { codec, message: Bytes::from(message), compression })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trailers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut t = HeaderMap::new();
        for (k, v) in pairs {
            t.append(*k, HeaderValue::from_str(v).unwrap());
        }
        t
    }

    #[test]
    fn every_code_has_its_http_status() {
        let table = [
            (1, 499, "canceled"),
            (2, 500, "unknown"),
            (3, 400, "invalid_argument"),
            (4, 504, "deadline_exceeded"),
            (5, 404, "not_found"),
            (6, 409, "already_exists"),
            (7, 403, "permission_denied"),
            (8, 429, "resource_exhausted"),
            (9, 400, "failed_precondition"),
            (10, 409, "aborted"),
            (11, 400, "out_of_range"),
            (12, 501, "unimplemented"),
            (13, 500, "internal"),
            (14, 503, "unavailable"),
            (15, 500, "data_loss"),
            (16, 401, "unauthenticated"),
        ];
        for (code, status, name) in table {
            assert_eq!((http_status(code), code_name(code)), (status, name), "code {code}");
        }
    }

    #[test]
    fn errors_carry_code_message_and_details() {
        let status = RpcStatus {
            code: 5,
            message: "gone".into(),
            details: vec![Any { type_url: "type.googleapis.com/google.rpc.ErrorInfo".into(), value: vec![10, 1, 120] }],
        };
        let bin = base64::engine::general_purpose::STANDARD_NO_PAD.encode(status.encode_to_vec());
        let t = trailers(&[("grpc-status", "5"), ("grpc-message", "room%20gone"), ("grpc-status-details-bin", &bin)]);
        assert_eq!(
            error_json(&t),
            json!({"code": "not_found", "message": "room gone", "details": [{"type": "google.rpc.ErrorInfo", "value": "CgF4"}]})
        );
        let r = unary(&HeaderMap::new(), &t, None, Codec::Proto);
        assert_eq!(r.head.status, 404);
        assert_eq!(r.head.headers["content-type"], "application/json");
    }

    #[test]
    fn unary_trailers_become_headers() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        h.insert("x-head", HeaderValue::from_static("1"));
        let t = trailers(&[("grpc-status", "0"), ("x-trail", "2")]);
        let r = unary(&h, &t, Some(Bytes::from_static(b"\x0a\x01a")), Codec::Proto);
        assert_eq!(r.head.status, 200);
        assert_eq!(r.head.headers["content-type"], "application/proto");
        assert_eq!(r.head.headers["x-head"], "1");
        assert_eq!(r.head.headers["trailer-x-trail"], "2");
        assert!(r.head.headers.get("trailer-grpc-status").is_none());
        assert_eq!(&r.body[..], b"\x0a\x01a");
    }

    #[test]
    fn streams_end_with_json() {
        let end = end_stream(&trailers(&[("grpc-status", "0"), ("x-t", "a"), ("x-t", "b")]));
        assert_eq!(end[0], END_STREAM_FLAG);
        assert_eq!(&end[5..], br#"{"metadata":{"x-t":["a","b"]}}"#);
        let end = end_stream(&trailers(&[("grpc-status", "14"), ("grpc-message", "down")]));
        assert_eq!(&end[5..], br#"{"error":{"code":"unavailable","message":"down"}}"#);
        assert_eq!(&end_stream(&trailers(&[("grpc-status", "0")]))[5..], b"{}");
    }

    #[test]
    fn timeouts_parse() {
        assert_eq!(parse_timeout(b"1500"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_timeout(b""), None);
        assert_eq!(parse_timeout(b"12345678901"), None);
        assert_eq!(parse_timeout(b"1s"), None);
    }

    #[test]
    fn get_queries_parse() {
        let g = parse_get("connect=v1&encoding=json&message=%7B%22id%22%3A%22a%20b%22%7D").unwrap();
        assert_eq!((g.codec, &g.message[..], g.compression), (Codec::Json, &br#"{"id":"a b"}"#[..], None));
        let g = parse_get("encoding=proto&base64=1&message=CgFh&compression=identity").unwrap();
        assert_eq!(&g.message[..], b"\x0a\x01a");
        assert!(parse_get("message=x").unwrap_err().to_string().contains("encoding"));
        assert!(parse_get("encoding=proto").unwrap_err().to_string().contains("message"));
        assert!(matches!(parse_get("encoding=xml&message="), Err(GetError::Codec(m)) if m.contains("xml")));
        assert!(parse_get("encoding=proto&base64=1&message=%%%").unwrap_err().to_string().contains("base64"));
    }
}
