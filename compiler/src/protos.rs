//! Compiles .proto files in process with protox: imports across files and
//! include paths, well-known types built in, no protoc needed.
//!
//! The google.rpc protos of the rich error model (`google/rpc/status.proto`,
//! `google/rpc/error_details.proto`, in `src/builtin/`) are built in too:
//! user protos may import them without shipping them, and they are always
//! part of the schema (and so of the plan's descriptors), for error details.
//! A user's own copy, under the same import name or any other, wins.

use crate::diag::{Diagnostic, Diagnostics, SourceFile, Span};
use prost_reflect::DescriptorPool;
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver, IncludeFileResolver};
use std::path::{Path, PathBuf};

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

pub fn compile(dirs: &[PathBuf], diags: &mut Diagnostics) -> Option<Schema> {
    let mut files = Vec::new();
    for dir in dirs {
        match list_files(dir, &["proto"]) {
            Ok(f) => files.extend(f),
            Err(e) => {
                diags.error(None, format!("cannot read proto directory `{}`: {e}", dir.display()));
                return None;
            }
        }
    }
    if files.is_empty() {
        let shown: Vec<String> = dirs.iter().map(|d| format!("`{}`", d.display())).collect();
        diags.error(None, format!("no .proto files found in {}", shown.join(", ")));
        return None;
    }
    let mut resolver = ChainFileResolver::new();
    for dir in dirs {
        resolver.add(IncludeFileResolver::new(dir.clone()));
    }
    resolver.add(GoogleFileResolver::new());
    resolver.add(BuiltinFileResolver);
    let mut compiler = protox::Compiler::with_file_resolver(resolver);
    compiler.include_imports(true).include_source_info(false);
    // Open files one by one so that every broken file is reported, not only
    // the first.
    let mut failed = false;
    for f in &files {
        if let Err(e) = compiler.open_file(f) {
            diags.push(to_diagnostic(&e, dirs));
            failed = true;
        }
    }
    if failed {
        return None;
    }
    add_builtins(&mut compiler, diags)?;
    let encoded = compiler.encode_file_descriptor_set();
    match DescriptorPool::decode(encoded.as_slice()) {
        Ok(pool) => Some(Schema { pool, encoded, files: files.len() }),
        Err(e) => {
            diags.error(None, format!("protos compiled but could not be loaded: {e}"));
            None
        }
    }
}

/// The built-in files: import name and source.
const BUILTIN: &[(&str, &str)] = &[
    ("google/rpc/status.proto", include_str!("builtin/google/rpc/status.proto")),
    ("google/rpc/error_details.proto", include_str!("builtin/google/rpc/error_details.proto")),
];

/// Resolves the built-in files by import name. It comes after the include
/// directories in the chain, so a user's copy under the same name wins.
struct BuiltinFileResolver;

impl FileResolver for BuiltinFileResolver {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        match BUILTIN.iter().find(|(n, _)| *n == name) {
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
fn to_diagnostic(e: &protox::Error, dirs: &[PathBuf]) -> Diagnostic {
    use miette::Diagnostic as _;
    let message = e.to_string();
    let file = e.file().and_then(|name| {
        let direct = Path::new(name);
        let path = if direct.exists() {
            Some(direct.to_path_buf())
        } else {
            dirs.iter().map(|d| d.join(name)).find(|p| p.exists())
        }?;
        let text = std::fs::read_to_string(&path).ok()?;
        Some(SourceFile::new(&path, text))
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
