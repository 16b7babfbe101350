//! The runtime API's HTTP routes on the admin listener (an
//! [`Extension`](crate::admin::Extension) of its built-in routes):
//!
//! ```text
//! Wishmock's file routes (same paths and JSON shapes), plus DELETE:
//! GET    /admin/protos                      {"files": [{"filename", "path"}]}
//! GET    /admin/proto/{name}                {"filename", "content"}
//! PUT    /admin/proto/{name}                body {"content"}
//! DELETE /admin/proto/{name}
//! POST   /admin/upload/proto                body {"filename", "content"} (also POST /upload_proto)
//! POST   /admin/upload/proto/path           body {"path", "content"}
//! GET    /admin/rules/grpc                  {"files": [{"filename", "path"}]}
//! GET    /admin/rule/grpc/{name}            {"filename", "content"}
//! PUT    /admin/rule/grpc/{name}            body {"content"}
//! DELETE /admin/rule/grpc/{name}
//! POST   /admin/upload/rule/grpc            body {"filename", "content"} (also /admin/upload/rule)
//! GET    /admin/schema/{type}               fields, oneofs and enums of a message or enum type
//! Descriptor sets (GripMock's shape):
//! POST   /api/descriptors                   body: a binary FileDescriptorSet (replaces a set
//!                                           that defined the same files)
//! GET    /api/descriptors                   the sets loaded and their services
//! DELETE /api/descriptors/{name}            one set, by the name listed
//! Sessions:
//! GET    /api/sessions                      sessions that have rules or stubs
//! DELETE /api/sessions/{id}                 removes every rule and stub of the session
//! (GripMock's stubs API is `stubs.rs`; `api.rs` serves both.)
//! ```
//!
//! `{name}` may hold `/` (percent-encoded as `%2F`) for files in
//! subdirectories; names are checked to stay inside their directory. Every
//! change answers what changed and the new plan's identity, or 400/404/422
//! with `{"error", "diagnostics": [{severity, message, file, line, column,
//! hint}]}` while the old plan keeps serving.

use super::answer::{answer, body_object, not_allowed, only};
use super::{Change, Runtime};
use crate::admin::{Request, Response};
use crate::state::State;
use serde_json::{json, Value as Json};

/// Answers the routes above, or None for a path they do not know.
pub fn handle(rt: &Runtime, state: &State, req: &Request<'_>) -> Option<Response> {
    let m = req.method;
    let r = match req.segments {
        ["admin", "protos"] => only(m, &["GET"]).unwrap_or_else(|| list_files(rt, Kind::Proto)),
        ["admin", "proto", name @ ..] if !name.is_empty() => {
            let name = name.join("/");
            match m {
                "GET" => read_file(rt, Kind::Proto, &name),
                "PUT" => put_content(rt, state, Kind::Proto, &name, req.body),
                "DELETE" => delete_file(rt, state, Kind::Proto, &name),
                _ => not_allowed(&["GET", "PUT", "DELETE"]),
            }
        }
        ["admin", "upload", "proto"] | ["upload_proto"] => {
            only(m, &["POST"]).unwrap_or_else(|| upload(rt, state, Kind::Proto, req.body, "filename"))
        }
        ["admin", "upload", "proto", "path"] => {
            only(m, &["POST"]).unwrap_or_else(|| upload(rt, state, Kind::Proto, req.body, "path"))
        }
        ["admin", "rules", "grpc"] => only(m, &["GET"]).unwrap_or_else(|| list_files(rt, Kind::Rule)),
        ["admin", "rule", "grpc", name @ ..] if !name.is_empty() => {
            let name = name.join("/");
            match m {
                "GET" => read_file(rt, Kind::Rule, &name),
                "PUT" => put_content(rt, state, Kind::Rule, &name, req.body),
                "DELETE" => delete_file(rt, state, Kind::Rule, &name),
                _ => not_allowed(&["GET", "PUT", "DELETE"]),
            }
        }
        ["admin", "upload", "rule", "grpc"] | ["admin", "upload", "rule"] => {
            only(m, &["POST"]).unwrap_or_else(|| upload(rt, state, Kind::Rule, req.body, "filename"))
        }
        ["admin", "schema", name] => only(m, &["GET"]).unwrap_or_else(|| schema(state, name)),
        ["api", "descriptors"] => match m {
            "GET" => list_descriptors(rt, state),
            "POST" => upload_descriptors(rt, state, req.body),
            _ => not_allowed(&["GET", "POST"]),
        },
        ["api", "descriptors", name @ ..] if !name.is_empty() => {
            only(m, &["DELETE"]).unwrap_or_else(|| delete_descriptors(rt, state, &name.join("/")))
        }
        ["api", "sessions"] => only(m, &["GET"]).unwrap_or_else(|| list_sessions(rt)),
        ["api", "sessions", id] => only(m, &["DELETE"]).unwrap_or_else(|| delete_session(rt, state, id)),
        _ => return None,
    };
    Some(r)
}

#[derive(Clone, Copy)]
enum Kind {
    Proto,
    Rule,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::Proto => "proto",
            Kind::Rule => "rule",
        }
    }

    fn put(self, name: String, text: String) -> Change {
        match self {
            Kind::Proto => Change::PutProto { name, text },
            Kind::Rule => Change::PutRule { name, text },
        }
    }

    fn delete(self, name: String) -> Change {
        match self {
            Kind::Proto => Change::DeleteProto { name },
            Kind::Rule => Change::DeleteRule { name },
        }
    }
}

fn shown_path(rt: &Runtime, kind: Kind, name: &str) -> String {
    let sources = rt.sources();
    let text = match kind {
        Kind::Proto => sources.protos.get(name),
        Kind::Rule => sources.rules.get(name),
    };
    text.map(|t| t.shown.clone()).unwrap_or_else(|| name.to_string())
}

fn list_files(rt: &Runtime, kind: Kind) -> Response {
    let sources = rt.sources();
    let map = match kind {
        Kind::Proto => &sources.protos,
        Kind::Rule => &sources.rules,
    };
    let files: Vec<Json> =
        map.iter().map(|(name, t)| json!({"filename": name, "path": t.shown, "size": t.text.len()})).collect();
    Response::json(200, &json!({ "files": files }))
}

fn read_file(rt: &Runtime, kind: Kind, name: &str) -> Response {
    let sources = rt.sources();
    let text = match kind {
        Kind::Proto => sources.protos.get(name),
        Kind::Rule => sources.rules.get(name),
    };
    match text {
        Some(t) => Response::json(200, &json!({"filename": name, "content": &*t.text})),
        None => Response::error(404, &format!("{} file not found: {name}", kind.word())),
    }
}

fn put_content(rt: &Runtime, state: &State, kind: Kind, name: &str, body: &[u8]) -> Response {
    let o = match body_object(body) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let Some(content) = o.get("content").and_then(Json::as_str) else {
        return Response::error(400, "content required: a JSON string");
    };
    let result = rt.apply(state, &[kind.put(name.to_string(), content.to_string())]);
    answer(result, |o| {
        o.insert("filename".into(), json!(name));
        o.insert("saved".into(), json!(shown_path(rt, kind, name)));
    })
}

fn delete_file(rt: &Runtime, state: &State, kind: Kind, name: &str) -> Response {
    let result = rt.apply(state, &[kind.delete(name.to_string())]);
    answer(result, |o| {
        o.insert("filename".into(), json!(name));
        o.insert("removed".into(), json!(true));
    })
}

fn upload(rt: &Runtime, state: &State, kind: Kind, body: &[u8], name_key: &str) -> Response {
    let o = match body_object(body) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let name = o.get(name_key).and_then(Json::as_str).unwrap_or_default();
    let content = o.get("content").and_then(Json::as_str).unwrap_or_default();
    if name.is_empty() || content.is_empty() {
        return Response::error(400, &format!("{name_key} & content required"));
    }
    let result = rt.apply(state, &[kind.put(name.to_string(), content.to_string())]);
    answer(result, |o| {
        o.insert("filename".into(), json!(name));
        o.insert("saved".into(), json!(shown_path(rt, kind, name)));
        o.insert("action".into(), json!("swapped"));
    })
}

fn list_descriptors(rt: &Runtime, state: &State) -> Response {
    let sources = rt.sources();
    let g = state.current();
    let pool = g.schema();
    let sets: Vec<Json> = sources
        .descriptor_sets
        .iter()
        .map(|(name, bytes)| {
            let files = wirestub_compiler::sources::decode_descriptor_set(bytes).unwrap_or_default();
            let services: Vec<String> =
                files.iter().flat_map(|f| f.service.iter().map(move |s| full_name(f.package(), s.name()))).collect();
            let files: Vec<&str> = files.iter().map(|f| f.name()).collect();
            json!({"name": name, "bytes": bytes.len(), "files": files, "serviceIDs": services})
        })
        .collect();
    let services: Vec<String> =
        pool.map(|p| p.services().map(|s| s.full_name().to_string()).collect()).unwrap_or_default();
    // GripMock's answer: the services added through descriptor sets.
    let mut added: Vec<String> = sets
        .iter()
        .flat_map(|s| s["serviceIDs"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    added.sort();
    added.dedup();
    Response::json(200, &json!({"serviceIDs": added, "descriptors": sets, "services": services}))
}

fn full_name(package: &str, name: &str) -> String {
    match package {
        "" => name.to_string(),
        p => format!("{p}.{name}"),
    }
}

fn upload_descriptors(rt: &Runtime, state: &State, body: &[u8]) -> Response {
    let files = match wirestub_compiler::sources::decode_descriptor_set(body) {
        Ok(f) if !f.is_empty() => f,
        Ok(_) => return Response::error(400, "invalid FileDescriptorSet: it holds no files"),
        Err(e) => return Response::error(400, &e),
    };
    let services: Vec<String> =
        files.iter().flat_map(|f| f.service.iter().map(move |s| full_name(f.package(), s.name()))).collect();
    let name = format!("descriptors/{:016x}.binpb", wirestub_plan::fnv1a(body));
    // Files the plan or the uploaded protos bring, and the built-in ones,
    // are imports here: a set may carry them (`--include_imports`), but
    // only as they are served.
    let sources = rt.sources();
    let base_files = rt.base_files();
    let elsewhere = |n: &str| {
        n.starts_with("google/protobuf/")
            || n.starts_with("google/rpc/")
            || base_files.contains(n)
            || sources.protos.contains_key(n)
    };
    if let Some(pool) = state.current().schema() {
        for f in files.iter().filter(|f| elsewhere(f.name()) && !f.name().starts_with("google/")) {
            if let Some(why) = differs(pool, f) {
                return Response::error(
                    400,
                    &format!(
                        "the set's `{}` is not the one served ({why}): a file of the plan or of the uploaded protos \
                         cannot be replaced by a descriptor set; rename it, or rebuild the plan",
                        f.name()
                    ),
                );
            }
        }
    }
    // A set that defines a file an earlier set defined replaces it (the
    // protos changed and were uploaded again).
    let defined: std::collections::HashSet<&str> = files.iter().map(|f| f.name()).filter(|n| !elsewhere(n)).collect();
    let mut changes: Vec<Change> = sources
        .descriptor_sets
        .iter()
        .filter(|(other, _)| **other != name)
        .filter(|(_, bytes)| {
            let theirs = wirestub_compiler::sources::decode_descriptor_set(bytes).unwrap_or_default();
            theirs.iter().any(|f| defined.contains(f.name()))
        })
        .map(|(other, _)| Change::DeleteDescriptors { name: other.clone() })
        .collect();
    let replaced: Vec<String> = changes.iter().map(Change::file).collect();
    changes.push(Change::PutDescriptors { name: name.clone(), bytes: body.to_vec() });
    let started = std::time::Instant::now();
    let result = rt.apply(state, &changes);
    answer(result, |o| {
        o.insert("replaced".into(), json!(replaced));
        o.insert("message".into(), json!("ok"));
        o.insert("serviceIDs".into(), json!(services));
        o.insert("name".into(), json!(name));
        o.insert("time".into(), json!(crate::observe::journal::rfc3339(std::time::SystemTime::now())));
        o.insert("compile_ms".into(), json!(started.elapsed().as_secs_f64() * 1e3));
    })
}

/// How a set's copy of a file differs from the file served (its messages'
/// fields and its services' methods), or None when it does not.
fn differs(
    pool: &prost_reflect::DescriptorPool,
    file: &prost_reflect::prost_types::FileDescriptorProto,
) -> Option<String> {
    use prost_reflect::prost_types::DescriptorProto;
    let package = file.package();
    let served = pool.get_file_by_name(file.name())?;
    fn message(pool: &prost_reflect::DescriptorPool, scope: &str, m: &DescriptorProto) -> Option<String> {
        let name = full_name(scope, m.name());
        let Some(have) = pool.get_message_by_name(&name) else {
            return Some(format!("`{name}` is not served"));
        };
        use prost_reflect::prost_types::field_descriptor_proto::{Label, Type};
        let theirs: Vec<(i32, &str, Type, Label, &str)> =
            m.field.iter().map(|f| (f.number(), f.name(), f.r#type(), f.label(), f.type_name())).collect();
        let ours: Vec<(i32, String, Type, Label, String)> = have
            .fields()
            .map(|f| {
                let p = f.field_descriptor_proto();
                (p.number(), p.name().to_string(), p.r#type(), p.label(), p.type_name().to_string())
            })
            .collect();
        let same = theirs.len() == ours.len()
            && theirs.iter().all(|t| ours.iter().any(|o| (o.0, o.1.as_str(), o.2, o.3, o.4.as_str()) == *t));
        if !same {
            return Some(format!("the fields of `{name}` differ"));
        }
        m.nested_type.iter().find_map(|n| message(pool, &name, n))
    }
    if served.package_name() != package {
        return Some(format!("its package is `{package}`, not `{}`", served.package_name()));
    }
    if let Some(why) = file.message_type.iter().find_map(|m| message(pool, package, m)) {
        return Some(why);
    }
    for s in &file.service {
        let name = full_name(package, s.name());
        let Some(have) = pool.get_service_by_name(&name) else {
            return Some(format!("service `{name}` is not served"));
        };
        let ours: Vec<(String, String, String)> = have
            .methods()
            .map(|m| (m.name().to_string(), m.input().full_name().to_string(), m.output().full_name().to_string()))
            .collect();
        let theirs: Vec<(String, String, String)> = s
            .method
            .iter()
            .map(|m| {
                let t = |n: &str| n.trim_start_matches('.').to_string();
                (m.name().to_string(), t(m.input_type()), t(m.output_type()))
            })
            .collect();
        if ours.len() != theirs.len() || !theirs.iter().all(|t| ours.contains(t)) {
            return Some(format!("the methods of `{name}` differ"));
        }
    }
    None
}

/// `DELETE /api/descriptors/{name}`: a set by its name
/// (`descriptors/HASH.binpb`, as listed) or its hash alone.
fn delete_descriptors(rt: &Runtime, state: &State, name: &str) -> Response {
    let name = match name.contains('/') || name.contains('.') {
        true => name.to_string(),
        false => format!("descriptors/{name}.binpb"),
    };
    answer(rt.apply(state, &[Change::DeleteDescriptors { name: name.clone() }]), |o| {
        o.insert("name".into(), json!(name));
        o.insert("removed".into(), json!(true));
    })
}

fn list_sessions(rt: &Runtime) -> Response {
    let scopes = rt.scopes();
    let mut sessions: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for (file, names) in &scopes.sessions {
        for s in names {
            sessions.entry(s).or_default().push(file);
        }
    }
    let list: Vec<Json> = sessions.iter().map(|(s, files)| json!({"id": s, "files": files})).collect();
    Response::json(200, &json!({ "sessions": list }))
}

/// `DELETE /api/sessions/{id}`: every file whose rules all belong to the
/// session; a file that mixes it with other sessions or with rules for
/// everyone is left for the user to edit (409).
fn delete_session(rt: &Runtime, state: &State, id: &str) -> Response {
    if !wirestub_compiler::rules::is_valid_session(id) {
        return Response::error(400, &format!("`{}` is not a session name", id.escape_debug()));
    }
    let scopes = rt.scopes();
    let mut changes = Vec::new();
    for (file, names) in &scopes.sessions {
        if !names.contains(id) {
            continue;
        }
        if names.len() > 1 || scopes.unscoped.contains(file) {
            return Response::error(
                409,
                &format!("rule file `{file}` holds rules of session `{id}` and others; edit or delete it by name"),
            );
        }
        changes.push(Change::DeleteRule { name: file.clone() });
    }
    if changes.is_empty() {
        return Response::json(200, &json!({"ok": true, "session": id, "removed": 0, "changed": []}));
    }
    let removed = changes.len();
    answer(rt.apply(state, &changes), |o| {
        o.insert("session".into(), json!(id));
        o.insert("removed".into(), json!(removed));
    })
}

/// `GET /admin/schema/{type}`: Wishmock's shape (field names in
/// lowerCamelCase as its UI expects), with each field's resolved type
/// added.
fn schema(state: &State, name: &str) -> Response {
    let g = state.current();
    let Some(pool) = g.schema() else {
        return Response::error(503, "schema unavailable: the plan's descriptors do not decode");
    };
    let name = name.trim_start_matches('.');
    if let Some(m) = pool.get_message_by_name(name) {
        let fields: Vec<Json> = m
            .fields()
            .map(|f| {
                let mut o = json!({
                    "name": f.json_name(),
                    "proto_name": f.name(),
                    "id": f.number(),
                    "type": type_name(&f.kind()),
                    "repeated": f.is_list(),
                    "optional": f.field_descriptor_proto().proto3_optional(),
                    "map": f.is_map(),
                });
                if f.is_map() {
                    if let prost_reflect::Kind::Message(entry) = f.kind() {
                        o["keyType"] = json!(type_name(&entry.map_entry_key_field().kind()));
                        o["type"] = json!(type_name(&entry.map_entry_value_field().kind()));
                    }
                }
                o
            })
            .collect();
        let mut out = json!({"kind": "message", "name": m.full_name(), "fields": fields});
        let oneofs: serde_json::Map<String, Json> = m
            .oneofs()
            .map(|o| (o.name().to_string(), json!(o.fields().map(|f| f.json_name().to_string()).collect::<Vec<_>>())))
            .collect();
        if !oneofs.is_empty() {
            out["oneofs"] = Json::Object(oneofs);
        }
        let nested_enums: Vec<String> = m.child_enums().map(|e| e.full_name().to_string()).collect();
        if !nested_enums.is_empty() {
            out["enums"] = json!(nested_enums);
        }
        return Response::json(200, &out);
    }
    if let Some(e) = pool.get_enum_by_name(name) {
        let values: serde_json::Map<String, Json> =
            e.values().map(|v| (v.name().to_string(), json!(v.number()))).collect();
        return Response::json(200, &json!({"kind": "enum", "name": e.full_name(), "values": values}));
    }
    Response::error(404, &format!("type not found: {name}"))
}

fn type_name(kind: &prost_reflect::Kind) -> String {
    use prost_reflect::Kind as K;
    match kind {
        K::Message(m) => m.full_name().to_string(),
        K::Enum(e) => e.full_name().to_string(),
        K::Double => "double".into(),
        K::Float => "float".into(),
        K::Int32 => "int32".into(),
        K::Int64 => "int64".into(),
        K::Uint32 => "uint32".into(),
        K::Uint64 => "uint64".into(),
        K::Sint32 => "sint32".into(),
        K::Sint64 => "sint64".into(),
        K::Fixed32 => "fixed32".into(),
        K::Fixed64 => "fixed64".into(),
        K::Sfixed32 => "sfixed32".into(),
        K::Sfixed64 => "sfixed64".into(),
        K::Bool => "bool".into(),
        K::String => "string".into(),
        K::Bytes => "bytes".into(),
    }
}
