//! The journal's routes (`/admin/journal...`): list, count, unmatched,
//! verify and reset, over this replica's journal or, with a shared
//! journal (`--shared-state` and `--journal N`), over every replica's
//! calls (`observe::shared_journal`). `scope=local` (a query parameter, or
//! `"scope": "local"` in a verification) reads this replica's own.

use super::response::{Response, JSON};
use super::routes::{not_allowed, only};
use crate::observe::journal::{self, Call, Expect, Filter, Journal, MethodMatch, Tally, Verify};
use crate::observe::shared_journal::{self, SharedCall, SharedJournal};
use crate::state::State;
use serde_json::{json, Value as Json};

/// Entries a journal listing shows when `limit` is not given.
pub const DEFAULT_PAGE: usize = 100;
/// Most entries a journal listing shows (a larger `limit` is lowered).
pub const MAX_PAGE: usize = 1000;
/// A journal listing stops adding (older) entries once their JSON passes
/// this many bytes (it shows at least one).
pub const PAGE_BYTES: usize = 4 << 20;

/// Which route of the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/admin/journal`: GET a page, DELETE every call.
    List,
    /// `/admin/journal/count`.
    Count,
    /// `/admin/journal/unmatched`.
    Unmatched,
    /// `/admin/journal/verify`.
    Verify,
}

/// Whose calls a route reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// This replica's journal.
    Local,
    /// Every replica's, when the journal is shared (else this replica's).
    All,
}

impl Scope {
    fn parse(text: &str) -> Result<Scope, String> {
        match text {
            "local" => Ok(Scope::Local),
            "all" => Ok(Scope::All),
            other => Err(format!("`scope` takes local or all, got `{other}`")),
        }
    }
}

/// Answers a journal route.
pub fn route(state: &State, method: &str, route: Route, query: &[(String, String)], body: &[u8]) -> Response {
    let Some(j) = &state.journal else {
        return Response::error(
            409,
            "the request journal is off: start the engine with `--journal N` to keep the last N calls",
        );
    };
    let mut scope = None;
    let mut rest = Vec::with_capacity(query.len());
    for (k, v) in query {
        match k.as_str() {
            "scope" => match Scope::parse(v) {
                Ok(s) => scope = Some(s),
                Err(e) => return Response::error(400, &e),
            },
            _ => rest.push((k.clone(), v.clone())),
        }
    }
    let shared = |scope: Option<Scope>| match scope.unwrap_or(Scope::All) {
        Scope::All => shared_journal::get(),
        Scope::Local => None,
    };
    match route {
        Route::List => match method {
            "GET" => list(j, shared(scope), &rest, false),
            "DELETE" => reset(j, shared(scope)),
            _ => not_allowed(&["GET", "DELETE"]),
        },
        Route::Count => only(method, &["GET"]).unwrap_or_else(|| count(j, shared(scope), &rest)),
        Route::Unmatched => only(method, &["GET"]).unwrap_or_else(|| list(j, shared(scope), &rest, true)),
        Route::Verify => only(method, &["POST"]).unwrap_or_else(|| match parse_verify(body) {
            Ok((v, in_body)) => verify(j, shared(in_body.or(scope)), &v),
            Err(e) => Response::error(400, &e),
        }),
    }
}

/// Whether a request goes to the journal's query routes, GripMock's
/// included (which the HTTP server runs a few at a time).
pub fn is_journal_query(path: &str) -> bool {
    path.starts_with("/admin/journal") || path.starts_with("/api/verify") || path.starts_with("/api/history")
}

fn parse_bool(name: &str, v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(format!("`{name}` takes true or false, got `{v}`")),
    }
}

fn parse_number(name: &str, v: &str) -> Result<u64, String> {
    v.trim().parse().map_err(|_| format!("`{name}` takes a non-negative integer, got `{v}`"))
}

/// Reads the journal filters (and, for list routes, `limit`) from query
/// parameters; unknown parameters are refused, so a typo is not a filter
/// silently ignored.
fn filter_from_query(query: &[(String, String)], with_limit: bool) -> Result<(Filter, Option<usize>), String> {
    let mut filter = Filter::default();
    let mut limit = None;
    for (k, v) in query {
        match k.as_str() {
            "method" => filter.method = Some(MethodMatch::parse(v)?),
            "status" => filter.status = Some(journal::parse_status(v)?),
            "matched" => filter.matched = Some(parse_bool(k, v)?),
            "since" => filter.since = Some(parse_number(k, v)?),
            "before" => filter.before = Some(parse_number(k, v)?),
            "metadata" => {
                let (key, value) = v
                    .split_once('=')
                    .or_else(|| v.split_once(':'))
                    .ok_or_else(|| format!("`metadata` takes key=value, got `{v}`"))?;
                filter.metadata.push((key.trim().to_ascii_lowercase(), value.trim().to_string()));
            }
            "body" => filter.body = Some(body_pattern(serde_json::from_str(v).map_err(|e| format!("`body`: {e}"))?)?),
            "session" => filter.session = Some(v.clone()),
            "rule" => filter.rule = Some(v.clone()),
            "limit" if with_limit => limit = Some(parse_number(k, v)?.min(usize::MAX as u64) as usize),
            other => {
                let known = if with_limit {
                    "method, status, matched, metadata, body, session, rule, since, before, limit"
                } else {
                    "method, status, matched, metadata, body, session, rule, since, before"
                };
                return Err(format!("unknown parameter `{other}` (known: {known})"));
            }
        }
    }
    Ok((filter, limit))
}

fn body_pattern(v: Json) -> Result<Json, String> {
    match v {
        Json::Object(_) => Ok(v),
        _ => Err("`body` must be a JSON object (fields the request must have)".into()),
    }
}

/// `GET /admin/journal` and `GET /admin/journal/unmatched`: one page, the
/// newest `limit` calls selected, oldest first.
fn list(j: &Journal, shared: Option<&SharedJournal>, query: &[(String, String)], unmatched: bool) -> Response {
    let (filter, limit) = match filter_from_query(query, true) {
        Ok(f) => f,
        Err(e) => return Response::error(400, &e),
    };
    let limit = limit.unwrap_or(DEFAULT_PAGE).min(MAX_PAGE);
    let mut page = Page::default();
    let tail = match shared {
        None => {
            let selected = j.page(&filter, unmatched, limit);
            for e in selected.entries.iter().rev() {
                if !page.add(e.seq, || e.to_json()) {
                    break;
                }
            }
            page.matched = selected.matched;
            json!({"size": j.len(), "capacity": j.capacity(), "recorded": j.recorded(), "scope": "local"})
        }
        Some(s) => {
            // The size and the last number first: calls appended during the
            // scan are above it, so `recorded` never skips one as a cursor.
            let (size, recorded) = match s.size() {
                Ok(x) => x,
                Err(e) => return Response::error(503, &e),
            };
            let before = match filter.before {
                Some(b) => Some(b.min(recorded.saturating_add(1))),
                None => Some(recorded.saturating_add(1)),
            };
            let scan = s.each(filter.since, before, |c| {
                if (unmatched && !c.unmatched()) || !filter.matches(&c) {
                    return true;
                }
                page.matched += 1;
                if page.parts.len() < limit && !page.full {
                    page.full = !page.add(c.seq, || c.view());
                }
                true
            });
            match scan {
                Ok(()) => json!({"size": size, "capacity": s.capacity(), "recorded": recorded, "scope": "all"}),
                Err(e) => return Response::error(503, &e),
            }
        }
    };
    page.body(limit, tail)
}

/// A page being made: each call's JSON written out on its own, newest
/// first, until [`PAGE_BYTES`].
#[derive(Default)]
struct Page {
    /// The calls' JSON, newest first, with their numbers.
    parts: Vec<(u64, Vec<u8>)>,
    bytes: usize,
    /// How many calls the filters select in all.
    matched: usize,
    /// No more calls fit.
    full: bool,
}

impl Page {
    /// Adds a call (older than those added) unless the page is full
    /// (it always takes one); false when it did not fit.
    fn add(&mut self, seq: u64, view: impl FnOnce() -> Json) -> bool {
        let part = serde_json::to_vec(&view()).unwrap_or_else(|_| b"null".to_vec());
        if !self.parts.is_empty() && self.bytes + part.len() > PAGE_BYTES {
            return false;
        }
        self.bytes += part.len() + 1;
        self.parts.push((seq, part));
        true
    }

    /// The body: the calls oldest first, then `tail`'s fields, the count
    /// selected and the page's cursor.
    fn body(self, limit: usize, mut tail: Json) -> Response {
        let shown = self.parts.len();
        let oldest = self.parts.last().map(|(seq, _)| *seq);
        let more = self.matched > shown;
        tail["matched"] = json!(self.matched);
        tail["page"] =
            json!({"limit": limit, "more": more, "before": if more { oldest.map(Json::from) } else { None }});
        let tail = serde_json::to_vec(&tail).unwrap_or_else(|_| b"{}".to_vec());
        let mut body = Vec::with_capacity(self.bytes + tail.len() + 16);
        body.extend_from_slice(b"{\"entries\":[");
        // Oldest first; each part is freed once copied.
        for (i, (_, part)) in self.parts.into_iter().rev().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&part);
        }
        body.extend_from_slice(b"],");
        body.extend_from_slice(&tail[1..]);
        body.push(b'\n');
        Response { status: 200, content_type: JSON, headers: Vec::new(), body }
    }
}

/// `GET /admin/journal/count`.
fn count(j: &Journal, shared: Option<&SharedJournal>, query: &[(String, String)]) -> Response {
    let filter = match filter_from_query(query, false) {
        Ok((f, _)) => f,
        Err(e) => return Response::error(400, &e),
    };
    match shared {
        None => Response::json(200, &json!({"count": j.count(&filter)})),
        Some(s) => {
            let (mut n, mut undecided) = (0u64, 0u64);
            let scan = s.settle(false).and_then(|settled| {
                s.each(filter.since, filter.before, |c| {
                    if filter.matches(&c) {
                        n += 1;
                    } else if undecidable(&filter, &c) {
                        undecided += 1;
                    }
                    true
                })
                .map(|()| settled)
            });
            match scan {
                Ok(settled) => {
                    let mut out = json!({"count": n});
                    if let Some(gap) = gap(&settled, undecided) {
                        out["complete"] = json!(false);
                        out["incomplete"] = json!(gap);
                    }
                    Response::json(200, &out)
                }
                Err(e) => Response::error(503, &e),
            }
        }
    }
}

/// Whether `filter` cannot tell if a shared call is selected: it reads a
/// part of the call the shared journal did not keep.
fn undecidable(filter: &journal::Filter, c: &SharedCall) -> bool {
    (filter.body.is_some() && c.lacks("request")) || (!filter.metadata.is_empty() && c.lacks("metadata"))
}

/// Why a count over the shared journal may be short, if it may.
fn gap(settled: &shared_journal::Settled, undecided: u64) -> Option<String> {
    let mut why: Vec<String> = settled.gap().into_iter().collect();
    if undecided > 0 {
        why.push(format!(
            "{undecided} call(s) were kept without the part the filters read (too large for the shared journal; \
             each replica's own journal, scope=local, has them whole)"
        ));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// `DELETE /admin/journal`: this replica's calls, and the shared ones.
fn reset(j: &Journal, shared: Option<&SharedJournal>) -> Response {
    // Every replica's calls recorded so far are in before the stream goes.
    let removed = shared.map(|s| s.settle(true).and_then(|_| s.reset())).transpose();
    match removed {
        Ok(removed_shared) => {
            let mut out = json!({"removed": j.reset()});
            if let Some(n) = removed_shared {
                out["removed_shared"] = json!(n);
            }
            Response::json(200, &out)
        }
        Err(e) => Response::error(503, &e),
    }
}

/// `POST /admin/journal/verify` with
/// `{"method": ..., "body": {...}, "metadata": {...}, "status": ...,
/// "matched": ..., "since": ..., "times" | "at_least" / "at_most": N,
/// "scope": "local" | "all"}`.
fn verify(j: &Journal, shared: Option<&SharedJournal>, v: &Verify) -> Response {
    let mut verdict = match shared {
        None => j.verify(v).to_json(&v.filter),
        Some(s) => {
            let mut tally: Tally<'_, SharedCall> = Tally::new(v);
            let mut undecided = 0u64;
            let scan = s.settle(false).and_then(|settled| {
                s.each(v.filter.since, v.filter.before, |c| {
                    if v.filter.matches(&c) || !undecidable(&v.filter, &c) {
                        tally.offer(&c, || SharedCall::clone(&c));
                    } else {
                        undecided += 1;
                    }
                    true
                })
                .map(|()| settled)
            });
            let settled = match scan {
                Ok(settled) => settled,
                Err(e) => return Response::error(503, &e),
            };
            let verdict = tally.verdict(SharedCall::view);
            let mut out = verdict.to_json(&v.filter);
            if let Some(gap) = gap(&settled, undecided) {
                // Calls that may be missing can only lower the count: a
                // lower bound already met still holds, nothing else does.
                let met = matches!(v.expect, journal::Expect::Between(lo, u64::MAX) if verdict.count >= lo);
                out["complete"] = json!(false);
                out["incomplete"] = json!(gap);
                if !met {
                    out["ok"] = json!(false);
                    out["message"] = json!(format!(
                        "cannot verify: {gap}; found {} matching call(s), expected {}",
                        verdict.count,
                        v.expect.text()
                    ));
                }
            }
            out
        }
    };
    verdict["scope"] = json!(if shared.is_some() { "all" } else { "local" });
    Response::json(200, &verdict)
}

fn parse_verify(body: &[u8]) -> Result<(Verify, Option<Scope>), String> {
    let value: Json = serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let Json::Object(fields) = value else { return Err("the body must be a JSON object".into()) };
    let mut filter = Filter::default();
    let mut scope = None;
    let (mut times, mut at_least, mut at_most) = (None, None, None);
    let count = |k: &str, v: &Json| v.as_u64().ok_or_else(|| format!("`{k}` takes a non-negative integer"));
    for (k, v) in &fields {
        match k.as_str() {
            "method" => {
                let text = v.as_str().ok_or("`method` takes a string")?;
                filter.method = Some(MethodMatch::parse(text)?);
            }
            "body" | "request" => filter.body = Some(body_pattern(v.clone())?),
            "metadata" => filter.metadata = metadata_pattern(v)?,
            "status" => {
                filter.status = Some(match v {
                    Json::String(s) => journal::parse_status(s)?,
                    v => journal::parse_status(&v.to_string())?,
                })
            }
            "matched" => filter.matched = Some(v.as_bool().ok_or("`matched` takes true or false")?),
            "since" => filter.since = Some(count(k, v)?),
            "times" => times = Some(count(k, v)?),
            "scope" => scope = Some(Scope::parse(v.as_str().ok_or("`scope` takes \"local\" or \"all\"")?)?),
            "at_least" => at_least = Some(count(k, v)?),
            "at_most" => at_most = Some(count(k, v)?),
            other => {
                return Err(format!(
                    "unknown field `{other}` (known: method, body, metadata, status, matched, since, times, \
                     at_least, at_most, scope)"
                ))
            }
        }
    }
    if filter.method.is_none() {
        return Err("`method` is required (`/pkg.Service/Method`, `pkg.Service/Method` or a service)".into());
    }
    let expect = match (times, at_least, at_most) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err("give either `times` or `at_least`/`at_most`, not both".into());
        }
        (Some(n), None, None) => Expect::Exactly(n),
        (None, None, None) => Expect::Between(1, u64::MAX),
        (None, lo, hi) => {
            let (lo, hi) = (lo.unwrap_or(0), hi.unwrap_or(u64::MAX));
            if lo > hi {
                return Err(format!("`at_least` ({lo}) is more than `at_most` ({hi})"));
            }
            Expect::Between(lo, hi)
        }
    };
    Ok((Verify { filter, expect }, scope))
}

fn metadata_pattern(v: &Json) -> Result<Vec<(String, String)>, String> {
    let Json::Object(map) = v else { return Err("`metadata` takes an object of key: value".into()) };
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        let value = match v {
            Json::String(s) => s.clone(),
            Json::Number(_) | Json::Bool(_) => v.to_string(),
            _ => return Err(format!("`metadata.{k}` takes a string")),
        };
        out.push((k.to_ascii_lowercase(), value));
    }
    Ok(out)
}
