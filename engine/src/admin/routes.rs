//! The admin API's routes: [`handle`] maps one parsed HTTP request to a
//! response, with no socket involved, so every route is tested directly.
//!
//! ```text
//! GET    /healthz                                 200 while the process runs (no token needed)
//! GET    /readyz                                  200 serving, 503 draining (no token needed)
//! GET    /metrics                                 Prometheus text format 0.0.4
//! GET    /admin/status                            plan, uptime, listeners, journal, draining
//! GET    /admin/services                          services and their methods
//! GET    /admin/methods/{pkg.Service}/{Method}/rules
//!                                                 the method's rules in evaluation order
//! GET    /admin/methods/{pkg.Service}/{Method}/rules/{index}
//!                                                 one rule with its answer as JSON
//! POST   /admin/reload                            load the plan again (422 if it is invalid)
//! DELETE /admin/shared/times                      every replica's `times` counts start again (--shared-state)
//! GET    /admin/journal                           recorded calls, oldest first (filters, a page)
//! DELETE /admin/journal                           forget every recorded call
//! GET    /admin/journal/count                     how many calls the filters select
//! POST   /admin/journal/verify                    expected number of calls (JSON body)
//! GET    /admin/journal/unmatched                 calls no rule answered, with the closest rule
//! GET    /admin/stats                             the call counters as JSON (for the UI's charts)
//! GET    /ui/...                                  the web UI's files (no token needed: they hold no data)
//! GET    /                                        redirects to /ui/
//! ```
//!
//! Journal filters (query parameters, values percent-encoded): `method`
//! (`/pkg.Svc/Method`, `pkg.Svc/Method` or a service `pkg.Svc`), `status`
//! (number or name), `matched` (true/false), `metadata` (`key=value`,
//! repeatable), `body` (a JSON object, subset of the request), `since` (a
//! sequence number: later calls only), `session` (the call's test
//! session: `x-wirestub-session` or `x-gripmock-session`; empty for calls
//! without one), `rule` (text the answering rule's origin,
//! `file:line:column`, contains), `before` (a sequence number:
//! earlier calls only). The list routes answer one page: the newest
//! `limit` calls selected ([`journal::DEFAULT_PAGE`], at most [`journal::MAX_PAGE`]), fewer
//! when their JSON would pass [`journal::PAGE_BYTES`]; `"page": {"limit", "more",
//! "before"}` says whether older calls were selected and the `before` that
//! asks for them. Entries are rendered one at a time into the body, so a
//! query holds about a page. JSON everywhere except `/metrics`; errors are
//! `{"error": "..."}` with a 4xx/5xx status.

use super::journal;
pub use super::response::Response;
use super::Options;
use crate::observe::journal as calls;
use crate::state::State;
use serde_json::{json, Value as Json};
use wirestub_plan::MethodKind;

const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Answers one request. `path` and `query` are as received
/// (percent-encoded); header names are lower-case. `HEAD` is answered as
/// `GET` (the caller leaves the body out).
pub fn handle(
    state: &State,
    options: &Options,
    method: &str,
    path: &str,
    query: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Response {
    let method = if method == "HEAD" { "GET" } else { method };
    let trimmed = match path.trim_end_matches('/') {
        "" => "/",
        p => p,
    };
    match trimmed {
        "/healthz" => {
            return only(method, &["GET"]).unwrap_or_else(|| Response::json(200, &json!({"status": "ok"})));
        }
        "/readyz" => {
            return only(method, &["GET"]).unwrap_or_else(|| match state.is_draining() {
                true => Response::json(503, &json!({"status": "draining"})),
                false => Response::json(200, &json!({"status": "ready"})),
            });
        }
        "/" => {
            return only(method, &["GET"]).unwrap_or_else(|| super::ui::redirect("/ui/"));
        }
        _ => {}
    }
    if let Some(asset) = super::ui::route(method, path) {
        return asset;
    }
    if let Some(refused) = foreign(options, headers) {
        return refused;
    }
    if let Some(refused) = authorize(options, headers) {
        return refused;
    }
    let segments: Vec<String> = trimmed.split('/').skip(1).map(|s| percent_decode(s, false)).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let query = parse_query(query);
    match segments.as_slice() {
        ["metrics"] => only(method, &["GET"]).unwrap_or_else(|| Response {
            status: 200,
            content_type: PROMETHEUS,
            headers: Vec::new(),
            body: metrics(state).into_bytes(),
        }),
        ["admin", "status"] => only(method, &["GET"]).unwrap_or_else(|| status(state, options)),
        ["admin", "services"] => only(method, &["GET"]).unwrap_or_else(|| services(state)),
        ["admin", "methods", service, name, "rules"] => {
            only(method, &["GET"]).unwrap_or_else(|| rules(state, service, name))
        }
        ["admin", "methods", service, name, "rules", index] => {
            only(method, &["GET"]).unwrap_or_else(|| rule(state, service, name, index))
        }
        ["admin", "reload"] => only(method, &["POST"]).unwrap_or_else(|| reload(state)),
        ["admin", "stats"] => {
            only(method, &["GET"]).unwrap_or_else(|| Response::json(200, &state.metrics.stats_json()))
        }
        ["admin", "shared", "times"] => only(method, &["DELETE"]).unwrap_or_else(|| match crate::shared::enabled() {
            false => Response::error(409, "the engine runs without --shared-state: its `times` counts are its own"),
            true => match crate::shared::reset() {
                Ok(n) => Response::json(200, &json!({"removed": n})),
                Err(e) => Response::error(503, &format!("the shared `times` counts cannot be reset: {e}")),
            },
        }),
        ["admin", "journal"] => journal::route(state, method, journal::Route::List, &query, body),
        ["admin", "journal", "count"] => journal::route(state, method, journal::Route::Count, &query, body),
        ["admin", "journal", "unmatched"] => journal::route(state, method, journal::Route::Unmatched, &query, body),
        ["admin", "journal", "verify"] => journal::route(state, method, journal::Route::Verify, &query, body),
        _ => {
            let request = super::Request { method, segments: &segments, query: &query, headers, body };
            options
                .extension
                .as_ref()
                .and_then(|e| e.handle(state, &request))
                .unwrap_or_else(|| Response::error(404, &format!("no admin route {trimmed}")))
        }
    }
}

/// None if `method` is one of `allowed`, else a 405.
pub fn only(method: &str, allowed: &[&str]) -> Option<Response> {
    (!allowed.contains(&method)).then(|| not_allowed(allowed))
}

/// A 405 with the `Allow` header.
pub fn not_allowed(allowed: &[&str]) -> Response {
    let mut list: Vec<&str> = allowed.to_vec();
    if list.contains(&"GET") {
        list.push("HEAD");
    }
    Response::error(405, &format!("method not allowed here; use {}", allowed.join(" or ")))
        .with_header("Allow", list.join(", "))
}

/// None when the request may go on, else a 401. A token of nothing but
/// white space is no token.
pub fn authorize(options: &Options, headers: &[(String, String)]) -> Option<Response> {
    let token = options.token.as_deref().map(str::trim).filter(|t| !t.is_empty())?;
    let presented = headers.iter().find(|(k, _)| k == "authorization").and_then(|(_, v)| {
        let (scheme, rest) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    match presented {
        Some(p) if constant_time_eq(p.as_bytes(), token.as_bytes()) => None,
        Some(_) => Some(unauthorized("the bearer token is not the admin token", "invalid_token")),
        None => Some(unauthorized("this route needs `Authorization: Bearer TOKEN` (the engine's --admin-token)", "")),
    }
}

/// None when a request may come from where it comes, else a 403: web pages
/// of other origins may not use the admin API from a browser (a page's
/// `fetch` or form would otherwise change the mocks of an engine without a
/// token), and on a loopback listener the `Host` must name this machine
/// (a DNS name pointing at 127.0.0.1 would otherwise let a remote page
/// read the API). Clients that are not browsers send neither `Origin` nor
/// `Sec-Fetch-Site`, and are not affected.
pub fn foreign(options: &Options, headers: &[(String, String)]) -> Option<Response> {
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.trim());
    let host = header("host").unwrap_or("");
    if header("sec-fetch-site").is_some_and(|s| s.eq_ignore_ascii_case("cross-site")) {
        return Some(Response::error(403, "requests from pages of other sites are refused by the admin API"));
    }
    if let Some(origin) = header("origin") {
        let authority = origin.split_once("://").map(|(_, rest)| rest).unwrap_or("");
        if authority.is_empty() || !authority.eq_ignore_ascii_case(host) {
            return Some(Response::error(
                403,
                &format!("requests from pages of other origins are refused by the admin API (Origin `{origin}`)"),
            ));
        }
    }
    if options.loopback && !host.is_empty() && !names_this_machine(host) {
        return Some(Response::error(
            403,
            &format!("the admin API listens on loopback and answers only for it: Host `{host}` is refused"),
        ));
    }
    None
}

/// Whether a `Host` value names the local machine: `localhost` (or a name
/// below it) or an IP address, with any port.
fn names_this_machine(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => return v6.split(']').next().is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok()),
        None => host.rsplit_once(':').map_or(host, |(n, port)| if port.parse::<u16>().is_ok() { n } else { host }),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

fn unauthorized(message: &str, error: &str) -> Response {
    let challenge = match error {
        "" => "Bearer realm=\"wirestub\"".to_string(),
        e => format!("Bearer realm=\"wirestub\", error=\"{e}\""),
    };
    Response::error(401, message).with_header("WWW-Authenticate", challenge)
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

pub use crate::codec::percent::decode as percent_decode;

/// `a=1&b=x%20y` into decoded pairs, in order.
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k, true), percent_decode(v, true)),
            None => (percent_decode(p, true), String::new()),
        })
        .collect()
}

/// `/metrics`: the call counters, then the gauges of what is held.
fn metrics(state: &State) -> String {
    let mut text = state.metrics.render();
    let journal = state.journal.as_ref().map(|j| crate::observe::metrics::JournalGauges {
        bytes: j.bytes(),
        bytes_limit: j.limits().bytes,
        entries: j.len(),
        capacity: j.capacity(),
        evicted: j.evicted(),
    });
    text.push_str(&crate::observe::metrics::render_gauges(journal));
    text.push_str(&crate::shared::render_metrics());
    if let Some(s) = crate::observe::shared_journal::get() {
        text.push_str(&s.render_metrics());
    }
    text
}

// ---------------------------------------------------------------------------
// Status, services, rules, reload
// ---------------------------------------------------------------------------

fn status(state: &State, options: &Options) -> Response {
    let g = state.current();
    let methods = g.served.methods.iter().filter(|m| m.builtin.is_none()).count();
    let rules: usize = g.served.methods.iter().map(|m| m.plan.rules.len()).sum();
    let journal = match &state.journal {
        Some(j) => {
            let limits = j.limits();
            json!({
                "enabled": true,
                "capacity": j.capacity(),
                "size": j.len(),
                "recorded": j.recorded(),
                "bytes": j.bytes(),
                "evicted": j.evicted(),
                "limits": {
                    "bytes": limits.bytes,
                    "messages": limits.messages,
                    "message_bytes": limits.message_bytes,
                },
                "shared": crate::observe::shared_journal::get().map(|s| s.status()),
            })
        }
        None => json!({"enabled": false}),
    };
    let listeners: Vec<Json> =
        state.listeners().iter().map(|l| json!({"kind": l.kind, "addr": l.addr.to_string()})).collect();
    Response::json(
        200,
        &json!({
            "plan": {
                "identity": g.identity,
                "version": g.version,
                "source": g.source,
                "loaded_at": calls::rfc3339(g.loaded),
                "generation": g.number,
            },
            "started_at": calls::rfc3339(state.started),
            "uptime_seconds": state.uptime().as_secs_f64(),
            "services": g.services(),
            "methods": methods,
            "rules": rules,
            "listeners": listeners,
            "journal": journal,
            "workers": state.workers,
            "draining": state.is_draining(),
            "validation": crate::call::validate::settings_json(),
            "runtime": options.extension.as_ref().map(|e| e.status()),
            "upstream": options.upstream.as_ref().and_then(|u| u.default.as_ref()).map(|u| u.status()),
            "upstreams_by_service": options.upstream.as_ref().map(|u| {
                u.services.iter().map(|(s, u)| (s.to_string(), u.status())).collect::<serde_json::Map<_, _>>()
            }),
        }),
    )
}

fn services(state: &State) -> Response {
    let g = state.current();
    let mut services: Vec<(String, Vec<Json>)> = Vec::new();
    for m in &g.served.methods {
        let (service, name) = m.plan.path.strip_prefix('/').and_then(|p| p.split_once('/')).unwrap_or(("", ""));
        let method = json!({
            "name": name,
            "path": m.plan.path,
            "kind": m.plan.kind.name(),
            "duplex": m.plan.duplex,
            "input_type": m.plan.input_type,
            "output_type": m.plan.output_type,
            "rules": m.plan.rules.len(),
            "builtin": m.builtin.is_some(),
            "validated": !(m.plan.checks.is_empty() && m.plan.cel_checks.is_empty())
                && crate::call::validate::enabled_for(&m.plan.path),
            // Wishmock's names for the same facts, for its UI and scripts.
            "full_method": format!("{service}/{name}"),
            "rule_key": format!("{service}.{name}").to_ascii_lowercase(),
            "request_type": m.plan.input_type.trim_start_matches('.'),
            "response_type": m.plan.output_type.trim_start_matches('.'),
            "request_stream": matches!(m.plan.kind, MethodKind::ClientStreaming | MethodKind::BidiStreaming),
            "response_stream": matches!(m.plan.kind, MethodKind::ServerStreaming | MethodKind::BidiStreaming),
        });
        match services.iter_mut().find(|(s, _)| s == service) {
            Some((_, list)) => list.push(method),
            None => services.push((service.to_string(), vec![method])),
        }
    }
    let list: Vec<Json> = services
        .into_iter()
        .map(|(name, methods)| {
            let (package, service) = name.rsplit_once('.').unwrap_or(("", &name));
            json!({"name": name, "package": package, "service": service, "methods": methods})
        })
        .collect();
    Response::json(200, &json!({ "services": list }))
}

fn rules(state: &State, service: &str, name: &str) -> Response {
    let g = state.current();
    let path = format!("/{service}/{name}");
    let Some(m) = g.served.method(&path) else {
        return Response::error(404, &format!("no method {path} in the plan"));
    };
    let plan = &m.plan;
    let hits = state.metrics.rule_hits();
    let rules: Vec<Json> = plan
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let response = plan.responses.get(r.response as usize);
            let used = m.used.get(r.response as usize).map(|u| u.load(std::sync::atomic::Ordering::Relaxed));
            let response = match response {
                Some(resp) => json!({
                    "index": r.response,
                    "status": {"code": resp.status, "name": calls::status_name(resp.status)},
                    "message": percent_decode(&resp.message, false),
                    "times": resp.times,
                    "used": if resp.times > 0 { used.map(|u| u.min(resp.times as u64)) } else { None },
                    "delay_ms": resp.delay_ms,
                    "latency": latency_json(resp.latency),
                    "stream_items": resp.stream.len(),
                    "fault": resp.fault.as_ref().map(|f| json!({
                        "rate": f.rate,
                        "drop": f.drop,
                        "status": calls::status_name(f.status),
                    })),
                }),
                None => Json::Null,
            };
            json!({
                "index": i,
                "origin": r.origin,
                "priority": r.priority,
                "conditions": r.conditions.iter().map(|c| calls::describe_condition(plan, c)).collect::<Vec<_>>(),
                "hits": hits.get(&r.origin).copied().unwrap_or(0),
                "response": response,
            })
        })
        .collect();
    Response::json(
        200,
        &json!({
            "method": plan.path,
            "kind": plan.kind.name(),
            "input_type": plan.input_type,
            "output_type": plan.output_type,
            "builtin": m.builtin.is_some(),
            "rules": rules,
        }),
    )
}

/// One rule with everything it answers: status, metadata, and the
/// response messages decoded to JSON (those rendered per call are marked
/// `"@template"` and shown as prepared, holes empty).
fn rule(state: &State, service: &str, name: &str, index: &str) -> Response {
    let g = state.current();
    let path = format!("/{service}/{name}");
    let Some(m) = g.served.method(&path) else {
        return Response::error(404, &format!("no method {path} in the plan"));
    };
    let plan = &m.plan;
    let Some((i, r)) = index.parse::<usize>().ok().and_then(|i| Some((i, plan.rules.get(i)?))) else {
        return Response::error(404, &format!("{path} has no rule {index} (it has {})", plan.rules.len()));
    };
    let output = g.schema().and_then(|p| p.get_message_by_name(plan.output_type.trim_start_matches('.')));
    let decode = |framed: &[u8], slot: u32, resp: &wirestub_plan::Response| -> Json {
        let bytes = framed.get(5..).unwrap_or_default();
        let json = output
            .as_ref()
            .and_then(|d| prost_reflect::DynamicMessage::decode(d.clone(), bytes).ok())
            .and_then(|msg| msg.serialize_with_options(serde_json::value::Serializer, &calls::json_options()).ok())
            .unwrap_or_else(|| json!({"@base64": calls::base64(bytes)}));
        match resp.templates.iter().any(|(s, _)| *s == slot) {
            true => json!({"@template": true, "prepared": json}),
            false => json,
        }
    };
    let metadata = |list: &[(String, Vec<u8>)]| -> serde_json::Map<String, Json> {
        list.iter().map(|(k, v)| (k.clone(), json!(calls::metadata_text(k, v)))).collect()
    };
    let response = plan.responses.get(r.response as usize).map(|resp| {
        let mut out = json!({
            "index": r.response,
            "status": {"code": resp.status, "name": calls::status_name(resp.status)},
            "message": percent_decode(&resp.message, false),
            "headers": metadata(&resp.headers),
            "trailers": metadata(&resp.trailers),
            "delay_ms": resp.delay_ms,
            "times": resp.times,
        });
        if !resp.body.is_empty() {
            out["body"] = decode(&resp.body, 0, resp);
        }
        if !resp.stream.is_empty() {
            out["stream"] = resp.stream.iter().enumerate().map(|(k, item)| decode(item, k as u32 + 1, resp)).collect();
        }
        let templated: Vec<Json> =
            resp.metadata_templates.iter().map(|t| json!({"name": t.name, "trailer": t.trailer})).collect();
        if !templated.is_empty() {
            out["metadata_templates"] = Json::Array(templated);
        }
        out
    });
    Response::json(
        200,
        &json!({
            "method": plan.path,
            "index": i,
            "origin": r.origin,
            "priority": r.priority,
            "hits": state.metrics.rule_hits().get(&r.origin).copied().unwrap_or(0),
            "conditions": r.conditions.iter().map(|c| calls::describe_condition(plan, c)).collect::<Vec<_>>(),
            "response": response,
        }),
    )
}

fn latency_json(l: wirestub_plan::Latency) -> Json {
    use wirestub_plan::Latency;
    match l {
        Latency::Fixed => json!("fixed"),
        Latency::Uniform { min, max } => json!({"uniform": {"min_ms": min, "max_ms": max}}),
        Latency::Normal { mean, stddev } => json!({"normal": {"mean_ms": mean, "stddev_ms": stddev}}),
        Latency::LogNormal { median, p99 } => json!({"log_normal": {"median_ms": median, "p99_ms": p99}}),
    }
}

fn reload(state: &State) -> Response {
    let Some(reloaded) = state.try_reload() else {
        return Response::error(409, "a reload is running already; ask again once it is done");
    };
    match reloaded {
        Ok(r) => Response::json(
            200,
            &json!({
                "identity": r.identity,
                "generation": r.number,
                "changed": r.changed,
                "methods": r.methods,
                "rules": r.rules,
            }),
        ),
        Err(e) => Response::error(422, &e),
    }
}

// ---------------------------------------------------------------------------
// Access
// ---------------------------------------------------------------------------

/// Whether a request is answered without the admin token: the probes,
/// `/` and the UI's files (which hold no data; the UI sends the token with
/// every request for data).
pub fn is_public(path: &str) -> bool {
    is_probe(path) || path == "/" || path == "/ui" || path.starts_with("/ui/")
}

/// Whether a request is a probe (`/healthz`, `/readyz`, `/metrics`):
/// cheap, answered on the server's own thread, even at its connection
/// limit.
pub fn is_probe(path: &str) -> bool {
    matches!(path.trim_end_matches('/'), "/healthz" | "/readyz" | "/metrics")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::journal::{DEFAULT_PAGE, MAX_PAGE, PAGE_BYTES};
    use crate::admin::response::JSON;
    use crate::call::matcher::Closest;
    use crate::observe::journal::fixture::{self, entry, hello, CHAT, SAY_HELLO};

    fn call(state: &State, token: Option<&str>, method: &str, target: &str, body: &str) -> Response {
        call_as(state, token, &[], method, target, body)
    }

    fn call_as(
        state: &State,
        token: Option<&str>,
        headers: &[(&str, &str)],
        method: &str,
        target: &str,
        body: &str,
    ) -> Response {
        let options = Options { token: token.map(Into::into), ..Options::default() };
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        handle(state, &options, method, path, query, &headers, body.as_bytes())
    }

    fn get(state: &State, target: &str) -> Response {
        call(state, None, "GET", target, "")
    }

    /// The journal's recorded calls: 1 Tom/fr (rule 1), 2 Tom/en
    /// (unmatched, closest rule 1), 3 a chat stream.
    fn with_calls() -> State {
        let state = fixture::state(8);
        let j = state.journal.as_ref().unwrap();
        j.record(entry(
            &state,
            SAY_HELLO,
            &[("x-role", b"root")],
            vec![hello("Tom", 0, &[], Some("fr"))],
            Some(1),
            0,
            None,
        ));
        let closest = Closest { rule: 1, failed: 1, held: 1 };
        j.record(entry(&state, SAY_HELLO, &[], vec![hello("Tom", 0, &[], Some("en"))], None, 5, Some(closest)));
        j.record(entry(&state, CHAT, &[], vec![hello("a", 0, &[], None)], None, 12, None));
        state
    }

    #[test]
    fn probes() {
        let state = fixture::state(0);
        assert_eq!(get(&state, "/healthz").status, 200);
        assert_eq!(get(&state, "/readyz").status, 200);
        assert_eq!(call(&state, None, "HEAD", "/readyz/", "").status, 200);
        assert_eq!(call(&state, None, "POST", "/healthz", "").status, 405);
        state.start_draining();
        assert_eq!(get(&state, "/readyz").status, 503);
        assert_eq!(get(&state, "/readyz").body_json()["status"], "draining");
        assert_eq!(get(&state, "/healthz").status, 200);
    }

    #[test]
    fn the_token_guards_everything_but_the_probes() {
        let state = fixture::state(0);
        let t = Some("s3cret");
        assert_eq!(call(&state, t, "GET", "/healthz", "").status, 200);
        assert_eq!(call(&state, t, "GET", "/readyz", "").status, 200);
        // The UI's files hold no data: the page loads, then asks for the token.
        assert_eq!(call(&state, t, "GET", "/ui/", "").status, 200);
        assert_eq!(call(&state, t, "GET", "/ui/app.js", "").status, 200);
        assert_eq!(call(&state, t, "GET", "/", "").status, 302);
        assert!(is_public("/ui/app.js") && is_public("/") && !is_public("/uix") && !is_public("/admin/stats"));
        for target in ["/admin/status", "/metrics", "/admin/journal", "/admin/stats", "/nowhere", "/uix"] {
            let r = call(&state, t, "GET", target, "");
            assert_eq!(r.status, 401, "{target}");
            assert!(r.headers.iter().any(|(k, v)| *k == "WWW-Authenticate" && v.starts_with("Bearer")), "{target}");
        }
        let wrong = call_as(&state, t, &[("authorization", "Bearer s3cre")], "GET", "/admin/status", "");
        assert_eq!(wrong.status, 401);
        let basic = call_as(&state, t, &[("authorization", "Basic s3cret")], "GET", "/admin/status", "");
        assert_eq!(basic.status, 401);
        let right = call_as(&state, t, &[("authorization", "bearer  s3cret ")], "GET", "/admin/status", "");
        assert_eq!(right.status, 200);
        // An empty token turns the check off.
        assert_eq!(call(&state, Some(""), "GET", "/admin/status", "").status, 200);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(
            !constant_time_eq(b"abc", b"abd") && !constant_time_eq(b"abc", b"abcd") && !constant_time_eq(b"", b"a")
        );
    }

    #[test]
    fn status_services_and_rules() {
        let state = with_calls();
        let s = get(&state, "/admin/status").body_json();
        assert_eq!(s["plan"]["generation"], 1);
        assert_eq!(s["plan"]["source"], "demo plan");
        assert_eq!(s["plan"]["version"], wirestub_plan::VERSION);
        assert_eq!(s["plan"]["identity"].as_str().unwrap().len(), 16);
        assert_eq!(s["services"], json!(["demo.Greeter"]));
        assert_eq!((s["methods"].clone(), s["rules"].clone()), (json!(2), json!(4)));
        let journal = &s["journal"];
        assert_eq!((journal["enabled"].clone(), journal["capacity"].clone()), (json!(true), json!(8)));
        assert_eq!((journal["size"].clone(), journal["recorded"].clone()), (json!(3), json!(3)));
        assert_eq!(journal["evicted"], 0);
        assert_eq!(s["draining"], false);
        // Process-wide settings (other tests may change them): their shape.
        assert!(s["validation"]["enabled"].is_boolean() && s["validation"]["services"].is_object());
        assert!(["per-message", "aggregate"].contains(&s["validation"]["mode"].as_str().unwrap()));
        assert!(s["started_at"].as_str().unwrap().ends_with('Z'));
        assert!(s["uptime_seconds"].as_f64().unwrap() >= 0.0);

        let services = get(&state, "/admin/services").body_json();
        let list = services["services"].as_array().unwrap();
        let demo = list.iter().find(|s| s["name"] == "demo.Greeter").unwrap();
        let hello = demo["methods"].as_array().unwrap().iter().find(|m| m["name"] == "SayHello").unwrap();
        assert_eq!(hello["path"], SAY_HELLO);
        assert_eq!(hello["kind"], "unary");
        assert_eq!(hello["input_type"], "demo.HelloRequest");
        assert_eq!((hello["rules"].clone(), hello["builtin"].clone()), (json!(4), json!(false)));
        let health = list.iter().find(|s| s["name"] == "grpc.health.v1.Health").unwrap();
        assert_eq!(health["methods"][0]["builtin"], true);

        let rules = get(&state, "/admin/methods/demo.Greeter/SayHello/rules").body_json();
        let rules = rules["rules"].as_array().unwrap();
        assert_eq!(rules.len(), 4);
        assert_eq!(rules[0]["origin"], "rules/demo.yaml:3:9");
        assert_eq!(rules[0]["priority"], 20);
        assert_eq!(rules[0]["conditions"][0]["text"], "metadata.x-role == \"root\"");
        assert_eq!(rules[0]["conditions"][1]["text"], "request.name == \"admin\"");
        assert_eq!(rules[2]["response"]["status"], json!({"code": 7, "name": "PERMISSION_DENIED"}));
        assert_eq!(rules[2]["response"]["message"], "denied");
        assert_eq!(rules[3]["response"]["times"], 1);
        assert_eq!(rules[3]["conditions"][0]["text"], "request.tags contains \"vip\"");
        // Percent-encoded segments work too.
        assert_eq!(get(&state, "/admin/methods/demo.Greeter/Say%48ello/rules").status, 200);
        let missing = get(&state, "/admin/methods/demo.Greeter/Nope/rules");
        assert_eq!(missing.status, 404);
        assert!(missing.body_json()["error"].as_str().unwrap().contains("/demo.Greeter/Nope"));
    }

    #[test]
    fn one_rule_with_its_answer_and_hits() {
        let state = fixture::state(0);
        // SAY_HELLO is method 1 of the demo plan; its rule 0 answers twice.
        let g = state.current();
        let stats = g.stats.worker(0);
        for _ in 0..2 {
            stats.started(1);
            stats.rule(1, Some(0));
            stats.handled(1, 0, std::time::Duration::from_micros(300));
        }
        drop(g);
        let rule = get(&state, "/admin/methods/demo.Greeter/SayHello/rules/0").body_json();
        assert_eq!(rule["origin"], "rules/demo.yaml:3:9");
        assert_eq!(rule["hits"], 2);
        assert_eq!(rule["response"]["status"]["name"], "OK");
        assert_eq!(rule["response"]["body"], json!({"message": "Hi"}));
        let denied = get(&state, "/admin/methods/demo.Greeter/SayHello/rules/2").body_json();
        assert_eq!(denied["response"]["status"], json!({"code": 7, "name": "PERMISSION_DENIED"}));
        assert!(denied["response"].get("body").is_none());
        for bad in ["4", "x", "-1"] {
            let r = get(&state, &format!("/admin/methods/demo.Greeter/SayHello/rules/{bad}"));
            assert_eq!(r.status, 404, "{bad}");
        }
        let list = get(&state, "/admin/methods/demo.Greeter/SayHello/rules").body_json();
        assert_eq!(list["rules"][0]["hits"], 2);
        assert_eq!(list["rules"][1]["hits"], 0);

        // The same counters as JSON for the UI's charts.
        let stats = get(&state, "/admin/stats").body_json();
        assert_eq!(stats["le"][0], 0.005);
        let hello = stats["methods"].as_array().unwrap().iter().find(|m| m["method"] == "SayHello").unwrap().clone();
        assert_eq!((hello["started"].clone(), hello["handled"].clone()), (json!(2), json!(2)));
        assert_eq!(hello["codes"], json!({"OK": 2}));
        assert_eq!(hello["buckets"].as_array().unwrap().len(), 12);
        assert_eq!(hello["buckets"][0], 2, "300 µs is in the first bucket, and the counts are cumulative");
        assert_eq!(hello["buckets"][11], 2);
        assert_eq!(hello["rules"]["rules/demo.yaml:3:9"], 2);
        assert_eq!(get(&state, "/admin/stats").content_type, JSON);
        assert_eq!(call(&state, None, "POST", "/admin/stats", "").status, 405);
    }

    #[test]
    fn pages_of_other_origins_and_other_hosts_are_refused() {
        let state = fixture::state(0);
        let ask = |loopback: bool, headers: &[(&str, &str)], method: &str, target: &str| {
            let options = Options { loopback, ..Options::default() };
            let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            handle(&state, &options, method, target, "", &headers, b"").status
        };
        let host = ("host", "127.0.0.1:9901");
        // Not a browser: no Origin, no Sec-Fetch-Site.
        assert_eq!(ask(true, &[host], "GET", "/admin/status"), 200);
        assert_eq!(ask(true, &[], "GET", "/admin/status"), 200);
        // The UI itself: same origin.
        assert_eq!(ask(true, &[host, ("origin", "http://127.0.0.1:9901")], "POST", "/admin/reload"), 422);
        assert_eq!(ask(true, &[host, ("sec-fetch-site", "same-origin")], "GET", "/admin/status"), 200);
        // Another page: refused before anything happens.
        for headers in [
            &[host, ("origin", "http://evil.example")][..],
            &[host, ("origin", "null")][..],
            &[host, ("origin", "http://127.0.0.1:9902")][..],
            &[host, ("sec-fetch-site", "cross-site")][..],
        ] {
            assert_eq!(ask(true, headers, "POST", "/admin/reload"), 403, "{headers:?}");
            assert_eq!(ask(false, headers, "GET", "/admin/status"), 403, "{headers:?}");
        }
        // DNS rebinding: on loopback, only names of this machine.
        for ok in ["localhost:9901", "LOCALHOST", "app.localhost:1", "[::1]:9901", "10.0.0.7:9901", "127.0.0.1"] {
            assert_eq!(ask(true, &[("host", ok)], "GET", "/admin/status"), 200, "{ok}");
        }
        for bad in ["evil.example:9901", "evil.example", "localhost.evil.example", "[evil]:1"] {
            assert_eq!(ask(true, &[("host", bad)], "GET", "/admin/status"), 403, "{bad}");
            assert_eq!(ask(false, &[("host", bad)], "GET", "/admin/status"), 200, "{bad}: not on loopback");
        }
        // Probes and the UI's files are answered whatever the Host.
        assert_eq!(ask(true, &[("host", "evil.example")], "GET", "/healthz"), 200);
    }

    #[test]
    fn unknown_routes_and_methods() {
        let state = fixture::state(0);
        assert_eq!(get(&state, "/admin/nothing").status, 404);
        assert_eq!(get(&state, "/").status, 302);
        let r = call(&state, None, "PUT", "/admin/status", "");
        assert_eq!(r.status, 405);
        assert!(r.headers.contains(&("Allow", "GET, HEAD".to_string())));
        assert_eq!(get(&state, "/admin/reload").status, 405);
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let state = fixture::state(0);
        let r = get(&state, "/metrics");
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type, "text/plain; version=0.0.4; charset=utf-8");
        assert!(String::from_utf8(r.body).unwrap().contains("# TYPE grpc_server_started_total counter"));
    }

    #[test]
    fn reload() {
        let state = fixture::state(0);
        let r = call(&state, None, "POST", "/admin/reload", "");
        assert_eq!(r.status, 422);
        assert!(r.body_json()["error"].as_str().unwrap().contains("no plan source"));
        state.set_reloader(Box::new(|| Ok((fixture::plan(), None, "again".into()))));
        let r = call(&state, None, "POST", "/admin/reload", "");
        assert_eq!(r.status, 200, "{:?}", r.body_json());
        let v = r.body_json();
        assert_eq!((v["generation"].clone(), v["changed"].clone()), (json!(2), json!(false)));
        assert_eq!(get(&state, "/admin/status").body_json()["plan"]["source"], "again");
        state.set_reloader(Box::new(|| Err("rules/x.yaml:1:1: bad rule".into())));
        let r = call(&state, None, "POST", "/admin/reload", "");
        assert_eq!((r.status, r.body_json()["error"].clone()), (422, json!("rules/x.yaml:1:1: bad rule")));
        assert_eq!(get(&state, "/admin/status").body_json()["plan"]["generation"], 2);
    }

    #[test]
    fn journal_routes_need_the_journal() {
        let state = fixture::state(0);
        for (method, target) in [
            ("GET", "/admin/journal"),
            ("DELETE", "/admin/journal"),
            ("GET", "/admin/journal/count"),
            ("GET", "/admin/journal/unmatched"),
            ("POST", "/admin/journal/verify"),
        ] {
            let r = call(&state, None, method, target, "{}");
            assert_eq!(r.status, 409, "{method} {target}");
            assert!(r.body_json()["error"].as_str().unwrap().contains("--journal N"));
        }
        assert_eq!(get(&state, "/admin/status").body_json()["journal"], json!({"enabled": false}));
    }

    #[test]
    fn journal_list_filters_and_limit() {
        let state = with_calls();
        let seqs = |target: &str| -> Vec<u64> {
            let r = get(&state, target);
            assert_eq!(r.status, 200, "{target}: {:?}", r.body_json());
            r.body_json()["entries"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect()
        };
        assert_eq!(seqs("/admin/journal"), [1, 2, 3]);
        assert_eq!(seqs("/admin/journal?limit=2"), [2, 3]);
        assert_eq!(seqs("/admin/journal?method=%2Fdemo.Greeter%2FSayHello"), [1, 2]);
        assert_eq!(seqs("/admin/journal?method=demo.Greeter/Chat"), [3]);
        assert_eq!(seqs("/admin/journal?method=demo.Greeter"), [1, 2, 3]);
        assert_eq!(seqs("/admin/journal?status=NOT_FOUND"), [2]);
        assert_eq!(seqs("/admin/journal?status=0"), [1]);
        assert_eq!(seqs("/admin/journal?matched=false"), [2, 3]);
        assert_eq!(seqs("/admin/journal?metadata=x-role%3Droot"), [1]);
        // The rule: its whole origin, or a file name for every rule of it.
        assert_eq!(seqs("/admin/journal?rule=rules%2Fdemo.yaml%3A10%3A9"), [1]);
        assert_eq!(seqs("/admin/journal?rule=demo.yaml"), [1]);
        assert_eq!(seqs("/admin/journal?rule=demo.yaml:3:9"), Vec::<u64>::new());
        assert_eq!(get(&state, "/admin/journal/count?rule=demo.yaml").body_json(), json!({"count": 1}));
        assert_eq!(seqs("/admin/journal?since=2"), [3]);
        assert_eq!(seqs("/admin/journal?body=%7B%22locale%22%3A%7B%22language%22%3A%22en%22%7D%7D"), [2]);
        assert_eq!(seqs("/admin/journal?body={\"name\":\"Tom\"}&limit=1"), [2]);
        let all = get(&state, "/admin/journal?limit=1").body_json();
        assert_eq!((all["matched"].clone(), all["size"].clone()), (json!(3), json!(3)));

        for bad in ["limit=x", "status=NOPE", "matched=maybe", "body=[1]", "body={", "method=", "metadata=x", "what=1"]
        {
            let r = get(&state, &format!("/admin/journal?{bad}"));
            assert_eq!(r.status, 400, "{bad}");
        }
        assert_eq!(get(&state, "/admin/journal/count?limit=1").status, 400);
        assert_eq!(get(&state, "/admin/journal/count").body_json(), json!({"count": 3}));
        assert_eq!(get(&state, "/admin/journal/count?method=demo.Greeter%2FSayHello").body_json(), json!({"count": 2}));

        let unmatched = get(&state, "/admin/journal/unmatched?method=demo.Greeter/SayHello").body_json();
        let entries = unmatched["entries"].as_array().unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0]["closest"]["origin"], "rules/demo.yaml:10:9");
        assert_eq!(entries[0]["closest"]["failed"]["actual"], "en");

        let r = call(&state, None, "DELETE", "/admin/journal", "");
        assert_eq!(r.body_json(), json!({"removed": 3}));
        assert_eq!(get(&state, "/admin/journal/count").body_json(), json!({"count": 0}));
    }

    #[test]
    fn journal_listings_page() {
        let state = fixture::state(100);
        let j = state.journal.as_ref().unwrap();
        for i in 0..150 {
            j.record(entry(&state, SAY_HELLO, &[], vec![hello(&format!("n{i}"), 0, &[], None)], None, 5, None));
        }
        let page = |target: &str| {
            let r = get(&state, target);
            assert_eq!(r.status, 200, "{target}: {:?}", r.body_json());
            let v = r.body_json();
            let seqs: Vec<u64> = v["entries"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
            (seqs, v["page"].clone(), v["matched"].clone())
        };
        // 100 kept of 150; the default page is all of them here.
        let (seqs, p, matched) = page("/admin/journal");
        assert_eq!((seqs.len(), seqs[0], matched), (100, 51, json!(100)));
        assert_eq!(p, json!({"limit": DEFAULT_PAGE, "more": false, "before": null}));
        // Paging back from the newest.
        let (seqs, p, _) = page("/admin/journal?limit=30");
        assert_eq!((seqs.first(), seqs.last()), (Some(&121), Some(&150)));
        assert_eq!(p, json!({"limit": 30, "more": true, "before": 121}));
        let (seqs, p, matched) = page("/admin/journal?limit=30&before=121");
        assert_eq!((seqs.first(), seqs.last(), matched), (Some(&91), Some(&120), json!(70)));
        assert_eq!(p["before"], 91);
        let (seqs, p, _) = page("/admin/journal?limit=30&before=61");
        assert_eq!(seqs, (51..61).collect::<Vec<_>>());
        assert_eq!(p, json!({"limit": 30, "more": false, "before": null}));
        let (_, p, _) = page("/admin/journal?limit=99999");
        assert_eq!(p["limit"], MAX_PAGE);
        let (seqs, p, _) = page("/admin/journal/unmatched?limit=1&since=140");
        assert_eq!((seqs, p["more"].clone()), (vec![150], json!(true)));
        assert_eq!(get(&state, "/admin/journal/count?before=60").body_json(), json!({"count": 9}));
    }

    #[test]
    fn journal_pages_stop_at_their_byte_budget() {
        let state = fixture::state(100);
        let j = state.journal.as_ref().unwrap();
        // About 87 KB of JSON each (a cut 64 KiB message, in base64).
        let big = vec![0xffu8; 100 << 10];
        for _ in 0..100 {
            j.record(entry(&state, SAY_HELLO, &[], vec![big.clone()], None, 5, None));
        }
        let r = get(&state, "/admin/journal?limit=1000");
        let v = r.body_json();
        let shown = v["entries"].as_array().unwrap().len();
        assert!(r.body.len() <= PAGE_BYTES + 4096, "{}", r.body.len());
        assert!((30..100).contains(&shown), "{shown}");
        assert_eq!(v["page"]["more"], true);
        assert_eq!(v["page"]["before"], 101 - shown as u64);
        assert_eq!(v["entries"][0]["request"]["@truncated"], json!({"size": 100 << 10, "kept_bytes": 64 << 10}));
    }

    #[test]
    fn metrics_show_what_is_held() {
        let state = with_calls();
        let text = String::from_utf8(get(&state, "/metrics").body).unwrap();
        let j = state.journal.as_ref().unwrap();
        assert!(text.contains(&format!("\nwirestub_journal_bytes {}\n", j.bytes())), "{text}");
        assert!(text.contains("\nwirestub_journal_entries 3\n"), "{text}");
        assert!(text.contains(&format!("\nwirestub_journal_bytes_limit {}\n", 64 << 20)), "{text}");
        assert!(text.contains("# TYPE wirestub_buffered_request_bytes gauge\nwirestub_buffered_request_bytes "));
        let s = get(&state, "/admin/status").body_json();
        assert_eq!(s["journal"]["bytes"], j.bytes());
        assert_eq!(s["journal"]["limits"]["messages"], 16);
        let none = String::from_utf8(get(&fixture::state(0), "/metrics").body).unwrap();
        assert!(none.contains("wirestub_buffered_request_bytes") && !none.contains("wirestub_journal_bytes"));
    }

    #[test]
    fn journal_verify() {
        let state = with_calls();
        let verify = |body: &str| {
            let r = call(&state, None, "POST", "/admin/journal/verify", body);
            (r.status, r.body_json())
        };
        let (status, v) = verify(r#"{"method": "demo.Greeter/SayHello", "body": {"name": "Tom"}, "times": 2}"#);
        assert_eq!((status, v["ok"].clone(), v["count"].clone()), (200, json!(true), json!(2)));
        assert_eq!(v["seqs"], json!([1, 2]));
        let (_, v) = verify(r#"{"method": "/demo.Greeter/SayHello", "metadata": {"x-role": "root"}}"#);
        assert_eq!(v["ok"], true);
        let (_, v) = verify(r#"{"method": "demo.Greeter/SayHello", "body": {"name": "Tim"}, "at_least": 1}"#);
        assert_eq!((v["ok"].clone(), v["count"].clone()), (json!(false), json!(0)));
        assert_eq!(
            v["closest"][0]["differences"][0],
            json!({"at": "request.name", "expected": "Tim", "actual": "Tom"})
        );
        let (_, v) = verify(r#"{"method": "demo.Greeter", "at_most": 1}"#);
        assert_eq!((v["ok"].clone(), v["expected"].clone()), (json!(false), json!("at most 1")));
        let (_, v) = verify(r#"{"method": "demo.Greeter", "at_least": 1, "at_most": 3, "status": "NOT_FOUND"}"#);
        assert_eq!((v["ok"].clone(), v["count"].clone()), (json!(true), json!(1)));
        for bad in [
            "",
            "[]",
            "{",
            r#"{"body": {}}"#,
            r#"{"method": 1}"#,
            r#"{"method": "a.B/C", "times": 1, "at_least": 1}"#,
            r#"{"method": "a.B/C", "at_least": 3, "at_most": 1}"#,
            r#"{"method": "a.B/C", "times": -1}"#,
            r#"{"method": "a.B/C", "body": "x"}"#,
            r#"{"method": "a.B/C", "metadata": {"k": []}}"#,
            r#"{"method": "a.B/C", "extra": 1}"#,
        ] {
            assert_eq!(verify(bad).0, 400, "{bad}");
        }
        assert_eq!(call(&state, None, "GET", "/admin/journal/verify", "").status, 405);
    }

    #[test]
    fn query_decoding() {
        assert_eq!(percent_decode("a%2Fb%zz%4", false), "a/b%zz%4");
        assert_eq!(percent_decode("a+b%20c", true), "a b c");
        assert_eq!(percent_decode("%ff", false), "\u{fffd}");
        assert_eq!(
            parse_query("a=1&&b=x%3Dy&c&d=%7B%7D"),
            [("a", "1"), ("b", "x=y"), ("c", ""), ("d", "{}")].map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }
}
