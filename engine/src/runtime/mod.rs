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

pub mod files;
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
    PutProto { name: String, text: String },
    DeleteProto { name: String },
    PutRule { name: String, text: String },
    DeleteRule { name: String },
    PutDescriptors { name: String, bytes: Vec<u8> },
    DeleteDescriptors { name: String },
}

impl Change {
    /// The file the change touches, as `protos/NAME` or `rules/NAME`.
    pub fn file(&self) -> String {
        match self {
            Change::PutProto { name, .. }
            | Change::DeleteProto { name }
            | Change::PutDescriptors { name, .. }
            | Change::DeleteDescriptors { name } => format!("protos/{name}"),
            Change::PutRule { name, .. } | Change::DeleteRule { name } => format!("rules/{name}"),
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
}

/// A plan file the runtime sources are layered over.
struct Base {
    path: PathBuf,
    plan: Plan,
    bytes: Vec<u8>,
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
}

/// A plan ready to swap in: the plan, its file's bytes when it is a plan
/// file served as is, and where it came from.
pub type Built = (Plan, Option<Vec<u8>>, String);

impl Runtime {
    /// Compiles from directories; changes are written into the first
    /// `--protos` and `--rules` directories.
    pub fn from_dirs(options: wirestub_compiler::Options) -> Result<(Runtime, Built), String> {
        let store = Store {
            protos: options.protos.first().cloned().unwrap_or_else(|| PathBuf::from("protos")),
            rules: options.rules.first().cloned().unwrap_or_else(|| PathBuf::from("rules")),
        };
        let runtime = Runtime {
            inner: Mutex::new(Inner {
                sources: Sources::default(),
                cache: Cache::default(),
                base: None,
                scopes: Scopes::default(),
            }),
            store: Some(store),
            dirs: Some(options),
            max_bytes: DEFAULT_MAX_BYTES.into(),
            file_stubs: Mutex::default(),
            stub_use: Mutex::default(),
        };
        let built = runtime.reread().map_err(|d| d.render())?;
        Ok((runtime, built))
    }

    /// Serves the plan file at `path`, with runtime changes layered over it
    /// and kept in `state_dir` (created if missing), or in memory without
    /// one.
    pub fn over_plan(path: &Path, state_dir: Option<&Path>) -> Result<(Runtime, Built), String> {
        let store = match state_dir {
            Some(dir) => {
                let store = Store { protos: dir.join("protos"), rules: dir.join("rules") };
                for d in [&store.protos, &store.rules] {
                    std::fs::create_dir_all(d)
                        .map_err(|e| format!("cannot create state directory `{}`: {e}", d.display()))?;
                }
                Some(store)
            }
            None => None,
        };
        let runtime = Runtime {
            inner: Mutex::new(Inner {
                sources: Sources::default(),
                cache: Cache::default(),
                base: None,
                scopes: Scopes::default(),
            }),
            store,
            dirs: None,
            max_bytes: DEFAULT_MAX_BYTES.into(),
            file_stubs: Mutex::default(),
            stub_use: Mutex::default(),
        };
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
                "layered_over_plan": self.lock().base.as_ref().map(|b| b.path.display().to_string()),
            }),
            None => serde_json::json!({
                "persistent": false,
                "note": "runtime changes live in memory only: start with --state-dir DIR to keep them",
                "layered_over_plan": self.lock().base.as_ref().map(|b| b.path.display().to_string()),
            }),
        }
    }

    /// Reads the files again (and the plan file, if layered over one) and
    /// compiles them: what `POST /admin/reload` does.
    pub fn reread(&self) -> Result<Built, Diagnostics> {
        let mut inner = self.lock();
        let mut diags = Diagnostics::default();
        if let Some(base) = &inner.base {
            match read_plan(&base.path) {
                Ok(b) => {
                    inner.sources.base = Some(Arc::new(b.plan.descriptors.clone()));
                    inner.base = Some(b);
                }
                Err(e) => {
                    diags.error(None, e);
                    return Err(diags);
                }
            }
        }
        let mut sources = match (&self.dirs, &self.store) {
            (Some(options), _) => Sources::read(options, &mut diags),
            (None, Some(store)) => Sources::read(
                &wirestub_compiler::Options { protos: vec![store.protos.clone()], rules: vec![store.rules.clone()] },
                &mut diags,
            ),
            (None, None) => inner.sources.clone(),
        };
        if diags.has_errors() {
            diags.sort();
            return Err(diags);
        }
        sources.base = inner.sources.base.clone();
        let compiled = build(&mut inner, &sources)?;
        log_warnings(&compiled.warnings);
        inner.sources = sources;
        inner.scopes = compiled.scopes;
        Ok(compiled.built)
    }

    /// The test sessions of the rule files.
    pub fn scopes(&self) -> Scopes {
        self.lock().scopes.clone()
    }

    /// A copy of the current sources.
    pub fn sources(&self) -> Sources {
        self.lock().sources.clone()
    }

    /// Applies `changes` together: compiles the result, writes the files,
    /// swaps the plan. Nothing changes unless all of it succeeds.
    pub fn apply(&self, state: &State, changes: &[Change]) -> Result<Applied, Refused> {
        let mut inner = self.lock();
        let mut next = inner.sources.clone();
        for change in changes {
            apply_one(&mut next, change, self.store.as_ref())?;
        }
        let held = source_bytes(&next);
        let limit = self.max_bytes.load(std::sync::atomic::Ordering::Relaxed);
        if held > limit && held > source_bytes(&inner.sources) {
            return Err(Refused::TooLarge(format!(
                "the runtime's protos, rules and descriptor sets would hold {held} bytes, over the limit of {limit} \
                 (--runtime-max-bytes); delete some first"
            )));
        }
        let compiled = build(&mut inner, &next).map_err(Refused::Diagnostics)?;
        log_warnings(&compiled.warnings);
        self.persist(changes).map_err(Refused::Io)?;
        let (plan, bytes, source) = compiled.built;
        let reloaded = state.swap(plan, bytes.as_deref(), source).map_err(Refused::Plan)?;
        inner.sources = next;
        inner.scopes = compiled.scopes;
        let warnings = match diagnostics_json(&compiled.warnings) {
            serde_json::Value::Array(list) => list,
            _ => Vec::new(),
        };
        Ok(Applied { files: changes.iter().map(Change::file).collect(), reloaded, warnings })
    }

    fn persist(&self, changes: &[Change]) -> Result<(), String> {
        let Some(store) = &self.store else { return Ok(()) };
        for change in changes {
            match change {
                Change::PutProto { name, text } => files::write(&store.protos, name, text.as_bytes())?,
                Change::PutRule { name, text } => files::write(&store.rules, name, text.as_bytes())?,
                Change::PutDescriptors { name, bytes } => files::write(&store.protos, name, bytes)?,
                Change::DeleteProto { name } | Change::DeleteDescriptors { name } => {
                    files::remove(&store.protos, name)?
                }
                Change::DeleteRule { name } => files::remove(&store.rules, name)?,
            }
        }
        Ok(())
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

fn apply_one(next: &mut Sources, change: &Change, store: Option<&Store>) -> Result<(), Refused> {
    match change {
        Change::PutProto { name, text } => {
            let name = files::check_name(name, PROTO_EXTENSIONS).map_err(Refused::Invalid)?;
            let shown = Runtime::shown(store, |s| &s.protos, "protos", &name);
            next.protos.insert(name, Text { shown, text: text.as_str().into() });
        }
        Change::DeleteProto { name } => {
            if next.protos.remove(name).is_none() {
                return Err(Refused::NotFound(format!("no proto file `{name}`")));
            }
        }
        Change::PutRule { name, text } => {
            let name = files::check_name(name, RULE_EXTENSIONS).map_err(Refused::Invalid)?;
            let shown = Runtime::shown(store, |s| &s.rules, "rules", &name);
            next.rules.insert(name, Text { shown, text: text.as_str().into() });
        }
        Change::DeleteRule { name } => {
            if next.rules.remove(name).is_none() {
                return Err(Refused::NotFound(format!("no rule file `{name}`")));
            }
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

/// Compiles `sources` (layered over the base plan, if any).
fn build(inner: &mut Inner, sources: &Sources) -> Result<Compiled, Diagnostics> {
    match &inner.base {
        Some(base) if sources.is_empty() => Ok(Compiled {
            built: (base.plan.clone(), Some(base.bytes.clone()), base_source(base, 0)),
            warnings: Diagnostics::default(),
            scopes: Scopes::default(),
        }),
        Some(base) => {
            let out = sources::compile(sources, &mut inner.cache)?;
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
            let out = sources::compile(sources, &mut inner.cache)?;
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
    Ok(Base { path: path.to_path_buf(), plan, bytes })
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
