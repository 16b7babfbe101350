//! The checks of the `rule_file` fuzz target (input layout and invariants:
//! `fuzz_targets/rule_file.rs`), shared with `tests/fuzz_regressions.rs`,
//! which replays the seed corpus and every past crash through them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use wirestub_compiler::diag::MAX_SHOWN;
use wirestub_compiler::{compile, Options, Severity};
use wirestub_engine::NoMatch;
use wirestub_plan::Plan;

/// The rule file's name, which names `helloworld.Greeter/SayHello` for
/// documents without `service` and `method`.
const FILE_NAME: &str = "helloworld.greeter.sayhello.yaml";

/// Runs the checks on one input.
pub fn check(data: &[u8]) {
    // Invalid UTF-8 is refused before parsing; lossy text keeps the fuzzer's
    // byte-level mutations useful.
    let text = String::from_utf8_lossy(data);
    let dir = Workdir::new();
    let rules = dir.0.join("rules");
    std::fs::create_dir_all(&rules).expect("creating the rules directory");
    std::fs::write(rules.join(FILE_NAME), text.as_bytes()).expect("writing the rule file");
    let options = Options {
        protos: vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../protos")],
        rules: vec![rules],
        protos_only: Vec::new(),
        lenient: false,
    };

    let out = match compile(&options) {
        Ok(out) => out,
        Err(diags) => {
            assert!(diags.has_errors(), "compilation failed without an error");
            // However many mistakes (an alias repeats its anchor's), only the
            // first are kept and shown, and the rest are counted.
            assert!(diags.iter().count() <= MAX_SHOWN, "more than {MAX_SHOWN} diagnostics kept");
            assert!(diags.error_count() >= diags.iter().filter(|d| d.severity == Severity::Error).count());
            assert!(!diags.render().is_empty());
            return;
        }
    };
    assert!(!out.warnings.has_errors(), "compilation succeeded with errors");
    assert!(out.warnings.iter().count() <= MAX_SHOWN, "more than {MAX_SHOWN} warnings kept");
    let _ = out.warnings.render();
    let _ = out.summary();

    let bytes = out.plan.to_bytes();
    let loaded = Plan::from_bytes(&bytes).unwrap_or_else(|e| panic!("a compiled plan does not load: {e}"));
    // `==` fails on NaN values; their rendering does not.
    assert!(
        loaded == out.plan || format!("{loaded:?}") == format!("{:?}", out.plan),
        "the compiled plan changed when loaded"
    );
    if let Err(e) = wirestub_engine::load(&bytes, NoMatch::NotFound) {
        panic!("the engine refuses a compiled plan: {e}");
    }
    let _ = wirestub_compiler::dump(&loaded);

    // Plans are reproducible byte for byte.
    let again = compile(&options).unwrap_or_else(|d| panic!("the second compilation fails:\n{}", d.render()));
    assert!(again.plan.to_bytes() == bytes, "compiling the same rule file twice gives different plans");
}

/// A fresh directory for one input, removed afterwards.
struct Workdir(PathBuf);

impl Workdir {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("wirestub-fuzz-rule-file-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Workdir(dir)
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
