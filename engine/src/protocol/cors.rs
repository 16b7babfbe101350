//! CORS for browser clients (gRPC-Web, Connect): the answer to a
//! preflight `OPTIONS` request, and the headers that let a page read a
//! response's status, metadata and trailers. Allowed origins come from
//! `--cors-origins`: any origin without credentials (the default), or a
//! list whose members may send credentials.

use http::{HeaderMap, HeaderName, HeaderValue};

/// Request headers browsers' gRPC-Web and Connect clients send, allowed in
/// every preflight answer (with whatever else the preflight asks for).
const ALLOW_HEADERS: &str = "content-type, connect-protocol-version, connect-timeout-ms, connect-content-encoding, \
     connect-accept-encoding, content-encoding, accept-encoding, grpc-timeout, grpc-encoding, grpc-accept-encoding, \
     x-grpc-web, x-user-agent";

/// Response headers a page may read besides the CORS-safelisted ones.
const EXPOSE_HEADERS: &[&str] = &[
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "grpc-encoding",
    "grpc-accept-encoding",
    "connect-content-encoding",
    "connect-accept-encoding",
    "content-encoding",
];

/// The `Access-Control-Allow-Origin` (and credentials) a request from
/// `origin` gets, None when the origin is not allowed.
fn allow_origin(origins: &[String], origin: &[u8], h: &mut HeaderMap) -> bool {
    if origins.is_empty() {
        h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
        return true;
    }
    let listed = origins.iter().any(|o| o.as_bytes().eq_ignore_ascii_case(origin));
    h.append(http::header::VARY, HeaderValue::from_static("origin"));
    if !listed {
        return false;
    }
    if let Ok(v) = HeaderValue::from_bytes(origin) {
        h.insert("access-control-allow-origin", v);
        h.insert("access-control-allow-credentials", HeaderValue::from_static("true"));
    }
    true
}

/// The headers of the answer (204) to a preflight request from `origin`
/// asking for `requested` headers; Err, with the headers a refusal (403)
/// carries, when the origin is not allowed (the browser then refuses the
/// call itself).
pub fn preflight(origins: &[String], origin: &[u8], requested: Option<&[u8]>) -> Result<HeaderMap, HeaderMap> {
    let mut h = HeaderMap::new();
    if !allow_origin(origins, origin, &mut h) {
        return Err(h);
    }
    h.insert("access-control-allow-methods", HeaderValue::from_static("POST, GET, OPTIONS"));
    let mut allow = ALLOW_HEADERS.to_string();
    if let Some(r) = requested.and_then(|r| std::str::from_utf8(r).ok()) {
        // The metadata the page sends (rules may read any of it).
        for name in r.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let known = allow.split(", ").any(|a| a.eq_ignore_ascii_case(name));
            if !known && HeaderName::from_bytes(name.as_bytes()).is_ok() {
                allow.push_str(", ");
                allow.push_str(name);
            }
        }
    }
    if let Ok(v) = HeaderValue::from_str(&allow) {
        h.insert("access-control-allow-headers", v);
    }
    h.insert("access-control-max-age", HeaderValue::from_static("7200"));
    Ok(h)
}

/// Adds to a response's headers what lets a page from `origin` read it:
/// the allowed origin, and every header it carries (metadata, Connect's
/// `trailer-` headers, the gRPC status) as exposed.
pub fn decorate(origins: &[String], origin: &[u8], h: &mut HeaderMap) {
    let mut expose: Vec<&str> = EXPOSE_HEADERS.to_vec();
    for k in h.keys() {
        let k = k.as_str();
        if k != "content-type" && k != "content-length" && !expose.contains(&k) {
            expose.push(k);
        }
    }
    let expose = expose.join(", ");
    if !allow_origin(origins, origin, h) {
        return;
    }
    if let Ok(v) = HeaderValue::from_str(&expose) {
        h.insert("access-control-expose-headers", v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_origin_without_credentials() {
        let h = preflight(&[], b"http://a.test", Some(b"x-role, connect-protocol-version")).unwrap();
        assert_eq!(h["access-control-allow-origin"], "*");
        assert!(h.get("access-control-allow-credentials").is_none());
        let allow = h["access-control-allow-headers"].to_str().unwrap();
        assert!(allow.contains("x-grpc-web") && allow.ends_with("x-user-agent, x-role"));
        assert_eq!(h["access-control-allow-methods"], "POST, GET, OPTIONS");
    }

    #[test]
    fn listed_origins_with_credentials() {
        let origins = vec!["https://app.test".to_string()];
        let h = preflight(&origins, b"https://app.test", None).unwrap();
        assert_eq!(h["access-control-allow-origin"], "https://app.test");
        assert_eq!(h["access-control-allow-credentials"], "true");
        let refused = preflight(&origins, b"https://evil.test", None).unwrap_err();
        assert_eq!(refused["vary"], "origin");
        assert!(refused.get("access-control-allow-origin").is_none());
    }

    #[test]
    fn responses_expose_their_headers() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/proto"));
        h.insert("x-served-by", HeaderValue::from_static("w"));
        h.insert("trailer-error-id", HeaderValue::from_static("1"));
        decorate(&[], b"http://a.test", &mut h);
        let expose = h["access-control-expose-headers"].to_str().unwrap();
        assert!(expose.contains("grpc-status-details-bin"));
        assert!(expose.contains("x-served-by") && expose.contains("trailer-error-id"));
        assert!(!expose.contains("content-type"));
        assert_eq!(h["access-control-allow-origin"], "*");
    }
}
