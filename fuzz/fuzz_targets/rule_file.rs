//! Fuzzes the compiler on rule files: the input is one rule file, compiled
//! with `wirestub_compiler::compile` against the bundled example's protos
//! (`protos/` at the repository's root: unary and streaming methods, nested
//! messages, enums, maps, well-known types).
//!
//! Input layout: the file's text (invalid UTF-8 replaced, since the compiler
//! refuses such files before parsing). It is written to a fresh temporary
//! `rules/helloworld.greeter.sayhello.yaml`, so documents without `service`
//! and `method` are rules for `helloworld.Greeter/SayHello`.
//!
//! Invariants: compiling never panics; a failure carries at least one error
//! and renders, with at most `diag::MAX_SHOWN` diagnostics kept; a success
//! has no error. A compiled plan's bytes load with
//! `Plan::from_bytes` into the same plan, the engine accepts them
//! (`wirestub_engine::load`), the dump renders, and compiling the same file
//! again gives the same bytes (plans are reproducible).
#![no_main]

#[path = "../checks/rule_file.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
