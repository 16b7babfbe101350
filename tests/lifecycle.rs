//! The engine's life around the calls: plan swaps under load, draining on
//! shutdown, and the counters and journal that watch calls. Real engine on
//! loopback, real gRPC client (tonic).

use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wirestub_engine::{NoMatch, Plan};
use wirestub_tests::{compile_with_rules, root, Client, TestServer};

const HELLO: &str = "helloworld.Greeter/SayHello";

fn example() -> Plan {
    compile_with_rules(&root().join("rules"))
}

fn lifecycle(case: &str) -> Plan {
    compile_with_rules(&root().join("tests/lifecycle").join(case).join("rules"))
}

/// Swaps between two plans in a loop while clients call without pause:
/// no call fails, every answer comes from one of the two plans, both are
/// seen, and a plan that fails validation is refused while the current
/// one keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_swap_under_load_without_a_failed_call() {
    let (a, b) = (example(), lifecycle("plan-b"));
    let server = tokio::task::block_in_place(|| TestServer::serve(a.clone(), NoMatch::NotFound));
    let state = server.state();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let client = Client::connect(&server).await;
        for _ in 0..4 {
            let (mut client, stop) = (client.clone(), stop.clone());
            clients.push(tokio::spawn(async move {
                let mut seen: BTreeMap<String, u64> = BTreeMap::new();
                let started = Instant::now();
                // Bounded in count and time.
                for _ in 0..20_000 {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(20) {
                        break;
                    }
                    let reply = client.call(HELLO, &json!({"name": "x"}), &[], Some(Duration::from_secs(5))).await;
                    let key = match (&reply.status[..], &reply.body) {
                        ("OK", Some(body)) => body["message"].as_str().unwrap_or_default().to_string(),
                        _ => format!("{} {}", reply.status, reply.message),
                    };
                    *seen.entry(key).or_default() += 1;
                }
                seen
            }));
        }
    }
    let swapper = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            let mut bad = b.clone();
            let broken = bad.methods.iter_mut().find(|m| m.path == format!("/{HELLO}")).expect("method");
            broken.regexes.push(vec![1, 2, 3]);
            for i in 0..60 {
                let next = if i % 2 == 0 { b.clone() } else { a.clone() };
                state.swap(next, None, format!("swap {i}")).expect("a valid plan swaps");
                if i % 10 == 5 {
                    let err = state.swap(bad.clone(), None, "broken".into()).expect_err("a broken plan is refused");
                    assert!(err.contains("regex"), "{err}");
                }
                std::thread::sleep(Duration::from_millis(15));
            }
        })
    };
    swapper.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    for c in clients {
        for (k, n) in c.await.unwrap() {
            *seen.entry(k).or_default() += n;
        }
    }
    let calls: u64 = seen.values().sum();
    let good = seen.get("Hello, stranger").copied().unwrap_or(0) + seen.get("Hello from plan B").copied().unwrap_or(0);
    assert_eq!(good, calls, "every call answered OK by one of the plans: {seen:?}");
    assert!(seen.contains_key("Hello, stranger") && seen.contains_key("Hello from plan B"), "{seen:?}");
    assert!(calls > 100, "calls ran during the swaps: {seen:?}");
    assert_eq!(state.current().number, 61, "60 swaps, broken plans not counted");
}

/// A call keeps the plan it started on: a slow call started before a swap
/// answers from the old plan; calls after the swap use the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_finishes_on_its_plan() {
    let server = tokio::task::block_in_place(|| TestServer::serve(lifecycle("slow"), NoMatch::NotFound));
    let state = server.state();
    let mut client = Client::connect(&server).await;
    let mut slow_client = client.clone();
    let slow = tokio::spawn(async move { slow_client.call(HELLO, &json!({"name": "x"}), &[], None).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b = lifecycle("plan-b");
    tokio::task::block_in_place(|| state.swap(b, None, "b".into())).unwrap();
    let fresh = client.call(HELLO, &json!({"name": "x"}), &[], None).await;
    assert_eq!(fresh.body.unwrap()["message"], "Hello from plan B");
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, "OK");
    assert_eq!(slow.body.unwrap()["message"], "Slow hello");
}

/// Shutdown while calls are in flight: every call finishes OK, and health
/// says NOT_SERVING from the start of the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_calls_in_flight() {
    let mut server = tokio::task::block_in_place(|| TestServer::serve(lifecycle("slow"), NoMatch::NotFound));
    let state = server.state();
    assert!(state.health.is_serving());
    let client = Client::connect(&server).await;
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move { c.call(HELLO, &json!({"name": "x"}), &[], None).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    tokio::task::block_in_place(|| server.shutdown());
    assert!(!state.health.is_serving(), "NOT_SERVING once draining");
    assert!(started.elapsed() < Duration::from_secs(2), "the drain ends when the calls do");
    for c in calls {
        let reply = c.await.unwrap();
        assert_eq!((reply.status.as_str(), reply.body.unwrap()["message"].clone()), ("OK", json!("Slow hello")));
    }
}

/// The metrics count calls per method, per code and per rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_codes_and_rules() {
    let server = tokio::task::block_in_place(|| TestServer::serve(example(), NoMatch::NotFound));
    let mut client = Client::connect(&server).await;
    for _ in 0..3 {
        assert_eq!(client.call(HELLO, &json!({"name": "Tom"}), &[], None).await.status, "OK");
    }
    assert_eq!(client.call(HELLO, &json!({"name": "blocked"}), &[], None).await.status, "PERMISSION_DENIED");
    let text = server.state().metrics.render();
    let labels = r#"grpc_type="unary",grpc_service="helloworld.Greeter",grpc_method="SayHello""#;
    for line in [
        format!("grpc_server_started_total{{{labels}}} 4"),
        format!(r#"grpc_server_handled_total{{{labels},grpc_code="OK"}} 3"#),
        format!(r#"grpc_server_handled_total{{{labels},grpc_code="PermissionDenied"}} 1"#),
        format!(r#"grpc_server_handling_seconds_count{{{labels}}} 4"#),
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
    }
    let hits = text
        .lines()
        .find(|l| l.starts_with("wirestub_rule_hits_total") && l.contains("sayhello.yaml:6"))
        .unwrap_or_else(|| panic!("no hit line for the Tom rule in:\n{text}"));
    assert!(hits.ends_with(" 3"), "{hits}");
}
