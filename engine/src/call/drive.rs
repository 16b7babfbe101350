//! A call, driven from its request messages to its end, whatever carries
//! it: rule selection, delays, injected faults, streamed answers with
//! their pacing, duplex calls and the deadline. The transport and the
//! protocol stand behind two traits: [`Inbound`] gives the request
//! messages (unframed protobuf), [`Outbound`] takes the answer in call
//! terms (initial metadata, messages, the end) and frames it.
//!
//! The engine's own HTTP/2 stack answers the common unary call without
//! this (from the read buffer, in the frame that completes it) and runs
//! its tasks on its streams; every other transport runs this.

use super::matcher::{Messages, Metadata};
use super::{deadline_exceeded, fault_fires, pick_explained, prepare_fault, sleep_until, Answer, Schedule};
use crate::observe::record::CallRecord;
use crate::protocol::grpc::{Code, Status};
use crate::served::{status_answer, Prepared, ServedMethod};
use bytes::Bytes;
use std::future::Future;
use tokio::time::Instant;
use wirestub_plan::MethodKind;

/// Streamed messages sent before the driver yields to other calls.
const ITEMS_PER_TURN: u64 = 64;

/// The request side of a call.
pub trait Inbound {
    /// The next request message (unframed, decoded), None once the client
    /// has finished sending; an error ends the call with that status.
    fn next(&mut self) -> impl Future<Output = Result<Option<Bytes>, Status>>;
}

/// The response side of a call, in call terms; the protocol frames it.
pub trait Outbound {
    /// The response headers: `p`'s initial metadata.
    fn head(&mut self, p: &Prepared);
    /// Resolves once a message of `len` bytes may be sent (the client
    /// takes what was sent before); Gone when the client has left.
    fn ready(&mut self, len: usize) -> impl Future<Output = Result<(), Gone>>;
    /// One response message, gRPC-framed.
    fn message(&mut self, framed: Bytes);
    /// Ends the call with `p`'s status and trailing metadata (a response
    /// without messages when no head went out).
    fn end(&mut self, p: &Prepared);
    /// Ends the call abruptly (an injected `drop` fault).
    fn abort(&mut self);
}

/// The client has left: nothing more can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// How a call stopped before its natural end.
enum Stop<'m> {
    Status(Status),
    Rule(&'m Prepared),
    Gone,
}

impl From<Gone> for Stop<'_> {
    fn from(_: Gone) -> Self {
        Stop::Gone
    }
}

impl From<Status> for Stop<'_> {
    fn from(s: Status) -> Self {
        Stop::Status(s)
    }
}

/// What the call needs besides its messages.
pub struct Call<'m, 'r, M: Metadata + ?Sized> {
    pub method: &'m ServedMethod,
    /// The request metadata rules read.
    pub metadata: &'m M,
    pub deadline: Option<Instant>,
    /// The response of a duplex call that ends well.
    pub ok: &'m Prepared,
    /// The client speaks the JSON codec: answers go out transcoded.
    pub json: bool,
    pub record: &'r mut CallRecord<'m>,
}

/// Runs one call to its end.
pub async fn run<M, I, O>(call: Call<'_, '_, M>, input: &mut I, out: &mut O)
where
    M: Metadata + ?Sized,
    I: Inbound,
    O: Outbound,
{
    let Call { method, metadata, deadline, ok, json, record } = call;
    let work = async {
        if method.plan.duplex {
            return duplex(method, metadata, ok, json, input, out, record).await;
        }
        let answer = match method.plan.kind {
            MethodKind::Unary | MethodKind::ServerStreaming => {
                let Some(m) = input.next().await? else {
                    return Err(Status::new(Code::Unimplemented, "unary method received no request message").into());
                };
                record.message(&m);
                if input.next().await?.is_some() {
                    return Err(Status::new(
                        Code::Unimplemented,
                        "unary method received more than one request message",
                    )
                    .into());
                }
                let one = [&m[..]];
                pick_explained(method, &Messages::one(&one), metadata, record.explain())?
            }
            MethodKind::ClientStreaming | MethodKind::BidiStreaming => {
                let mut head: Vec<Bytes> = Vec::new();
                let mut last: Option<Bytes> = None;
                let mut count = 0usize;
                while let Some(m) = input.next().await? {
                    count += 1;
                    record.message(&m);
                    if head.len() < method.keep {
                        head.push(m);
                    } else {
                        last = Some(m);
                    }
                }
                let refs: Vec<&[u8]> = head.iter().map(|b| &b[..]).collect();
                let last = last.as_deref().or(refs.last().copied());
                pick_explained(method, &Messages { head: &refs, last, count }, metadata, record.explain())?
            }
        };
        record.rule(answer.rule, answer.closest);
        let prepared = answer.prepared;
        let delay = prepared.draw_delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if deadline.is_some_and(|d| d <= Instant::now()) {
            // A deadline shorter than the timers' resolution.
            return Err(deadline_exceeded().into());
        }
        if let Some(fault) = fault_fires(prepared) {
            if fault.drop {
                return Ok(Some(Fault::Drop));
            }
            return Ok(Some(Fault::Status(Box::new(prepare_fault(fault)))));
        }
        if prepared.status != 0 && prepared.stream.is_empty() {
            return Err(Stop::Rule(prepared));
        }
        out.head(prepared);
        send_items(&answer, method, json, out).await?;
        if prepared.status != 0 {
            return Err(Stop::Rule(prepared));
        }
        record.status(0, "");
        out.end(prepared);
        Ok(None)
    };
    let result = tokio::select! {
        r = work => r,
        _ = sleep_until(deadline) => Err(deadline_exceeded().into()),
    };
    let owned;
    let end = match result {
        Ok(None) => return,
        Ok(Some(Fault::Drop)) => {
            record.status(Code::Internal as u8, "stream reset by an injected fault");
            return out.abort();
        }
        Ok(Some(Fault::Status(p))) => {
            owned = *p;
            &owned
        }
        Err(Stop::Rule(p)) => p,
        Err(Stop::Gone) => return,
        Err(Stop::Status(s)) => {
            owned = status_answer(&s);
            &owned
        }
    };
    record.status(end.status, message_of(end));
    out.end(end);
}

/// An injected fault that fired.
enum Fault {
    Drop,
    Status(Box<Prepared>),
}

/// Sends an answer's messages, each once the client takes the previous
/// ones, pausing between them as the rule says.
async fn send_items<O: Outbound>(
    answer: &Answer<'_>,
    method: &ServedMethod,
    json: bool,
    out: &mut O,
) -> Result<(), Gone> {
    let prepared = answer.prepared;
    if prepared.stream.is_empty() && prepared.status != 0 {
        return Ok(());
    }
    let json_items;
    let items = if json {
        json_items = answer.json_messages(method);
        &json_items[..]
    } else {
        answer.messages()
    };
    let mut schedule = Schedule::new(prepared, items.len());
    while let Some(i) = schedule.next() {
        if schedule.sent() % ITEMS_PER_TURN == 0 {
            tokio::task::yield_now().await;
        }
        if schedule.sent() > 1 && !prepared.stream_delay.is_zero() {
            tokio::time::sleep(prepared.stream_delay).await;
        }
        let item = items[i].clone();
        out.ready(item.len()).await?;
        out.message(item);
    }
    Ok(())
}

/// A duplex call: each request message answered as it comes; OK once the
/// client finishes, or a rule's error status.
async fn duplex<'m, M, I, O>(
    method: &'m ServedMethod,
    metadata: &M,
    ok: &'m Prepared,
    json: bool,
    input: &mut I,
    out: &mut O,
    record: &mut CallRecord<'_>,
) -> Result<Option<Fault>, Stop<'m>>
where
    M: Metadata + ?Sized,
    I: Inbound,
    O: Outbound,
{
    let mut head_sent = false;
    while let Some(m) = input.next().await? {
        record.message(&m);
        let one = [&m[..]];
        let answer = pick_explained(method, &Messages::one(&one), metadata, record.explain())?;
        record.rule(answer.rule, answer.closest);
        let prepared = answer.prepared;
        let delay = prepared.draw_delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if prepared.status != 0 && prepared.error_after == 0 {
            return Err(Stop::Rule(prepared));
        }
        if !head_sent {
            out.head(prepared);
            head_sent = true;
        }
        send_items(&answer, method, json, out).await?;
        if prepared.status != 0 {
            return Err(Stop::Rule(prepared));
        }
    }
    Err(Stop::Rule(ok))
}

/// A prepared response's `grpc-message`, as sent (percent-encoded).
fn message_of(p: &Prepared) -> &str {
    p.trailers.get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or("")
}
