//! Compiles .proto files in process with protox: imports across files and
//! include paths, well-known types built in, no protoc needed.

use crate::diag::{Diagnostic, Diagnostics, SourceFile, Span};
use prost_reflect::DescriptorPool;
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
    let mut compiler = match protox::Compiler::new(dirs) {
        Ok(c) => c,
        Err(e) => {
            diags.push(to_diagnostic(&e, dirs));
            return None;
        }
    };
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
    let encoded = compiler.encode_file_descriptor_set();
    match DescriptorPool::decode(encoded.as_slice()) {
        Ok(pool) => Some(Schema { pool, encoded, files: files.len() }),
        Err(e) => {
            diags.error(None, format!("protos compiled but could not be loaded: {e}"));
            None
        }
    }
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
