//! GripMock v3's stubs API, so its SDK and testcontainers users can switch
//! by changing the address:
//!
//! ```text
//! POST   /api/stubs              one stub or an array; upsert by id; answers the ids
//! GET    /api/stubs              every stub (filters: service, method, session, q, limit, offset)
//! GET    /api/stubs/{id}         one stub (404 if none)
//! DELETE /api/stubs/{id}         204
//! DELETE /api/stubs              204; the session's stubs with a session header, else all
//! POST   /api/stubs/batchDelete  body: ["id", ...]
//! POST   /api/stubs/search       which stub answers {service, method, headers, data|input}
//! GET    /api/stubs/used         stubs that answered a call
//! GET    /api/stubs/unused       stubs that never did
//! GET    /api/history            the journal as GripMock shows it
//! POST   /api/verify             {service, method, expectedCount}
//! ```
//!
//! A stub is stored as a rule file, `stubs/ID.json`, or
//! `sessions/SESSION/stubs/ID.json` for a session's stub (the session comes
//! from the `X-Gripmock-Session` or `X-Wirestub-Session` header, or the
//! stub's own `session`), and compiled like any rule file (the compiler
//! translates GripMock stubs, `compiler/src/gripmock.rs`): a stub the rule
//! language cannot express is refused with 422 and the compiler's
//! diagnostics, never served differently.

use super::answer::{body_object, not_allowed, only, refusal};
use super::{Change, Runtime};
use crate::admin::{Request, Response};
use crate::state::State;
use serde_json::{json, Map, Value as Json};

/// A stub as stored: its rule file's name, its id and session, and its JSON.
struct Stored {
    name: String,
    shown: String,
    id: String,
    session: Option<String>,
    stub: Map<String, Json>,
    /// Where it is written, as GripMock says: `rest` (a file of its own,
    /// made by this API) or `file` (one of the stubs of a rule file the user
    /// wrote, changed through the file routes).
    source: &'static str,
    /// The lines of its file it spans, `[from, to)`: the rules compiled from
    /// it have origins there.
    lines: (u32, u32),
}

impl Stored {
    /// Whether a rule with this origin (`file:line:col`) was compiled from
    /// the stub.
    fn owns(&self, origin: &str) -> bool {
        let Some(rest) = origin.strip_prefix(&self.shown).and_then(|r| r.strip_prefix(':')) else {
            return false;
        };
        let line: u32 = rest.split(':').next().and_then(|l| l.parse().ok()).unwrap_or(0);
        (self.lines.0..self.lines.1).contains(&line)
    }
}

pub fn handle(rt: &Runtime, state: &State, req: &Request<'_>) -> Option<Response> {
    let m = req.method;
    let r = match req.segments {
        ["api", "stubs"] => match m {
            "GET" => list(rt, state, req),
            "POST" => upsert(rt, state, req),
            "DELETE" => purge(rt, state, req),
            _ => not_allowed(&["GET", "POST", "DELETE"]),
        },
        ["api", "stubs", "batchDelete"] => only(m, &["POST"]).unwrap_or_else(|| batch_delete(rt, state, req.body)),
        ["api", "stubs", "search"] => only(m, &["POST"]).unwrap_or_else(|| search(rt, state, req)),
        ["api", "stubs", "used"] => only(m, &["GET"]).unwrap_or_else(|| used(rt, state, true)),
        ["api", "stubs", "unused"] => only(m, &["GET"]).unwrap_or_else(|| used(rt, state, false)),
        ["api", "stubs", id] => match m {
            "GET" => match stored(rt).into_iter().find(|s| s.id.eq_ignore_ascii_case(id)) {
                Some(s) => Response::json(200, &output(rt, &s, state)),
                None => Response::error(404, &format!("Stub with ID '{id}' not found")),
            },
            "DELETE" => delete_ids(rt, state, &[id.to_ascii_lowercase()], 204, true),
            _ => not_allowed(&["GET", "DELETE"]),
        },
        ["api", "history"] => only(m, &["GET"]).unwrap_or_else(|| history(rt, state, req)),
        ["api", "verify"] => only(m, &["POST"]).unwrap_or_else(|| verify(state, req)),
        _ => return None,
    };
    Some(r)
}

/// The session a request names in its header, if any.
fn header_session(req: &Request<'_>) -> Option<String> {
    req.header("x-gripmock-session")
        .or_else(|| req.header(wirestub_plan::SESSION_KEY))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Whether `id` looks like a UUID (GripMock's ids are).
fn is_uuid(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The rule file name of a stub.
fn file_name(session: Option<&str>, id: &str) -> String {
    match session {
        Some(s) => format!("{}/{s}/stubs/{id}.json", wirestub_compiler::rules::SESSIONS_DIR),
        None => format!("stubs/{id}.json"),
    }
}

/// Every stub: the files this API writes (named like [`file_name`], one
/// stub each) and the GripMock stubs of other rule files.
fn stored(rt: &Runtime) -> Vec<Stored> {
    let sources = rt.sources();
    let mut out = Vec::new();
    for (name, text) in &sources.rules {
        let session = wirestub_compiler::rules::session_of(name);
        let rest = match session {
            Some(s) => name.strip_prefix(&format!("{}/{s}/", wirestub_compiler::rules::SESSIONS_DIR)),
            None => Some(name.as_str()),
        };
        let api_id = rest.and_then(|r| r.strip_prefix("stubs/")).and_then(|r| r.strip_suffix(".json"));
        if let Some(id) = api_id.filter(|id| is_uuid(id)) {
            if let Ok(Json::Object(stub)) = serde_json::from_str::<Json>(&text.text) {
                out.push(Stored {
                    name: name.clone(),
                    shown: text.shown.clone(),
                    id: id.to_ascii_lowercase(),
                    session: session.map(str::to_string),
                    stub,
                    source: "rest",
                    lines: (0, u32::MAX),
                });
                continue;
            }
        }
        out.extend(file_stubs(rt, name, &text.shown, &text.text));
    }
    // The cache holds the parse of the current files only.
    let current: std::collections::HashSet<(String, u64)> =
        sources.rules.iter().map(|(name, text)| (name.clone(), wirestub_plan::fnv1a(text.text.as_bytes()))).collect();
    rt.file_stubs.lock().unwrap_or_else(|e| e.into_inner()).retain(|key, _| current.contains(key));
    out
}

/// The GripMock stubs of a rule file the user wrote (none for a Wishmock
/// rule file), parsed once per text.
fn file_stubs(rt: &Runtime, name: &str, shown: &str, text: &str) -> Vec<Stored> {
    // Cheap refusal first: a stub has an `input`, `inputs` or `output`.
    if !(text.contains("input") || text.contains("output")) {
        return Vec::new();
    }
    let key = (name.to_string(), wirestub_plan::fnv1a(text.as_bytes()));
    if let Some(hit) = rt.file_stubs.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return hit.iter().map(|s| s.to_stored(name, shown)).collect();
    }
    let file = wirestub_compiler::diag::SourceFile::named(shown, text.to_string());
    let docs = wirestub_compiler::yaml::parse(&file).unwrap_or_default();
    let mut nodes: Vec<&wirestub_compiler::yaml::Node> = Vec::new();
    for doc in &docs {
        match &doc.kind {
            wirestub_compiler::yaml::NodeKind::Seq(items) => nodes.extend(items.iter()),
            _ => nodes.push(doc),
        }
    }
    let mut found = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        if !wirestub_compiler::gripmock::is_stub(node) {
            continue;
        }
        let Json::Object(stub) = node.to_json() else { continue };
        let id = match stub.get("id").and_then(Json::as_str) {
            Some(id) if is_uuid(id) => id.to_ascii_lowercase(),
            _ => derived_id(name, i),
        };
        let from = node.span.line;
        let to = nodes.get(i + 1).map(|n| n.span.line).filter(|&l| l > from).unwrap_or(u32::MAX);
        let session = stub.get("session").and_then(Json::as_str).map(str::to_string);
        found.push(FileStub { id, session, stub, lines: (from, to) });
    }
    let out = found.iter().map(|s| s.to_stored(name, shown)).collect();
    rt.file_stubs.lock().unwrap_or_else(|e| e.into_inner()).insert(key, found);
    out
}

/// A stub of a rule file, as cached.
pub struct FileStub {
    id: String,
    session: Option<String>,
    stub: Map<String, Json>,
    lines: (u32, u32),
}

impl FileStub {
    fn to_stored(&self, name: &str, shown: &str) -> Stored {
        Stored {
            name: name.to_string(),
            shown: shown.to_string(),
            id: self.id.clone(),
            session: self.session.clone(),
            stub: self.stub.clone(),
            source: "file",
            lines: self.lines,
        }
    }
}

/// A stable id in UUID form for the `index`th stub of file `name` that has
/// none of its own.
fn derived_id(name: &str, index: usize) -> String {
    let a = wirestub_plan::fnv1a(format!("{name}#{index}").as_bytes());
    let b = wirestub_plan::fnv1a(format!("{index}#{name}").as_bytes());
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

/// Calls each stub answered since it was last written, by id, and whether
/// a search matched it.
fn hits(rt: &Runtime, stubs: &[Stored], state: &State) -> std::collections::HashMap<String, u64> {
    // Calls by file, then line: one pass over the counters, one lookup per
    // stub.
    let by_origin = state.metrics.rule_hits();
    let mut by_file: std::collections::HashMap<&str, Vec<(u32, u64)>> = std::collections::HashMap::new();
    for (origin, n) in &by_origin {
        let mut parts = origin.rsplitn(3, ':');
        let (_col, line, file) = (parts.next(), parts.next(), parts.next());
        if let (Some(line), Some(file)) = (line.and_then(|l| l.parse().ok()), file) {
            by_file.entry(file).or_default().push((line, *n));
        }
    }
    let counted: Vec<(String, u64)> = stubs
        .iter()
        .map(|s| {
            let n = by_file
                .get(s.shown.as_str())
                .map(|lines| lines.iter().filter(|(l, _)| (s.lines.0..s.lines.1).contains(l)).map(|(_, n)| n).sum())
                .unwrap_or(0);
            (s.id.clone(), n)
        })
        .collect();
    let book = rt.stub_use.lock().unwrap_or_else(|e| e.into_inner());
    counted
        .into_iter()
        .map(|(id, n)| {
            let since = n.saturating_sub(book.baseline.get(&id).copied().unwrap_or(0));
            let searched = u64::from(book.searched.contains(&id));
            (id, since + searched)
        })
        .collect()
}

/// Call counts at the time each stub was last written (the counters are
/// by rule origin and outlive the stub), and the stubs a search matched.
#[derive(Default)]
pub struct StubUse {
    baseline: std::collections::HashMap<String, u64>,
    searched: std::collections::HashSet<String>,
}

/// Starts counting the stubs `ids` afresh (they were just written or
/// deleted).
fn reset_use(rt: &Runtime, state: &State, ids: &[String], shown: impl Fn(&str) -> Option<String>) {
    let by_origin = state.metrics.rule_hits();
    let mut book = rt.stub_use.lock().unwrap_or_else(|e| e.into_inner());
    for id in ids {
        book.searched.remove(id);
        let n = match shown(id) {
            Some(prefix) => by_origin.iter().filter(|(o, _)| o.starts_with(&prefix)).map(|(_, n)| n).sum(),
            None => 0,
        };
        book.baseline.insert(id.clone(), n);
    }
    // Forget stubs that are gone.
    let live: std::collections::HashSet<String> = stored(rt).into_iter().map(|s| s.id).collect();
    book.baseline.retain(|id, _| live.contains(id) || ids.contains(id));
    book.searched.retain(|id| live.contains(id));
}

fn output(rt: &Runtime, s: &Stored, state: &State) -> Json {
    let mut o = s.stub.clone();
    o.insert("id".into(), json!(s.id));
    o.insert("source".into(), json!(s.source));
    if let Some(session) = &s.session {
        o.insert("session".into(), json!(session));
    }
    let n = hits(rt, std::slice::from_ref(s), state).get(&s.id).copied().unwrap_or(0);
    if n > 0 {
        o.insert("used".into(), json!(true));
    }
    Json::Object(o)
}

fn list(rt: &Runtime, state: &State, req: &Request<'_>) -> Response {
    let stubs = stored(rt);
    let hits = hits(rt, &stubs, state);
    let text = |s: &Stored, k: &str| s.stub.get(k).and_then(Json::as_str).unwrap_or_default().to_string();
    let mut selected: Vec<&Stored> = stubs
        .iter()
        .filter(|s| req.param("service").is_none_or(|v| text(s, "service") == v))
        .filter(|s| req.param("method").is_none_or(|v| text(s, "method") == v))
        .filter(|s| req.param("session").is_none_or(|v| s.session.as_deref().unwrap_or_default() == v))
        .filter(|s| {
            req.param("q").is_none_or(|q| {
                let q = q.to_ascii_lowercase();
                [text(s, "service"), text(s, "method"), s.id.clone()]
                    .iter()
                    .any(|t| t.to_ascii_lowercase().contains(&q))
            })
        })
        .collect();
    let priority = |s: &Stored| s.stub.get("priority").and_then(Json::as_i64).unwrap_or(0);
    match req.param("sort") {
        Some("priority_desc") => selected.sort_by_key(|s| std::cmp::Reverse(priority(s))),
        Some("priority_asc") => selected.sort_by_key(|s| priority(s)),
        Some("service_asc") => selected.sort_by_key(|s| text(s, "service")),
        Some("method_asc") => selected.sort_by_key(|s| text(s, "method")),
        _ => {}
    }
    let total = selected.len();
    let offset = req.param("offset").and_then(|v| v.parse().ok()).unwrap_or(0usize);
    let limit = req.param("limit").and_then(|v| v.parse().ok()).unwrap_or(usize::MAX);
    let page: Vec<Json> = selected
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|s| {
            let mut o = s.stub.clone();
            o.insert("id".into(), json!(s.id));
            o.insert("source".into(), json!(s.source));
            if let Some(session) = &s.session {
                o.insert("session".into(), json!(session));
            }
            if hits.get(&s.id).copied().unwrap_or(0) > 0 {
                o.insert("used".into(), json!(true));
            }
            Json::Object(o)
        })
        .collect();
    let mut r = Response::json(200, &Json::Array(page));
    r.headers.push(("X-Total-Count", total.to_string()));
    r
}

fn used(rt: &Runtime, state: &State, wanted: bool) -> Response {
    let stubs = stored(rt);
    let hits = hits(rt, &stubs, state);
    let list: Vec<Json> = stubs
        .iter()
        .filter(|s| (hits.get(&s.id).copied().unwrap_or(0) > 0) == wanted)
        .map(|s| {
            let mut o = s.stub.clone();
            o.insert("id".into(), json!(s.id));
            Json::Object(o)
        })
        .collect();
    Response::json(200, &Json::Array(list))
}

fn upsert(rt: &Runtime, state: &State, req: &Request<'_>) -> Response {
    let body: Json = match serde_json::from_slice(req.body) {
        Ok(v) => v,
        Err(e) => return Response::error(400, &format!("the body is not JSON: {e}")),
    };
    let items = match body {
        Json::Array(items) => items,
        one @ Json::Object(_) => vec![one],
        _ => return Response::error(400, "the body must be a stub (a JSON object) or an array of stubs"),
    };
    if items.is_empty() {
        return Response::json(200, &json!([]));
    }
    let header = header_session(req);
    let existing = stored(rt);
    let mut changes = Vec::new();
    let mut ids = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let Json::Object(mut stub) = item else {
            return Response::error(400, &format!("stub {i} is not a JSON object"));
        };
        for key in ["service", "method"] {
            if stub.get(key).and_then(Json::as_str).is_none_or(str::is_empty) {
                return Response::error(400, &format!("stub {i}: {key} name is missing"));
            }
        }
        let id = match stub.get("id") {
            None | Some(Json::Null) => crate::rng::uuid(),
            Some(Json::String(s)) if s.is_empty() || s == "00000000-0000-0000-0000-000000000000" => crate::rng::uuid(),
            Some(Json::String(s)) if is_uuid(s) => s.to_ascii_lowercase(),
            Some(other) => return Response::error(400, &format!("stub {i}: `id` must be a UUID, found {other}")),
        };
        let session = match header.clone() {
            Some(s) => Some(s),
            None => match stub.get("session") {
                None | Some(Json::Null) => None,
                Some(Json::String(s)) if s.is_empty() => None,
                Some(Json::String(s)) => Some(s.clone()),
                Some(other) => {
                    return Response::error(400, &format!("stub {i}: `session` must be a string, found {other}"))
                }
            },
        };
        if let Some(s) = &session {
            if !wirestub_compiler::rules::is_valid_session(s) {
                return Response::error(
                    400,
                    &format!(
                        "`{}` is not a session name (1 to 128 letters, digits, `-`, `_` or `.`)",
                        s.escape_debug()
                    ),
                );
            }
            stub.insert("session".into(), json!(s));
        } else {
            stub.remove("session");
        }
        stub.insert("id".into(), json!(id));
        stub.remove("used");
        stub.remove("source");
        if let Some(f) = existing.iter().find(|s| s.id == id && s.source == "file") {
            return Response::error(
                409,
                &format!("stub {id} comes from rule file `{}`; change it through /admin/rule/grpc/{}", f.name, f.name),
            );
        }
        let name = file_name(session.as_deref(), &id);
        for old in existing.iter().filter(|s| s.id == id && s.name != name) {
            changes.push(Change::ForgetRule { name: old.name.clone() });
        }
        // The same id twice in one batch: the last one is the stub.
        if let Some(at) = ids.iter().position(|known| *known == id) {
            ids.remove(at);
            changes.retain(|c| !matches!(c, Change::PutRule { name, .. } if name.ends_with(&format!("/{id}.json"))));
        }
        let text = serde_json::to_string_pretty(&Json::Object(stub)).unwrap_or_default() + "\n";
        changes.push(Change::PutRule { name, text });
        ids.push(id);
    }
    // A stub posted again starts its `times` again, as in GripMock.
    let written: Vec<String> = changes
        .iter()
        .filter_map(|c| match c {
            Change::PutRule { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect();
    match rt.apply_resetting(state, &changes, &written) {
        Ok(applied) => {
            let names: Vec<(String, String)> = stored(rt).into_iter().map(|s| (s.id, s.shown)).collect();
            let shown = |id: &str| names.iter().find(|(i, _)| i == id).map(|(_, s)| format!("{s}:"));
            reset_use(rt, state, &ids, shown);
            with_plan(Response::json(200, &json!(ids)), &applied)
        }
        Err(refused) => refusal(refused),
    }
}

/// Deletes the stubs `ids` made by this API; a stub of a user's rule file
/// is refused (409) when `strict`, else left alone.
fn delete_ids(rt: &Runtime, state: &State, ids: &[String], status: u16, strict: bool) -> Response {
    let selected: Vec<Stored> = stored(rt).into_iter().filter(|s| ids.contains(&s.id)).collect();
    if let Some(f) = selected.iter().find(|s| s.source == "file").filter(|_| strict) {
        return Response::error(
            409,
            &format!("stub {} comes from rule file `{}`; delete it through /admin/rule/grpc/{}", f.id, f.name, f.name),
        );
    }
    let changes: Vec<Change> =
        selected.into_iter().filter(|s| s.source == "rest").map(|s| Change::ForgetRule { name: s.name }).collect();
    if changes.is_empty() {
        return empty(status);
    }
    match rt.apply(state, &changes) {
        Ok(applied) => {
            reset_use(rt, state, &[], |_| None);
            with_plan(empty(status), &applied)
        }
        Err(refused) => refusal(refused),
    }
}

/// GripMock's answers have no room for the new plan: it goes in headers.
fn with_plan(mut r: Response, applied: &super::Applied) -> Response {
    r.headers.push(("X-Wirestub-Plan-Identity", applied.reloaded.identity.clone()));
    r.headers.push(("X-Wirestub-Plan-Generation", applied.reloaded.number.to_string()));
    r
}

fn empty(status: u16) -> Response {
    Response { status, content_type: "application/json", headers: Vec::new(), body: Vec::new() }
}

fn purge(rt: &Runtime, state: &State, req: &Request<'_>) -> Response {
    let session = header_session(req);
    let ids: Vec<String> =
        stored(rt).into_iter().filter(|s| session.is_none() || s.session == session).map(|s| s.id).collect();
    delete_ids(rt, state, &ids, 204, false)
}

fn batch_delete(rt: &Runtime, state: &State, body: &[u8]) -> Response {
    let ids: Vec<String> = match serde_json::from_slice::<Json>(body) {
        Ok(Json::Array(items)) => {
            let mut ids = Vec::new();
            for item in items {
                match item.as_str() {
                    Some(s) if is_uuid(s) => ids.push(s.to_ascii_lowercase()),
                    _ => return Response::error(400, &format!("`{item}` is not a stub id (a UUID)")),
                }
            }
            ids
        }
        Ok(Json::String(s)) if is_uuid(&s) => vec![s.to_ascii_lowercase()],
        Ok(_) => return Response::error(400, "the body must be an array of stub ids"),
        Err(e) => return Response::error(400, &format!("the body is not JSON: {e}")),
    };
    delete_ids(rt, state, &ids, 200, true)
}

/// `POST /api/stubs/search`: the output of the stub that answers the
/// request described, through the engine's own matcher on the current
/// plan. As in GripMock, a stub limited by `times` counts the search.
fn search(rt: &Runtime, state: &State, req: &Request<'_>) -> Response {
    let o = match body_object(req.body) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let text = |k: &str| o.get(k).and_then(Json::as_str).unwrap_or_default();
    let (service, method) = (text("service"), text("method"));
    if service.is_empty() || method.is_empty() {
        return Response::error(400, "`service` and `method` are required");
    }
    let g = state.current();
    let Some(pool) = g.schema() else {
        return Response::error(503, "the plan's descriptors do not decode");
    };
    // A bare service name is looked up among the plan's services.
    let full = pool
        .get_service_by_name(service)
        .or_else(|| pool.services().find(|s| s.name() == service && s.methods().any(|m| m.name() == method)));
    let Some(desc) = full.and_then(|s| s.methods().find(|m| m.name() == method)) else {
        return Response::error(404, &format!("unknown method {service}/{method}"));
    };
    let path = format!("/{}/{}", desc.parent_service().full_name(), desc.name());
    let Some(served) = g.served.method(&path) else {
        return Response::error(404, &format!("the plan does not serve {path}"));
    };
    let inputs: Vec<Json> = match (o.get("input"), o.get("data")) {
        (Some(Json::Array(list)), _) => list.clone(),
        (_, Some(data)) => vec![data.clone()],
        _ => vec![json!({})],
    };
    let mut messages = Vec::new();
    for input in &inputs {
        let msg = match prost_reflect::DynamicMessage::deserialize(desc.input(), input) {
            Ok(m) => m,
            Err(e) => {
                return Response::error(400, &format!("the request does not fit {}: {e}", desc.input().full_name()))
            }
        };
        messages.push(prost::Message::encode_to_vec(&msg));
    }
    let mut headers = http::HeaderMap::new();
    if let Some(Json::Object(h)) = o.get("headers") {
        for (k, v) in h {
            let value = match v {
                Json::String(s) => s.clone(),
                other => other.to_string(),
            };
            if let (Ok(k), Ok(v)) =
                (http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()), http::HeaderValue::from_str(&value))
            {
                headers.append(k, v);
            }
        }
    }
    if let Some(s) = header_session(req) {
        if let Ok(v) = http::HeaderValue::from_str(&s) {
            headers.insert(wirestub_plan::SESSION_KEY, v);
        }
    }
    let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
    let folds: Vec<_> = served
        .each
        .iter()
        .map(|&i| {
            let mut fold = crate::call::picks::Fold::default();
            refs.iter().try_for_each(|m| fold.add_message(&served.plan.fields[i as usize], m)).map(|_| fold)
        })
        .collect();
    let view = crate::call::matcher::Messages {
        head: &refs,
        last: refs.last().copied(),
        count: refs.len(),
        folds: &folds,
        violations: &[],
    };
    let chosen = crate::call::matcher::Request::read(served, &view, &headers).and_then(|r| r.select_rule());
    let rule = match chosen {
        Ok(Some(r)) => r,
        Ok(None) => return Response::error(404, &format!("no stub or rule answers this request to {path}")),
        Err(e) => return Response::error(400, &format!("the request cannot be read: {e:?}")),
    };
    let origin = served.plan.rules.get(rule as usize).map(|r| r.origin.clone()).unwrap_or_default();
    let stub = stored(rt).into_iter().find(|s| s.owns(&origin));
    match stub {
        Some(s) => {
            rt.stub_use.lock().unwrap_or_else(|e| e.into_inner()).searched.insert(s.id.clone());
            let mut out = s.stub.get("output").cloned().unwrap_or_else(|| json!({}));
            if let Json::Object(o) = &mut out {
                o.insert("id".into(), json!(s.id));
            }
            Response::json(200, &out)
        }
        None => Response::json(200, &json!({"rule": {"index": rule, "origin": origin}})),
    }
}

/// The calls a GripMock history or verify sees: with a session header, the
/// session's calls and those without a session; else every call.
fn in_scope<C: crate::observe::journal::Call + ?Sized>(entry: &C, session: &Option<String>) -> bool {
    match session {
        None => true,
        Some(s) => entry.session().is_none_or(|e| e == *s),
    }
}

fn split(path: &str) -> (&str, &str) {
    path.strip_prefix('/').and_then(|p| p.split_once('/')).unwrap_or(("", path))
}

fn history(rt: &Runtime, state: &State, req: &Request<'_>) -> Response {
    let Some(journal) = &state.journal else {
        return Response::json(200, &json!([]));
    };
    let stubs = stored(rt);
    let session = header_session(req);
    let errors_only = req.param("error") == Some("true");
    let entries: Vec<_> = journal
        .snapshot()
        .into_iter()
        .filter(|e| in_scope(&**e, &session))
        // Health and reflection calls are the engine's own, not history.
        .filter(|e| e.served().is_some_and(|m| m.builtin.is_none()))
        .filter(|e| {
            let (s, m) = split(e.path());
            req.param("service").is_none_or(|v| v == s) && req.param("method").is_none_or(|v| v == m)
        })
        .filter(|e| !errors_only || e.status != 0)
        .collect();
    let total = entries.len();
    let offset = req.param("offset").and_then(|v| v.parse().ok()).unwrap_or(0usize);
    let limit = req.param("limit").and_then(|v| v.parse().ok()).unwrap_or(usize::MAX);
    let end = total.saturating_sub(offset);
    let start = end.saturating_sub(limit);
    let list: Vec<Json> = entries[start..end]
        .iter()
        .map(|e| {
            let (s, m) = split(e.path());
            let mut o = json!({
                "service": s,
                "method": m,
                "timestamp": crate::observe::journal::rfc3339(e.time),
                "elapsedMs": e.latency.as_millis() as u64,
            });
            let requests: Vec<Json> = e.message_views().into_iter().map(|v| v.json).collect();
            if !requests.is_empty() {
                o["requests"] = json!(requests);
            }
            if let Some(s) = e.session() {
                o["session"] = json!(s);
            }
            if e.status != 0 {
                o["code"] = json!(e.status);
                o["error"] = json!(e.message);
            }
            if let (Some(r), Some(m)) = (e.rule, e.served()) {
                if let Some((responses, headers)) = answered(e, m, r) {
                    if !responses.is_empty() {
                        o["responses"] = json!(responses);
                    }
                    if !headers.is_empty() {
                        o["responseHeaders"] = Json::Object(headers);
                    }
                }
                let origin = m.plan.rules.get(r as usize).map(|r| r.origin.as_str()).unwrap_or("");
                o["rule"] = json!(origin);
                if let Some(s) = stubs.iter().find(|s| s.owns(origin)) {
                    o["stubId"] = json!(s.id);
                }
            }
            o
        })
        .collect();
    let mut r = Response::json(200, &Json::Array(list));
    r.headers.push(("X-Total-Count", total.to_string()));
    r
}

/// What rule `rule` answers, as GripMock's history shows it: the response
/// messages as JSON (None for an answer rendered from a template, which
/// the journal does not keep) and the metadata sent.
fn answered(
    e: &crate::observe::journal::Entry,
    m: &crate::served::ServedMethod,
    rule: u32,
) -> Option<(Vec<Json>, Map<String, Json>)> {
    let response = m.plan.responses.get(m.plan.rules.get(rule as usize)?.response as usize)?;
    if !response.templates.is_empty() {
        return None;
    }
    let desc = e.generation.schema()?.get_message_by_name(&m.plan.output_type)?;
    let decode = |framed: &[u8]| -> Option<Json> {
        let body = framed.get(5..).filter(|_| framed.first() == Some(&0)).unwrap_or(framed);
        let msg = prost_reflect::DynamicMessage::decode(desc.clone(), body).ok()?;
        let options = prost_reflect::SerializeOptions::new().use_proto_field_name(true);
        msg.serialize_with_options(serde_json::value::Serializer, &options).ok()
    };
    let mut messages = Vec::new();
    if !response.body.is_empty() && response.status == 0 {
        messages.extend(decode(&response.body));
    }
    let sent = match response.error_after {
        0 => response.stream.len(),
        n => (n as usize).min(response.stream.len()),
    };
    messages.extend(response.stream.iter().take(sent).filter_map(|item| decode(item)));
    let mut headers = Map::new();
    for (k, v) in response.headers.iter().chain(response.trailers.iter()) {
        if !matches!(k.as_str(), "grpc-status" | "grpc-message" | "grpc-status-details-bin") {
            headers.insert(k.clone(), json!(String::from_utf8_lossy(v)));
        }
    }
    Some((messages, headers))
}

fn verify(state: &State, req: &Request<'_>) -> Response {
    let o = match body_object(req.body) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let service = o.get("service").and_then(Json::as_str).unwrap_or_default();
    let method = o.get("method").and_then(Json::as_str).unwrap_or_default();
    let Some(expected) = o.get("expectedCount").and_then(Json::as_u64) else {
        return Response::error(400, "invalid verify request: `expectedCount` must be a number of at least 0");
    };
    if service.is_empty() || method.is_empty() {
        return Response::error(400, "invalid verify request: `service` and `method` are required");
    }
    let Some(journal) = &state.journal else {
        return Response::json(400, &json!({"message": "history is disabled: start the engine with --journal N"}));
    };
    let session = header_session(req);
    // The service as recorded (`package.Service`), or bare, as a stub may
    // name it.
    let wanted = |path: &str| {
        let (s, m) = split(path);
        (s == service || s.rsplit_once('.').is_some_and(|(_, bare)| bare == service)) && m == method
    };
    // With a shared journal, every replica's calls.
    let actual = match crate::observe::shared_journal::get() {
        Some(shared) => {
            let mut n = 0u64;
            let scan = shared.settle(false).and_then(|settled| {
                shared
                    .each(None, None, |c| {
                        n += (in_scope(&c, &session) && wanted(crate::observe::journal::Call::path(&c))) as u64;
                        true
                    })
                    .map(|()| settled)
            });
            match scan {
                Ok(settled) => {
                    if let Some(gap) = settled.gap() {
                        return Response::json(503, &json!({"message": format!("cannot verify: {gap}"), "actual": n}));
                    }
                }
                Err(e) => {
                    let e = e.split(". `scope=local`").next().unwrap_or_default().to_string();
                    return Response::json(503, &json!({"message": e}));
                }
            }
            n
        }
        None => journal.snapshot().iter().filter(|e| in_scope(&***e, &session) && wanted(e.path())).count() as u64,
    };
    if actual == expected {
        Response::json(
            200,
            &json!({"message": "ok", "time": crate::observe::journal::rfc3339(std::time::SystemTime::now())}),
        )
    } else {
        Response::json(
            400,
            &json!({
                "message": format!("expected {service}/{method} to be called {expected} times, got {actual}"),
                "expected": expected,
                "actual": actual,
            }),
        )
    }
}
