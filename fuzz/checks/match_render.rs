//! The checks of the `match_render` fuzz target (input layout and
//! invariants: `fuzz_targets/match_render.rs`), shared with
//! `tests/fuzz_regressions.rs`, which replays the seed corpus and every past
//! crash through them.

use http::{HeaderMap, HeaderName, HeaderValue};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use wirestub_compiler::{compile, Options};
use wirestub_engine::call::matcher::{Messages, Request};
use wirestub_engine::call::picks::Fold;
use wirestub_engine::call::template::{render, Context};
use wirestub_engine::protocol::grpc::{check_unary, Framing};
use wirestub_engine::served::ServedMethod;
use wirestub_engine::{NoMatch, Served};
use wirestub_plan::MethodKind;

/// Most messages a client stream is split into.
const MAX_MESSAGES: usize = 4;

/// The plans: the bundled example (`protos/`, `rules/` at the repository's
/// root) then every `tests/cases/<case>/` with its own protos and rules, in
/// name order.
fn plans() -> &'static [Served] {
    static PLANS: OnceLock<Vec<Served>> = OnceLock::new();
    PLANS.get_or_init(|| {
        // Requests are validated too, where a case's protos have rules.
        wirestub_engine::call::validate::set_enabled(true, &[]);
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut cases: Vec<PathBuf> = std::fs::read_dir(root.join("tests/cases"))
            .expect("reading tests/cases")
            .map(|e| e.expect("reading tests/cases").path())
            .filter(|d| d.join("protos").is_dir() && d.join("rules").is_dir())
            .collect();
        cases.sort();
        std::iter::once(root)
            .chain(cases)
            .map(|dir| {
                let options = Options {
                    protos: vec![dir.join("protos")],
                    rules: vec![dir.join("rules")],
                    protos_only: Vec::new(),
                    lenient: false,
                };
                let out = compile(&options).unwrap_or_else(|d| panic!("{}:\n{}", dir.display(), d.render()));
                wirestub_engine::load(&out.plan.to_bytes(), NoMatch::NotFound)
                    .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            })
            .collect()
    })
}

/// Every method of every plan, in order.
fn methods() -> &'static [&'static ServedMethod] {
    static METHODS: OnceLock<Vec<&'static ServedMethod>> = OnceLock::new();
    METHODS.get_or_init(|| plans().iter().flat_map(|p| &p.methods).collect())
}

/// Runs the checks on one input.
pub fn check(data: &[u8]) {
    let [which, meta_len, count, rest @ ..] = data else { return };
    let method = methods()[usize::from(*which) % methods().len()];
    let (meta, rest) = rest.split_at(usize::from(*meta_len).min(rest.len()));

    // Metadata: the i-th line is the value of the i-th key the rules read.
    let mut headers = HeaderMap::new();
    for (key, value) in method.plan.metadata_keys.iter().zip(meta.split(|&b| b == b'\n')) {
        let name = HeaderName::from_bytes(key.as_bytes()).expect("metadata keys are valid header names");
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.insert(name, value);
        }
    }

    match method.plan.kind {
        MethodKind::Unary | MethodKind::ServerStreaming => pick(method, &Messages::one(&[rest]), &headers),
        MethodKind::ClientStreaming | MethodKind::BidiStreaming => {
            // All messages but the last: a 2-byte little-endian length, then
            // the bytes; the last one is the rest.
            let n = usize::from(*count) % (MAX_MESSAGES + 1);
            let mut messages = Vec::with_capacity(n);
            let mut rest = rest;
            for i in 0..n {
                if i + 1 == n {
                    messages.push(rest);
                    break;
                }
                let len = match rest {
                    [a, b, tail @ ..] => {
                        rest = tail;
                        usize::from(u16::from_le_bytes([*a, *b])).min(rest.len())
                    }
                    _ => 0,
                };
                let (m, tail) = rest.split_at(len);
                messages.push(m);
                rest = tail;
            }
            if method.plan.duplex {
                // Each message is matched as it arrives.
                for m in messages {
                    pick(method, &Messages::one(&[m]), &headers);
                }
            } else {
                // What the server keeps of a client stream.
                let head: Vec<&[u8]> = messages.iter().copied().take(method.keep).collect();
                let last = messages.get(method.keep..).and_then(|l| l.last().copied()).or(head.last().copied());
                // Aggregates over every message, folded as the server does.
                let folds: Vec<_> = method
                    .each
                    .iter()
                    .map(|&i| {
                        let mut fold = Fold::default();
                        let f = &method.plan.fields[i as usize];
                        messages.iter().try_for_each(|m| fold.add_message(f, m)).map(|_| fold)
                    })
                    .collect();
                let view = Messages { head: &head, last, count: messages.len(), folds: &folds, violations: &[] };
                pick(method, &view, &headers);
            }
        }
    }
}

/// As the server picks and renders a response: the index must be a
/// response's, and every rendered message one framed message.
fn pick(method: &ServedMethod, messages: &Messages<'_>, headers: &HeaderMap) {
    let Ok(request) = Request::read(method, messages, headers) else { return };
    let Ok(chosen) = request.select() else { return };
    let prepared = match chosen {
        Some(i) => method
            .responses
            .get(i as usize)
            .unwrap_or_else(|| panic!("{}: rule chose response {i} of {}", method.plan.path, method.responses.len())),
        None => &method.no_match,
    };
    let total = prepared.stream.len() as u64;
    for (slot, t) in &prepared.templates {
        assert!((*slot as usize) <= prepared.stream.len(), "{}: template for item {slot}", method.plan.path);
        let index = u64::from(slot.saturating_sub(1));
        let Ok(bytes) = render(t, &Context { request: &request, index, total }) else { continue };
        assert_eq!(bytes.first(), Some(&0), "{}: a rendered message is not an uncompressed frame", method.plan.path);
        assert_eq!(
            check_unary(&bytes, bytes.len(), usize::MAX),
            Ok(Framing::One),
            "{}: a rendered message is not one framed message",
            method.plan.path
        );
    }
}
