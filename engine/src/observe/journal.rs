//! The request journal: a bounded ring of the calls received (method,
//! metadata, request messages, the rule that answered, status, latency),
//! kept only when asked for (`--journal N`), and its queries: list and
//! filter, count, verify, unmatched calls with the rule that came closest.
//! Requests are kept as received bytes; the JSON view is made when a query
//! asks, from the plan generation's descriptors.
//!
//! Memory is bounded twice ([`JournalLimits`]). Per call, while it is recorded:
//! the first `--journal-messages` request messages and the latest one,
//! each cut to `--journal-message-bytes` ([`RequestMessages`]), with the
//! number received; the JSON views mark what was cut. In total: entries
//! are counted in bytes ([`Entry::bytes`]: messages, metadata, texts and a
//! fixed overhead) and the oldest are dropped while the journal holds more
//! than `--journal-bytes` or more than `--journal N` calls. Every entry
//! also holds an `Arc` of its plan generation, so an old plan stays in
//! memory while a recorded call of it does; that is not counted here.
//!
//! Recording is the only part on the request path: one short lock to
//! number the entry and push it (the entries dropped to make room are
//! freed after the lock is released). Everything else (decoding messages,
//! filtering, rendering) runs on the admin side, over a snapshot.
//!
//! The JSON view of a request message is its protobuf JSON mapping with
//! the field names as written in the `.proto` files (the names rules use);
//! filters accept those names and the lowerCamelCase JSON names alike.

use crate::call::matcher::{Broken, Closest};
use crate::call::matcher::{Messages, Request};
use crate::codec::wire::{self, ValueRef};
use crate::config::JournalLimits;
use crate::served::generation::Generation;
use crate::served::ServedMethod;
use bytes::Bytes;
use serde_json::{json, Map, Value as Json};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wirestub_plan::{Condition, MessageSel, Method, MethodKind, Op, Source, Test, Value, STATUS_NAMES};

/// One received call.
pub struct Entry {
    /// Position in the journal, from 1, assigned by [`Journal::record`].
    pub seq: u64,
    /// When the call started.
    pub time: SystemTime,
    /// The plan generation that answered (for descriptors and rules).
    pub generation: Arc<Generation>,
    /// Index of the method in `generation.served.methods`.
    pub method: usize,
    /// Request metadata as received (lower-case names; pseudo-headers,
    /// `te` and `content-type` left out), in order.
    pub metadata: Vec<(Box<str>, Bytes)>,
    /// The request messages kept (unframed), and how many came.
    pub messages: RequestMessages,
    /// The rule that answered, as an index into the method's plan rules;
    /// None when no rule matched (or the call failed before matching).
    pub rule: Option<u32>,
    /// The gRPC status sent.
    pub status: u8,
    /// `grpc-message` sent, percent-decoded; empty for none.
    pub message: String,
    /// From the request's headers to the status sent.
    pub latency: Duration,
    /// For a call no rule matched: the rule that held the most conditions.
    pub closest: Option<Closest>,
    /// For a call a recording answered without being identical to it: how
    /// similar the two were, from 0 to 1.
    pub similarity: Option<f32>,
    /// The protocol that carried it: `grpc`, `grpc-web` or `connect`.
    pub protocol: &'static str,
    /// For a call forwarded to the upstream: how it went there.
    pub upstream: Option<Box<Upstreamed>>,
    /// The fault a rule injected into the call, described.
    pub fault: Option<Box<str>>,
    /// The validation checks an invalid request broke.
    pub violations: Option<Box<[Broken]>>,
}

/// A call forwarded to the upstream, as the journal keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstreamed {
    /// The path called (a method the plan lacks has no other record of it).
    pub path: Box<str>,
    /// From opening the call on the upstream to the end of its answer.
    pub latency: Duration,
    /// The engine ended the call itself (the upstream could not be reached,
    /// or failed mid-call), rather than relaying the upstream's status.
    pub failed: bool,
}

/// The per-call limits new recordings start with ([`RequestMessages::default`]):
/// process-wide, since a call is recorded where no journal is at hand;
/// set by [`Journal::set_limits`].
static RECORD_MESSAGES: AtomicUsize = AtomicUsize::new(JournalLimits::DEFAULT.messages);
static RECORD_MESSAGE_BYTES: AtomicUsize = AtomicUsize::new(JournalLimits::DEFAULT.message_bytes);

/// What an allocation costs beyond its bytes (the allocator's header and
/// rounding), counted once per allocation an entry holds.
const ALLOCATION: usize = 16;
/// What an entry costs besides its variable parts: the `Entry` in its
/// `Arc`, the ring's slot and the `Arc`'s allocation.
pub const ENTRY_OVERHEAD: usize = std::mem::size_of::<Entry>()
    + 2 * std::mem::size_of::<usize>()
    + std::mem::size_of::<(Arc<Entry>, usize)>()
    + ALLOCATION;

/// One request message as kept: its first bytes, and its size as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptMessage {
    /// The message's bytes, or the first `message_bytes` of them; always
    /// a copy of its own (never a view that would pin a larger buffer).
    pub bytes: Bytes,
    /// The message's size as received.
    pub size: usize,
}

impl KeptMessage {
    /// Whether bytes were cut off.
    pub fn truncated(&self) -> bool {
        self.bytes.len() < self.size
    }
}

/// A call's request messages as the journal keeps them, bounded while the
/// call is recorded: the first `limit` messages, the latest one beyond
/// them, each cut to `cap` bytes, and the number received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestMessages {
    head: Vec<KeptMessage>,
    /// The latest message after the first `limit`.
    last: Option<KeptMessage>,
    count: u64,
    limit: usize,
    cap: usize,
}

impl Default for RequestMessages {
    /// Empty, with the per-call limits the journal was configured with.
    fn default() -> RequestMessages {
        RequestMessages::new(RECORD_MESSAGES.load(Ordering::Relaxed), RECORD_MESSAGE_BYTES.load(Ordering::Relaxed))
    }
}

impl RequestMessages {
    /// Empty, keeping the first `limit` messages (and the latest), each cut
    /// to `cap` bytes.
    pub fn new(limit: usize, cap: usize) -> RequestMessages {
        RequestMessages { head: Vec::new(), last: None, count: 0, limit, cap }
    }

    /// Records one received message (copying at most `cap` bytes of it).
    /// Returns how many more bytes are kept than before (negative when
    /// the latest message replaces a longer one).
    pub fn push(&mut self, message: &[u8]) -> isize {
        self.count += 1;
        if self.limit == 0 {
            return 0;
        }
        let kept =
            KeptMessage { bytes: Bytes::copy_from_slice(&message[..message.len().min(self.cap)]), size: message.len() };
        let added = kept.bytes.len() as isize;
        if self.head.len() < self.limit {
            self.head.push(kept);
            added
        } else {
            added - self.last.replace(kept).map_or(0, |old| old.bytes.len() as isize)
        }
    }

    /// The message bytes kept.
    pub fn kept_bytes(&self) -> usize {
        self.head.iter().chain(self.last.iter()).map(|m| m.bytes.len()).sum()
    }

    /// How many messages were received.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// How many were received but not kept.
    pub fn omitted(&self) -> u64 {
        self.count - self.len() as u64
    }

    /// How many are kept.
    pub fn len(&self) -> usize {
        self.head.len() + usize::from(self.last.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `limit` messages kept, in order (positions 0, 1, ...).
    pub fn head(&self) -> &[KeptMessage] {
        &self.head
    }

    /// The latest message, when more than the first `limit` came (its
    /// position is `count() - 1`).
    pub fn last(&self) -> Option<&KeptMessage> {
        self.last.as_ref()
    }

    /// The kept messages with their positions in the call, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &KeptMessage)> {
        let last = self.last.as_ref().map(|m| (self.count - 1, m));
        self.head.iter().enumerate().map(|(i, m)| (i as u64, m)).chain(last)
    }

    /// Whether anything was cut off or left out.
    pub fn truncated(&self) -> bool {
        self.omitted() > 0 || self.iter().any(|(_, m)| m.truncated())
    }

    /// The bytes they hold (buffers, their allocations and the list).
    pub fn bytes(&self) -> usize {
        let kept = |m: &KeptMessage| m.bytes.len() + if m.bytes.is_empty() { 0 } else { ALLOCATION };
        self.head.capacity() * std::mem::size_of::<KeptMessage>()
            + if self.head.capacity() > 0 { ALLOCATION } else { 0 }
            + self.head.iter().map(kept).sum::<usize>()
            + self.last.as_ref().map_or(0, kept)
    }
}

impl Entry {
    /// The bytes the entry holds, as counted against `--journal-bytes`:
    /// [`ENTRY_OVERHEAD`], the messages kept, the metadata (names, values,
    /// the list), the status message and a forwarded call's path. The plan
    /// generation it shares is not counted.
    pub fn bytes(&self) -> usize {
        let metadata = self.metadata.capacity() * std::mem::size_of::<(Box<str>, Bytes)>()
            + if self.metadata.capacity() > 0 { ALLOCATION } else { 0 }
            + self.metadata.iter().map(|(k, v)| k.len() + v.len() + 2 * ALLOCATION).sum::<usize>();
        let message = self.message.capacity() + if self.message.capacity() > 0 { ALLOCATION } else { 0 };
        let upstream =
            self.upstream.as_ref().map_or(0, |u| std::mem::size_of::<Upstreamed>() + u.path.len() + 2 * ALLOCATION);
        let fault = self.fault.as_ref().map_or(0, |f| f.len() + ALLOCATION);
        let violations = self.violations.as_ref().map_or(0, |v| {
            let each = |b: &Broken| {
                let key = match &b.key {
                    Some(wirestub_plan::Value::Bytes(k)) => k.len() + ALLOCATION,
                    _ => 0,
                };
                b.message.as_ref().map_or(0, |m| m.len() + ALLOCATION) + key
            };
            v.len() * std::mem::size_of::<Broken>() + ALLOCATION + v.iter().map(each).sum::<usize>()
        });
        ENTRY_OVERHEAD + self.messages.bytes() + metadata + message + upstream + fault + violations
    }
}

/// The bounded ring of entries.
pub struct Journal {
    capacity: usize,
    bytes_limit: AtomicUsize,
    ring: Mutex<Ring>,
    /// Where every recorded entry is also sent, when the calls are shared
    /// with other replicas ([`Journal::tap`]).
    tap: std::sync::OnceLock<Tap>,
}

/// Receives every entry recorded after it is set, with the journal's byte
/// limit (`--journal-bytes`); must not block (it runs on the request path,
/// outside the journal's lock).
pub type Tap = Box<dyn Fn(&Arc<Entry>, usize) + Send + Sync>;

struct Ring {
    /// Entries, oldest first, with the bytes each holds.
    entries: VecDeque<(Arc<Entry>, usize)>,
    /// The bytes of every entry held.
    bytes: usize,
    /// The sequence number the next entry gets.
    next: u64,
    /// Entries dropped to stay within the limits.
    evicted: u64,
    /// Plan generations the entries keep alive, by number: how many
    /// entries hold each (each counted once in `bytes`, see
    /// [`generation_cost`]).
    generations: std::collections::HashMap<u64, usize>,
}

/// What a plan generation kept alive by journal entries counts for in the
/// journal's bytes, once however many entries hold it: an estimate of a
/// prepared plan (measured: about 0.5 MiB for the bundled example), so
/// that entries recorded across many reloads cannot keep every plan.
fn generation_cost(g: &Generation) -> usize {
    (1 << 20) + 8 * g.descriptors.len()
}

/// One page of a journal listing ([`Journal::page`]).
pub struct Page {
    /// At most `limit` entries, the newest the filter selects, oldest first.
    pub entries: Vec<Arc<Entry>>,
    /// How many entries the filter selects in all.
    pub matched: usize,
}

impl Journal {
    /// A journal keeping the last `capacity` calls (at least 1), within
    /// the default [`JournalLimits`] (or those [`Journal::set_limits`] sets).
    pub fn new(capacity: usize) -> Journal {
        Journal::with_limits(capacity, JournalLimits::DEFAULT)
    }

    /// A journal keeping the last `capacity` calls within `limits.bytes`.
    /// The per-call limits are those of [`RequestMessages`] as recorded.
    pub fn with_limits(capacity: usize, limits: JournalLimits) -> Journal {
        let capacity = capacity.max(1);
        let ring = Ring {
            entries: VecDeque::with_capacity(capacity.min(1024)),
            bytes: 0,
            next: 1,
            evicted: 0,
            generations: Default::default(),
        };
        Journal {
            capacity,
            bytes_limit: AtomicUsize::new(limits.bytes),
            ring: Mutex::new(ring),
            tap: std::sync::OnceLock::new(),
        }
    }

    /// Sends every entry recorded from now on to `tap` too (set once).
    pub fn tap(&self, tap: Tap) {
        let _ = self.tap.set(tap);
    }

    /// Sets the limits, before calls are served: the total for this
    /// journal, the per-call ones for every call recorded from now on
    /// (process-wide).
    pub fn set_limits(&self, limits: JournalLimits) {
        self.bytes_limit.store(limits.bytes, Ordering::Relaxed);
        RECORD_MESSAGES.store(limits.messages, Ordering::Relaxed);
        RECORD_MESSAGE_BYTES.store(limits.message_bytes, Ordering::Relaxed);
    }

    /// The limits in force.
    pub fn limits(&self) -> JournalLimits {
        JournalLimits {
            bytes: self.bytes_limit.load(Ordering::Relaxed),
            messages: RECORD_MESSAGES.load(Ordering::Relaxed),
            message_bytes: RECORD_MESSAGE_BYTES.load(Ordering::Relaxed),
        }
    }

    /// Appends a call, dropping the oldest ones while more than `capacity`
    /// calls or more than the byte limit are held (the new one stays).
    pub fn record(&self, entry: Entry) {
        let size = entry.bytes();
        let mut entry = Arc::new(entry);
        let limit = self.bytes_limit.load(Ordering::Relaxed);
        let mut dropped = Vec::new();
        let tapped;
        {
            let mut ring = self.lock();
            if let Some(e) = Arc::get_mut(&mut entry) {
                e.seq = ring.next;
            }
            ring.next += 1;
            let held = ring.generations.entry(entry.generation.number).or_insert(0);
            *held += 1;
            if *held == 1 {
                ring.bytes += generation_cost(&entry.generation);
            }
            // Shared with the tap only when there is one.
            tapped = self.tap.get().is_some().then(|| entry.clone());
            ring.entries.push_back((entry, size));
            ring.bytes += size;
            while ring.entries.len() > 1 && (ring.entries.len() > self.capacity || ring.bytes > limit) {
                let Some((old, size)) = ring.entries.pop_front() else { break };
                ring.bytes -= size;
                let number = old.generation.number;
                if let Some(held) = ring.generations.get_mut(&number) {
                    *held -= 1;
                    if *held == 0 {
                        ring.generations.remove(&number);
                        ring.bytes -= generation_cost(&old.generation);
                    }
                }
                ring.evicted += 1;
                dropped.push(old);
            }
        }
        // Freed outside the lock: it may hold the last reference to an old
        // plan generation.
        drop(dropped);
        if let (Some(tap), Some(entry)) = (self.tap.get(), tapped) {
            tap(&entry, limit);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many calls it keeps at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many calls it holds now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes its entries hold now ([`Entry::bytes`]).
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// How many entries were dropped to stay within the limits.
    pub fn evicted(&self) -> u64 {
        self.lock().evicted
    }

    /// How many calls were ever recorded (the last sequence number given).
    pub fn recorded(&self) -> u64 {
        self.lock().next - 1
    }

    /// The entries held now, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<Entry>> {
        self.lock().entries.iter().map(|(e, _)| e.clone()).collect()
    }

    /// The newest `limit` entries `filter` selects (with `unmatched`, only
    /// calls no rule answered), oldest first, and how many it selects.
    pub fn page(&self, filter: &Filter, unmatched: bool, limit: usize) -> Page {
        let mut entries = Vec::new();
        let mut matched = 0;
        for e in self.snapshot().into_iter().rev() {
            if (unmatched && !e.unmatched()) || !filter.matches(&*e) {
                continue;
            }
            matched += 1;
            if entries.len() < limit {
                entries.push(e);
            }
        }
        entries.reverse();
        Page { entries, matched }
    }

    /// Forgets every entry; returns how many there were. Sequence numbers
    /// go on from where they were, so `since` stays meaningful.
    pub fn reset(&self) -> usize {
        let removed = {
            let mut ring = self.lock();
            ring.bytes = 0;
            ring.generations.clear();
            std::mem::take(&mut ring.entries)
        };
        removed.len()
    }

    /// The entries `filter` selects, oldest first.
    pub fn query(&self, filter: &Filter) -> Vec<Arc<Entry>> {
        self.snapshot().into_iter().filter(|e| filter.matches(&**e)).collect()
    }

    /// How many entries `filter` selects.
    pub fn count(&self, filter: &Filter) -> usize {
        self.snapshot().iter().filter(|e| filter.matches(&***e)).count()
    }

    /// The calls no rule answered that `filter` selects, oldest first.
    pub fn unmatched(&self, filter: &Filter) -> Vec<Arc<Entry>> {
        self.snapshot().into_iter().filter(|e| e.unmatched() && filter.matches(&**e)).collect()
    }

    /// Checks that the calls `verify.filter` selects number as expected.
    pub fn verify(&self, verify: &Verify) -> Verdict {
        let mut tally = Tally::new(verify);
        for e in self.snapshot() {
            tally.offer(&*e, || e.clone());
        }
        tally.verdict(|e| e.to_json())
    }
}

// ---------------------------------------------------------------------------
// Filters
// ---------------------------------------------------------------------------

/// Which methods a filter selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MethodMatch {
    /// One method, by its path `/pkg.Service/Method`.
    Path(String),
    /// Every method of a service, `pkg.Service`.
    Service(String),
}

impl MethodMatch {
    /// Reads `/pkg.Svc/Method`, `pkg.Svc/Method` or `pkg.Svc` (a service).
    pub fn parse(text: &str) -> Result<MethodMatch, String> {
        let t = text.trim();
        let t = t.strip_prefix('/').unwrap_or(t);
        let bad = || format!("`{text}` is not a method (`/pkg.Service/Method` or `pkg.Service/Method`) or a service");
        match t.split_once('/') {
            _ if t.is_empty() => Err(bad()),
            Some((service, "")) if !service.is_empty() && !service.contains('/') => {
                Ok(MethodMatch::Service(service.to_string()))
            }
            Some((service, method)) if !service.is_empty() && !method.contains('/') => {
                Ok(MethodMatch::Path(format!("/{service}/{method}")))
            }
            Some(_) => Err(bad()),
            None => Ok(MethodMatch::Service(t.to_string())),
        }
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            MethodMatch::Path(p) => p == path,
            MethodMatch::Service(s) => path
                .strip_prefix('/')
                .and_then(|p| p.strip_prefix(s.as_str()))
                .is_some_and(|rest| rest.starts_with('/')),
        }
    }

    fn text(&self) -> String {
        match self {
            MethodMatch::Path(p) => p.clone(),
            MethodMatch::Service(s) => format!("{s} (any method)"),
        }
    }
}

/// Reads a gRPC status given as a number (`5`) or a name (`NOT_FOUND`,
/// `not_found` or `NotFound`).
pub fn parse_status(text: &str) -> Result<u8, String> {
    let t = text.trim();
    if let Ok(n) = t.parse::<u8>() {
        if (n as usize) < STATUS_NAMES.len() {
            return Ok(n);
        }
    }
    let squash = |s: &str| s.chars().filter(|c| *c != '_').collect::<String>().to_ascii_lowercase();
    let wanted = squash(t);
    let cancelled = if wanted == "canceled" { "cancelled".to_string() } else { wanted };
    STATUS_NAMES
        .iter()
        .position(|name| squash(name) == cancelled)
        .map(|i| i as u8)
        .ok_or_else(|| format!("`{text}` is not a gRPC status (a number 0 to 16 or a name such as NOT_FOUND)"))
}

/// What a query selects; every criterion set must hold.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub method: Option<MethodMatch>,
    pub status: Option<u8>,
    /// Some(true): calls a rule answered; Some(false): calls none did.
    pub matched: Option<bool>,
    /// Metadata pairs the call must carry (key lower-case; values as in the
    /// JSON view: `-bin` values in base64).
    pub metadata: Vec<(String, String)>,
    /// A JSON object that must be a subset of a request message's JSON
    /// view (see [`subset`]); for streams, of at least one message.
    pub body: Option<Json>,
    /// Only entries with a greater sequence number.
    pub since: Option<u64>,
    /// Only entries with a smaller sequence number (the cursor of the
    /// listing's next page).
    pub before: Option<u64>,
    /// Only calls of this test session (empty: calls without one).
    pub session: Option<String>,
    /// Only calls answered by a rule whose origin (`file:line:column`)
    /// contains this text: a whole origin, or a file name for its rules.
    pub rule: Option<String>,
}

/// What filters read of a recorded call: an [`Entry`] of this replica's
/// journal, or a call of the journal shared by every replica (read back
/// from its JSON view, `observe::shared_journal`).
pub trait Call {
    /// Its sequence number in the journal it was read from.
    fn seq(&self) -> u64;
    /// The method's path, `/pkg.Service/Method`.
    fn path(&self) -> &str;
    /// The gRPC status sent.
    fn status(&self) -> u8;
    /// Whether a rule answered it.
    fn answered(&self) -> bool;
    /// A call to a method of the plan that no rule answered.
    fn unmatched(&self) -> bool;
    /// The values of metadata `key` as the JSON view shows them.
    fn metadata_values(&self, key: &str) -> Vec<String>;
    /// Its test session, if it has one.
    fn session(&self) -> Option<String>;
    /// The origin of the rule that answered.
    fn rule_origin(&self) -> Option<&str>;
    /// Its request messages as JSON.
    fn requests(&self) -> Vec<std::borrow::Cow<'_, Json>>;
}

impl Call for Entry {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn path(&self) -> &str {
        Entry::path(self)
    }
    fn status(&self) -> u8 {
        self.status
    }
    fn answered(&self) -> bool {
        self.rule.is_some()
    }
    fn unmatched(&self) -> bool {
        Entry::unmatched(self)
    }
    fn metadata_values(&self, key: &str) -> Vec<String> {
        Entry::metadata_values(self, key).collect()
    }
    fn session(&self) -> Option<String> {
        Entry::session(self)
    }
    fn rule_origin(&self) -> Option<&str> {
        Entry::rule_origin(self)
    }
    fn requests(&self) -> Vec<std::borrow::Cow<'_, Json>> {
        self.message_views().into_iter().map(|v| std::borrow::Cow::Owned(v.json)).collect()
    }
}

impl Filter {
    pub fn matches<C: Call + ?Sized>(&self, e: &C) -> bool {
        self.since.is_none_or(|s| e.seq() > s)
            && self.before.is_none_or(|b| e.seq() < b)
            && self.method.as_ref().is_none_or(|m| m.matches(e.path()))
            && self.status.is_none_or(|s| e.status() == s)
            && self.matched.is_none_or(|m| e.answered() == m)
            && self.metadata.iter().all(|(k, v)| e.metadata_values(k).iter().any(|have| have == v))
            && self.session.as_ref().is_none_or(|s| e.session().unwrap_or_default() == *s)
            && self.rule.as_ref().is_none_or(|r| e.rule_origin().is_some_and(|o| o.contains(r.as_str())))
            && self.body.as_ref().is_none_or(|b| e.requests().iter().any(|m| subset(b, m)))
    }

    /// Why `e` is not selected, criterion by criterion.
    pub fn differences<C: Call + ?Sized>(&self, e: &C) -> Vec<Difference> {
        let mut out = Vec::new();
        let seq = e.seq();
        if let Some(m) = self.method.as_ref().filter(|m| !m.matches(e.path())) {
            out.push(Difference::new("method", json!(m.text()), json!(e.path())));
        }
        if let Some(s) = self.since.filter(|&s| seq <= s) {
            out.push(Difference::new("seq", json!(format!("after {s}")), json!(seq)));
        }
        if let Some(b) = self.before.filter(|&b| seq >= b) {
            out.push(Difference::new("seq", json!(format!("before {b}")), json!(seq)));
        }
        if let Some(s) = self.status.filter(|&s| s != e.status()) {
            out.push(Difference::new("status", json!(status_name(s)), json!(status_name(e.status()))));
        }
        if let Some(m) = self.matched.filter(|&m| m != e.answered()) {
            out.push(Difference::new("matched", json!(m), json!(!m)));
        }
        if let Some(r) = self.rule.as_ref().filter(|r| !e.rule_origin().is_some_and(|o| o.contains(r.as_str()))) {
            out.push(Difference::new("rule", json!(r), json!(e.rule_origin())));
        }
        for (k, v) in &self.metadata {
            let have = e.metadata_values(k);
            if !have.iter().any(|h| h == v) {
                let actual = if have.is_empty() { Json::Null } else { json!(have.join(", ")) };
                out.push(Difference::new(format!("metadata.{k}"), json!(v), actual));
            }
        }
        if let Some(body) = &self.body {
            let best = e
                .requests()
                .iter()
                .map(|m| {
                    let mut d = Vec::new();
                    diff(body, m, "request", &mut d);
                    d
                })
                .min_by_key(|d| d.len());
            match best {
                Some(d) => out.extend(d),
                None => out.push(Difference::new("request", body.clone(), json!("no request message"))),
            }
        }
        out
    }
}

/// One criterion a call does not meet.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// `method`, `status`, `metadata.KEY`, `request.a.b`, ...
    pub at: String,
    pub expected: Json,
    pub actual: Json,
}

impl Difference {
    fn new(at: impl Into<String>, expected: Json, actual: Json) -> Difference {
        Difference { at: at.into(), expected, actual }
    }

    pub fn to_json(&self) -> Json {
        json!({"at": self.at, "expected": self.expected, "actual": self.actual})
    }
}

/// Whether `pattern` is a subset of `actual`: objects key by key,
/// recursively (a key the request leaves out reads as its default, as in
/// protobuf: `0`, `""`, `false`, `[]`, `{}` or null); arrays and scalars
/// must be equal (numbers compare by value, also against the strings the
/// JSON mapping writes 64-bit integers as). Keys match by their proto name
/// or their lowerCamelCase JSON name.
pub fn subset(pattern: &Json, actual: &Json) -> bool {
    match (pattern, actual) {
        (Json::Object(p), Json::Object(a)) => p.iter().all(|(k, pv)| match lookup(a, k) {
            Some(av) => subset(pv, av),
            None => is_default(pv),
        }),
        _ => equal(pattern, actual),
    }
}

/// Leaf-by-leaf differences between a pattern and a value (see [`subset`]).
fn diff(pattern: &Json, actual: &Json, at: &str, out: &mut Vec<Difference>) {
    match (pattern, actual) {
        (Json::Object(p), Json::Object(a)) => {
            for (k, pv) in p {
                let path = format!("{at}.{k}");
                match lookup(a, k) {
                    Some(av) => diff(pv, av, &path, out),
                    None if is_default(pv) => {}
                    None => out.push(Difference::new(path, pv.clone(), Json::Null)),
                }
            }
        }
        _ if equal(pattern, actual) => {}
        _ => out.push(Difference::new(at, pattern.clone(), actual.clone())),
    }
}

fn lookup<'a>(object: &'a Map<String, Json>, key: &str) -> Option<&'a Json> {
    object.get(key).or_else(|| {
        let other = if key.contains('_') { camel_case(key) } else { snake_case(key) };
        object.get(&other)
    })
}

fn camel_case(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut upper = false;
    for c in s.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn snake_case(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn is_default(v: &Json) -> bool {
    match v {
        Json::Null => true,
        Json::Bool(b) => !b,
        Json::Number(n) => n.as_f64() == Some(0.0),
        Json::String(s) => s.is_empty() || s == "0",
        Json::Array(a) => a.is_empty(),
        Json::Object(o) => o.is_empty(),
    }
}

/// Deep equality, numbers by value (a string holding a number equals it).
fn equal(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => number_eq(x, y),
        (Json::Number(n), Json::String(s)) | (Json::String(s), Json::Number(n)) => {
            s.trim().parse::<serde_json::Number>().is_ok_and(|m| number_eq(n, &m))
        }
        (Json::Array(x), Json::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| equal(x, y)),
        (Json::Object(x), Json::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| lookup(y, k).is_some_and(|w| equal(v, w)))
        }
        _ => a == b,
    }
}

fn number_eq(x: &serde_json::Number, y: &serde_json::Number) -> bool {
    if let (Some(a), Some(b)) = (x.as_i64(), y.as_i64()) {
        return a == b;
    }
    if let (Some(a), Some(b)) = (x.as_u64(), y.as_u64()) {
        return a == b;
    }
    x.as_f64().zip(y.as_f64()).is_some_and(|(a, b)| a == b)
}

// ---------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------

/// How many calls a verification expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Exactly(u64),
    /// Inclusive bounds; `u64::MAX` for no upper bound.
    Between(u64, u64),
}

impl Expect {
    pub fn holds(self, n: u64) -> bool {
        match self {
            Expect::Exactly(k) => n == k,
            Expect::Between(lo, hi) => lo <= n && n <= hi,
        }
    }

    fn minimum(self) -> u64 {
        match self {
            Expect::Exactly(k) | Expect::Between(k, _) => k,
        }
    }

    /// `exactly 2`, `at least 1`, `at most 3`, `between 1 and 3`.
    pub fn text(self) -> String {
        match self {
            Expect::Exactly(k) => format!("exactly {k}"),
            Expect::Between(lo, u64::MAX) => format!("at least {lo}"),
            Expect::Between(0, hi) => format!("at most {hi}"),
            Expect::Between(lo, hi) => format!("between {lo} and {hi}"),
        }
    }
}

/// A verification: the calls a filter selects, and how many are expected.
#[derive(Debug, Clone)]
pub struct Verify {
    pub filter: Filter,
    pub expect: Expect,
}

/// The outcome of a verification.
#[derive(Clone)]
pub struct Verdict {
    pub ok: bool,
    pub count: u64,
    pub expect: Expect,
    /// Sequence numbers of the calls that matched.
    pub seqs: Vec<u64>,
    /// When too few matched: the calls that came closest, best first.
    pub closest: Vec<Candidate>,
}

/// A call that did not match a verification, and why.
#[derive(Clone)]
pub struct Candidate {
    pub seq: u64,
    /// The call's JSON view.
    pub call: Json,
    pub differences: Vec<Difference>,
}

impl Verdict {
    pub fn to_json(&self, filter: &Filter) -> Json {
        let what = filter.method.as_ref().map(MethodMatch::text).unwrap_or_else(|| "any method".into());
        let message = format!("expected {} matching call(s) to {what}, found {}", self.expect.text(), self.count);
        let mut out = json!({
            "ok": self.ok,
            "count": self.count,
            "expected": self.expect.text(),
            "seqs": self.seqs,
        });
        if !self.ok {
            out["message"] = json!(message);
            out["closest"] = Json::Array(
                self.closest
                    .iter()
                    .map(|c| {
                        json!({
                            "seq": c.seq,
                            "call": c.call,
                            "differences": c.differences.iter().map(Difference::to_json).collect::<Vec<_>>(),
                        })
                    })
                    .collect(),
            );
        }
        out
    }
}

/// How many calls the closest list of a failed verification shows.
const CLOSEST: usize = 3;

/// A verification made one call at a time, in any order: the count, the
/// matching sequence numbers, and the [`CLOSEST`] calls that came nearest
/// without matching (each kept as a `T`, made into its JSON view only if
/// it is shown).
pub struct Tally<'v, T> {
    verify: &'v Verify,
    seqs: Vec<u64>,
    /// The nearest calls so far, best first: (other method, differences,
    /// newest first) as the key.
    nearest: Vec<(Nearness, Vec<Difference>, T)>,
}

/// How near a call came to a verification's filter, nearest first: of the
/// filtered method, then by fewest differences, then newest.
type Nearness = (bool, usize, u64);

impl<'v, T> Tally<'v, T> {
    pub fn new(verify: &'v Verify) -> Tally<'v, T> {
        Tally { verify, seqs: Vec::new(), nearest: Vec::new() }
    }

    /// Counts `call` if it matches; else keeps it (as `keep()`) if it is
    /// among the nearest so far.
    pub fn offer<C: Call + ?Sized>(&mut self, call: &C, keep: impl FnOnce() -> T) {
        let filter = &self.verify.filter;
        if filter.matches(call) {
            self.seqs.push(call.seq());
            return;
        }
        let differences = filter.differences(call);
        let other_method = filter.method.as_ref().is_some_and(|m| !m.matches(call.path()));
        let key = (other_method, differences.len(), u64::MAX - call.seq());
        if self.nearest.len() == CLOSEST && self.nearest.last().is_some_and(|(worst, _, _)| *worst <= key) {
            return;
        }
        let at = self.nearest.partition_point(|(k, _, _)| *k <= key);
        self.nearest.insert(at, (key, differences, keep()));
        self.nearest.truncate(CLOSEST);
    }

    /// The outcome; `view` makes a kept call's JSON view. When too few
    /// calls matched, the nearest ones are shown; when too many did, the
    /// matching ones are the story (`seqs`, oldest first).
    pub fn verdict(mut self, view: impl Fn(&T) -> Json) -> Verdict {
        self.seqs.sort_unstable();
        let count = self.seqs.len() as u64;
        let expect = self.verify.expect;
        let ok = expect.holds(count);
        let closest = match !ok && count < expect.minimum() {
            true => self
                .nearest
                .iter()
                .map(|((_, _, newer), differences, t)| Candidate {
                    seq: u64::MAX - newer,
                    call: view(t),
                    differences: differences.clone(),
                })
                .collect(),
            false => Vec::new(),
        };
        Verdict { ok, count, expect, seqs: self.seqs, closest }
    }
}

// ---------------------------------------------------------------------------
// JSON views
// ---------------------------------------------------------------------------

/// One request message as JSON: the protobuf JSON mapping when it decodes
/// with the method's input type, else its bytes in base64.
#[derive(Debug, Clone)]
pub struct MessageView {
    pub json: Json,
    pub decoded: bool,
    /// Its position in the call, from 0.
    pub index: u64,
}

/// How many bytes at the start of `bytes` are whole top-level protobuf
/// fields (a message cut short decodes up to there).
fn whole_fields(bytes: &[u8]) -> usize {
    let mut pos = 0;
    let mut whole = 0;
    while pos < bytes.len() {
        let Some(key) = wire::read_varint(bytes, &mut pos) else { break };
        let end = match key & 7 {
            0 => wire::read_varint(bytes, &mut pos).map(|_| pos),
            1 => pos.checked_add(8),
            2 => wire::read_varint(bytes, &mut pos)
                .and_then(|n| usize::try_from(n).ok())
                .and_then(|n| pos.checked_add(n)),
            5 => pos.checked_add(4),
            _ => None,
        };
        match end {
            Some(end) if end <= bytes.len() => {
                pos = end;
                whole = end;
            }
            _ => break,
        }
    }
    whole
}

pub fn json_options() -> prost_reflect::SerializeOptions {
    prost_reflect::SerializeOptions::new().use_proto_field_name(true)
}

impl Entry {
    /// A call to a method of the plan that no rule answered (the engine's
    /// own health and reflection services answer without rules).
    pub fn unmatched(&self) -> bool {
        self.rule.is_none() && self.upstream.is_none() && self.served().is_none_or(|m| m.builtin.is_none())
    }

    /// The call's test session: its `x-wirestub-session`, else its
    /// `x-gripmock-session` metadata.
    pub fn session(&self) -> Option<String> {
        self.metadata_values(wirestub_plan::SESSION_KEY)
            .next()
            .or_else(|| self.metadata_values(wirestub_plan::SESSION_ALIAS).next())
    }

    /// The method as served, if the index is in range.
    pub fn served(&self) -> Option<&ServedMethod> {
        self.generation.served.methods.get(self.method)
    }

    /// The origin (`file:line:column`) of the rule that answered, if one
    /// did.
    pub fn rule_origin(&self) -> Option<&str> {
        let r = self.rule?;
        self.served()?.plan.rules.get(r as usize).map(|r| r.origin.as_str())
    }

    /// The method's path, `/pkg.Service/Method`.
    pub fn path(&self) -> &str {
        match (&self.upstream, self.served()) {
            (Some(u), _) => &u.path,
            (None, Some(m)) => m.plan.path.as_str(),
            (None, None) => "",
        }
    }

    /// The values of metadata `key` as shown in the JSON view.
    pub fn metadata_values<'a>(&'a self, key: &'a str) -> impl Iterator<Item = String> + 'a {
        self.metadata.iter().filter(move |(k, _)| k.eq_ignore_ascii_case(key)).map(|(k, v)| metadata_text(k, v))
    }

    /// Every request message kept, viewed as JSON, in order. A message cut
    /// short shows the fields that fit whole in the bytes kept, and
    /// `"@truncated": {"size": bytes received, "kept_bytes": bytes kept}`;
    /// when no field fits whole or the fields do not decode, only the mark
    /// and `"@base64"`, the bytes kept.
    pub fn message_views(&self) -> Vec<MessageView> {
        let desc = self.served().and_then(|m| self.generation.schema()?.get_message_by_name(&m.plan.input_type));
        let decode = |bytes: &[u8]| {
            let d = desc.as_ref()?;
            let msg = prost_reflect::DynamicMessage::decode(d.clone(), bytes).ok()?;
            msg.serialize_with_options(serde_json::value::Serializer, &json_options()).ok()
        };
        self.messages
            .iter()
            .map(|(index, m)| {
                if !m.truncated() {
                    return match decode(&m.bytes) {
                        Some(json) => MessageView { json, decoded: true, index },
                        None => MessageView { json: Json::String(base64(&m.bytes)), decoded: false, index },
                    };
                }
                let mark = json!({"size": m.size, "kept_bytes": m.bytes.len()});
                let whole = whole_fields(&m.bytes);
                match decode(&m.bytes[..whole]) {
                    // Not even one field fits: the bytes are all there is to show.
                    Some(Json::Object(mut fields)) if whole > 0 || m.bytes.is_empty() => {
                        fields.insert("@truncated".into(), mark);
                        MessageView { json: Json::Object(fields), decoded: true, index }
                    }
                    _ => MessageView {
                        json: json!({"@truncated": mark, "@base64": base64(&m.bytes)}),
                        decoded: false,
                        index,
                    },
                }
            })
            .collect()
    }

    /// Metadata as a JSON object: ASCII values as strings, `-bin` values in
    /// base64, repeated keys joined with `, `.
    pub fn metadata_json(&self) -> Json {
        let mut map = Map::new();
        for (k, v) in &self.metadata {
            let text = metadata_text(k, v);
            match map.get_mut(&**k) {
                Some(Json::String(s)) => {
                    s.push_str(", ");
                    s.push_str(&text);
                }
                _ => {
                    map.insert(k.to_string(), Json::String(text));
                }
            }
        }
        Json::Object(map)
    }

    /// The entry as the admin API shows it.
    pub fn to_json(&self) -> Json {
        let served = self.served();
        let views = self.message_views();
        let mut out = json!({
            "seq": self.seq,
            "time": rfc3339(self.time),
            "method": self.path(),
            "protocol": self.protocol,
            "metadata": self.metadata_json(),
            "status": {"code": self.status, "name": status_name(self.status)},
            "message": self.message,
            "latency_ms": self.latency.as_secs_f64() * 1000.0,
            "generation": self.generation.number,
        });
        let single = served.is_none_or(|m| matches!(m.plan.kind, MethodKind::Unary | MethodKind::ServerStreaming));
        let undecoded = views.iter().any(|v| !v.decoded);
        // The views move into the answer (a message's JSON can be large).
        if single {
            out["request"] = views.into_iter().next().map(|v| v.json).unwrap_or(Json::Null);
        } else {
            out["messages"] = Json::Array(views.into_iter().map(|v| v.json).collect());
            out["message_count"] = json!(self.messages.count());
        }
        let omitted = self.messages.omitted();
        if omitted > 0 {
            // The first kept ones are positions 0.., the last one is the
            // call's last message: what is missing lies between.
            let first = self.messages.head().len() as u64;
            out["omitted_messages"] =
                json!({"count": omitted, "first_index": first, "last_index": first + omitted - 1});
        }
        if self.messages.truncated() {
            out["truncated"] = json!(true);
        }
        if undecoded {
            out["undecoded"] = json!(true);
        }
        out["rule"] = match (self.rule, served) {
            (Some(r), Some(m)) => json!({
                "index": r,
                "origin": m.plan.rules.get(r as usize).map(|r| r.origin.as_str()).unwrap_or(""),
            }),
            _ => Json::Null,
        };
        if let Some(s) = self.similarity {
            out["similarity"] = json!((s as f64 * 1e4).round() / 1e4);
        }
        if let Some(f) = &self.fault {
            out["fault"] = json!(f);
        }
        if let (Some(v), Some(m)) = (&self.violations, served) {
            let described = crate::call::validate::described(m, v);
            out["violations"] = described
                .into_iter()
                .map(|(field, rule, message)| json!({"field": field, "rule": rule, "message": message}))
                .collect();
        }
        if let Some(u) = &self.upstream {
            out["upstream"] = json!({"latency_ms": u.latency.as_secs_f64() * 1000.0, "failed": u.failed});
        } else if self.rule.is_none() {
            out["closest"] = self.closest_json();
        }
        out
    }

    /// The rule that came closest, with the condition that failed and the
    /// value the request had there; null when unknown.
    pub fn closest_json(&self) -> Json {
        let (Some(c), Some(m)) = (self.closest, self.served()) else { return Json::Null };
        let Some(rule) = m.plan.rules.get(c.rule as usize) else { return Json::Null };
        let total = rule.conditions.len();
        let mut out = json!({
            "rule": c.rule,
            "origin": rule.origin,
            "priority": rule.priority,
            "held": c.held,
            "total": total,
        });
        match rule.conditions.get(c.failed as usize) {
            Some(cond) => {
                let mut failed = describe_condition(&m.plan, cond);
                failed["index"] = json!(c.failed);
                let reason = match self.actual(m, cond.source) {
                    Ok(actual) => {
                        failed["actual"] = actual.value;
                        failed["present"] = json!(actual.present);
                        actual.text
                    }
                    Err(why) => {
                        failed["actual"] = Json::Null;
                        format!("the request could not be read there: {why}")
                    }
                };
                let text = failed["text"].as_str().unwrap_or_default().to_string();
                out["failed"] = failed;
                out["reason"] = json!(format!("{text} does not hold: {reason}"));
            }
            None => {
                let times = m.plan.responses.get(rule.response as usize).map(|r| r.times).unwrap_or(0);
                out["failed"] = Json::Null;
                out["reason"] = json!(format!(
                    "all {total} conditions held, but its response answers at most {times} calls and those were used"
                ));
            }
        }
        out
    }

    /// What the request had at `source`, read as the matcher reads it.
    fn actual(&self, m: &ServedMethod, source: Source) -> Result<Actual, String> {
        let i = match source {
            Source::Field(i) => i,
            Source::Metadata(i) => {
                let key = m.plan.metadata_keys.get(i as usize).ok_or("no such metadata key")?;
                let values: Vec<String> = self.metadata_values(key).collect();
                return Ok(match values.first() {
                    Some(v) => Actual {
                        value: json!(v),
                        present: true,
                        text: format!("the request has {}", Json::String(v.clone())),
                    },
                    None => Actual {
                        value: Json::Null,
                        present: false,
                        text: format!("the request has no `{key}` metadata"),
                    },
                });
            }
        };
        let field = m.plan.fields.get(i as usize).ok_or("no such field")?;
        // The first messages kept are positions 0..; the latest kept is the
        // call's last message.
        let slices: Vec<&[u8]> = self.messages.head().iter().map(|m| &m.bytes[..]).collect();
        let last = self.messages.last().or(self.messages.head().last()).map(|m| &m.bytes[..]);
        let count = self.messages.count() as usize;
        // A duplex call is matched message by message; the last one is the
        // one no rule answered.
        let head: &[&[u8]] = match (m.plan.duplex, &last) {
            (true, Some(last)) => std::slice::from_ref(last),
            _ => &slices,
        };
        let messages = Messages { head, last, count, folds: &[], violations: &[] };
        if field.message == MessageSel::Count {
            return Ok(Actual {
                value: json!(count),
                present: true,
                text: format!("the call sent {count} message(s)"),
            });
        }
        if field.is_multi() {
            let message = match field.message {
                MessageSel::Single | MessageSel::First => head.first().copied(),
                MessageSel::Last => last,
                MessageSel::Nth(n) => slices.get(n as usize).copied(),
                MessageSel::Count | MessageSel::Each => None,
            };
            let Some(message) = message else {
                return Ok(Actual { value: json!([]), present: false, text: "the call has no such message".into() });
            };
            let mut elements = Vec::new();
            crate::call::picks::for_each_value(field, message, &mut |v| {
                elements.push(value_ref_json(v));
                elements.len() < 100
            })
            .map_err(|e| e.to_string())?;
            let text = format!("the request has {}", Json::Array(elements.clone()));
            return Ok(Actual { present: !elements.is_empty(), value: Json::Array(elements), text });
        }
        let metadata: Vec<Option<Box<[u8]>>> = m
            .plan
            .metadata_keys
            .iter()
            .map(|k| self.metadata.iter().find(|(n, _)| &**n == k).map(|(_, v)| v.to_vec().into_boxed_slice()))
            .collect();
        let request = Request::read(m, &messages, metadata.as_slice()).map_err(|e| e.to_string())?;
        let (value, present) = request.scalar(source).map_err(|e| e.to_string())?;
        let json = value_ref_json(value);
        let text =
            if present { format!("the request has {json}") } else { format!("the field is not set (reads as {json})") };
        Ok(Actual { value: json, present, text })
    }
}

struct Actual {
    value: Json,
    present: bool,
    text: String,
}

pub fn metadata_text(key: &str, value: &[u8]) -> String {
    let base64_text = |v: &[u8]| v.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    if key.ends_with("-bin") && !base64_text(value) {
        return base64(value);
    }
    String::from_utf8_lossy(value).into_owned()
}

/// The canonical name of a status code.
pub fn status_name(code: u8) -> &'static str {
    STATUS_NAMES.get(code as usize).copied().unwrap_or("UNKNOWN")
}

// ---------------------------------------------------------------------------
// Conditions, readably
// ---------------------------------------------------------------------------

/// What a condition reads, as the rule wrote it: `request.a.b` or
/// `metadata.key`.
pub fn input_name(m: &Method, source: Source) -> String {
    match source {
        Source::Field(i) => format!("request.{}", m.fields.get(i as usize).map(|f| f.name.as_str()).unwrap_or("?")),
        Source::Metadata(i) => {
            format!("metadata.{}", m.metadata_keys.get(i as usize).map(String::as_str).unwrap_or("?"))
        }
    }
}

/// A condition as JSON: `input`, `test` (readable), `text` (both),
/// `operator` and `expected`.
pub fn describe_condition(m: &Method, c: &Condition) -> Json {
    let input = input_name(m, c.source);
    let test = render_test(&c.test);
    let (operator, expected) = match &c.test {
        Test::Op(op) => (op.name(), op_operand(op)),
        Test::Not(t) => ("not", json!(render_test(t))),
        Test::Any(_) => ("any", json!(test)),
        Test::All(_) => ("all", json!(test)),
    };
    json!({
        "input": input,
        "test": test,
        "text": format!("{input} {test}"),
        "operator": operator,
        "expected": expected,
    })
}

fn op_operand(op: &Op) -> Json {
    match op {
        Op::Eq(v) | Op::Gt(v) | Op::Gte(v) | Op::Lt(v) | Op::Lte(v) | Op::Contains(v) => value_json(v),
        Op::In(vs) => Json::Array(vs.iter().map(value_json).collect()),
        Op::Exists => json!(true),
        Op::Prefix(b) | Op::Suffix(b) => bytes_json(b),
        Op::Regex(i) => json!(format!("regex #{i}")),
        Op::Len(t) | Op::Chars(t) => json!(render_test(t)),
        Op::Format(f) => json!(format!("{f:?}")),
        Op::Unique => json!(true),
    }
}

/// A test as text: `== "Tom"`, `in [1, 2]`, `not (exists)`, ...
pub fn render_test(t: &Test) -> String {
    let list = |l: &[Test], sep: &str| l.iter().map(|t| format!("({})", render_test(t))).collect::<Vec<_>>().join(sep);
    match t {
        Test::Op(op) => match op {
            Op::Eq(v) => format!("== {}", value_text(v)),
            Op::In(vs) => format!("in [{}]", vs.iter().map(value_text).collect::<Vec<_>>().join(", ")),
            Op::Gt(v) => format!("> {}", value_text(v)),
            Op::Gte(v) => format!(">= {}", value_text(v)),
            Op::Lt(v) => format!("< {}", value_text(v)),
            Op::Lte(v) => format!("<= {}", value_text(v)),
            Op::Exists => "exists".to_string(),
            Op::Contains(v) => format!("contains {}", value_text(v)),
            Op::Prefix(b) => format!("starts with {}", bytes_text(b)),
            Op::Suffix(b) => format!("ends with {}", bytes_text(b)),
            Op::Regex(i) => format!("matches regex #{i}"),
            Op::Len(t) => format!("length {}", render_test(t)),
            Op::Chars(t) => format!("character count {}", render_test(t)),
            Op::Format(f) => format!("a valid {f:?}"),
            Op::Unique => "unique elements".to_string(),
        },
        Test::Not(t) => format!("not ({})", render_test(t)),
        Test::Any(l) => format!("any of {}", list(l, " | ")),
        Test::All(l) => format!("all of {}", list(l, " & ")),
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::Bytes(b) => bytes_text(b),
        v => value_json(v).to_string(),
    }
}

fn bytes_text(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => Json::String(s.to_string()).to_string(),
        Err(_) => format!("base64:{}", base64(b)),
    }
}

fn bytes_json(b: &[u8]) -> Json {
    match std::str::from_utf8(b) {
        Ok(s) => json!(s),
        Err(_) => json!(base64(b)),
    }
}

fn float_json(x: f64) -> Json {
    match serde_json::Number::from_f64(x) {
        Some(n) => Json::Number(n),
        None if x.is_nan() => json!("NaN"),
        None if x > 0.0 => json!("Infinity"),
        None => json!("-Infinity"),
    }
}

/// A plan value as JSON (strings as text, other bytes in base64).
pub fn value_json(v: &Value) -> Json {
    match v {
        Value::I64(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::F64(x) => float_json(*x),
        Value::Bool(x) => json!(x),
        Value::Bytes(b) => bytes_json(b),
    }
}

fn value_ref_json(v: ValueRef<'_>) -> Json {
    match v {
        ValueRef::I64(x) => json!(x),
        ValueRef::U64(x) => json!(x),
        ValueRef::F64(x) => float_json(x),
        ValueRef::Bool(x) => json!(x),
        ValueRef::Bytes(b) => bytes_json(b),
    }
}

// ---------------------------------------------------------------------------
// Small encoders
// ---------------------------------------------------------------------------

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A time as RFC 3339 in UTC with milliseconds: `2024-05-01T12:30:00.250Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let (secs, millis) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_millis()),
        Err(e) => {
            let d = e.duration();
            let ms = d.as_millis() as i64;
            (-((ms + 999) / 1000), ((1000 - ms % 1000) % 1000) as u32)
        }
    };
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// A small plan and state for the journal's and the admin API's tests:
/// `demo.Greeter` with a unary `SayHello` (four rules, no fallback) and a
/// bidirectional `Chat` (no rules), and descriptors made by hand.
#[cfg(test)]
pub(crate) mod fixture {
    use super::*;
    use crate::state::State;
    use prost::Message as _;
    use prost_reflect::prost_types::{
        field_descriptor_proto::{Label, Type},
        DescriptorProto, FieldDescriptorProto, FileDescriptorProto, FileDescriptorSet, MethodDescriptorProto,
        ServiceDescriptorProto,
    };
    use wirestub_plan::Shape;
    use wirestub_plan::{FieldPath, Plan, Response, Rule, ScalarKind};

    pub const SAY_HELLO: &str = "/demo.Greeter/SayHello";
    pub const CHAT: &str = "/demo.Greeter/Chat";

    fn field(name: &str, number: i32, ty: Type, label: Label, type_name: Option<&str>) -> FieldDescriptorProto {
        FieldDescriptorProto {
            name: Some(name.into()),
            number: Some(number),
            r#type: Some(ty as i32),
            label: Some(label as i32),
            type_name: type_name.map(Into::into),
            ..Default::default()
        }
    }

    fn message(name: &str, fields: Vec<FieldDescriptorProto>) -> DescriptorProto {
        DescriptorProto { name: Some(name.into()), field: fields, ..Default::default() }
    }

    fn descriptors() -> Vec<u8> {
        let method = |name: &str, streaming: bool| MethodDescriptorProto {
            name: Some(name.into()),
            input_type: Some(".demo.HelloRequest".into()),
            output_type: Some(".demo.HelloReply".into()),
            client_streaming: Some(streaming),
            server_streaming: Some(streaming),
            ..Default::default()
        };
        let file = FileDescriptorProto {
            name: Some("demo.proto".into()),
            package: Some("demo".into()),
            syntax: Some("proto3".into()),
            message_type: vec![
                message(
                    "HelloRequest",
                    vec![
                        field("name", 1, Type::String, Label::Optional, None),
                        field("age", 2, Type::Int32, Label::Optional, None),
                        field("tags", 3, Type::String, Label::Repeated, None),
                        field("locale", 4, Type::Message, Label::Optional, Some(".demo.Locale")),
                        field("big_number", 5, Type::Int64, Label::Optional, None),
                    ],
                ),
                message("Locale", vec![field("language", 1, Type::String, Label::Optional, None)]),
                message("HelloReply", vec![field("message", 1, Type::String, Label::Optional, None)]),
            ],
            service: vec![ServiceDescriptorProto {
                name: Some("Greeter".into()),
                method: vec![method("SayHello", false), method("Chat", true)],
                ..Default::default()
            }],
            ..Default::default()
        };
        FileDescriptorSet { file: vec![file] }.encode_to_vec()
    }

    fn path(name: &str, numbers: Vec<u32>, kind: ScalarKind, shape: Shape) -> FieldPath {
        let default = match kind.value_class() {
            wirestub_plan::ValueClass::I64 => Value::I64(0),
            _ => Value::Bytes(Vec::new()),
        };
        FieldPath { name: name.into(), numbers, kind, default, shape, message: MessageSel::Single, picks: Vec::new() }
    }

    fn cond(source: Source, op: Op) -> Condition {
        Condition { source, test: Test::Op(op) }
    }

    fn text(s: &str) -> Value {
        Value::Bytes(s.as_bytes().to_vec())
    }

    pub fn plan() -> Plan {
        let rule = |line: u32, priority: i64, response: u32, conditions: Vec<Condition>| Rule {
            conditions,
            response,
            priority,
            origin: format!("rules/demo.yaml:{line}:9"),
            raw: None,
            skip_validation: false,
        };
        let say_hello = Method {
            path: SAY_HELLO.into(),
            kind: MethodKind::Unary,
            input_type: "demo.HelloRequest".into(),
            output_type: "demo.HelloReply".into(),
            fields: vec![
                path("name", vec![1], ScalarKind::String, Shape::Singular),
                path("age", vec![2], ScalarKind::Int32, Shape::Singular),
                path("locale.language", vec![4, 1], ScalarKind::String, Shape::Singular),
                path("tags", vec![3], ScalarKind::String, Shape::Repeated),
            ],
            metadata_keys: vec!["x-role".into()],
            responses: vec![
                Response { body: wirestub_plan::grpc_frame(b"\x0a\x02Hi"), ..Default::default() },
                Response { status: 7, message: "denied".into(), ..Default::default() },
                Response { body: wirestub_plan::grpc_frame(b""), times: 1, ..Default::default() },
            ],
            rules: vec![
                rule(
                    3,
                    20,
                    0,
                    vec![
                        cond(Source::Metadata(0), Op::Eq(text("root"))),
                        cond(Source::Field(0), Op::Eq(text("admin"))),
                    ],
                ),
                rule(
                    10,
                    10,
                    0,
                    vec![cond(Source::Field(0), Op::Eq(text("Tom"))), cond(Source::Field(2), Op::Eq(text("fr")))],
                ),
                rule(16, 0, 1, vec![cond(Source::Field(1), Op::Gt(Value::I64(40)))]),
                rule(20, 0, 2, vec![cond(Source::Field(3), Op::Contains(text("vip")))]),
            ],
            duplex: false,
            regexes: vec![],
            checks: Vec::new(),
            cel_checks: Vec::new(),
        };
        let chat = Method {
            path: CHAT.into(),
            kind: MethodKind::BidiStreaming,
            input_type: "demo.HelloRequest".into(),
            output_type: "demo.HelloReply".into(),
            fields: vec![],
            metadata_keys: vec![],
            responses: vec![],
            rules: vec![],
            duplex: false,
            regexes: vec![],
            checks: Vec::new(),
            cel_checks: Vec::new(),
        };
        Plan { descriptors: descriptors(), methods: vec![chat, say_hello] }
    }

    /// A state serving [`plan`], with a journal of `journal` calls (0: none).
    pub fn state(journal: usize) -> State {
        State::new(plan(), None, "demo plan".into(), crate::NoMatch::NotFound, 1, journal).expect("demo plan prepares")
    }

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn len_field(number: u32, bytes: &[u8], out: &mut Vec<u8>) {
        varint(u64::from(number << 3 | 2), out);
        varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }

    /// An encoded `demo.HelloRequest`.
    pub fn hello(name: &str, age: i32, tags: &[&str], language: Option<&str>) -> Vec<u8> {
        let mut out = Vec::new();
        if !name.is_empty() {
            len_field(1, name.as_bytes(), &mut out);
        }
        if age != 0 {
            varint(2 << 3, &mut out);
            varint(age as i64 as u64, &mut out);
        }
        for t in tags {
            len_field(3, t.as_bytes(), &mut out);
        }
        if let Some(l) = language {
            let mut locale = Vec::new();
            len_field(1, l.as_bytes(), &mut locale);
            len_field(4, &locale, &mut out);
        }
        out
    }

    /// `messages` as recorded within `limits`.
    pub fn kept(messages: &[Vec<u8>], limits: JournalLimits) -> RequestMessages {
        let mut kept = RequestMessages::new(limits.messages, limits.message_bytes);
        for m in messages {
            kept.push(m);
        }
        kept
    }

    /// An entry for a call to `path` on the state's current generation.
    pub fn entry(
        state: &State,
        path: &str,
        metadata: &[(&str, &[u8])],
        messages: Vec<Vec<u8>>,
        rule: Option<u32>,
        status: u8,
        closest: Option<Closest>,
    ) -> Entry {
        let generation = state.current();
        let method = generation.served.methods.iter().position(|m| m.plan.path == path).expect("method in plan");
        Entry {
            seq: 0,
            time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            generation,
            method,
            metadata: metadata.iter().map(|(k, v)| (Box::from(*k), Bytes::copy_from_slice(v))).collect(),
            messages: kept(&messages, JournalLimits::DEFAULT),
            rule,
            status,
            message: if status == 0 { String::new() } else { "no rule matches".into() },
            latency: Duration::from_micros(1500),
            closest,
            similarity: None,
            fault: None,
            violations: None,
            protocol: "grpc",
            upstream: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::*;
    use super::*;

    fn filter() -> Filter {
        Filter::default()
    }

    /// A journal with five calls: 1 Tom/fr (rule 1), 2 admin as root
    /// (rule 0), 3 Tom/en (unmatched, closest rule 1), 4 age 50 (rule 2,
    /// PERMISSION_DENIED), 5 a chat stream of two messages.
    fn recorded() -> (crate::state::State, Vec<Arc<Entry>>) {
        let state = state(16);
        let j = state.journal.as_ref().unwrap();
        j.record(entry(&state, SAY_HELLO, &[], vec![hello("Tom", 0, &[], Some("fr"))], Some(1), 0, None));
        j.record(entry(
            &state,
            SAY_HELLO,
            &[("x-role", b"root")],
            vec![hello("admin", 0, &[], None)],
            Some(0),
            0,
            None,
        ));
        let closest = Closest { rule: 1, failed: 1, held: 1 };
        j.record(entry(&state, SAY_HELLO, &[], vec![hello("Tom", 0, &["a"], Some("en"))], None, 5, Some(closest)));
        j.record(entry(&state, SAY_HELLO, &[("x-role", b"user")], vec![hello("Ann", 50, &[], None)], Some(2), 7, None));
        j.record(entry(&state, CHAT, &[], vec![hello("a", 0, &[], None), hello("b", 0, &[], None)], None, 12, None));
        let all = j.snapshot();
        (state, all)
    }

    #[test]
    fn the_ring_numbers_entries_and_keeps_the_newest() {
        let state = state(2);
        let j = state.journal.as_ref().unwrap();
        for name in ["a", "b", "c"] {
            j.record(entry(&state, SAY_HELLO, &[], vec![hello(name, 0, &[], None)], None, 5, None));
        }
        let seqs: Vec<u64> = j.snapshot().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [2, 3]);
        assert_eq!((j.len(), j.capacity(), j.recorded()), (2, 2, 3));
        assert_eq!(j.reset(), 2);
        assert!(j.is_empty());
        j.record(entry(&state, SAY_HELLO, &[], vec![], None, 5, None));
        assert_eq!(j.snapshot()[0].seq, 4, "numbering goes on after a reset");
    }

    #[test]
    fn entries_render_as_json() {
        let (_state, all) = recorded();
        let e = all[1].to_json();
        assert_eq!(e["seq"], 2);
        assert_eq!(e["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(e["method"], SAY_HELLO);
        assert_eq!(e["metadata"], json!({"x-role": "root"}));
        assert_eq!(e["request"], json!({"name": "admin"}));
        assert_eq!(e["rule"], json!({"index": 0, "origin": "rules/demo.yaml:3:9"}));
        assert_eq!(e["status"], json!({"code": 0, "name": "OK"}));
        assert_eq!(e["latency_ms"], 1.5);
        assert!(e.get("closest").is_none() && e.get("undecoded").is_none());
        let stream = all[4].to_json();
        assert_eq!(stream["messages"], json!([{"name": "a"}, {"name": "b"}]));
        assert_eq!(stream["rule"], Json::Null);
        assert_eq!(stream["closest"], Json::Null);
    }

    #[test]
    fn undecodable_requests_and_binary_metadata_fall_back_to_base64() {
        let state = state(4);
        let e = entry(
            &state,
            SAY_HELLO,
            &[("x-trace-bin", b"\x00\x01\xff"), ("x-id", b"AQI=")],
            vec![vec![0x0a, 0x05, 1]],
            None,
            13,
            None,
        );
        let v = e.to_json();
        assert_eq!(v["request"], "CgUB");
        assert_eq!(v["undecoded"], true);
        assert_eq!(v["metadata"]["x-trace-bin"], "AAH/");
        assert_eq!(v["metadata"]["x-id"], "AQI=");
        // Already base64 on the wire: shown as received.
        let e = entry(&state, SAY_HELLO, &[("x-trace-bin", b"AAH/")], vec![], None, 13, None);
        assert_eq!(e.to_json()["metadata"]["x-trace-bin"], "AAH/");
    }

    #[test]
    fn request_messages_are_bounded_while_recorded() {
        let mut m = RequestMessages::new(2, 4);
        assert!(m.is_empty() && !m.truncated());
        for i in 0..5u8 {
            m.push(&[i; 10]);
        }
        assert_eq!((m.count(), m.len(), m.omitted()), (5, 3, 2));
        let kept: Vec<(u64, Vec<u8>, usize)> = m.iter().map(|(i, k)| (i, k.bytes.to_vec(), k.size)).collect();
        assert_eq!(kept, [(0, vec![0; 4], 10), (1, vec![1; 4], 10), (4, vec![4; 4], 10)]);
        assert!(m.truncated());
        // However many come, what is held stays the same.
        let held = m.bytes();
        for _ in 0..1000 {
            m.push(&[9; 1000]);
        }
        assert_eq!((m.count(), m.len(), m.bytes()), (1005, 3, held));
        assert!(held < 3 * (4 + 64) + 64, "{held}");
        // No messages kept at all: only their number.
        let mut none = RequestMessages::new(0, 4);
        none.push(b"abc");
        assert_eq!((none.count(), none.len(), none.bytes()), (1, 0, 0));
        // Short messages are kept whole, as a copy of their own.
        let mut whole = RequestMessages::new(4, 100);
        let buffer = Bytes::from(vec![7u8; 4096]);
        whole.push(&buffer[..3]);
        assert!(!whole.truncated());
        assert_eq!(whole.head()[0].bytes.len(), 3);
    }

    #[test]
    fn cut_and_left_out_messages_are_marked_in_the_json_views() {
        let state = state(8);
        let limits = JournalLimits { bytes: 1 << 20, messages: 2, message_bytes: 20 };
        let long = "x".repeat(100);
        let messages: Vec<Vec<u8>> = (0..5).map(|i| hello(&format!("m{i}"), 0, &[&long], None)).collect();
        let size = messages[0].len();
        let mut e = entry(&state, CHAT, &[], vec![], None, 0, None);
        e.messages = kept(&messages, limits);
        let v = e.to_json();
        let mark = json!({"size": size, "kept_bytes": 20});
        assert_eq!(
            v["messages"],
            json!([
                {"name": "m0", "@truncated": mark},
                {"name": "m1", "@truncated": mark},
                {"name": "m4", "@truncated": mark},
            ])
        );
        assert_eq!(v["message_count"], 5);
        assert_eq!(v["omitted_messages"], json!({"count": 2, "first_index": 2, "last_index": 3}));
        assert_eq!(v["truncated"], true);
        assert!(v.get("undecoded").is_none(), "{v}");
        // Partial matching sees the fields that were kept.
        let f = Filter { body: Some(json!({"name": "m4"})), ..filter() };
        assert!(f.matches(&e));

        // A unary request cut inside its first field: the bytes kept.
        let mut e = entry(&state, SAY_HELLO, &[], vec![], None, 0, None);
        e.messages = kept(&[hello(&long, 0, &[], None)], limits);
        let v = e.to_json();
        assert_eq!(v["request"]["@truncated"], json!({"size": 102, "kept_bytes": 20}));
        assert_eq!(v["request"]["@base64"], json!(base64(&hello(&long, 0, &[], None)[..20])));
        assert_eq!((v["truncated"].clone(), v["undecoded"].clone()), (json!(true), json!(true)));
        assert!(v.get("omitted_messages").is_none() && v.get("message_count").is_none(), "{v}");

        // Nothing cut: no marks.
        let v = entry(&state, CHAT, &[], vec![hello("a", 0, &[], None)], None, 0, None).to_json();
        assert_eq!(v["message_count"], 1);
        assert!(v.get("truncated").is_none() && v.get("omitted_messages").is_none(), "{v}");
    }

    #[test]
    fn whole_fields_stop_at_the_first_cut_one() {
        let m = hello("Tom", 7, &["abc"], None);
        assert_eq!(whole_fields(&m), m.len());
        assert_eq!(whole_fields(&m[..6]), 5);
        assert_eq!(whole_fields(&m[..7]), 7);
        assert_eq!(whole_fields(&m[..8]), 7);
        assert_eq!(whole_fields(&[0x0f, 1, 2]), 0, "wire type 7");
        assert_eq!(whole_fields(&[0x09, 1, 2, 3, 4, 5, 6, 7, 8]), 9, "fixed64");
        assert_eq!(whole_fields(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]), 0);
    }

    #[test]
    fn the_journal_drops_the_oldest_entries_beyond_its_byte_limit() {
        let state = state(100);
        let one = |name: &str| {
            let mut e = entry(&state, SAY_HELLO, &[("x-role", b"root")], vec![], None, 0, None);
            e.messages = kept(&[hello(name, 0, &[&"y".repeat(1000)], None)], JournalLimits::DEFAULT);
            e
        };
        let size = one("a").bytes();
        // Honest: the message, the metadata, the texts and the overhead.
        assert!(size >= ENTRY_OVERHEAD + 1000 + "x-role".len() + "root".len(), "{size}");
        assert!(size < ENTRY_OVERHEAD + 1000 + 400, "{size}");
        // The plan generation every entry holds counts once.
        let plan = generation_cost(&one("a").generation);
        let j =
            Journal::with_limits(100, JournalLimits { bytes: plan + 3 * size + size / 2, ..JournalLimits::DEFAULT });
        for name in ["a", "b", "c", "d", "e"] {
            j.record(one(name));
        }
        let seqs: Vec<u64> = j.snapshot().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
        assert_eq!((j.bytes(), j.evicted(), j.recorded()), (plan + 3 * size, 2, 5));
        assert!(j.bytes() <= j.limits().bytes);
        // An entry bigger than the whole budget is kept alone.
        let mut big = one("big");
        big.messages = kept(&[vec![0u8; 8 * size]], JournalLimits::DEFAULT);
        let big_size = big.bytes();
        j.record(big);
        assert_eq!(j.snapshot().iter().map(|e| e.seq).collect::<Vec<_>>(), [6]);
        assert_eq!((j.bytes(), j.evicted()), (plan + big_size, 5));
        assert_eq!(j.reset(), 1);
        assert_eq!(j.bytes(), 0);
        // The count limit still holds.
        let j = Journal::with_limits(2, JournalLimits::DEFAULT);
        for name in ["a", "b", "c"] {
            j.record(one(name));
        }
        assert_eq!((j.len(), j.bytes()), (2, plan + 2 * size));
    }

    #[test]
    fn pages_are_the_newest_selected_entries() {
        let (state, _) = recorded();
        let j = state.journal.as_ref().unwrap();
        let seqs = |p: Page| (p.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), p.matched);
        assert_eq!(seqs(j.page(&filter(), false, 2)), (vec![4, 5], 5));
        assert_eq!(seqs(j.page(&Filter { before: Some(4), ..filter() }, false, 2)), (vec![2, 3], 3));
        assert_eq!(seqs(j.page(&Filter { before: Some(2), ..filter() }, false, 2)), (vec![1], 1));
        assert_eq!(seqs(j.page(&filter(), true, 10)), (vec![3, 5], 2));
        assert_eq!(seqs(j.page(&filter(), false, 0)), (vec![], 5));
    }

    #[test]
    fn method_patterns() {
        assert_eq!(MethodMatch::parse("/a.B/C"), Ok(MethodMatch::Path("/a.B/C".into())));
        assert_eq!(MethodMatch::parse("a.B/C"), Ok(MethodMatch::Path("/a.B/C".into())));
        assert_eq!(MethodMatch::parse("a.B"), Ok(MethodMatch::Service("a.B".into())));
        assert_eq!(MethodMatch::parse("/a.B/"), Ok(MethodMatch::Service("a.B".into())));
        assert!(
            MethodMatch::parse("").is_err() && MethodMatch::parse("/").is_err() && MethodMatch::parse("a/b/c").is_err()
        );
        let svc = MethodMatch::Service("demo.Greeter".into());
        assert!(svc.matches(SAY_HELLO) && svc.matches(CHAT));
        assert!(!svc.matches("/demo.GreeterX/SayHello") && !svc.matches("/demo/Greeter"));
    }

    #[test]
    fn statuses_by_number_or_name() {
        assert_eq!(parse_status("5"), Ok(5));
        assert_eq!(parse_status("NOT_FOUND"), Ok(5));
        assert_eq!(parse_status("notfound"), Ok(5));
        assert_eq!(parse_status("PermissionDenied"), Ok(7));
        assert_eq!(parse_status("Canceled"), Ok(1));
        assert!(parse_status("17").is_err() && parse_status("nope").is_err());
    }

    #[test]
    fn filters_select_entries() {
        let (state, _) = recorded();
        let j = state.journal.as_ref().unwrap();
        let seqs = |f: Filter| j.query(&f).iter().map(|e| e.seq).collect::<Vec<_>>();
        let method = |s: &str| Some(MethodMatch::parse(s).unwrap());
        assert_eq!(seqs(Filter { method: method("demo.Greeter/SayHello"), ..filter() }), [1, 2, 3, 4]);
        assert_eq!(seqs(Filter { method: method("demo.Greeter"), ..filter() }), [1, 2, 3, 4, 5]);
        assert_eq!(seqs(Filter { method: method("/demo.Greeter/Chat"), ..filter() }), [5]);
        assert_eq!(seqs(Filter { status: Some(7), ..filter() }), [4]);
        assert_eq!(seqs(Filter { matched: Some(false), ..filter() }), [3, 5]);
        assert_eq!(seqs(Filter { matched: Some(true), since: Some(1), ..filter() }), [2, 4]);
        assert_eq!(seqs(Filter { metadata: vec![("x-role".into(), "root".into())], ..filter() }), [2]);
        assert_eq!(seqs(Filter { body: Some(json!({"name": "Tom"})), ..filter() }), [1, 3]);
        assert_eq!(seqs(Filter { body: Some(json!({"name": "Tom", "locale": {"language": "fr"}})), ..filter() }), [1]);
        assert_eq!(seqs(Filter { body: Some(json!({"tags": ["a"]})), ..filter() }), [3]);
        assert_eq!(seqs(Filter { body: Some(json!({"age": 50})), ..filter() }), [4]);
        // Absent fields read as their defaults; streams match on any message.
        assert_eq!(seqs(Filter { body: Some(json!({"name": "b", "age": 0})), ..filter() }), [5]);
        assert_eq!(j.count(&Filter { method: method("demo.Greeter/SayHello"), status: Some(0), ..filter() }), 2);
        assert_eq!(j.unmatched(&filter()).iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 5]);
    }

    #[test]
    fn partial_body_matching() {
        let actual =
            json!({"name": "Tom", "locale": {"language": "fr"}, "bigNumber": "9007199254740993", "tags": ["a", "b"]});
        assert!(subset(&json!({}), &actual));
        assert!(subset(&json!({"locale": {}}), &actual));
        assert!(subset(&json!({"locale": {"language": "fr"}}), &actual));
        assert!(!subset(&json!({"locale": {"language": "en"}}), &actual));
        assert!(subset(&json!({"big_number": 9007199254740993u64}), &actual), "proto name, number against string");
        assert!(subset(&json!({"bigNumber": "9007199254740993"}), &actual));
        assert!(!subset(&json!({"big_number": 9007199254740992u64}), &actual));
        assert!(subset(&json!({"tags": ["a", "b"]}), &actual));
        assert!(!subset(&json!({"tags": ["a"]}), &actual), "arrays compare whole");
        assert!(!subset(&json!({"missing": "x"}), &actual));
        assert!(subset(&json!({"missing": ""}), &actual), "absent reads as the default");
        assert!(!subset(&json!({"name": {"x": 1}}), &actual));
        assert!(!subset(&json!({"name": "Tom"}), &json!("Tom")));
    }

    #[test]
    fn verify_counts_and_explains_failures() {
        let (state, _) = recorded();
        let j = state.journal.as_ref().unwrap();
        let method = Some(MethodMatch::parse("/demo.Greeter/SayHello").unwrap());
        let v = Verify { filter: Filter { method: method.clone(), ..filter() }, expect: Expect::Exactly(4) };
        let verdict = j.verify(&v);
        assert!(verdict.ok);
        assert_eq!((verdict.count, verdict.seqs.clone()), (4, vec![1, 2, 3, 4]));
        assert_eq!(verdict.to_json(&v.filter)["ok"], true);

        let f = Filter {
            method: method.clone(),
            body: Some(json!({"name": "Tom", "locale": {"language": "de"}})),
            ..filter()
        };
        let v = Verify { filter: f, expect: Expect::Between(1, u64::MAX) };
        let verdict = j.verify(&v);
        assert!(!verdict.ok);
        assert_eq!(verdict.count, 0);
        let out = verdict.to_json(&v.filter);
        assert_eq!(out["expected"], "at least 1");
        let closest = out["closest"].as_array().unwrap();
        assert_eq!(closest.len(), 3);
        // Both Tom calls differ only in the language; the newest first.
        assert_eq!(closest[0]["seq"], 3);
        assert_eq!(
            closest[0]["differences"],
            json!([{"at": "request.locale.language", "expected": "de", "actual": "en"}])
        );
        assert_eq!(closest[1]["seq"], 1);
        assert!(out["message"].as_str().unwrap().contains("found 0"), "{out}");

        let v = Verify { filter: Filter { method, ..filter() }, expect: Expect::Between(0, 2) };
        let verdict = j.verify(&v);
        assert!(!verdict.ok && verdict.closest.is_empty());
        assert_eq!(verdict.to_json(&v.filter)["expected"], "at most 2");

        let f = Filter { method: Some(MethodMatch::parse("demo.Greeter/Nope").unwrap()), ..filter() };
        let verdict = j.verify(&Verify { filter: f.clone(), expect: Expect::Exactly(1) });
        let out = verdict.to_json(&f);
        assert_eq!(out["closest"][0]["differences"][0]["at"], "method");
    }

    #[test]
    fn closest_rule_names_the_failing_condition_and_the_value_found() {
        let (_, all) = recorded();
        let c = all[2].to_json()["closest"].clone();
        assert_eq!(c["rule"], 1);
        assert_eq!(c["origin"], "rules/demo.yaml:10:9");
        assert_eq!((c["held"].clone(), c["total"].clone()), (json!(1), json!(2)));
        assert_eq!(c["failed"]["input"], "request.locale.language");
        assert_eq!(c["failed"]["operator"], "eq");
        assert_eq!(c["failed"]["expected"], "fr");
        assert_eq!(c["failed"]["actual"], "en");
        assert_eq!(c["reason"], "request.locale.language == \"fr\" does not hold: the request has \"en\"");

        let state = state(4);
        let at = |closest: Closest, metadata: &[(&str, &[u8])], message: Vec<u8>| {
            entry(&state, SAY_HELLO, metadata, vec![message], None, 5, Some(closest)).closest_json()
        };
        let c = at(Closest { rule: 0, failed: 0, held: 0 }, &[], hello("admin", 0, &[], None));
        assert_eq!(c["failed"]["input"], "metadata.x-role");
        assert_eq!(c["failed"]["actual"], Json::Null);
        assert_eq!(c["failed"]["present"], false);
        assert!(c["reason"].as_str().unwrap().ends_with("the request has no `x-role` metadata"), "{c}");
        let c = at(Closest { rule: 0, failed: 0, held: 0 }, &[("x-role", b"user")], hello("admin", 0, &[], None));
        assert_eq!(c["failed"]["actual"], "user");
        let c = at(Closest { rule: 2, failed: 0, held: 0 }, &[], hello("", 0, &[], None));
        assert_eq!(c["failed"]["text"], "request.age > 40");
        assert_eq!(c["reason"], "request.age > 40 does not hold: the field is not set (reads as 0)");
        let c = at(Closest { rule: 3, failed: 0, held: 0 }, &[], hello("", 0, &["x", "y"], None));
        assert_eq!(c["failed"]["actual"], json!(["x", "y"]));
        let c = at(Closest { rule: 3, failed: 1, held: 1 }, &[], hello("", 0, &["vip"], None));
        assert!(c["reason"].as_str().unwrap().contains("answers at most 1 calls"), "{c}");
        // Out-of-range indices and unreadable requests never panic.
        assert_eq!(at(Closest { rule: 9, failed: 0, held: 0 }, &[], vec![]), Json::Null);
        let c = at(Closest { rule: 2, failed: 0, held: 0 }, &[], vec![0x10]);
        assert!(c["reason"].as_str().unwrap().contains("could not be read"), "{c}");
    }

    #[test]
    fn conditions_render_readably() {
        let t = Test::Any(vec![Test::Op(Op::Eq(Value::I64(1))), Test::Not(Box::new(Test::Op(Op::Exists)))]);
        assert_eq!(render_test(&t), "any of (== 1) | (not (exists))");
        assert_eq!(render_test(&Test::Op(Op::Len(Box::new(Test::Op(Op::Gte(Value::U64(2))))))), "length >= 2");
        assert_eq!(
            render_test(&Test::Op(Op::In(vec![Value::Bytes(b"a".to_vec()), Value::Bytes(vec![0xff])]))),
            "in [\"a\", base64:/w==]"
        );
        assert_eq!(render_test(&Test::Op(Op::Prefix(b"ab".to_vec()))), "starts with \"ab\"");
        assert_eq!(render_test(&Test::Op(Op::Eq(Value::F64(f64::NAN)))), "== \"NaN\"");
    }

    #[test]
    fn encoders() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(4_102_444_799_999)), "2099-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(UNIX_EPOCH - Duration::from_millis(1)), "1969-12-31T23:59:59.999Z");
    }
}
#[cfg(test)]
mod overhead {
    /// README.md (`--journal-bytes`) and ARCHITECTURE.md state this figure.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn the_fixed_cost_per_entry_is_the_documented_one() {
        assert_eq!(super::ENTRY_OVERHEAD, 336);
        for doc in [include_str!("../../../README.md"), include_str!("../../../ARCHITECTURE.md")] {
            assert!(doc.contains("336 B") || doc.contains("336 bytes"), "a document states another figure");
        }
    }
}
