//! The checks of the `shared_journal_call` fuzz target (input layout and
//! invariants: `fuzz_targets/shared_journal_call.rs`), shared with
//! `tests/fuzz_regressions.rs`, which replays the seed corpus and every past
//! crash through them.

use serde_json::{json, Value as Json};
use wirestub_engine::observe::journal::{Call, Filter, MethodMatch};
use wirestub_engine::observe::shared_journal::SharedCall;

/// Runs the checks on one input.
pub fn check(data: &[u8]) {
    let Some((&seq, text)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(text) else { return };
    let Some(call) = SharedCall::from_stored(u64::from(seq), text) else { return };
    let view = call.view();
    assert_eq!(view["seq"], json!(seq));
    assert!(view.get("@metadata").is_none() && view.get("@unmatched").is_none(), "{view}");
    let _ = (call.answered(), call.unmatched(), call.session(), call.rule_origin());
    let everything = Filter::default();
    assert!(everything.matches(&call));
    assert!(everything.differences(&call).is_empty());

    let stored: Json = serde_json::from_str(text).unwrap_or(Json::Null);
    let pairs = stored.get("@metadata").and_then(Json::as_array).cloned().unwrap_or_default();
    for pair in pairs.iter().take(8) {
        let (Some(k), Some(v)) = (pair.get(0).and_then(Json::as_str), pair.get(1).and_then(Json::as_str)) else {
            continue;
        };
        assert!(view["metadata"].get(k).is_some(), "{k} missing from {view}");
        let by_pair = Filter { metadata: vec![(k.to_ascii_lowercase(), v.to_string())], ..Filter::default() };
        assert!(by_pair.matches(&call), "{k}={v} does not select {view}");
    }
    let path = call.path().to_string();
    if let Ok(method) = MethodMatch::parse(&path) {
        // A method is given as `/pkg.Service/Method`; a path that is not
        // one (spaces around it, more slashes) is never selected by one.
        if path.starts_with('/') && path.matches('/').count() == 2 && path.trim() == path {
            assert!(Filter { method: Some(method), ..Filter::default() }.matches(&call), "{path}");
        }
    }
    let status = call.status();
    assert!(Filter { status: Some(status), ..Filter::default() }.matches(&call));
    let other = Filter { status: Some(status.wrapping_add(1)), ..Filter::default() };
    assert!(!other.matches(&call));
    assert_eq!(other.differences(&call).len(), 1);
    if let Some(first) = call.requests().first().filter(|r| r.is_object()) {
        let body = Filter { body: Some(first.clone().into_owned()), ..Filter::default() };
        assert!(body.matches(&call), "{first}");
    }
}
