//! Fuzzes what the runtime API compiles from an upload: a descriptor set
//! (`POST /api/descriptors`), a `.proto` file, or a rule file or GripMock
//! stub, compiled with `wirestub_compiler::sources::compile` against the
//! bundled example's plan and layered over it (`wirestub_plan::layer`).
//!
//! Input layout: one byte whose value modulo 3 picks the kind (0: the rest
//! is a descriptor set's bytes; 1: a `.proto` file's text; 2: a rule file's
//! text, named as a GripMock stub file), then the upload.
//!
//! Invariants: nothing panics (but inside protox or prost-reflect, which
//! panic on some malformed descriptors: the compiler catches those and
//! reports them as errors); a failed compilation carries an error; a
//! compiled overlay loads; layered over the example plan it loads in
//! `plan/` and the engine (or layering refuses a method whose kind or types
//! changed); compiling again through the cache gives the same bytes.
#![no_main]

#[path = "../checks/runtime_upload.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
