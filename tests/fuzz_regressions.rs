//! Replays the fuzz inputs kept in the repository through the fuzz targets'
//! own checks, so `cargo test` runs them without cargo-fuzz or nightly:
//! every file of `fuzz/corpus/<target>/` (the seed corpora) and of
//! `fuzz/regressions/<target>/` (inputs that once crashed a target; see
//! `fuzz/regressions/README.md`).
//!
//! The checks live in `fuzz/checks/<target>.rs`, which both the fuzz target
//! and this file include as a module, so a replayed input goes through
//! exactly what the fuzzer ran.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

#[path = "../fuzz/checks/grpc_framing.rs"]
mod grpc_framing;
#[path = "../fuzz/checks/gzip.rs"]
mod gzip;
#[path = "../fuzz/checks/h2_conn.rs"]
mod h2_conn;
#[path = "../fuzz/checks/hpack.rs"]
mod hpack;
#[path = "../fuzz/checks/http1_conn.rs"]
mod http1_conn;
#[path = "../fuzz/checks/match_render.rs"]
mod match_render;
#[path = "../fuzz/checks/message_reader.rs"]
mod message_reader;
#[path = "../fuzz/checks/plan_load.rs"]
mod plan_load;
#[path = "../fuzz/checks/rule_file.rs"]
mod rule_file;
#[path = "../fuzz/checks/runtime_upload.rs"]
mod runtime_upload;
#[path = "../fuzz/checks/shared_journal_call.rs"]
mod shared_journal_call;
#[path = "../fuzz/checks/string_formats.rs"]
mod string_formats;
#[path = "../fuzz/checks/upstream_answer.rs"]
mod upstream_answer;
#[path = "../fuzz/checks/web_text.rs"]
mod web_text;
#[path = "../fuzz/checks/wire_scan.rs"]
mod wire_scan;

/// A fuzz target's checks: they panic on an input that breaks an invariant.
type Check = fn(&[u8]);

/// Every fuzz target with its checks: a target added under
/// `fuzz/fuzz_targets/` must be added here too (see `every_target_is_replayed`).
const TARGETS: [(&str, Check); 15] = [
    ("grpc_framing", grpc_framing::check),
    ("gzip", gzip::check),
    ("h2_conn", h2_conn::check),
    ("hpack", hpack::check),
    ("http1_conn", http1_conn::check),
    ("match_render", match_render::check),
    ("message_reader", message_reader::check),
    ("plan_load", plan_load::check),
    ("rule_file", rule_file::check),
    ("runtime_upload", runtime_upload::check),
    ("shared_journal_call", shared_journal_call::check),
    ("string_formats", string_formats::check),
    ("upstream_answer", upstream_answer::check),
    ("web_text", web_text::check),
    ("wire_scan", wire_scan::check),
];

/// Targets whose checks read the process-wide count of held request bytes
/// (`BUFFERED_REQUEST_BYTES`), which calls move: they must see it still while
/// they run, so they are replayed one at a time.
const COUNTING: [&str; 3] = ["h2_conn", "http1_conn", "message_reader"];

/// Held while one of [`COUNTING`] replays.
static COUNT: Mutex<()> = Mutex::new(());

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of a directory, sorted; none if it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> =
        entries.map(|e| e.expect("reading a fuzz input directory").path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

/// Runs every seed and regression input of `target`; fails naming each input
/// that panics.
fn replay(target: &str) {
    let check = TARGETS.iter().find(|(name, _)| *name == target).expect("a known target").1;
    let _alone = COUNTING.contains(&target).then(|| COUNT.lock().unwrap_or_else(PoisonError::into_inner));
    let seeds = files(&fuzz_dir().join("corpus").join(target));
    assert!(!seeds.is_empty(), "fuzz/corpus/{target}/ holds no seed");
    let regressions = files(&fuzz_dir().join("regressions").join(target));
    let mut failed = Vec::new();
    for path in seeds.iter().chain(&regressions) {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| check(&data))) {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            failed.push(format!("{}: {message}", path.display()));
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} input(s) fail the target's checks:\n  {}",
        failed.len(),
        failed.join("\n  ")
    );
}

#[test]
fn grpc_framing() {
    replay("grpc_framing");
}

#[test]
fn h2_conn() {
    replay("h2_conn");
}

#[test]
fn hpack() {
    replay("hpack");
}

#[test]
fn http1_conn() {
    replay("http1_conn");
}

#[test]
fn match_render() {
    replay("match_render");
}

#[test]
fn message_reader() {
    replay("message_reader");
}

#[test]
fn plan_load() {
    replay("plan_load");
}

#[test]
fn rule_file() {
    replay("rule_file");
}

#[test]
fn runtime_upload() {
    replay("runtime_upload");
}

#[test]
fn wire_scan() {
    replay("wire_scan");
}

/// Every target of `fuzz/Cargo.toml`'s `fuzz_targets/` is replayed here, and
/// every regression directory names a target.
#[test]
fn every_target_is_replayed() {
    let stem = |p: &PathBuf| p.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
    let known: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
    let targets: Vec<String> = files(&fuzz_dir().join("fuzz_targets")).iter().map(stem).collect();
    assert_eq!(targets, known, "fuzz/fuzz_targets/ and TARGETS differ");
    let Ok(entries) = std::fs::read_dir(fuzz_dir().join("regressions")) else { return };
    for e in entries {
        let path = e.expect("reading fuzz/regressions").path();
        if path.is_dir() {
            let name = stem(&path);
            assert!(known.contains(&name.as_str()), "fuzz/regressions/{name}/ names no fuzz target");
        }
    }
}

#[test]
fn gzip() {
    replay("gzip");
}

#[test]
fn web_text() {
    replay("web_text");
}
