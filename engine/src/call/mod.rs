//! What both HTTP/2 stacks share about answering a call: choosing the
//! response for the request messages and rendering its templates
//! ([`pick`]), the chosen answer ([`Answer`]), and small helpers for
//! deadlines and injected faults.

pub mod cel_ext;
pub mod cel_rules;
pub mod drive;
pub mod formats;
pub mod forward;
pub mod matcher;
pub mod picks;
pub mod raw;
pub mod template;
pub mod validate;

use crate::protocol::grpc::{Code, Status};
use crate::served::{Prepared, ServedMethod};
use bytes::Bytes;
use matcher::{Messages, Metadata};
use std::borrow::Cow;
use std::time::Duration;
use tokio::time::Instant;

/// The chosen response with its messages ready: the prepared bytes, or for
/// templated messages, bytes rendered for this call.
pub struct Answer<'m> {
    /// The rule's prepared answer (see [`Answer::prepared`]).
    pub plan: &'m Prepared,
    /// For an answer with templated metadata: a copy with this call's
    /// values (boxed, so that calls holding the plan's stay small).
    pub rendered: Option<Box<Prepared>>,
    pub body: Bytes,
    pub items: Cow<'m, [Bytes]>,
    /// The rule that chose it (index into the method's rules); None when
    /// no rule matched.
    pub rule: Option<u32>,
    /// When no rule matched and the caller asked: the rule that came
    /// closest.
    pub closest: Option<crate::call::matcher::Closest>,
    /// When a recording answered a call not identical to it: how similar.
    pub similarity: Option<f32>,
    /// Whether the response's injected fault fires for this call (drawn
    /// once, when the answer is chosen).
    pub faulted: bool,
    /// The validation checks the request broke (indices into the
    /// method's checks), when it is answered as invalid
    /// (INVALID_ARGUMENT).
    pub violations: Option<Box<[matcher::Broken]>>,
}

impl<'m> Answer<'m> {
    /// The answer to send: this call's rendering, or the plan's.
    pub fn prepared(&self) -> &Prepared {
        self.rendered.as_deref().unwrap_or(self.plan)
    }

    /// A response without templates.
    pub fn of(prepared: &'m Prepared) -> Self {
        Answer {
            plan: prepared,
            rendered: None,
            body: prepared.body.clone(),
            items: Cow::Borrowed(&prepared.stream),
            rule: None,
            closest: None,
            similarity: None,
            faulted: false,
            violations: None,
        }
    }

    /// No rule answers the call (it is not invalid either): the upstream
    /// may take it.
    pub fn unanswered(&self) -> bool {
        self.rule.is_none() && self.violations.is_none()
    }

    /// The injected fault, when it fires for this call.
    pub fn fault(&self) -> Option<&wirestub_plan::Fault> {
        self.prepared().fault.as_deref().filter(|_| self.faulted)
    }

    /// The messages to stream: the items, or the body alone.
    pub fn messages(&self) -> &[Bytes] {
        if self.plan.stream.is_empty() {
            std::slice::from_ref(&self.body)
        } else {
            &self.items
        }
    }

    /// [`Answer::messages`] for a client of the JSON codec: static ones as
    /// transcoded at load, rendered ones (templates) transcoded now.
    pub fn json_messages(&self, method: &ServedMethod) -> Cow<'m, [Bytes]> {
        let Some(codec) = &method.json else { return Cow::Owned(self.messages().to_vec()) };
        // Metadata does not change the messages: the plan's forms serve.
        self.json_of(self.plan, codec)
    }

    fn json_of(&self, p: &'m Prepared, codec: &crate::codec::json::JsonCodec) -> Cow<'m, [Bytes]> {
        let rendered = |slot: u32| p.templates.iter().any(|(s, _)| *s == slot);
        let one = |slot: u32, bytes: &Bytes, at_load: Option<&Bytes>| match at_load {
            Some(j) if !rendered(slot) => j.clone(),
            _ => codec.response(bytes),
        };
        let forms = p.json.as_deref();
        if p.stream.is_empty() {
            return Cow::Owned(vec![one(0, &self.body, forms.map(|f| &f.body))]);
        }
        match forms {
            Some(f) if p.templates.is_empty() => Cow::Borrowed(&f.stream),
            _ => Cow::Owned(
                self.items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| one(i as u32 + 1, item, forms.and_then(|f| f.stream.get(i))))
                    .collect(),
            ),
        }
    }
}

/// Picks the response for the request messages and renders its templates.
pub fn pick<'m>(
    method: &'m ServedMethod,
    messages: &Messages<'_>,
    metadata: &(impl Metadata + ?Sized),
) -> Result<Answer<'m>, Status> {
    pick_explained(method, messages, metadata, false)
}

/// [`pick`], and with `explain`, the rule that came closest when none
/// matched.
pub fn pick_explained<'m>(
    method: &'m ServedMethod,
    messages: &Messages<'_>,
    metadata: &(impl Metadata + ?Sized),
    explain: bool,
) -> Result<Answer<'m>, Status> {
    pick_inner(method, messages, metadata, explain, Choice::Select).and_then(no_claim)
}

/// A pick that makes no claim (any but [`Choice::Defer`]).
fn no_claim<T>(picked: Result<T, Box<crate::shared::Claim>>) -> Result<T, Status> {
    picked.map_err(|_| Status::new(Code::Internal, "a claim was not expected here"))
}

/// What [`pick_or_claim`] gives: the answer, or the claim to make in the
/// shared store first (then [`pick_chosen`]).
pub enum Picked<'m> {
    Answer(Result<Answer<'m>, Status>),
    Claim(Box<crate::shared::Claim>),
}

/// [`pick_explained`], except that with `--shared-state` a call whose
/// selection reaches rules limited by `times` gives the claim to make in
/// Redis instead (calls that reach none are answered as always).
pub fn pick_or_claim<'m>(
    method: &'m ServedMethod,
    messages: &Messages<'_>,
    metadata: &(impl Metadata + ?Sized),
    explain: bool,
) -> Picked<'m> {
    let choice = if crate::shared::enabled() { Choice::Defer } else { Choice::Select };
    match pick_inner(method, messages, metadata, explain, choice) {
        Ok(Ok(answer)) => Picked::Answer(Ok(answer)),
        Ok(Err(claim)) => Picked::Claim(claim),
        Err(status) => Picked::Answer(Err(status)),
    }
}

/// The answer of the rule a claim chose (None: no rule answers).
pub fn pick_chosen<'m>(
    method: &'m ServedMethod,
    messages: &Messages<'_>,
    metadata: &(impl Metadata + ?Sized),
    explain: bool,
    chosen: Option<u32>,
) -> Result<Answer<'m>, Status> {
    pick_inner(method, messages, metadata, explain, Choice::Chosen(chosen)).and_then(no_claim)
}

/// [`pick_or_claim`] and, for a claim, the claim and [`pick_chosen`]: for
/// the callers that may wait (the boxed claim keeps their futures small).
pub async fn pick_shared<'m>(
    method: &'m ServedMethod,
    messages: &Messages<'_>,
    metadata: &(impl Metadata + ?Sized),
    explain: bool,
) -> Result<Answer<'m>, Status> {
    match pick_or_claim(method, messages, metadata, explain) {
        Picked::Answer(a) => a,
        Picked::Claim(claim) => {
            let chosen = Box::pin(claim_shared(method, *claim)).await?;
            pick_chosen(method, messages, metadata, explain, chosen)
        }
    }
}

/// Makes a claim in the shared store (or by its policy): the rule chosen.
pub async fn claim_shared(method: &ServedMethod, claim: crate::shared::Claim) -> Result<Option<u32>, Status> {
    let session = claim.session.clone();
    crate::shared::claim(&claim, |response| method.claim_local(response, session.as_deref()))
        .await
        .map_err(|e| Status::new(Code::Unavailable, e))
}

/// How a pick chooses its rule.
#[derive(Clone, Copy)]
enum Choice {
    /// By the rules, claiming `times` here.
    Select,
    /// By the rules, setting the rules limited by `times` aside for a claim.
    Defer,
    /// The rule a claim chose.
    Chosen(Option<u32>),
}

#[allow(clippy::type_complexity)]
fn pick_inner<'m>(
    method: &'m ServedMethod,
    messages: &Messages<'_>,
    metadata: &(impl Metadata + ?Sized),
    explain: bool,
    choice: Choice,
) -> Result<Result<Answer<'m>, Box<crate::shared::Claim>>, Status> {
    let malformed =
        |e: crate::codec::wire::Malformed| Status::new(Code::Internal, format!("cannot parse request message: {e}"));
    let request = matcher::Request::read(method, messages, metadata).map_err(malformed)?;
    // A client stream's messages were validated as they came.
    let failed = match validate::applies(method) {
        true if messages.count == 1 && messages.violations.is_empty() => {
            validate::violations(&request).map_err(malformed)?
        }
        true => {
            request.mark_invalid(!messages.violations.is_empty());
            messages.violations.to_vec()
        }
        false => Vec::new(),
    };
    let rule = match choice {
        Choice::Select => request.select_rule().map_err(malformed)?,
        Choice::Chosen(rule) => rule,
        Choice::Defer => {
            request.defer_claims();
            let fallback = request.select_rule().map_err(malformed)?;
            let deferred = request.take_deferred();
            if !deferred.is_empty() {
                let candidates = deferred
                    .iter()
                    .map(|&r| {
                        let response = method.plan.rules[r as usize].response;
                        let times = method.responses[response as usize].times;
                        crate::shared::Candidate { rule: r, response, times }
                    })
                    .collect();
                let session = request.session().map(Box::from);
                let names = method.shared_keys.clone();
                return Ok(Err(Box::new(crate::shared::Claim { names, candidates, fallback, session })));
            }
            fallback
        }
    };
    if !failed.is_empty() && rule.is_none() {
        return Ok(Ok(validate::invalid(method, failed)));
    }
    let prepared = match rule {
        Some(r) => &method.responses[method.plan.rules[r as usize].response as usize],
        None => &method.no_match,
    };
    let closest = match (rule, explain) {
        (None, true) => request.closest(),
        _ => None,
    };
    let similarity = request.similarity();
    let faulted = prepared.fault.as_deref().is_some_and(|f| crate::rng::unit() < f.rate);
    if prepared.templates.is_empty() && prepared.metadata_templates.is_none() {
        return Ok(Ok(Answer { rule, closest, similarity, faulted, ..Answer::of(prepared) }));
    }
    let mut answer = Answer { rule, closest, similarity, faulted, ..Answer::of(prepared) };
    if let Some(templates) = &prepared.metadata_templates {
        let (headers, trailers) = template::render_metadata(templates, &request).map_err(malformed)?;
        answer.rendered = Some(Box::new(prepared.with_metadata(&headers, &trailers)));
    }
    let total = prepared.stream.len() as u64;
    for (slot, t) in &prepared.templates {
        let index = slot.saturating_sub(1) as u64;
        let cx = template::Context { request: &request, index, total };
        let rendered = template::render(t, &cx).map_err(malformed)?;
        match slot {
            0 => answer.body = rendered,
            n => answer.items.to_mut()[*n as usize - 1] = rendered,
        }
    }
    Ok(Ok(answer))
}

/// The error an injected fault answers with.
pub fn prepare_fault(fault: &wirestub_plan::Fault) -> Prepared {
    crate::served::prepare(fault.status, &fault.message, Bytes::new(), &[], &[], Duration::ZERO)
}

/// How an injected status fault is named in the journal and counted.
pub fn status_fault_text(fault: &wirestub_plan::Fault) -> (&'static str, String) {
    match fault.drop {
        true => ("reset", "RST_STREAM INTERNAL_ERROR (drop)".into()),
        false => ("status", format!("status {}", wirestub_plan::STATUS_NAMES[fault.status as usize])),
    }
}

/// The status a gRPC client reports for a call a transport fault ended
/// (gRPC's HTTP/2 mapping of RST_STREAM codes; a malformed response is
/// INTERNAL; a connection lost is UNAVAILABLE), for the journal and
/// metrics.
pub fn client_status(fault: &wirestub_plan::TransportFault) -> (Code, &'static str) {
    use wirestub_plan::Transport;
    match fault.action {
        Transport::Reset(8) => (Code::Canceled, "stream reset (CANCEL) by an injected fault"),
        Transport::Reset(7) => (Code::Unavailable, "stream refused (REFUSED_STREAM) by an injected fault"),
        Transport::Reset(11) => (Code::ResourceExhausted, "stream reset (ENHANCE_YOUR_CALM) by an injected fault"),
        Transport::Reset(12) => (Code::PermissionDenied, "stream reset (INADEQUATE_SECURITY) by an injected fault"),
        Transport::Reset(_) => (Code::Internal, "stream reset by an injected fault"),
        Transport::Malformed => (Code::Internal, "a malformed response header block sent by an injected fault"),
        _ => (Code::Unavailable, "connection ended by an injected fault"),
    }
}

pub async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

pub fn deadline_exceeded() -> Status {
    Status::new(Code::DeadlineExceeded, "deadline exceeded")
}

/// The order of a streamed response's messages: passes over the items
/// (shuffled per pass when the rule says so), stopping after `error_after`
/// messages for an error status, or after `stream_repeat` passes (none:
/// until the client cancels).
pub struct Schedule {
    order: Vec<usize>,
    at: usize,
    pass: u32,
    sent: u64,
    repeat: u32,
    limit: Option<u64>,
    shuffle: bool,
}

impl Schedule {
    pub fn new(prepared: &Prepared, items: usize) -> Self {
        Schedule {
            order: (0..items).collect(),
            at: items,
            pass: 0,
            sent: 0,
            repeat: prepared.stream_repeat,
            limit: (prepared.status != 0).then_some(prepared.error_after as u64),
            shuffle: prepared.stream_random_order,
        }
    }

    /// Messages sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }
}

impl Iterator for Schedule {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.limit.is_some_and(|l| self.sent >= l) || self.order.is_empty() {
            return None;
        }
        if self.at == self.order.len() {
            if self.repeat != 0 && self.pass >= self.repeat && self.limit.is_none() {
                return None;
            }
            self.pass += 1;
            self.at = 0;
            if self.shuffle {
                crate::rng::shuffle(&mut self.order);
            }
        }
        let i = self.order[self.at];
        self.at += 1;
        self.sent += 1;
        Some(i)
    }
}
