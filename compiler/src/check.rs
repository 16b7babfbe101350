//! Checking rule files: one file's text into checked documents (typed
//! rule documents, `rules.rs`, and recordings, `raw.rs`), GripMock stubs
//! expanded first, under `--lenient` a document or entry with an error
//! left out with its errors as warnings. The top of the compiler's rule
//! layers.

use crate::conditions::RegexSpec;
use crate::diag::{Diagnostics, SourceFile};
use crate::rules::{DocCx, MethodIndex, RuleDoc};
use crate::yaml;

/// The comment that makes one rule file lenient (as `--lenient` makes all).
pub const LENIENT_DIRECTIVE: &str = "# wirestub: lenient";

/// The documents of one rule file, with the regular expressions their
/// conditions use (`Op::Regex` indices count from 0 in this file).
pub struct CheckedFile {
    pub docs: Vec<RuleDoc>,
    pub regexes: Vec<RegexSpec>,
    /// Documents of recorded calls (see `raw.rs`).
    pub raw: Vec<crate::raw::RawDoc>,
}

/// Parses and checks one rule file; problems go to `diags`. `session`
/// applies to every document (from the file's place, see [`session_of`]).
pub fn check_file(
    file: &std::sync::Arc<SourceFile>,
    session: Option<&str>,
    methods: &MethodIndex,
    budget: &mut yaml::Budget,
    diags: &mut Diagnostics,
    lenient: bool,
) -> CheckedFile {
    let lenient = lenient || file.text.lines().take(20).any(|l| l.trim() == LENIENT_DIRECTIVE);
    let mut out = CheckedFile { docs: Vec::new(), regexes: Vec::new(), raw: Vec::new() };
    let nodes = match yaml::parse_with(file, budget) {
        Ok(n) => n,
        Err(d) => {
            diags.push(d);
            return out;
        }
    };
    let name = file.name.rsplit(['/', '\\']).next().unwrap_or_default();
    let stem = name.rsplit_once('.').map(|(s, _)| s).unwrap_or(name).to_string();
    // GripMock stubs become rule documents first (see `gripmock.rs`).
    let nodes = crate::gripmock::expand(nodes, methods.services.values(), diags);
    for node in &nodes {
        // Lenient: a document with an error is left out, its errors
        // warnings.
        let mut local = Diagnostics::default();
        let regexes_before = out.regexes.len();
        let target = if lenient { &mut local } else { &mut *diags };
        let mut cx = DocCx {
            stem: &stem,
            methods,
            diags: target,
            regexes: &mut out.regexes,
            aggregate: false,
            session,
            lenient,
        };
        let (docs, raw) = (out.docs.len(), out.raw.len());
        match node.map().filter(|e| e.iter().any(|(k, _)| k.scalar() == Some("raw"))) {
            Some(entries) => out.raw.extend(cx.raw_doc(node, entries)),
            None => out.docs.extend(cx.doc(node)),
        }
        if lenient {
            if local.has_errors() {
                out.docs.truncate(docs);
                out.raw.truncate(raw);
                out.regexes.truncate(regexes_before);
                diags.extend_lenient(&local, "document left out");
            } else {
                diags.extend(&local);
            }
        }
    }
    out
}
