//! The plan as the engine serves it: built once at load time from a
//! validated [`Plan`], immutable afterwards and shared by every worker.
//!
//! Everything a response needs is prepared here (framed body as `Bytes`,
//! header and trailer maps), so answering a call is a few reference-count
//! bumps and map clones, never an encode.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use std::collections::HashMap;
use std::time::Duration;
use wirestub_plan::{Method, MethodKind, Plan};

/// What the engine does with a call to a known method that no rule answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoMatch {
    /// NOT_FOUND, with a message naming the method.
    #[default]
    NotFound,
    /// OK with an empty message, as Wishmock does.
    EmptyOk,
}

/// A response ready to send.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub status: u8,
    /// The framed message; empty for errors.
    pub body: Bytes,
    /// Response headers: content-type and initial metadata; for errors, also
    /// the status (a trailers-only response).
    pub headers: HeaderMap,
    /// grpc-status, grpc-message and trailing metadata (unused for errors).
    pub trailers: HeaderMap,
    pub delay: Duration,
}

pub struct ServedMethod {
    pub plan: Method,
    pub responses: Vec<Prepared>,
    /// The answer when no rule matches.
    pub no_match: Prepared,
}

pub struct Served {
    pub methods: Vec<ServedMethod>,
    by_path: HashMap<Box<str>, usize>,
}

fn content_type() -> (HeaderName, HeaderValue) {
    (http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"))
}

/// Builds a response from its parts. Names and values were validated when
/// the plan was loaded, so conversion cannot fail; a failure would be a bug
/// in the plan validator, and the pair is skipped rather than crash.
pub fn prepare(
    status: u8,
    message: &str,
    body: Bytes,
    headers: &[(String, Vec<u8>)],
    trailers: &[(String, Vec<u8>)],
    delay: Duration,
) -> Prepared {
    let mut h = HeaderMap::with_capacity(headers.len() + 3);
    let (k, v) = content_type();
    h.insert(k, v);
    let append = |map: &mut HeaderMap, pairs: &[(String, Vec<u8>)]| {
        for (k, v) in pairs {
            if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_bytes(v)) {
                map.append(k, v);
            }
        }
    };
    append(&mut h, headers);
    let mut t = HeaderMap::with_capacity(trailers.len() + 2);
    t.insert("grpc-status", HeaderValue::from(status as u16));
    if !message.is_empty() {
        if let Ok(m) = HeaderValue::from_str(message) {
            t.insert("grpc-message", m);
        }
    }
    append(&mut t, trailers);
    if status != 0 {
        // Trailers-only: one HEADERS frame carries everything.
        h.extend(t.drain());
        t = HeaderMap::new();
    }
    Prepared { status, body, headers: h, trailers: t, delay }
}

/// A response for a status the engine produces itself.
pub fn status_response(code: u8, message: &str) -> Prepared {
    prepare(code, &wirestub_plan::percent_encode_message(message), Bytes::new(), &[], &[], Duration::ZERO)
}

impl Served {
    pub fn new(plan: Plan, no_match: NoMatch) -> Served {
        let mut methods = Vec::with_capacity(plan.methods.len());
        let mut by_path = HashMap::with_capacity(plan.methods.len());
        for m in plan.methods {
            let responses = m
                .responses
                .iter()
                .map(|r| {
                    prepare(
                        r.status,
                        &r.message,
                        Bytes::from(r.body.clone()),
                        &r.headers,
                        &r.trailers,
                        Duration::from_millis(r.delay_ms as u64),
                    )
                })
                .collect();
            let no_match = match no_match {
                NoMatch::NotFound => status_response(5, &format!("no rule matches this request to {}", &m.path[1..])),
                NoMatch::EmptyOk => prepare(0, "", Bytes::from_static(&[0, 0, 0, 0, 0]), &[], &[], Duration::ZERO),
            };
            by_path.insert(m.path.clone().into_boxed_str(), methods.len());
            methods.push(ServedMethod { plan: m, responses, no_match });
        }
        Served { methods, by_path }
    }

    pub fn method(&self, path: &str) -> Option<&ServedMethod> {
        self.by_path.get(path).map(|&i| &self.methods[i])
    }

    pub fn is_unary(m: &ServedMethod) -> bool {
        m.plan.kind == MethodKind::Unary
    }
}
