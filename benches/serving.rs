//! Criterion benchmarks of serving work outside the matcher: loading a plan
//! and rendering templated responses.
//!
//! `plan/*` measures what the engine does once at start: the plan reader's
//! validation (`Plan::from_bytes`) and the engine's preparation
//! (`Served::new`: prepared bytes and header maps, DFAs, rule indexes), for
//! the bundled example and for a method with 10,000 rules.
//!
//! `template/*` measures rendering a templated reply per call
//! (`template::render`, what the engine does for a rule whose body holds
//! `{{ ... }}`): one hole in a 200-byte reply (the load bench's
//! `bench.v1.Bench/Template`), and a reply with eight holes, numbers and
//! nested messages. `answer/*` puts it in context: reading the request,
//! selecting the rule and producing the reply bytes, for a templated reply
//! and for a prepared one. `h2_conn/*` measures the native HTTP/2 stack's
//! frame handling end to end: a connection fed the client preface and 100
//! pipelined SayHello calls (HEADERS with literal fields, then DATA), all
//! answered from the read buffer into the output buffer, socket excluded.
//! Every bench checks its result once before measuring.
//!
//! Run with `cargo bench -p wirestub-benches --bench serving`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use wirestub_engine::call::matcher::{Messages, Request};
use wirestub_engine::call::template::{self, Context};
use wirestub_engine::{NoMatch, Plan, Served};

// ---- plans ------------------------------------------------------------------

fn compile(protos: &[PathBuf], rules: &[PathBuf]) -> Plan {
    wirestub_compiler::compile(&wirestub_compiler::Options {
        protos: protos.to_vec(),
        rules: rules.to_vec(),
        protos_only: Vec::new(),
        lenient: false,
    })
    .unwrap_or_else(|d| panic!("{}", d.render()))
    .plan
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The bundled example: `protos/` and `rules/`.
fn example_plan() -> Plan {
    let root = workspace();
    compile(&[root.join("protos")], &[root.join("rules")])
}

/// The load bench's service: `benches/plan/`.
fn bench_plan() -> Plan {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("plan");
    compile(&[dir.join("protos")], &[dir.join("rules")])
}

/// Compiles one proto file and one rule file written to a scratch directory.
fn compile_text(name: &str, proto: &str, rules: &str) -> Plan {
    let dir = std::env::temp_dir().join(format!("wirestub-serving-{}-{name}", std::process::id()));
    let (protos_dir, rules_dir) = (dir.join("protos"), dir.join("rules"));
    std::fs::create_dir_all(&protos_dir).unwrap();
    std::fs::create_dir_all(&rules_dir).unwrap();
    std::fs::write(protos_dir.join("b.proto"), proto).unwrap();
    std::fs::write(rules_dir.join("b.yaml"), rules).unwrap();
    let plan = compile(&[protos_dir], &[rules_dir]);
    let _ = std::fs::remove_dir_all(&dir);
    plan
}

/// One method with `n` rules keyed on `user_id`, plus a regex rule and a
/// fallback: the shape of a large generated mock.
fn plan_with_rules(n: usize) -> Plan {
    let proto = "syntax = \"proto3\";\npackage b;\nservice S { rpc M (Req) returns (Resp); }\n\
                 message Req { string user_id = 1; string region = 2; int32 tier = 3; }\n\
                 message Resp { string who = 1; }\n";
    let mut rules = String::from("service: b.S\nmethod: M\nresponses:\n");
    for i in 0..n {
        rules.push_str(&format!(
            "  - {{ when: {{ request.user_id: user-{i}, request.tier: {{ gte: 1 }} }}, body: {{ who: u{i} }} }}\n"
        ));
    }
    rules.push_str("  - { when: { request.region: { regex: \"^eu-\" } }, body: { who: europe } }\n");
    rules.push_str("  - { body: { who: nobody } }\n");
    compile_text(&format!("rules-{n}"), proto, &rules)
}

fn plan_loading(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan");
    for (name, plan) in [("example", example_plan()), ("10k_rules", plan_with_rules(10_000))] {
        let bytes = plan.to_bytes();
        assert_eq!(Plan::from_bytes(&bytes).expect("the plan loads"), plan, "the plan reads back unchanged");
        assert!(Served::new(plan.clone(), NoMatch::NotFound).is_ok(), "the plan is prepared for serving");
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(format!("from_bytes/{name}"), |b| b.iter(|| Plan::from_bytes(black_box(&bytes)).unwrap()));
        group.bench_function(format!("prepare/{name}"), |b| {
            b.iter_batched(|| plan.clone(), |plan| Served::new(plan, NoMatch::NotFound).unwrap(), BatchSize::LargeInput)
        });
    }
    group.finish();
}

// ---- requests and replies, encoded by hand -------------------------------

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, u64::from(field) << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_varint(out, u64::from(field) << 3);
    put_varint(out, v);
}

fn framed(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// The letters a-z repeated, cut to `len` bytes, as in the bench rules.
fn padding(len: usize) -> Vec<u8> {
    (b'a'..=b'z').cycle().take(len).collect()
}

/// The load bench's 200-byte request: `{name: "medium", padding: 189 bytes}`.
fn medium_request() -> Vec<u8> {
    let mut m = Vec::new();
    put_bytes_field(&mut m, 1, b"medium");
    put_bytes_field(&mut m, 3, &b"0123456789".repeat(19)[..189]);
    assert_eq!(m.len(), 200);
    m
}

/// A method whose reply has eight holes: text, numbers, a bool, nested
/// messages and a repeated field.
fn many_holes_plan() -> Plan {
    let proto = "syntax = \"proto3\";\npackage b;\nservice S { rpc M (Req) returns (Resp); }\n\
                 message Req { string name = 1; string city = 2; int64 n = 3; bool flag = 4; }\n\
                 message Inner { string deep = 1; Inner again = 2; }\n\
                 message Resp { string text = 1; int64 number = 2; Inner nested = 3; repeated string lines = 4; \
                 bool yes = 5; }\n";
    let rules = "service: b.S\nmethod: M\nresponses:\n  - body:\n\
                 \x20     text: \"Hello {{request.name}} from {{request.city}}!\"\n\
                 \x20     number: \"{{request.n * 2 + 1}}\"\n\
                 \x20     nested: { deep: \"[{{request.name}}]\", again: { deep: \"{{request.city}}\" } }\n\
                 \x20     lines: [fixed, \"n={{request.n}}\", also fixed]\n\
                 \x20     yes: \"{{request.flag}}\"\n";
    compile_text("many-holes", proto, rules)
}

/// `{name: "Ann", city: "Paris", n: 21, flag: true}`.
fn many_holes_request() -> Vec<u8> {
    let mut m = Vec::new();
    put_bytes_field(&mut m, 1, b"Ann");
    put_bytes_field(&mut m, 2, b"Paris");
    put_varint_field(&mut m, 3, 21);
    put_varint_field(&mut m, 4, 1);
    m
}

fn many_holes_reply() -> Vec<u8> {
    let mut again = Vec::new();
    put_bytes_field(&mut again, 1, b"Paris");
    let mut nested = Vec::new();
    put_bytes_field(&mut nested, 1, b"[Ann]");
    put_bytes_field(&mut nested, 2, &again);
    let mut m = Vec::new();
    put_bytes_field(&mut m, 1, b"Hello Ann from Paris!");
    put_varint_field(&mut m, 2, 43);
    put_bytes_field(&mut m, 3, &nested);
    for line in [&b"fixed"[..], b"n=21", b"also fixed"] {
        put_bytes_field(&mut m, 4, line);
    }
    put_varint_field(&mut m, 5, 1);
    framed(&m)
}

/// Reads the request, selects the rule and renders or clones its reply, as
/// the engine does for a unary call.
fn answer(served: &Served, path: &str, request: &[u8], headers: &http::HeaderMap) -> bytes::Bytes {
    let method = served.method(path).expect("the method exists");
    let one = [request];
    let messages = Messages::one(&one);
    let request = Request::read(method, &messages, headers).unwrap();
    let response = request.select().unwrap().expect("a rule matches");
    let prepared = &method.responses[response as usize];
    match prepared.templates.first() {
        Some((_, t)) => template::render(t, &Context { request: &request, index: 0, total: 0 }).unwrap(),
        None => prepared.body.clone(),
    }
}

fn templates(c: &mut Criterion) {
    let headers = http::HeaderMap::new();
    let bench = Served::new(bench_plan(), NoMatch::NotFound).unwrap();
    let many = Served::new(many_holes_plan(), NoMatch::NotFound).unwrap();
    let medium = medium_request();
    let many_request = many_holes_request();

    // BenchReply { padding = 1, message = 2 }.
    let mut reply = Vec::new();
    put_bytes_field(&mut reply, 1, &padding(182));
    put_bytes_field(&mut reply, 2, b"Hello medium!");
    let template_reply = framed(&reply);
    assert_eq!(template_reply.len(), 205);
    let mut reply = Vec::new();
    put_bytes_field(&mut reply, 1, &padding(189));
    put_bytes_field(&mut reply, 2, b"static");
    let static_reply = framed(&reply);

    let mut group = c.benchmark_group("template");
    for (name, served, path, request, want) in [
        ("render_1_hole_200B", &bench, "/bench.v1.Bench/Template", &medium, &template_reply),
        ("render_8_holes_nested", &many, "/b.S/M", &many_request, &many_holes_reply()),
    ] {
        assert_eq!(&answer(served, path, request, &headers)[..], &want[..], "{name}: unexpected reply");
        let method = served.method(path).unwrap();
        let one = [&request[..]];
        let messages = Messages::one(&one);
        let read = Request::read(method, &messages, &headers).unwrap();
        let response = read.select().unwrap().unwrap();
        let (_, t) = &method.responses[response as usize].templates[0];
        group.throughput(Throughput::Bytes(want.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| template::render(black_box(t), &Context { request: &read, index: 0, total: 0 }).unwrap())
        });
    }
    group.finish();

    let mut group = c.benchmark_group("answer");
    for (name, path, want) in [
        ("templated_200B", "/bench.v1.Bench/Template", &template_reply),
        ("prepared_200B", "/bench.v1.Bench/StaticRule", &static_reply),
    ] {
        assert_eq!(&answer(&bench, path, &medium, &headers)[..], &want[..], "{name}: unexpected reply");
        group.bench_function(name, |b| b.iter(|| answer(&bench, black_box(path), black_box(&medium), &headers)));
    }
    group.finish();
}

/// The client side of 100 unary SayHello calls on one connection.
fn pipelined_calls(n: u32) -> Vec<u8> {
    use wirestub_engine::codec::hpack;
    use wirestub_engine::transport::http2::frame;
    let mut out = bytes::BytesMut::new();
    out.extend_from_slice(frame::PREFACE);
    frame::put_settings(&mut out, &[]);
    let body = framed(b"\x0a\x03Tom");
    for i in 0..n {
        let id = 1 + 2 * i;
        let mut block = Vec::new();
        for (k, v) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/helloworld.Greeter/SayHello"),
            (":authority", "127.0.0.1"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            hpack::encode_literal(&mut block, k.as_bytes(), v.as_bytes());
        }
        frame::put_headers(&mut out, id, &block, false, 16_384);
        frame::put_data(&mut out, id, &body, true);
    }
    out.to_vec()
}

fn connection(c: &mut Criterion) {
    let served = Served::new(example_plan(), NoMatch::NotFound).expect("the example prepares");
    let config = wirestub_engine::Config::default();
    let input = pipelined_calls(100);
    let written = wirestub_engine::transport::http2::conn::drive(&served, &config, &[&input]);
    let answers = written.windows(b"Hi Tom (from mock)".len()).filter(|w| w == b"Hi Tom (from mock)").count();
    assert_eq!(answers, 100, "every call is answered");
    let mut group = c.benchmark_group("h2_conn");
    group.throughput(Throughput::Elements(100));
    group.bench_function("unary_x100", |b| {
        b.iter(|| black_box(wirestub_engine::transport::http2::conn::drive(&served, &config, &[black_box(&input)])))
    });
    group.finish();
}

criterion_group!(benches, plan_loading, templates, connection);
criterion_main!(benches);
