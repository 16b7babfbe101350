//! `times` limits and sequences counted across replicas, in Redis
//! (`engine run --shared-state redis://...`): a call whose selection
//! reaches rules limited by `times` claims its count there, in one round
//! trip, so `times: 1` answers once across every replica.
//!
//! Only calls that reach such rules pay for it: the matcher sets those
//! rules aside while it selects (`matcher::Request::defer_claims`), and
//! the caller awaits [`claim`], which runs one script over the rules set
//! aside, in order: the first whose count is still under its limit
//! answers, else the first unlimited rule that held (or none). Each worker
//! thread keeps its own multiplexed connection, made on its first claim.
//!
//! Counts are keys `PREFIX:times:/pkg.Svc/Method:ANSWER[:SESSION]`, where
//! ANSWER names what the response answers (`ServedMethod::shared_keys`):
//! replicas whose plans differ elsewhere, or were compiled from other
//! directories, count a response together, and a reload or a runtime change
//! that leaves it unchanged counts on, as without shared state. They are
//! kept for a day after their last claim, or until [`reset`].
//!
//! Serving never waits on Redis for long: a claim that does not come back
//! within `--shared-state-timeout-ms` (or cannot be sent) fails, the
//! worker leaves Redis alone for a second, and the policy
//! (`--shared-state-policy`) decides: `local` counts the call in this
//! process, as without shared state, and adds it to Redis once it is back;
//! `refuse` answers UNAVAILABLE. Either way a log line says when Redis goes
//! and comes back, and `/metrics` counts the claims of each kind.

use redis::aio::MultiplexedConnection;
use smallvec::SmallVec;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What to do with a limited call while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Count it here and add it to Redis once it is back.
    Local,
    /// Answer UNAVAILABLE.
    Refuse,
}

/// The shared counts' settings.
pub struct Settings {
    pub client: redis::Client,
    pub prefix: String,
    pub policy: Policy,
    pub timeout: Duration,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Counts `times` in Redis from now on (set once, before serving).
pub fn configure(settings: Settings) {
    let _ = SETTINGS.set(settings);
}

/// Whether `times` are counted in Redis.
#[inline]
pub fn enabled() -> bool {
    SETTINGS.get().is_some()
}

/// How long a worker leaves Redis alone after a claim failed.
const BACK_OFF: Duration = Duration::from_secs(1);
/// Seconds a count is kept after its last claim.
const KEEP_SECONDS: u64 = 24 * 3600;
/// Most counts made locally while Redis was away that wait to be added to
/// it; calls past it are counted here only.
const MAX_WAITING_COUNTS: usize = 65_536;

/// One candidate a call's claim may take: a rule whose response is
/// limited, its response and its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub rule: u32,
    pub response: u32,
    pub times: u32,
}

/// What a call must claim before it is answered.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The names of the method's responses' counts
    /// (`ServedMethod::shared_keys`), by response.
    pub names: Arc<[Arc<str>]>,
    /// Limited rules that held, in evaluation order.
    pub candidates: SmallVec<[Candidate; 2]>,
    /// The first unlimited rule that held after them, if any.
    pub fallback: Option<u32>,
    /// The call's test session, counted apart.
    pub session: Option<Box<[u8]>>,
}

impl Claim {
    fn key(&self, prefix: &str, c: &Candidate) -> String {
        let name = self.names.get(c.response as usize).map_or("?", |n| n);
        let mut key = format!("{prefix}:times:{name}");
        if let Some(s) = &self.session {
            key.push(':');
            for b in s.iter() {
                let _ = write!(key, "{b:02x}");
            }
        }
        key
    }
}

/// Claims one call: the rule that answers it (a candidate whose count was
/// still under its limit, else the fallback), or Err(message) under the
/// `refuse` policy while Redis cannot be reached. `local` claims a
/// response in this process's counts (the `local` policy's fallback).
pub async fn claim(c: &Claim, local: impl Fn(u32) -> bool) -> Result<Option<u32>, String> {
    let Some(settings) = SETTINGS.get() else { return Ok(local_choice(c, &local)) };
    match claim_in_redis(settings, c).await {
        Ok(0) => {
            CLAIMS_SHARED.fetch_add(1, Relaxed);
            Ok(c.fallback)
        }
        Ok(i) => {
            CLAIMS_SHARED.fetch_add(1, Relaxed);
            Ok(c.candidates.get(i as usize - 1).map(|x| x.rule).or(c.fallback))
        }
        Err(e) => {
            went_down(&e);
            match settings.policy {
                Policy::Refuse => {
                    CLAIMS_REFUSED.fetch_add(1, Relaxed);
                    Err(format!(
                        "the shared state is unreachable ({e}); rules limited by `times` are refused meanwhile \
                         (--shared-state-policy refuse)"
                    ))
                }
                Policy::Local => {
                    CLAIMS_LOCAL.fetch_add(1, Relaxed);
                    let chosen = local_choice(c, &local);
                    if let Some(x) = c.candidates.iter().find(|x| Some(x.rule) == chosen) {
                        waiting_count(c.key(&settings.prefix, x));
                    }
                    Ok(chosen)
                }
            }
        }
    }
}

/// The candidates claimed in this process's counts, in order.
fn local_choice(c: &Claim, local: &impl Fn(u32) -> bool) -> Option<u32> {
    c.candidates.iter().find(|x| local(x.response)).map(|x| x.rule).or(c.fallback)
}

/// INCR each key in turn until one is within its limit: its position from
/// 1, or 0 when all are used up. A key's first claim gives it its lifetime,
/// every claim renews it.
const SCRIPT: &str = "for i, key in ipairs(KEYS) do \
    local n = redis.call('INCR', key) \
    redis.call('EXPIRE', key, ARGV[#KEYS + 1]) \
    if n <= tonumber(ARGV[i]) then return i end \
  end \
  return 0";

static CLAIM_SCRIPT: OnceLock<redis::Script> = OnceLock::new();

thread_local! {
    /// This worker's connection, made on its first claim.
    static CONNECTION: RefCell<Option<MultiplexedConnection>> = const { RefCell::new(None) };
    /// Until when this worker leaves Redis alone after a failure.
    static RESTING: Cell<Option<Instant>> = const { Cell::new(None) };
}

async fn claim_in_redis(settings: &Settings, c: &Claim) -> Result<i64, String> {
    if RESTING.get().is_some_and(|t| Instant::now() < t) {
        return Err("Redis failed a moment ago".into());
    }
    let result = tokio::time::timeout(settings.timeout, async {
        let mut con = connection(settings).await?;
        // EVALSHA, the script loaded once per Redis (again after a restart).
        let script = CLAIM_SCRIPT.get_or_init(|| redis::Script::new(SCRIPT));
        let mut call = script.prepare_invoke();
        for x in &c.candidates {
            call.key(c.key(&settings.prefix, x));
        }
        for x in &c.candidates {
            call.arg(x.times);
        }
        call.arg(KEEP_SECONDS);
        call.invoke_async::<i64>(&mut con).await.map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|_| Err(format!("no answer within {} ms", settings.timeout.as_millis())));
    match &result {
        Ok(_) => {
            came_back();
            RESTING.set(None);
        }
        Err(_) => {
            CONNECTION.with(|c| c.borrow_mut().take());
            RESTING.set(Some(Instant::now() + BACK_OFF));
        }
    }
    result
}

async fn connection(settings: &Settings) -> Result<MultiplexedConnection, String> {
    if let Some(c) = CONNECTION.with(|c| c.borrow().clone()) {
        return Ok(c);
    }
    let con = settings.client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
    CONNECTION.with(|c| *c.borrow_mut() = Some(con.clone()));
    Ok(con)
}

/// Forgets every shared count (all replicas' calls start counting again):
/// the keys under `PREFIX:times:`, found with SCAN; how many there were.
pub fn reset() -> Result<u64, String> {
    let settings = SETTINGS.get().ok_or("the engine runs without --shared-state")?;
    let mut con =
        settings.client.get_connection_with_timeout(Duration::from_secs(5)).map_err(|e| format!("Redis: {e}"))?;
    let _ = con.set_read_timeout(Some(Duration::from_secs(5)));
    let pattern = format!("{}:times:*", settings.prefix);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut cursor, mut removed) = (0u64, 0u64);
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query(&mut con)
            .map_err(|e| format!("Redis: {e}"))?;
        if !keys.is_empty() {
            removed += redis::cmd("UNLINK").arg(&keys).query::<u64>(&mut con).map_err(|e| format!("Redis: {e}"))?;
        }
        if next == 0 {
            return Ok(removed);
        }
        if Instant::now() > deadline {
            return Err(format!("removed {removed} counts, but more remain after 30 s; ask again"));
        }
        cursor = next;
    }
}

// ---------------------------------------------------------------------------
// Outages: the log, the counts made meanwhile, the metrics
// ---------------------------------------------------------------------------

static DOWN: AtomicBool = AtomicBool::new(false);
static CLAIMS_SHARED: AtomicU64 = AtomicU64::new(0);
static CLAIMS_LOCAL: AtomicU64 = AtomicU64::new(0);
static CLAIMS_REFUSED: AtomicU64 = AtomicU64::new(0);
static OUTAGES: AtomicU64 = AtomicU64::new(0);
static LOST_COUNTS: AtomicU64 = AtomicU64::new(0);
/// Counts made here while Redis was away, by key, to add to it.
static WAITING: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

fn went_down(error: &str) {
    if !DOWN.swap(true, Relaxed) {
        OUTAGES.fetch_add(1, Relaxed);
        let policy = match SETTINGS.get().map(|s| s.policy) {
            Some(Policy::Refuse) => "refuse",
            _ => "local",
        };
        tracing::warn!(
            error,
            policy,
            "shared state: Redis unreachable; calls of rules limited by `times` are \
                       counted by the policy until it is back"
        );
    }
}

fn came_back() {
    if DOWN.swap(false, Relaxed) {
        tracing::info!("shared state: Redis reachable again");
    }
    let waiting = WAITING.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(counts) = waiting.filter(|w| !w.is_empty()) {
        // Added by a task of its own: this call does not wait for it.
        let Some(settings) = SETTINGS.get() else { return };
        let con = CONNECTION.with(|c| c.borrow().clone());
        let Some(mut con) = con else { return };
        let timeout = settings.timeout * 10;
        tokio::spawn(async move {
            let mut pipe = redis::pipe();
            for (key, n) in &counts {
                pipe.cmd("INCRBY").arg(key).arg(*n).ignore();
                pipe.cmd("EXPIRE").arg(key).arg(KEEP_SECONDS).ignore();
            }
            let added = tokio::time::timeout(timeout, pipe.query_async::<()>(&mut con)).await;
            if !matches!(added, Ok(Ok(()))) {
                LOST_COUNTS.fetch_add(counts.values().sum(), Relaxed);
                tracing::warn!("shared state: the counts made while Redis was away could not be added to it");
            }
        });
    }
}

fn waiting_count(key: String) {
    let mut waiting = WAITING.lock().unwrap_or_else(|e| e.into_inner());
    let map = waiting.get_or_insert_with(HashMap::new);
    if map.len() < MAX_WAITING_COUNTS || map.contains_key(&key) {
        *map.entry(key).or_default() += 1;
    } else {
        LOST_COUNTS.fetch_add(1, Relaxed);
    }
}

/// The metrics of the shared counts (Prometheus text), empty without
/// `--shared-state`.
pub fn render_metrics() -> String {
    if !enabled() {
        return String::new();
    }
    let mut out = String::new();
    out.push_str("# HELP wirestub_shared_state_up Whether Redis answered the last claim of a `times` count.\n");
    out.push_str("# TYPE wirestub_shared_state_up gauge\n");
    let _ = writeln!(out, "wirestub_shared_state_up {}", u8::from(!DOWN.load(Relaxed)));
    out.push_str(
        "# HELP wirestub_shared_state_claims_total Calls of rules limited by `times`, by where they were counted.\n",
    );
    out.push_str("# TYPE wirestub_shared_state_claims_total counter\n");
    for (how, n) in [("shared", &CLAIMS_SHARED), ("local", &CLAIMS_LOCAL), ("refused", &CLAIMS_REFUSED)] {
        let _ = writeln!(out, "wirestub_shared_state_claims_total{{counted=\"{how}\"}} {}", n.load(Relaxed));
    }
    out.push_str("# HELP wirestub_shared_state_outages_total Times Redis became unreachable.\n");
    out.push_str("# TYPE wirestub_shared_state_outages_total counter\n");
    let _ = writeln!(out, "wirestub_shared_state_outages_total {}", OUTAGES.load(Relaxed));
    out.push_str(
        "# HELP wirestub_shared_state_lost_counts_total Calls counted here during an outage that could not be added to Redis.\n",
    );
    out.push_str("# TYPE wirestub_shared_state_lost_counts_total counter\n");
    let _ = writeln!(out, "wirestub_shared_state_lost_counts_total {}", LOST_COUNTS.load(Relaxed));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_method_answer_and_session() {
        let names: Arc<[Arc<str>]> =
            vec![Arc::from("/a.B/C:00"), Arc::from("/a.B/C:01"), Arc::from("/a.B/C:00-1")].into();
        let mut c = Claim {
            names,
            candidates: SmallVec::from_slice(&[Candidate { rule: 3, response: 2, times: 1 }]),
            fallback: None,
            session: None,
        };
        assert_eq!(c.key("ws", &c.candidates[0]), "ws:times:/a.B/C:00-1");
        c.session = Some(b"s 1".to_vec().into_boxed_slice());
        assert_eq!(c.key("ws", &c.candidates[0]), "ws:times:/a.B/C:00-1:732031");
    }

    #[test]
    fn without_redis_the_local_counts_decide_in_order() {
        let c = Claim {
            names: Arc::from(Vec::new()),
            candidates: SmallVec::from_slice(&[
                Candidate { rule: 0, response: 0, times: 1 },
                Candidate { rule: 1, response: 1, times: 1 },
            ]),
            fallback: Some(5),
            session: None,
        };
        assert_eq!(local_choice(&c, &|r| r == 1), Some(1));
        assert_eq!(local_choice(&c, &|_| false), Some(5));
        assert_eq!(local_choice(&c, &|_| true), Some(0));
    }
}
