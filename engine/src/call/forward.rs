//! A call the engine has no answer for, forwarded to the upstream and its
//! answer relayed, whatever protocol the client speaks: the request
//! messages as they come ([`Inbound`], after any the engine read to look
//! for a rule), the upstream's headers, messages and trailers out through
//! [`Outbound`] as they arrive. Both directions run at once (full-duplex
//! bidi) and both are flow-controlled: a request message is sent as the
//! upstream's window allows, a response message is taken from the
//! upstream (its window returned) only once the client may be sent it.
//!
//! Messages are not decoded: they travel as bytes, uncompressed (the
//! engine inflates what the client compressed and asks the upstream for
//! no compression, so each protocol compresses its answer as it would a
//! rule's); only a client of the JSON codec gets them transcoded. The
//! call ends with the upstream's status, message and trailers unchanged,
//! or with the engine's own: the client's deadline (the upstream is told
//! what is left of it), the client's malformed input, or UNAVAILABLE for
//! an upstream that cannot be reached. Dropping the future (the client
//! left) resets the upstream's stream.

use super::drive::{Halt, Inbound, Outbound, Report};
use super::{deadline_exceeded, sleep_until};
use crate::codec::json::JsonCodec;
use crate::config::{Upstream, UpstreamMode};
use crate::protocol::compression::Encoding;
use crate::protocol::grpc::{Code, Status};
use crate::served::{prepare, status_answer, Prepared, ServedMethod};
use crate::upstream::{self, answer, record, record::Capture};
use bytes::{BufMut, Bytes, BytesMut};
use h2::SendStream;
use std::cell::RefCell;
use std::future::poll_fn;
use std::time::Duration;
use tokio::time::Instant;

/// Bytes of request messages a client stream may hold while its rules are
/// tried, should none answer and the call go to the upstream (each message
/// counting [`HELD_OVERHEAD`] more than its bytes). Past it the call is the
/// mock's: it keeps only what its rules read, and no rule answering gets
/// the mock's no-match answer.
pub const HOLD: usize = 8 << 20;

/// What a message held for the upstream counts for besides its bytes.
pub const HELD_OVERHEAD: usize = 64;

/// What a forwarded call needs besides its messages. A call carries it
/// boxed (`Option<Box<Forward>>`): calls without an upstream pay one word.
pub struct Forward<'a> {
    pub upstream: &'a Upstream,
    /// `/package.Service/Method`.
    pub path: Box<str>,
    /// The client's metadata, every entry in order.
    pub metadata: Vec<(Box<str>, Bytes)>,
    pub deadline: Option<Instant>,
    /// The client speaks the JSON codec: response messages go out
    /// transcoded with the method's mapping.
    pub json: Option<&'a JsonCodec>,
    /// The process-wide budget the messages held for the upstream count in
    /// (`--max-buffered-bytes`).
    pub max_held: usize,
    /// The protocol the client spoke, as its content type (recordings made
    /// without protos expect it on replay).
    pub content_type: &'static str,
    /// How the client compressed its messages (the recording notes it).
    pub encoding: crate::protocol::compression::Encoding,
}

impl Forward<'_> {
    /// Whether the call goes to the upstream before any rule is tried:
    /// every call in `--upstream-mode always`, and calls to a method
    /// without rules (one the plan lacks among them), which no rule can
    /// answer; these are forwarded as they come, message by message.
    pub fn from_start(&self, method: &ServedMethod) -> bool {
        self.upstream.mode == UpstreamMode::Always || method.plan.rules.is_empty()
    }
}

/// Every metadata entry of a request head, in order, as [`Forward`]
/// takes them.
pub fn metadata_of(headers: &http::HeaderMap) -> Vec<(Box<str>, Bytes)> {
    headers.iter().map(|(n, v)| (n.as_str().into(), Bytes::copy_from_slice(v.as_bytes()))).collect()
}

/// Response headers the engine does not relay: connection-specific ones,
/// and those it sets itself for the client's protocol.
const NOT_RELAYED: &[&str] =
    &["content-type", "content-length", "grpc-encoding", "grpc-accept-encoding", "transfer-encoding", "connection"];

/// How a forwarded call ends.
enum End {
    /// The upstream's status and trailers.
    Upstream(Box<Prepared>),
    /// The engine's own status.
    Status(Status),
    /// The client has left.
    Gone,
}

impl From<Status> for End {
    fn from(s: Status) -> Self {
        End::Status(s)
    }
}

impl From<Halt> for End {
    fn from(h: Halt) -> Self {
        match h {
            Halt::Gone => End::Gone,
            Halt::Status(s) => End::Status(s),
        }
    }
}

/// Forwards a call: `first` are the request messages already read (the
/// engine looked for a rule in them), the rest come from `input`.
pub async fn run<I: Inbound, O: Outbound, R: Report>(
    f: Box<Forward<'_>>,
    first: Vec<Bytes>,
    input: &mut I,
    out: &mut O,
    record: &mut R,
) {
    let capture =
        record::recording().then(|| RefCell::new(Capture::new(&f.path, &f.metadata, f.content_type, f.encoding)));
    let work = async {
        let timeout = f.deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if timeout.is_some_and(|t| t.is_zero()) {
            return End::Status(deadline_exceeded());
        }
        let opened = match upstream::open(f.upstream, &f.path, &f.metadata, timeout).await {
            Ok(o) => o,
            Err(s) => return End::Status(s),
        };
        let mut send = opened.send;
        let capture = capture.as_ref();
        let requests = async {
            for m in first {
                keep_request(capture, &m);
                if send_message(&mut send, &m).await.is_err() {
                    return std::future::pending().await;
                }
            }
            loop {
                match input.next().await {
                    Ok(Some(m)) => {
                        record.message(&m);
                        keep_request(capture, &m);
                        if send_message(&mut send, &m).await.is_err() {
                            // The upstream ended the call; its answer says how.
                            return std::future::pending().await;
                        }
                    }
                    Ok(None) => {
                        send.send_data(Bytes::new(), true).ok();
                        return std::future::pending().await;
                    }
                    Err(s) => return End::Status(s),
                }
            }
        };
        let responses = relay(&f, opened.response, out, capture);
        tokio::select! {
            end = responses => end,
            end = requests => end,
        }
    };
    let started = Instant::now();
    let end = tokio::select! {
        end = work => end,
        _ = sleep_until(f.deadline) => End::Status(deadline_exceeded()),
    };
    let failed = matches!(&end, End::Status(s) if s.code == Code::Unavailable || s.code == Code::Internal);
    record.forwarded(&f.path, started.elapsed(), failed);
    let owned;
    let p = match end {
        End::Gone => return,
        End::Upstream(p) => {
            owned = *p;
            if let Some(c) = capture {
                let mut c = c.into_inner();
                c.status = owned.status;
                c.message = super::drive::message_of(&owned).to_string();
                c.trailers =
                    pairs(&owned.trailers).filter(|(n, _)| n != "grpc-status" && n != "grpc-message").collect();
                record::submit(c);
            }
            &owned
        }
        End::Status(s) => {
            owned = status_answer(&s);
            &owned
        }
    };
    record.status(p.status, super::drive::message_of(p));
    out.end(p);
}

/// Keeps a request message for the recording, with how many replies came
/// before it.
fn keep_request(capture: Option<&RefCell<Capture>>, m: &Bytes) {
    if let Some(c) = capture {
        let mut c = c.borrow_mut();
        if c.take(m.len()) {
            let before = c.replies.len();
            c.replies_before.push(before);
            c.requests.push(m.clone());
        }
    }
}

/// A header map's entries as owned pairs.
fn pairs(map: &http::HeaderMap) -> impl Iterator<Item = (String, Vec<u8>)> + '_ {
    map.iter().map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
}

/// One request message to the upstream, gRPC-framed and uncompressed, as
/// its window allows.
async fn send_message(send: &mut SendStream<Bytes>, message: &[u8]) -> Result<(), h2::Error> {
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    framed.put_u32(message.len() as u32);
    framed.put_slice(message);
    let mut data = framed.freeze();
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let n = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(n) => n?,
            None => return Err(h2::Error::from(h2::Reason::CANCEL)),
        };
        if n == 0 {
            continue;
        }
        let chunk = data.split_to(n.min(data.len()));
        send.send_data(chunk, false)?;
    }
    Ok(())
}

/// The upstream's answer to the client: headers, each message once the
/// client may take it, then the status and trailers.
async fn relay<O: Outbound>(
    f: &Forward<'_>,
    response: h2::client::ResponseFuture,
    out: &mut O,
    capture: Option<&RefCell<Capture>>,
) -> End {
    let up = f.upstream;
    let failed = |e: h2::Error| End::Status(failure(up, &e));
    let response = match response.await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let (head, mut body) = response.into_parts();
    if head.status != http::StatusCode::OK {
        let code = upstream::http_status_code(head.status.as_u16());
        let msg = format!("upstream {} answered HTTP {}", up.url, head.status.as_u16());
        return End::Status(Status::new(code, msg));
    }
    if head.headers.contains_key("grpc-status") {
        // Trailers-only: the status in the headers, no messages.
        return End::Upstream(Box::new(ending(&head.headers)));
    }
    let encoding = head.headers.get("grpc-encoding").map(|v| Encoding::parse(v.as_bytes()));
    let encoding = match encoding {
        None => Encoding::Identity,
        Some(Some(e)) => e,
        Some(None) => {
            let msg = format!("upstream {} compressed its answer in an encoding the engine lacks", up.url);
            return End::Status(Status::new(Code::Internal, msg));
        }
    };
    let metadata = relayed(&head.headers);
    if let Some(c) = capture {
        c.borrow_mut().headers = metadata.clone();
    }
    out.head(&prepare(0, "", Bytes::new(), &metadata, &[], Duration::ZERO));
    let mut messages = answer::Messages::new(up.max_message, encoding);
    let mut last = Instant::now();
    while let Some(chunk) = body.data().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return failed(e),
        };
        let n = chunk.len();
        messages.push(&chunk);
        drop(chunk);
        loop {
            let message = match messages.cut() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => return End::Status(bad_answer(up, &e)),
            };
            if let Some(c) = capture {
                let mut c = c.borrow_mut();
                if c.take(message.len()) {
                    let now = Instant::now();
                    c.replies.push((message.slice(5..), now - last));
                    last = now;
                }
            }
            let message = match f.json.map(|codec| (codec, codec.try_response(&message))) {
                Some((_, Some(json))) => json,
                Some((codec, None)) => {
                    // A JSON client would get `{}`: say what happened instead.
                    let msg =
                        format!("upstream {} sent a message that does not decode as {}", up.url, codec.output_name());
                    return End::Status(Status::new(Code::Internal, msg));
                }
                None => message,
            };
            if let Err(h) = out.ready(message.len()).await {
                return h.into();
            }
            out.message(message);
        }
        // Window back only for what went on to the client.
        body.flow_control().release_capacity(n).ok();
    }
    if let Err(e) = messages.finish() {
        return End::Status(bad_answer(up, &e));
    }
    match body.trailers().await {
        Ok(Some(t)) => End::Upstream(Box::new(ending(&t))),
        Ok(None) => End::Status(Status::new(Code::Internal, format!("upstream {} sent no grpc-status", up.url))),
        Err(e) => failed(e),
    }
}

/// The status for an answer the upstream should not have sent.
fn bad_answer(up: &Upstream, e: &str) -> Status {
    let code = if e.contains("over the limit") { Code::ResourceExhausted } else { Code::Internal };
    Status::new(code, format!("upstream {}: {e}", up.url))
}

/// The status for a failure of the upstream's connection or stream.
fn failure(up: &Upstream, e: &h2::Error) -> Status {
    match e.reason() {
        Some(h2::Reason::CANCEL) => Status::new(Code::Canceled, format!("upstream {} canceled the call", up.url)),
        Some(h2::Reason::REFUSED_STREAM) => {
            Status::new(Code::Unavailable, format!("upstream {} refused the call", up.url))
        }
        _ => Status::new(Code::Unavailable, format!("upstream {}: {e}", up.url)),
    }
}

/// The upstream's headers the client gets as its response metadata.
fn relayed(headers: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        // The engine answers CORS itself (`protocol/cors.rs`): the
        // upstream's access-control headers would contradict it.
        .filter(|(n, _)| !NOT_RELAYED.contains(&n.as_str()) && !n.as_str().starts_with("access-control-"))
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

/// The end of the upstream's answer: its status, message (as sent,
/// percent-encoded) and trailers (for a trailers-only answer, the
/// metadata that came in the same block).
fn ending(block: &http::HeaderMap) -> Prepared {
    let status = answer::status(block);
    let message = block.get("grpc-message").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let trailers: Vec<(String, Vec<u8>)> =
        relayed(block).into_iter().filter(|(n, _)| n != "grpc-status" && n != "grpc-message").collect();
    prepare(status, message.as_deref().unwrap_or(""), Bytes::new(), &[], &trailers, Duration::ZERO)
}
