//! Diagnostics: every problem the compiler finds, with file, line, column, a
//! help line where one helps, rendered like rustc's errors.
//!
//! The compiler never stops at the first problem: passes push into a
//! [`Diagnostics`] and the caller decides at the end whether any error means
//! no plan is written.

use std::fmt::Write;
use std::path::Path;
use std::sync::Arc;

/// A position in a source file. Lines and columns are 1-based; `len` is the
/// number of characters to underline (at least one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub file: Arc<SourceFile>,
    pub line: u32,
    pub col: u32,
    pub len: u32,
}

/// A file the compiler read, kept so diagnostics can quote the line.
#[derive(Debug, PartialEq, Eq)]
pub struct SourceFile {
    /// The path as shown to the user.
    pub name: String,
    pub text: String,
}

impl SourceFile {
    pub fn new(path: &Path, text: String) -> Arc<SourceFile> {
        Arc::new(SourceFile { name: path.display().to_string(), text })
    }

    /// A file known by the name shown to the user (a path, or an upload's
    /// name).
    pub fn named(name: &str, text: String) -> Arc<SourceFile> {
        Arc::new(SourceFile { name: name.to_string(), text })
    }

    /// The span of a whole line, or of the file's start.
    pub fn line_span(self: &Arc<Self>, line: u32) -> Span {
        Span { file: self.clone(), line, col: 1, len: 1 }
    }

    /// Converts a byte offset into a span.
    pub fn span_at(self: &Arc<Self>, offset: usize, len: usize) -> Span {
        let offset = offset.min(self.text.len());
        let before = &self.text[..floor_char_boundary(&self.text, offset)];
        let line = before.matches('\n').count() as u32 + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let col = before[line_start..].chars().count() as u32 + 1;
        Span { file: self.clone(), line, col, len: len.max(1) as u32 }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub message: String,
    pub span: Option<Span>,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn error(span: Option<Span>, message: impl Into<String>) -> Self {
        Diagnostic { severity: Severity::Error, message: message.into(), span, help: None }
    }

    pub fn warning(span: Option<Span>, message: impl Into<String>) -> Self {
        Diagnostic { severity: Severity::Warning, message: message.into(), span, help: None }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// Renders one diagnostic:
    ///
    /// ```text
    /// error: unknown field `nme` in message `helloworld.HelloRequest`
    ///   --> rules/hello.yaml:4:7
    ///    |
    ///  4 |       nme: Tom
    ///    |       ^^^
    ///    = help: did you mean `name`?
    /// ```
    pub fn render(&self) -> String {
        let mut s = String::new();
        let label = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let _ = writeln!(s, "{label}: {}", self.message);
        let mut gutter = 1;
        if let Some(span) = &self.span {
            let line_text = span.file.text.lines().nth(span.line as usize - 1).unwrap_or("");
            gutter = span.line.to_string().len();
            let pad = " ".repeat(gutter);
            let _ = writeln!(s, "{pad}--> {}:{}:{}", span.file.name, span.line, span.col);
            if !line_text.is_empty() {
                let _ = writeln!(s, "{pad} |");
                let _ = writeln!(s, "{} | {}", span.line, line_text.trim_end());
                let avail = line_text.chars().count().saturating_sub(span.col as usize - 1).max(1);
                let carets = "^".repeat((span.len as usize).min(avail));
                let _ = writeln!(s, "{pad} | {}{carets}", " ".repeat(span.col as usize - 1));
            }
        }
        if let Some(help) = &self.help {
            let _ = writeln!(s, "{} = help: {help}", " ".repeat(gutter));
        }
        s
    }
}

/// How many diagnostics are kept and shown; the others are only counted.
/// A hundred is more than anyone reads before fixing the first ones, and
/// it bounds the memory and the output of a run over inputs with mistakes
/// repeated many times (a generated file, an alias copied everywhere).
pub const MAX_SHOWN: usize = 100;

/// An ordered collection of diagnostics: the first [`MAX_SHOWN`] distinct
/// ones pushed, and a count of the others.
#[derive(Debug, Default, Clone)]
pub struct Diagnostics {
    list: Vec<Diagnostic>,
    /// Errors and warnings pushed once the list was full.
    more_errors: usize,
    more_warnings: usize,
}

impl Diagnostics {
    /// Adds a diagnostic, unless the same one is already there (an alias
    /// repeats its anchor's mistakes at the same place).
    pub fn push(&mut self, d: Diagnostic) {
        if self.list.contains(&d) {
            return;
        }
        if self.list.len() >= MAX_SHOWN {
            match d.severity {
                Severity::Error => self.more_errors += 1,
                Severity::Warning => self.more_warnings += 1,
            }
            return;
        }
        self.list.push(d);
    }

    pub fn error(&mut self, span: Option<Span>, message: impl Into<String>) {
        self.push(Diagnostic::error(span, message));
    }

    /// Adds every diagnostic of `other`, and its counts of those not kept.
    pub fn extend(&mut self, other: &Diagnostics) {
        for d in &other.list {
            self.push(d.clone());
        }
        self.more_errors += other.more_errors;
        self.more_warnings += other.more_warnings;
    }

    /// Adds `other`'s diagnostics with every error made a warning saying
    /// what was left out (`--lenient`).
    pub fn extend_lenient(&mut self, other: &Diagnostics, left_out: &str) {
        for d in &other.list {
            let mut d = d.clone();
            if d.severity == Severity::Error {
                d.severity = Severity::Warning;
                d.message = format!("{} ({left_out}: --lenient)", d.message);
            }
            self.push(d);
        }
        self.more_warnings += other.more_errors + other.more_warnings;
    }

    pub fn has_errors(&self) -> bool {
        self.more_errors > 0 || self.list.iter().any(|d| d.severity == Severity::Error)
    }

    /// Every error pushed, those not kept included.
    pub fn error_count(&self) -> usize {
        self.more_errors + self.list.iter().filter(|d| d.severity == Severity::Error).count()
    }

    /// The diagnostics kept (at most [`MAX_SHOWN`]).
    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.list.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Sorts by file, line and column so output is stable whatever order the
    /// passes ran in; diagnostics without a location come first.
    pub fn sort(&mut self) {
        self.list.sort_by(|a, b| {
            let key = |d: &Diagnostic| d.span.as_ref().map(|s| (s.file.name.clone(), s.line, s.col));
            key(a).cmp(&key(b))
        });
        self.list.dedup();
    }

    /// Every diagnostic kept rendered, a note counting those not kept, then
    /// a summary line when there are errors.
    pub fn render(&self) -> String {
        self.render_ending(None)
    }

    /// [`Diagnostics::render`], its summary line saying what the errors
    /// caused (`no plan written`).
    pub fn render_ending(&self, consequence: Option<&str>) -> String {
        let mut s = String::new();
        for d in &self.list {
            s.push_str(&d.render());
            s.push('\n');
        }
        let more = self.more_errors + self.more_warnings;
        if more > 0 {
            let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
            let what = match (self.more_errors, self.more_warnings) {
                (e, 0) => count(e, "more error"),
                (0, w) => count(w, "more warning"),
                (e, w) => format!("{} and {}", count(e, "more error"), count(w, "more warning")),
            };
            let _ = writeln!(s, "note: {what} not shown; only the first {MAX_SHOWN} diagnostics are\n");
        }
        let errors = self.error_count();
        if errors > 0 {
            let plural = if errors == 1 { "" } else { "s" };
            let _ = match consequence {
                Some(c) => writeln!(s, "error: {errors} error{plural} found; {c}"),
                None => writeln!(s, "error: {errors} error{plural} found"),
            };
        }
        s
    }
}

/// The candidate closest to `name`, if it is close enough to be a likely typo.
pub fn near_miss<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let lower = name.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(&lower, &c.to_ascii_lowercase()), c))
        .filter(|(d, c)| *d <= (c.len().max(name.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// "did you mean `x`?" or a short list of what is allowed.
pub fn suggest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str> + Clone) -> String {
    if let Some(c) = near_miss(name, candidates.clone()) {
        return format!("did you mean `{c}`?");
    }
    let all: Vec<&str> = candidates.into_iter().collect();
    if all.is_empty() {
        return "there are none".to_string();
    }
    let shown: Vec<String> = all.iter().take(12).map(|c| format!("`{c}`")).collect();
    let more = if all.len() > 12 { format!(" and {} more", all.len() - 12) } else { String::new() };
    format!("expected one of {}{more}", shown.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(line: u32, message: &str) -> Diagnostic {
        let file = SourceFile::new(Path::new("t.yaml"), "a: 1\n".repeat(300));
        Diagnostic::error(Some(file.line_span(line)), message)
    }

    #[test]
    fn only_the_first_diagnostics_are_kept_the_others_counted() {
        let mut diags = Diagnostics::default();
        let file = SourceFile::new(Path::new("t.yaml"), "a: 1\n".repeat(300));
        for line in 1..=250 {
            diags.push(Diagnostic::error(Some(file.line_span(line)), "bad"));
        }
        diags.push(Diagnostic::warning(None, "odd"));
        diags.sort();
        assert_eq!(diags.iter().count(), MAX_SHOWN);
        assert_eq!(diags.error_count(), 250);
        assert!(diags.has_errors());
        let text = diags.render_ending(Some("no plan written"));
        assert_eq!(text.matches("error: bad").count(), MAX_SHOWN);
        assert!(text.ends_with(
            "note: 150 more errors and 1 more warning not shown; only the first 100 diagnostics are\n\n\
             error: 250 errors found; no plan written\n"
        ));
    }

    #[test]
    fn repeated_diagnostics_are_kept_once() {
        let mut diags = Diagnostics::default();
        for _ in 0..1000 {
            diags.push(at(3, "bad"));
            diags.push(at(2, "worse"));
        }
        assert_eq!(diags.iter().count(), 2);
        assert_eq!(diags.error_count(), 2);
        assert!(!diags.render().contains("not shown"));
    }
}
