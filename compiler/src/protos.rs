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
    // protox's parser recurses on nested option values: check the nesting
    // before any file is parsed (a file may be parsed as another's import).
    let mut too_deep = false;
    for f in &files {
        let Ok(text) = std::fs::read_to_string(f) else { continue };
        if let Some(offset) = nesting_past_limit(&text) {
            let file = SourceFile::new(f, text);
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

/// How deep `{ [ ( <` may nest in a .proto file. protox parses option
/// values (text format) recursively, and a file nesting them some thousands
/// deep overflows the stack; descriptors nested past about a hundred levels
/// do not decode anyway, and messages nest at most 32 deep.
pub const MAX_NESTING: usize = 128;

/// The byte offset of the first opening bracket nested deeper than
/// [`MAX_NESTING`], outside comments and strings; None if there is none.
fn nesting_past_limit(text: &str) -> Option<usize> {
    let b = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                i = b[i..].iter().position(|&c| c == b'\n').map_or(b.len(), |n| i + n);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i = text[i + 2..].find("*/").map_or(b.len(), |n| i + 2 + n + 2);
                continue;
            }
            q @ (b'"' | b'\'') => {
                i += 1;
                while i < b.len() && b[i] != q && b[i] != b'\n' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

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
