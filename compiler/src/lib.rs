//! The wirestub compiler: turns .proto files and rule files into a plan.
//!
//! The pipeline is `protos` (schema) → `yaml` + `rules` (checked rule
//! documents, with spans) → `lower` (the flat plan). Every pass reports into
//! one [`Diagnostics`], so a run shows every problem at once.

mod canonical;
mod cel_text;
pub mod check;
pub mod conditions;
mod details;
pub mod diag;
pub mod gripmock;
mod lower;
pub mod paths;
pub mod protos;
pub mod raw;
mod regex;
pub mod rules;
pub mod sources;
mod template;
mod validation;
pub mod values;
pub mod yaml;

pub use diag::{Diagnostic, Diagnostics, Severity};
use std::path::PathBuf;
pub use wirestub_plan::Plan;

/// What to compile.
#[derive(Debug, Clone)]
pub struct Options {
    pub protos: Vec<PathBuf>,
    pub rules: Vec<PathBuf>,
    /// Entry files (paths below a protos directory): only they and what
    /// they import are compiled; empty for every file.
    pub protos_only: Vec<String>,
    /// What Wishmock ignores is a warning, not an error (see
    /// [`sources::Sources::lenient`]).
    pub lenient: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            protos: vec![PathBuf::from("protos")],
            rules: vec![PathBuf::from("rules")],
            protos_only: Vec::new(),
            lenient: false,
        }
    }
}

/// A successful compilation: the plan, any warnings, and counts for the
/// summary line.
pub struct Output {
    pub plan: Plan,
    pub warnings: Diagnostics,
    pub proto_files: usize,
    pub rule_docs: usize,
    /// The test sessions of the rule files, by file name (see
    /// [`sources::Sources::rules`]); files without any are left out.
    pub sessions: std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    /// Whether a file also holds documents without a session.
    pub unscoped: std::collections::BTreeSet<String>,
}

impl Output {
    pub fn summary(&self) -> String {
        let rules: usize = self.plan.methods.iter().map(|m| m.rules.len()).sum();
        let with_rules = self.plan.methods.iter().filter(|m| !m.rules.is_empty()).count();
        format!(
            "{} proto files, {} rule documents: {} methods ({} with rules), {} rules",
            self.proto_files,
            self.rule_docs,
            self.plan.methods.len(),
            with_rules,
            rules
        )
    }
}

/// Compiles the protos and rules below the option's directories. On
/// failure, the diagnostics hold at least one error (and every other
/// problem found).
pub fn compile(options: &Options) -> Result<Output, Diagnostics> {
    let mut diags = Diagnostics::default();
    let sources = sources::Sources::read(options, &mut diags);
    if diags.has_errors() {
        diags.sort();
        return Err(diags);
    }
    let out = sources::compile(&sources, &mut sources::Cache::default());
    // Without protos only recordings (raw rules) have anything to serve.
    if sources.protos.is_empty() && sources.descriptor_sets.is_empty() {
        let untyped = |o: &Output| o.plan.methods.iter().any(|m| m.input_type.is_empty());
        if !out.as_ref().is_ok_and(untyped) {
            let mut diags = out.err().unwrap_or_default();
            let shown: Vec<String> = options.protos.iter().map(|d| format!("`{}`", d.display())).collect();
            diags.error(None, format!("no .proto files found in {}", shown.join(", ")));
            diags.sort();
            return Err(diags);
        }
    }
    out
}

/// Renders a plan readably, decoding each response body to protobuf JSON
/// with the plan's own descriptors.
pub fn dump(plan: &Plan) -> String {
    let pool = prost_reflect::DescriptorPool::decode(plan.descriptors.as_slice()).ok();
    plan.dump_with(&|method, body| {
        let desc = pool.as_ref().and_then(|p| p.get_message_by_name(&method.output_type));
        match desc.and_then(|d| prost_reflect::DynamicMessage::decode(d, body).ok()) {
            Some(msg) => serde_json::to_string(&msg).unwrap_or_else(|e| format!("<{e}>")),
            None => format!("<{} bytes not decodable as {}>", body.len(), method.output_type),
        }
    })
}
