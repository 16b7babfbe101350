//! The plan as the engine serves it: built once at load time from a
//! validated [`Plan`], immutable afterwards and shared by every worker.
//!
//! Everything a response needs is prepared here (framed body as `Bytes`,
//! header and trailer maps), so answering a call is a few reference-count
//! bumps and map clones, never an encode.

pub mod generation;

use crate::codec::json::JsonCodec;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use regex_automata::dfa::dense::DFA;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use wirestub_plan::{MessageSel, Method, MethodKind, Op, Plan, Shape, Source, Test, Value};

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
    /// Response headers: content-type and initial metadata.
    pub headers: HeaderMap,
    /// grpc-status, grpc-message and trailing metadata.
    pub trailers: HeaderMap,
    /// Headers and trailers in one map, for an error sent as a
    /// trailers-only response.
    pub trailers_only: HeaderMap,
    /// The same three, HPACK-encoded for the native HTTP/2 stack.
    pub blocks: Blocks,
    pub delay: Duration,
    /// Streamed messages (server-streaming methods); empty: `body` alone.
    pub stream: Vec<Bytes>,
    pub stream_delay: Duration,
    /// Passes over `stream`; 0 = until the client cancels.
    pub stream_repeat: u32,
    pub stream_random_order: bool,
    /// Streamed messages sent before an error status.
    pub error_after: u32,
    /// Messages rendered per call (slot 0: the body; slot i + 1: item i).
    pub templates: Vec<(u32, wirestub_plan::Template)>,
    pub latency: wirestub_plan::Latency,
    /// Boxed, as is everything rare here: calls that hold a `Prepared`
    /// (builtin services, refusals) stay small.
    pub fault: Option<Box<wirestub_plan::Fault>>,
    /// Calls this response may answer; 0 for no limit.
    pub times: u32,
    /// `body` and `stream` in the protobuf JSON mapping, framed, for
    /// JSON clients (see [`JsonCodec`]); None: transcoded per call.
    pub json: Option<Box<JsonForms>>,
    /// Metadata values rendered per call (see [`Prepared::with_metadata`]).
    pub metadata_templates: Option<Box<[wirestub_plan::MetadataTemplate]>>,
}

impl Prepared {
    /// This answer with more metadata: `headers` after its headers,
    /// `trailers` after its trailers, the header blocks encoded again.
    /// For answers with templated metadata, once per call.
    pub fn with_metadata(&self, headers: &[(String, Vec<u8>)], trailers: &[(String, Vec<u8>)]) -> Prepared {
        let mut p = self.clone();
        let append = |map: &mut HeaderMap, pairs: &[(String, Vec<u8>)]| {
            for (k, v) in pairs {
                if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_bytes(v)) {
                    map.append(k, v);
                }
            }
        };
        append(&mut p.headers, headers);
        append(&mut p.trailers, trailers);
        append(&mut p.trailers_only, headers);
        append(&mut p.trailers_only, trailers);
        p.blocks = Blocks::encode(&p.headers, &p.trailers, &p.trailers_only);
        p
    }
}

/// A response's messages transcoded to JSON once, at load.
#[derive(Debug, Clone)]
pub struct JsonForms {
    pub body: Bytes,
    pub stream: Vec<Bytes>,
}

/// A response's header blocks, encoded once (HPACK literals without
/// indexing: no per-connection encoder state), ready to be framed.
#[derive(Debug, Clone, Default)]
pub struct Blocks {
    /// `:status: 200` and the response headers.
    pub headers: Bytes,
    /// The trailers.
    pub trailers: Bytes,
    /// `:status: 200`, headers and trailers in one block.
    pub trailers_only: Bytes,
}

impl Blocks {
    fn encode(headers: &HeaderMap, trailers: &HeaderMap, trailers_only: &HeaderMap) -> Blocks {
        use crate::codec::hpack;
        let block = |status: bool, map: &HeaderMap| {
            let mut b = Vec::with_capacity(64);
            if status {
                hpack::encode_status(&mut b, 200);
            }
            for (k, v) in map {
                hpack::encode_literal(&mut b, k.as_str().as_bytes(), v.as_bytes());
            }
            Bytes::from(b)
        };
        Blocks {
            headers: block(true, headers),
            trailers: block(false, trailers),
            trailers_only: block(true, trailers_only),
        }
    }
}

impl Prepared {
    /// The wait before answering, drawn from the response's distribution.
    pub fn draw_delay(&self) -> Duration {
        use wirestub_plan::Latency;
        let ms = match self.latency {
            Latency::Fixed => return self.delay,
            Latency::Uniform { min, max } => min + crate::rng::unit() * (max - min),
            Latency::Normal { mean, stddev } => mean + stddev * crate::rng::normal(),
            // The 99th percentile of a standard normal is 2.326348 standard
            // deviations above the mean.
            Latency::LogNormal { median, p99 } => {
                let sigma = (p99.ln() - median.ln()) / 2.326_347_874;
                (median.ln() + sigma * crate::rng::normal()).exp()
            }
        };
        Duration::from_secs_f64(ms.clamp(0.0, 86_400_000.0) / 1000.0)
    }
}

/// A hash of what a response answers, to find the same response in the
/// plan before (equality decides).
/// The names of a method's responses' shared `times` counts:
/// `PATH:KEY` (the [`response_key`] in hex), with `-N` for the Nth response
/// of the method with the same key, so identical responses count apart.
fn shared_keys(m: &wirestub_plan::Method) -> Arc<[Arc<str>]> {
    let mut seen: HashMap<u64, usize> = HashMap::new();
    m.responses
        .iter()
        .map(|r| {
            let key = response_key(r);
            let n = seen.entry(key).or_insert(0);
            let name = match *n {
                0 => format!("{}:{key:016x}", m.path),
                k => format!("{}:{key:016x}-{k}", m.path),
            };
            *n += 1;
            Arc::from(name)
        })
        .collect()
}

fn response_key(r: &wirestub_plan::Response) -> u64 {
    let mut h = wirestub_plan::fnv1a(&r.body);
    let mut mix = |bytes: &[u8]| h = (h ^ wirestub_plan::fnv1a(bytes)).wrapping_mul(0x0100_0000_01b3);
    mix(&[r.status]);
    mix(r.message.as_bytes());
    for (k, v) in r.headers.iter().chain(r.trailers.iter()) {
        mix(k.as_bytes());
        mix(v);
    }
    for item in &r.stream {
        mix(item);
    }
    mix(&r.delay_ms.to_le_bytes());
    mix(&r.times.to_le_bytes());
    h
}

/// Most (response, session) counts a method keeps for responses limited
/// by `times`; calls of further sessions count as calls without one.
pub const MAX_SESSION_COUNTS: usize = 65_536;

/// Calls answered by each response limited by `times`, counted per test
/// session (as GripMock counts per stub and session), so parallel suites
/// sharing an engine each get their N answers. Calls without a session use
/// [`ServedMethod::used`]. Touched only by responses limited by `times`,
/// for calls that carry a session.
pub struct SessionUses {
    /// Where the call's session is among the method's metadata values (the
    /// compiler adds the key to methods with such responses).
    pub slot: Option<usize>,
    counts: std::sync::Mutex<HashMap<SessionCount, u64>>,
}

/// A response (its index) and a session.
type SessionCount = (u32, Box<[u8]>);

impl SessionUses {
    fn new(keys: &[String]) -> SessionUses {
        SessionUses {
            slot: keys.iter().position(|k| k == wirestub_plan::SESSION_KEY),
            counts: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn copy_from(&self, old: &SessionUses, old_response: u32, response: u32) {
        let old_counts = old.counts.lock().unwrap_or_else(|e| e.into_inner());
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        for ((r, session), n) in old_counts.iter() {
            if *r == old_response && counts.len() < MAX_SESSION_COUNTS {
                counts.insert((response, session.clone()), *n);
            }
        }
    }

    /// Counts one call of `session` for `response`; returns the calls
    /// counted before it, or None when the table is full and this session
    /// is new (the caller counts the call as one without a session).
    pub fn claim(&self, response: u32, session: &[u8]) -> Option<u64> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let key = (response, Box::<[u8]>::from(session));
        if let Some(n) = counts.get_mut(&key) {
            *n += 1;
            return Some(*n - 1);
        }
        if counts.len() >= MAX_SESSION_COUNTS {
            return None;
        }
        counts.insert(key, 1);
        Some(0)
    }
}

pub struct ServedMethod {
    pub plan: Method,
    /// Shared with the plan this one replaced where a response is the
    /// same (see [`Served::new_after`]).
    pub responses: Vec<Arc<Prepared>>,
    /// The answer when no rule matches.
    pub no_match: Prepared,
    /// The singular fields, grouped by the message they read: each group is
    /// read in one pass over that message.
    pub singular: Vec<(MessageSel, Vec<u32>)>,
    /// The same without the fields only validation reads: what a call
    /// reads when validation is off.
    pub singular_rules: Vec<(MessageSel, Vec<u32>)>,
    /// The method's regular expressions, deserialized.
    pub regexes: Vec<DFA<Vec<u32>>>,
    /// A lookup from one input's value to the rules that can match it;
    /// None for methods with few rules, where a scan is as fast.
    pub index: Option<Index>,
    /// See [`ServedMethod::messages_kept`].
    pub keep: usize,
    /// Whether its calls are validated (`call::validate::applies`),
    /// decided at its first call.
    pub validated: std::sync::OnceLock<bool>,
    /// The method's CEL validation rules, parsed (in the order of the
    /// plan's `cel_checks`).
    pub cel: Vec<Option<crate::call::cel_ext::CelRule>>,
    /// The fields that read every message of a client stream (aggregates
    /// in templates), folded as the messages arrive.
    pub each: Vec<u32>,
    /// For inputs tested with `contains` for many different literals: one
    /// Aho-Corasick automaton finding them all in a single pass, indexed
    /// like [`Method::fields`] then [`Method::metadata_keys`].
    pub literals: Vec<Option<Literals>>,
    /// Calls answered so far by each response, for responses limited by
    /// `times`: the only state shared between workers on the request path,
    /// and touched only by such responses.
    pub used: Vec<std::sync::atomic::AtomicU64>,
    /// The same counts for calls of a test session, per session.
    pub session_uses: SessionUses,
    /// A service the engine answers itself (health, reflection), for
    /// methods the plan has no rules for.
    pub builtin: Option<Builtin>,
    /// Position in [`Served::methods`].
    pub position: usize,
    /// The protobuf JSON mapping of its messages (None when the plan's
    /// descriptors lack its types).
    pub json: Option<JsonCodec>,
    /// Marked `idempotency_level = NO_SIDE_EFFECTS`: Connect clients may
    /// call it with GET.
    pub no_side_effects: bool,
    /// The method's recordings (raw rules), in plan order, prepared for
    /// comparing calls with them (see `call::raw`).
    pub raw: Vec<crate::call::raw::Recording>,
    /// What each response's `times` count is named by in the shared store
    /// (`--shared-state`): the method's path and what the response answers
    /// (so a plan that leaves a response unchanged, whatever else changed
    /// or wherever its files are, counts on; see [`shared_keys`]).
    pub shared_keys: Arc<[Arc<str>]>,
}

/// Whether the method at `path` (`/package.Service/Method`) is marked
/// `idempotency_level = NO_SIDE_EFFECTS`.
fn no_side_effects(pool: &prost_reflect::DescriptorPool, path: &str) -> bool {
    let Some((service, name)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else { return false };
    let Some(method) = pool.get_service_by_name(service).and_then(|s| s.methods().find(|m| m.name() == name)) else {
        return false;
    };
    let options = method.options();
    let level = options.get_field_by_name("idempotency_level");
    matches!(level.as_deref(), Some(prost_reflect::Value::EnumNumber(1)))
}

/// The services the engine implements itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    HealthCheck,
    HealthWatch,
    /// `ServerReflectionInfo`, v1 and v1alpha alike.
    Reflection,
}

/// Built-in methods: path, kind, request and response types.
const BUILTINS: [(&str, MethodKind, &str, &str, Builtin); 4] = [
    (
        crate::observe::health::CHECK,
        MethodKind::Unary,
        "grpc.health.v1.HealthCheckRequest",
        "grpc.health.v1.HealthCheckResponse",
        Builtin::HealthCheck,
    ),
    (
        crate::observe::health::WATCH,
        MethodKind::ServerStreaming,
        "grpc.health.v1.HealthCheckRequest",
        "grpc.health.v1.HealthCheckResponse",
        Builtin::HealthWatch,
    ),
    (
        crate::observe::reflection::V1,
        MethodKind::BidiStreaming,
        "grpc.reflection.v1.ServerReflectionRequest",
        "grpc.reflection.v1.ServerReflectionResponse",
        Builtin::Reflection,
    ),
    (
        crate::observe::reflection::V1ALPHA,
        MethodKind::BidiStreaming,
        "grpc.reflection.v1alpha.ServerReflectionRequest",
        "grpc.reflection.v1alpha.ServerReflectionResponse",
        Builtin::Reflection,
    ),
];

/// Rules keyed on the value of one input they test for equality (`eq` or
/// `in` at the top level of a condition).
pub struct Index {
    pub source: Source,
    /// Key bytes of a value (see [`IndexKey`]) to the rules that test the
    /// input for that value, in rule order.
    pub keyed: HashMap<Box<[u8]>, Vec<u32>>,
    /// Rules that do not test the input for equality, in rule order.
    pub rest: Vec<u32>,
}

/// The `contains` literals of one input, searched together.
pub struct Literals {
    pub automaton: aho_corasick::AhoCorasick,
    /// Literal to pattern id.
    pub ids: HashMap<Box<[u8]>, usize>,
}

/// Inputs with fewer distinct literals are searched one literal at a time.
const LITERALS_MIN: usize = 4;

/// Position of a source in [`ServedMethod::literals`].
pub fn literal_slot(m: &Method, source: Source) -> usize {
    match source {
        Source::Field(i) => i as usize,
        Source::Metadata(i) => m.fields.len() + i as usize,
    }
}

fn build_literals(m: &Method) -> Vec<Option<Literals>> {
    fn collect(t: &Test, out: &mut Vec<Vec<u8>>) {
        match t {
            Test::Op(Op::Contains(Value::Bytes(b))) => out.push(b.clone()),
            Test::Not(t) => collect(t, out),
            Test::Any(list) | Test::All(list) => list.iter().for_each(|t| collect(t, out)),
            _ => {}
        }
    }
    let mut per_slot: Vec<Vec<Vec<u8>>> = vec![Vec::new(); m.fields.len() + m.metadata_keys.len()];
    for r in &m.rules {
        for c in &r.conditions {
            // Repeated fields and paths through them are read per element,
            // not as one text an automaton scans.
            let repeated = matches!(c.source, Source::Field(i) if m.fields[i as usize].shape == Shape::Repeated || !m.fields[i as usize].picks.is_empty());
            if !repeated {
                collect(&c.test, &mut per_slot[literal_slot(m, c.source)]);
            }
        }
    }
    per_slot
        .into_iter()
        .map(|mut needles| {
            needles.sort();
            needles.dedup();
            if needles.len() < LITERALS_MIN {
                return None;
            }
            let automaton = aho_corasick::AhoCorasick::new(&needles).ok()?;
            let ids = needles.into_iter().enumerate().map(|(i, n)| (n.into_boxed_slice(), i)).collect();
            Some(Literals { automaton, ids })
        })
        .collect()
}

/// Methods with fewer rules are scanned; an index would not pay.
const INDEX_MIN_RULES: usize = 8;

/// The bytes a value is indexed under, built on the stack for numbers and
/// borrowed for strings. NaN is never indexed (it equals nothing).
#[derive(Default)]
pub struct IndexKey<'a> {
    buf: [u8; 8],
    len: usize,
    borrowed: Option<&'a [u8]>,
}

impl<'a> IndexKey<'a> {
    /// Sets the key from a value; false if the value cannot be a key.
    pub fn set(&mut self, v: crate::codec::wire::ValueRef<'a>) -> bool {
        use crate::codec::wire::ValueRef as V;
        let (bytes, len): ([u8; 8], usize) = match v {
            V::I64(x) => (x.to_le_bytes(), 8),
            V::U64(x) => (x.to_le_bytes(), 8),
            V::F64(x) if x.is_nan() => return false,
            // -0.0 == 0.0, so both take the same key.
            V::F64(x) => ((if x == 0.0 { 0.0f64 } else { x }).to_bits().to_le_bytes(), 8),
            V::Bool(b) => ([b as u8, 0, 0, 0, 0, 0, 0, 0], 1),
            V::Bytes(b) => {
                self.borrowed = Some(b);
                return true;
            }
        };
        self.buf = bytes;
        self.len = len;
        self.borrowed = None;
        true
    }

    pub fn as_slice(&self) -> &[u8] {
        self.borrowed.unwrap_or(&self.buf[..self.len])
    }
}

/// Why a plan could not be prepared for serving (after it loaded).
#[derive(Debug)]
pub struct PrepareError(String);

impl fmt::Display for PrepareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PrepareError {}

/// Deserializes a DFA written little-endian by the compiler. The bytes are
/// copied to a 4-byte-aligned buffer first, as deserialization requires;
/// `from_bytes` validates everything, so a corrupt DFA is an error here and
/// never a wrong answer later.
fn load_dfa(bytes: &[u8]) -> Result<DFA<Vec<u32>>, String> {
    let mut buf = vec![0u8; bytes.len() + 3];
    let at = buf.as_ptr().align_offset(4).min(3);
    buf[at..at + bytes.len()].copy_from_slice(bytes);
    let (dfa, _) = DFA::from_bytes(&buf[at..at + bytes.len()]).map_err(|e| e.to_string())?;
    Ok(dfa.to_owned())
}

fn index_key_of(v: &Value) -> Option<Box<[u8]>> {
    let mut k = IndexKey::default();
    k.set(crate::codec::wire::as_ref(v)).then(|| k.as_slice().to_vec().into_boxed_slice())
}

/// Which field paths only validation checks read (no rule, template or
/// aggregate does).
fn check_only_fields(m: &Method) -> Vec<bool> {
    use wirestub_plan::{Expr, Part, Piece};
    let mut by_checks = vec![false; m.fields.len()];
    for c in &m.checks {
        if let Source::Field(i) = c.source {
            by_checks[i as usize] = true;
        }
        for &g in &c.guards {
            by_checks[g as usize] = true;
        }
    }
    let mut used = vec![false; m.fields.len()];
    for r in &m.rules {
        for c in &r.conditions {
            if let Source::Field(i) = c.source {
                used[i as usize] = true;
            }
        }
    }
    fn expr(e: &Expr, used: &mut [bool]) {
        match e {
            Expr::Field(i) | Expr::EnumName(i, _) | Expr::Aggregate(i, _) => used[*i as usize] = true,
            Expr::Format(_, args) => args.iter().for_each(|a| expr(a, used)),
            Expr::Arith(l, _, r) => {
                expr(l, used);
                expr(r, used);
            }
            Expr::Fill(n, _) => expr(n, used),
            _ => {}
        }
    }
    fn parts(ps: &[Part], used: &mut [bool]) {
        for p in ps {
            if let Part::Expr(e) = p {
                expr(e, used);
            }
        }
    }
    fn pieces(ps: &[Piece], used: &mut [bool]) {
        for p in ps {
            match p {
                Piece::Bytes(_) => {}
                Piece::Nested { pieces: inner, .. } => pieces(inner, used),
                Piece::Text { parts: ps, .. } | Piece::Number { parts: ps, .. } => parts(ps, used),
            }
        }
    }
    for r in &m.responses {
        for (_, t) in &r.templates {
            pieces(&t.pieces, &mut used);
        }
        for t in &r.metadata_templates {
            parts(&t.parts, &mut used);
        }
    }
    by_checks.iter().zip(&used).map(|(c, u)| *c && !*u).collect()
}

/// Builds the index on the input most rules test for equality, if it pays.
fn build_index(m: &Method) -> Option<Index> {
    if m.rules.len() < INDEX_MIN_RULES {
        return None;
    }
    let indexable = |s: Source| match s {
        Source::Metadata(_) => true,
        Source::Field(i) => !m.fields[i as usize].is_multi(),
    };
    let eq_values = |t: &Test| -> Option<Vec<Value>> {
        match t {
            Test::Op(Op::Eq(v)) => Some(vec![v.clone()]),
            Test::Op(Op::In(vs)) => Some(vs.clone()),
            _ => None,
        }
    };
    let mut counts: HashMap<Source, usize> = HashMap::new();
    for r in &m.rules {
        for c in &r.conditions {
            if indexable(c.source) && eq_values(&c.test).is_some() {
                *counts.entry(c.source).or_default() += 1;
            }
        }
    }
    let (&source, &count) = counts.iter().max_by_key(|(s, n)| (**n, std::cmp::Reverse(format!("{s:?}"))))?;
    if count < INDEX_MIN_RULES / 2 {
        return None;
    }
    let mut keyed: HashMap<Box<[u8]>, Vec<u32>> = HashMap::new();
    let mut rest = Vec::new();
    for (i, r) in m.rules.iter().enumerate() {
        let values = r.conditions.iter().find(|c| c.source == source).and_then(|c| eq_values(&c.test));
        match values {
            Some(vs) => {
                for v in vs {
                    if let Some(k) = index_key_of(&v) {
                        let list = keyed.entry(k).or_default();
                        if list.last() != Some(&(i as u32)) {
                            list.push(i as u32);
                        }
                    }
                }
            }
            None => rest.push(i as u32),
        }
    }
    Some(Index { source, keyed, rest })
}

pub struct Served {
    pub methods: Vec<ServedMethod>,
    by_path: HashMap<Box<str>, usize>,
    /// A hash of the plan's descriptors: prepared answers (their JSON
    /// forms) are shared with a later plan only if its descriptors are the
    /// same.
    descriptors: u64,
    /// Headers and an OK trailer for answers the engine makes itself
    /// (health, reflection).
    pub ok: Prepared,
    /// What a call to a method the plan lacks is served as when it is
    /// forwarded to the upstream: no rules, no path; its `position` is
    /// one past the plan's methods (its metrics are labelled `(unknown)`).
    pub forwarded: ServedMethod,
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
    let mut trailers_only = h.clone();
    trailers_only.extend(t.clone());
    Prepared {
        status,
        body,
        blocks: Blocks::encode(&h, &t, &trailers_only),
        headers: h,
        trailers: t,
        trailers_only,
        delay,
        stream: Vec::new(),
        stream_delay: Duration::ZERO,
        stream_repeat: 1,
        stream_random_order: false,
        error_after: 0,
        templates: Vec::new(),
        latency: wirestub_plan::Latency::Fixed,
        fault: None,
        times: 0,
        json: None,
        metadata_templates: None,
    }
}

/// A response for a status the engine produces itself.
pub fn status_response(code: u8, message: &str) -> Prepared {
    prepare(code, &wirestub_plan::percent_encode_message(message), Bytes::new(), &[], &[], Duration::ZERO)
}

/// A status answer that also names the message encodings the engine
/// accepts (`grpc-accept-encoding`), for refusals of any other.
pub fn encoding_refusal(status: &crate::protocol::grpc::Status) -> Prepared {
    let accept = [("grpc-accept-encoding".to_string(), crate::protocol::grpc::ACCEPT_ENCODING.as_bytes().to_vec())];
    let message = wirestub_plan::percent_encode_message(&status.message);
    prepare(status.code as u8, &message, Bytes::new(), &accept, &[], Duration::ZERO)
}

/// The prepared answer for a status the engine chose.
pub fn status_answer(status: &crate::protocol::grpc::Status) -> Prepared {
    if status.accept_encoding {
        encoding_refusal(status)
    } else {
        status_response(status.code as u8, &status.message)
    }
}

impl Served {
    pub fn new(plan: Plan, no_match: NoMatch) -> Result<Served, PrepareError> {
        Served::new_after(plan, no_match, None)
    }

    /// Prepares `plan`, taking the prepared answers that are the same from
    /// `previous` (the plan it replaces) rather than preparing them again:
    /// a change to one rule of many prepares that rule's answer only.
    pub fn new_after(plan: Plan, no_match: NoMatch, previous: Option<&Served>) -> Result<Served, PrepareError> {
        // The descriptors, for the JSON mapping (a plan without them, as
        // some tests build, serves protobuf only).
        let pool = prost_reflect::DescriptorPool::decode(&plan.descriptors[..]).ok();
        let descriptors = wirestub_plan::fnv1a(&plan.descriptors);
        let previous = previous.filter(|p| p.descriptors == descriptors);
        let mut methods = Vec::with_capacity(plan.methods.len());
        let mut by_path = HashMap::with_capacity(plan.methods.len());
        for m in plan.methods {
            let json = pool.as_ref().and_then(|pool| JsonCodec::new(pool, &m.input_type, &m.output_type));
            let get = pool.as_ref().is_some_and(|pool| no_side_effects(pool, &m.path));
            let old = previous
                .and_then(|p| p.method(&m.path))
                .filter(|o| o.plan.input_type == m.input_type && o.plan.output_type == m.output_type);
            let mut by_key: HashMap<u64, Vec<usize>> = HashMap::new();
            if let Some(o) = old {
                for (i, r) in o.plan.responses.iter().enumerate() {
                    by_key.entry(response_key(r)).or_default().push(i);
                }
            }
            let reuse = |r: &wirestub_plan::Response| -> Option<Arc<Prepared>> {
                let o = old?;
                let i = by_key.get(&response_key(r))?.iter().find(|&&i| o.plan.responses[i] == *r)?;
                o.responses.get(*i).cloned()
            };
            let responses = m
                .responses
                .iter()
                .map(|r| {
                    if let Some(p) = reuse(r) {
                        return p;
                    }
                    let mut p = prepare(
                        r.status,
                        &r.message,
                        Bytes::from(r.body.clone()),
                        &r.headers,
                        &r.trailers,
                        Duration::from_millis(r.delay_ms as u64),
                    );
                    p.stream = r.stream.iter().map(|item| Bytes::from(item.clone())).collect();
                    p.stream_delay = Duration::from_millis(r.stream_delay_ms as u64);
                    p.stream_repeat = r.stream_repeat;
                    p.stream_random_order = r.stream_random_order;
                    p.error_after = r.error_after;
                    p.templates = r.templates.clone();
                    p.latency = r.latency;
                    p.fault = r.fault.clone().map(Box::new);
                    p.times = r.times;
                    p.metadata_templates =
                        (!r.metadata_templates.is_empty()).then(|| r.metadata_templates.clone().into_boxed_slice());
                    if let Some(codec) = &json {
                        p.json = Some(Box::new(JsonForms {
                            body: codec.response(&p.body),
                            stream: p.stream.iter().map(|item| codec.response(item)).collect(),
                        }));
                    }
                    Arc::new(p)
                })
                .collect();
            let no_match = match no_match {
                NoMatch::NotFound => status_response(5, &format!("no rule matches this request to {}", &m.path[1..])),
                NoMatch::EmptyOk => prepare(0, "", Bytes::from_static(&[0, 0, 0, 0, 0]), &[], &[], Duration::ZERO),
            };
            let regexes = m
                .regexes
                .iter()
                .enumerate()
                .map(|(i, r)| load_dfa(r).map_err(|e| PrepareError(format!("method {}: regex {i}: {e}", m.path))))
                .collect::<Result<Vec<_>, _>>()?;
            // Fields only validation reads are read only with validation on.
            let check_only = check_only_fields(&m);
            let mut singular: Vec<(MessageSel, Vec<u32>)> = Vec::new();
            let mut singular_rules: Vec<(MessageSel, Vec<u32>)> = Vec::new();
            for (i, f) in m.fields.iter().enumerate() {
                if f.shape != Shape::Singular
                    || !f.picks.is_empty()
                    || matches!(f.message, MessageSel::Count | MessageSel::Each)
                {
                    continue;
                }
                let groups = match check_only[i] {
                    true => vec![&mut singular],
                    false => vec![&mut singular, &mut singular_rules],
                };
                for group in groups {
                    match group.iter_mut().find(|(sel, _)| *sel == f.message) {
                        Some((_, list)) => list.push(i as u32),
                        None => group.push((f.message, vec![i as u32])),
                    }
                }
            }
            let index = build_index(&m);
            let counts_named = shared_keys(&m);
            by_path.insert(m.path.clone().into_boxed_str(), methods.len());
            let used = (0..m.responses.len()).map(|_| std::sync::atomic::AtomicU64::new(0)).collect();
            let m_keys = m.metadata_keys.clone();
            let cel = m.cel_checks.iter().map(crate::call::cel_ext::CelRule::prepare).collect();
            let each =
                (0..m.fields.len() as u32).filter(|&i| m.fields[i as usize].message == MessageSel::Each).collect();
            let literals = build_literals(&m);
            // A built-in service the plan declares but has no rules for
            // is still answered by the engine.
            let builtin = match m.rules.is_empty() {
                true => BUILTINS.iter().find(|b| b.0 == m.path).map(|b| b.4),
                false => None,
            };
            let mut served = ServedMethod {
                plan: m,
                responses,
                no_match,
                singular,
                singular_rules,
                regexes,
                index,
                keep: 0,
                validated: Default::default(),
                cel,
                each,
                used,
                session_uses: SessionUses::new(&m_keys),
                shared_keys: counts_named,
                literals,
                builtin,
                position: methods.len(),
                json,
                no_side_effects: get,
                raw: Vec::new(),
            };
            served.raw = crate::call::raw::prepare(&served.plan);
            served.keep = served.messages_kept();
            methods.push(served);
        }
        for (path, kind, input, output, builtin) in BUILTINS {
            if by_path.contains_key(path) {
                continue;
            }
            by_path.insert(path.into(), methods.len());
            let mut m = ServedMethod::bare(path, kind, input, output, methods.len());
            m.plan.duplex = kind == MethodKind::BidiStreaming;
            m.builtin = Some(builtin);
            methods.push(m);
        }
        let ok = prepare(0, "", Bytes::new(), &[], &[], Duration::ZERO);
        // Calls to methods the plan lacks, forwarded to the upstream: a
        // stream of messages either way, counted past the plan's methods.
        let forwarded = ServedMethod::bare("", MethodKind::BidiStreaming, "", "", methods.len());
        Ok(Served { methods, by_path, descriptors, ok, forwarded })
    }

    /// Carries the `times` counts of `old` (the plan this one replaces)
    /// over to the responses that are unchanged: written at the same place
    /// (a rule's origin), with the same limit and the same answer. A change
    /// to one rule file so leaves every other limited response's count as
    /// it was.
    /// Rules whose origin `reset` picks start again.
    pub fn inherit_uses(&self, old: &Served, reset: &dyn Fn(&str) -> bool) {
        use std::sync::atomic::Ordering::Relaxed;
        for m in &self.methods {
            if !m.plan.responses.iter().any(|r| r.times > 0) {
                continue;
            }
            let Some(o) = old.method(&m.plan.path) else { continue };
            let by_origin: HashMap<&str, u32> = o.plan.rules.iter().map(|r| (r.origin.as_str(), r.response)).collect();
            for rule in &m.plan.rules {
                let response = &m.plan.responses[rule.response as usize];
                if response.times == 0 || reset(&rule.origin) {
                    continue;
                }
                let Some(&before) = by_origin.get(rule.origin.as_str()) else { continue };
                if o.plan.responses.get(before as usize) != Some(response) {
                    continue;
                }
                let n = o.used[before as usize].load(Relaxed);
                m.used[rule.response as usize].store(n, Relaxed);
                m.session_uses.copy_from(&o.session_uses, before, rule.response);
            }
        }
    }

    /// The method at `position`; [`Served::forwarded`] past the last.
    pub fn at(&self, position: usize) -> &ServedMethod {
        self.methods.get(position).unwrap_or(&self.forwarded)
    }

    pub fn method(&self, path: &str) -> Option<&ServedMethod> {
        self.by_path.get(path).map(|&i| &self.methods[i])
    }

    pub fn is_unary(m: &ServedMethod) -> bool {
        m.plan.kind == MethodKind::Unary
    }
}

impl ServedMethod {
    /// Claims one call of `response` in this process's counts: true unless
    /// it is limited by `times` and used up. Counted per test session for
    /// a call of one (`session`).
    pub fn claim_local(&self, response: u32, session: Option<&[u8]>) -> bool {
        let times = self.responses[response as usize].times;
        if times == 0 {
            return true;
        }
        let claimed = session.and_then(|s| self.session_uses.claim(response, s));
        let used =
            claimed.unwrap_or_else(|| self.used[response as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        used < times as u64
    }

    /// A method without rules.
    fn bare(path: &str, kind: MethodKind, input: &str, output: &str, position: usize) -> ServedMethod {
        ServedMethod {
            plan: Method {
                path: path.into(),
                kind,
                input_type: input.into(),
                output_type: output.into(),
                fields: Vec::new(),
                metadata_keys: Vec::new(),
                responses: Vec::new(),
                rules: Vec::new(),
                duplex: false,
                regexes: Vec::new(),
                checks: Vec::new(),
                cel_checks: Vec::new(),
            },
            responses: Vec::new(),
            no_match: status_response(12, "not implemented"),
            singular: Vec::new(),
            singular_rules: Vec::new(),
            regexes: Vec::new(),
            index: None,
            keep: 1,
            validated: Default::default(),
            cel: Vec::new(),
            each: Vec::new(),
            used: Vec::new(),
            session_uses: SessionUses::new(&[]),
            shared_keys: Arc::from(Vec::new()),
            literals: Vec::new(),
            builtin: None,
            position,
            json: None,
            no_side_effects: false,
            raw: Vec::new(),
        }
    }

    /// How many leading messages of a client stream the rules can name
    /// (`first`, `items.N`); later ones are dropped as they arrive, except
    /// the last, so memory stays bounded however long the stream.
    pub fn messages_kept(&self) -> usize {
        self.plan
            .fields
            .iter()
            .map(|f| match f.message {
                MessageSel::Nth(n) => n as usize + 1,
                MessageSel::First | MessageSel::Single => 1,
                MessageSel::Last | MessageSel::Count | MessageSel::Each => 0,
            })
            .chain(self.raw.iter().map(|r| r.messages + 1))
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wirestub_plan::Latency;

    fn draws(latency: Latency) -> Vec<f64> {
        crate::rng::seed(42);
        let mut p = prepare(0, "", Bytes::new(), &[], &[], Duration::from_millis(7));
        p.latency = latency;
        let mut v: Vec<f64> = (0..20_000).map(|_| p.draw_delay().as_secs_f64() * 1000.0).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v
    }

    fn quantile(v: &[f64], q: f64) -> f64 {
        v[((v.len() - 1) as f64 * q) as usize]
    }

    #[test]
    fn many_literals_on_one_input_share_an_automaton() {
        use wirestub_plan::{Condition, FieldPath, MessageSel, Rule, ScalarKind};
        let contains =
            |w: &str| Condition { source: Source::Field(0), test: Test::Op(Op::Contains(Value::Bytes(w.into()))) };
        let m = Method {
            path: "/p.S/M".into(),
            kind: MethodKind::Unary,
            input_type: "p.R".into(),
            output_type: "p.R".into(),
            fields: vec![FieldPath {
                name: "s".into(),
                numbers: vec![1],
                kind: ScalarKind::String,
                default: Value::Bytes(vec![]),
                shape: Shape::Singular,
                message: MessageSel::Single,
                picks: Vec::new(),
            }],
            metadata_keys: vec![],
            responses: vec![Default::default()],
            rules: ["a", "b", "c", "d", "b"]
                .iter()
                .map(|w| Rule {
                    conditions: vec![contains(w)],
                    response: 0,
                    priority: 0,
                    origin: String::new(),
                    raw: None,
                    skip_validation: false,
                })
                .collect(),
            regexes: vec![],
            duplex: false,
            checks: Vec::new(),
            cel_checks: Vec::new(),
        };
        let literals = build_literals(&m);
        assert_eq!(literals[0].as_ref().map(|l| l.ids.len()), Some(4));
    }

    #[test]
    fn fixed_is_the_delay() {
        assert!(draws(Latency::Fixed).iter().all(|&d| (d - 7.0).abs() < 1e-9));
    }

    #[test]
    fn uniform_stays_in_bounds_and_spreads() {
        let v = draws(Latency::Uniform { min: 10.0, max: 20.0 });
        assert!(v[0] >= 10.0 && v[v.len() - 1] < 20.0);
        assert!((quantile(&v, 0.5) - 15.0).abs() < 0.3, "median {}", quantile(&v, 0.5));
    }

    #[test]
    fn normal_has_its_mean_and_spread() {
        let v = draws(Latency::Normal { mean: 100.0, stddev: 10.0 });
        assert!((quantile(&v, 0.5) - 100.0).abs() < 0.5, "median {}", quantile(&v, 0.5));
        // About 84% of draws lie below mean + one standard deviation.
        assert!((quantile(&v, 0.8413) - 110.0).abs() < 0.8, "p84 {}", quantile(&v, 0.8413));
    }

    #[test]
    fn lognormal_has_the_median_and_p99_asked_for() {
        let v = draws(Latency::LogNormal { median: 50.0, p99: 400.0 });
        assert!((quantile(&v, 0.5) / 50.0 - 1.0).abs() < 0.05, "median {}", quantile(&v, 0.5));
        assert!((quantile(&v, 0.99) / 400.0 - 1.0).abs() < 0.1, "p99 {}", quantile(&v, 0.99));
    }
}
