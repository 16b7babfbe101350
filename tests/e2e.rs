//! End-to-end tests against the real engine over loopback.
//!
//! Most tests are data: `tests/cases/<case>/` holds `protos/`, `rules/` (or
//! neither, to use the bundled example) and `calls.yaml`, the calls to make
//! with a real gRPC client and the answers expected. `tests/diagnostics/<case>/`
//! holds inputs with mistakes and the compiler's expected output. The rest are
//! protocol edge cases sent with a raw HTTP/2 client.

use bytes::Bytes;
use serde_json::Value as J;
use std::path::{Path, PathBuf};
use std::time::Duration;
use wirestub_engine::NoMatch;
use wirestub_tests::*;

fn case_dirs(kind: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root().join("tests").join(kind))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no cases in tests/{kind}");
    dirs
}

/// Reads a YAML file as JSON, with the compiler's own reader.
fn read_yaml(path: &Path) -> J {
    let text = std::fs::read_to_string(path).unwrap();
    let file = wirestub_compiler::diag::SourceFile::new(path, text);
    let docs = wirestub_compiler::yaml::parse(&file).unwrap_or_else(|d| panic!("{}", d.render()));
    docs[0].to_json()
}

fn str_pairs(v: Option<&J>) -> Vec<(String, String)> {
    let Some(J::Object(m)) = v else { return Vec::new() };
    m.iter().map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))).collect()
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cases() {
    let mut failures = Vec::new();
    let mut count = 0;
    for dir in case_dirs("cases") {
        let spec = read_yaml(&dir.join("calls.yaml"));
        let no_match = match spec.get("no_match").and_then(J::as_str) {
            Some("empty-ok") => NoMatch::EmptyOk,
            _ => NoMatch::NotFound,
        };
        let source = if dir.join("protos").is_dir() { dir.clone() } else { root() };
        let validation = spec.get("validation").and_then(J::as_str) == Some("on");
        let server = tokio::task::block_in_place(|| TestServer::start_validating(&source, no_match, validation));
        let mut client = Client::connect(&server).await;
        for call in spec["calls"].as_array().expect("calls: [...]") {
            count += 1;
            let name = format!("{}: {}", dir.file_name().unwrap().to_string_lossy(), call["name"].as_str().unwrap());
            let method = call["method"].as_str().unwrap();
            let metadata = str_pairs(call.get("metadata"));
            let timeout = call.get("timeout_ms").and_then(J::as_u64).map(Duration::from_millis);
            let reply = match call.get("request_hex").and_then(J::as_str) {
                Some(h) => {
                    let raw = client.call_raw(method, Bytes::from(hex(h)), &metadata, timeout).await;
                    match raw {
                        Ok(r) => {
                            let msg =
                                prost_reflect::DynamicMessage::decode(client.output_type(method), r.get_ref().clone())
                                    .unwrap();
                            Reply::ok(serde_json::to_value(&msg).unwrap())
                        }
                        Err(s) => Reply::error(&s),
                    }
                }
                None => {
                    let requests = match call.get("requests") {
                        Some(J::Array(list)) => list.clone(),
                        _ => vec![call.get("request").cloned().unwrap_or(J::Null)],
                    };
                    client.call_any(method, &requests, &metadata, timeout).await
                }
            };
            let expect = &call["expect"];
            let mut problems = Vec::new();
            let status = expect.get("status").and_then(J::as_str).unwrap_or("OK");
            if reply.status != status {
                problems.push(format!("status {} (message {:?}), expected {status}", reply.status, reply.message));
            }
            if let Some(m) = expect.get("message").and_then(J::as_str) {
                if reply.message != m {
                    problems.push(format!("message {:?}, expected {m:?}", reply.message));
                }
            }
            if let Some(body) = expect.get("body") {
                let want = client.canonical(method, body);
                if reply.body.as_ref() != Some(&want) {
                    problems.push(format!("body {:?}, expected {want}", reply.body));
                }
            }
            if let Some(J::Array(bodies)) = expect.get("bodies") {
                let want: Vec<J> = bodies.iter().map(|b| client.canonical(method, b)).collect();
                let mut got = reply.bodies.clone();
                let mut want_sorted = want.clone();
                if expect.get("any_order").and_then(J::as_bool) == Some(true) {
                    got.sort_by_key(|v| v.to_string());
                    want_sorted.sort_by_key(|v| v.to_string());
                }
                if got != want_sorted {
                    problems.push(format!("stream {:?}, expected {want:?}", reply.bodies));
                }
            }
            for (k, v) in str_pairs(expect.get("metadata")) {
                if !reply.metadata.contains(&(k.clone(), v.clone())) {
                    problems.push(format!("metadata {k}: {v} missing from {:?}", reply.metadata));
                }
            }
            // Rich errors: the decoded google.rpc.Status must carry the
            // call's code and message and the expected details.
            if let Some(details) = expect.get("details") {
                let code = wirestub_plan::STATUS_NAMES.iter().position(|n| *n == status).unwrap();
                let want = client.canonical_status(
                    &serde_json::json!({ "code": code, "message": reply.message, "details": details }),
                );
                let got = client.status_json(&reply.details);
                if got != want {
                    problems.push(format!("grpc-status-details-bin {got}, expected {want}"));
                }
            }
            if !problems.is_empty() {
                failures.push(format!("{name}:\n  {}", problems.join("\n  ")));
            }
        }
        tokio::task::block_in_place(|| server.stop());
    }
    assert!(failures.is_empty(), "{} of {count} calls failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn diagnostics() {
    for dir in case_dirs("diagnostics") {
        // Cases without protos of their own share tests/diagnostics-protos.
        let protos =
            if dir.join("protos").is_dir() { dir.join("protos") } else { root().join("tests/diagnostics-protos") };
        // A case with a file named `lenient` compiles with `--lenient`.
        let options = wirestub_compiler::Options {
            protos: vec![protos],
            rules: vec![dir.join("rules")],
            protos_only: Vec::new(),
            lenient: dir.join("lenient").exists(),
        };
        let text = match wirestub_compiler::compile(&options) {
            Ok(out) => format!("{}ok: {}\n", out.warnings.render(), out.summary()),
            Err(d) => d.render_ending(Some("no plan written")),
        };
        // Paths are shown as given; make them relative to the case.
        let text = text.replace(&format!("{}/", dir.display()), "");
        assert_golden(&dir.join("expected.txt"), &text);
    }
}

#[test]
fn bundled_example_dump_is_stable() {
    let out = wirestub_compiler::compile(&wirestub_compiler::Options {
        protos: vec![root().join("protos")],
        rules: vec![root().join("rules")],
        ..Default::default()
    })
    .unwrap_or_else(|d| panic!("{}", d.render()));
    let text = wirestub_compiler::dump(&out.plan).replace(&format!("{}/", root().display()), "");
    assert_golden(&root().join("tests/plans/example.dump"), &text);
}

#[test]
fn compiling_twice_gives_identical_plans() {
    let options = wirestub_compiler::Options {
        protos: vec![root().join("protos")],
        rules: vec![root().join("rules")],
        protos_only: Vec::new(),
        lenient: false,
    };
    let a = wirestub_compiler::compile(&options).unwrap_or_else(|d| panic!("{}", d.render())).plan.to_bytes();
    let b = wirestub_compiler::compile(&options).unwrap_or_else(|d| panic!("{}", d.render())).plan.to_bytes();
    assert!(a == b, "plan bytes differ between two compilations of the same inputs");
}

#[test]
fn plans_of_every_released_version_still_load() {
    // Each `vN-*.bin` is a plan written by a build of layout version N, kept
    // with its dump; a reader change that breaks them must bump the version.
    for entry in std::fs::read_dir(root().join("tests/plans")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "bin") {
            let plan = wirestub_plan::Plan::from_bytes(&std::fs::read(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_golden(&path.with_extension("dump"), &wirestub_compiler::dump(&plan));
        }
    }
}

// ---- protocol edge cases, with a raw HTTP/2 client ------------------------

const GRPC: [(&str, &str); 2] = [("content-type", "application/grpc"), ("te", "trailers")];
const SAY_HELLO: &str = "/helloworld.Greeter/SayHello";

fn example() -> TestServer {
    TestServer::start(&root(), NoMatch::NotFound)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_gets_the_rule_answer() {
    let server = tokio::task::block_in_place(example);
    // HelloRequest { name: "Tom" }
    let r = raw_call(server.addr, SAY_HELLO, &GRPC, vec![frame(b"\x0a\x03Tom")]).await;
    assert_eq!((r.http_status, r.grpc_status()), (200, Some(0)));
    assert_eq!(&r.body[5..], b"\x0a\x12Hi Tom (from mock)");
    assert_eq!(r.headers.get("content-type").unwrap(), "application/grpc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_split_over_many_frames_is_reassembled() {
    let server = tokio::task::block_in_place(example);
    let framed = frame(b"\x0a\x03Tom");
    let chunks = framed.iter().map(|b| Bytes::copy_from_slice(&[*b])).collect();
    let r = raw_call(server.addr, SAY_HELLO, &GRPC, chunks).await;
    assert_eq!(r.grpc_status(), Some(0));
    assert_eq!(&r.body[5..], b"\x0a\x12Hi Tom (from mock)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_errors_get_their_statuses() {
    let server = tokio::task::block_in_place(example);
    let cases: Vec<(&str, Vec<Bytes>, u8, &str)> = vec![
        ("no message", vec![], 12, "no request message"),
        ("two messages", vec![frame(b"\x0a\x01a"), frame(b"\x0a\x01b")], 12, "more than one"),
        ("truncated prefix", vec![Bytes::from_static(&[0, 0, 0])], 13, "truncated"),
        ("truncated message", vec![Bytes::from_static(&[0, 0, 0, 0, 9, 1])], 13, "truncated"),
        ("bad flag", vec![Bytes::from_static(&[7, 0, 0, 0, 0])], 13, "flag"),
        ("compressed", vec![Bytes::from_static(&[1, 0, 0, 0, 0])], 13, "compressed"),
        ("malformed protobuf", vec![frame(b"\x0a\x09Tom")], 13, "cannot parse"),
        ("oversized", vec![Bytes::from_static(&[0, 0, 0x40, 0, 1])], 8, "larger than the limit"),
    ];
    for (name, chunks, code, text) in cases {
        let r = raw_call(server.addr, SAY_HELLO, &GRPC, chunks).await;
        assert_eq!(r.http_status, 200, "{name}");
        assert_eq!(r.grpc_status(), Some(code), "{name}: {}", r.grpc_message());
        assert!(r.grpc_message().contains(text), "{name}: {}", r.grpc_message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_refused_from_its_prefix() {
    let server = tokio::task::block_in_place(example);
    // Announce 5 MiB but send only the first 64 KiB: the answer must come
    // from the prefix alone, without waiting for (or buffering) the rest.
    let mut first = vec![0u8, 0, 0x50, 0, 0];
    first.extend(std::iter::repeat_n(0u8, 64 << 10));
    let (response, mut send) = open_call(server.addr, SAY_HELLO).await;
    send.send_data(Bytes::from(first), false).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response).await.expect("answered early").unwrap();
    assert_eq!(response.headers().get("grpc-status").unwrap(), "8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_level_refusals() {
    let server = tokio::task::block_in_place(example);
    let body = vec![frame(b"")];
    let r = raw_call(server.addr, SAY_HELLO, &[("content-type", "text/plain")], body.clone()).await;
    assert_eq!(r.http_status, 415);
    let r = raw_call(server.addr, SAY_HELLO, &[("content-type", "application/grpc+json")], body.clone()).await;
    assert_eq!((r.http_status, r.grpc_status()), (200, Some(12)));
    let r = raw_call(server.addr, "/nope.Svc/Call", &GRPC, body.clone()).await;
    assert_eq!(r.grpc_status(), Some(12));
    assert!(r.grpc_message().contains("/nope.Svc/Call"));
    let r = raw_call(server.addr, SAY_HELLO, &[GRPC[0], ("grpc-timeout", "soon")], body).await;
    assert_eq!(r.grpc_status(), Some(13));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_past_the_deadline_is_deadline_exceeded_at_the_deadline() {
    // A raw client, because real clients also enforce the deadline
    // themselves and would race the server.
    let server = tokio::task::block_in_place(example);
    let path = "/shop.v1.Catalog/SearchProducts";
    // SearchRequest { query: "slow" }: the rule delays 300 ms.
    let started = std::time::Instant::now();
    let r = raw_call(server.addr, path, &[GRPC[0], ("grpc-timeout", "80m")], vec![frame(b"\x0a\x04slow")]).await;
    let took = started.elapsed();
    assert_eq!(r.grpc_status(), Some(4), "{}", r.grpc_message());
    assert!(took >= Duration::from_millis(80) && took < Duration::from_millis(290), "answered after {took:?}");
    // Within the deadline the rule's answer comes after its delay.
    let r = raw_call(server.addr, path, &[GRPC[0], ("grpc-timeout", "5S")], vec![frame(b"\x0a\x04slow")]).await;
    assert_eq!(r.grpc_status(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_message_is_percent_encoded() {
    let dir = root().join("tests/cases/errors");
    let server = tokio::task::block_in_place(|| TestServer::start(&dir, NoMatch::NotFound));
    // ErrorRequest { kind: "unicode" }
    let r = raw_call(server.addr, "/errors.Errors/Fail", &GRPC, vec![frame(b"\x0a\x07unicode")]).await;
    assert_eq!(r.grpc_status(), Some(3));
    assert_eq!(r.grpc_message(), "caf%C3%A9 100%25 closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_calls_finish() {
    let server = tokio::task::block_in_place(example);
    let mut client = Client::connect(&server).await;
    let slow = tokio::spawn(async move {
        client.call("shop.v1.Catalog/SearchProducts", &serde_json::json!({"query": "slow"}), &[], None).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    tokio::task::block_in_place(|| server.stop());
    let reply = slow.await.unwrap();
    assert_eq!(reply.status, "OK");
    assert_eq!(reply.body.unwrap()["nextCursor"], "slow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_calls_on_one_connection() {
    let server = tokio::task::block_in_place(example);
    let client = Client::connect(&server).await;
    let request = client.encode("helloworld.Greeter/SayHello", &serde_json::json!({"name": "Tom"}));
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (mut c, r) = (client.clone(), request.clone());
        tasks.push(tokio::spawn(async move { c.call_raw("helloworld.Greeter/SayHello", r, &[], None).await }));
    }
    for t in tasks {
        let resp = t.await.unwrap().unwrap();
        assert_eq!(&resp.get_ref()[..], b"\x0a\x12Hi Tom (from mock)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplex_answers_each_message_before_the_next_is_sent() {
    let dir = root().join("tests/cases/streaming");
    let server = tokio::task::block_in_place(|| TestServer::start(&dir, NoMatch::NotFound));
    let (response, mut send) = open_call(server.addr, "/chat.Chat/Talk").await;
    // Line { text: "ping" }; the reply must come while the request stream
    // is still open, which is what makes it duplex.
    let ping = frame(b"\x12\x04ping");
    send.send_data(ping.clone(), false).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response).await.expect("headers").unwrap();
    let mut body = response.into_body();
    // Line { who: "mock", text: "pong" }, framed.
    let pong = frame(b"\x0a\x04mock\x12\x04pong");
    for round in 0..3 {
        let mut got = Vec::new();
        while got.len() < pong.len() {
            let chunk =
                tokio::time::timeout(Duration::from_secs(5), body.data()).await.expect("a reply").unwrap().unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, pong, "round {round}");
        send.send_data(ping.clone(), round == 2).unwrap();
    }
    let mut rest = Vec::new();
    while let Some(chunk) = body.data().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(rest, pong, "the last ping, sent with end of stream, is answered too");
    let trailers = body.trailers().await.unwrap().unwrap();
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_an_endless_stream_leaves_the_server_serving() {
    let dir = root().join("tests/cases/streaming");
    let server = tokio::task::block_in_place(|| TestServer::start(&dir, NoMatch::NotFound));
    // Topic { name: "forever" }: one item every 10 ms until cancelled.
    let (response, mut send) = open_call(server.addr, "/chat.Chat/Watch").await;
    send.send_data(frame(b"\x0a\x07forever"), true).unwrap();
    let mut body = response.await.unwrap().into_body();
    for _ in 0..3 {
        let chunk = body.data().await.unwrap().unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    drop(body);
    send.send_reset(h2::Reason::CANCEL);
    // The server notices the reset and stops; the connection stays usable.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = raw_call(server.addr, "/chat.Chat/Watch", &GRPC, vec![frame(b"\x0a\x06single")]).await;
    assert_eq!(r.grpc_status(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_utilities_render_fresh_values_per_call() {
    let dir = root().join("tests/cases/templates");
    let server = tokio::task::block_in_place(|| TestServer::start(&dir, NoMatch::NotFound));
    let mut client = Client::connect(&server).await;
    let mut ids = std::collections::HashSet::new();
    for _ in 0..20 {
        let reply = client.call("tpl.Tpl/Echo", &serde_json::json!({"name": "utils", "n": 7}), &[], None).await;
        let body = reply.body.expect("a body");
        let id = body["id"].as_str().unwrap().to_string();
        assert_eq!(id.len(), 36, "{id}");
        assert_eq!(&id[14..15], "4", "version 4 UUID: {id}");
        assert!(ids.insert(id), "a UUID repeated");
        let at: i64 = body["at"].as_str().unwrap().parse().unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        assert!((now - at).abs() < 60_000, "utils.now() is {at}, now is {now}");
        let dice = body["dice"].as_i64().unwrap_or(0);
        assert!((1..=6).contains(&dice), "dice {dice}");
        assert_eq!(body["text"], "utils is 7");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_holds_under_concurrency_across_workers() {
    let dir = root().join("tests/cases/timing");
    let server = tokio::task::block_in_place(|| TestServer::start(&dir, NoMatch::NotFound));
    // Many clients on separate connections (so on both workers) race for
    // the two limited responses of the sequence.
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let mut c = Client::connect(&server).await;
        tasks.push(tokio::spawn(async move { c.call("timing.T/Retry", &serde_json::json!({}), &[], None).await }));
    }
    let mut counts = std::collections::HashMap::new();
    for t in tasks {
        let r = t.await.unwrap();
        let key = r.body.map(|b| b["v"].as_str().unwrap().to_string()).unwrap_or(r.status);
        *counts.entry(key).or_insert(0) += 1;
    }
    assert_eq!(counts.get("UNAVAILABLE"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("second"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("steady"), Some(&62), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_fault_resets_the_stream() {
    let dir = root().join("tests/cases/timing");
    let server = tokio::task::block_in_place(|| TestServer::start(&dir, NoMatch::NotFound));
    let (response, mut send) = open_call(server.addr, "/timing.T/Flaky").await;
    send.send_data(frame(b"\x0a\x04drop"), true).unwrap();
    let err = response.await.expect_err("the stream is reset");
    assert_eq!(err.reason(), Some(h2::Reason::INTERNAL_ERROR), "{err}");
}

// ---- the binaries ---------------------------------------------------------

fn bin(name: &str) -> PathBuf {
    // Integration tests of another package cannot use CARGO_BIN_EXE_*; the
    // binaries sit next to the test executable's parent directory.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join(name);
    assert!(path.exists(), "{} not built; run `cargo build --workspace` first", path.display());
    path
}

#[test]
fn engine_refuses_a_corrupt_plan_with_a_clear_error() {
    let tmp = std::env::temp_dir().join(format!("wirestub-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let good = tmp.join("good.bin");
    let out = std::process::Command::new(bin("compiler"))
        .current_dir(root())
        .args(["build", "-o"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&good).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", bytes[..bytes.len() / 2].to_vec(), "checksum"),
        (
            "flipped",
            {
                let mut b = bytes.clone();
                let n = b.len() - 3;
                b[n] ^= 1;
                b
            },
            "checksum",
        ),
        ("not a plan", b"syntax = \"proto3\";".to_vec(), "not a plan file"),
        (
            "future version",
            {
                let mut b = bytes.clone();
                b[12] = 9;
                b
            },
            "version 9",
        ),
        ("empty", Vec::new(), "too short"),
    ];
    for (name, content, expect) in cases {
        let path = tmp.join(format!("{}.bin", name.replace(' ', "_")));
        std::fs::write(&path, content).unwrap();
        let out = std::process::Command::new(bin("engine"))
            .arg("run")
            .arg(&path)
            .args(["--listen", "127.0.0.1:0"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(expect) && stderr.contains(&path.display().to_string()), "{name}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn compiler_exit_codes() {
    let dir = root().join("tests/diagnostics/unknown-field");
    let out = std::process::Command::new(bin("compiler"))
        .arg("check")
        .arg("--protos")
        .arg(root().join("tests/diagnostics-protos"))
        .arg("--rules")
        .arg(dir.join("rules"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // `check` writes no plan in any case, so it does not say so.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("errors found\n") && !stderr.contains("no plan written"), "{stderr}");
    let out = std::process::Command::new(bin("compiler")).arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("compiler "));
    let out = std::process::Command::new(bin("compiler")).args(["completions", "bash"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("complete -F _wirestub_compiler compiler"));
    let out = std::process::Command::new(bin("compiler")).arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn protos_only_compiles_the_entry_files_and_their_imports() {
    let case = root().join("tests/diagnostics/lenient");
    let rules = std::env::temp_dir().join(format!("wirestub-protos-only-{}", std::process::id()));
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(rules.join("shop.shop.get.yaml"), "responses:\n  - body: { title: ok }\n").unwrap();
    let options = |only: &[&str]| wirestub_compiler::Options {
        protos: vec![case.join("protos")],
        rules: vec![rules.clone()],
        protos_only: only.iter().map(|s| s.to_string()).collect(),
        lenient: false,
    };
    // The whole tree fails: vendor/copy.proto redefines shop.Item.
    let all = wirestub_compiler::compile(&options(&[])).err().expect("the tree does not compile").render();
    assert!(all.contains("vendor/copy.proto"), "{all}");
    // Only shop.proto and what it imports: vendor/copy.proto is never read.
    let out = wirestub_compiler::compile(&options(&["shop.proto"])).unwrap_or_else(|d| panic!("{}", d.render()));
    assert!(out.plan.method("/shop.Shop/Get").is_some());
    let missing = wirestub_compiler::compile(&options(&["nowhere.proto"])).err().expect("an unknown entry").render();
    assert!(missing.contains("entry file `nowhere.proto` is not among the protos"), "{missing}");
    std::fs::remove_dir_all(&rules).ok();
}
