//! Criterion benchmarks of the runtime API on a running engine with 10,000
//! rules: how long a change takes to reach the next call.
//!
//! The claim measured is "one rule added to a running engine with 10,000
//! rules answers the next call within N ms". The engine state serves a plan
//! compiled by [`Runtime::from_dirs`] from 10,000 small rule files (one
//! `helloworld.Greeter/SayHello` rule each, `when: request.name: "user-N"`)
//! generated into a scratch directory, as `engine run --protos --rules`
//! would.
//!
//! - `runtime/add_one_rule_10k`: [`Runtime::apply`] of one
//!   `Change::PutRule` (a new rule text each time): the in-process compile
//!   with the runtime's warm cache, the atomic write of the file (with its
//!   fsyncs) and the swap. `apply` returns after the swap, so this is the
//!   time from the API call to the new plan being current. Only the put is
//!   timed; the same file is then deleted (untimed) so the rule count stays
//!   at 10,000.
//! - `runtime/swap_10k`: [`State::swap`] of an already compiled 10,000-rule
//!   plan: the cost of the swap alone (encoding the plan for its identity,
//!   `Served::new`, the metrics and reflection, dropping the old
//!   generation).
//! - `runtime/compile_10k_cached`: `sources::compile` of the 10,000 files
//!   plus one changed file with a warm cache: the compile step of an apply.
//! - `runtime/compile_10k_cold`: the same compile with an empty
//!   `Cache::default()`, i.e. every rule file parsed and checked again, for
//!   comparison with the cached path.
//!
//! The bench uses mimalloc, the engine binary's allocator: most of this work
//! is allocating and freeing per-rule structures, and glibc's malloc makes
//! it markedly slower.
//!
//! Before measuring, one apply is checked end to end: the new rule's
//! request selects nothing before, and selects the new rule's reply through
//! the engine's matcher on the current generation right after `apply`
//! returns, with 10,001 rules in the plan.
//!
//! Run with `cargo bench -p wirestub-benches --bench runtime`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use wirestub_compiler::sources::{self, Cache};
use wirestub_engine::call::matcher::{Messages, Request};
use wirestub_engine::runtime::{Change, Runtime};
use wirestub_engine::{NoMatch, State};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RULES: usize = 10_000;
const PATH: &str = "/helloworld.Greeter/SayHello";

fn rule_text(name: &str, reply: &str) -> String {
    format!(
        "service: helloworld.Greeter\nmethod: SayHello\nresponses:\n  - when:\n      request.name: \"{name}\"\n    body:\n      message: \"{reply}\"\n"
    )
}

/// A scratch directory with the bundled `helloworld.proto` and `n` rule
/// files `rules/user-N.yaml`.
fn scratch(n: usize) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wirestub-runtime-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (protos, rules) = (dir.join("protos"), dir.join("rules"));
    std::fs::create_dir_all(&protos).unwrap();
    std::fs::create_dir_all(&rules).unwrap();
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../protos/helloworld.proto");
    std::fs::copy(&proto, protos.join("helloworld.proto")).unwrap();
    for i in 0..n {
        std::fs::write(rules.join(format!("user-{i}.yaml")), rule_text(&format!("user-{i}"), &format!("hi user-{i}")))
            .unwrap();
    }
    dir
}

/// `HelloRequest { name }`, encoded by hand.
fn hello(name: &str) -> Vec<u8> {
    assert!(name.len() < 128);
    let mut m = vec![0x0a, name.len() as u8];
    m.extend_from_slice(name.as_bytes());
    m
}

/// The reply body of the rule the current generation selects for `name`,
/// through the engine's matcher, or None when no rule matches.
fn answer(state: &State, name: &str) -> Option<bytes::Bytes> {
    let generation = state.current();
    let method = generation.served.method(PATH).expect("SayHello is served");
    let message = hello(name);
    let one = [&message[..]];
    let messages = Messages::one(&one);
    let headers = http::HeaderMap::new();
    let request = Request::read(method, &messages, &headers).expect("the request reads");
    let response = request.select().expect("the request is well formed")?;
    Some(method.responses[response as usize].body.clone())
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn rule_count(state: &State) -> usize {
    state.current().served.methods.iter().map(|m| m.plan.rules.len()).sum()
}

fn runtime(c: &mut Criterion) {
    let dir = scratch(RULES);
    let options = wirestub_compiler::Options {
        protos: vec![dir.join("protos")],
        rules: vec![dir.join("rules")],
        protos_only: Vec::new(),
        lenient: false,
    };
    let t = Instant::now();
    let (runtime, (plan, bytes, source)) = Runtime::from_dirs(options).unwrap_or_else(|e| panic!("{e}"));
    let first_compile = t.elapsed();
    let plan_10k = plan.clone();
    let state = State::new(plan, bytes.as_deref(), source, NoMatch::NotFound, 2, 0).expect("the plan serves");
    eprintln!("setup: first compile of {RULES} rule files (from_dirs, cold) took {first_compile:?}");
    assert_eq!(rule_count(&state), RULES);

    // The next call is answered by the new rule.
    assert!(contains(&answer(&state, "user-9999").expect("user-9999 matches"), "hi user-9999"));
    assert_eq!(answer(&state, "newcomer"), None, "no rule answers before the change");
    let put = Change::PutRule { name: "extra.yaml".into(), text: rule_text("newcomer", "welcome newcomer") };
    let t = Instant::now();
    let applied = runtime.apply(&state, &[put]).unwrap_or_else(|e| panic!("{e:?}"));
    let one_apply = t.elapsed();
    let reply = answer(&state, "newcomer").expect("the new rule answers the next call");
    assert!(contains(&reply, "welcome newcomer"), "the new rule's reply");
    assert_eq!(applied.reloaded.rules, RULES + 1);
    assert_eq!(rule_count(&state), RULES + 1);
    assert!(dir.join("rules/extra.yaml").is_file(), "the change is persisted");
    eprintln!("check: one apply took {one_apply:?}; the next call for `newcomer` got the new rule's reply");
    runtime.apply(&state, &[Change::DeleteRule { name: "extra.yaml".into() }]).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(answer(&state, "newcomer"), None, "the delete is served too");
    assert_eq!(rule_count(&state), RULES);

    let mut group = c.benchmark_group("runtime");
    group.sample_size(10).sampling_mode(SamplingMode::Flat).measurement_time(Duration::from_secs(8));
    group.warm_up_time(Duration::from_secs(1));

    let mut n = 0u64;
    group.bench_function("add_one_rule_10k", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let text = rule_text(&format!("extra-{n}"), "extra");
                let t = Instant::now();
                let applied = runtime.apply(&state, &[Change::PutRule { name: "extra.yaml".into(), text }]);
                timed += t.elapsed();
                assert_eq!(applied.unwrap_or_else(|e| panic!("{e:?}")).reloaded.rules, RULES + 1);
                runtime
                    .apply(&state, &[Change::DeleteRule { name: "extra.yaml".into() }])
                    .unwrap_or_else(|e| panic!("{e:?}"));
            }
            timed
        })
    });

    group.bench_function("swap_10k", |b| {
        b.iter_batched(
            || plan_10k.clone(),
            |plan| state.swap(plan, None, "bench".into()).unwrap(),
            BatchSize::PerIteration,
        )
    });
    assert_eq!(rule_count(&state), RULES);

    let base = runtime.sources();
    assert_eq!(base.rules.len(), RULES);
    let mut cache = Cache::default();
    sources::compile(&base, &mut cache).unwrap_or_else(|d| panic!("{}", d.render()));
    let mut m = 0u64;
    group.bench_function("compile_10k_cached", |b| {
        b.iter_batched(
            || {
                m += 1;
                let mut next = (*base).clone();
                let text = rule_text(&format!("cached-{m}"), "cached");
                next.rules.insert(
                    "extra.yaml".into(),
                    wirestub_compiler::protos::Text { shown: "extra.yaml".into(), text: text.as_str().into() },
                );
                next
            },
            |next| {
                let out = sources::compile(&next, &mut cache).unwrap_or_else(|d| panic!("{}", d.render()));
                assert_eq!(out.plan.methods.iter().map(|m| m.rules.len()).sum::<usize>(), RULES + 1);
                out
            },
            BatchSize::PerIteration,
        )
    });

    group.bench_function("compile_10k_cold", |b| {
        b.iter(|| {
            let out =
                sources::compile(black_box(&base), &mut Cache::default()).unwrap_or_else(|d| panic!("{}", d.render()));
            assert_eq!(out.plan.methods.iter().map(|m| m.rules.len()).sum::<usize>(), RULES);
            out
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, runtime);
criterion_main!(benches);
