//! The journal shared by replicas (`--shared-state redis://...` with
//! `--journal N`): every call this replica records is also appended to a
//! capped Redis stream, and the journal's routes (list, count, verify,
//! unmatched) read that stream, the union of every replica's calls.
//!
//! In Redis, under the prefix:
//!
//! ```text
//! PREFIX:journal       stream  SEQ-0 → j: the call's JSON view (+ replica, metadata pairs), capped (MAXLEN ~)
//! PREFIX:journal:seq   string  the last SEQ given
//! ```
//!
//! A call's number in the shared journal (`seq`) is given by Redis as it is
//! appended, so numbers grow in the order calls reach it, across replicas:
//! `since` never misses a call. Each call also shows the `replica` that
//! served it and its number there (`replica_seq`).
//!
//! Recording stays off Redis: the journal hands each entry to a queue
//! ([`SharedJournal::offer`]: one short lock), and a thread of its own makes
//! the JSON views and appends them in batches, one script per batch. The
//! queue and the views waiting for Redis are bounded together by
//! `--journal-bytes`; past it, calls are left out of the shared journal
//! (still in this replica's) and counted
//! (`wirestub_shared_journal_dropped_total`). A call's view is at most
//! `--journal-bytes` / the calls the stream keeps, from 4 to 64 KiB
//! ([`VIEW_BYTES`]): a larger one is stored without its request messages.
//!
//! Reads run on the admin API's blocking threads with a connection of their
//! own, newest first, [`CHUNK`] calls per round trip, keeping only what the
//! answer shows. While Redis cannot be reached they fail with a message
//! saying so (`?scope=local` reads this replica's own journal); calls
//! recorded meanwhile wait, within the bound, and are appended once it is
//! back.

use super::journal::{self, Call, Entry};
use serde_json::{json, Map, Value as Json};
use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// The bounds of the largest JSON view of one call the shared journal
/// stores whole: `--journal-bytes` shared by the calls the stream keeps,
/// within these (so the stream holds about `--journal-bytes` in Redis).
pub const VIEW_BYTES: (usize, usize) = (4 * 1024, 64 * 1024);
/// Calls read per round trip.
const CHUNK: usize = 64;
/// Most calls (and bytes) appended per script call.
const BATCH: (usize, usize) = (256, 1 << 20);
/// Longest a connection attempt or a command may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Waits between attempts to reach Redis after a failure.
const RETRY: Duration = Duration::from_secs(1);
/// Metadata values longer than this are the first to be cut from a view
/// too large to keep whole.
const METADATA_VALUE: usize = 256;

/// Appends a batch. KEYS: the stream, the counter, the hash of each
/// replica's last call appended. ARGV: the stream's cap, the replica, the
/// last number this replica saw, then (the call's number in the replica,
/// its view) pairs. A call at or below the replica's mark was appended
/// already (a batch sent again after a lost answer) and is skipped. Numbers
/// follow the stream's last, even if the counter was lost; when the counter
/// and the stream are both gone (Redis restarted empty) while a replica had
/// seen numbers, they go on from the clock (seconds × 10^6), above any
/// number given before. Returns the last number given.
const APPEND: &str = "local replica = ARGV[2] \
  local mark = tonumber(redis.call('HGET', KEYS[3], replica) or '0') \
  local keep = {} \
  local top = mark \
  for i = 4, #ARGV, 2 do \
    local rs = tonumber(ARGV[i]) \
    if rs > mark then keep[#keep + 1] = ARGV[i + 1]; if rs > top then top = rs end end \
  end \
  local counter = redis.call('GET', KEYS[2]) \
  local seq = 0 \
  if counter then seq = tonumber(counter) \
  elseif tonumber(ARGV[3]) > 0 then seq = tonumber(redis.call('TIME')[1]) * 1000000 end \
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1) \
  if #last > 0 then \
    local floor = tonumber(string.match(last[1][1], '^(%d+)')) \
    if floor > seq then seq = floor end \
  end \
  for i = 1, #keep do \
    redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], string.format('%d-0', seq + i), 'j', keep[i]) \
  end \
  seq = seq + #keep \
  redis.call('SET', KEYS[2], string.format('%d', seq)) \
  if top > mark then redis.call('HSET', KEYS[3], replica, string.format('%d', top)) end \
  return seq";

/// Longest a settled read waits for every replica to have appended what
/// it recorded before the read began.
pub const SETTLE: Duration = Duration::from_secs(2);
/// How long a settling read lets calls answered just before it be
/// recorded (the journal records a call as its answer goes out).
const SETTLE_GRACE: Duration = Duration::from_millis(25);
/// Longest a read of the stream may take in all.
const SCAN_DEADLINE: Duration = Duration::from_secs(10);
/// A replica not heard of for this long is gone (as `runtime::peers` says).
const GONE_AFTER_SECONDS: u64 = 10;

/// The shared journal's settings and state.
pub struct SharedJournal {
    client: redis::Client,
    stream: String,
    counter: String,
    /// Hash: replica → its last call appended.
    marks: String,
    /// Hash of the replicas' heartbeats (`runtime::peers`).
    replicas: String,
    /// The channel settling reads are announced on.
    channel: String,
    /// `PREFIX:journal:acks:` + a read's nonce: hash replica → calls it
    /// left out.
    acks: String,
    /// Calls the stream keeps (about: Redis trims in whole nodes).
    capacity: usize,
    replica: String,
    /// Bytes the queue and the views waiting for Redis may hold: the
    /// journal's limit, as last recorded.
    bytes_limit: AtomicUsize,
    queue: Mutex<Queue>,
    wake: Condvar,
    append_script: redis::Script,
    appended: AtomicU64,
    dropped: AtomicU64,
    /// Calls left out since the shared journal was last emptied.
    left_out: AtomicU64,
    /// The highest number this replica saw Redis give.
    last_seen: AtomicU64,
    cut: AtomicU64,
    up: AtomicBool,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    /// Bytes of the entries queued and of the views waiting for Redis.
    bytes: usize,
}

/// What the appending thread is handed.
enum Item {
    /// A recorded call, with the bytes it counts for.
    Call(Arc<Entry>, usize),
    /// A settling read's request: answer once every call queued before it
    /// is appended (or left out); `reset` starts the count of calls left
    /// out again.
    Settle { nonce: String, reset: bool },
}

static SHARED: OnceLock<SharedJournal> = OnceLock::new();

/// The shared journal, when there is one.
pub fn get() -> Option<&'static SharedJournal> {
    SHARED.get()
}

/// Shares `journal`'s calls from now on (once, before serving): `prefix`
/// names the keys, `capacity` caps the stream, `replica` names this one.
pub fn start(
    journal: &journal::Journal,
    client: redis::Client,
    prefix: &str,
    capacity: usize,
    replica: &str,
) -> Result<(), String> {
    let shared = SharedJournal {
        client,
        stream: format!("{prefix}:journal"),
        counter: format!("{prefix}:journal:seq"),
        marks: format!("{prefix}:journal:marks"),
        replicas: format!("{prefix}:replicas"),
        channel: format!("{prefix}:changes"),
        acks: format!("{prefix}:journal:acks:"),
        capacity: capacity.max(1),
        replica: replica.to_string(),
        bytes_limit: AtomicUsize::new(journal.limits().bytes),
        queue: Mutex::default(),
        wake: Condvar::new(),
        append_script: redis::Script::new(APPEND),
        appended: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        left_out: AtomicU64::new(0),
        last_seen: AtomicU64::new(0),
        cut: AtomicU64::new(0),
        up: AtomicBool::new(false),
        errors: AtomicU64::new(0),
        last_error: Mutex::new(None),
    };
    if SHARED.set(shared).is_err() {
        return Err("the shared journal is started twice".into());
    }
    let shared = SHARED.get().ok_or("the shared journal is not set")?;
    std::thread::Builder::new()
        .name("wirestub-journal".into())
        .spawn(move || shared.run())
        .map_err(|e| format!("cannot start the shared journal's thread: {e}"))?;
    journal.tap(Box::new(move |e, limit| shared.offer(e, limit)));
    Ok(())
}

impl SharedJournal {
    /// Queues a recorded call for Redis, or counts it as dropped when the
    /// queue would hold more than `limit` bytes.
    pub fn offer(&self, entry: &Arc<Entry>, limit: usize) {
        let size = entry.bytes();
        self.bytes_limit.store(limit, Relaxed);
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.bytes + size > limit {
            drop(q);
            self.dropped.fetch_add(1, Relaxed);
            self.left_out.fetch_add(1, Relaxed);
            return;
        }
        q.bytes += size;
        q.items.push_back(Item::Call(entry.clone(), size));
        drop(q);
        self.wake.notify_one();
    }

    /// A settling read asks (through the channel `runtime::peers`
    /// follows): answers once what was queued before is appended.
    pub fn settle_request(&self, nonce: &str, reset: bool) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        // A flood of requests would only repeat one another: a few wait.
        if q.items.iter().filter(|i| matches!(i, Item::Settle { .. })).count() >= 64 {
            return;
        }
        q.items.push_back(Item::Settle { nonce: nonce.chars().take(64).collect(), reset });
        drop(q);
        self.wake.notify_one();
    }

    /// The appending thread: takes what is queued, makes the views, appends
    /// them, answers settling reads; on failure keeps the views (within the
    /// bound) and tries again.
    fn run(&self) {
        let mut con: Option<redis::Connection> = None;
        // Views made and not yet appended, oldest first, with the call's
        // number in this replica.
        let mut waiting: VecDeque<(u64, String)> = VecDeque::new();
        // Settling reads to answer once `waiting` is empty, and whether
        // they waited for calls being recorded.
        let mut settles: Vec<(String, bool)> = Vec::new();
        let mut graced = false;
        // Say whether Redis is there from the start.
        match self.connect() {
            Ok(c) => {
                con = Some(c);
                self.set_up(None);
            }
            Err(e) => self.set_up(Some(e)),
        }
        loop {
            let taken: Vec<Item> = {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                while q.items.is_empty() && waiting.is_empty() && settles.is_empty() {
                    q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                q.items.drain(..).collect()
            };
            let mut made = 0usize;
            let mut freed = 0usize;
            for item in taken {
                match item {
                    Item::Call(e, size) => {
                        freed += size;
                        // A view that cannot be made is left out, not the thread.
                        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.view_of(&e))) {
                            Ok(view) => {
                                made += view.len();
                                waiting.push_back((e.seq, view));
                            }
                            Err(_) => {
                                self.dropped.fetch_add(1, Relaxed);
                                self.left_out.fetch_add(1, Relaxed);
                            }
                        }
                    }
                    Item::Settle { nonce, reset } => settles.push((nonce, reset)),
                }
            }
            {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                q.bytes = q.bytes + made - freed;
                // Over the bound (views are larger than entries): the
                // oldest waiting views give way.
                while q.bytes > self.bytes_limit.load(Relaxed) && waiting.len() > 1 {
                    if let Some((_, v)) = waiting.pop_front() {
                        q.bytes -= v.len();
                        self.dropped.fetch_add(1, Relaxed);
                        self.left_out.fetch_add(1, Relaxed);
                    }
                }
            }
            let mut failed = false;
            while !waiting.is_empty() {
                // A connection Redis closed (it restarted) is made again
                // once before the failure counts.
                let mut result = self.append(&mut con, &mut waiting);
                if result.is_err() {
                    con = None;
                    result = self.append(&mut con, &mut waiting);
                }
                match result {
                    Ok(()) => self.set_up(None),
                    Err(e) => {
                        con = None;
                        self.set_up(Some(e));
                        failed = true;
                        break;
                    }
                }
            }
            if !failed && !settles.is_empty() && !graced {
                // A call's answer may reach its client an instant before
                // the call is recorded: let those land, then answer.
                std::thread::sleep(SETTLE_GRACE);
                graced = true;
                continue;
            }
            if !failed && !settles.is_empty() {
                graced = false;
                if let Err(e) = self.answer_settles(&mut con, &settles) {
                    con = None;
                    self.set_up(Some(e));
                    failed = true;
                } else {
                    settles.clear();
                }
            }
            if failed {
                std::thread::sleep(RETRY);
            }
        }
    }

    /// Appends the oldest waiting views, one batch.
    fn append(&self, con: &mut Option<redis::Connection>, waiting: &mut VecDeque<(u64, String)>) -> Result<(), String> {
        if con.is_none() {
            *con = Some(self.connect()?);
        }
        let Some(c) = con.as_mut() else { return Err("no connection".into()) };
        let (mut n, mut bytes) = (0, 0);
        while n < waiting.len() && n < BATCH.0 && (n == 0 || bytes + waiting[n].1.len() <= BATCH.1) {
            bytes += waiting[n].1.len();
            n += 1;
        }
        let mut call = self.append_script.prepare_invoke();
        call.key(&self.stream).key(&self.counter).key(&self.marks);
        call.arg(self.stream_cap()).arg(&self.replica).arg(self.last_seen.load(Relaxed));
        for (seq, v) in waiting.iter().take(n) {
            call.arg(*seq).arg(v.as_str());
        }
        let last: u64 = call.invoke(c).map_err(|e| redis_error(&e))?;
        self.last_seen.fetch_max(last, Relaxed);
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        for (_, v) in waiting.drain(..n) {
            q.bytes -= v.len();
        }
        self.appended.fetch_add(n as u64, Relaxed);
        Ok(())
    }

    /// Tells the settling reads that what was queued before them is in
    /// Redis, with the calls left out.
    fn answer_settles(&self, con: &mut Option<redis::Connection>, settles: &[(String, bool)]) -> Result<(), String> {
        if con.is_none() {
            *con = Some(self.connect()?);
        }
        let Some(c) = con.as_mut() else { return Err("no connection".into()) };
        let mut pipe = redis::pipe();
        for (nonce, reset) in settles {
            let left_out = match reset {
                true => self.left_out.swap(0, Relaxed),
                false => self.left_out.load(Relaxed),
            };
            let key = format!("{}{nonce}", self.acks);
            pipe.cmd("HSET").arg(&key).arg(&self.replica).arg(left_out).ignore();
            pipe.cmd("EXPIRE").arg(&key).arg(60).ignore();
        }
        pipe.query::<()>(c).map_err(|e| redis_error(&e))
    }

    /// The calls the stream keeps: `--shared-journal`, and no more than
    /// `--journal-bytes` holds at the smallest view kept whole.
    fn stream_cap(&self) -> usize {
        self.capacity.min(self.bytes_limit.load(Relaxed) / VIEW_BYTES.0).max(1)
    }

    fn connect(&self) -> Result<redis::Connection, String> {
        let con = self.client.get_connection_with_timeout(TIMEOUT).map_err(|e| redis_error(&e))?;
        con.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
        con.set_write_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
        Ok(con)
    }

    fn set_up(&self, error: Option<String>) {
        let was = self.up.swap(error.is_none(), Relaxed);
        match error {
            None if !was => tracing::info!("shared journal: appending to Redis"),
            None => {}
            Some(e) => {
                if was {
                    tracing::warn!(error = %e, "shared journal: Redis unreachable; calls wait here (within \
                                   --journal-bytes) and are appended once it is back");
                }
                self.errors.fetch_add(1, Relaxed);
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            }
        }
    }

    /// The JSON a call is stored as: its view, without `seq` (Redis gives
    /// it), with the replica, the metadata as pairs (repeated keys kept
    /// apart, for filters) and whether no rule answered it. A view larger
    /// than [`Self::view_bytes`] loses, in turn and until it fits: long
    /// metadata values (cut, `@metadata_cut`), the request messages
    /// (`@omitted`), the metadata but the session's; what is left out is
    /// listed, so that a filter on it is known to be undecided.
    fn view_of(&self, e: &Entry) -> String {
        let mut v = e.to_json();
        let Json::Object(o) = &mut v else { return v.to_string() };
        o.remove("seq");
        o.remove("metadata");
        o.insert("replica".into(), json!(self.replica));
        o.insert("replica_seq".into(), json!(e.seq));
        let pairs: Vec<(String, String)> =
            e.metadata.iter().map(|(k, v)| (k.to_string(), journal::metadata_text(k, v))).collect();
        o.insert("@metadata".into(), pairs_json(&pairs));
        o.insert("@unmatched".into(), json!(e.unmatched()));
        let most = self.view_bytes();
        let mut text = v.to_string();
        if text.len() <= most {
            return text;
        }
        self.cut.fetch_add(1, Relaxed);
        let whole = text.len();
        let Json::Object(o) = &mut v else { return text };
        let session = |k: &str| k == wirestub_plan::SESSION_KEY || k == wirestub_plan::SESSION_ALIAS;
        // 1. Long metadata values, cut.
        if pairs.iter().any(|(k, v)| v.len() > METADATA_VALUE && !session(k)) {
            let cut: Vec<(String, String)> = pairs
                .iter()
                .map(|(k, v)| match v.len() > METADATA_VALUE && !session(k) {
                    true => (k.clone(), format!("{}…", v.chars().take(METADATA_VALUE / 4).collect::<String>())),
                    false => (k.clone(), v.clone()),
                })
                .collect();
            o.insert("@metadata".into(), pairs_json(&cut));
            o.insert("@metadata_cut".into(), json!(true));
            text = v.to_string();
            if text.len() <= most {
                return text;
            }
        }
        let Json::Object(o) = &mut v else { return text };
        let mut omitted = Vec::new();
        // 2. The request messages.
        if o.remove("request").is_some() | o.remove("messages").is_some() {
            omitted.push("request");
            o.insert(
                "request_omitted".into(),
                json!(format!(
                    "the call's JSON view was {whole} bytes, more than the {most} the shared journal keeps of a \
                     call; its replica's own journal (`scope=local` there) has it"
                )),
            );
            o.insert("@omitted".into(), json!(omitted));
            text = v.to_string();
            if text.len() <= most {
                return text;
            }
        }
        // 3. The metadata, but the session's.
        let Json::Object(o) = &mut v else { return text };
        let kept: Vec<(String, String)> = pairs.iter().filter(|(k, _)| session(k)).cloned().collect();
        o.insert("@metadata".into(), pairs_json(&kept));
        o.remove("@metadata_cut");
        omitted.push("metadata");
        o.insert("@omitted".into(), json!(omitted));
        text = v.to_string();
        if text.len() <= most {
            return text;
        }
        // 4. What identifies the call, and nothing else.
        let Json::Object(o) = &mut v else { return text };
        let keep =
            ["method", "time", "protocol", "status", "latency_ms", "generation", "rule", "replica", "replica_seq"];
        o.retain(|k, _| keep.contains(&k.as_str()) || k.starts_with('@'));
        o.insert("@metadata".into(), json!([]));
        o.insert("@omitted".into(), json!(["request", "metadata", "details"]));
        v.to_string()
    }

    /// The largest view stored whole ([`VIEW_BYTES`]).
    fn view_bytes(&self) -> usize {
        (self.bytes_limit.load(Relaxed) / self.stream_cap()).clamp(VIEW_BYTES.0, VIEW_BYTES.1)
    }

    /// Visits the shared calls newest first, within `since` and `before`
    /// (exclusive), until `visit` returns false.
    pub fn each(
        &self,
        since: Option<u64>,
        before: Option<u64>,
        mut visit: impl FnMut(SharedCall) -> bool,
    ) -> Result<(), String> {
        let mut con = self.connect().map_err(|e| self.unreachable(&e))?;
        let deadline = std::time::Instant::now() + SCAN_DEADLINE;
        let low = since.map_or(1, |s| s.saturating_add(1));
        let mut high = match before {
            Some(0) | Some(1) => return Ok(()),
            Some(b) => b - 1,
            None => u64::MAX,
        };
        while high >= low {
            let end = if high == u64::MAX { "+".to_string() } else { format!("{high}-0") };
            let chunk: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
                .arg(&self.stream)
                .arg(end)
                .arg(format!("{low}-0"))
                .arg("COUNT")
                .arg(CHUNK)
                .query(&mut con)
                .map_err(|e| self.unreachable(&redis_error(&e)))?;
            let Some(last) = chunk.last().and_then(|(id, _)| seq_of(id)) else { return Ok(()) };
            for (id, fields) in chunk {
                let Some(seq) = seq_of(&id) else { continue };
                let Some((_, text)) = fields.into_iter().find(|(k, _)| k == "j") else { continue };
                let Some(call) = SharedCall::from_stored(seq, &text) else { continue };
                if !visit(call) {
                    return Ok(());
                }
            }
            if last <= low {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "reading the shared journal took more than {} s; narrow the read with since or before",
                    SCAN_DEADLINE.as_secs()
                ));
            }
            high = last - 1;
        }
        Ok(())
    }

    /// Asks every replica sharing the journal to append what it recorded
    /// so far, and waits (at most [`SETTLE`]) until each says it has: what
    /// a count or a verification reads next has every call made before it
    /// began, or says which replicas may lack some. `reset` also starts
    /// their counts of calls left out again (the journal is emptied).
    pub fn settle(&self, reset: bool) -> Result<Settled, String> {
        let mut con = self.connect().map_err(|e| self.unreachable(&e))?;
        let fail = |e: redis::RedisError| self.unreachable(&redis_error(&e));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let beats: Vec<(String, String)> = redis::cmd("HGETALL").arg(&self.replicas).query(&mut con).map_err(fail)?;
        let mut expected: Vec<String> = beats
            .into_iter()
            .filter_map(|(id, text)| {
                let v: Json = serde_json::from_str(&text).ok()?;
                let fresh = now.saturating_sub(v.get("at")?.as_u64()?) <= GONE_AFTER_SECONDS;
                (fresh && v.get("shared_journal") == Some(&Json::Bool(true))).then_some(id)
            })
            .collect();
        if !expected.contains(&self.replica) {
            expected.push(self.replica.clone());
        }
        let nonce = crate::rng::unique_hex();
        let kind = if reset { "journal-reset" } else { "journal-settle" };
        redis::cmd("PUBLISH").arg(&self.channel).arg(format!("{kind}:{nonce}")).query::<u64>(&mut con).map_err(fail)?;
        // This replica's own calls, without waiting for its subscription
        // (which may still be coming back after an outage).
        self.settle_request(&nonce, reset);
        let key = format!("{}{nonce}", self.acks);
        let until = std::time::Instant::now() + SETTLE;
        loop {
            let acks: Vec<(String, u64)> = redis::cmd("HGETALL").arg(&key).query(&mut con).map_err(fail)?;
            let missing: Vec<String> =
                expected.iter().filter(|r| !acks.iter().any(|(a, _)| a == *r)).cloned().collect();
            if missing.is_empty() || std::time::Instant::now() > until {
                let left_out = acks.iter().map(|(_, n)| n).sum();
                let _ = redis::cmd("DEL").arg(&key).query::<u64>(&mut con);
                return Ok(Settled { missing, left_out });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// How many calls the stream holds, and the last number given.
    pub fn size(&self) -> Result<(u64, u64), String> {
        let mut con = self.connect().map_err(|e| self.unreachable(&e))?;
        let len: u64 =
            redis::cmd("XLEN").arg(&self.stream).query(&mut con).map_err(|e| self.unreachable(&redis_error(&e)))?;
        let last: Option<u64> =
            redis::cmd("GET").arg(&self.counter).query(&mut con).map_err(|e| self.unreachable(&redis_error(&e)))?;
        Ok((len, last.unwrap_or(0)))
    }

    /// Forgets every shared call (numbers go on); returns how many there
    /// were.
    pub fn reset(&self) -> Result<u64, String> {
        let mut con = self.connect().map_err(|e| self.unreachable(&e))?;
        let (len, _): (u64, u64) = redis::pipe()
            .atomic()
            .cmd("XLEN")
            .arg(&self.stream)
            .cmd("DEL")
            .arg(&self.stream)
            .query(&mut con)
            .map_err(|e| self.unreachable(&redis_error(&e)))?;
        Ok(len)
    }

    fn unreachable(&self, e: &str) -> String {
        format!(
            "the shared journal cannot be read: Redis: {e}. `scope=local` reads this replica's own journal \
             (in the query, or in the body of a verification)"
        )
    }

    /// The calls the stream keeps.
    pub fn capacity(&self) -> usize {
        self.stream_cap()
    }

    /// What `/admin/status` shows under `journal.shared`.
    pub fn status(&self) -> Json {
        let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        json!({
            "stream": self.stream,
            "capacity": self.capacity,
            "replica": self.replica,
            "up": self.up.load(Relaxed),
            "appended": self.appended.load(Relaxed),
            "dropped": self.dropped.load(Relaxed),
            "left_out": self.left_out.load(Relaxed),
            "cut": self.cut.load(Relaxed),
            "stream_capacity": self.stream_cap(),
            "waiting_bytes": q.bytes,
            "bytes_limit": self.bytes_limit.load(Relaxed),
            "view_bytes": self.view_bytes(),
            "errors": self.errors.load(Relaxed),
            "last_error": *self.last_error.lock().unwrap_or_else(|e| e.into_inner()),
        })
    }

    /// Its metrics, in Prometheus text.
    pub fn render_metrics(&self) -> String {
        let waiting = self.queue.lock().map(|q| q.bytes).unwrap_or(0);
        format!(
            "# HELP wirestub_shared_journal_appended_total Calls appended to the shared journal in Redis.\n\
             # TYPE wirestub_shared_journal_appended_total counter\n\
             wirestub_shared_journal_appended_total {}\n\
             # HELP wirestub_shared_journal_dropped_total Calls left out of the shared journal: more waited for \
             Redis than --journal-bytes.\n\
             # TYPE wirestub_shared_journal_dropped_total counter\n\
             wirestub_shared_journal_dropped_total {}\n\
             # HELP wirestub_shared_journal_waiting_bytes Bytes of calls waiting to be appended to the shared \
             journal.\n\
             # TYPE wirestub_shared_journal_waiting_bytes gauge\n\
             wirestub_shared_journal_waiting_bytes {}\n",
            self.appended.load(Relaxed),
            self.dropped.load(Relaxed),
            waiting
        )
    }
}

/// What [`SharedJournal::settle`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settled {
    /// Replicas that did not say, within [`SETTLE`], that their calls are
    /// in.
    pub missing: Vec<String>,
    /// Calls the replicas left out since the journal was last emptied
    /// (Redis away while more than `--journal-bytes` waited).
    pub left_out: u64,
}

impl Settled {
    /// Why the shared journal may lack calls made before the read, if it may.
    pub fn gap(&self) -> Option<String> {
        let mut why = Vec::new();
        if !self.missing.is_empty() {
            why.push(format!(
                "replica(s) {} did not confirm within {} s that their calls are in the shared journal",
                self.missing.join(", "),
                SETTLE.as_secs()
            ));
        }
        if self.left_out > 0 {
            why.push(format!(
                "{} call(s) were left out of it while Redis was away (more than --journal-bytes waited; DELETE \
                 /admin/journal starts again)",
                self.left_out
            ));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// A Redis error, a timeout said as one.
fn redis_error(e: &redis::RedisError) -> String {
    if e.is_timeout() {
        return format!("Redis did not answer within {} s", TIMEOUT.as_secs());
    }
    e.to_string()
}

/// Metadata pairs as stored: `[[key, value], ...]`.
fn pairs_json(pairs: &[(String, String)]) -> Json {
    Json::Array(pairs.iter().map(|(k, v)| json!([k, v])).collect())
}

/// The number in a stream id `SEQ-0`.
fn seq_of(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

/// A call read back from the shared journal.
#[derive(Clone)]
pub struct SharedCall {
    pub seq: u64,
    doc: Map<String, Json>,
}

impl SharedCall {
    /// Whether `part` (`request`, `metadata`) was left out of the stored
    /// view, or cut (`metadata`), so that a filter on it cannot tell.
    pub fn lacks(&self, part: &str) -> bool {
        let omitted = self
            .doc
            .get("@omitted")
            .and_then(Json::as_array)
            .is_some_and(|l| l.iter().any(|p| p.as_str() == Some(part)));
        omitted || (part == "metadata" && self.doc.get("@metadata_cut") == Some(&Json::Bool(true)))
    }

    /// A call as stored (a JSON object), numbered `seq`; None when the text
    /// is not an object (a stream written by something else).
    pub fn from_stored(seq: u64, text: &str) -> Option<SharedCall> {
        match serde_json::from_str::<Json>(text) {
            Ok(Json::Object(doc)) => Some(SharedCall { seq, doc }),
            _ => None,
        }
    }

    /// The call as the journal's routes show it: `seq` first, the metadata
    /// as an object (as in a replica's own journal), the stored pairs and
    /// marks left out.
    pub fn view(&self) -> Json {
        let mut out = Map::new();
        out.insert("seq".into(), json!(self.seq));
        for (k, v) in &self.doc {
            match k.as_str() {
                "@metadata" => {
                    out.insert("metadata".into(), metadata_object(v));
                }
                // The number is the stream's, whatever the text says.
                "@unmatched" | "seq" | "@metadata_cut" => {}
                "@omitted" => {
                    out.insert("omitted".into(), v.clone());
                }
                _ => {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
        Json::Object(out)
    }
}

/// Metadata pairs as the journal's object: repeated keys joined with `, `.
fn metadata_object(pairs: &Json) -> Json {
    let mut map = Map::new();
    for pair in pairs.as_array().map(Vec::as_slice).unwrap_or_default() {
        let (Some(k), Some(v)) = (pair.get(0).and_then(Json::as_str), pair.get(1).and_then(Json::as_str)) else {
            continue;
        };
        match map.get_mut(k) {
            Some(Json::String(s)) => {
                s.push_str(", ");
                s.push_str(v);
            }
            _ => {
                map.insert(k.to_string(), json!(v));
            }
        }
    }
    Json::Object(map)
}

impl Call for SharedCall {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn path(&self) -> &str {
        self.doc.get("method").and_then(Json::as_str).unwrap_or("")
    }
    fn status(&self) -> u8 {
        self.doc.get("status").and_then(|s| s.get("code")).and_then(Json::as_u64).unwrap_or(2) as u8
    }
    fn answered(&self) -> bool {
        self.doc.get("rule").is_some_and(|r| !r.is_null())
    }
    fn unmatched(&self) -> bool {
        self.doc.get("@unmatched").and_then(Json::as_bool).unwrap_or(false)
    }
    fn metadata_values(&self, key: &str) -> Vec<String> {
        let pairs = self.doc.get("@metadata").and_then(Json::as_array).map(Vec::as_slice).unwrap_or_default();
        pairs
            .iter()
            .filter(|p| p.get(0).and_then(Json::as_str).is_some_and(|k| k.eq_ignore_ascii_case(key)))
            .filter_map(|p| p.get(1).and_then(Json::as_str).map(str::to_string))
            .collect()
    }
    fn session(&self) -> Option<String> {
        self.metadata_values(wirestub_plan::SESSION_KEY)
            .into_iter()
            .next()
            .or_else(|| self.metadata_values(wirestub_plan::SESSION_ALIAS).into_iter().next())
    }
    fn rule_origin(&self) -> Option<&str> {
        self.doc.get("rule")?.get("origin")?.as_str()
    }
    fn requests(&self) -> Vec<Cow<'_, Json>> {
        match (self.doc.get("request"), self.doc.get("messages")) {
            (Some(Json::Null), _) | (None, None) => Vec::new(),
            (Some(r), _) => vec![Cow::Borrowed(r)],
            (None, Some(Json::Array(list))) => list.iter().map(Cow::Borrowed).collect(),
            (None, Some(_)) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(doc: Json) -> SharedCall {
        let Json::Object(doc) = doc else { panic!("not an object") };
        SharedCall { seq: 7, doc }
    }

    #[test]
    fn stored_views_are_read_as_calls() {
        let c = call(json!({
            "method": "/a.B/C",
            "status": {"code": 5, "name": "NOT_FOUND"},
            "rule": {"index": 0, "origin": "rules/a.yaml:3:5"},
            "request": {"name": "Tom"},
            "@metadata": [["x-wirestub-session", "s1"], ["k", "1"], ["k", "2"]],
            "@unmatched": false,
            "replica": "r1",
        }));
        assert_eq!((c.path(), c.status(), c.answered(), c.unmatched()), ("/a.B/C", 5, true, false));
        assert_eq!(c.metadata_values("K"), ["1", "2"]);
        assert_eq!(c.session().as_deref(), Some("s1"));
        assert_eq!(c.rule_origin(), Some("rules/a.yaml:3:5"));
        assert_eq!(c.requests().len(), 1);
        let v = c.view();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["metadata"], json!({"x-wirestub-session": "s1", "k": "1, 2"}));
        assert!(v.get("@metadata").is_none() && v.get("@unmatched").is_none());
        let filter = journal::Filter {
            metadata: vec![("k".into(), "2".into())],
            body: Some(json!({"name": "Tom"})),
            session: Some("s1".into()),
            rule: Some("a.yaml".into()),
            ..Default::default()
        };
        assert!(filter.matches(&c));
        let other = journal::Filter { body: Some(json!({"name": "Ann"})), ..Default::default() };
        assert!(!other.matches(&c));
        assert_eq!(other.differences(&c)[0].at, "request.name");
    }

    #[test]
    fn streams_of_messages_and_misses() {
        let c = call(json!({
            "method": "/a.B/D",
            "status": {"code": 12},
            "rule": null,
            "messages": [{"n": 1}, {"n": 2}],
            "@metadata": [],
            "@unmatched": true,
        }));
        assert!(!c.answered() && c.unmatched());
        assert_eq!(c.requests().len(), 2);
        assert!(journal::Filter { body: Some(json!({"n": 2})), ..Default::default() }.matches(&c));
        assert_eq!(c.session(), None);
    }

    #[test]
    fn stream_ids_give_their_number() {
        assert_eq!(seq_of("42-0"), Some(42));
        assert_eq!(seq_of("x-0"), None);
    }
}
