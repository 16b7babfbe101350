//! Call metrics in the names and labels of go-grpc-prometheus
//! (`grpc_server_started_total`, `grpc_server_handled_total`,
//! `grpc_server_handling_seconds`), plus rule hits and misses.
//!
//! Counters live per plan generation and per worker thread: each worker
//! writes only its own block (a relaxed load and store, no atomic
//! read-modify-write, no shared cache line), and a scrape sums the blocks.
//! Generations no call can reach any more are folded into running totals
//! on scrape, so counters never go down across plan swaps.
//!
//! Gauges of what the engine holds ([`render_gauges`]): the journal's
//! bytes and entries, and the request bytes connections buffer
//! ([`BUFFERED_REQUEST_BYTES`], kept by the HTTP/2 code).

use crate::served::Served;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Request bytes buffered by every connection, process-wide: the HTTP/2
/// code adds what it buffers and subtracts what it releases (relaxed, a
/// few times per read, never per call). Exposed as
/// `wirestub_buffered_request_bytes`.
pub static BUFFERED_REQUEST_BYTES: AtomicI64 = AtomicI64::new(0);

/// What the journal holds, for its gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalGauges {
    pub bytes: usize,
    pub bytes_limit: usize,
    pub entries: usize,
    pub capacity: usize,
    pub evicted: u64,
}

/// The gauges (Prometheus text) of what the engine holds: the request
/// bytes connections buffer and, when the journal is on, its bytes,
/// entries and limits, and the entries it dropped to stay within them.
pub fn render_gauges(journal: Option<JournalGauges>) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, value: String| {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
    };
    gauge(
        "wirestub_buffered_request_bytes",
        "Request bytes buffered by connections, not yet answered.",
        "gauge",
        BUFFERED_REQUEST_BYTES.load(Ordering::Relaxed).max(0).to_string(),
    );
    if let Some(j) = journal {
        gauge("wirestub_journal_bytes", "Bytes held by the request journal's entries.", "gauge", j.bytes.to_string());
        gauge(
            "wirestub_journal_bytes_limit",
            "Bytes the request journal may hold (--journal-bytes).",
            "gauge",
            j.bytes_limit.to_string(),
        );
        gauge("wirestub_journal_entries", "Calls held by the request journal.", "gauge", j.entries.to_string());
        gauge(
            "wirestub_journal_capacity",
            "Calls the request journal may hold (--journal).",
            "gauge",
            j.capacity.to_string(),
        );
        gauge(
            "wirestub_journal_evicted_total",
            "Journal entries dropped to stay within its limits.",
            "counter",
            j.evicted.to_string(),
        );
    }
    out
}

/// Upper bounds of the handling-time buckets, in seconds (Prometheus'
/// defaults, as go-grpc-prometheus uses).
pub const BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const BUCKET_MICROS: [u64; 11] =
    [5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000];

/// gRPC code names as go-grpc-prometheus labels them.
pub const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

// Layout of one method's counters in a worker's block.
const STARTED: usize = 0;
const HANDLED: usize = 1; // 17 codes
const BUCKET: usize = HANDLED + 17; // 11 bounds + +Inf
const SUM_MICROS: usize = BUCKET + 12;
const MISSES: usize = SUM_MICROS + 1;
const FORWARDED: usize = MISSES + 1;
const UPSTREAM_ERRORS: usize = FORWARDED + 1;
const FAULTS: usize = UPSTREAM_ERRORS + 1; // one per FAULT_KINDS
const STRIDE: usize = FAULTS + FAULT_KINDS.len();
/// The injected faults counted, by the `kind` label: a status (or a
/// dropped stream), then the transport faults
/// (`wirestub_plan::TransportFault::kind`).
pub const FAULT_KINDS: [&str; 9] = [
    "status",
    "reset",
    "goaway_graceful",
    "goaway_immediate",
    "close",
    "stall_write",
    "stall_read",
    "trickle",
    "malformed",
];
/// The service and method labels of calls to methods the plan lacks.
const UNKNOWN: &str = "(unknown)";
/// Counters kept clear of a block's neighbours (one cache line each side).
const PAD: usize = 8;
/// The protocols calls are counted by, in the order of their counters.
pub const PROTOCOLS: [&str; 3] = ["grpc", "grpc-web", "connect"];

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as worker `i` (its counters go to block `i`).
pub fn set_worker(i: usize) {
    WORKER.with(|w| w.set(i));
}

/// The current thread's worker index (0 outside workers).
pub fn worker() -> usize {
    WORKER.with(|w| w.get())
}

/// What a method is called in labels.
#[derive(Debug, Clone)]
struct MethodLabels {
    kind: &'static str,
    service: String,
    method: String,
    rules: Vec<String>,
    /// Per validation check: the field and the rule id.
    checks: Vec<(String, String)>,
}

/// The counters of one plan generation.
pub struct Stats {
    methods: Vec<MethodLabels>,
    /// Offset of each method's rule counters in a block.
    rule_base: Vec<usize>,
    /// Offset of each method's validation check counters in a block.
    check_base: Vec<usize>,
    /// Offset of the calls-by-protocol counters in a block.
    protocol_base: usize,
    blocks: Vec<Box<[AtomicU64]>>,
}

/// One worker's counters in one generation.
pub struct WorkerStats<'a> {
    cells: &'a [AtomicU64],
    rule_base: &'a [usize],
    check_base: &'a [usize],
    protocol_base: usize,
}

#[inline]
fn bump(c: &AtomicU64, by: u64) {
    // One writer per block: no read-modify-write needed.
    c.store(c.load(Ordering::Relaxed).wrapping_add(by), Ordering::Relaxed);
}

impl WorkerStats<'_> {
    /// A call to method `m` started.
    #[inline]
    pub fn started(&self, m: usize) {
        let Some(base) = m.checked_mul(STRIDE) else { return };
        if let Some(c) = self.cells.get(PAD + base + STARTED) {
            bump(c, 1);
        }
    }

    /// A call to method `m` ended with `code` after `elapsed`.
    #[inline]
    pub fn handled(&self, m: usize, code: u8, elapsed: Duration) {
        let Some(base) = m.checked_mul(STRIDE) else { return };
        let base = PAD + base;
        let Some(cells) = self.cells.get(base..base + STRIDE) else { return };
        bump(&cells[HANDLED + (code as usize).min(16)], 1);
        let micros = elapsed.as_micros().min(u64::MAX as u128) as u64;
        let b = BUCKET_MICROS.iter().position(|&le| micros <= le).unwrap_or(11);
        bump(&cells[BUCKET + b], 1);
        bump(&cells[SUM_MICROS], micros);
    }

    /// A call came in protocol `p` (an index into [`PROTOCOLS`]).
    #[inline]
    pub fn protocol(&self, p: usize) {
        if let Some(c) = self.cells.get(self.protocol_base + p.min(PROTOCOLS.len() - 1)) {
            bump(c, 1);
        }
    }

    /// Rule `rule` of method `m` answered a call, or (None) no rule did.
    #[inline]
    pub fn rule(&self, m: usize, rule: Option<u32>) {
        let i = match rule {
            Some(r) => match self.rule_base.get(m) {
                Some(&base) => base + r as usize,
                None => return,
            },
            None => match m.checked_mul(STRIDE) {
                Some(base) => PAD + base + MISSES,
                None => return,
            },
        };
        if let Some(c) = self.cells.get(i) {
            bump(c, 1);
        }
    }
}

impl WorkerStats<'_> {
    /// A request to method `m` broke validation check `c`.
    pub fn check_failed(&self, m: usize, c: u32) {
        let (Some(&base), Some(&end)) = (self.check_base.get(m), self.check_base.get(m + 1)) else { return };
        if base + (c as usize) < end {
            bump(&self.cells[base + c as usize], 1);
        }
    }

    /// An injected fault of `kind` (one of [`FAULT_KINDS`]) fired on a
    /// call to method `m`.
    pub fn fault(&self, m: usize, kind: &str) {
        let Some(k) = FAULT_KINDS.iter().position(|&n| n == kind) else { return };
        let Some(base) = m.checked_mul(STRIDE) else { return };
        if let Some(c) = self.cells.get(PAD + base + FAULTS + k) {
            bump(c, 1);
        }
    }

    /// A call to method `m` went to the upstream; `failed`: the engine
    /// could not reach it or it failed mid-call.
    pub fn forwarded(&self, m: usize, failed: bool) {
        let Some(base) = m.checked_mul(STRIDE) else { return };
        let Some(cells) = self.cells.get(PAD + base..PAD + base + STRIDE) else { return };
        bump(&cells[FORWARDED], 1);
        if failed {
            bump(&cells[UPSTREAM_ERRORS], 1);
        }
    }
}

fn split_path(path: &str) -> (String, String) {
    match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
        Some((s, m)) => (s.to_string(), m.to_string()),
        None => (String::new(), path.to_string()),
    }
}

impl Stats {
    pub fn new(workers: usize, served: &Served) -> Stats {
        // The last block counts the calls to methods the plan lacks that
        // went to the upstream (`Served::forwarded`).
        let methods: Vec<MethodLabels> = served
            .methods
            .iter()
            .chain(std::iter::once(&served.forwarded))
            .map(|m| {
                let (service, method) = match m.plan.path.is_empty() {
                    true => (UNKNOWN.to_string(), UNKNOWN.to_string()),
                    false => split_path(&m.plan.path),
                };
                let kind = match m.plan.kind {
                    wirestub_plan::MethodKind::Unary => "unary",
                    wirestub_plan::MethodKind::ServerStreaming => "server_stream",
                    wirestub_plan::MethodKind::ClientStreaming => "client_stream",
                    wirestub_plan::MethodKind::BidiStreaming => "bidi_stream",
                };
                let field =
                    |path: &[(u32, String, u8)]| path.iter().map(|(_, n, _)| n.as_str()).collect::<Vec<_>>().join(".");
                // The wire checks, then the CEL rules, as `Broken::check` counts them.
                let checks = m
                    .plan
                    .checks
                    .iter()
                    .map(|c| (field(&c.path), c.rule_id.clone()))
                    .chain(m.plan.cel_checks.iter().map(|c| (field(&c.path), c.rule_id.clone())))
                    .collect();
                let rules = m.plan.rules.iter().map(|r| r.origin.clone()).collect();
                MethodLabels { kind, service, method, rules, checks }
            })
            .collect();
        let mut rule_base = Vec::with_capacity(methods.len());
        let mut next = PAD + methods.len() * STRIDE;
        for m in &methods {
            rule_base.push(next);
            next += m.rules.len();
        }
        let mut check_base = Vec::with_capacity(methods.len() + 1);
        for m in &methods {
            check_base.push(next);
            next += m.checks.len();
        }
        // The end of the last method's counters.
        check_base.push(next);
        let protocol_base = next;
        let len = next + PROTOCOLS.len() + PAD;
        let blocks = (0..workers.max(1)).map(|_| (0..len).map(|_| AtomicU64::new(0)).collect()).collect();
        Stats { methods, rule_base, check_base, protocol_base, blocks }
    }

    /// The block of worker `i`.
    #[inline]
    pub fn worker(&self, i: usize) -> WorkerStats<'_> {
        WorkerStats {
            cells: &self.blocks[i % self.blocks.len()],
            rule_base: &self.rule_base,
            check_base: &self.check_base,
            protocol_base: self.protocol_base,
        }
    }

    /// Every counter summed over workers.
    fn sum(&self) -> Vec<u64> {
        let mut out = vec![0u64; self.blocks[0].len()];
        for b in &self.blocks {
            for (o, c) in out.iter_mut().zip(b.iter()) {
                *o = o.wrapping_add(c.load(Ordering::Relaxed));
            }
        }
        out
    }

    /// Adds this generation's counters into `totals`.
    fn fold_into(&self, totals: &mut Totals) {
        let sum = self.sum();
        for (i, m) in self.methods.iter().enumerate() {
            let base = PAD + i * STRIDE;
            if m.service == UNKNOWN && sum[base..base + STRIDE].iter().all(|&n| n == 0) {
                continue;
            }
            let t = totals.methods.entry((m.service.clone(), m.method.clone())).or_insert_with(|| MethodTotals {
                kind: m.kind,
                counters: [0; STRIDE],
                rules: BTreeMap::new(),
                checks: BTreeMap::new(),
            });
            t.kind = m.kind;
            for (k, c) in t.counters.iter_mut().enumerate() {
                *c += sum[base + k];
            }
            for (r, origin) in m.rules.iter().enumerate() {
                *t.rules.entry(origin.clone()).or_default() += sum[self.rule_base[i] + r];
            }
            for (c, label) in m.checks.iter().enumerate() {
                *t.checks.entry(label.clone()).or_default() += sum[self.check_base[i] + c];
            }
        }
        for (p, n) in totals.protocols.iter_mut().enumerate() {
            *n += sum[self.protocol_base + p];
        }
    }
}

#[derive(Clone)]
struct MethodTotals {
    kind: &'static str,
    counters: [u64; STRIDE],
    rules: BTreeMap<String, u64>,
    /// Failures per (field, rule id) of request validation.
    checks: BTreeMap<(String, String), u64>,
}

/// Counters by (service, method).
#[derive(Default, Clone)]
struct Totals {
    methods: BTreeMap<(String, String), MethodTotals>,
    protocols: [u64; PROTOCOLS.len()],
}

/// Every generation's counters, for scraping.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    live: Vec<Arc<Stats>>,
    retired: Totals,
}

impl Registry {
    /// Adds a generation's counters (and folds those of generations no
    /// call can reach any more, so swaps do not pile up counter blocks).
    pub fn register(&self, stats: Arc<Stats>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.fold_dead();
        inner.live.push(stats);
    }

    /// Calls each rule answered, by the rule's origin (`file:line:column`),
    /// summed over every generation that served it.
    pub fn rule_hits(&self) -> std::collections::HashMap<String, u64> {
        let totals = self.totals();
        let mut out = std::collections::HashMap::new();
        for m in totals.methods.into_values() {
            for (origin, n) in m.rules {
                *out.entry(origin).or_default() += n;
            }
        }
        out
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        render(&self.totals())
    }

    /// The counters as JSON, for the web UI's charts: per method the calls
    /// started, handled by code, the handling-time histogram (cumulative
    /// counts per upper bound, as Prometheus has it) and the misses; per
    /// rule its hits; per protocol its calls. A client takes rates and
    /// percentiles from the differences between two of these.
    pub fn stats_json(&self) -> serde_json::Value {
        use serde_json::json;
        let totals = self.totals();
        let methods: Vec<serde_json::Value> = totals
            .methods
            .iter()
            .map(|((service, method), t)| {
                let mut cumulative = 0;
                let mut buckets: Vec<u64> = BUCKETS
                    .iter()
                    .enumerate()
                    .map(|(i, _)| {
                        cumulative += t.counters[BUCKET + i];
                        cumulative
                    })
                    .collect();
                buckets.push(cumulative + t.counters[BUCKET + 11]);
                let codes: serde_json::Map<String, serde_json::Value> = CODE_NAMES
                    .iter()
                    .enumerate()
                    .filter(|(c, _)| t.counters[HANDLED + c] > 0)
                    .map(|(c, name)| (name.to_string(), json!(t.counters[HANDLED + c])))
                    .collect();
                let rules: serde_json::Map<String, serde_json::Value> =
                    t.rules.iter().map(|(origin, n)| (origin.clone(), json!(n))).collect();
                json!({
                    "service": service,
                    "method": method,
                    "kind": t.kind,
                    "started": t.counters[STARTED],
                    "handled": buckets.last().copied().unwrap_or(0),
                    "codes": codes,
                    "buckets": buckets,
                    "sum_seconds": t.counters[SUM_MICROS] as f64 / 1e6,
                    "misses": t.counters[MISSES],
                    "forwarded": t.counters[FORWARDED],
                    "rules": rules,
                })
            })
            .collect();
        let protocols: serde_json::Map<String, serde_json::Value> =
            PROTOCOLS.iter().zip(totals.protocols).map(|(p, n)| (p.to_string(), json!(n))).collect();
        json!({"le": BUCKETS, "methods": methods, "protocols": protocols})
    }

    /// Every generation's counters summed, those no call can reach folded
    /// first.
    fn totals(&self) -> Totals {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.fold_dead();
        let mut totals = inner.retired.clone();
        for s in &inner.live {
            s.fold_into(&mut totals);
        }
        totals
    }
}

impl RegistryInner {
    /// Generations held only here can no longer count: their counters move
    /// into the running totals.
    ///
    /// The totals keep only methods and rules a live generation still
    /// serves: counters of a deleted rule or service go with it, so a
    /// process that keeps adding and deleting rules (the runtime API) holds
    /// counters for what it serves, not for everything it ever served.
    fn fold_dead(&mut self) {
        let (dead, live): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.live).into_iter().partition(|s| Arc::strong_count(s) == 1);
        let folded = !dead.is_empty();
        for s in dead {
            s.fold_into(&mut self.retired);
        }
        self.live = live;
        if folded && !self.live.is_empty() {
            let mut serving: std::collections::HashMap<(&str, &str), std::collections::HashSet<&str>> =
                std::collections::HashMap::new();
            for s in &self.live {
                for m in &s.methods {
                    serving.entry((&m.service, &m.method)).or_default().extend(m.rules.iter().map(String::as_str));
                }
            }
            self.retired.methods.retain(|(service, method), totals| {
                match serving.get(&(service.as_str(), method.as_str())) {
                    Some(rules) => {
                        totals.rules.retain(|origin, _| rules.contains(origin.as_str()));
                        true
                    }
                    None => false,
                }
            });
        }
    }
}

fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn render(totals: &Totals) -> String {
    let mut out = String::new();
    let labels = |kind: &str, service: &str, method: &str| {
        format!("grpc_type=\"{kind}\",grpc_service=\"{}\",grpc_method=\"{}\"", escape(service), escape(method))
    };
    out.push_str("# HELP grpc_server_started_total Total number of RPCs started on the server.\n");
    out.push_str("# TYPE grpc_server_started_total counter\n");
    for ((s, m), t) in &totals.methods {
        let _ = writeln!(out, "grpc_server_started_total{{{}}} {}", labels(t.kind, s, m), t.counters[STARTED]);
    }
    out.push_str(
        "# HELP grpc_server_handled_total Total number of RPCs completed on the server, regardless of success or failure.\n",
    );
    out.push_str("# TYPE grpc_server_handled_total counter\n");
    for ((s, m), t) in &totals.methods {
        for (code, name) in CODE_NAMES.iter().enumerate() {
            let n = t.counters[HANDLED + code];
            if n > 0 || code == 0 {
                let _ = writeln!(out, "grpc_server_handled_total{{{},grpc_code=\"{name}\"}} {n}", labels(t.kind, s, m));
            }
        }
    }
    out.push_str(
        "# HELP grpc_server_handling_seconds Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.\n",
    );
    out.push_str("# TYPE grpc_server_handling_seconds histogram\n");
    for ((s, m), t) in &totals.methods {
        let l = labels(t.kind, s, m);
        let mut cumulative = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            cumulative += t.counters[BUCKET + i];
            let _ = writeln!(out, "grpc_server_handling_seconds_bucket{{{l},le=\"{le}\"}} {cumulative}");
        }
        cumulative += t.counters[BUCKET + 11];
        let _ = writeln!(out, "grpc_server_handling_seconds_bucket{{{l},le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "grpc_server_handling_seconds_sum{{{l}}} {}", t.counters[SUM_MICROS] as f64 / 1e6);
        let _ = writeln!(out, "grpc_server_handling_seconds_count{{{l}}} {cumulative}");
    }
    out.push_str("# HELP wirestub_rule_hits_total Calls answered by each rule.\n");
    out.push_str("# TYPE wirestub_rule_hits_total counter\n");
    for ((s, m), t) in &totals.methods {
        for (origin, n) in &t.rules {
            let _ = writeln!(
                out,
                "wirestub_rule_hits_total{{grpc_service=\"{}\",grpc_method=\"{}\",rule=\"{}\"}} {n}",
                escape(s),
                escape(m),
                escape(origin)
            );
        }
    }
    out.push_str(
        "# HELP wirestub_validation_failures_total Requests that broke a validation rule, by field and rule.\n",
    );
    out.push_str("# TYPE wirestub_validation_failures_total counter\n");
    for ((s, m), t) in &totals.methods {
        for ((field, rule), n) in t.checks.iter().filter(|(_, n)| **n > 0) {
            let _ = writeln!(
                out,
                "wirestub_validation_failures_total{{grpc_service=\"{}\",grpc_method=\"{}\",field=\"{}\",rule=\"{}\"}} {n}",
                escape(s),
                escape(m),
                escape(field),
                escape(rule)
            );
        }
    }
    out.push_str("# HELP wirestub_rule_misses_total Calls no rule matched.\n");
    out.push_str("# TYPE wirestub_rule_misses_total counter\n");
    for ((s, m), t) in &totals.methods {
        let _ = writeln!(
            out,
            "wirestub_rule_misses_total{{grpc_service=\"{}\",grpc_method=\"{}\"}} {}",
            escape(s),
            escape(m),
            t.counters[MISSES]
        );
    }
    out.push_str("# HELP wirestub_upstream_calls_total Calls forwarded to the upstream.\n");
    out.push_str("# TYPE wirestub_upstream_calls_total counter\n");
    let forwarded = || totals.methods.iter().filter(|(_, t)| t.counters[FORWARDED] > 0);
    for ((s, m), t) in forwarded() {
        let (s, m) = (escape(s), escape(m));
        let n = t.counters[FORWARDED];
        let _ = writeln!(out, "wirestub_upstream_calls_total{{grpc_service=\"{s}\",grpc_method=\"{m}\"}} {n}");
    }
    out.push_str(
        "# HELP wirestub_upstream_errors_total Forwarded calls the engine ended itself: the upstream could not be \
         reached or failed mid-call.\n",
    );
    out.push_str("# TYPE wirestub_upstream_errors_total counter\n");
    for ((s, m), t) in forwarded() {
        let (s, m) = (escape(s), escape(m));
        let n = t.counters[UPSTREAM_ERRORS];
        let _ = writeln!(out, "wirestub_upstream_errors_total{{grpc_service=\"{s}\",grpc_method=\"{m}\"}} {n}");
    }
    out.push_str("# HELP wirestub_injected_faults_total Faults the rules injected, by kind.\n");
    out.push_str("# TYPE wirestub_injected_faults_total counter\n");
    for ((s, m), t) in &totals.methods {
        for (k, kind) in FAULT_KINDS.iter().enumerate() {
            let n = t.counters[FAULTS + k];
            if n > 0 {
                let (s, m) = (escape(s), escape(m));
                let _ = writeln!(
                    out,
                    "wirestub_injected_faults_total{{grpc_service=\"{s}\",grpc_method=\"{m}\",kind=\"{kind}\"}} {n}"
                );
            }
        }
    }
    out.push_str("# HELP wirestub_protocol_calls_total Calls by the protocol that carried them.\n");
    out.push_str("# TYPE wirestub_protocol_calls_total counter\n");
    for (name, n) in PROTOCOLS.iter().zip(totals.protocols) {
        let _ = writeln!(out, "wirestub_protocol_calls_total{{protocol=\"{name}\"}} {n}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served() -> Served {
        served_with_rule(None)
    }

    fn served_with_rule(origin: Option<&str>) -> Served {
        let method = wirestub_plan::Method {
            path: "/demo.Greeter/SayHello".into(),
            kind: wirestub_plan::MethodKind::Unary,
            input_type: "demo.HelloRequest".into(),
            output_type: "demo.HelloReply".into(),
            fields: Vec::new(),
            metadata_keys: Vec::new(),
            responses: origin.iter().map(|_| wirestub_plan::Response::default()).collect(),
            rules: origin
                .iter()
                .map(|o| wirestub_plan::Rule {
                    conditions: Vec::new(),
                    response: 0,
                    priority: 0,
                    origin: o.to_string(),
                    raw: None,
                    skip_validation: false,
                })
                .collect(),
            duplex: false,
            regexes: Vec::new(),
            checks: Vec::new(),
            cel_checks: Vec::new(),
        };
        let plan = wirestub_plan::Plan { descriptors: Vec::new(), methods: vec![method] };
        Served::new(plan, crate::NoMatch::NotFound).expect("prepares")
    }

    #[test]
    fn swaps_fold_counters_and_never_lose_them() {
        let served = served();
        let registry = Registry::default();
        let m = served.method("/demo.Greeter/SayHello").expect("method").position;
        for _ in 0..1000 {
            // A generation: counted by two workers, then dropped by its
            // owner when the next one comes.
            let stats = Arc::new(Stats::new(2, &served));
            registry.register(stats.clone());
            for w in 0..2 {
                stats.worker(w).started(m);
                stats.worker(w).handled(m, 0, Duration::from_millis(3));
            }
        }
        let live = registry.inner.lock().unwrap().live.len();
        assert!(live <= 2, "{live} generations kept: dead ones are folded on register");
        let text = registry.render();
        let labels = r#"grpc_type="unary",grpc_service="demo.Greeter",grpc_method="SayHello""#;
        assert!(text.contains(&format!("grpc_server_started_total{{{labels}}} 2000\n")), "{text}");
        assert!(text.contains(&format!("grpc_server_handled_total{{{labels},grpc_code=\"OK\"}} 2000\n")), "{text}");
        assert!(text.contains(&format!("grpc_server_handling_seconds_bucket{{{labels},le=\"0.005\"}} 2000\n")));
        assert!(text.contains(&format!("grpc_server_handling_seconds_sum{{{labels}}} 6\n")), "{text}");
    }

    #[test]
    fn counters_of_rules_no_plan_serves_are_let_go() {
        // A rule per generation, each written somewhere new (as stubs added
        // and deleted through the runtime API are): the totals keep the
        // rules still served, not every rule ever served.
        let registry = Registry::default();
        let mut current: Option<Arc<Stats>> = None;
        for i in 0..500 {
            let served = served_with_rule(Some(&format!("stubs/{i}.json:2:3")));
            let stats = Arc::new(Stats::new(1, &served));
            stats.worker(0).rule(0, Some(0));
            registry.register(stats.clone());
            current = Some(stats);
        }
        let retired_rules: usize = registry.inner.lock().unwrap().retired.methods.values().map(|m| m.rules.len()).sum();
        assert!(retired_rules <= 2, "{retired_rules} rule counters kept for rules no plan serves");
        let hits = registry.rule_hits();
        assert_eq!(hits.get("stubs/499.json:2:3"), Some(&1), "{hits:?}");
        drop(current);
    }
}
