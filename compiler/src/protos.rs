//! Compiles .proto files in process with protox: imports across files and
//! include paths, well-known types built in, no protoc needed.
//!
//! The google.rpc protos of the rich error model (`google/rpc/status.proto`,
//! `google/rpc/error_details.proto`, in `src/builtin/`) are built in too:
//! user protos may import them without shipping them, and they are always
//! part of the schema (and so of the plan's descriptors), for error details.
//! A user's own copy, under the same import name or any other, wins.
//!
//! Trees found in the wild vendor the well-known types: a user's copy of a
//! `google/protobuf/*.proto` file protox ships is set aside for the
//! built-in one (the same file, at the version the compiler knows), so a
//! newer vendored `descriptor.proto` cannot break the build. A single
//! extension number with options (`extensions 1000 [declaration = ...]`,
//! which protoc accepts and protox's parser does not) is read as the range
//! `1000 to 1000`, which means the same. With entry files given
//! (`--protos-only`), only they and what they import are compiled.

use crate::diag::{Diagnostic, Diagnostics, SourceFile, Span};
use prost_reflect::DescriptorPool;
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The compiled schema: the pool for type checking and the encoded
/// FileDescriptorSet (dependencies included) that goes into the plan.
pub struct Schema {
    pub pool: DescriptorPool,
    pub encoded: Vec<u8>,
    /// How many .proto files were read from the user's directories.
    pub files: usize,
}

/// Every `.proto` file below `dir`, sorted, hidden entries skipped.
pub fn list_files(dir: &Path, ext: &[&str]) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let path = entry.path();
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            if hidden {
                continue;
            }
            if entry.file_type()?.is_dir() {
                stack.push(path);
            } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| ext.contains(&e)) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A `.proto` file held in memory: the path shown in diagnostics and its
/// text.
#[derive(Debug, Clone)]
pub struct Text {
    pub shown: String,
    pub text: Arc<str>,
}

/// Parsed `.proto` files kept between compilations, by import name and a
/// hash of the text, so a compilation parses only the files that changed.
#[derive(Default, Clone)]
pub struct ParseCache {
    inner: Arc<Mutex<ParseInner>>,
}

#[derive(Default)]
struct ParseInner {
    files: HashMap<(String, u64), File>,
    /// Keys used by the current compilation (the others are dropped after it).
    used: HashSet<(String, u64)>,
}

impl ParseCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, ParseInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get_or_parse(&self, name: &str, text: &str) -> Result<File, protox::Error> {
        let key = (name.to_string(), hash_str(text));
        let cached = self.lock().files.get(&key).cloned();
        if let Some(f) = cached {
            self.lock().used.insert(key);
            return Ok(f);
        }
        let file = match single_extension_ranges(text) {
            Some(widened) => File::from_source(name, &widened)?,
            None => File::from_source(name, text)?,
        };
        let mut inner = self.lock();
        inner.files.insert(key.clone(), file.clone());
        inner.used.insert(key);
        Ok(file)
    }

    /// Forgets the files the last compilation did not read.
    fn prune(&self) {
        let mut inner = self.lock();
        let used = std::mem::take(&mut inner.used);
        inner.files.retain(|k, _| used.contains(k));
    }
}

/// A hash of a text, for caches keyed by content.
pub fn hash_str(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Reads every `.proto` file below the directories, keyed by import name
/// (the path below its directory; the first directory wins, as an include
/// path would).
pub fn read_dirs(dirs: &[PathBuf], diags: &mut Diagnostics) -> BTreeMap<String, Text> {
    let mut out = BTreeMap::new();
    for dir in dirs {
        let files = match list_files(dir, &["proto"]) {
            Ok(f) => f,
            Err(e) => {
                diags.error(None, format!("cannot read proto directory `{}`: {e}", dir.display()));
                continue;
            }
        };
        for f in files {
            let name = f.strip_prefix(dir).unwrap_or(&f).to_string_lossy().replace('\\', "/");
            match std::fs::read_to_string(&f) {
                Ok(text) => {
                    out.entry(name).or_insert(Text { shown: f.display().to_string(), text: text.into() });
                }
                Err(e) => diags.error(None, format!("cannot read proto file `{}`: {e}", f.display())),
            }
        }
    }
    out
}

/// `text` with every `extensions N [` (a single number with options) read
/// as `extensions N to N [`; None when it has none. Comments and strings
/// are left alone.
fn single_extension_ranges(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    let word = |at: usize| at == 0 || !(b[at - 1].is_ascii_alphanumeric() || b[at - 1] == b'_' || b[at - 1] == b'.');
    while i < b.len() {
        if let Some(next) = past_comment_or_string(text, i) {
            i = next;
            continue;
        }
        match b[i] {
            b'e' if word(i) && text[i..].starts_with("extensions") => {
                let mut j = i + "extensions".len();
                let space = j;
                while j < b.len() && b[j].is_ascii_whitespace() {
                    j += 1;
                }
                let digits = j;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
                let number = &text[digits..j];
                let after = j;
                while j < b.len() && b[j].is_ascii_whitespace() {
                    j += 1;
                }
                if j > space && !number.is_empty() && digits > space && b.get(j) == Some(&b'[') {
                    let o = out.get_or_insert_with(|| String::with_capacity(text.len() + 32));
                    o.push_str(&text[copied..after]);
                    o.push_str(" to ");
                    o.push_str(number);
                    copied = after;
                }
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    let mut o = out?;
    o.push_str(&text[copied..]);
    Some(o)
}

/// Whether protox ships the file (a well-known type): a user's copy under
/// that name is set aside for it.
fn well_known(name: &str) -> bool {
    name.starts_with("google/protobuf/") && GoogleFileResolver::new().open_file(name).is_ok()
}

/// Compiles the given `.proto` files (by import name) together with
/// `extra` files given as descriptors (an uploaded descriptor set, a base
/// plan's files): all are part of the schema, and imports resolve to any of
/// them, to the well-known types and to the built-in google.rpc files.
/// With `entries`, only those files (and what they import) are compiled.
pub fn compile(
    protos: &BTreeMap<String, Text>,
    entries: &[String],
    lenient: bool,
    extra: &[prost_reflect::prost_types::FileDescriptorProto],
    cache: &ParseCache,
    diags: &mut Diagnostics,
) -> Option<Schema> {
    let protos: BTreeMap<String, Text> =
        protos.iter().filter(|(name, _)| !well_known(name)).map(|(n, t)| (n.clone(), t.clone())).collect();
    let protos = &protos;
    for e in entries {
        if !protos.contains_key(e) {
            diags.error(
                None,
                format!("entry file `{e}` is not among the protos (give its path below a --protos directory)"),
            );
        }
    }
    if diags.has_errors() {
        return None;
    }
    // protox's parser recurses on nested option values: check the nesting
    // before any file is parsed (a file may be parsed as another's import).
    let mut too_deep = false;
    for f in protos.values() {
        if let Some(offset) = nesting_past_limit(&f.text) {
            let file = SourceFile::named(&f.shown, f.text.to_string());
            let d = Diagnostic::error(
                Some(file.span_at(offset, 1)),
                format!("braces, brackets or parentheses nested more than {MAX_NESTING} deep"),
            );
            diags.push(d);
            too_deep = true;
        }
    }
    if too_deep {
        return None;
    }
    // protox and prost-reflect panic on some malformed descriptors (an
    // uploaded descriptor set is anything a client sends): such a panic is
    // this compilation's error, not the process's end.
    let mut local = Diagnostics::default();
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        link(protos, entries, lenient, extra, cache, &mut local)
    }));
    cache.prune();
    diags.extend(&local);
    match run {
        Ok(schema) => schema,
        Err(payload) => {
            let why = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            diags.push(
                Diagnostic::error(
                    None,
                    format!("the descriptors could not be linked: the proto compiler failed ({why})"),
                )
                .with_help(
                    "a descriptor set or .proto file that protoc accepts should link; check the uploaded descriptors",
                ),
            );
            None
        }
    }
}

/// Links the files with protox into a schema.
fn link(
    protos: &BTreeMap<String, Text>,
    entries: &[String],
    lenient: bool,
    extra: &[prost_reflect::prost_types::FileDescriptorProto],
    cache: &ParseCache,
    diags: &mut Diagnostics,
) -> Option<Schema> {
    let memory = MemoryFileResolver { protos: protos.clone(), extra: extra.to_vec(), cache: cache.clone() };
    let mut resolver = ChainFileResolver::new();
    resolver.add(memory);
    resolver.add(GoogleFileResolver::new());
    resolver.add(BuiltinFileResolver);
    let mut compiler = protox::Compiler::with_file_resolver(resolver);
    // Source info (spans and comments) lets diagnostics about options name
    // the line; it is stripped from the descriptors the plan carries.
    compiler.include_imports(true).include_source_info(true);
    // Open files one by one so that every broken file is reported, not only
    // the first.
    let mut failed = false;
    let all: Vec<&str> = match entries {
        [] => protos.keys().map(String::as_str).collect(),
        e => e.iter().map(String::as_str).collect(),
    };
    let names = all.into_iter().chain(extra.iter().map(|f| f.name()));
    for name in names {
        if let Err(e) = compiler.open_file(name) {
            let d = to_diagnostic(&e, protos);
            if lenient {
                // Left out, as Wishmock leaves out a file it cannot load.
                let mut one = Diagnostics::default();
                one.push(d);
                diags.extend_lenient(&one, &format!("`{name}` left out"));
            } else {
                diags.push(d);
                failed = true;
            }
        }
    }
    if failed {
        return None;
    }
    add_builtins(&mut compiler, diags)?;
    let with_info = compiler.encode_file_descriptor_set();
    let encoded = without_source_info(&with_info);
    match DescriptorPool::decode(with_info.as_slice()) {
        Ok(pool) => {
            let files = match entries {
                [] => protos.len(),
                _ => pool.files().filter(|f| protos.contains_key(f.name())).count(),
            };
            Some(Schema { pool, encoded, files: files + extra.len() })
        }
        Err(e) => {
            diags.error(None, format!("protos compiled but could not be loaded: {e}"));
            None
        }
    }
}

/// A FileDescriptorSet without its files' source info
/// (`FileDescriptorProto.source_code_info`, field 9), every other byte
/// kept as it is: options' extensions (`buf.validate`, `google.api`), which
/// a decode into `prost_types` would drop, stay for reflection clients.
fn without_source_info(set: &[u8]) -> Vec<u8> {
    /// One field: its number, its bytes, and a length-delimited one's
    /// payload.
    type Field<'a> = (u64, &'a [u8], Option<&'a [u8]>);
    /// The fields of a message; None if the bytes do not parse.
    fn fields(mut b: &[u8]) -> Option<Vec<Field<'_>>> {
        fn varint(b: &mut &[u8]) -> Option<u64> {
            let mut v = 0u64;
            for shift in (0..64).step_by(7) {
                let (&byte, rest) = b.split_first()?;
                *b = rest;
                v |= u64::from(byte & 0x7f) << shift;
                if byte & 0x80 == 0 {
                    return Some(v);
                }
            }
            None
        }
        let mut out = Vec::new();
        while !b.is_empty() {
            let start = b;
            let key = varint(&mut b)?;
            let payload = match key & 7 {
                0 => {
                    varint(&mut b)?;
                    None
                }
                1 => {
                    b = b.get(8..)?;
                    None
                }
                5 => {
                    b = b.get(4..)?;
                    None
                }
                2 => {
                    let len = usize::try_from(varint(&mut b)?).ok()?;
                    let p = b.get(..len)?;
                    b = &b[len..];
                    Some(p)
                }
                _ => return None,
            };
            out.push((key >> 3, &start[..start.len() - b.len()], payload));
        }
        Some(out)
    }
    let strip = || -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(set.len());
        for (number, whole, payload) in fields(set)? {
            let (1, Some(file)) = (number, payload) else {
                out.extend_from_slice(whole);
                continue;
            };
            let mut kept = Vec::with_capacity(file.len());
            for (n, w, _) in fields(file)? {
                if n != 9 {
                    kept.extend_from_slice(w);
                }
            }
            out.push(0x0a);
            prost::encoding::encode_varint(kept.len() as u64, &mut out);
            out.extend_from_slice(&kept);
        }
        Some(out)
    };
    // protox's own encoding always parses; kept as it is otherwise.
    strip().unwrap_or_else(|| set.to_vec())
}

/// Resolves import names to the in-memory files (parsed through the
/// cache), then to the files given as descriptors.
struct MemoryFileResolver {
    protos: BTreeMap<String, Text>,
    extra: Vec<prost_reflect::prost_types::FileDescriptorProto>,
    cache: ParseCache,
}

impl FileResolver for MemoryFileResolver {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        if let Some(t) = self.protos.get(name) {
            return self.cache.get_or_parse(name, &t.text);
        }
        match self.extra.iter().find(|f| f.name() == name) {
            Some(f) => Ok(File::from_file_descriptor_proto(f.clone())),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

/// How deep `{ [ ( <` may nest in a .proto file. protox parses option
/// values (text format) recursively, and a file nesting them some thousands
/// deep overflows the stack; descriptors nested past about a hundred levels
/// do not decode anyway, and messages nest at most 32 deep.
pub const MAX_NESTING: usize = 128;

/// Where scanning resumes when a comment or a string literal starts at
/// byte `i` of a `.proto` text: past it (or at the end of its line, for an
/// unterminated string or a line comment); None when neither starts there.
fn past_comment_or_string(text: &str, i: usize) -> Option<usize> {
    let b = text.as_bytes();
    match b[i] {
        b'/' if b.get(i + 1) == Some(&b'/') => Some(b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |n| i + n)),
        b'/' if b.get(i + 1) == Some(&b'*') => Some(text[i + 2..].find("*/").map_or(b.len(), |n| i + 2 + n + 2)),
        q @ (b'"' | b'\'') => {
            let mut j = i + 1;
            while j < b.len() && b[j] != q && b[j] != b'\n' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            Some((j + 1).min(b.len()))
        }
        _ => None,
    }
}

/// The byte offset of the first opening bracket nested deeper than
/// [`MAX_NESTING`], outside comments and strings; None if there is none.
fn nesting_past_limit(text: &str) -> Option<usize> {
    let b = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        if let Some(next) = past_comment_or_string(text, i) {
            i = next;
            continue;
        }
        match b[i] {
            b'{' | b'[' | b'(' | b'<' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some(i);
                }
            }
            b'}' | b']' | b')' | b'>' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}

/// The built-in files: import name and source.
const BUILTIN: &[(&str, &str)] = &[
    ("google/rpc/status.proto", include_str!("builtin/google/rpc/status.proto")),
    ("google/rpc/error_details.proto", include_str!("builtin/google/rpc/error_details.proto")),
];

/// Built-in files compiled only when a user's proto imports them: the
/// validation rules of protovalidate and of protoc-gen-validate.
const ON_IMPORT: &[(&str, &str)] = &[
    ("buf/validate/validate.proto", include_str!("builtin/buf/validate/validate.proto")),
    ("validate/validate.proto", include_str!("builtin/validate/validate.proto")),
];

/// Resolves the built-in files by import name. It comes after the include
/// directories in the chain, so a user's copy under the same name wins.
struct BuiltinFileResolver;

impl FileResolver for BuiltinFileResolver {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        match BUILTIN.iter().chain(ON_IMPORT).find(|(n, _)| *n == name) {
            Some((n, source)) => File::from_source(n, source),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

/// Adds every built-in file the user's protos did not already bring in: not
/// under its own name (then it is already compiled, theirs or ours) and not
/// under another (a user's copy elsewhere in their tree, whose messages
/// would clash with ours).
fn add_builtins(compiler: &mut protox::Compiler, diags: &mut Diagnostics) -> Option<()> {
    for (name, source) in BUILTIN {
        let pool = compiler.descriptor_pool();
        if pool.get_file_by_name(name).is_some() {
            continue;
        }
        let file = File::from_source(name, source).expect("built-in protos parse");
        let proto = file.file_descriptor_proto();
        let package = proto.package();
        let clash =
            proto.message_type.iter().any(|m| pool.get_message_by_name(&format!("{package}.{}", m.name())).is_some());
        if clash {
            continue;
        }
        if let Err(e) = compiler.open_file(name) {
            diags.error(None, format!("built-in `{name}` does not compile with these protos: {e}"));
            return None;
        }
    }
    Some(())
}

/// Turns a protox error into a diagnostic with the file, line and column of
/// its first label.
fn to_diagnostic(e: &protox::Error, protos: &BTreeMap<String, Text>) -> Diagnostic {
    use miette::Diagnostic as _;
    let message = e.to_string();
    let file = e.file().and_then(|name| {
        let t = protos.get(name).or_else(|| protos.values().find(|t| t.shown == name))?;
        Some(SourceFile::named(&t.shown, t.text.to_string()))
    });
    let label = e.labels().and_then(|mut l| l.next());
    let span: Option<Span> = match (&file, label) {
        (Some(f), Some(l)) => Some(f.span_at(l.offset(), l.len())),
        (Some(f), None) => Some(f.line_span(1)),
        _ => None,
    };
    let mut d = Diagnostic::error(span, message);
    d.help = e.help().map(|h| h.to_string());
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_descriptors_are_those_compiled_without_source_info() {
        const PROTO: &str = "syntax = \"proto3\";\npackage p;\nimport \"google/protobuf/descriptor.proto\";\n\
            extend google.protobuf.FieldOptions { string note = 50001; }\n\
            // A comment source info keeps.\nmessage M { string a = 1 [(note) = \"kept\"]; }\n";
        struct One;
        impl FileResolver for One {
            fn open_file(&self, name: &str) -> Result<File, protox::Error> {
                match name {
                    "p.proto" => File::from_source(name, PROTO),
                    _ => GoogleFileResolver::new().open_file(name),
                }
            }
        }
        let set = |info: bool| {
            let mut c = protox::Compiler::with_file_resolver(One);
            c.include_imports(true).include_source_info(info);
            c.open_file("p.proto").expect("compiles");
            c.encode_file_descriptor_set()
        };
        let (with, without) = (set(true), set(false));
        assert!(with.len() > without.len());
        assert_eq!(without_source_info(&with), without);
        assert!(without.windows(4).any(|w| w == b"kept"), "the option's extension is kept");
    }

    #[test]
    fn nesting_is_counted_outside_comments_and_strings() {
        let deep = |n: usize| format!("option (m) = {}{};", "{a: ".repeat(n), "}".repeat(n));
        assert_eq!(nesting_past_limit(&deep(MAX_NESTING)), None);
        let text = deep(MAX_NESTING + 1);
        assert_eq!(nesting_past_limit(&text), Some(13 + 4 * MAX_NESTING));
        let hidden = format!(
            "// {}\n/* {} */ string s = 1 [default = \"{}\\\"{{\"];",
            "{".repeat(200),
            "[".repeat(200),
            "(".repeat(200)
        );
        assert_eq!(nesting_past_limit(&hidden), None);
        assert_eq!(nesting_past_limit("map<string, int32> m = 1; message A { message B { } }"), None);
    }
}
