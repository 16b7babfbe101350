//! The futures a native connection runs for its calls: delayed and
//! streamed answers and duplex calls, run by the shared call driver
//! ([`crate::call::drive`]) through a handle on their stream, and the
//! engine's own streaming services (health's Watch, reflection).

use super::*;

pub(super) type Shared<'s> = Rc<RefCell<Conn<'s>>>;
pub(super) type Task<'s> = Pin<Box<dyn Future<Output = ()> + 's>>;

/// Why a task stops sending early.
pub(super) enum Stop {
    Status(Status),
    /// The stream is gone (reset by the client, or the connection ends).
    Gone,
}

impl From<Status> for Stop {
    fn from(s: Status) -> Self {
        Stop::Status(s)
    }
}

/// A task's handle on its stream.
#[derive(Clone)]
pub(super) struct Handle<'s> {
    conn: Shared<'s>,
    id: u32,
}

impl<'s> Handle<'s> {
    /// Resolves when the stream is gone.
    async fn gone(&self) {
        poll_fn(|cx| {
            let mut c = self.conn.borrow_mut();
            match c.streams.get_mut(&self.id) {
                None => Poll::Ready(()),
                Some(s) => {
                    s.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Waits until the stream has nothing queued, the windows let at least
    /// `min(len, SEND_CHUNK)` bytes go, and the connection's output is
    /// below its high-water mark (the client is reading).
    /// The message of `len` bytes the task holds meanwhile counts as held
    /// for the call (`Stream::waiting`); a message that would take the
    /// bytes held past `--max-buffered-bytes` ends the call instead.
    async fn capacity(&self, len: usize) -> Result<(), Stop> {
        let want = len.min(SEND_CHUNK) as i64;
        poll_fn(move |cx| {
            let mut c = self.conn.borrow_mut();
            let c = &mut *c;
            let conn_window = c.send_window;
            let full = c.out.len() >= OUT_HIGH;
            let Some(s) = c.streams.get_mut(&self.id) else { return Poll::Ready(Err(Stop::Gone)) };
            if s.pending.is_empty() && s.send_window.min(conn_window) >= want && !full {
                c.buffered -= s.waiting;
                s.waiting = 0;
                return Poll::Ready(Ok(()));
            }
            if s.waiting != len {
                c.buffered -= s.waiting;
                s.waiting = 0;
                if c.reported.total(c.buffered) + len > c.config.max_buffered {
                    return Poll::Ready(Err(Stop::Status(grpc::buffers_full(c.config.max_buffered))));
                }
                c.buffered += len;
                s.waiting = len;
            }
            s.waker = Some(cx.waker().clone());
            if full {
                c.out_starved = true;
            }
            Poll::Pending
        })
        .await
    }

    fn with<R>(&self, f: impl FnOnce(&mut Conn<'s>) -> R) -> R {
        f(&mut self.conn.borrow_mut())
    }

    /// The next request message of a duplex call, None once the client
    /// has half-closed.
    async fn next_message(&self) -> Result<Option<Bytes>, Stop> {
        poll_fn(move |cx| {
            let mut c = self.conn.borrow_mut();
            let Some(s) = c.streams.get_mut(&self.id) else { return Poll::Ready(Err(Stop::Gone)) };
            if let Some(m) = s.queue.pop_front() {
                s.queued -= m.len() + QUEUED_OVERHEAD;
                c.buffered -= m.len() + QUEUED_OVERHEAD;
                let buffered = c.buffered;
                c.reported.sync(buffered);
                c.replenish_stream(self.id);
                return Poll::Ready(Ok(Some(m)));
            }
            if let Some(e) = s.failed.take() {
                return Poll::Ready(Err(Stop::Status(e)));
            }
            if s.recv_done {
                if !s.body.is_empty() {
                    return Poll::Ready(Err(Stop::Status(Status::new(Code::Internal, "request message is truncated"))));
                }
                return Poll::Ready(Ok(None));
            }
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

pub(super) fn start_job<'s>(conn: &Shared<'s>, job: Job<'s>) -> Task<'s> {
    match job {
        Job::Respond { id, answer, delay, deadline } => {
            Box::pin(respond(Handle { conn: conn.clone(), id }, answer, delay, deadline))
        }
        Job::Duplex { id, deadline } => Box::pin(duplex(Handle { conn: conn.clone(), id }, deadline)),
        Job::Watch { id, service } => Box::pin(watch(Handle { conn: conn.clone(), id }, service)),
        Job::Forward { id, first, deadline } => Box::pin(forward(Handle { conn: conn.clone(), id }, first, deadline)),
        Job::Claim { id, claim, held } => Box::pin(claim_then_answer(Handle { conn: conn.clone(), id }, claim, held)),
    }
}

/// A call that reached rules limited by `times` under `--shared-state`:
/// the claim in Redis (or by the outage policy), then the answer of the
/// rule it chose, as the connection would have given it at once.
async fn claim_then_answer<'s>(h: Handle<'s>, claim: Box<crate::shared::Claim>, held: Held) {
    let Some(method) = h.with(|c| c.streams.get(&h.id).map(|s| s.method)) else { return };
    let chosen = tokio::select! {
        c = call::claim_shared(method, *claim) => c,
        () = h.gone() => return,
    };
    h.with(|c| {
        if let Err(e) = c.answer_claimed(h.id, held, chosen) {
            c.goaway(e.code, e.debug.as_bytes());
        }
    });
}

/// A call forwarded to the upstream: the call layer's [`forward::run`]
/// over the stream's queue of request messages.
pub(super) async fn forward<'s>(h: Handle<'s>, first: Vec<Bytes>, deadline: Option<Instant>) {
    let Some((upstream, path, metadata, json, max_held, (content_type, encoding))) = h.with(|c| {
        let s = c.streams.get_mut(&h.id)?;
        let f = s.forward.take()?;
        let up = c.config.upstream.as_deref()?.route(&f.path)?;
        let json = s.method.json.as_ref().filter(|_| s.dialect.codec == Codec::Json);
        Some((up, f.path, f.metadata, json, c.config.max_buffered, (s.dialect.content_type(), s.encoding)))
    }) else {
        return;
    };
    let mut input = NativeIn(h.clone());
    let mut out = NativeOut(h.clone());
    let mut report = NativeReport(h.clone());
    let f = forward::Forward { upstream, path, metadata, deadline, json, max_held, content_type, encoding };
    let f = Box::new(f);
    tokio::select! {
        () = forward::run(f, first, &mut input, &mut out, &mut report) => {}
        () = h.gone() => {}
    }
}

/// `Health/Watch`: the service's status now, then again whenever a status
/// changes; once the server drains, NOT_SERVING and the end of the call.
pub(super) async fn watch(h: Handle<'_>, service: String) {
    let Some(state) = h.with(|c| c.state) else { return };
    let mut changes = state.health.subscribe();
    h.with(|c| {
        c.note_status(h.id, Code::Unavailable as u8, "the server is shutting down");
        let served = c.served;
        c.send_headers(h.id, &served.ok)
    });
    let mut last: Option<Bytes> = None;
    loop {
        let now = state.health.status_of(&service);
        if last.as_ref() != Some(&now) {
            let item = frame_message(&now);
            if h.capacity(item.len()).await.is_err() {
                return;
            }
            h.with(|c| c.send_data(h.id, item));
            last = Some(now);
        }
        if state.is_draining() {
            break;
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            _ = h.gone() => return,
        }
    }
    let end = status_response(Code::Unavailable as u8, "the server is shutting down");
    h.with(|c| c.send_trailers(h.id, &end));
}

/// Answers after a delay, or streams an answer: the call driver's
/// [`drive::respond`], ended early if the client resets the stream.
pub(super) async fn respond<'s>(h: Handle<'s>, answer: Answer<'s>, delay: Duration, deadline: Option<Instant>) {
    let Some((method, json)) = h.with(|c| c.streams.get(&h.id).map(|s| (s.method, s.dialect.codec == Codec::Json)))
    else {
        return;
    };
    let mut out = NativeOut(h.clone());
    let mut report = NativeReport(h.clone());
    tokio::select! {
        () = drive::respond(answer, delay, deadline, method, json, &mut out, &mut report) => {}
        () = h.gone() => {}
    }
}

/// A duplex call: the call driver's [`drive::duplex`] over the stream's
/// queue of request messages (reflection is answered here, message by
/// message).
pub(super) async fn duplex<'s>(h: Handle<'s>, deadline: Option<Instant>) {
    let Some((method, metadata, (dialect, encoding), ok, forwarding)) = h.with(|c| {
        let s = c.streams.get_mut(&h.id)?;
        // The metadata rules read, out of the connection's state for the
        // length of the call.
        let f = s.forward.take();
        Some((s.method, s.metadata.clone(), (s.dialect, s.encoding), &c.served.ok, f))
    }) else {
        return;
    };
    let json = dialect.codec == Codec::Json;
    let (upstreams, max_held) = h.with(|c| (c.config.upstream.as_deref(), c.config.max_buffered));
    let routed = forwarding.and_then(|f| Some((upstreams?.route(&f.path)?, f)));
    let upstream = routed.map(|(upstream, f)| {
        let json = method.json.as_ref().filter(|_| json);
        let Forwarding { path, metadata } = *f;
        let content_type = dialect.content_type();
        Box::new(forward::Forward { upstream, path, metadata, deadline, json, max_held, content_type, encoding })
    });
    if method.builtin == Some(Builtin::Reflection) {
        return reflect(h, deadline).await;
    }
    let mut input = NativeIn(h.clone());
    let mut out = NativeOut(h.clone());
    let mut report = NativeReport(h.clone());
    let call = drive::Call { method, metadata: &metadata[..], deadline, ok, json, record: &mut report, upstream };
    tokio::select! {
        () = drive::duplex(call, &mut input, &mut out) => {}
        () = h.gone() => {}
    }
}

/// Server reflection: each request answered as it comes.
pub(super) async fn reflect<'s>(h: Handle<'s>, deadline: Option<Instant>) {
    let result: Result<(), Stop> = async {
        loop {
            let next = tokio::select! {
                next = h.next_message() => next?,
                _ = call::sleep_until(deadline) => return Err(call::deadline_exceeded().into()),
            };
            let Some(message) = next else { return Ok(()) };
            let Some(reply) = h.with(|c| Some(c.streams.get(&h.id)?.generation?.reflection.answer(&message))) else {
                return Err(Stop::Gone);
            };
            // Only the framed answer waits for window, not its makings.
            let item = frame_message(&reply);
            drop(reply);
            drop(message);
            h.with(|c| {
                let served = c.served;
                c.send_headers(h.id, &served.ok)
            });
            tokio::select! {
                r = h.capacity(item.len()) => r?,
                _ = call::sleep_until(deadline) => return Err(call::deadline_exceeded().into()),
            }
            h.with(|c| c.send_data(h.id, item));
        }
    }
    .await;
    h.with(|c| {
        let headers_sent = c.streams.get(&h.id).is_some_and(|s| s.headers_sent);
        let served = c.served;
        let owned;
        let end = match result {
            Err(Stop::Gone) => return,
            Ok(()) => &served.ok,
            Err(Stop::Status(e)) => {
                owned = status_answer(&e);
                &owned
            }
        };
        c.note_status(h.id, end.status, message_of(end));
        if headers_sent {
            c.send_trailers(h.id, end);
        } else {
            c.send_trailers_only(h.id, end);
        }
    });
}

/// A stream as the call driver's response side.
pub(super) struct NativeOut<'s>(Handle<'s>);

impl drive::Outbound for NativeOut<'_> {
    fn head(&mut self, p: &Prepared) {
        let id = self.0.id;
        self.0.with(|c| c.send_headers(id, p));
    }

    async fn ready(&mut self, len: usize) -> Result<(), drive::Halt> {
        self.0.capacity(len).await.map_err(|stop| match stop {
            Stop::Status(s) => drive::Halt::Status(s),
            Stop::Gone => drive::Halt::Gone,
        })
    }

    fn message(&mut self, framed: Bytes) {
        let id = self.0.id;
        self.0.with(|c| c.send_data(id, framed));
    }

    fn end(&mut self, p: &Prepared) {
        let id = self.0.id;
        self.0.with(|c| {
            // Connect unary holds its head back for the end: it counts as
            // sent.
            let headed =
                c.streams.get(&id).is_some_and(|s| s.headers_sent || s.web.as_ref().is_some_and(|w| w.deferred));
            if headed {
                c.send_trailers(id, p);
            } else {
                c.send_trailers_only(id, p);
            }
        });
    }

    fn abort(&mut self) {
        let id = self.0.id;
        self.0.with(|c| c.reset(id, code::INTERNAL_ERROR).ok());
    }

    fn transport(&mut self, fault: &TransportFault) -> Option<TransportFault> {
        let id = self.0.id;
        let goes_on = self.0.with(|c| c.inject(id, fault));
        (!goes_on).then_some(*fault)
    }
}

/// A stream as what observers learn of its call: the connection keeps it
/// on the stream (and records the request messages as they arrive).
pub(super) struct NativeReport<'s>(Handle<'s>);

impl drive::Report for NativeReport<'_> {
    fn explain(&self) -> bool {
        self.0.with(|c| c.streams.get(&self.0.id).is_some_and(|s| s.rec.is_some()))
    }

    fn message(&mut self, _: &[u8]) {}

    fn rule(&mut self, rule: Option<u32>, closest: Option<Closest>) {
        let id = self.0.id;
        self.0.with(|c| c.note_rule_parts(id, rule, closest));
    }

    fn similarity(&mut self, score: f32) {
        let id = self.0.id;
        self.0.with(|c| c.note_similarity(id, score));
    }

    fn status(&mut self, code: u8, message: &str) {
        let id = self.0.id;
        self.0.with(|c| c.note_status(id, code, message));
    }

    fn forwarded(&mut self, path: &str, latency: Duration, failed: bool) {
        let id = self.0.id;
        self.0.with(|c| c.note_forwarded(id, path, latency, failed));
    }

    fn fault(&mut self, kind: &'static str, what: String) {
        let id = self.0.id;
        self.0.with(|c| c.note_fault(id, kind, what));
    }

    fn invalid(&mut self, failed: &[crate::call::matcher::Broken]) {
        let id = self.0.id;
        self.0.with(|c| c.note_invalid(id, failed));
    }
}

/// A duplex stream's queue of request messages as the call driver's
/// request side.
pub(super) struct NativeIn<'s>(Handle<'s>);

impl drive::Inbound for NativeIn<'_> {
    async fn next(&mut self) -> Result<Option<Bytes>, Status> {
        self.0.next_message().await.map_err(|stop| match stop {
            Stop::Status(s) => s,
            Stop::Gone => Status::new(Code::Canceled, "the client has left"),
        })
    }
}
