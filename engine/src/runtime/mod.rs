//! The runtime API's store: protos, rules and descriptor sets changed over
//! HTTP while the engine serves, each change compiled in process and
//! swapped in whole, or refused with the compiler's diagnostics while the
//! old plan keeps serving.
//!
//! Where the files live ([`Runtime::from_dirs`], [`Runtime::over_plan`]):
//! - compiled from directories (`engine run` without a plan): the
//!   `--protos` and `--rules` directories themselves, so the files on disk
//!   are always the truth;
//! - over a plan file with `--state-dir DIR`: `DIR/protos` and `DIR/rules`,
//!   compiled against the plan's descriptors and layered over it (runtime
//!   rules first, see `wirestub_plan::layer`); a restart with the same
//!   directory restores them;
//! - over a plan file without a state directory: in memory only.
//!
//! Every change runs on the admin API's blocking pool, never on a serving
//! worker. Changes are serialised by one lock held from reading the
//! current sources to the swap, so a change made while another compiles
//! waits for it and then applies to its result: none is lost. A
//! [`Cache`](wirestub_compiler::sources::Cache) kept between changes means
//! a change re-checks only the files it touched.

pub mod answer;
pub mod api;
pub mod files;
pub mod peers;
pub mod remote;
pub mod routes;
pub mod stubs;

use crate::state::{Reloaded, State};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use wirestub_compiler::protos::Text;
use wirestub_compiler::sources::{self, Cache, Sources};
use wirestub_compiler::Diagnostics;
use wirestub_plan::Plan;

/// The default bound on the bytes of every proto, rule file and descriptor
/// set the runtime holds (`--runtime-max-bytes`).
pub const DEFAULT_MAX_BYTES: usize = 256 << 20;

/// Extensions of rule files.
pub const RULE_EXTENSIONS: &[&str] = &["yaml", "yml", "json"];
/// Extensions of proto files.
pub const PROTO_EXTENSIONS: &[&str] = &["proto"];

/// One change to the sources.
#[derive(Debug, Clone)]
pub enum Change {
    PutProto {
        name: String,
        text: String,
    },
    DeleteProto {
        name: String,
    },
    PutRule {
        name: String,
        text: String,
    },
    DeleteRule {
        name: String,
    },
    /// Deletes a rule file if it is there (a stub moved or purged while
    /// another writer changed it too).
    ForgetRule {
        name: String,
    },
    PutDescriptors {
        name: String,
        bytes: Vec<u8>,
    },
    DeleteDescriptors {
        name: String,
    },
}

impl Change {
    /// The file the change touches, as `protos/NAME` or `rules/NAME`.
    pub fn file(&self) -> String {
        match self {
            Change::PutProto { name, .. }
            | Change::DeleteProto { name }
            | Change::PutDescriptors { name, .. }
            | Change::DeleteDescriptors { name } => format!("protos/{name}"),
            Change::PutRule { name, .. } | Change::DeleteRule { name } | Change::ForgetRule { name } => {
                format!("rules/{name}")
            }
        }
    }
}

/// A change that was not made.
#[derive(Debug)]
pub enum Refused {
    /// The request itself is wrong (400).
    Invalid(String),
    /// A file to change or delete does not exist (404).
    NotFound(String),
    /// The result does not compile (422): the old plan keeps serving.
    Diagnostics(Diagnostics),
    /// The compiled plan could not be prepared or layered (422).
    Plan(String),
    /// The files could not be written (500): nothing changed.
    Io(String),
    /// The sources would pass `--runtime-max-bytes` (413).
    TooLarge(String),
    /// Too many changes are waiting already (503).
    Busy(String),
    /// Another engine writes these directories (409).
    Conflict(String),
}

/// A change that was made.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The files written or removed.
    pub files: Vec<String>,
    pub reloaded: Reloaded,
    /// The compiler's warnings, rendered.
    pub warnings: Vec<serde_json::Value>,
}

/// Where changes persist.
#[derive(Debug, Clone)]
struct Store {
    protos: PathBuf,
    rules: PathBuf,
    /// Where the lock file goes: the state directory, or the rules
    /// directory (hidden there, so never read as a rule).
    lock_dir: PathBuf,
}

/// A plan file the runtime sources are layered over.
struct Base {
    path: PathBuf,
    plan: Plan,
    bytes: Vec<u8>,
    /// The names of the plan's descriptor files: uploads may import them,
    /// not replace them.
    files: std::collections::HashSet<String>,
}

struct Inner {
    sources: Sources,
    cache: Cache,
    base: Option<Base>,
    /// What the last compilation found about the rule files' sessions.
    scopes: Scopes,
}

/// The test sessions of the rule files: by file name, and the files that
/// also hold rules without a session.
#[derive(Default, Clone)]
pub struct Scopes {
    pub sessions: std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    pub unscoped: std::collections::BTreeSet<String>,
}

/// What a compilation gives besides the plan.
struct Compiled {
    built: Built,
    warnings: Diagnostics,
    scopes: Scopes,
}

/// The runtime store. See the module documentation.
pub struct Runtime {
    inner: Mutex<Inner>,
    store: Option<Store>,
    /// The directories an engine compiled from (their first is `store`).
    dirs: Option<wirestub_compiler::Options>,
    /// Most bytes of sources a change may leave.
    max_bytes: std::sync::atomic::AtomicUsize,
    /// The GripMock stubs of users' rule files, parsed, by file name and a
    /// hash of its text (for the stubs API's listings).
    file_stubs: Mutex<std::collections::HashMap<(String, u64), Vec<stubs::FileStub>>>,
    /// What the stubs API counts as a stub's use.
    stub_use: Mutex<stubs::StubUse>,
    /// The sources and sessions of the plan serving, for readers, who so
    /// never wait for a compilation in progress.
    published: Mutex<Published>,
    /// Writers waiting for the lock (see [`MAX_WAITING`]).
    waiting: std::sync::atomic::AtomicUsize,
    /// Most bytes of protos and descriptor sets a change may leave.
    max_schema_bytes: std::sync::atomic::AtomicUsize,
    /// The store's lock file, taken by the first change and held for the
    /// process's life: several engines may serve the same directories, one
    /// writes them.
    store_lock: Mutex<Option<std::fs::File>>,
    /// Told of every change applied here (not of those applied for a
    /// peer): the replicas sharing state (`peers.rs`).
    observer: std::sync::OnceLock<Observer>,
}

/// What is told of the changes applied on this replica.
pub type Observer = Arc<dyn Fn(&[Change]) + Send + Sync>;

/// What readers see: the last sources that compiled and were swapped in.
#[derive(Clone, Default)]
struct Published {
    sources: Arc<Sources>,
    scopes: Arc<Scopes>,
    base_path: Option<PathBuf>,
    base_files: Arc<std::collections::HashSet<String>>,
}

/// Writers that may wait for a compilation at once; more are told to come
/// back (503), so waiting writers cannot take every thread of the admin
/// API's pool from its readers.
pub const MAX_WAITING: usize = 8;

/// The default bound on the bytes of protos and descriptor sets
/// (`--runtime-max-schema-bytes`): descriptors cost far more in memory than
/// their size (the compiler's pool and cache, the plan's JSON codecs and
/// reflection index, twice during a swap), up to some 400 times for a file
/// of nothing but small messages.
pub const DEFAULT_MAX_SCHEMA_BYTES: usize = 4 << 20;

/// The lock file that keeps a second engine off a store.
const LOCK_FILE: &str = ".wirestub.lock";

/// A plan ready to swap in: the plan, its file's bytes when it is a plan
/// file served as is, and where it came from.
pub type Built = (Plan, Option<Vec<u8>>, String);

impl Runtime {
    /// Compiles from directories; changes are written into the first
    /// `--protos` and `--rules` directories.
    pub fn from_dirs(options: wirestub_compiler::Options) -> Result<(Runtime, Built), String> {
        let rules = options.rules.first().cloned().unwrap_or_else(|| PathBuf::from("rules"));
        let store = Store {
            protos: options.protos.first().cloned().unwrap_or_else(|| PathBuf::from("protos")),
            lock_dir: rules.clone(),
            rules,
        };
        let runtime = Runtime::new(Some(store), Some(options))?;
        let built = runtime.reread().map_err(|d| d.render())?;
        Ok((runtime, built))
    }

    fn new(store: Option<Store>, dirs: Option<wirestub_compiler::Options>) -> Result<Runtime, String> {
        Ok(Runtime {
            inner: Mutex::new(Inner {
                sources: Sources::default(),
                cache: Cache::default(),
                base: None,
                scopes: Scopes::default(),
            }),
            store,
            dirs,
            max_bytes: DEFAULT_MAX_BYTES.into(),
            file_stubs: Mutex::default(),
            stub_use: Mutex::default(),
            published: Mutex::default(),
            waiting: 0.into(),
            max_schema_bytes: DEFAULT_MAX_SCHEMA_BYTES.into(),
            store_lock: Mutex::new(None),
            observer: std::sync::OnceLock::new(),
        })
    }

    /// Serves the plan file at `path`, with runtime changes layered over it
    /// and kept in `state_dir` (created if missing), or in memory without
    /// one.
    pub fn over_plan(path: &Path, state_dir: Option<&Path>) -> Result<(Runtime, Built), String> {
        let store = match state_dir {
            Some(dir) => {
                let store = Store { protos: dir.join("protos"), rules: dir.join("rules"), lock_dir: dir.to_path_buf() };
                for d in [&store.protos, &store.rules] {
                    std::fs::create_dir_all(d)
                        .map_err(|e| format!("cannot create state directory `{}`: {e}", d.display()))?;
                }
                Some(store)
            }
            None => None,
        };
        let runtime = Runtime::new(store, None)?;
        {
            let mut inner = runtime.lock();
            let base = read_plan(path)?;
            inner.sources.base = Some(Arc::new(base.plan.descriptors.clone()));
            inner.base = Some(base);
        }
        let built = runtime.reread().map_err(|d| d.render())?;
        Ok((runtime, built))
    }

    /// Sets the bound on the bytes of sources held (`--runtime-max-bytes`).
    pub fn set_max_bytes(&self, bytes: usize) {
        self.max_bytes.store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets the bound on the bytes of protos and descriptor sets
    /// (`--runtime-max-schema-bytes`).
    pub fn set_max_schema_bytes(&self, bytes: usize) {
        self.max_schema_bytes.store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    fn publish(&self, inner: &Inner) {
        let published = Published {
            sources: Arc::new(inner.sources.clone()),
            scopes: Arc::new(inner.scopes.clone()),
            base_path: inner.base.as_ref().map(|b| b.path.clone()),
            base_files: Arc::new(inner.base.as_ref().map(|b| b.files.clone()).unwrap_or_default()),
        };
        *self.published.lock().unwrap_or_else(|e| e.into_inner()) = published;
    }

    fn published(&self) -> Published {
        self.published.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where changes persist, for the status page: the directories, or
    /// `memory`.
    pub fn storage(&self) -> serde_json::Value {
        match &self.store {
            Some(s) => serde_json::json!({
                "persistent": true,
                "protos": s.protos.display().to_string(),
                "rules": s.rules.display().to_string(),
                "layered_over_plan": self.published().base_path.map(|p| p.display().to_string()),
            }),
            None => serde_json::json!({
                "persistent": false,
                "note": "runtime changes live in memory only: start with --state-dir DIR to keep them",
                "layered_over_plan": self.published().base_path.map(|p| p.display().to_string()),
            }),
        }
    }

    /// Reads the files again (and the plan file, if layered over one) and
    /// compiles them: what `POST /admin/reload` does.
    pub fn reread(&self) -> Result<Built, Diagnostics> {
        let mut inner = self.lock();
        let mut diags = Diagnostics::default();
        // The plan file read again; it replaces the base only if the whole
        // result compiles.
        let base = match &inner.base {
            Some(base) => match read_plan(&base.path) {
                Ok(b) => Some(b),
                Err(e) => {
                    diags.error(None, e);
                    return Err(diags);
                }
            },
            None => None,
        };
        let mut sources = match (&self.dirs, &self.store) {
            (Some(options), _) => Sources::read(options, &mut diags),
            (None, Some(store)) => Sources::read(
                &wirestub_compiler::Options {
                    protos: vec![store.protos.clone()],
                    rules: vec![store.rules.clone()],
                    protos_only: Vec::new(),
                    lenient: false,
                },
                &mut diags,
            ),
            (None, None) => inner.sources.clone(),
        };
        if diags.has_errors() {
            diags.sort();
            return Err(diags);
        }
        sources.base = base.as_ref().map(|b| Arc::new(b.plan.descriptors.clone()));
        let compiled = build(&mut inner.cache, base.as_ref(), &sources)?;
        log_warnings(&compiled.warnings);
        inner.sources = sources;
        inner.scopes = compiled.scopes;
        inner.base = base;
        self.publish(&inner);
        Ok(compiled.built)
    }

    /// The test sessions of the rule files.
    pub fn scopes(&self) -> Arc<Scopes> {
        self.published().scopes
    }

    /// The names of the files of the plan the sources are layered over.
    pub fn base_files(&self) -> Arc<std::collections::HashSet<String>> {
        self.published().base_files
    }

    /// The sources of the plan serving (never waits for a compilation).
    pub fn sources(&self) -> Arc<Sources> {
        self.published().sources
    }

    /// Applies `changes` together: compiles the result, writes the files,
    /// swaps the plan. Nothing changes unless all of it succeeds.
    pub fn apply(&self, state: &State, changes: &[Change]) -> Result<Applied, Refused> {
        self.apply_resetting(state, changes, &[])
    }

    /// [`Runtime::apply`], and the `times` counts of the rules of the files
    /// `reset` names (by name, as in [`Change`]) start again, as a GripMock
    /// stub posted again does.
    pub fn apply_resetting(&self, state: &State, changes: &[Change], reset: &[String]) -> Result<Applied, Refused> {
        let applied = self.apply_inner(state, changes, reset)?;
        if let Some(observer) = self.observer.get() {
            observer(changes);
        }
        Ok(applied)
    }

    /// Applies changes another replica made ([`Runtime::apply`], its
    /// observer not told).
    pub fn apply_from_peer(&self, state: &State, changes: &[Change]) -> Result<Applied, Refused> {
        self.apply_inner(state, changes, &[])
    }

    /// Sets what is told of every change applied here (once).
    pub fn observe(&self, observer: Observer) {
        let _ = self.observer.set(observer);
    }

    fn apply_inner(&self, state: &State, changes: &[Change], reset: &[String]) -> Result<Applied, Refused> {
        use std::sync::atomic::Ordering::Relaxed;
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Relaxed);
            }
        }
        let _waiting = Waiting(&self.waiting);
        if self.waiting.fetch_add(1, Relaxed) >= MAX_WAITING {
            return Err(Refused::Busy(format!(
                "{MAX_WAITING} changes are already waiting for the compiler; try again shortly"
            )));
        }
        let mut inner = self.lock();
        let inner = &mut *inner;
        self.take_store()?;
        let mut next = inner.sources.clone();
        let base_files = inner.base.as_ref().map(|b| &b.files);
        for change in changes {
            apply_one(&mut next, change, self.store.as_ref(), base_files)?;
        }
        let limit = self.max_bytes.load(Relaxed);
        let held = source_bytes(&next);
        if held > limit && held > source_bytes(&inner.sources) {
            return Err(Refused::TooLarge(format!(
                "the runtime's protos, rules and descriptor sets would hold {held} bytes, over the limit of {limit} \
                 (--runtime-max-bytes); delete some first"
            )));
        }
        let limit = self.max_schema_bytes.load(Relaxed);
        let held = schema_bytes(&next);
        if held > limit && held > schema_bytes(&inner.sources) {
            return Err(Refused::TooLarge(format!(
                "the runtime's protos and descriptor sets would hold {held} bytes, over the limit of {limit} \
                 (--runtime-max-schema-bytes); delete some first"
            )));
        }
        let compiled = build(&mut inner.cache, inner.base.as_ref(), &next).map_err(Refused::Diagnostics)?;
        log_warnings(&compiled.warnings);
        self.persist(changes).map_err(Refused::Io)?;
        let (plan, bytes, source) = compiled.built;
        let shown: Vec<String> =
            reset.iter().filter_map(|name| next.rules.get(name)).map(|t| format!("{}:", t.shown)).collect();
        let reset = |origin: &str| shown.iter().any(|prefix| origin.starts_with(prefix.as_str()));
        let reloaded = state.swap_resetting(plan, bytes.as_deref(), source, &reset).map_err(Refused::Plan)?;
        inner.sources = next;
        inner.scopes = compiled.scopes;
        self.publish(inner);
        let warnings = match diagnostics_json(&compiled.warnings) {
            serde_json::Value::Array(list) => list,
            _ => Vec::new(),
        };
        Ok(Applied { files: changes.iter().map(Change::file).collect(), reloaded, warnings })
    }

    /// Makes this engine the one that writes the store (once), or says
    /// which engine does.
    fn take_store(&self) -> Result<(), Refused> {
        let Some(store) = &self.store else { return Ok(()) };
        let mut held = self.store_lock.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_none() {
            *held = Some(lock_store(store).map_err(Refused::Conflict)?);
        }
        Ok(())
    }

    /// Writes the changes to disk all or nothing: every new file is written
    /// beside its place first, then all are renamed into place, then the
    /// deleted ones go.
    fn persist(&self, changes: &[Change]) -> Result<(), String> {
        let Some(store) = &self.store else { return Ok(()) };
        let mut batch = files::Batch::default();
        for change in changes {
            match change {
                Change::PutProto { name, text } => batch.write(&store.protos, name, text.as_bytes())?,
                Change::PutRule { name, text } => batch.write(&store.rules, name, text.as_bytes())?,
                Change::PutDescriptors { name, bytes } => batch.write(&store.protos, name, bytes)?,
                Change::DeleteProto { name } | Change::DeleteDescriptors { name } => {
                    batch.remove(&store.protos, name)?
                }
                Change::DeleteRule { name } | Change::ForgetRule { name } => batch.remove(&store.rules, name)?,
            }
        }
        batch.commit()
    }

    /// The name a file is shown under in diagnostics.
    fn shown(store: Option<&Store>, dir: fn(&Store) -> &Path, kind: &str, name: &str) -> String {
        match store {
            Some(s) => dir(s).join(name).display().to_string(),
            None => format!("(runtime {kind})/{name}"),
        }
    }
}

/// The bytes of every file in `sources` (names included).
fn source_bytes(sources: &Sources) -> usize {
    let texts = sources.protos.iter().chain(sources.rules.iter()).map(|(n, t)| n.len() + t.text.len() + t.shown.len());
    let sets = sources.descriptor_sets.iter().map(|(n, b)| n.len() + b.len());
    texts.chain(sets).sum()
}

/// The bytes of the protos and descriptor sets in `sources`.
fn schema_bytes(sources: &Sources) -> usize {
    let texts = sources.protos.values().map(|t| t.text.len());
    let sets = sources.descriptor_sets.values().map(|b| b.len());
    texts.chain(sets).sum()
}

/// Refuses a name that is a directory of another file, or has a file as a
/// directory (`a.yaml` beside `a.yaml/b.yaml`).
fn check_place<T>(files: &std::collections::BTreeMap<String, T>, name: &str) -> Result<(), Refused> {
    let below = format!("{name}/");
    if let Some((other, _)) = files.range(below.clone()..).next().filter(|(k, _)| k.starts_with(&below)) {
        return Err(Refused::Invalid(format!("`{name}` is a directory here: `{other}` is below it")));
    }
    for (i, _) in name.match_indices('/') {
        if files.contains_key(&name[..i]) {
            return Err(Refused::Invalid(format!("`{}` is a file here, so `{name}` cannot be below it", &name[..i])));
        }
    }
    Ok(())
}

/// Refuses to change a file that is not in the directory changes are
/// written to (a second `--protos` or `--rules` directory).
fn check_writable(existing: Option<&Text>, shown: &str, name: &str) -> Result<(), Refused> {
    match existing {
        Some(t) if t.shown != shown => Err(Refused::Invalid(format!(
            "`{name}` is `{}`, in a directory the runtime API does not write (only the first --protos and --rules \
             directories change)",
            t.shown
        ))),
        _ => Ok(()),
    }
}

fn apply_one(
    next: &mut Sources,
    change: &Change,
    store: Option<&Store>,
    base_files: Option<&std::collections::HashSet<String>>,
) -> Result<(), Refused> {
    let proto_shown = |name: &str| Runtime::shown(store, |s| &s.protos, "protos", name);
    let rule_shown = |name: &str| Runtime::shown(store, |s| &s.rules, "rules", name);
    match change {
        Change::PutProto { name, text } => {
            let name = files::check_name(name, PROTO_EXTENSIONS).map_err(Refused::Invalid)?;
            if base_files.is_some_and(|f| f.contains(&name)) {
                return Err(Refused::Invalid(format!(
                    "`{name}` is a file of the plan being served: uploads may import it but not replace it; upload \
                     under another name, or rebuild the plan"
                )));
            }
            let shown = proto_shown(&name);
            check_writable(next.protos.get(&name), &shown, &name)?;
            check_place(&next.protos, &name)?;
            next.protos.insert(name, Text { shown, text: text.as_str().into() });
        }
        Change::DeleteProto { name } => {
            check_writable(next.protos.get(name), &proto_shown(name), name)?;
            if next.protos.remove(name).is_none() {
                return Err(Refused::NotFound(format!("no proto file `{name}`")));
            }
        }
        Change::PutRule { name, text } => {
            let name = files::check_name(name, RULE_EXTENSIONS).map_err(Refused::Invalid)?;
            let shown = rule_shown(&name);
            check_writable(next.rules.get(&name), &shown, &name)?;
            check_place(&next.rules, &name)?;
            next.rules.insert(name, Text { shown, text: text.as_str().into() });
        }
        Change::DeleteRule { name } => {
            check_writable(next.rules.get(name), &rule_shown(name), name)?;
            if next.rules.remove(name).is_none() {
                return Err(Refused::NotFound(format!("no rule file `{name}`")));
            }
        }
        Change::ForgetRule { name } => {
            check_writable(next.rules.get(name), &rule_shown(name), name)?;
            next.rules.remove(name);
        }
        Change::PutDescriptors { name, bytes } => {
            let name = files::check_name(name, sources::DESCRIPTOR_SET_EXTENSIONS).map_err(Refused::Invalid)?;
            sources::decode_descriptor_set(bytes).map_err(Refused::Invalid)?;
            next.descriptor_sets.insert(name, Arc::new(bytes.clone()));
        }
        Change::DeleteDescriptors { name } => {
            if next.descriptor_sets.remove(name).is_none() {
                return Err(Refused::NotFound(format!("no descriptor set `{name}`")));
            }
        }
    }
    Ok(())
}

/// Takes the store's lock file, or says which engine holds it; then
/// removes the temporary files a killed writer left behind.
fn lock_store(store: &Store) -> Result<std::fs::File, String> {
    std::fs::create_dir_all(&store.lock_dir)
        .map_err(|e| format!("cannot create `{}`: {e}", store.lock_dir.display()))?;
    let path = store.lock_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open the lock file `{}`: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            for d in [&store.protos, &store.rules] {
                files::remove_stale_temporaries(d);
            }
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "another engine writes `{}` and `{}` (it holds `{}`): changes go through that engine, since two \
             writers would overwrite each other's files",
            store.protos.display(),
            store.rules.display(),
            path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("cannot lock `{}`: {e}", path.display())),
    }
}

/// Compiles `sources` (layered over the base plan, if any).
fn build(cache: &mut Cache, base: Option<&Base>, sources: &Sources) -> Result<Compiled, Diagnostics> {
    match base {
        Some(base) if sources.is_empty() => Ok(Compiled {
            built: (base.plan.clone(), Some(base.bytes.clone()), base_source(base, 0)),
            warnings: Diagnostics::default(),
            scopes: Scopes::default(),
        }),
        Some(base) => {
            let out = sources::compile(sources, cache)?;
            let plan = wirestub_plan::layer::layer(&base.plan, &out.plan).map_err(|e| {
                let mut d = Diagnostics::default();
                d.error(None, format!("runtime changes cannot be layered over `{}`: {e}", base.path.display()));
                d
            })?;
            let files = sources.protos.len() + sources.rules.len() + sources.descriptor_sets.len();
            Ok(Compiled {
                built: (plan, None, base_source(base, files)),
                warnings: out.warnings,
                scopes: Scopes { sessions: out.sessions, unscoped: out.unscoped },
            })
        }
        None => {
            let out = sources::compile(sources, cache)?;
            Ok(Compiled {
                built: (out.plan, None, "compiled from sources".to_string()),
                warnings: out.warnings,
                scopes: Scopes { sessions: out.sessions, unscoped: out.unscoped },
            })
        }
    }
}

fn base_source(base: &Base, files: usize) -> String {
    match files {
        0 => base.path.display().to_string(),
        n => format!("{} with {n} runtime files", base.path.display()),
    }
}

fn log_warnings(warnings: &Diagnostics) {
    if !warnings.is_empty() {
        tracing::warn!("{}", warnings.render().trim_end());
    }
}

fn read_plan(path: &Path) -> Result<Base, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read plan `{}`: {e}", path.display()))?;
    let plan = Plan::from_bytes(&bytes).map_err(|e| format!("`{}`: {e}", path.display()))?;
    let files = sources::decode_descriptor_set(&plan.descriptors)
        .map(|files| files.into_iter().map(|f| f.name().to_string()).collect())
        .unwrap_or_default();
    Ok(Base { path: path.to_path_buf(), plan, bytes, files })
}

/// Diagnostics as JSON: `{severity, message, file, line, column, hint}`.
pub fn diagnostics_json(diags: &Diagnostics) -> serde_json::Value {
    let list: Vec<serde_json::Value> = diags
        .iter()
        .map(|d| {
            let span = d.span.as_ref();
            serde_json::json!({
                "severity": match d.severity { wirestub_compiler::Severity::Error => "error", _ => "warning" },
                "message": d.message,
                "file": span.map(|s| s.file.name.clone()),
                "line": span.map(|s| s.line),
                "column": span.map(|s| s.col),
                "hint": d.help,
            })
        })
        .collect();
    serde_json::Value::Array(list)
}
