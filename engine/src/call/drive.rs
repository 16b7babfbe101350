//! A call, driven from its request messages to its end, whatever carries
//! it: rule selection, delays, injected faults, streamed answers with
//! their pacing, duplex calls and the deadline. The transport and the
//! protocol stand behind three traits: [`Inbound`] gives the request
//! messages (unframed protobuf), [`Outbound`] takes the answer in call
//! terms (initial metadata, messages, the end) and frames it, [`Report`]
//! takes what observers want to know (the rule, the status).
//!
//! Every transport runs its calls here: HTTP/1.1 and `h2` whole calls
//! ([`run`]); the engine's own HTTP/2 stack, which picks the rule itself
//! as the request arrives and answers the common unary call from the read
//! buffer, hands its delayed and streamed answers to [`respond`] and its
//! duplex calls to [`duplex`].

use super::forward::{self, Forward};
use super::matcher::{Closest, Messages, Metadata};
use super::picks::Fold;
use super::{
    client_status, deadline_exceeded, pick_shared, prepare_fault, sleep_until, status_fault_text, Answer, Schedule,
};
use crate::codec::wire::Malformed;
use crate::protocol::grpc::{Code, Status};
use crate::served::{status_answer, Prepared, ServedMethod};
use bytes::Bytes;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;
use wirestub_plan::{MethodKind, TransportFault};

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
    /// takes what was sent before); or why it cannot be.
    fn ready(&mut self, len: usize) -> impl Future<Output = Result<(), Halt>>;
    /// One response message, gRPC-framed.
    fn message(&mut self, framed: Bytes);
    /// Ends the call with `p`'s status and trailing metadata (a response
    /// without messages when no head went out).
    fn end(&mut self, p: &Prepared);
    /// Ends the call abruptly (an injected `drop` fault).
    fn abort(&mut self);
    /// Injects a transport fault: None when the call goes on (a stall, a
    /// trickle, a graceful GOAWAY), else the fault that ended it as done.
    /// A transport that cannot do it resets the stream (or aborts the
    /// response), and says so.
    fn transport(&mut self, fault: &TransportFault) -> Option<TransportFault> {
        self.abort();
        Some(TransportFault { action: wirestub_plan::Transport::Reset(2), ..*fault })
    }
}

/// What observers learn of a call as it runs.
pub trait Report {
    /// Whether the closest rule of an unmatched call is wanted.
    fn explain(&self) -> bool;
    /// A request message arrived.
    fn message(&mut self, m: &[u8]);
    /// The rule that answered (None: no rule matched).
    fn rule(&mut self, rule: Option<u32>, closest: Option<Closest>);
    /// A recording answered a call not identical to it, this similar.
    fn similarity(&mut self, score: f32);
    /// The request broke these validation checks and is answered
    /// INVALID_ARGUMENT.
    fn invalid(&mut self, failed: &[super::matcher::Broken]);
    /// The status the call ends with.
    fn status(&mut self, code: u8, message: &str);
    /// A rule injected a fault of `kind` (one of
    /// [`crate::observe::metrics::FAULT_KINDS`]), described by `what`.
    fn fault(&mut self, kind: &'static str, what: String);
    /// The call went to the upstream (`path`), which took `latency` to
    /// answer; `failed`: the engine ended it (the upstream unreachable, or
    /// failing mid-call).
    fn forwarded(&mut self, path: &str, latency: Duration, failed: bool);
}

/// The client has left: nothing more can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// Why an answer cannot go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Halt {
    /// The client has left.
    Gone,
    /// The call ends with this status (the answer waiting for the client
    /// would take the bytes held past their budget).
    Status(Status),
}

impl From<Gone> for Halt {
    fn from(_: Gone) -> Self {
        Halt::Gone
    }
}

/// An answer as the call's end: the plan's, or this call's rendering.
fn end<'m>(a: Answer<'m>) -> Stop<'m> {
    match a.rendered {
        Some(r) => Stop::Owned(r),
        None => Stop::Rule(a.plan),
    }
}

/// How a call stopped before its natural end.
enum Stop<'m> {
    Status(Status),
    Rule(&'m Prepared),
    /// An answer made for this call (templated metadata, a fault).
    Owned(Box<Prepared>),
    Gone,
}

impl From<Halt> for Stop<'_> {
    fn from(h: Halt) -> Self {
        match h {
            Halt::Gone => Stop::Gone,
            Halt::Status(s) => Stop::Status(s),
        }
    }
}

impl From<Status> for Stop<'_> {
    fn from(s: Status) -> Self {
        Stop::Status(s)
    }
}

/// What the call needs besides its messages.
pub struct Call<'m, 'r, M: Metadata + ?Sized, R: Report> {
    pub method: &'m ServedMethod,
    /// The request metadata rules read.
    pub metadata: &'m M,
    pub deadline: Option<Instant>,
    /// The response of a duplex call that ends well.
    pub ok: &'m Prepared,
    /// The client speaks the JSON codec: answers go out transcoded.
    pub json: bool,
    pub record: &'r mut R,
    /// Where the call goes when no rule answers it (`--upstream`).
    pub upstream: Option<Box<Forward<'m>>>,
}

/// Runs one call to its end: reads the request, picks the answer, sends it.
///
/// An `async move` block rather than an `async fn`, which would hold its
/// arguments twice in every call's future, idle ones included.
#[allow(clippy::manual_async_fn)] // see above: the future's size
pub fn run<'a, M, I, O, R>(call: Call<'a, 'a, M, R>, input: &'a mut I, out: &'a mut O) -> impl Future<Output = ()> + 'a
where
    M: Metadata + ?Sized,
    I: Inbound,
    O: Outbound,
    R: Report,
{
    async move {
        if call.upstream.is_some() {
            // Its own future, boxed: what forwarding needs would otherwise
            // make every call's future larger, forwarded or not.
            return Box::pin(run_forwarding(call, input, out)).await;
        }
        let Call { method, metadata, deadline, ok, json, record, upstream } = call;
        if method.plan.duplex {
            // Boxed: a duplex call's state would otherwise make every call's
            // future larger (idle calls count in memory by it).
            return Box::pin(duplex(Call { method, metadata, deadline, ok, json, record, upstream }, input, out)).await;
        }
        let answered = match pick_by(method, metadata, input, &mut *record, deadline).await {
            Ok((answer, _)) => {
                note(&answer, record);
                let delay = answer.prepared().draw_delay();
                // Boxed: its state would otherwise make every call's future,
                // idle ones included, larger by its size.
                Box::pin(respond(answer, delay, deadline, method, json, out, record))
            }
            Err(stop) => return finish(Err(stop), out, record),
        };
        answered.await
    }
}

/// Tells the call's record which rule answered (or the closest), how
/// similar a recording was, and the violations of an invalid request.
fn note<R: Report>(answer: &Answer<'_>, record: &mut R) {
    record.rule(answer.rule, answer.closest);
    if let Some(score) = answer.similarity {
        record.similarity(score);
    }
    if let Some(v) = &answer.violations {
        record.invalid(v);
    }
}

/// [`pick`] within the call's deadline (DEADLINE_EXCEEDED at it).
async fn pick_by<'m, M, I, R>(
    method: &'m ServedMethod,
    metadata: &M,
    input: &mut I,
    record: &mut R,
    deadline: Option<Instant>,
) -> Result<(Answer<'m>, Option<Vec<Bytes>>), Stop<'m>>
where
    M: Metadata + ?Sized,
    I: Inbound,
    R: Report,
{
    tokio::select! {
        r = pick(method, metadata, input, record, None) => r,
        _ = sleep_until(deadline) => Err(deadline_exceeded().into()),
    }
}

/// [`run`] for a call that goes to the upstream when no rule answers it
/// (or before any rule, see [`Forward::from_start`]).
async fn run_forwarding<M, I, O, R>(call: Call<'_, '_, M, R>, input: &mut I, out: &mut O)
where
    M: Metadata + ?Sized,
    I: Inbound,
    O: Outbound,
    R: Report,
{
    let Call { method, metadata, deadline, ok, json, record, upstream } = call;
    let Some(f) = upstream else { return };
    if f.from_start(method) {
        return forward::run(f, Vec::new(), input, out, record).await;
    }
    if method.plan.duplex {
        return duplex(Call { method, metadata, deadline, ok, json, record, upstream: Some(f) }, input, out).await;
    }
    let picked = tokio::select! {
        r = pick(method, metadata, input, &mut *record, Some(f.max_held)) => r,
        _ = sleep_until(deadline) => Err(deadline_exceeded().into()),
    };
    match picked {
        Ok((answer, Some(read))) if answer.unanswered() => forward::run(f, read, input, out, record).await,
        Ok((answer, _)) => {
            note(&answer, record);
            let delay = answer.prepared().draw_delay();
            respond(answer, delay, deadline, method, json, out, record).await
        }
        Err(stop) => finish(Err(stop), out, record),
    }
}

/// Reads a unary or client-streaming request and picks its answer; with
/// `keep_all` (the process-wide budget), also gives back every request
/// message read, for the upstream should no rule answer (None when there
/// were too many to hold, see [`forward::HOLD`]).
async fn pick<'m, M, I, R>(
    method: &'m ServedMethod,
    metadata: &M,
    input: &mut I,
    record: &mut R,
    keep_all: Option<usize>,
) -> Result<(Answer<'m>, Option<Vec<Bytes>>), Stop<'m>>
where
    M: Metadata + ?Sized,
    I: Inbound,
    R: Report,
{
    match method.plan.kind {
        MethodKind::Unary | MethodKind::ServerStreaming => {
            let Some(m) = input.next().await? else {
                return Err(Status::new(Code::Unimplemented, "unary method received no request message").into());
            };
            record.message(&m);
            if input.next().await?.is_some() {
                let more = "unary method received more than one request message";
                return Err(Status::new(Code::Unimplemented, more).into());
            }
            let one = [&m[..]];
            let answer = pick_shared(method, &Messages::one(&one), metadata, record.explain()).await?;
            Ok((answer, keep_all.is_some().then(|| vec![m])))
        }
        MethodKind::ClientStreaming | MethodKind::BidiStreaming => {
            let mut head: Vec<Bytes> = Vec::new();
            let mut last: Option<Bytes> = None;
            let mut count = 0usize;
            // Messages kept for the upstream (each counting HELD_OVERHEAD
            // more than its bytes) count in the process's budget, up to
            // forward::HOLD; past either, the call is the mock's.
            let mut held = keep_all.map(crate::budget::Held::new);
            let mut kept = 0usize;
            // Aggregates over every message, folded as each arrives.
            // Aggregates over every message and validation failures, in
            // one box: every call's future, idle ones included, holds only
            // its pointer.
            let mut seen: Box<Seen> = Box::new((vec![Ok(Fold::default()); method.each.len()], Vec::new()));
            while let Some(m) = input.next().await? {
                count += 1;
                record.message(&m);
                if let Err(e) = super::validate::check_stream_message(method, &m, &mut seen.1) {
                    return Err(Status::new(Code::Internal, format!("cannot parse request message: {e}")).into());
                }
                if !seen.1.is_empty() && super::validate::per_message() {
                    // Answered now; what the client still sends is not read.
                    return Ok((super::validate::invalid(method, std::mem::take(&mut seen.1)), None));
                }
                for (fold, &i) in seen.0.iter_mut().zip(&method.each) {
                    if let Ok(f) = fold {
                        if let Err(e) = f.add_message(&method.plan.fields[i as usize], &m) {
                            *fold = Err(e);
                        }
                    }
                }
                if let Some(h) = &mut held {
                    let cost = m.len() + forward::HELD_OVERHEAD;
                    if kept + cost <= forward::HOLD && h.grow(cost).is_ok() {
                        kept += cost;
                        head.push(m);
                        continue;
                    }
                    held = None;
                    head.truncate(method.keep);
                }
                if head.len() < method.keep {
                    head.push(m);
                } else {
                    last = Some(m);
                }
            }
            let refs: Vec<&[u8]> = head.iter().map(|b| &b[..]).collect();
            let last = last.as_deref().or(refs.last().copied());
            let messages = Messages { head: &refs, last, count, folds: &seen.0, violations: &seen.1 };
            let answer = pick_shared(method, &messages, metadata, record.explain()).await?;
            Ok((answer, held.is_some().then_some(head)))
        }
    }
}

/// What a client stream's read keeps of its messages besides the messages:
/// aggregates over all of them and the validation checks they broke.
type Seen = (Vec<Result<Fold, Malformed>>, Vec<super::matcher::Broken>);

/// Sends a chosen answer: waits out its delay, fires its fault, streams
/// its messages as the client takes them, and ends the call, all under
/// the deadline.
pub async fn respond<O: Outbound, R: Report>(
    answer: Answer<'_>,
    delay: Duration,
    deadline: Option<Instant>,
    method: &ServedMethod,
    json: bool,
    out: &mut O,
    record: &mut R,
) {
    let prepared = answer.prepared();
    let fault = answer.fault();
    // A transport fault, until it fires.
    let mut armed = fault.and_then(|f| f.transport);
    let work = async {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if deadline.is_some_and(|d| d <= Instant::now()) {
            // A deadline shorter than the timers' resolution.
            return Err(deadline_exceeded().into());
        }
        if let Some(fault) = fault.filter(|f| f.transport.is_none()) {
            return Ok(Some(fault));
        }
        if prepared.status != 0 && prepared.stream.is_empty() {
            fire(&mut armed, 0, true, out, record)?;
            return Err(Stop::Rule(prepared));
        }
        fire(&mut armed, 0, false, out, record)?;
        out.head(prepared);
        send_items(&answer, method, json, out, &mut armed, record).await?;
        // Fewer messages went out than the fault waits for: it fires
        // before the end.
        fire(&mut armed, 0, true, out, record)?;
        Err(Stop::Rule(prepared))
    };
    let result = tokio::select! {
        r = work => r,
        _ = sleep_until(deadline) => Err(deadline_exceeded().into()),
    };
    if let Some(f) = fault.filter(|f| f.transport.is_none()) {
        if matches!(result, Ok(Some(_))) {
            let (kind, what) = status_fault_text(f);
            record.fault(kind, what);
        }
    }
    match result {
        Ok(Some(fault)) if fault.drop => {
            record.status(Code::Internal as u8, "stream reset by an injected fault");
            out.abort();
        }
        Ok(Some(fault)) => finish(Err(Stop::Owned(Box::new(prepare_fault(fault)))), out, record),
        Ok(None) => {}
        Err(stop) => finish(Err(stop), out, record),
    }
}

/// Fires an armed transport fault once `sent` response messages went
/// out (or at once with `now`). A fault that ends the call stops it as
/// gone, with the status its client reports noted.
fn fire<O: Outbound, R: Report>(
    armed: &mut Option<TransportFault>,
    sent: u64,
    now: bool,
    out: &mut O,
    record: &mut R,
) -> Result<(), Halt> {
    let Some(t) = armed.filter(|t| now || u64::from(t.after) == sent) else { return Ok(()) };
    *armed = None;
    record.fault(t.kind(), t.describe());
    let Some(done) = out.transport(&t) else { return Ok(()) };
    let (code, message) = client_status(&done);
    record.status(code as u8, message);
    Err(Halt::Gone)
}

/// Ends a call as `result` says (a rule's status, OK included, or the
/// engine's); nothing for a client that has left.
fn finish<O: Outbound, R: Report>(result: Result<(), Stop<'_>>, out: &mut O, record: &mut R) {
    let owned;
    let owned_rule;
    let end = match result {
        Ok(()) | Err(Stop::Gone) => return,
        Err(Stop::Rule(p)) => p,
        Err(Stop::Owned(p)) => {
            owned_rule = p;
            &*owned_rule
        }
        Err(Stop::Status(s)) => {
            owned = status_answer(&s);
            &owned
        }
    };
    record.status(end.status, message_of(end));
    out.end(end);
}

/// Sends an answer's messages, each once the client takes the previous
/// ones, pausing between them as the rule says.
async fn send_items<O: Outbound, R: Report>(
    answer: &Answer<'_>,
    method: &ServedMethod,
    json: bool,
    out: &mut O,
    armed: &mut Option<TransportFault>,
    record: &mut R,
) -> Result<(), Halt> {
    let prepared = answer.prepared();
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
        if schedule.sent().is_multiple_of(ITEMS_PER_TURN) {
            tokio::task::yield_now().await;
        }
        if schedule.sent() > 1 && !prepared.stream_delay.is_zero() {
            tokio::time::sleep(prepared.stream_delay).await;
        }
        let item = items[i].clone();
        out.ready(item.len()).await?;
        out.message(item);
        fire(armed, schedule.sent(), false, out, record)?;
    }
    Ok(())
}

/// A duplex call: each request message answered as it comes, by the rule
/// that matches it; OK once the client finishes, or a rule's error status.
pub async fn duplex<M, I, O, R>(call: Call<'_, '_, M, R>, input: &mut I, out: &mut O)
where
    M: Metadata + ?Sized,
    I: Inbound,
    O: Outbound,
    R: Report,
{
    let Call { method, metadata, deadline, ok, json, record, mut upstream } = call;
    let work = async {
        let mut head_sent = false;
        // The call ends OK with the trailing metadata of the last rule
        // that answered (the engine's plain OK if none did).
        let mut last = Stop::Rule(ok);
        while let Some(m) = input.next().await? {
            record.message(&m);
            let one = [&m[..]];
            let answer = pick_shared(method, &Messages::one(&one), metadata, record.explain()).await?;
            if let Some(f) = upstream.take_if(|_| answer.unanswered() && !head_sent) {
                // No rule answers the first message: the call is the
                // upstream's from here on.
                Box::pin(forward::run(f, vec![m], input, out, record)).await;
                return Err(Stop::Gone);
            }
            note(&answer, record);
            let delay = answer.prepared().draw_delay();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if answer.prepared().status != 0 && answer.prepared().error_after == 0 {
                return Err(end(answer));
            }
            if !head_sent {
                out.head(answer.prepared());
                head_sent = true;
            }
            send_items(&answer, method, json, out, &mut None, &mut *record).await?;
            if answer.prepared().status != 0 {
                return Err(end(answer));
            }
            last = end(answer);
        }
        Err(last)
    };
    let result: Result<(), Stop<'_>> = tokio::select! {
        r = work => r,
        _ = sleep_until(deadline) => Err(deadline_exceeded().into()),
    };
    finish(result, out, &mut *record);
}

/// A prepared response's `grpc-message`, as sent (percent-encoded).
pub fn message_of(p: &Prepared) -> &str {
    p.trailers.get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or("")
}
