//! The call side of a native HTTP/2 connection: a request head becomes
//! a call (or is refused), its messages are cut and checked as they
//! arrive, the answer is picked (the common unary one sent at once, from
//! the read buffer), and every response is written in the call's protocol
//! (gRPC's header blocks encoded at plan load, or the gRPC-Web and Connect
//! mappings), as far as the flow-control windows allow.

use super::*;

impl<'s> Conn<'s> {
    pub(super) fn journal_on(&self) -> bool {
        self.state.is_some_and(|s| s.journal.is_some())
    }

    /// Counts a call that ends (an unanswered one as CANCELLED) and
    /// records it in the journal.
    pub(super) fn finish_call(&mut self, s: &mut Stream<'s>) {
        let code = s.status.unwrap_or(1);
        tracing::debug!(target: "wirestub::calls", method = %s.method.plan.path, code, "call ended");
        if let Some(stats) = self.stats(s.generation) {
            let end = if s.task { Instant::now() } else { self.now };
            stats.handled(s.method.position, code, end.saturating_duration_since(s.started));
        }
        let (Some(rec), Some(state), Some(generation)) = (s.rec.take(), self.state, s.generation) else { return };
        let Some(journal) = &state.journal else { return };
        let rec = *rec;
        journal.record(Entry {
            seq: 0,
            time: rec.time.unwrap_or_else(std::time::SystemTime::now),
            generation: generation.clone(),
            method: s.method.position,
            metadata: rec.metadata,
            messages: rec.messages,
            rule: rec.rule,
            status: code,
            message: crate::codec::percent::decode(&rec.message, false),
            latency: s.started.elapsed(),
            closest: rec.closest,
            similarity: rec.similarity,
            protocol: s.dialect.name(),
            upstream: rec.upstream,
            fault: rec.fault,
            violations: rec.violations,
        });
    }

    /// Notes the validation checks a request broke (for metrics).
    pub(super) fn note_invalid(&mut self, id: u32, failed: &[crate::call::matcher::Broken]) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        if let Some(g) = s.generation.filter(|_| self.config.metrics) {
            let stats = g.stats.worker(self.worker);
            for b in failed {
                stats.check_failed(s.method.position, b.check);
            }
        }
        if let Some(rec) = &mut s.rec {
            rec.violations = Some(failed.into());
        }
    }

    /// Notes a fault a rule injected (for metrics and the journal).
    pub(super) fn note_fault(&mut self, id: u32, kind: &'static str, what: String) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        if let Some(g) = s.generation.filter(|_| self.config.metrics) {
            g.stats.worker(self.worker).fault(s.method.position, kind);
        }
        if let Some(rec) = &mut s.rec {
            rec.fault = Some(what.into());
        }
    }

    /// Notes that a call went to the upstream (for metrics and the journal).
    pub(super) fn note_forwarded(&mut self, id: u32, path: &str, latency: Duration, failed: bool) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        if let Some(g) = s.generation.filter(|_| self.config.metrics) {
            g.stats.worker(self.worker).forwarded(s.method.position, failed);
        }
        if let Some(rec) = &mut s.rec {
            rec.upstream = Some(Box::new(Upstreamed { path: path.into(), latency, failed }));
        }
    }

    /// Notes the status a call ends with (for metrics and the journal).
    pub(super) fn note_status(&mut self, id: u32, code: u8, message: &str) {
        if let Some(s) = self.streams.get_mut(&id) {
            if s.status.is_none() {
                s.status = Some(code);
                if let Some(rec) = &mut s.rec {
                    rec.message = message.to_string();
                }
            }
        }
    }

    /// Notes the rule that answered (or that none did) for metrics and
    /// the journal.
    pub(super) fn note_rule(&mut self, id: u32, answer: &Answer<'s>) {
        self.note_rule_parts(id, answer.rule, answer.closest);
        if let Some(v) = &answer.violations {
            self.note_invalid(id, v);
        }
        if let Some(score) = answer.similarity {
            self.note_similarity(id, score);
        }
    }

    pub(super) fn note_similarity(&mut self, id: u32, score: f32) {
        if let Some(rec) = self.streams.get_mut(&id).and_then(|s| s.rec.as_mut()) {
            rec.similarity = Some(score);
        }
    }

    pub(super) fn note_rule_parts(&mut self, id: u32, rule: Option<u32>, closest: Option<Closest>) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        if s.method.builtin.is_some() {
            return;
        }
        if let Some(g) = s.generation.filter(|_| self.config.metrics) {
            g.stats.worker(self.worker).rule(s.method.position, rule);
        }
        if let Some(rec) = &mut s.rec {
            rec.rule = rule;
            rec.closest = closest;
        }
    }

    /// Answers a call refused before it opened (no stream state): gRPC's
    /// trailers-only block, or the protocol's whole error response. Its
    /// body (a Connect error, a few hundred bytes) goes only when the
    /// windows let it; otherwise the HTTP status alone tells the client.
    pub(super) fn refuse_with(&mut self, id: u32, dialect: Dialect, p: &Prepared, origin: Option<&[u8]>) {
        if dialect.protocol == Protocol::Grpc {
            frame::put_headers(&mut self.out, id, &p.blocks.trailers_only, true, self.peer_max_frame);
            return;
        }
        let r = protocol::without_messages(dialect, &p.headers, &p.trailers);
        let block = head_block(r.head, origin, &self.config.cors_origins);
        let fits = (r.body.len() as i64) <= self.peer_initial_window.min(self.send_window);
        if r.body.is_empty() || !fits {
            frame::put_headers(&mut self.out, id, &block, true, self.peer_max_frame);
            return;
        }
        frame::put_headers(&mut self.out, id, &block, false, self.peer_max_frame);
        self.send_window -= r.body.len() as i64;
        put_data_frames(&mut self.out, id, &r.body, self.peer_max_frame);
        frame::put_data(&mut self.out, id, &[], true);
    }

    /// Answers `OPTIONS`: a CORS preflight (204 with what the page may
    /// send and read, 403 for an origin not allowed), or the methods
    /// served.
    pub(super) fn preflight(&mut self, id: u32, origin: Option<&[u8]>, requested: Option<&[u8]>) {
        let mut head = protocol::Head { status: 204, headers: http::HeaderMap::new() };
        match origin {
            None => {
                head.headers.insert(http::header::ALLOW, http::HeaderValue::from_static("POST, GET, OPTIONS"));
            }
            Some(origin) => match protocol::cors::preflight(&self.config.cors_origins, origin, requested) {
                Ok(h) => head.headers = h,
                Err(h) => {
                    head.headers = h;
                    head.status = 403;
                }
            },
        }
        let block = head_block(head, None, &[]);
        frame::put_headers(&mut self.out, id, &block, true, self.peer_max_frame);
        self.control_frames = 0;
    }

    pub(super) fn open(
        &mut self,
        id: u32,
        end_stream: bool,
        mut request: RequestHead<'s>,
        oversized: bool,
        held: usize,
    ) -> Result<(), ConnError> {
        let early = |code: u8, msg: String| Some(status_response(code, &msg));
        // What Connect and browsers send (None for gRPC).
        let extra = request.extra.take();
        let origin = extra.as_ref().and_then(|e| e.origin.as_deref());
        let mut http_status = None;
        let mut status = None;
        let mut dialect = Dialect::GRPC;
        let mut get: Option<connect::GetRequest> = None;
        let http_method = request.http_method.as_deref();
        if oversized {
            http_status = Some(431);
        } else if http_method == Some(b"OPTIONS") {
            self.preflight(id, origin, extra.as_ref().and_then(|e| e.cors_headers.as_deref()));
            if !end_stream {
                frame::put_rst(&mut self.out, id, code::NO_ERROR);
            }
            return Ok(());
        } else if http_method == Some(b"GET") {
            // Connect's GET, for methods without side effects.
            let query = extra.as_ref().and_then(|e| e.query.as_deref());
            let query = query.map(|q| connect::parse_get(&String::from_utf8_lossy(q)));
            dialect = Dialect { protocol: Protocol::Connect, codec: Codec::Json };
            let gettable = |m: &ServedMethod| m.no_side_effects && m.plan.kind == MethodKind::Unary && !m.plan.duplex;
            match (request.method, query) {
                (None, _) => {}
                (Some(m), _) if !gettable(m) => http_status = Some(405),
                (Some(_), Some(Ok(q))) => {
                    dialect.codec = q.codec;
                    get = Some(q);
                }
                (Some(_), Some(Err(connect::GetError::Codec(_)))) => http_status = Some(415),
                (Some(_), Some(Err(e))) => status = early(Code::InvalidArgument as u8, e.to_string()),
                (Some(_), None) => {
                    status = early(Code::InvalidArgument as u8, "the query has no encoding parameter".into())
                }
            }
        } else if !request.post {
            http_status = Some(405);
        } else {
            match &request.content_type {
                ContentType::Known(d) => {
                    dialect = *d;
                    // A method the plan lacks may be forwarded, whatever its kind.
                    let fits = match request.method {
                        Some(m) => d.fits(m.plan.kind == MethodKind::Unary && !m.plan.duplex),
                        None => self.config.upstream.is_some() || d.fits(true),
                    };
                    if !fits {
                        http_status = Some(415);
                    } else if d.codec == Codec::Json && request.method.is_some_and(|m| m.json.is_none()) {
                        status = early(Code::Unimplemented as u8, "this method has no JSON mapping".into());
                    }
                }
                ContentType::GrpcOther(ct) => {
                    let ct = String::from_utf8_lossy(ct);
                    status = early(
                        Code::Unimplemented as u8,
                        format!("content-type {ct} is not supported; use application/grpc"),
                    );
                }
                _ => http_status = Some(415),
            }
        }
        let method = match request.method {
            Some(m) => Some(m),
            None if http_status.is_none() && status.is_none() => {
                let path = String::from_utf8_lossy(request.unknown_path.as_deref().unwrap_or_default());
                match self.config.upstream.as_ref().is_some_and(|u| u.route(&path).is_some()) {
                    // Forwarded as it comes: messages in envelopes, as bytes.
                    true if dialect.enveloped() && dialect.codec == Codec::Proto => Some(&self.served.forwarded),
                    true => {
                        let why = format!(
                            "unknown method {path}: only gRPC, gRPC-Web and Connect streaming calls in the \
                             binary codec are forwarded for methods the plan does not describe"
                        );
                        status = early(Code::Unimplemented as u8, why);
                        None
                    }
                    false => {
                        status = early(Code::Unimplemented as u8, format!("unknown method {path}"));
                        None
                    }
                }
            }
            None => None,
        };
        let mut encoding = Encoding::Identity;
        let get_compression = get.as_ref().and_then(|g| g.compression.as_deref()).map(str::as_bytes);
        if status.is_none() && http_status.is_none() {
            if let Some(e) = get_compression.or(request.encoding.as_deref()) {
                match Encoding::parse(e) {
                    Some(e) => encoding = e,
                    None => status = Some(status_answer(&grpc::unsupported_encoding(e))),
                }
            }
        }
        let accepts = request.accepts_gzip;
        let compress = self.config.compress_responses
            && match dialect.protocol {
                Protocol::Grpc | Protocol::GrpcWeb | Protocol::GrpcWebText => accepts.grpc,
                Protocol::Connect => accepts.http,
                Protocol::ConnectStream => accepts.connect,
            };
        let mut deadline = None;
        if status.is_none() && http_status.is_none() {
            let timeout = match dialect.protocol {
                Protocol::Connect | Protocol::ConnectStream => {
                    let t = extra.as_ref().and_then(|e| e.connect_timeout.as_deref());
                    t.map(|t| (connect::parse_timeout(t), "connect-timeout-ms"))
                }
                _ => request.timeout.as_ref().map(|t| (grpc::parse_timeout(t), "grpc-timeout")),
            };
            match timeout {
                Some((Some(t), _)) => deadline = Some(Instant::now() + t),
                Some((None, name)) => status = early(Code::Internal as u8, format!("malformed {name} header")),
                None => {}
            }
        }
        if http_status.is_some() || status.is_some() {
            // Answered from the headers alone; the request body, if any
            // comes, is refused with RST_STREAM NO_ERROR.
            match http_status {
                Some(code) => {
                    let mut headers = http::HeaderMap::new();
                    match code {
                        405 => {
                            headers.insert(http::header::ALLOW, http::HeaderValue::from_static("POST, GET, OPTIONS"))
                        }
                        415 => {
                            headers.insert("accept-post", http::HeaderValue::from_static(protocol::head::ACCEPT_POST))
                        }
                        _ => None,
                    };
                    let head = protocol::Head { status: code, headers };
                    let block = head_block(head, origin, &self.config.cors_origins);
                    frame::put_headers(&mut self.out, id, &block, true, self.peer_max_frame);
                }
                None => self.refuse_with(id, dialect, &status.expect("one of the two"), origin),
            }
            self.control_frames = 0;
            if !end_stream {
                frame::put_rst(&mut self.out, id, code::NO_ERROR);
            }
            return Ok(());
        }
        let method = method.expect("answered above when missing");
        if self.reported.total(self.buffered) + held > self.config.max_buffered {
            let p = status_answer(&grpc::buffers_full(self.config.max_buffered));
            self.refuse_with(id, dialect, &p, origin);
            if !end_stream {
                frame::put_rst(&mut self.out, id, code::NO_ERROR);
            }
            return Ok(());
        }
        self.buffered += held;
        self.calls_held += held;
        let window = self.stream_window();
        let body = match get {
            Some(g) => {
                self.buffered += g.message.len();
                BytesMut::from(&g.message[..])
            }
            None => BytesMut::new(),
        };
        let stream = Stream {
            method,
            dialect,
            web: (dialect.protocol != Protocol::Grpc).then(|| {
                Box::new(Web {
                    text: (dialect.protocol == Protocol::GrpcWebText).then(Default::default),
                    origin: origin.map(Box::from),
                    ..Web::default()
                })
            }),
            encoding,
            compress,
            recv_done: false,
            send_done: false,
            headers_sent: false,
            recv_window: window,
            body,
            agg: None,
            queue: VecDeque::new(),
            queued: 0,
            waiting: 0,
            pending_bytes: 0,
            failed: None,
            metadata: request.metadata,
            held,
            content_length: request.content_length,
            received: 0,
            deadline,
            send_window: self.peer_initial_window,
            pending: VecDeque::new(),
            task: false,
            waker: None,
            generation: self.generation,
            started: self.now,
            status: None,
            rec: None,
            piped: method.plan.duplex,
            forward: None,
        };
        let mut all = request.all.take();
        let unknown = std::ptr::eq(method, &self.served.forwarded);
        let path: Box<str> = match unknown {
            true => String::from_utf8_lossy(request.unknown_path.as_deref().unwrap_or_default()).into(),
            false => method.plan.path.as_str().into(),
        };
        let upstream = self.config.upstream.as_ref().and_then(|u| u.route(&path)).filter(|_| method.builtin.is_none());
        let mut forward_now = false;
        let mut stream = stream;
        if let Some(up) = upstream {
            let metadata = match self.journal_on() {
                true => all.clone().unwrap_or_default(),
                false => all.take().unwrap_or_default(),
            };
            stream.forward = Some(Box::new(Forwarding { path, metadata }));
            // Streams of requests go as they come when no rule can answer
            // them (a method without rules, or every call); a single request
            // once it has arrived (and, in fallback mode, matched no rule).
            let streaming = method.plan.duplex
                || matches!(method.plan.kind, MethodKind::ClientStreaming | MethodKind::BidiStreaming);
            let no_rules = method.plan.rules.is_empty();
            forward_now =
                dialect.enveloped() && (unknown || (streaming && (up.mode == UpstreamMode::Always || no_rules)));
            stream.piped |= forward_now;
        }
        if self.journal_on() {
            stream.rec = all.map(|metadata| {
                Box::new(Recording { time: Some(std::time::SystemTime::now()), metadata, ..Recording::default() })
            });
        }
        self.streams.insert(id, stream);
        if let Some(stats) = self.stats(self.generation) {
            stats.started(method.position);
            stats.protocol(dialect.index());
        }
        if forward_now {
            self.streams.get_mut(&id).expect("inserted").task = true;
            self.jobs.push(Job::Forward { id, first: Vec::new(), deadline });
        } else if method.plan.duplex {
            self.streams.get_mut(&id).expect("inserted").task = true;
            self.jobs.push(Job::Duplex { id, deadline });
        } else if let Some(d) = deadline.filter(|_| !end_stream) {
            self.waiting.insert((d, id));
        }
        if end_stream {
            return self.end_of_request(id);
        }
        Ok(())
    }

    /// The client has half-closed: the request is complete.
    pub(super) fn end_of_request(&mut self, id: u32) -> Result<(), ConnError> {
        let Some(s) = self.streams.get_mut(&id) else { return Ok(()) };
        s.recv_done = true;
        self.tiny_data = self.tiny_data.saturating_sub(1);
        self.early_resets = self.early_resets.saturating_sub(1);
        if s.content_length.is_some_and(|n| s.received != n) {
            return self.stream_error(id, code::PROTOCOL_ERROR);
        }
        let deadline = s.deadline;
        self.end_waiting(id, deadline);
        let s = self.streams.get_mut(&id).expect("present");
        if s.piped {
            s.wake();
            return Ok(());
        }
        let body = std::mem::take(&mut s.body);
        self.buffered -= body.len();
        match s.method.plan.kind {
            MethodKind::Unary | MethodKind::ServerStreaming => self.answer_unary(id, &body),
            MethodKind::ClientStreaming | MethodKind::BidiStreaming => {
                if !body.is_empty() {
                    return self.fail_call(id, &Status::new(Code::Internal, "request message is truncated"));
                }
                let always = self.forwards_all(id);
                let s = self.streams.get_mut(&id).expect("present");
                let agg = s.agg.take().unwrap_or_default();
                self.buffered -= agg.held;
                let head: Vec<&[u8]> = agg.head.iter().map(|b| &b[..]).collect();
                let last = agg.last.as_deref().or(head.last().copied());
                let messages =
                    Messages { head: &head, last, count: agg.count, folds: &agg.folds, violations: &agg.violations };
                let method = s.method;
                let picked = match (always, &agg.malformed) {
                    (true, _) => None,
                    (false, Some(e)) => {
                        Some(Err(Status::new(Code::Internal, format!("cannot parse request message: {e}"))))
                    }
                    (false, None) => match call::pick_or_claim(method, &messages, &s.metadata[..], s.rec.is_some()) {
                        call::Picked::Answer(a) => Some(a),
                        call::Picked::Claim(claim) => {
                            s.task = true;
                            self.jobs.push(Job::Claim { id, claim, held: Held::Stream(agg) });
                            return Ok(());
                        }
                    },
                };
                let unanswered = matches!(&picked, Some(Ok(a)) if a.unanswered()) && s.forward.is_some();
                if always || unanswered {
                    let first = agg.head.into_iter().chain(agg.last).collect();
                    return self.forward(id, first);
                }
                self.answer(id, picked.expect("picked unless forwarded"))
            }
        }
    }

    /// Answers a unary or server-streaming call from its request body.
    pub(super) fn answer_unary(&mut self, id: u32, body: &[u8]) -> Result<(), ConnError> {
        let max = self.config.max_recv_message;
        // One lookup for what the call's protocol asks of its body.
        let Some(s) = self.streams.get(&id) else { return Ok(()) };
        let (dialect, encoding, json) = (s.dialect, s.encoding, s.method.json.as_ref());
        let inflated;
        let message = if dialect.protocol != Protocol::Connect {
            if let Err(status) = grpc::finish_unary(body, body.len(), max) {
                return self.fail_call(id, &status);
            }
            if body[0] == 1 {
                match inflate(encoding, &body[5..], max) {
                    Ok(m) => {
                        inflated = m;
                        &inflated[..]
                    }
                    Err(status) => return self.fail_call(id, &status),
                }
            } else {
                &body[5..]
            }
        } else {
            // Connect unary: the body is the message.
            if body.len() > max {
                return self.fail_call(id, &grpc::too_large(body.len(), max));
            }
            match encoding {
                Encoding::Identity => body,
                _ => match inflate(encoding, body, max) {
                    Ok(m) => {
                        inflated = m;
                        &inflated[..]
                    }
                    Err(status) => return self.fail_call(id, &status),
                },
            }
        };
        let transcoded;
        let message = match (dialect.codec, json) {
            (Codec::Json, Some(codec)) => match codec.request(message) {
                Ok(m) => {
                    transcoded = m;
                    &transcoded[..]
                }
                Err(e) => return self.fail_call(id, &invalid_json(&e)),
            },
            _ => message,
        };
        if self.past_deadline(id) {
            return self.fail_call(id, &call::deadline_exceeded());
        }
        let s = self.streams.get_mut(&id).expect("present");
        if let Some(rec) = &mut s.rec {
            let added = rec.messages.push(message);
            self.buffered = self.buffered.saturating_add_signed(added);
        }
        if let Some(builtin) = s.method.builtin {
            return self.answer_builtin(id, builtin, message);
        }
        if self.forwards_all(id) {
            return self.forward(id, vec![Bytes::copy_from_slice(message)]);
        }
        let s = self.streams.get_mut(&id).expect("present");
        let one = [message];
        let picked = match call::pick_or_claim(s.method, &Messages::one(&one), &s.metadata[..], s.rec.is_some()) {
            call::Picked::Answer(a) => a,
            call::Picked::Claim(claim) => {
                s.task = true;
                let held = Held::Unary(Bytes::copy_from_slice(message));
                self.jobs.push(Job::Claim { id, claim, held });
                return Ok(());
            }
        };
        if self.unanswered(id, &picked) {
            return self.forward(id, vec![Bytes::copy_from_slice(message)]);
        }
        self.answer(id, picked)
    }

    /// Answers a call once its claim chose `chosen` (see [`Job::Claim`]),
    /// from the request messages kept for it.
    pub(super) fn answer_claimed(
        &mut self,
        id: u32,
        held: Held,
        chosen: Result<Option<u32>, Status>,
    ) -> Result<(), ConnError> {
        if !self.streams.contains_key(&id) {
            return Ok(());
        }
        let chosen = match chosen {
            Ok(c) => c,
            Err(status) => return self.fail_call(id, &status),
        };
        let s = self.streams.get(&id).expect("present");
        let (method, explain) = (s.method, s.rec.is_some());
        match held {
            Held::Unary(message) => {
                let one = [&message[..]];
                let picked = call::pick_chosen(method, &Messages::one(&one), &s.metadata[..], explain, chosen);
                if self.unanswered(id, &picked) {
                    return self.forward(id, vec![message]);
                }
                self.answer(id, picked)
            }
            Held::Stream(agg) => {
                let head: Vec<&[u8]> = agg.head.iter().map(|b| &b[..]).collect();
                let last = agg.last.as_deref().or(head.last().copied());
                let messages =
                    Messages { head: &head, last, count: agg.count, folds: &agg.folds, violations: &agg.violations };
                let picked = call::pick_chosen(method, &messages, &s.metadata[..], explain, chosen);
                if self.unanswered(id, &picked) {
                    let first = agg.head.iter().cloned().chain(agg.last.clone()).collect();
                    return self.forward(id, first);
                }
                self.answer(id, picked)
            }
        }
    }

    /// Whether every call of this stream's kind goes to the upstream
    /// (`--upstream-mode always`).
    fn forwards_all(&self, id: u32) -> bool {
        let Some(upstreams) = self.config.upstream.as_deref() else { return false };
        let Some(f) = self.streams.get(&id).and_then(|s| s.forward.as_deref()) else { return false };
        upstreams.route(&f.path).is_some_and(|u| u.mode == UpstreamMode::Always)
    }

    /// Whether a call goes to the upstream because no rule answers it.
    fn unanswered(&self, id: u32, picked: &Result<Answer<'s>, Status>) -> bool {
        matches!(picked, Ok(a) if a.unanswered()) && self.streams.get(&id).is_some_and(|s| s.forward.is_some())
    }

    /// Hands the call to a task that forwards it to the upstream, `first`
    /// being the request messages read so far.
    fn forward(&mut self, id: u32, first: Vec<Bytes>) -> Result<(), ConnError> {
        let Some(s) = self.streams.get_mut(&id) else { return Ok(()) };
        s.task = true;
        let deadline = s.deadline;
        self.jobs.push(Job::Forward { id, first, deadline });
        Ok(())
    }

    /// Health checks: answered by the engine itself.
    pub(super) fn answer_builtin(&mut self, id: u32, builtin: Builtin, message: &[u8]) -> Result<(), ConnError> {
        let Some(state) = self.state else {
            return self.fail_call(id, &Status::new(Code::Unimplemented, "not served here"));
        };
        match builtin {
            Builtin::HealthCheck => match state.health.check(message) {
                Ok(reply) => {
                    let served = self.served;
                    self.note_status(id, 0, "");
                    self.send_headers(id, &served.ok);
                    self.send_data(id, frame_message(&reply));
                    self.send_trailers(id, &served.ok);
                    Ok(())
                }
                Err(status) => self.fail_call(id, &status),
            },
            Builtin::HealthWatch => match state.health.watched(message) {
                Ok(service) => {
                    self.streams.get_mut(&id).expect("present").task = true;
                    self.jobs.push(Job::Watch { id, service });
                    Ok(())
                }
                Err(status) => self.fail_call(id, &status),
            },
            Builtin::Reflection => self.fail_call(id, &Status::new(Code::Internal, "reflection is a stream")),
        }
    }

    /// Sends the chosen answer now when it needs no waiting, or hands it
    /// to a task.
    pub(super) fn answer(&mut self, id: u32, picked: Result<Answer<'s>, Status>) -> Result<(), ConnError> {
        let answer = match picked {
            Ok(a) => a,
            Err(status) => return self.fail_call(id, &status),
        };
        if self.past_deadline(id) {
            return self.fail_call(id, &call::deadline_exceeded());
        }
        self.note_rule(id, &answer);
        let prepared = answer.prepared();
        let fault = answer.fault();
        if let Some(fault) = fault.filter(|f| f.transport.is_none()) {
            let (kind, what) = call::status_fault_text(fault);
            self.note_fault(id, kind, what);
            if fault.drop {
                return self.reset(id, code::INTERNAL_ERROR);
            }
            let p = call::prepare_fault(fault);
            self.note_status(id, fault.status, &fault.message);
            self.send_trailers_only(id, &p);
            return Ok(());
        }
        let s = &self.streams[&id];
        let kind = s.method.plan.kind;
        let streams = matches!(kind, MethodKind::ServerStreaming | MethodKind::BidiStreaming);
        let delay = prepared.draw_delay();
        // A transport fault is placed among the messages by the call
        // driver, in a task.
        let simple = (!streams || (prepared.stream.is_empty() && prepared.error_after == 0)) && fault.is_none();
        if delay.is_zero() && simple {
            if prepared.status != 0 {
                self.note_status(id, prepared.status, message_of(prepared));
                self.send_trailers_only(id, prepared);
                return Ok(());
            }
            let fits = answer.body.len() as i64 <= s.send_window.min(self.send_window);
            if !fits && self.reported.total(self.buffered) + answer.body.len() > self.config.max_buffered {
                return self.fail_call(id, &grpc::buffers_full(self.config.max_buffered));
            }
            if fits || s.deadline.is_none() {
                let body = match s.dialect.codec {
                    Codec::Proto => answer.body.clone(),
                    Codec::Json => answer.json_messages(s.method)[0].clone(),
                };
                self.note_status(id, 0, "");
                self.send_headers(id, prepared);
                self.send_data(id, body);
                self.send_trailers(id, prepared);
                return Ok(());
            }
        }
        let deadline = s.deadline;
        self.streams.get_mut(&id).expect("present").task = true;
        self.jobs.push(Job::Respond { id, answer, delay, deadline });
        Ok(())
    }

    /// Whether a call's deadline has passed. The clock is read only for a
    /// call that had less than a millisecond left at the time of the read
    /// that brought its request (the timers' resolution; longer deadlines
    /// are kept by the timers).
    pub(super) fn past_deadline(&self, id: u32) -> bool {
        let Some(d) = self.streams.get(&id).and_then(|s| s.deadline) else { return false };
        d.saturating_duration_since(self.now) < Duration::from_millis(1) && d <= Instant::now()
    }

    /// Ends a call with an error status the engine chose.
    pub(super) fn fail_call(&mut self, id: u32, status: &Status) -> Result<(), ConnError> {
        self.note_status(id, status.code as u8, &status.message);
        let p = status_answer(status);
        if self.streams.get(&id).is_some_and(|s| s.headers_sent) {
            self.send_trailers(id, &p);
        } else {
            self.send_trailers_only(id, &p);
        }
        Ok(())
    }

    // ---------------------------------------------------------------------
    // Writing
    // ---------------------------------------------------------------------

    /// Sends the response headers of `p` (its initial metadata).
    pub(super) fn send_headers(&mut self, id: u32, p: &Prepared) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        if s.headers_sent || s.send_done {
            return;
        }
        match s.dialect.protocol {
            Protocol::Grpc if !s.compress => {
                frame::put_headers(&mut self.out, id, &p.blocks.headers, false, self.peer_max_frame)
            }
            Protocol::Connect => {
                // Sent with the end, when the status is known.
                let w = s.web.get_or_insert_with(Default::default);
                w.deferred = true;
                w.headers = p.headers.clone();
                return;
            }
            _ => {
                let mut head = protocol::stream_head(s.dialect, &p.headers);
                if s.compress {
                    let name = match s.dialect.protocol {
                        Protocol::ConnectStream => "connect-content-encoding",
                        _ => "grpc-encoding",
                    };
                    head.headers.insert(name, http::HeaderValue::from_static("gzip"));
                }
                let origin = s.web.as_ref().and_then(|w| w.origin.as_deref());
                let block = head_block(head, origin, &self.config.cors_origins);
                frame::put_headers(&mut self.out, id, &block, false, self.peer_max_frame);
            }
        }
        s.headers_sent = true;
        self.control_frames = 0;
    }

    /// Ends the stream with a response that carries no message: gRPC's
    /// trailers-only response, or the protocol's equivalent.
    pub(super) fn send_trailers_only(&mut self, id: u32, p: &Prepared) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        if s.send_done {
            return;
        }
        if s.dialect.protocol != Protocol::Grpc {
            let r = protocol::without_messages(s.dialect, &p.headers, &p.trailers);
            return self.send_whole(id, r);
        }
        s.headers_sent = true;
        s.send_done = true;
        frame::put_headers(&mut self.out, id, &p.blocks.trailers_only, true, self.peer_max_frame);
        self.control_frames = 0;
        self.finish_send(id);
    }

    /// Sends a whole response (head and body) and ends the stream.
    pub(super) fn send_whole(&mut self, id: u32, r: protocol::Response) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        s.headers_sent = true;
        let origin = s.web.as_ref().and_then(|w| w.origin.as_deref());
        let block = head_block(r.head, origin, &self.config.cors_origins);
        frame::put_headers(&mut self.out, id, &block, r.body.is_empty(), self.peer_max_frame);
        self.control_frames = 0;
        if r.body.is_empty() {
            s.send_done = true;
            return self.finish_send(id);
        }
        self.send_body(id, r.body);
        self.send_end(id);
    }

    /// Ends the stream with an empty DATA frame, after whatever is queued.
    pub(super) fn send_end(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        if s.send_done {
            return;
        }
        s.send_done = true;
        if s.pending.is_empty() {
            frame::put_data(&mut self.out, id, &[], true);
            self.finish_send(id);
        } else {
            s.pending.push_back(Out::End);
        }
    }

    /// Sends a response message (gRPC-framed), compressed when the call
    /// says so.
    pub(super) fn send_data(&mut self, id: u32, data: Bytes) {
        self.send_bytes(id, data, true)
    }

    /// Sends body bytes that are not a message (gRPC-Web's trailer frame,
    /// Connect's end of stream or error).
    pub(super) fn send_body(&mut self, id: u32, data: Bytes) {
        self.send_bytes(id, data, false)
    }

    /// Sends body bytes in the call's protocol, or as much as the windows
    /// allow, queueing the rest.
    pub(super) fn send_bytes(&mut self, id: u32, data: Bytes, message: bool) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        if s.send_done {
            return;
        }
        let data = match s.dialect.protocol {
            Protocol::Grpc if !s.compress => data,
            Protocol::Connect if message && !s.headers_sent => {
                // Connect unary: the message goes with the end.
                let w = s.web.get_or_insert_with(Default::default);
                w.deferred = true;
                w.message = Some(data.slice(5.min(data.len())..));
                return;
            }
            protocol => {
                let data =
                    if message && s.compress { compression::compress_framed(Encoding::Gzip, data) } else { data };
                if protocol == Protocol::GrpcWebText {
                    let mut b = BytesMut::with_capacity(data.len().div_ceil(3) * 4);
                    web_text::encode(&data, &mut b);
                    b.freeze()
                } else {
                    data
                }
            }
        };
        if s.pending.is_empty() {
            let room = out_room(&self.out);
            let n = data.len().min(s.send_window.max(0) as usize).min(self.send_window.max(0) as usize).min(room);
            if n == data.len() {
                put_data_frames(&mut self.out, id, &data, self.peer_max_frame);
                s.send_window -= n as i64;
                self.send_window -= n as i64;
                self.control_frames = 0;
                return;
            }
            if n > 0 {
                put_data_frames(&mut self.out, id, &data[..n], self.peer_max_frame);
                s.send_window -= n as i64;
                self.send_window -= n as i64;
            }
            if n == room {
                self.out_starved = true;
            }
            s.pending_bytes += data.len() - n;
            self.buffered += data.len() - n;
            s.pending.push_back(Out::Data(data.slice(n..)));
            self.blocked.push_back(id);
        } else {
            s.pending_bytes += data.len();
            self.buffered += data.len();
            s.pending.push_back(Out::Data(data));
        }
    }

    /// Ends the stream with the trailers of `p` (its status and trailing
    /// metadata), after whatever is queued.
    pub(super) fn send_trailers(&mut self, id: u32, p: &Prepared) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        if s.send_done {
            return;
        }
        match s.dialect.protocol {
            Protocol::Grpc => {}
            Protocol::Connect => {
                let (headers, message) = match s.web.as_mut() {
                    Some(w) if w.deferred => (std::mem::take(&mut w.headers), w.message.take()),
                    _ => (http::HeaderMap::new(), None),
                };
                let mut r = connect::unary(&headers, &p.trailers, message, s.dialect.codec);
                if s.compress && r.head.status == 200 && !r.body.is_empty() {
                    r.body = compression::compress(Encoding::Gzip, &r.body);
                    r.head.headers.insert(http::header::CONTENT_ENCODING, http::HeaderValue::from_static("gzip"));
                }
                return self.send_whole(id, r);
            }
            _ => {
                if !s.headers_sent {
                    return self.send_trailers_only(id, p);
                }
                let end = protocol::stream_end(s.dialect, &p.trailers).unwrap_or_default();
                self.send_body(id, end);
                return self.send_end(id);
            }
        }
        let block = p.blocks.trailers.clone();
        s.send_done = true;
        if s.pending.is_empty() {
            frame::put_headers(&mut self.out, id, &block, true, self.peer_max_frame);
            self.finish_send(id);
        } else {
            s.pending.push_back(Out::Trailers(block));
        }
    }

    /// Ends the stream with RST_STREAM (an injected fault).
    pub(super) fn reset(&mut self, id: u32, code: u32) -> Result<(), ConnError> {
        self.note_status(id, Code::Internal as u8, "stream reset by an injected fault");
        if let Some(mut s) = self.streams.remove(&id) {
            self.forget(id, &mut s);
            frame::put_rst(&mut self.out, id, code);
        }
        Ok(())
    }

    /// The response is complete: the stream goes, after telling a client
    /// still sending that nothing more is wanted (RFC 9113 §8.1).
    pub(super) fn finish_send(&mut self, id: u32) {
        let Some(s) = self.streams.get(&id) else { return };
        if !s.pending.is_empty() {
            return;
        }
        let recv_done = s.recv_done;
        let mut s = self.streams.remove(&id).expect("present");
        self.forget(id, &mut s);
        if !recv_done {
            frame::put_rst(&mut self.out, id, code::NO_ERROR);
        }
    }

    /// Sends what a stream has queued, as far as the windows allow.
    pub(super) fn flush_stream(&mut self, id: u32) {
        let max_frame = self.peer_max_frame;
        let Some(s) = self.streams.get_mut(&id) else { return };
        let mut finished = false;
        while let Some(front) = s.pending.front_mut() {
            match front {
                Out::Data(d) => {
                    let room = out_room(&self.out);
                    let n = d.len().min(s.send_window.max(0) as usize).min(self.send_window.max(0) as usize).min(room);
                    if n == 0 && !d.is_empty() {
                        if room == 0 {
                            self.out_starved = true;
                        }
                        break;
                    }
                    put_data_frames(&mut self.out, id, &d[..n], max_frame);
                    s.send_window -= n as i64;
                    self.send_window -= n as i64;
                    self.control_frames = 0;
                    s.pending_bytes -= n;
                    self.buffered -= n;
                    d.advance(n);
                    if d.is_empty() {
                        s.pending.pop_front();
                    }
                }
                Out::Trailers(block) => {
                    frame::put_headers(&mut self.out, id, block, true, max_frame);
                    s.pending.pop_front();
                    finished = true;
                }
                Out::End => {
                    frame::put_data(&mut self.out, id, &[], true);
                    s.pending.pop_front();
                    finished = true;
                }
            }
        }
        if s.pending.is_empty() {
            s.wake();
        }
        if finished {
            self.finish_send(id);
        }
    }

    pub(super) fn unblock_all(&mut self) {
        for s in self.streams.values_mut() {
            if s.task {
                s.wake();
            }
        }
        let mut round = std::mem::take(&mut self.blocked);
        while let Some(id) = round.pop_front() {
            self.flush_stream(id);
            if self.streams.get(&id).is_some_and(|s| !s.pending.is_empty()) {
                self.blocked.push_back(id);
            }
        }
    }
}

/// Cuts complete messages off a client stream's received bytes: into the
/// aggregate view (client streams), or the queue for the call's task
/// (duplex calls). Returns the error that ends the call, if any.
pub(super) fn deframe(s: &mut Stream<'_>, max: usize, buffered: &mut usize) -> Option<Status> {
    loop {
        if s.body.len() < 5 {
            if s.body.is_empty() {
                // Let go of the buffer the last message was cut from.
                s.body = BytesMut::new();
            }
            return None;
        }
        let (compressed, len) = match grpc::message_prefix(&s.body, max) {
            Ok(p) => p,
            Err(e) => return Some(e),
        };
        if s.body.len() < 5 + len {
            return None;
        }
        let mut message = cut_message(&mut s.body, len);
        *buffered -= 5;
        if compressed {
            let before = message.len();
            match inflate(s.encoding, &message, max) {
                Ok(m) => message = m,
                Err(e) => return Some(e),
            }
            *buffered = (*buffered + message.len()).saturating_sub(before);
        }
        if let (Codec::Json, Some(codec)) = (s.dialect.codec, &s.method.json) {
            let before = message.len();
            match codec.request(&message) {
                Ok(m) => message = m,
                Err(e) => return Some(invalid_json(&e)),
            }
            *buffered = (*buffered + message.len()).saturating_sub(before);
        }
        if let Some(rec) = &mut s.rec {
            *buffered = buffered.saturating_add_signed(rec.messages.push(&message));
        }
        if s.piped {
            s.queued += message.len() + QUEUED_OVERHEAD;
            *buffered += QUEUED_OVERHEAD;
            s.queue.push_back(message);
            continue;
        }
        let agg = s.agg.get_or_insert_with(Default::default);
        agg.count += 1;
        if agg.malformed.is_none() {
            if let Err(e) = call::validate::check_stream_message(s.method, &message, &mut agg.violations) {
                agg.malformed = Some(e);
            }
        }
        if !s.method.each.is_empty() {
            agg.folds.resize(s.method.each.len(), Ok(Default::default()));
            for (fold, &i) in agg.folds.iter_mut().zip(&s.method.each) {
                if let Ok(f) = fold {
                    if let Err(e) = f.add_message(&s.method.plan.fields[i as usize], &message) {
                        *fold = Err(e);
                    }
                }
            }
        }
        if s.forward.is_some() {
            // A call that may yet be forwarded keeps every message for the
            // upstream, each counting QUEUED_OVERHEAD more than its bytes,
            // up to forward::HOLD in all; past it the call is the mock's,
            // and keeps only what its rules read.
            if agg.held + message.len() + QUEUED_OVERHEAD <= forward::HOLD {
                agg.held += message.len() + QUEUED_OVERHEAD;
                *buffered += QUEUED_OVERHEAD;
                agg.head.push(message);
                continue;
            }
            s.forward = None;
            let overhead = agg.head.len() * QUEUED_OVERHEAD;
            *buffered -= overhead;
            agg.held -= overhead;
            let keep = s.method.keep.min(agg.head.len());
            for dropped in agg.head.drain(keep..) {
                *buffered -= dropped.len();
                agg.held -= dropped.len();
            }
        }
        if agg.head.len() < s.method.keep {
            agg.held += message.len();
            agg.head.push(message);
        } else {
            agg.held += message.len();
            if let Some(old) = agg.last.replace(message) {
                *buffered -= old.len();
                agg.held -= old.len();
            }
        }
    }
}

/// Cuts the message of `len` bytes (after its 5-byte prefix) off the
/// front of `body`. A message that fills less than half of the buffer it
/// arrived in is copied out, so that a small message kept for long (a
/// client stream's last) never keeps a large buffer alive; a larger one is
/// cut off without a copy. What is left of the buffer, at most one DATA
/// frame's worth, moves to a buffer of its own for the same reason.
pub(super) fn cut_message(body: &mut BytesMut, len: usize) -> Bytes {
    if 2 * (5 + len) < body.capacity() {
        let m = Bytes::copy_from_slice(&body[5..5 + len]);
        body.advance(5 + len);
        return m;
    }
    let mut m = body.split_to(5 + len);
    if !body.is_empty() {
        *body = BytesMut::from(&body[..]);
    } else {
        *body = BytesMut::new();
    }
    m.split_off(5).freeze()
}

/// A message with its gRPC prefix (uncompressed).
pub(super) fn frame_message(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(message.len() as u32).to_be_bytes());
    b.extend_from_slice(message);
    b.freeze()
}

/// Response bytes that may still go into the output buffer now: up to one
/// [`SEND_CHUNK`] past [`OUT_HIGH`], so a message is cut no finer than that.
pub(super) fn out_room(out: &BytesMut) -> usize {
    (OUT_HIGH + SEND_CHUNK).saturating_sub(out.len())
}

/// A response head as an HPACK block (literals without indexing), with
/// the CORS headers when a browser (`origin`) asked.
pub(super) fn head_block(mut head: protocol::Head, origin: Option<&[u8]>, origins: &[String]) -> Vec<u8> {
    if let Some(origin) = origin {
        protocol::cors::decorate(origins, origin, &mut head.headers);
    }
    let mut b = Vec::with_capacity(64);
    crate::codec::hpack::encode_status(&mut b, head.status);
    for (k, v) in &head.headers {
        crate::codec::hpack::encode_literal(&mut b, k.as_str().as_bytes(), v.as_bytes());
    }
    b
}

pub(super) fn put_data_frames(out: &mut BytesMut, id: u32, data: &[u8], max_frame: usize) {
    if data.is_empty() {
        return;
    }
    for chunk in data.chunks(max_frame) {
        frame::put_data(out, id, chunk, false);
    }
}
