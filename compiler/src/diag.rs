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

/// An ordered collection of diagnostics.
#[derive(Debug, Default, Clone)]
pub struct Diagnostics {
    list: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.list.push(d);
    }

    pub fn error(&mut self, span: Option<Span>, message: impl Into<String>) {
        self.push(Diagnostic::error(span, message));
    }

    pub fn has_errors(&self) -> bool {
        self.list.iter().any(|d| d.severity == Severity::Error)
    }

    pub fn error_count(&self) -> usize {
        self.list.iter().filter(|d| d.severity == Severity::Error).count()
    }

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

    /// Every diagnostic rendered, then a summary line when there are errors.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for d in &self.list {
            s.push_str(&d.render());
            s.push('\n');
        }
        let errors = self.error_count();
        if errors > 0 {
            let _ = writeln!(s, "error: {} error{} found; no plan written", errors, if errors == 1 { "" } else { "s" });
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
