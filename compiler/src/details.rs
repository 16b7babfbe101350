//! Rich errors: the `details` of a response entry. Each detail is a message
//! written in the protobuf JSON form of `Any` (`@type`, then the message's
//! fields); the compiler builds the `google.rpc.Status` of the response (its
//! code, its unencoded `grpc-message` and the details), serializes it and
//! adds it base64-encoded (standard alphabet, no padding) as the
//! `grpc-status-details-bin` trailer, as gRPC servers send the rich error
//! model. The engine sends it like any other trailer.
//!
//! ```yaml
//! - trailers: { grpc-status: INVALID_ARGUMENT, grpc-message: "name is required" }
//!   details:
//!     - "@type": type.googleapis.com/google.rpc.BadRequest
//!       field_violations: [{ field: name, description: "must not be empty" }]
//! ```
//!
//! A detail may be any message of the schema: the google.rpc error details
//! are always there (built in, see `protos.rs`), and so are the user's own.
//! Details only go with an error status.

use crate::diag::{near_miss, Diagnostic, Diagnostics};
use crate::values;
use crate::yaml::{Node, NodeKind};
use base64::Engine as _;
use prost::Message as _;
use prost_reflect::{DescriptorPool, MessageDescriptor};
use wirestub_plan as plan;

/// The trailer that carries the encoded `google.rpc.Status`.
pub const TRAILER: &str = "grpc-status-details-bin";

/// The type URL prefix of the google.rpc types, and the one suggested.
const PREFIX: &str = "type.googleapis.com/";

/// Reads `details` (`key: list`) of the response entry `entry`, whose other
/// keys are already read into `response`, and adds the trailer to it. Every
/// problem is reported; the trailer is added only if there is none.
pub(crate) fn attach(
    entry: &Node,
    key: &Node,
    list: &Node,
    response: &mut plan::Response,
    pool: &DescriptorPool,
    diags: &mut Diagnostics,
) {
    let before = diags.error_count();
    let details = read_list(list, pool, diags);
    if response.status == 0 {
        // A `grpc-status` that did not read is reported already; the entry
        // then only looks OK.
        if status_reads_ok(entry) {
            diags.push(
                Diagnostic::error(
                    Some(key.span.clone()),
                    "`details` go only with an error status, and this response is OK",
                )
                .with_help("set an error code in `trailers`, e.g. `grpc-status: INVALID_ARGUMENT`"),
            );
        }
        return;
    }
    if diags.error_count() != before || details.is_empty() {
        return;
    }
    let message = trailer(entry, "grpc-message").and_then(|m| values::read_string(m).ok()).unwrap_or_default();
    let status = encode_status(response.status, &message, &details);
    let value = base64::engine::general_purpose::STANDARD_NO_PAD.encode(status);
    response.trailers.push((TRAILER.to_string(), value.into_bytes()));
}

/// The error for `grpc-status-details-bin` written by hand in `trailers`.
pub(crate) fn hand_written(key: &Node) -> Diagnostic {
    Diagnostic::error(Some(key.span.clone()), format!("`{TRAILER}` is written by the compiler from `details`"))
        .with_help(format!(
            "list the details under `details:` in the response entry, e.g. `- \"@type\": {PREFIX}google.rpc.ErrorInfo`"
        ))
}

/// Reads the list: each detail as its type URL and encoded message.
fn read_list(list: &Node, pool: &DescriptorPool, diags: &mut Diagnostics) -> Vec<(String, Vec<u8>)> {
    match &list.kind {
        NodeKind::Seq(items) => items.iter().filter_map(|item| read_detail(item, pool, diags)).collect(),
        NodeKind::Null => Vec::new(),
        _ => {
            diags.push(
                Diagnostic::error(
                    Some(list.span.clone()),
                    format!("`details` must be a list of messages, found {}", list.describe()),
                )
                .with_help(format!("e.g. `details: [{{ \"@type\": {PREFIX}google.rpc.ErrorInfo, reason: ... }}]`")),
            );
            Vec::new()
        }
    }
}

fn read_detail(node: &Node, pool: &DescriptorPool, diags: &mut Diagnostics) -> Option<(String, Vec<u8>)> {
    let Some(entries) = node.map() else {
        diags.push(Diagnostic::error(
            Some(node.span.clone()),
            format!("a detail must be a mapping with `@type` and the message's fields, found {}", node.describe()),
        ));
        return None;
    };
    let Some((_, url_node)) = entries.iter().find(|(k, _)| k.scalar() == Some("@type")) else {
        // Point at its first key: a block mapping's own position is vague.
        let span = entries.first().map_or(&node.span, |(k, _)| &k.span);
        diags.push(
            Diagnostic::error(Some(span.clone()), "this detail has no `@type`")
                .with_help(format!("name its message type, e.g. `\"@type\": {PREFIX}google.rpc.ErrorInfo`")),
        );
        return None;
    };
    let url = match &url_node.kind {
        NodeKind::Scalar { text, .. } => text.trim().to_string(),
        _ => {
            diags.error(
                Some(url_node.span.clone()),
                format!("`@type` must be a type URL, found {}", url_node.describe()),
            );
            return None;
        }
    };
    let desc = resolve(&url, url_node, pool, diags)?;
    let fields: Vec<(Node, Node)> = entries.iter().filter(|(k, _)| k.scalar() != Some("@type")).cloned().collect();
    // Well-known types with a JSON form of their own carry it in `value`,
    // as the JSON mapping of `Any` says.
    let value = match fields.iter().find(|(k, _)| k.scalar() == Some("value")) {
        Some((_, v)) if values::SPECIAL_WKT.contains(&desc.full_name()) => v.clone(),
        _ => Node { kind: NodeKind::Map(fields), span: node.span.clone() },
    };
    let msg = values::read_message(&value, &desc, diags)?;
    Some((url, crate::canonical::canonicalize(&msg.encode_to_vec(), &desc)))
}

/// Finds the message a type URL names, or reports why not.
fn resolve(url: &str, node: &Node, pool: &DescriptorPool, diags: &mut Diagnostics) -> Option<MessageDescriptor> {
    let found = |name: &str| pool.get_message_by_name(name).filter(|m| !m.is_map_entry());
    let Some((prefix, name)) = url.rsplit_once('/') else {
        let d = Diagnostic::error(Some(node.span.clone()), format!("`@type` must be a type URL, found `{url}`"));
        let help = match found(url) {
            Some(m) => format!("write `{PREFIX}{}`", m.full_name()),
            None => suggest_type(url, PREFIX, pool),
        };
        diags.push(d.with_help(help));
        return None;
    };
    if let Some(m) = found(name) {
        return Some(m);
    }
    let d = Diagnostic::error(Some(node.span.clone()), format!("unknown message type `{name}` in `@type`"));
    diags.push(d.with_help(suggest_type(name, &format!("{prefix}/"), pool)));
    None
}

/// "did you mean" over the pool's message names: close to the full name, or
/// the same short name in some package.
fn suggest_type(name: &str, prefix: &str, pool: &DescriptorPool) -> String {
    let messages: Vec<MessageDescriptor> = pool.all_messages().filter(|m| !m.is_map_entry()).collect();
    let full = near_miss(name, messages.iter().map(|m| m.full_name())).map(str::to_string);
    let short = name.rsplit('.').next().unwrap_or(name);
    let by_short = || {
        near_miss(short, messages.iter().map(|m| m.name()))
            .and_then(|s| messages.iter().find(|m| m.name() == s))
            .map(|m| m.full_name().to_string())
    };
    match full.or_else(by_short) {
        Some(n) => format!("did you mean `{prefix}{n}`?"),
        None => format!(
            "`@type` is `{PREFIX}` and the full name of a message of the protos or of google.rpc, e.g. `{PREFIX}google.rpc.ErrorInfo`"
        ),
    }
}

/// Whether the entry's `grpc-status`, if any, is a correct way to write OK.
fn status_reads_ok(entry: &Node) -> bool {
    match trailer(entry, "grpc-status") {
        None => true,
        Some(s) => s.scalar().is_some_and(|t| t.trim().parse::<u8>() == Ok(0) || t.trim().eq_ignore_ascii_case("OK")),
    }
}

/// The value of `trailers.<name>` in a response entry.
fn trailer<'a>(entry: &'a Node, name: &str) -> Option<&'a Node> {
    let trailers = entry.map()?.iter().find(|(k, _)| k.scalar() == Some("trailers"))?;
    trailers.1.map()?.iter().find(|(k, _)| k.scalar() == Some(name)).map(|(_, v)| v)
}

/// `google.rpc.Status { int32 code = 1; string message = 2; repeated
/// google.protobuf.Any details = 3; }` with `Any { string type_url = 1;
/// bytes value = 2; }`, encoded by hand so the bytes do not depend on a
/// user's copy of these types.
fn encode_status(code: u8, message: &str, details: &[(String, Vec<u8>)]) -> Vec<u8> {
    use prost::encoding::{encode_key, encode_varint, WireType};
    fn field(tag: u32, bytes: &[u8], out: &mut Vec<u8>) {
        if !bytes.is_empty() {
            encode_key(tag, WireType::LengthDelimited, out);
            encode_varint(bytes.len() as u64, out);
            out.extend_from_slice(bytes);
        }
    }
    let mut out = Vec::new();
    encode_key(1, WireType::Varint, &mut out);
    encode_varint(code as u64, &mut out);
    field(2, message.as_bytes(), &mut out);
    for (url, value) in details {
        let mut any = Vec::new();
        field(1, url.as_bytes(), &mut any);
        field(2, value, &mut any);
        // An empty `Any` is still one element of the list.
        encode_key(3, WireType::LengthDelimited, &mut out);
        encode_varint(any.len() as u64, &mut out);
        out.extend_from_slice(&any);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_encoding_matches_prost_reflect() {
        let mut diags = Diagnostics::default();
        let mut protos = std::collections::BTreeMap::new();
        let text = "syntax = \"proto3\"; package a; message M { string s = 1; }";
        protos.insert("a.proto".to_string(), crate::protos::Text { shown: "a.proto".into(), text: text.into() });
        let schema =
            crate::protos::compile(&protos, &[], false, &[], &Default::default(), &mut diags).expect("compiles");
        let bytes = encode_status(3, "bad", &[("type.googleapis.com/a.M".into(), b"\x0a\x01x".to_vec())]);
        let desc = schema.pool.get_message_by_name("google.rpc.Status").expect("built in");
        let status = prost_reflect::DynamicMessage::decode(desc, bytes.as_slice()).unwrap();
        assert_eq!(
            serde_json::to_value(&status).unwrap(),
            serde_json::json!({"code": 3, "message": "bad", "details": [{"@type": "type.googleapis.com/a.M", "s": "x"}]})
        );
        assert!(schema.pool.get_message_by_name("google.rpc.BadRequest").is_some());
    }
}
