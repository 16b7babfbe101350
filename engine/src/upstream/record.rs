//! Recording (`--record DIR`): every call the upstream answered becomes a
//! rule in an ordinary rule file, so that `compiler build` compiles the
//! directory unchanged and the engine replays the calls without the
//! upstream.
//!
//! The request path only hands a [`Capture`] (the call's messages and
//! metadata as bytes, bounded per call) to a channel; one recorder thread
//! decodes it with the current plan's descriptors into the protobuf JSON
//! mapping and rewrites the method's file: one file per method,
//! `DIR/<package.service>.<method>.yaml`, with one rule per distinct
//! request (its set fields as `when` conditions), the answer's body or
//! stream items, metadata, trailers, status and details. Identical calls
//! are recorded once; a request answered differently over time becomes a
//! sequence (`times`) in the order seen. A client stream is matched on its
//! aggregate view (count, first and last message); a bidi stream too when
//! its client sent every message before the first reply, else as a
//! `mode: duplex` rule per request message with the replies that came
//! before the next one. Files are replaced atomically (a temporary file, fsync, rename),
//! so a file is never half-written.
//!
//! Request metadata is never written, nor response metadata that may hold
//! a secret: named in [`SECRETS`] or by `--record-redact`, or with a name
//! holding `token`, `secret`, `password`, `auth`, `session`, `cookie`,
//! `api-key`, `credential` or `signature`. Message fields are written as
//! they are (leave them out with `--record-ignore-fields`). An answer
//! holding `{{` is not recorded: a rule file would read it as a template. Fields named by `--record-ignore-fields` (timestamps,
//! request ids) are left out of `when`, and where the answer repeats their
//! value it becomes a template echoing the request's (`{{request.id}}`).
//!
//! A method the descriptors do not describe is recorded raw (see the
//! compiler's `raw.rs`): each call as a rule holding its messages as base64
//! (with a wire dump in a comment), the names of its metadata (those not in
//! [`NOT_EXPECTED`] and `--record-ignore-metadata`), its protocol and the
//! answer as received, with `times` counting the identical calls seen.

use crate::state::State;
use base64::Engine as _;
use bytes::Bytes;
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MessageDescriptor, ReflectMessage, Value};
use serde_json::{json, Map, Value as Json};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Response metadata never written into a recording.
pub const SECRETS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "x-csrf-token",
    "x-amz-security-token",
];

/// Parts of a metadata name that mark it as a secret.
const SECRET_PARTS: &[&str] = &[
    "token",
    "secret",
    "password",
    "passwd",
    "auth",
    "session",
    "cookie",
    "apikey",
    "api-key",
    "credential",
    "signature",
];

/// Whether metadata `name` may hold a secret: one of [`SECRETS`], or a name
/// holding one of [`SECRET_PARTS`].
fn secret(name: &str) -> bool {
    SECRETS.contains(&name) || SECRET_PARTS.iter().any(|p| name.contains(p))
}

/// Response metadata that describes the transport, not the answer.
const TRANSPORT: &[&str] = &["content-type", "grpc-encoding", "grpc-accept-encoding", "te", "user-agent", "date"];

/// Request metadata a recording made without protos does not expect on
/// replay: the transport's, tracing's and test sessions' (besides
/// `--record-ignore-metadata`).
const NOT_EXPECTED: &[&str] = &[
    "content-type",
    "content-length",
    "te",
    "user-agent",
    "x-user-agent",
    "host",
    "accept",
    "accept-encoding",
    "accept-language",
    "origin",
    "referer",
    "via",
    "forwarded",
    "traceparent",
    "tracestate",
    "grpc-trace-bin",
    "grpc-tags-bin",
    "b3",
    "uber-trace-id",
    "x-request-id",
    "x-grpc-web",
    wirestub_plan::SESSION_KEY,
    wirestub_plan::SESSION_ALIAS,
];

/// Prefixes of request metadata names [`NOT_EXPECTED`] too.
const NOT_EXPECTED_PREFIXES: &[&str] = &["grpc-", "connect-", "x-b3-", "x-forwarded-", "x-amzn-trace", "sec-", ":"];

/// Files one method's recordings may take in one directory
/// (`name.yaml`, `name.2.yaml`, ...), one per run that recorded it.
const MAX_FILES_PER_METHOD: usize = 1000;

/// Methods named in "not recorded" warnings, at most.
const MAX_WARNED: usize = 256;

/// What `--record` and its options ask for.
#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    /// Request fields (dotted paths, as in `when`) left out of conditions.
    pub ignore_fields: Vec<String>,
    /// More metadata names never written.
    pub redact: Vec<String>,
    /// More request metadata names a raw recording does not expect.
    pub ignore_metadata: Vec<String>,
    /// Write the observed gap between streamed messages as
    /// `stream_delay_ms`.
    pub pacing: bool,
    /// Largest call (request and response bytes) recorded; larger ones are
    /// forwarded but not recorded.
    pub max_call_bytes: usize,
    /// Bytes of captured calls waiting for the recorder thread, and of
    /// recordings held in memory; past either, calls are not recorded.
    pub max_bytes: usize,
}

/// One forwarded call, as the request path hands it over.
#[derive(Debug, Default)]
pub struct Capture {
    pub path: Box<str>,
    /// The names of the request's metadata, in order.
    pub request_names: Vec<Box<str>>,
    /// The client's protocol, as its content type.
    pub content_type: &'static str,
    /// The request's `grpc-encoding`, when one was named.
    pub encoding: Option<Box<str>>,
    /// Request messages, unframed.
    pub requests: Vec<Bytes>,
    /// For each request message, how many response messages had arrived
    /// when it was sent (bidi streams are recorded reply by reply).
    pub replies_before: Vec<usize>,
    /// Response metadata.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Response messages, unframed, each with the time since the previous.
    pub replies: Vec<(Bytes, Duration)>,
    pub status: u8,
    /// `grpc-message` as sent (percent-encoded).
    pub message: String,
    pub trailers: Vec<(String, Vec<u8>)>,
    /// Bytes held; the capture is abandoned past `max_call_bytes`.
    pub bytes: usize,
    pub abandoned: bool,
}

impl Capture {
    /// Whether the status message or a metadata value holds `{{`, which a
    /// rule file would read as a template.
    fn texts_hold_braces(&self) -> bool {
        self.message.contains("{{")
            || self.headers.iter().chain(&self.trailers).any(|(_, v)| v.windows(2).any(|w| w == b"{{"))
    }

    /// The capture of a call to `path` with the request metadata
    /// `metadata`.
    pub fn new(
        path: &str,
        metadata: &[(Box<str>, Bytes)],
        content_type: &'static str,
        encoding: crate::protocol::compression::Encoding,
    ) -> Self {
        use crate::protocol::compression::Encoding;
        Capture {
            path: path.into(),
            request_names: metadata.iter().map(|(n, _)| n.clone()).collect(),
            content_type,
            encoding: (encoding != Encoding::Identity).then(|| encoding.name().into()),
            ..Capture::default()
        }
    }

    /// Counts `n` more bytes; false once the call is too large to record.
    pub fn take(&mut self, n: usize) -> bool {
        self.bytes += n;
        if self.bytes > recorder().map_or(0, |r| r.options.max_call_bytes) {
            self.abandoned = true;
            self.requests = Vec::new();
            self.replies = Vec::new();
        }
        !self.abandoned
    }
}

struct Recorder {
    options: Options,
    sender: SyncSender<Capture>,
    /// Bytes of captures sent and not yet written.
    pending: Arc<AtomicUsize>,
}

static RECORDER: OnceLock<Recorder> = OnceLock::new();

fn recorder() -> Option<&'static Recorder> {
    RECORDER.get()
}

/// Whether calls are being recorded.
pub fn recording() -> bool {
    RECORDER.get().is_some()
}

/// Starts recording into `options.dir` (created if missing), decoding with
/// the descriptors of `state`'s current plan. Once per process.
pub fn start(options: Options, state: Arc<State>) -> Result<(), String> {
    std::fs::create_dir_all(&options.dir)
        .map_err(|e| format!("cannot create the --record directory `{}`: {e}", options.dir.display()))?;
    let probe = options.dir.join(".wirestub-record-probe");
    std::fs::write(&probe, b"").map_err(|e| format!("cannot write in `{}`: {e}", options.dir.display()))?;
    std::fs::remove_file(&probe).ok();
    let (sender, receiver) = sync_channel(1024);
    let pending = Arc::new(AtomicUsize::new(0));
    let writer = Writer {
        options: options.clone(),
        state,
        pending: pending.clone(),
        methods: HashMap::new(),
        held: 0,
        warned: HashSet::new(),
        files: HashSet::new(),
        full: false,
    };
    std::thread::Builder::new()
        .name("wirestub-recorder".into())
        .spawn(move || writer.run(receiver))
        .map_err(|e| format!("cannot start the recorder: {e}"))?;
    RECORDER.set(Recorder { options, sender, pending }).map_err(|_| "recording already started".to_string())
}

/// Hands a finished call to the recorder (dropped, with a warning, when
/// the recorder is that far behind).
pub fn submit(capture: Capture) {
    let Some(r) = recorder() else { return };
    if capture.abandoned {
        warn_once(&TOO_LARGE, "a call over --record-max-call-bytes was not recorded (said once)");
        return;
    }
    let bytes = capture.bytes;
    if r.pending.fetch_add(bytes, Ordering::Relaxed) + bytes > r.options.max_bytes {
        r.pending.fetch_sub(bytes, Ordering::Relaxed);
        warn_once(&BEHIND, "the recorder is behind: calls not recorded (said once)");
        return;
    }
    if r.sender.try_send(capture).is_err() {
        r.pending.fetch_sub(bytes, Ordering::Relaxed);
        warn_once(&BEHIND, "the recorder is behind: calls not recorded (said once)");
    }
}

static TOO_LARGE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static BEHIND: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Logs `what` the first time only: clients decide how often it happens.
fn warn_once(flag: &std::sync::atomic::AtomicBool, what: &str) {
    if !flag.swap(true, Ordering::Relaxed) {
        tracing::warn!("{what}");
    }
}

/// The recordings of one method.
struct MethodRecording {
    service: String,
    method: String,
    /// Bidi: `mode: duplex`.
    duplex: bool,
    /// Recorded without descriptors (raw rules): the call's shape as seen
    /// so far, whether the client and the server streamed.
    raw: Option<(bool, bool)>,
    /// Distinct requests in the order first seen.
    entries: Vec<Entry>,
    /// Its file's name in the directory, chosen at the first write.
    file: Option<String>,
}

/// One distinct request (by its conditions) and the answers it got.
struct Entry {
    when: Map<String, Json>,
    /// Distinct answers in the order seen, each with how many calls in a
    /// row got it.
    answers: Vec<(Json, u32)>,
}

struct Writer {
    options: Options,
    state: Arc<State>,
    pending: Arc<AtomicUsize>,
    methods: HashMap<Box<str>, MethodRecording>,
    /// Bytes of JSON the recordings hold.
    held: usize,
    /// Paths already warned about.
    warned: HashSet<Box<str>>,
    /// `--record-max-bytes` was reached: nothing more is recorded.
    full: bool,
    /// The file names this process writes.
    files: HashSet<String>,
}

impl Writer {
    fn run(mut self, receiver: Receiver<Capture>) {
        while let Ok(capture) = receiver.recv() {
            let bytes = capture.bytes;
            self.record(capture);
            self.pending.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    fn warn_once(&mut self, path: &str, why: &str) {
        // Paths come from clients: the set is bounded, and past it
        // nothing more is said.
        if self.warned.len() < MAX_WARNED && self.warned.insert(path.into()) {
            tracing::warn!(path, "not recorded: {why}");
            if self.warned.len() == MAX_WARNED {
                tracing::warn!("{MAX_WARNED} methods not recorded: no more will be named");
            }
        }
    }

    fn record(&mut self, c: Capture) {
        let generation = self.state.current();
        let Some((service, name)) = c.path.strip_prefix('/').and_then(|p| p.split_once('/')) else { return };
        let valid = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
        if !valid(service) || !valid(name) || name.contains('.') {
            return self.warn_once(&c.path, "not a method path");
        }
        let described = generation
            .schema()
            .and_then(|pool| Some((pool, pool.get_service_by_name(service)?.methods().find(|m| m.name() == name)?)));
        let Some((pool, method)) = described else {
            let (service, name) = (service.to_string(), name.to_string());
            return self.record_raw(c, &service, &name);
        };
        let (input, output) = (method.input(), method.output());
        let ignore = &self.options.ignore_fields;
        let decode = |d: &MessageDescriptor, b: &[u8]| DynamicMessage::decode(d.clone(), b).ok();
        let requests: Option<Vec<DynamicMessage>> = c.requests.iter().map(|b| decode(&input, b)).collect();
        let replies: Option<Vec<DynamicMessage>> = c.replies.iter().map(|(b, _)| decode(&output, b)).collect();
        let (Some(requests), Some(replies)) = (requests, replies) else {
            return self.warn_once(&c.path, "a message does not decode with the method's types");
        };
        if c.texts_hold_braces() || requests.iter().chain(&replies).any(|m| has_braces(&to_json(m))) {
            return self.warn_once(&c.path, "a value holds `{{`, which a rule file would read as a template");
        }
        let meta = self.metadata(&c.headers);
        let ends = self.ending(Some(pool), &c);
        let pace = |from: usize| {
            let gaps: Vec<Duration> = c.replies.iter().skip(from + 1).map(|(_, d)| *d).collect();
            (self.options.pacing && !gaps.is_empty())
                .then(|| (gaps.iter().sum::<Duration>() / gaps.len() as u32).as_millis() as u64)
        };
        let mut calls: Vec<(Map<String, Json>, Json)> = Vec::new();
        let bidi = method.is_client_streaming() && method.is_server_streaming();
        // A bidi method is recorded reply by reply (`mode: duplex`) when its
        // first recorded call had replies before its last request message
        // (the client waited for them); else as a client stream answered
        // at its end, which replays a client that sends everything first.
        let duplex = match self.methods.get(&c.path) {
            Some(r) => r.duplex,
            None => bidi && c.replies_before.last().is_some_and(|&n| n > 0),
        };
        match (method.is_client_streaming(), method.is_server_streaming()) {
            (true, true) if duplex => {
                // Reply by reply: each request message with the replies
                // that came before the next one.
                for (i, r) in requests.iter().enumerate() {
                    let from = c.replies_before[i];
                    let to = c.replies_before.get(i + 1).copied().unwrap_or(replies.len());
                    let last = i + 1 == requests.len();
                    let items: Vec<Json> = replies[from..to].iter().map(to_json).collect();
                    let mut answer = Map::new();
                    answer.insert("stream_items".into(), Json::Array(items.clone()));
                    if let Some(ms) = pace(from).filter(|_| items.len() > 1) {
                        answer.insert("stream_delay_ms".into(), json!(ms));
                    }
                    if i == 0 && !meta.is_empty() {
                        answer.insert("metadata".into(), Json::Object(meta.clone()));
                    }
                    if last && c.status != 0 {
                        answer.extend(ends.clone());
                        answer.insert("stream_error_after".into(), json!(items.len()));
                    }
                    let mut echoes = Vec::new();
                    let when = conditions(r, "", ignore, &mut echoes);
                    echo(&mut answer, &echoes);
                    calls.push((when, Json::Object(answer)));
                }
                if requests.is_empty() {
                    return self.warn_once(&c.path, "a bidi call without request messages cannot be replayed");
                }
            }
            (client, server) => {
                let mut echoes = Vec::new();
                let when = if client {
                    let mut when = Map::new();
                    when.insert("request.count".into(), json!(requests.len()));
                    if let Some(first) = requests.first() {
                        when.extend(conditions(first, "first.", ignore, &mut echoes));
                    }
                    if requests.len() > 1 {
                        let last = requests.last().expect("non-empty");
                        when.extend(conditions(last, "last.", ignore, &mut echoes));
                    }
                    when
                } else {
                    match requests.first() {
                        Some(r) => conditions(r, "", ignore, &mut echoes),
                        None => return self.warn_once(&c.path, "a call without a request message"),
                    }
                };
                let mut answer = Map::new();
                if server {
                    let items: Vec<Json> = replies.iter().map(to_json).collect();
                    let n = items.len();
                    answer.insert("stream_items".into(), Json::Array(items));
                    if let Some(ms) = pace(0).filter(|_| n > 1) {
                        answer.insert("stream_delay_ms".into(), json!(ms));
                    }
                    if c.status != 0 {
                        answer.insert("stream_error_after".into(), json!(n));
                    }
                } else if c.status == 0 {
                    answer.insert("body".into(), replies.first().map(to_json).unwrap_or_else(|| json!({})));
                }
                if !meta.is_empty() {
                    answer.insert("metadata".into(), Json::Object(meta));
                }
                answer.extend(ends);
                echo(&mut answer, &echoes);
                calls.push((when, Json::Object(answer)));
            }
        }
        self.merge(&c.path, service, name, duplex, None, calls);
    }

    /// A call to a method without descriptors, as a raw rule: its messages
    /// as base64, the names of its metadata, its protocol; the answer's
    /// messages, metadata and ending as received.
    fn record_raw(&mut self, c: Capture, service: &str, name: &str) {
        if c.texts_hold_braces() {
            return self.warn_once(&c.path, "a value holds `{{`, which a rule file would read as a template");
        }
        let b64 = |b: &[u8]| Json::String(base64::engine::general_purpose::STANDARD.encode(b));
        let mut names: Vec<String> = c
            .request_names
            .iter()
            .map(|n| n.to_ascii_lowercase())
            .filter(|n| {
                !(NOT_EXPECTED.contains(&n.as_str())
                    || NOT_EXPECTED_PREFIXES.iter().any(|p| n.starts_with(p))
                    || self.options.ignore_metadata.iter().any(|i| i.eq_ignore_ascii_case(n)))
            })
            .collect();
        names.sort();
        names.dedup();
        let mut when = Map::new();
        when.insert("messages".into(), Json::Array(c.requests.iter().map(|m| b64(m)).collect()));
        when.insert("metadata".into(), json!(names));
        when.insert("content_type".into(), json!(c.content_type));
        if let Some(e) = &c.encoding {
            when.insert("encoding".into(), json!(e));
        }
        let mut answer = Map::new();
        answer.insert("messages".into(), Json::Array(c.replies.iter().map(|(m, _)| b64(m)).collect()));
        let gaps: Vec<Duration> = c.replies.iter().skip(1).map(|(_, d)| *d).collect();
        if self.options.pacing && !gaps.is_empty() {
            let ms = (gaps.iter().sum::<Duration>() / gaps.len() as u32).as_millis() as u64;
            answer.insert("stream_delay_ms".into(), json!(ms));
        }
        let meta = self.metadata(&c.headers);
        if !meta.is_empty() {
            answer.insert("metadata".into(), Json::Object(meta));
        }
        answer.extend(self.ending(None, &c));
        // A unary answer has one message or an error, never both: replies
        // then an error, or no reply and OK, is a server stream.
        let server = c.replies.len() > 1 || (c.replies.is_empty() == (c.status == 0));
        let shape = (c.requests.len() != 1, server);
        self.merge(&c.path, service, name, false, Some(shape), vec![(when, Json::Object(answer))]);
    }

    /// Adds a call's rules to its method's recording and rewrites the file
    /// when that changed it.
    fn merge(
        &mut self,
        path: &str,
        service: &str,
        name: &str,
        duplex: bool,
        raw: Option<(bool, bool)>,
        calls: Vec<(Map<String, Json>, Json)>,
    ) {
        if self.full {
            return;
        }
        let grew: usize = calls
            .iter()
            .map(|(when, answer)| answer.to_string().len() + Json::Object(when.clone()).to_string().len())
            .sum();
        if self.held + grew > self.options.max_bytes {
            self.full = true;
            tracing::warn!(max = self.options.max_bytes, "recordings reached --record-max-bytes: recording stops");
            return;
        }
        let recording = self.methods.entry(path.into()).or_insert_with(|| MethodRecording {
            service: service.to_string(),
            method: name.to_string(),
            duplex,
            raw: None,
            entries: Vec::new(),
            file: None,
        });
        let (mut changed, mut added) = (false, false);
        if let Some((client, server)) = raw {
            // Every raw recording answers as many calls as it saw.
            changed = true;
            let (c, s) = recording.raw.unwrap_or_default();
            recording.raw = Some((c || client, s || server));
        }
        for (when, answer) in calls {
            match recording.entries.iter_mut().find(|e| e.when == when) {
                Some(e) => match e.answers.last_mut() {
                    Some((last, n)) if *last == answer => {
                        // Identical calls: one rule; in a sequence, one
                        // call more for its step.
                        *n += 1;
                        changed |= e.answers.len() > 1;
                    }
                    _ => {
                        e.answers.push((answer, 1));
                        changed = true;
                        added = true;
                    }
                },
                None => {
                    recording.entries.push(Entry { when, answers: vec![(answer, 1)] });
                    changed = true;
                    added = true;
                }
            }
        }
        if !changed {
            return;
        }
        // What the new rules hold (counted as the calls' whole text, an
        // upper bound); a repeated call only counts one more.
        if added {
            self.held += grew;
        }
        let dir = &self.options.dir;
        let recording = self.methods.get_mut(path).expect("just recorded");
        if recording.file.is_none() {
            // A file of its own: never one an earlier run wrote (which
            // stays as it was) nor one of a method named alike but for case.
            let stem = format!("{}.{}", recording.service, recording.method).to_ascii_lowercase();
            let free = (1..=MAX_FILES_PER_METHOD).map(|i| match i {
                1 => format!("{stem}.yaml"),
                i => format!("{stem}.{i}.yaml"),
            });
            let taken = &self.files;
            recording.file = free.into_iter().find(|n| !taken.contains(n) && !dir.join(n).exists());
            match &recording.file {
                Some(name) => {
                    self.files.insert(name.clone());
                }
                None => {
                    let why = "every file name for it is taken: move the old recordings away";
                    return self.warn_once(path, why);
                }
            }
        }
        let recording = &self.methods[path];
        if let Err(e) = write(dir, recording) {
            tracing::warn!(path, "cannot write the recording: {e}");
        }
    }

    /// Response metadata as a rule's `metadata`: secrets, transport
    /// headers and `grpc-` keys left out, binary values in base64.
    fn metadata(&self, pairs: &[(String, Vec<u8>)]) -> Map<String, Json> {
        let mut out = Map::new();
        for (name, value) in pairs {
            if !self.keeps(name) {
                continue;
            }
            out.insert(name.clone(), Json::String(metadata_text(value)));
        }
        out
    }

    fn keeps(&self, name: &str) -> bool {
        !(name.starts_with("grpc-")
            || name.starts_with(':')
            || secret(name)
            || TRANSPORT.contains(&name)
            || self.options.redact.iter().any(|r| r.eq_ignore_ascii_case(name)))
    }

    /// The end of the answer as a rule's `trailers` (status, message and
    /// trailing metadata) and `details`.
    /// Without descriptors (`pool` None: a raw recording) the details
    /// stay the trailer they came as, base64.
    fn ending(&self, pool: Option<&DescriptorPool>, c: &Capture) -> Map<String, Json> {
        let mut out = Map::new();
        let mut trailers = Map::new();
        for (name, value) in &c.trailers {
            let raw_details = name == "grpc-status-details-bin" && pool.is_none() && c.status != 0;
            if raw_details && wirestub_plan::is_valid_metadata_value(value) {
                trailers.insert(name.clone(), Json::String(String::from_utf8_lossy(value).into()));
            }
            if name == "grpc-status-details-bin" || !self.keeps(name) {
                continue;
            }
            trailers.insert(name.clone(), Json::String(metadata_text(value)));
        }
        if c.status != 0 {
            trailers.insert("grpc-status".into(), json!(if c.status <= 16 { c.status } else { 2 }));
            let message = crate::codec::percent::decode(&c.message, false);
            if !message.is_empty() {
                trailers.insert("grpc-message".into(), Json::String(message));
            }
            let details = c.trailers.iter().find(|(n, _)| n == "grpc-status-details-bin").map(|(_, v)| v);
            if let Some(details) = details.zip(pool).and_then(|(v, pool)| status_details(pool, v)) {
                out.insert("details".into(), details);
            }
        }
        if !trailers.is_empty() {
            out.insert("trailers".into(), Json::Object(trailers));
        }
        out
    }
}

/// Whether a string in `v` holds `{{`.
fn has_braces(v: &Json) -> bool {
    match v {
        Json::String(s) => s.contains("{{"),
        Json::Array(a) => a.iter().any(has_braces),
        Json::Object(m) => m.iter().any(|(k, v)| k.contains("{{") || has_braces(v)),
        _ => false,
    }
}

/// A metadata value as rules write it: as it travelled (binary `-bin`
/// values travel base64-encoded, which is how rules write them too).
fn metadata_text(value: &[u8]) -> String {
    String::from_utf8_lossy(value).into_owned()
}

/// The `details` of a `google.rpc.Status` (base64, as the trailer carries
/// it, padded or not), as JSON `Any`s; None when they do not decode with
/// the descriptors at hand.
fn status_details(pool: &DescriptorPool, value: &[u8]) -> Option<Json> {
    let text = std::str::from_utf8(value).ok()?.trim_end_matches('=');
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD.decode(text).ok()?;
    let status = DynamicMessage::decode(pool.get_message_by_name("google.rpc.Status")?, &bytes[..]).ok()?;
    let json = status.serialize_with_options(serde_json::value::Serializer, &options()).ok()?;
    json.get("details").cloned().filter(|d| d.as_array().is_some_and(|a| !a.is_empty()))
}

fn options() -> prost_reflect::SerializeOptions {
    prost_reflect::SerializeOptions::new().use_proto_field_name(true)
}

fn to_json(m: &DynamicMessage) -> Json {
    m.serialize_with_options(serde_json::value::Serializer, &options()).unwrap_or_else(|_| json!({}))
}

/// A request's set fields as `when` conditions: `request.<prefix><path>`
/// for scalars (strings, numbers, booleans, enum names), the length of
/// repeated fields, nested messages by their fields; bytes, maps and the
/// ignored paths left out.
fn conditions(
    m: &DynamicMessage,
    prefix: &str,
    ignore: &[String],
    echoes: &mut Vec<(Json, String)>,
) -> Map<String, Json> {
    let mut out = Map::new();
    walk(m, "", &mut |path, value| {
        let name = format!("request.{prefix}{path}");
        if ignore.iter().any(|i| i == path || path.starts_with(&format!("{i}."))) {
            let echoable = match &value {
                Json::String(s) => !s.is_empty(),
                Json::Number(n) => n.as_f64() != Some(0.0),
                _ => false,
            };
            if echoable {
                echoes.push((value, name));
            }
            return;
        }
        out.insert(name, value);
    });
    out
}

/// Where the answer repeats the value of an ignored request field (a
/// request id, a timestamp), a template echoing it instead, so that the
/// replay answers each request with its own value.
fn echo(answer: &mut Map<String, Json>, echoes: &[(Json, String)]) {
    fn visit(v: &mut Json, echoes: &[(Json, String)]) {
        match v {
            Json::Object(m) => m.values_mut().for_each(|v| visit(v, echoes)),
            Json::Array(a) => a.iter_mut().for_each(|v| visit(v, echoes)),
            leaf => {
                // The JSON mapping writes 64-bit integers as strings.
                let same = |e: &Json| e == leaf || (e.is_number() && leaf.as_str() == Some(&e.to_string()));
                if let Some((_, path)) = echoes.iter().find(|(e, _)| same(e)) {
                    *leaf = Json::String(format!("{{{{{path}}}}}"));
                }
            }
        }
    }
    if echoes.is_empty() {
        return;
    }
    for key in ["body", "stream_items"] {
        if let Some(v) = answer.get_mut(key) {
            visit(v, echoes);
        }
    }
}

fn walk(m: &DynamicMessage, at: &str, emit: &mut dyn FnMut(&str, Json)) {
    for (field, value) in m.fields() {
        let path = format!("{at}{}", field.name());
        if field.is_map() {
            continue;
        }
        if field.is_list() {
            if let Value::List(items) = value {
                emit(&path, json!({"len": items.len()}));
            }
            continue;
        }
        match (value, field.kind()) {
            // Well-known types are written in their JSON forms by the
            // protobuf JSON mapping; conditions test plain fields.
            (Value::Message(inner), _) if !inner.descriptor().full_name().starts_with("google.protobuf.") => {
                walk(inner, &format!("{path}."), emit);
            }
            (Value::EnumNumber(n), Kind::Enum(e)) => match e.get_value(*n) {
                Some(v) => emit(&path, json!(v.name())),
                None => emit(&path, json!(n)),
            },
            (Value::String(s), _) => emit(&path, json!(s)),
            (Value::Bool(b), _) => emit(&path, json!(b)),
            (Value::I32(n), _) => emit(&path, json!(n)),
            (Value::I64(n), _) => emit(&path, json!(n)),
            (Value::U32(n), _) => emit(&path, json!(n)),
            (Value::U64(n), _) => emit(&path, json!(n)),
            (Value::F32(n), _) if n.is_finite() => emit(&path, json!(n)),
            (Value::F64(n), _) if n.is_finite() => emit(&path, json!(n)),
            _ => {}
        }
    }
}

/// The rule file of a method's recordings: YAML block structure in the
/// order people read rules (`service`, `method`, `mode`, then per rule
/// `when`, the answer, `times`), each value in JSON's flow form, which
/// YAML reads as is.
fn render(r: &MethodRecording) -> String {
    let flow = |v: &Json| serde_json::to_string(v).unwrap_or_default();
    if let Some(shape) = r.raw {
        return render_raw(r, shape);
    }
    let mut out = format!(
        "# Recorded by wirestub from calls to /{}/{} (`engine run --record`).\n\
         # An ordinary rule file: edit it freely.\nservice: {}\nmethod: {}\n",
        r.service,
        r.method,
        flow(&json!(r.service)),
        flow(&json!(r.method))
    );
    if r.duplex {
        out.push_str("mode: duplex\n");
    }
    out.push_str("responses:\n");
    const ORDER: &[&str] =
        &["body", "stream_items", "stream_delay_ms", "stream_error_after", "metadata", "trailers", "details"];
    for e in &r.entries {
        let sequence = e.answers.len() > 1;
        for (answer, n) in &e.answers {
            let mut lines: Vec<(&str, Json)> = Vec::new();
            if !e.when.is_empty() {
                lines.push(("when", Json::Object(e.when.clone())));
            }
            lines.extend(ORDER.iter().filter_map(|k| answer.get(*k).map(|v| (*k, v.clone()))));
            if sequence {
                lines.push(("times", json!(n)));
            }
            if lines.is_empty() {
                // An answer with nothing to say: the empty message.
                lines.push(("body", json!({})));
            }
            for (i, (key, value)) in lines.iter().enumerate() {
                let lead = if i == 0 { "  - " } else { "    " };
                out.push_str(&format!("{lead}{key}: {}\n", flow(value)));
            }
        }
    }
    out
}

/// A raw recording's file: the call's shape (`raw:`), then per call the
/// request to recognise, the answer, and `times` (each recording answers
/// as many calls as it saw); every message shown decoded by wire type in
/// a comment above its rule.
fn render_raw(r: &MethodRecording, (client, server): (bool, bool)) -> String {
    let flow = |v: &Json| serde_json::to_string(v).unwrap_or_default();
    let kind = wirestub_plan::MethodKind::from_streaming(client, server);
    let mut out = format!(
        "# Recorded by wirestub from calls to /{}/{} (`engine run --record`), without descriptors:\n\
         # messages are base64 protobuf, each shown decoded by wire type in a comment.\n\
         # `compiler build` replays it as it is; with the method's .proto the bodies must decode.\n\
         service: {}\nmethod: {}\nraw: {}\nresponses:\n",
        r.service,
        r.method,
        flow(&json!(r.service)),
        flow(&json!(r.method)),
        kind.name()
    );
    let dump = |list: Option<&Json>, what: &str, out: &mut String| {
        let items = list.and_then(Json::as_array).map(Vec::as_slice).unwrap_or_default();
        for (i, item) in items.iter().enumerate() {
            let bytes = item
                .as_str()
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                .unwrap_or_default();
            out.push_str(&format!("  # {what} {}: {}\n", i + 1, crate::codec::wire_dump::dump(&bytes, 160)));
        }
    };
    for e in &r.entries {
        for (answer, n) in &e.answers {
            dump(e.when.get("messages"), "request", &mut out);
            dump(answer.get("messages"), "answer", &mut out);
            out.push_str(&format!("  - request: {}\n", flow(&Json::Object(e.when.clone()))));
            for key in ["messages", "stream_delay_ms", "metadata", "trailers"] {
                if let Some(v) = answer.get(key) {
                    out.push_str(&format!("    {key}: {}\n", flow(v)));
                }
            }
            out.push_str(&format!("    times: {n}\n"));
        }
    }
    out
}

/// Replaces the method's file: a temporary file, written and synced, then
/// renamed over it, and the directory synced so the rename lasts.
fn write(dir: &Path, r: &MethodRecording) -> std::io::Result<()> {
    let Some(name) = &r.file else { return Ok(()) };
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(render(r).as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        d.sync_all().ok();
    }
    Ok(())
}
