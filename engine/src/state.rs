//! What the workers, the admin API and the binary share: the current plan
//! generation (swapped atomically on reload), health, the journal and the
//! metrics of every generation.
//!
//! The request path reads one atomic per new call (the generation number)
//! and takes the lock on the current generation only when that number has
//! changed, i.e. once per connection per swap.

use crate::observe::health::Health;
use crate::observe::journal::Journal;
use crate::observe::metrics::{Registry, Stats};
use crate::observe::reflection::Reflection;
use crate::served::generation::Generation;
use crate::served::{NoMatch, Served};
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};
use wirestub_plan::Plan;

/// A listener the engine serves on, for the status page.
#[derive(Debug, Clone)]
pub struct Listener {
    /// `grpc`, `grpc+tls` or `admin`.
    pub kind: &'static str,
    pub addr: SocketAddr,
}

/// Loads the next plan for a reload: the plan file read again, or the
/// protos and rules compiled again. The string names where it came from.
pub type Reloader = Box<dyn Fn() -> Result<(Plan, Option<Vec<u8>>, String), String> + Send + Sync>;

/// The shared state.
pub struct State {
    current: Mutex<Arc<Generation>>,
    number: AtomicU64,
    pub health: Health,
    pub journal: Option<Journal>,
    pub metrics: Registry,
    pub no_match: NoMatch,
    pub workers: usize,
    pub started: SystemTime,
    started_at: Instant,
    draining: AtomicBool,
    listeners: Mutex<Vec<Listener>>,
    reloader: Mutex<Option<Reloader>>,
    /// Serialises reloads, so two at once cannot interleave.
    reloading: Mutex<()>,
    /// Generations swapped out, kept until no call holds them, so the last
    /// reference (and freeing a large plan) is dropped by the reaper
    /// thread, never by a serving worker.
    retired: Arc<Mutex<Vec<Arc<Generation>>>>,
}

/// How often the reaper looks for retired generations no call holds.
const REAP_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Drops the retired generations no one else holds; true when none is
/// left.
fn reap(retired: &Mutex<Vec<Arc<Generation>>>) -> bool {
    let dead: Vec<Arc<Generation>> = {
        let mut list = lock(retired);
        let (dead, live) = std::mem::take(&mut *list).into_iter().partition(|g| Arc::strong_count(g) == 1);
        *list = live;
        dead
    };
    drop(dead);
    lock(retired).is_empty()
}

/// The outcome of a successful reload.
#[derive(Debug, Clone)]
pub struct Reloaded {
    pub identity: String,
    pub number: u64,
    pub methods: usize,
    pub rules: usize,
    /// False when the new plan is identical to the one serving (it is
    /// swapped all the same).
    pub changed: bool,
}

impl State {
    /// The state for a first plan. `bytes` are the plan file's bytes when
    /// it was read from one (for its identity and version).
    pub fn new(
        plan: Plan,
        bytes: Option<&[u8]>,
        source: String,
        no_match: NoMatch,
        workers: usize,
        journal: usize,
    ) -> Result<State, String> {
        let workers = match workers {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        };
        let metrics = Registry::default();
        let generation = prepare(plan, bytes, source, no_match, workers, 1)?;
        metrics.register(generation.stats.clone());
        let health = Health::new();
        health.set_services(&generation.services());
        Ok(State {
            current: Mutex::new(Arc::new(generation)),
            number: AtomicU64::new(1),
            health,
            journal: (journal > 0).then(|| Journal::new(journal)),
            metrics,
            no_match,
            workers,
            started: SystemTime::now(),
            started_at: Instant::now(),
            draining: AtomicBool::new(false),
            listeners: Mutex::new(Vec::new()),
            reloader: Mutex::new(None),
            reloading: Mutex::new(()),
            retired: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// The generation new calls use.
    pub fn current(&self) -> Arc<Generation> {
        lock(&self.current).clone()
    }

    /// The number of the current generation; changes on every swap.
    #[inline]
    pub fn number(&self) -> u64 {
        self.number.load(Ordering::Acquire)
    }

    /// Prepares `plan` and makes it the current generation. On error the
    /// current generation keeps serving.
    pub fn swap(&self, plan: Plan, bytes: Option<&[u8]>, source: String) -> Result<Reloaded, String> {
        self.swap_resetting(plan, bytes, source, &|_| false)
    }

    /// [`State::swap`], but the `times` counts of rules whose origin
    /// (`file:line:col`) `reset` picks start again (a stub posted again).
    pub fn swap_resetting(
        &self,
        plan: Plan,
        bytes: Option<&[u8]>,
        source: String,
        reset: &dyn Fn(&str) -> bool,
    ) -> Result<Reloaded, String> {
        let _one = lock(&self.reloading);
        let number = self.number.load(Ordering::Acquire) + 1;
        let rules = plan.methods.iter().map(|m| m.rules.len()).sum();
        let methods = plan.methods.len();
        let previous = self.current();
        let generation = prepare_after(plan, bytes, source, self.no_match, self.workers, number, Some(&previous))?;
        generation.served.inherit_uses(&previous.served, reset);
        self.metrics.register(generation.stats.clone());
        let services = generation.services();
        let identity = generation.identity.clone();
        let (changed, old) = {
            let mut current = lock(&self.current);
            let changed = current.identity != identity;
            (changed, std::mem::replace(&mut *current, Arc::new(generation)))
        };
        drop(previous);
        self.retire(old);
        self.number.store(number, Ordering::Release);
        if !self.is_draining() {
            self.health.set_services(&services);
        }
        Ok(Reloaded { identity, number, methods, rules, changed })
    }

    /// Hands a swapped-out generation to the reaper thread (started with
    /// the first), which frees it once no call holds it.
    fn retire(&self, old: Arc<Generation>) {
        let start = {
            let mut list = lock(&self.retired);
            list.push(old);
            list.len() == 1
        };
        if !start {
            return;
        }
        let retired = self.retired.clone();
        let spawned = std::thread::Builder::new().name("wirestub-reaper".into()).spawn(move || loop {
            std::thread::sleep(REAP_EVERY);
            // Done when everything retired is freed; the next swap starts
            // another.
            if reap(&retired) {
                return;
            }
        });
        if spawned.is_err() {
            // No thread to spare: free what can be freed here.
            reap(&self.retired);
        }
    }

    /// Installs what [`State::reload`] calls to get the next plan.
    pub fn set_reloader(&self, reloader: Reloader) {
        *lock(&self.reloader) = Some(reloader);
    }

    /// Loads the next plan with the reloader and swaps it in (after any
    /// reload already running).
    pub fn reload(&self) -> Result<Reloaded, String> {
        self.reload_with(lock(&self.reloader))
    }

    /// [`State::reload`], unless one is running already (a fetch from a
    /// slow URL may take a while): then None, at once, so that requests do
    /// not pile up behind it.
    pub fn try_reload(&self) -> Option<Result<Reloaded, String>> {
        match self.reloader.try_lock() {
            Ok(guard) => Some(self.reload_with(guard)),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(self.reload_with(e.into_inner())),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    fn reload_with(&self, reloader: std::sync::MutexGuard<'_, Option<Reloader>>) -> Result<Reloaded, String> {
        let next = {
            let Some(reload) = reloader.as_ref() else {
                return Err("this engine has no plan source to reload from".into());
            };
            reload()?
        };
        drop(reloader);
        let (plan, bytes, source) = next;
        self.swap(plan, bytes.as_deref(), source)
    }

    /// Shutdown started: health goes NOT_SERVING, `/readyz` fails.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.health.set_draining();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started_at.elapsed()
    }

    pub fn add_listener(&self, kind: &'static str, addr: SocketAddr) {
        lock(&self.listeners).push(Listener { kind, addr });
    }

    pub fn listeners(&self) -> Vec<Listener> {
        lock(&self.listeners).clone()
    }
}

/// A poisoned lock only means another thread panicked while holding it;
/// the data (an `Arc` swapped whole, a list) is still consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Prepares a plan for serving as generation `number`.
pub fn prepare(
    plan: Plan,
    bytes: Option<&[u8]>,
    source: String,
    no_match: NoMatch,
    workers: usize,
    number: u64,
) -> Result<Generation, String> {
    prepare_after(plan, bytes, source, no_match, workers, number, None)
}

/// [`prepare`], sharing what is unchanged with `previous`, the generation
/// it replaces.
fn prepare_after(
    plan: Plan,
    bytes: Option<&[u8]>,
    source: String,
    no_match: NoMatch,
    workers: usize,
    number: u64,
    previous: Option<&Generation>,
) -> Result<Generation, String> {
    let encoded;
    let (identity_bytes, version) = match bytes {
        Some(b) => (b, b.get(12..16).map(|v| u32::from_le_bytes([v[0], v[1], v[2], v[3]])).unwrap_or(0)),
        None => {
            encoded = plan.to_bytes();
            (&encoded[..], wirestub_plan::VERSION)
        }
    };
    let identity = wirestub_plan::identity(identity_bytes);
    let descriptors = Bytes::from(plan.descriptors.clone());
    let served = Served::new_after(plan, no_match, previous.map(|g| &g.served)).map_err(|e| e.to_string())?;
    let stats = Arc::new(Stats::new(workers, &served));
    let reflection = Reflection::new(&descriptors);
    Ok(Generation {
        served,
        stats,
        reflection,
        descriptors,
        identity,
        version,
        source,
        loaded: SystemTime::now(),
        number,
        schema: OnceLock::new(),
    })
}
