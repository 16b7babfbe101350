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

/// Appends a batch: numbers each view after the stream's last (even if the
/// counter was lost) and adds it, capping the stream near `ARGV[1]`
/// entries. Returns the last number given.
const APPEND: &str = "local n = #ARGV - 1 \
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1) \
  local floor = 0 \
  if #last > 0 then floor = tonumber(string.match(last[1][1], '^(%d+)')) end \
  local seq = tonumber(redis.call('INCRBY', KEYS[2], n)) \
  if seq - n < floor then seq = floor + n; redis.call('SET', KEYS[2], seq) end \
  for i = 1, n do \
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], (seq - n + i) .. '-0', 'j', ARGV[i + 1]) \
  end \
  return seq";

/// The shared journal's settings and state.
pub struct SharedJournal {
    client: redis::Client,
    stream: String,
    counter: String,
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
    cut: AtomicU64,
    up: AtomicBool,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

#[derive(Default)]
struct Queue {
    entries: VecDeque<(Arc<Entry>, usize)>,
    /// Bytes of the entries queued and of the views waiting for Redis.
    bytes: usize,
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
        capacity: capacity.max(1),
        replica: replica.to_string(),
        bytes_limit: AtomicUsize::new(journal.limits().bytes),
        queue: Mutex::default(),
        wake: Condvar::new(),
        append_script: redis::Script::new(APPEND),
        appended: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
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
            return;
        }
        q.bytes += size;
        q.entries.push_back((entry.clone(), size));
        drop(q);
        self.wake.notify_one();
    }

    /// The appending thread: takes what is queued, makes the views, appends
    /// them; on failure keeps them (within the bound) and tries again.
    fn run(&self) {
        let mut con: Option<redis::Connection> = None;
        // Views made and not yet appended, oldest first, with their sizes.
        let mut waiting: VecDeque<String> = VecDeque::new();
        loop {
            let taken: Vec<(Arc<Entry>, usize)> = {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                while q.entries.is_empty() && waiting.is_empty() {
                    q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                q.entries.drain(..).collect()
            };
            let mut made = 0usize;
            let mut freed = 0usize;
            for (e, size) in taken {
                let view = self.view_of(&e);
                made += view.len();
                freed += size;
                waiting.push_back(view);
            }
            {
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                q.bytes = q.bytes + made - freed;
                // Over the bound (views are larger than entries): the
                // oldest waiting views give way.
                while q.bytes > self.bytes_limit.load(Relaxed) && waiting.len() > 1 {
                    if let Some(v) = waiting.pop_front() {
                        q.bytes -= v.len();
                        self.dropped.fetch_add(1, Relaxed);
                    }
                }
            }
            while !waiting.is_empty() {
                match self.append(&mut con, &mut waiting) {
                    Ok(()) => self.set_up(None),
                    Err(e) => {
                        con = None;
                        self.set_up(Some(e));
                        std::thread::sleep(RETRY);
                        break;
                    }
                }
            }
        }
    }

    /// Appends the oldest waiting views, one batch.
    fn append(&self, con: &mut Option<redis::Connection>, waiting: &mut VecDeque<String>) -> Result<(), String> {
        if con.is_none() {
            *con = Some(self.connect()?);
        }
        let Some(c) = con.as_mut() else { return Err("no connection".into()) };
        let (mut n, mut bytes) = (0, 0);
        while n < waiting.len() && n < BATCH.0 && (n == 0 || bytes + waiting[n].len() <= BATCH.1) {
            bytes += waiting[n].len();
            n += 1;
        }
        let mut call = self.append_script.prepare_invoke();
        call.key(&self.stream).key(&self.counter).arg(self.capacity);
        for v in waiting.iter().take(n) {
            call.arg(v.as_str());
        }
        call.invoke::<u64>(c).map_err(|e| e.to_string())?;
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        for v in waiting.drain(..n) {
            q.bytes -= v.len();
        }
        self.appended.fetch_add(n as u64, Relaxed);
        Ok(())
    }

    fn connect(&self) -> Result<redis::Connection, String> {
        let con = self.client.get_connection_with_timeout(TIMEOUT).map_err(|e| e.to_string())?;
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
    /// apart, for filters) and whether no rule answered it.
    fn view_of(&self, e: &Entry) -> String {
        let mut v = e.to_json();
        if let Json::Object(o) = &mut v {
            o.remove("seq");
            o.remove("metadata");
            o.insert("replica".into(), json!(self.replica));
            o.insert("replica_seq".into(), json!(e.seq));
            let pairs: Vec<Json> =
                e.metadata.iter().map(|(k, v)| json!([k.as_ref(), journal::metadata_text(k, v)])).collect();
            o.insert("@metadata".into(), Json::Array(pairs));
            o.insert("@unmatched".into(), json!(e.unmatched()));
        }
        let text = v.to_string();
        let most = self.view_bytes();
        if text.len() <= most {
            return text;
        }
        self.cut.fetch_add(1, Relaxed);
        if let Json::Object(o) = &mut v {
            let had = o.remove("request").is_some() | o.remove("messages").is_some();
            if had {
                o.insert(
                    "request_omitted".into(),
                    json!(format!(
                        "the call's JSON view was {} bytes, more than the {} the shared journal keeps of a call; \
                         its replica's own journal (`?scope=local` there) has it",
                        text.len(),
                        most
                    )),
                );
            }
            if v.to_string().len() > most {
                if let Json::Object(o) = &mut v {
                    o.insert("@metadata".into(), json!([]));
                    o.insert("metadata_omitted".into(), json!(true));
                }
            }
        }
        v.to_string()
    }

    /// The largest view stored whole ([`VIEW_BYTES`]).
    fn view_bytes(&self) -> usize {
        (self.bytes_limit.load(Relaxed) / self.capacity).clamp(VIEW_BYTES.0, VIEW_BYTES.1)
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
                .map_err(|e| self.unreachable(&e.to_string()))?;
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
            high = last - 1;
        }
        Ok(())
    }

    /// How many calls the stream holds, and the last number given.
    pub fn size(&self) -> Result<(u64, u64), String> {
        let mut con = self.connect().map_err(|e| self.unreachable(&e))?;
        let len: u64 =
            redis::cmd("XLEN").arg(&self.stream).query(&mut con).map_err(|e| self.unreachable(&e.to_string()))?;
        let last: Option<u64> =
            redis::cmd("GET").arg(&self.counter).query(&mut con).map_err(|e| self.unreachable(&e.to_string()))?;
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
            .map_err(|e| self.unreachable(&e.to_string()))?;
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
        self.capacity
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
            "cut": self.cut.load(Relaxed),
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
                "@unmatched" | "seq" => {}
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
