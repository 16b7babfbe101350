//! The checks of the `runtime_upload` fuzz target (input layout and
//! invariants: `fuzz_targets/runtime_upload.rs`), shared with
//! `tests/fuzz_regressions.rs`, which replays the seed corpus and every
//! past crash through them.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use wirestub_compiler::protos::Text;
use wirestub_compiler::sources::{self, Cache, Sources};
use wirestub_compiler::{compile, Options};
use wirestub_engine::NoMatch;
use wirestub_plan::Plan;

/// The bundled example's plan: the base the uploads are layered over.
fn base() -> &'static Plan {
    static BASE: OnceLock<Plan> = OnceLock::new();
    BASE.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let options = Options {
            protos: vec![root.join("protos")],
            rules: vec![root.join("rules")],
            protos_only: Vec::new(),
            lenient: false,
        };
        compile(&options).unwrap_or_else(|d| panic!("the example compiles:\n{}", d.render())).plan
    })
}

/// Lets panics raised inside protox or prost-reflect (which the compiler
/// catches and reports as an error) pass quietly; any other panic goes to
/// the hook installed before (the fuzzer's, which reports a crash).
fn tolerate_linker_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let file = info.location().map(|l| l.file()).unwrap_or_default();
            if file.contains("/prost-reflect-") || file.contains("/protox-") {
                return;
            }
            previous(info)
        }));
    });
}

/// Runs the checks on one input.
pub fn check(data: &[u8]) {
    tolerate_linker_panics();
    let Some((&mode, rest)) = data.split_first() else { return };
    let base = base();
    let mut sources = Sources { base: Some(Arc::new(base.descriptors.clone())), ..Sources::default() };
    let text = || String::from_utf8_lossy(rest).into_owned();
    let upload = |name: &str| Text { shown: name.to_string(), text: text().into() };
    match mode % 3 {
        0 => {
            // A descriptor set: refused before compiling unless it decodes.
            if sources::decode_descriptor_set(rest).is_err() {
                return;
            }
            sources.descriptor_sets.insert("upload.binpb".into(), Arc::new(rest.to_vec()));
        }
        1 => {
            sources.protos = BTreeMap::from([("upload.proto".to_string(), upload("upload.proto"))]);
        }
        _ => {
            sources.rules = BTreeMap::from([("stubs/upload.json".to_string(), upload("stubs/upload.json"))]);
        }
    }
    let mut cache = Cache::default();
    let out = match sources::compile(&sources, &mut cache) {
        Ok(out) => out,
        Err(diags) => {
            assert!(diags.has_errors(), "compilation failed without an error");
            assert!(!diags.render().is_empty());
            return;
        }
    };
    let overlay_bytes = out.plan.to_bytes();
    Plan::from_bytes(&overlay_bytes).unwrap_or_else(|e| panic!("a compiled overlay does not load: {e}"));
    // Layered over the plan it was compiled against, it loads and serves.
    let layered = match wirestub_plan::layer::layer(base, &out.plan) {
        Ok(p) => p,
        Err(e) => {
            // Only a method of the base whose kind, types or mode the upload
            // changed may refuse.
            assert!(e.contains("the plan serves it as") || e.contains(" mode but "), "layering failed: {e}");
            return;
        }
    };
    let bytes = layered.to_bytes();
    Plan::from_bytes(&bytes).unwrap_or_else(|e| panic!("a layered plan does not load: {e}"));
    if let Err(e) = wirestub_engine::load(&bytes, NoMatch::NotFound) {
        panic!("the engine refuses a layered plan: {e}");
    }
    // The cache gives the same plan a second time.
    let again = sources::compile(&sources, &mut cache).unwrap_or_else(|d| panic!("recompiling fails:\n{}", d.render()));
    assert!(again.plan.to_bytes() == overlay_bytes, "a cached compilation differs");
}
