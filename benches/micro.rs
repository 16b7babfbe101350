//! Criterion micro benchmarks of the engine's hot paths.
//!
//! `wire/*` measures [`extract`], the zero-copy scan that reads the request
//! fields rules test straight from the protobuf bytes, on a realistic request
//! of about 200 bytes and eight top-level fields, and [`for_each_element`],
//! which reads every element of a repeated field for rules on lists. Each
//! bench checks its result once before measuring, so that it cannot silently
//! time a failing scan.
//!
//! `hpack/*` measures the HPACK decoder on the request headers of a gRPC
//! call, first as a new client sends them (literals, Huffman-encoded, added
//! to the dynamic table) and then as it sends them on later calls (indexed
//! fields), and the encoder on a response head.
//!
//! `answer/*` measures picking and rendering an answer whose body is a
//! template, with and without templated metadata (the cost of a per-call
//! copy of the answer's headers), and `raw/*` a call that matches none of
//! 100 recordings made without protos exactly and is answered by the most
//! similar one.
//!
//! Run with `cargo bench -p wirestub-benches --bench micro`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use wirestub_engine::call::matcher::Messages;
use wirestub_engine::codec::hpack;
use wirestub_engine::codec::wire::{extract, for_each_element, PathSpec, Raw};

// ---- a hand-encoded request -------------------------------------------------

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, u64::from(field) << 3 | u64::from(wire_type));
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_key(out, field, 0);
    put_varint(out, v);
}

fn put_bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_fixed64_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

/// A request shaped like
///
/// ```text
/// message Request {
///   string request_id = 1;  int64 created_at = 2;  User user = 3;
///   repeated int32 tags = 4 [packed];  double score = 5;  bool dry_run = 6;
///   bytes token = 7;  string name = 8;
/// }
/// message User { string id = 1; Address address = 2; int32 age = 3; }
/// message Address { string city = 1; int32 zip = 2; }
/// ```
///
/// with `name`, the field the first bench wants, encoded last.
fn request() -> Vec<u8> {
    let mut address = Vec::new();
    put_bytes_field(&mut address, 1, b"Amsterdam");
    put_varint_field(&mut address, 2, 1017);

    let mut user = Vec::new();
    put_bytes_field(&mut user, 1, b"user-7f3a9c2e-41d8-4b6f");
    put_bytes_field(&mut user, 2, &address);
    put_varint_field(&mut user, 3, 42);

    let mut tags = Vec::new();
    for tag in [3u64, 17, 250, 4096, 70_000, 12, 9, 1] {
        put_varint(&mut tags, tag);
    }

    let mut msg = Vec::new();
    put_bytes_field(&mut msg, 1, b"9b2f1c7e-5d3a-4e8b-a6f0-2c4d8e1b3a5f");
    put_varint_field(&mut msg, 2, 1_732_000_000_123);
    put_bytes_field(&mut msg, 3, &user);
    put_bytes_field(&mut msg, 4, &tags);
    put_fixed64_field(&mut msg, 5, 0.875f64.to_bits());
    put_varint_field(&mut msg, 6, 1);
    put_bytes_field(&mut msg, 7, b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI3ZjNhIn0.c2ln");
    put_bytes_field(&mut msg, 8, b"checkout-service-primary-eu-west");
    msg
}

// ---- benches --------------------------------------------------------------

/// Runs `extract` once outside the timing loop and checks what it finds.
fn check(msg: &[u8], paths: &[PathSpec<'_>], want: &[Option<Raw<'_>>]) {
    let mut out = vec![None; paths.len()];
    extract(msg, paths, &mut out).expect("the bench request is well-formed");
    assert_eq!(out, want, "the bench request does not hold the expected values");
}

fn wire(c: &mut Criterion) {
    let msg = request();
    assert!((180..=230).contains(&msg.len()), "request is {} bytes, meant to be about 200", msg.len());

    let mut group = c.benchmark_group("wire");
    group.throughput(Throughput::Bytes(msg.len() as u64));

    let paths = [PathSpec { numbers: &[8], wire_type: 2 }];
    check(&msg, &paths, &[Some(Raw::Len(b"checkout-service-primary-eu-west"))]);
    group.bench_function("extract_one_top_level_string", |b| {
        let mut out = [None; 1];
        b.iter(|| {
            extract(black_box(&msg), black_box(&paths), &mut out).unwrap();
            black_box(out[0])
        })
    });

    // request.user.address.zip
    let paths = [PathSpec { numbers: &[3, 2, 2], wire_type: 0 }];
    check(&msg, &paths, &[Some(Raw::Varint(1017))]);
    group.bench_function("extract_nested_2_levels", |b| {
        let mut out = [None; 1];
        b.iter(|| {
            extract(black_box(&msg), black_box(&paths), &mut out).unwrap();
            black_box(out[0])
        })
    });

    // name, created_at, user.id, user.address.city: two of them share the
    // embedded `user`, which is walked once for both.
    let paths = [
        PathSpec { numbers: &[8], wire_type: 2 },
        PathSpec { numbers: &[2], wire_type: 0 },
        PathSpec { numbers: &[3, 1], wire_type: 2 },
        PathSpec { numbers: &[3, 2, 1], wire_type: 2 },
    ];
    check(
        &msg,
        &paths,
        &[
            Some(Raw::Len(b"checkout-service-primary-eu-west")),
            Some(Raw::Varint(1_732_000_000_123)),
            Some(Raw::Len(b"user-7f3a9c2e-41d8-4b6f")),
            Some(Raw::Len(b"Amsterdam")),
        ],
    );
    group.bench_function("extract_4_paths", |b| {
        let mut out = [None; 4];
        b.iter(|| {
            extract(black_box(&msg), black_box(&paths), &mut out).unwrap();
            black_box(out)
        })
    });

    // request.tags, packed: every element, summed so that none is optimised
    // away.
    let sum_tags = |msg: &[u8]| {
        let mut sum = 0u64;
        for_each_element(msg, &[], black_box(4), 0, &mut |raw| {
            if let Raw::Varint(v) = raw {
                sum += v;
            }
            true
        })
        .map(|()| sum)
    };
    assert_eq!(sum_tags(&msg), Ok(3 + 17 + 250 + 4096 + 70_000 + 12 + 9 + 1), "the bench request holds 8 tags");
    group.bench_function("for_each_element_packed", |b| b.iter(|| sum_tags(black_box(&msg)).unwrap()));

    group.finish();
}

/// Writes a case with `n` rules on one method, compiles it with the real
/// compiler and prepares it for serving, as the engine does at start.
fn served_with_rules(n: usize) -> wirestub_engine::Served {
    let dir = std::env::temp_dir().join(format!("wirestub-bench-{}-{n}", std::process::id()));
    let (protos, rules) = (dir.join("protos"), dir.join("rules"));
    std::fs::create_dir_all(&protos).unwrap();
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        protos.join("b.proto"),
        "syntax = \"proto3\";\npackage b;\nservice S { rpc M (Req) returns (Resp); }\n\
         message Req { string user_id = 1; string region = 2; int32 tier = 3; }\nmessage Resp { string who = 1; }\n",
    )
    .unwrap();
    let mut text = String::from("service: b.S\nmethod: M\nresponses:\n");
    for i in 0..n {
        text.push_str(&format!(
            "  - {{ when: {{ request.user_id: user-{i}, request.tier: {{ gte: 1 }} }}, body: {{ who: u{i} }} }}\n"
        ));
    }
    text.push_str("  - { when: { request.region: { regex: \"^eu-\" } }, body: { who: europe } }\n");
    text.push_str("  - { body: { who: nobody } }\n");
    std::fs::write(rules.join("b.yaml"), text).unwrap();
    let out = wirestub_compiler::compile(&wirestub_compiler::Options {
        protos: vec![protos],
        rules: vec![rules],
        protos_only: Vec::new(),
        lenient: false,
    })
    .unwrap_or_else(|d| panic!("{}", d.render()));
    let _ = std::fs::remove_dir_all(&dir);
    wirestub_engine::load(&out.plan.to_bytes(), wirestub_engine::NoMatch::NotFound).unwrap()
}

/// Req { user_id, region: "us-east", tier: 2 }.
fn route_request(user: &str) -> Vec<u8> {
    let mut m = Vec::new();
    put_bytes_field(&mut m, 1, user.as_bytes());
    put_bytes_field(&mut m, 2, b"us-east");
    put_varint_field(&mut m, 3, 2);
    m
}

/// Matching cost against the number of rules on one method: it must stay
/// flat (the engine indexes rules keyed on the same field).
fn matching(c: &mut Criterion) {
    let headers = http::HeaderMap::new();
    let mut group = c.benchmark_group("match");
    for n in [10usize, 10_000, 100_000] {
        let served = served_with_rules(n);
        let method = served.method("/b.S/M").unwrap();
        let hit = route_request(&format!("user-{}", n / 2));
        let miss = route_request("user-none");
        // The hit answers with its own rule, the miss falls through to the
        // fallback; check once, then measure.
        let select = |request: &[u8]| {
            let one = [request];
            wirestub_engine::call::matcher::select(method, &Messages::one(&one), &headers).unwrap()
        };
        assert_eq!(select(&hit), Some(n as u32 / 2));
        assert_eq!(select(&miss), Some(n as u32 + 1));
        group.bench_function(format!("hit/{n}_rules"), |b| b.iter(|| select(black_box(&hit))));
        group.bench_function(format!("miss/{n}_rules"), |b| b.iter(|| select(black_box(&miss))));
    }
    group.finish();
}

/// The request headers of a grpc-go unary call, as decoded.
const GRPC_REQUEST_HEADERS: [(&str, &str); 8] = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/helloworld.Greeter/SayHello"),
    (":authority", "127.0.0.1:50051"),
    ("content-type", "application/grpc"),
    ("user-agent", "grpc-go/1.60.0"),
    ("te", "trailers"),
    ("grpc-timeout", "1S"),
];

/// [`GRPC_REQUEST_HEADERS`] as a client sends them first: every field a
/// literal with incremental indexing (names from the static table where it
/// has them), every string Huffman-encoded.
const GRPC_FIRST_BLOCK: [u8; 97] = [
    0x42, 0x84, 0xd7, 0xab, 0x76, 0xff, 0x46, 0x83, 0x9d, 0x29, 0xaf, 0x44, 0x95, 0x62, 0x72, 0xd1, 0x41, 0xfc, 0x1e,
    0xca, 0x24, 0x5f, 0x15, 0x85, 0x2a, 0x4b, 0x63, 0x1b, 0x87, 0xeb, 0x19, 0x68, 0xa0, 0xff, 0x41, 0x8b, 0x08, 0x9d,
    0x5c, 0x0b, 0x81, 0x70, 0xdc, 0x6c, 0x00, 0x6c, 0x3f, 0x5f, 0x8b, 0x1d, 0x75, 0xd0, 0x62, 0x0d, 0x26, 0x3d, 0x4c,
    0x4d, 0x65, 0x64, 0x7a, 0x8a, 0x9a, 0xca, 0xc8, 0xb4, 0xc7, 0x60, 0x2b, 0xb8, 0x05, 0xc1, 0x40, 0x82, 0x49, 0x7f,
    0x86, 0x4d, 0x83, 0x35, 0x05, 0xb1, 0x1f, 0x40, 0x89, 0x9a, 0xca, 0xc8, 0xb2, 0x4d, 0x49, 0x4f, 0x6a, 0x7f, 0x82,
    0x0e, 0xef,
];

/// The same headers on a later call: each field indexed, from the dynamic
/// table the first block filled (the oldest entry, `:method`, is 69).
const GRPC_INDEXED_BLOCK: [u8; 8] = [0xc5, 0xc4, 0xc3, 0xc2, 0xc1, 0xc0, 0xbf, 0xbe];

/// What a decoder hands over for `block`; checked once before measuring.
fn decoded(decoder: &mut hpack::Decoder, block: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    let oversized = decoder
        .decode(block, 16 << 10, &mut |n, v| {
            fields.push((String::from_utf8_lossy(n).into_owned(), String::from_utf8_lossy(v).into_owned()))
        })
        .expect("the bench block decodes");
    assert!(!oversized);
    fields
}

fn hpack(c: &mut Criterion) {
    let want: Vec<(String, String)> =
        GRPC_REQUEST_HEADERS.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    let mut group = c.benchmark_group("hpack");

    // One decoder throughout: every block adds eight entries, and once the
    // table is full each addition evicts the oldest ones, as on a busy
    // connection of clients that never reuse an entry.
    let mut decoder = hpack::Decoder::new(4096);
    assert_eq!(decoded(&mut decoder, &GRPC_FIRST_BLOCK), want);
    group.throughput(Throughput::Bytes(GRPC_FIRST_BLOCK.len() as u64));
    group.bench_function("decode_first_request_huffman", |b| {
        b.iter(|| {
            let mut n = 0;
            let oversized = decoder
                .decode(black_box(&GRPC_FIRST_BLOCK), 16 << 10, &mut |name, value| n += name.len() + value.len());
            (oversized, n)
        })
    });

    let mut decoder = hpack::Decoder::new(4096);
    decoded(&mut decoder, &GRPC_FIRST_BLOCK);
    assert_eq!(decoded(&mut decoder, &GRPC_INDEXED_BLOCK), want);
    group.throughput(Throughput::Bytes(GRPC_INDEXED_BLOCK.len() as u64));
    group.bench_function("decode_indexed_request", |b| {
        b.iter(|| {
            let mut n = 0;
            let oversized = decoder
                .decode(black_box(&GRPC_INDEXED_BLOCK), 16 << 10, &mut |name, value| n += name.len() + value.len());
            (oversized, n)
        })
    });

    // A response head: `:status` and content-type, then two metadata
    // entries, as prepared for each response at plan load.
    let head: [(&[u8], &[u8]); 3] = [
        (b"content-type", b"application/grpc"),
        (b"x-request-id", b"9b2f1c7e-5d3a-4e8b-a6f0-2c4d8e1b3a5f"),
        (b"x-served-by", b"wirestub"),
    ];
    let mut buf = Vec::with_capacity(256);
    let encode = |buf: &mut Vec<u8>| {
        buf.clear();
        hpack::encode_status(buf, black_box(200));
        for (name, value) in black_box(&head) {
            hpack::encode_literal(buf, name, value);
        }
        buf.len()
    };
    // Checked before measuring (a filtered or test run measures nothing).
    encode(&mut buf);
    assert_eq!(decoded(&mut hpack::Decoder::new(4096), &buf).len(), 4);
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode_response_head", |b| b.iter(|| encode(&mut buf)));

    group.finish();
}

/// The plan of `tests/cases/NAME`, compiled and loaded.
fn case(name: &str) -> wirestub_engine::Served {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/cases").join(name);
    let out = wirestub_compiler::compile(&wirestub_compiler::Options {
        protos: vec![dir.join("protos")],
        rules: vec![dir.join("rules")],
        ..Default::default()
    })
    .unwrap_or_else(|d| panic!("{}", d.render()));
    wirestub_engine::load(&out.plan.to_bytes(), wirestub_engine::NoMatch::NotFound).unwrap()
}

/// Picking and rendering an answer: a templated body alone, and with
/// templated metadata too (tests/cases/templates).
fn answers(c: &mut Criterion) {
    let served = case("templates");
    let method = served.method("/tpl.Tpl/Echo").unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("x-user", http::HeaderValue::from_static("ada@example.com"));
    let request = |name: &str| {
        let mut m = Vec::new();
        put_bytes_field(&mut m, 1, name.as_bytes());
        put_varint_field(&mut m, 2, 4);
        m
    };
    let mut group = c.benchmark_group("answer");
    for (label, name) in [("body_template", "Ada"), ("body_and_metadata_templates", "headers")] {
        let req = request(name);
        let pick = |r: &[u8]| {
            let one = [r];
            let a = wirestub_engine::call::pick(method, &Messages::one(&one), &headers).unwrap();
            (a.body.len(), a.prepared().headers.len())
        };
        assert!(pick(&req).0 > 5, "{label} renders a body");
        group.bench_function(label, |b| b.iter(|| pick(black_box(&req))));
    }
    group.finish();
}

/// A call close to, but not the same as, one of 100 recordings of 200-byte
/// messages made without protos: every recording is compared.
fn raw_replay(c: &mut Criterion) {
    use base64::Engine as _;
    let dir = std::env::temp_dir().join(format!("wirestub-bench-raw-{}", std::process::id()));
    let (protos, rules) = (dir.join("protos"), dir.join("rules"));
    std::fs::create_dir_all(&protos).unwrap();
    std::fs::create_dir_all(&rules).unwrap();
    // 200 bytes of a pseudo-random sequence per recording.
    let body = |i: u32| -> Vec<u8> {
        let mut x = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        let bytes: Vec<u8> = (0..190)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                (x >> 56) as u8
            })
            .collect();
        let mut m = Vec::new();
        put_bytes_field(&mut m, 1, &bytes);
        put_varint_field(&mut m, 2, u64::from(i));
        m
    };
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut text = String::from("service: r.S\nmethod: M\nraw: unary\nresponses:\n");
    for i in 0..100 {
        text.push_str(&format!(
            "  - {{ request: {{ messages: [\"{}\"], metadata: [] }}, messages: [\"{}\"], times: 1000000000 }}\n",
            b64(&body(i)),
            b64(format!("answer {i}").as_bytes())
        ));
    }
    std::fs::write(rules.join("r.yaml"), text).unwrap();
    let out = wirestub_compiler::compile(&wirestub_compiler::Options {
        protos: vec![protos],
        rules: vec![rules],
        ..Default::default()
    })
    .unwrap_or_else(|d| panic!("{}", d.render()));
    let _ = std::fs::remove_dir_all(&dir);
    let served = wirestub_engine::load(&out.plan.to_bytes(), wirestub_engine::NoMatch::NotFound).unwrap();
    let method = served.method("/r.S/M").unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("content-type", http::HeaderValue::from_static("application/grpc"));
    let mut near = body(57);
    let last = near.len() - 3;
    near[last] ^= 1;
    let pick = |r: &[u8]| {
        let one = [r];
        wirestub_engine::call::pick(method, &Messages::one(&one), &headers).unwrap().rule
    };
    assert_eq!(pick(&near), Some(57));
    let exact = body(57);
    let mut group = c.benchmark_group("raw");
    group.bench_function("exact_of_100_recordings_200B", |b| b.iter(|| pick(black_box(&exact))));
    group.bench_function("nearest_of_100_recordings_200B", |b| b.iter(|| pick(black_box(&near))));
    group.finish();
}

/// Paths through repeated fields (tests/cases/repeated-paths): `[*]` and
/// `[all]` conditions over a 10-item cart, and a body aggregating it.
fn repeated_paths(c: &mut Criterion) {
    let served = case("repeated-paths");
    let method = served.method("/cart.Cart/Check").unwrap();
    let headers = http::HeaderMap::new();
    // Order { id, items: 10 x { sku, size, kind: BOOK } }, the big one last.
    let request = |id: &str| {
        let mut m = Vec::new();
        put_bytes_field(&mut m, 1, id.as_bytes());
        for i in 0..10u64 {
            let mut item = Vec::new();
            put_bytes_field(&mut item, 1, format!("sku-{i}").as_bytes());
            put_varint_field(&mut item, 2, if i == 9 { 50 } else { i });
            put_varint_field(&mut item, 3, 1);
            put_bytes_field(&mut m, 2, &item);
        }
        m
    };
    let mut group = c.benchmark_group("repeated_paths");
    for (label, id) in [("any_of_10_items", "any"), ("all_of_10_items", "all"), ("aggregates_of_10_items", "sum")] {
        let req = request(id);
        let pick = |r: &[u8]| {
            let one = [r];
            wirestub_engine::call::pick(method, &Messages::one(&one), &headers).unwrap().body.len()
        };
        assert!(pick(&req) > 5, "{label} answers");
        group.bench_function(label, |b| b.iter(|| pick(black_box(&req))));
    }
    group.finish();
}

criterion_group!(benches, wire, matching, hpack, answers, raw_replay, repeated_paths);
criterion_main!(benches);
