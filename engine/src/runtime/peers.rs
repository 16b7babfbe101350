//! Runtime changes shared with the other replicas through Redis
//! (`engine run --shared-state redis://...`): a change applied here is
//! stored in Redis and announced; every replica applies what the store
//! holds that it lacks, and a replica that starts later catches up before
//! it serves.
//!
//! In Redis, under the prefix (`--shared-state-prefix`, default
//! `wirestub`):
//!
//! ```text
//! PREFIX:files     hash   rule/NAME | proto/NAME | descriptors/NAME  →  {"text": ...} | {"base64": ...} | {"deleted": true}
//! PREFIX:changes   channel  a replica's id, published after it wrote the hash; or `plan`: a new plan
//!                           is stored (`runtime::remote`), for the replicas started with `--plan shared:`;
//!                           or `journal-settle:NONCE` / `journal-reset:NONCE`: a read of the shared
//!                           journal waits for every replica's calls (`observe::shared_journal`)
//! PREFIX:replicas  hash   replica id  →  {"identity", "generation", "listeners", "at"}, written every 2 s
//! ```
//!
//! The last hash lets any replica's `/admin/status` show which plan every
//! replica serves; a replica not heard of for 10 s is left out (and its
//! field removed).
//!
//! The hash holds the files changed through the runtime API, each as last
//! written by any replica (the last writer wins), and a deletion as a mark,
//! so that a file of a replica's own directories is deleted everywhere too.
//! A replica applies the difference between the hash and its own sources
//! as one change: compiled and swapped like any other, refused (and
//! logged, its status showing it) if it does not compile there.
//!
//! Everything runs on a thread of its own with a current-thread runtime:
//! neither serving nor the admin API waits for Redis. While Redis cannot be
//! reached, changes apply here and wait (at most what the runtime's sources
//! hold, `--runtime-max-bytes`) to be written when it is back; on every
//! reconnection the replica writes again, without overwriting, every file
//! it knows (a Redis restarted empty is refilled), then catches up.

use super::{Change, Runtime};
use crate::state::State;
use futures_util::StreamExt;
use serde_json::{json, Value as Json};
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Longest a Redis command may take before the connection is given up and
/// made again.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a replica says which plan it serves (which also checks the
/// connection).
const BEAT_EVERY: Duration = Duration::from_secs(2);
/// A replica not heard of for this long is gone.
const GONE_AFTER: Duration = Duration::from_secs(10);
/// Waits between attempts to reach Redis: doubling from the first to the
/// last.
const RETRY: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));

/// The replicas sharing runtime changes through one Redis.
pub struct Peers {
    client: redis::Client,
    /// The URL with any password left out, for logs and the status.
    shown: String,
    hash: String,
    channel: String,
    replicas_hash: String,
    /// Every replica's last word, as read at the last beat.
    replicas: Mutex<Vec<Json>>,
    /// This replica's id in announcements (so it skips its own).
    id: String,
    /// Fields written here and not yet stored in Redis, in order.
    pending: Mutex<Vec<(String, String)>>,
    /// Every field this replica wrote or applied, with its value: written
    /// again (HSETNX) after a reconnection.
    known: Mutex<BTreeMap<String, String>>,
    wake: tokio::sync::Notify,
    status: Mutex<Status>,
    /// Set once the first catch-up is done (or given up).
    synced: (Mutex<bool>, Condvar),
    /// This replica serves the plan stored in Redis (`--plan shared:`),
    /// with its local copy: it reloads when one is announced, and stores
    /// its copy again in a Redis that lost it.
    follows_plan: std::sync::OnceLock<std::path::PathBuf>,
    /// A reload of the plan runs (on a thread of its own) or waits.
    plan_reload: Arc<(Mutex<u8>, Condvar)>,
    /// Connections made so far (the first follows the plan fetched at
    /// start; later ones may have missed an announcement).
    sessions: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Status {
    up: bool,
    since: Option<Instant>,
    errors: u64,
    last_error: Option<String>,
    applied_from_peers: u64,
    refused_from_peers: u64,
    last_refusal: Option<String>,
}

impl Peers {
    /// Shares through `client` (no connection yet); `url` is its address,
    /// shown without its password.
    pub fn new(client: redis::Client, url: &str, prefix: &str) -> Result<Peers, String> {
        let id = crate::rng::unique_hex();
        Ok(Peers {
            client,
            shown: without_password(url),
            hash: format!("{prefix}:files"),
            channel: format!("{prefix}:changes"),
            replicas_hash: format!("{prefix}:replicas"),
            replicas: Mutex::default(),
            id,
            pending: Mutex::default(),
            known: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            status: Mutex::default(),
            synced: (Mutex::new(false), Condvar::new()),
            follows_plan: std::sync::OnceLock::new(),
            plan_reload: Arc::new((Mutex::new(0), Condvar::new())),
            sessions: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Starts sharing `runtime`'s changes: tells this replica's changes to
    /// Redis and applies the others' to `state`, on a thread of its own.
    /// Waits up to `wait` for the first catch-up, so a replica that starts
    /// late serves what the others serve.
    pub fn start(self: &Arc<Self>, runtime: Arc<Runtime>, state: Arc<State>, wait: Duration) -> Result<(), String> {
        let me = self.clone();
        runtime.observe(Arc::new(move |changes: &[Change]| me.local(changes)));
        let me = self.clone();
        std::thread::Builder::new()
            .name("wirestub-peers".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "shared state: cannot start its runtime");
                        me.mark_synced();
                        return;
                    }
                };
                rt.block_on(me.run(&runtime, &state));
            })
            .map_err(|e| format!("cannot start the shared-state thread: {e}"))?;
        let (lock, cv) = &self.synced;
        let done = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (done, _) = cv.wait_timeout_while(done, wait, |d| !*d).unwrap_or_else(|e| e.into_inner());
        let up = self.status.lock().map(|s| (s.up, s.last_error.clone())).unwrap_or((false, None));
        if let (false, Some(error)) = &up {
            // A mistake in the settings is not an outage to wait out.
            if let Some(why) = misconfigured(error) {
                return Err(format!("--shared-state `{}`: {error} ({why})", self.shown));
            }
            if self.shown.starts_with("rediss://") && error.contains("did not answer") {
                tracing::warn!(url = %self.shown, error = %error, "shared state: Redis not reached yet (is the server \
                                speaking TLS on that port? rediss:// is TLS, redis:// is not); serving this replica's \
                                own rules, and catching up once it is");
                return Ok(());
            }
        }
        if !*done || !up.0 {
            tracing::warn!(url = %self.shown, "shared state: Redis not reached yet; serving this replica's own \
                            rules, and catching up once it is");
        }
        Ok(())
    }

    /// Reloads the plan when one is announced on the channel (`plan`), and
    /// after each reconnection (one may have been announced meanwhile);
    /// `local` is the copy of the plan it serves.
    pub fn follow_plan(&self, local: std::path::PathBuf) {
        let _ = self.follows_plan.set(local);
    }

    /// Loads the plan stored in Redis again, if this replica follows it:
    /// on a thread of its own (fetching and compiling take a while, and
    /// this thread beats and shares changes meanwhile); announcements that
    /// come while one runs make one more reload, not one each.
    fn reload_plan(&self, state: &Arc<State>) {
        if self.follows_plan.get().is_none() {
            return;
        }
        let (lock, _) = &*self.plan_reload;
        let mut pending = lock.lock().unwrap_or_else(|e| e.into_inner());
        *pending += 1;
        if *pending > 1 {
            // One runs: it goes round once more.
            *pending = 2;
            return;
        }
        drop(pending);
        let (gate, state) = (self.plan_reload.clone(), state.clone());
        let spawned = std::thread::Builder::new().name("wirestub-plan-reload".into()).spawn(move || loop {
            match state.reload() {
                Ok(r) if r.changed => tracing::info!(identity = %r.identity, generation = r.number,
                                                     "shared state: serving the plan announced"),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "shared state: the plan announced does not load; this \
                                          replica keeps its plan"),
            }
            let mut pending = gate.0.lock().unwrap_or_else(|e| e.into_inner());
            *pending -= 1;
            if *pending == 0 {
                return;
            }
        });
        if spawned.is_err() {
            *self.plan_reload.0.lock().unwrap_or_else(|e| e.into_inner()) = 0;
        }
    }

    /// Stores this replica's copy of the plan in a Redis that has none (it
    /// restarted empty), so that replicas starting later find it.
    async fn refill_plan(&self, con: &mut redis::aio::MultiplexedConnection) -> Result<(), String> {
        let Some(local) = self.follows_plan.get() else { return Ok(()) };
        let Ok(bytes) = std::fs::read(local) else { return Ok(()) };
        let key = self.hash.trim_end_matches(":files").to_string() + ":plan";
        timed(redis::cmd("SET").arg(&key).arg(bytes).arg("NX").query_async::<Option<String>>(con)).await?;
        Ok(())
    }

    /// This replica's id, as the other replicas see it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What `/admin/status` shows under `runtime.shared_state`.
    pub fn status(&self) -> Json {
        let s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        json!({
            "url": self.shown,
            "replica": self.id,
            "up": s.up,
            "for_seconds": s.since.map(|t| t.elapsed().as_secs_f64()),
            "errors": s.errors,
            "last_error": s.last_error,
            "pending": self.pending.lock().map(|p| p.len()).unwrap_or(0),
            "applied_from_peers": s.applied_from_peers,
            "refused_from_peers": s.refused_from_peers,
            "last_refusal": s.last_refusal,
            "replicas": self.replicas.lock().map(|r| r.clone()).unwrap_or_default(),
        })
    }

    /// Changes applied here: queued for Redis.
    fn local(&self, changes: &[Change]) {
        let fields: Vec<(String, String)> = changes.iter().map(field_of).collect();
        {
            let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            for (k, v) in &fields {
                known.insert(k.clone(), v.clone());
            }
        }
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).extend(fields);
        self.wake.notify_one();
    }

    fn mark_synced(&self) {
        let (lock, cv) = &self.synced;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    fn set_up(&self, up: bool, error: Option<String>) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if s.up != up || s.since.is_none() {
            match (up, &error) {
                (true, _) => tracing::info!(url = %self.shown, "shared state: connected to Redis"),
                (false, Some(e)) => tracing::warn!(url = %self.shown, error = %e,
                    "shared state: Redis unreachable; changes apply here and reach the other replicas once it is back"),
                (false, None) => {}
            }
            s.since = Some(Instant::now());
        }
        s.up = up;
        if let Some(e) = error {
            s.errors += 1;
            s.last_error = Some(e);
        }
    }

    /// Connects, and on any failure waits and connects again, forever.
    async fn run(&self, runtime: &Runtime, state: &Arc<State>) {
        let mut wait = RETRY.0;
        loop {
            let started = Instant::now();
            let error = self.session(runtime, state).await.err().unwrap_or_else(|| "connection closed".into());
            self.set_up(false, Some(error));
            // The first attempt failed: serve without waiting longer.
            self.mark_synced();
            if started.elapsed() > RETRY.1 {
                wait = RETRY.0;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY.1);
        }
    }

    /// One connection's life: subscribe, write what waits, catch up, then
    /// follow announcements and local changes until something fails.
    async fn session(&self, runtime: &Runtime, state: &Arc<State>) -> Result<(), String> {
        let mut pubsub = timed(self.client.get_async_pubsub()).await?;
        timed(pubsub.subscribe(&self.channel)).await?;
        let mut con = timed(self.client.get_multiplexed_async_connection()).await?;
        self.set_up(true, None);
        // A Redis that lost its data gets back what this replica knows,
        // without overwriting what others wrote since.
        let known: Vec<(String, String)> = {
            let k = self.known.lock().unwrap_or_else(|e| e.into_inner());
            k.iter().map(|(a, b)| (a.clone(), b.clone())).collect()
        };
        for (field, value) in known {
            timed(redis::cmd("HSETNX").arg(&self.hash).arg(field).arg(value).query_async::<i64>(&mut con)).await?;
        }
        self.flush(&mut con).await?;
        self.refill_plan(&mut con).await?;
        if self.sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed) > 0 {
            self.reload_plan(state);
        }
        self.catch_up(&mut con, runtime, state).await?;
        self.mark_synced();
        let mut messages = pubsub.on_message();
        let mut beat = tokio::time::interval(BEAT_EVERY);
        loop {
            tokio::select! {
                m = messages.next() => {
                    let Some(m) = m else { return Err("the subscription ended".into()) };
                    let from: String = m.get_payload().unwrap_or_default();
                    let settle = from.strip_prefix("journal-settle:").map(|n| (n, false))
                        .or_else(|| from.strip_prefix("journal-reset:").map(|n| (n, true)));
                    if let Some((nonce, reset)) = settle {
                        if let Some(journal) = crate::observe::shared_journal::get() {
                            journal.settle_request(nonce, reset);
                        }
                    } else if from == "plan" {
                        self.reload_plan(state);
                    } else if from != self.id {
                        self.catch_up(&mut con, runtime, state).await?;
                    }
                }
                () = self.wake.notified() => self.flush(&mut con).await?,
                _ = beat.tick() => self.beat(&mut con, state).await?,
            }
        }
    }

    /// Says which plan this replica serves, and reads what the others say.
    async fn beat(&self, con: &mut redis::aio::MultiplexedConnection, state: &State) -> Result<(), String> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let g = state.current();
        let listeners: Vec<String> = state.listeners().iter().map(|l| format!("{} {}", l.kind, l.addr)).collect();
        let mine = json!({
            "identity": g.identity,
            "generation": g.number,
            "listeners": listeners,
            "draining": state.is_draining(),
            "shared_journal": crate::observe::shared_journal::get().is_some(),
            "at": now,
        });
        drop(g);
        timed(redis::cmd("HSET").arg(&self.replicas_hash).arg(&self.id).arg(mine.to_string()).query_async::<i64>(con))
            .await?;
        let all: Vec<(String, String)> =
            timed(redis::cmd("HGETALL").arg(&self.replicas_hash).query_async::<Vec<(String, String)>>(con)).await?;
        let mut seen = Vec::new();
        for (id, text) in all {
            let Ok(mut v) = serde_json::from_str::<Json>(&text) else { continue };
            let at = v.get("at").and_then(Json::as_u64).unwrap_or(0);
            if now.saturating_sub(at) > GONE_AFTER.as_secs() {
                timed(redis::cmd("HDEL").arg(&self.replicas_hash).arg(&id).query_async::<i64>(con)).await?;
                continue;
            }
            v["replica"] = json!(id);
            v["this_one"] = json!(id == self.id);
            seen.push(v);
        }
        seen.sort_by(|a, b| a["replica"].as_str().cmp(&b["replica"].as_str()));
        *self.replicas.lock().unwrap_or_else(|e| e.into_inner()) = seen;
        Ok(())
    }

    /// Writes the pending fields, then announces them.
    async fn flush(&self, con: &mut redis::aio::MultiplexedConnection) -> Result<(), String> {
        let batch: Vec<(String, String)> = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if batch.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("HSET");
        cmd.arg(&self.hash);
        for (k, v) in &batch {
            cmd.arg(k).arg(v);
        }
        if let Err(e) = timed(cmd.query_async::<i64>(con)).await {
            // Back in front, for the next connection.
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let later = std::mem::take(&mut *pending);
            *pending = batch;
            pending.extend(later);
            return Err(e);
        }
        timed(redis::cmd("PUBLISH").arg(&self.channel).arg(&self.id).query_async::<i64>(con)).await?;
        Ok(())
    }

    /// Applies what the hash holds that this replica's sources lack.
    async fn catch_up(
        &self,
        con: &mut redis::aio::MultiplexedConnection,
        runtime: &Runtime,
        state: &State,
    ) -> Result<(), String> {
        let all: Vec<(String, String)> =
            timed(redis::cmd("HGETALL").arg(&self.hash).query_async::<Vec<(String, String)>>(con)).await?;
        let sources = runtime.sources();
        let mut changes = Vec::new();
        for (field, value) in &all {
            if let Some(change) = change_of(field, value, &sources) {
                changes.push(change);
            }
        }
        {
            let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            for (k, v) in all {
                known.insert(k, v);
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        let files: Vec<String> = changes.iter().map(Change::file).collect();
        // Compiling may take a while: off this runtime's thread is not
        // needed (nothing else runs here), so it runs inline.
        let result = runtime.apply_from_peer(state, &changes);
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(applied) => {
                s.applied_from_peers += 1;
                tracing::info!(files = ?files, generation = applied.reloaded.number, "shared state: applied changes \
                               made on another replica");
            }
            Err(refused) => {
                let why = super::answer::refusal(refused);
                let text = String::from_utf8_lossy(&why.body).trim().to_string();
                s.refused_from_peers += 1;
                s.last_refusal = Some(text.clone());
                tracing::error!(files = ?files, refusal = %text, "shared state: changes made on another replica do \
                                not apply here; this replica keeps its plan");
            }
        }
        Ok(())
    }
}

/// Whether a Redis error is a mistake in the settings rather than an
/// outage: why, if so.
fn misconfigured(error: &str) -> Option<&'static str> {
    let e = error.to_ascii_lowercase();
    if e.contains("authenticationfailed")
        || e.contains("wrongpass")
        || e.contains("noauth")
        || e.contains("invalid password")
    {
        Some("the password in the URL is not Redis's")
    } else if e.contains("db index is out of range") || e.contains("invalid db index") {
        Some("the database number in the URL does not exist on that Redis")
    } else if e.contains("invalid peer certificate") || e.contains("unknownissuer") {
        Some("the server's certificate is not trusted: give the CA that signs it with --shared-state-ca")
    } else {
        None
    }
}

/// A command given [`COMMAND_TIMEOUT`].
async fn timed<T>(f: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T, String> {
    match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("Redis did not answer within {} s", COMMAND_TIMEOUT.as_secs())),
    }
}

/// The hash field and value a change is stored as.
fn field_of(change: &Change) -> (String, String) {
    use base64::Engine;
    let deleted = || json!({"deleted": true}).to_string();
    match change {
        Change::PutProto { name, text } => (format!("proto/{name}"), json!({"text": text}).to_string()),
        Change::DeleteProto { name } => (format!("proto/{name}"), deleted()),
        Change::PutRule { name, text } => (format!("rule/{name}"), json!({"text": text}).to_string()),
        Change::DeleteRule { name } | Change::ForgetRule { name } => (format!("rule/{name}"), deleted()),
        Change::PutDescriptors { name, bytes } => (
            format!("descriptors/{name}"),
            json!({"base64": base64::engine::general_purpose::STANDARD.encode(bytes)}).to_string(),
        ),
        Change::DeleteDescriptors { name } => (format!("descriptors/{name}"), deleted()),
    }
}

/// The change that brings `sources` to what a hash field says, if any.
fn change_of(field: &str, value: &str, sources: &wirestub_compiler::sources::Sources) -> Option<Change> {
    use base64::Engine;
    let (kind, name) = field.split_once('/')?;
    let v: Json = serde_json::from_str(value).ok()?;
    let name = name.to_string();
    let deleted = v.get("deleted").and_then(Json::as_bool) == Some(true);
    match kind {
        "rule" => match (deleted, sources.rules.get(&name), v.get("text").and_then(Json::as_str)) {
            (true, Some(_), _) => Some(Change::ForgetRule { name }),
            (false, have, Some(text)) if have.is_none_or(|t| &*t.text != text) => {
                Some(Change::PutRule { name, text: text.to_string() })
            }
            _ => None,
        },
        "proto" => match (deleted, sources.protos.get(&name), v.get("text").and_then(Json::as_str)) {
            (true, Some(_), _) => Some(Change::DeleteProto { name }),
            (false, have, Some(text)) if have.is_none_or(|t| &*t.text != text) => {
                Some(Change::PutProto { name, text: text.to_string() })
            }
            _ => None,
        },
        "descriptors" => {
            let have = sources.descriptor_sets.get(&name);
            if deleted {
                return have.map(|_| Change::DeleteDescriptors { name });
            }
            let bytes = base64::engine::general_purpose::STANDARD.decode(v.get("base64")?.as_str()?).ok()?;
            match have {
                Some(b) if **b == bytes => None,
                _ => Some(Change::PutDescriptors { name, bytes }),
            }
        }
        _ => None,
    }
}

/// `redis://:secret@host/0` as `redis://:***@host/0`.
pub fn without_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let hidden = if userinfo.contains(':') { format!("{user}:***") } else { "***".into() };
            format!("{}{hidden}{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(without_password("redis://:s3cret@db:6379/2"), "redis://:***@db:6379/2");
        assert_eq!(without_password("rediss://me:s3cret@db"), "rediss://me:***@db");
        assert_eq!(without_password("redis://db:6379"), "redis://db:6379");
    }

    #[test]
    fn changes_round_trip_through_their_fields() {
        let mut sources = wirestub_compiler::sources::Sources::default();
        let put = Change::PutRule { name: "a.yaml".into(), text: "responses: []\n".into() };
        let (field, value) = field_of(&put);
        assert_eq!(field, "rule/a.yaml");
        assert!(
            matches!(change_of(&field, &value, &sources), Some(Change::PutRule { ref text, .. }) if text == "responses: []\n")
        );
        sources.rules.insert(
            "a.yaml".into(),
            wirestub_compiler::protos::Text { text: "responses: []\n".into(), shown: "rules/a.yaml".into() },
        );
        assert!(change_of(&field, &value, &sources).is_none(), "the same text: nothing to do");
        let (field, value) = field_of(&Change::DeleteRule { name: "a.yaml".into() });
        assert!(matches!(change_of(&field, &value, &sources), Some(Change::ForgetRule { .. })));
        let (field, value) = field_of(&Change::PutDescriptors { name: "d.pb".into(), bytes: vec![1, 2, 3] });
        assert!(
            matches!(change_of(&field, &value, &sources), Some(Change::PutDescriptors { ref bytes, .. }) if bytes == &[1, 2, 3])
        );
        assert!(change_of("nonsense", "{}", &sources).is_none());
        assert!(change_of("rule/x", "not json", &sources).is_none());
    }
}
