//! Regular expressions of the rule language, compiled ahead of time into
//! regex-automata dense DFAs and serialized into the plan, so the engine only
//! deserializes and searches.
//!
//! The syntax is regex-automata's (Rust regex syntax), which covers what rule
//! files use in practice: classes, anchors, repetition, alternation, Unicode.
//! Look-around and back-references have no DFA and are reported at compile
//! time. JavaScript flags map as: `i` case-insensitive, `m` multi-line, `s`
//! dot matches newline; `u`, `g` and `y` change nothing for a match test.

use crate::conditions::RegexSpec;
use crate::diag::{Diagnostic, Diagnostics};
use regex_automata::dfa::{dense, StartKind};
use regex_automata::util::syntax;

/// Largest DFA accepted for one expression, in bytes.
const SIZE_LIMIT: usize = 8 << 20;

/// Compiles every expression; `None` where compilation failed (and a
/// diagnostic was pushed).
pub fn compile_all(specs: &[RegexSpec], diags: &mut Diagnostics) -> Vec<Option<Vec<u8>>> {
    specs.iter().map(|spec| compile(spec, diags)).collect()
}

fn compile(spec: &RegexSpec, diags: &mut Diagnostics) -> Option<Vec<u8>> {
    let syntax = syntax::Config::new()
        .case_insensitive(spec.flags.contains('i'))
        .multi_line(spec.flags.contains('m'))
        .dot_matches_new_line(spec.flags.contains('s'));
    let config = dense::Config::new()
        .start_kind(StartKind::Unanchored)
        .dfa_size_limit(Some(SIZE_LIMIT))
        .determinize_size_limit(Some(SIZE_LIMIT));
    match dense::Builder::new().syntax(syntax).configure(config).build(&spec.pattern) {
        Ok(dfa) => {
            let (bytes, pad) = dfa.to_bytes_little_endian();
            Some(bytes[pad..].to_vec())
        }
        Err(e) => {
            // The most specific cause is the last in the chain (the syntax
            // error, with its position in the pattern).
            let mut cause: &dyn std::error::Error = &e;
            while let Some(next) = cause.source() {
                cause = next;
            }
            let detail =
                cause.to_string().lines().last().unwrap_or_default().trim().trim_start_matches("error: ").to_string();
            let message = format!("invalid regular expression `{}`: {detail}", spec.pattern);
            let help = if spec.pattern.contains("(?=") || spec.pattern.contains("(?!") || spec.pattern.contains("(?<") {
                "look-around is not supported: matching is done by a DFA"
            } else if spec.pattern.contains("\\b") || spec.pattern.contains("\\B") {
                "Unicode word boundaries are not supported by DFAs; use the ASCII form `(?-u:\\b)`"
            } else {
                "the syntax is Rust's regex syntax; back-references and look-around are not supported"
            };
            diags.push(Diagnostic::error(Some(spec.span.clone()), message).with_help(help));
            None
        }
    }
}
