//! Compiling from sources held in memory, with a cache between
//! compilations.
//!
//! [`Sources`] is every input of one compilation: `.proto` files by import
//! name, rule files by name, descriptor sets, and the files of a base plan.
//! The command line reads them from directories ([`Sources::read`]); the
//! engine's runtime API keeps them in memory and changes one file at a time.
//! [`compile`] runs the usual pipeline, but a [`Cache`] kept between runs
//! means that a change re-does only what it touched: the schema is reused
//! while the protos are unchanged (and a changed proto re-parses only
//! itself), a rule file is re-checked only when its text or the schema
//! changed, and a regular expression is determinized once.

use crate::check::{self, CheckedFile};
use crate::diag::{Diagnostics, SourceFile};
use crate::protos::{self, hash_str, ParseCache, Schema, Text};
use crate::rules::{self, MethodIndex};
use crate::{lower, regex, Output};
use prost::Message as _;
use prost_reflect::prost_types::{FileDescriptorProto, FileDescriptorSet};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// The inputs of one compilation.
#[derive(Clone, Default)]
pub struct Sources {
    /// `.proto` files by import name.
    pub protos: BTreeMap<String, Text>,
    /// Rule files by name: the path below their rules directory, with `/`
    /// separators. Files below `sessions/NAME/` belong to session NAME.
    pub rules: BTreeMap<String, Text>,
    /// Descriptor sets whose files are part of the schema, by name (each
    /// has been checked by [`decode_descriptor_set`]).
    pub descriptor_sets: BTreeMap<String, Arc<Vec<u8>>>,
    /// The encoded descriptor set of a base plan: its files are part of the
    /// schema and the protos may import them.
    pub base: Option<Arc<Vec<u8>>>,
    /// Rules directories that do not exist: an error once the protos
    /// compile (a broken proto is reported alone).
    pub missing_rules_dirs: Vec<String>,
    /// Entry files (import names): only they and their imports are
    /// compiled; empty for every file.
    pub entries: Vec<String>,
    /// What Wishmock ignores is a warning (`--lenient`): a `.proto` file
    /// that does not compile, a rule document or entry with an error, are
    /// left out.
    pub lenient: bool,
}

impl Sources {
    /// Reads the `.proto` and rule files below the directories. Rule files
    /// of a second directory are named `DIR//PATH`, so they cannot collide
    /// with the first's.
    pub fn read(options: &crate::Options, diags: &mut Diagnostics) -> Sources {
        let protos = protos::read_dirs(&options.protos, diags);
        let mut descriptor_sets = BTreeMap::new();
        for dir in options.protos.iter().filter(|d| d.is_dir()) {
            for path in protos::list_files(dir, DESCRIPTOR_SET_EXTENSIONS).unwrap_or_default() {
                let rel = path.strip_prefix(dir).unwrap_or(&path).to_string_lossy().replace('\\', "/");
                match std::fs::read(&path) {
                    Ok(bytes) => {
                        descriptor_sets.entry(rel).or_insert_with(|| Arc::new(bytes));
                    }
                    Err(e) => diags.error(None, format!("cannot read descriptor set `{}`: {e}", path.display())),
                }
            }
        }
        let mut rules = BTreeMap::new();
        let mut missing_rules_dirs = Vec::new();
        for (i, dir) in options.rules.iter().enumerate() {
            if !dir.is_dir() {
                missing_rules_dirs.push(dir.display().to_string());
                continue;
            }
            let files = match protos::list_files(dir, &["yaml", "yml", "json"]) {
                Ok(f) => f,
                Err(e) => {
                    diags.error(None, format!("cannot read rules directory `{}`: {e}", dir.display()));
                    continue;
                }
            };
            for path in files {
                let rel = path.strip_prefix(dir).unwrap_or(&path).to_string_lossy().replace('\\', "/");
                // `//` keeps them apart from the first directory's names
                // (no uploaded name has an empty component).
                let name = if i == 0 { rel } else { format!("{}//{rel}", dir.display()) };
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        rules.insert(name, Text { shown: path.display().to_string(), text: text.into() });
                    }
                    Err(e) => diags.error(None, format!("cannot read rule file `{}`: {e}", path.display())),
                }
            }
        }
        let entries = options.protos_only.clone();
        let lenient = options.lenient;
        Sources { protos, rules, descriptor_sets, base: None, missing_rules_dirs, entries, lenient }
    }
}

/// A rule file's path below its directory (see [`Sources::rules`]).
pub fn relative(name: &str) -> &str {
    name.rsplit_once("//").map_or(name, |(_, rel)| rel)
}

/// Extensions of binary `FileDescriptorSet` files among the protos: their
/// files join the schema as if compiled from source.
pub const DESCRIPTOR_SET_EXTENSIONS: &[&str] = &["binpb", "pb", "desc", "protoset"];

impl Sources {
    /// Whether there is nothing to compile.
    pub fn is_empty(&self) -> bool {
        self.protos.is_empty() && self.rules.is_empty() && self.descriptor_sets.is_empty()
    }
}

/// Decodes an encoded `FileDescriptorSet`; an error says why it is not one.
pub fn decode_descriptor_set(bytes: &[u8]) -> Result<Vec<FileDescriptorProto>, String> {
    let set = FileDescriptorSet::decode(bytes).map_err(|e| format!("invalid FileDescriptorSet: {e}"))?;
    for f in &set.file {
        if f.name().is_empty() {
            return Err("invalid FileDescriptorSet: a file has no name".into());
        }
    }
    Ok(set.file)
}

/// What one compilation keeps for the next. Entries the last compilation
/// did not use are dropped, so the cache holds about one compilation's
/// worth.
#[derive(Default)]
pub struct Cache {
    parsed: ParseCache,
    schema: Option<(u64, Arc<CachedSchema>)>,
    /// Checked rule files by name: the schema and text they were checked
    /// with, the result and its diagnostics.
    rules: HashMap<String, CachedRules>,
    /// Determinized regular expressions by pattern and flags.
    regexes: HashMap<(String, String), Vec<u8>>,
}

struct CachedSchema {
    schema: Schema,
    methods: MethodIndex,
}

struct CachedRules {
    schema: u64,
    text: u64,
    checked: Arc<CheckedFile>,
    diags: Diagnostics,
}

/// Compiles `sources`, reusing what `cache` holds from earlier runs. An
/// empty source set compiles (to a plan of the built-in files only).
pub fn compile(sources: &Sources, cache: &mut Cache) -> Result<Output, Diagnostics> {
    let mut diags = Diagnostics::default();
    let (schema_key, schema) = match schema(sources, cache, &mut diags) {
        Some(s) => s,
        None => {
            diags.sort();
            return Err(diags);
        }
    };

    for dir in &sources.missing_rules_dirs {
        diags.error(None, format!("rules directory `{dir}` does not exist"));
    }

    // Rule files: checked ones reused while their text and the schema are
    // the same; new ones share one expansion allowance.
    let mut budget = crate::yaml::Budget::new();
    let mut docs = Vec::new();
    let mut raw = Vec::new();
    let mut specs = Vec::new();
    let mut kept = HashMap::with_capacity(sources.rules.len());
    let mut sessions = BTreeMap::new();
    let mut unscoped = BTreeSet::new();
    for (name, text) in &sources.rules {
        let text_hash = hash_str(&text.text) ^ sources.lenient as u64;
        let entry = match cache.rules.remove(name) {
            Some(c) if c.schema == schema_key && c.text == text_hash => c,
            _ => {
                let mut file_diags = Diagnostics::default();
                let file = SourceFile::named(&text.shown, text.text.to_string());
                let checked = check::check_file(
                    &file,
                    rules::session_of(relative(name)),
                    &schema.methods,
                    &mut budget,
                    &mut file_diags,
                    sources.lenient,
                );
                CachedRules { schema: schema_key, text: text_hash, checked: Arc::new(checked), diags: file_diags }
            }
        };
        diags.extend(&entry.diags);
        let sessions_of =
            entry.checked.docs.iter().map(|d| &d.session).chain(entry.checked.raw.iter().map(|d| &d.session));
        for session in sessions_of {
            match session {
                Some(s) => {
                    sessions.entry(name.clone()).or_insert_with(BTreeSet::new).insert(s.clone());
                }
                None => {
                    unscoped.insert(name.clone());
                }
            }
        }
        let offset = specs.len() as u32;
        for doc in &entry.checked.docs {
            let mut doc = doc.clone();
            doc.offset_regexes(offset);
            docs.push(doc);
        }
        specs.extend(entry.checked.regexes.iter().cloned());
        raw.extend(entry.checked.raw.iter().cloned());
        kept.insert(name.clone(), entry);
    }

    // Regular expressions: determinized once per pattern and flags.
    let mut regexes = Vec::with_capacity(specs.len());
    let mut used = HashMap::new();
    for spec in &specs {
        let key = (spec.pattern.clone(), spec.flags.clone());
        let compiled = match cache.regexes.remove(&key).or_else(|| used.get(&key).cloned()) {
            Some(c) => Some(c),
            None => regex::compile_all(std::slice::from_ref(spec), &mut diags).pop().flatten(),
        };
        if let Some(c) = &compiled {
            used.insert(key, c.clone());
        }
        regexes.push(compiled);
    }
    let rule_docs = docs.len() + raw.len();
    let result = if diags.has_errors() {
        None
    } else {
        let regexes: Vec<Vec<u8>> = regexes.into_iter().flatten().collect();
        let plan = lower::lower(
            &schema.schema.pool,
            schema.schema.encoded.clone(),
            docs,
            raw,
            &regexes,
            &sources.protos,
            &mut diags,
        );
        (!diags.has_errors()).then_some(plan)
    };
    cache.rules = kept;
    cache.regexes = used;
    diags.sort();
    match result {
        Some(plan) => {
            Ok(Output { plan, warnings: diags, proto_files: schema.schema.files, rule_docs, sessions, unscoped })
        }
        None => Err(diags),
    }
}

/// The schema: the cached one while the protos, descriptor sets and base
/// are unchanged, else compiled again.
fn schema(sources: &Sources, cache: &mut Cache, diags: &mut Diagnostics) -> Option<(u64, Arc<CachedSchema>)> {
    let key = schema_key(sources);
    if let Some((k, s)) = &cache.schema {
        if *k == key {
            return Some((key, s.clone()));
        }
    }
    let mut extra = Vec::new();
    let mut names = std::collections::HashSet::new();
    let sets = sources
        .base
        .iter()
        .map(|b| ("the plan", b))
        .chain(sources.descriptor_sets.iter().map(|(n, b)| (n.as_str(), b)));
    for (name, bytes) in sets {
        match decode_descriptor_set(bytes) {
            Ok(files) => {
                for f in files {
                    // A file given twice (a set that repeats the plan's
                    // imports) is the same file.
                    if !sources.protos.contains_key(f.name()) && names.insert(f.name().to_string()) {
                        extra.push(f);
                    }
                }
            }
            Err(e) => diags.error(None, format!("descriptor set `{name}`: {e}")),
        }
    }
    if diags.has_errors() {
        return None;
    }
    let schema = protos::compile(&sources.protos, &sources.entries, sources.lenient, &extra, &cache.parsed, diags)?;
    let methods = MethodIndex::new(&schema.pool);
    let cached = Arc::new(CachedSchema { schema, methods });
    // Checked rule files hold descriptors of the old schema.
    cache.rules.clear();
    cache.schema = Some((key, cached.clone()));
    Some((key, cached))
}

fn schema_key(sources: &Sources) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (name, t) in &sources.protos {
        name.hash(&mut h);
        t.shown.hash(&mut h);
        t.text.hash(&mut h);
    }
    for (name, b) in &sources.descriptor_sets {
        name.hash(&mut h);
        b.hash(&mut h);
    }
    sources.base.hash(&mut h);
    sources.entries.hash(&mut h);
    sources.lenient.hash(&mut h);
    h.finish()
}
