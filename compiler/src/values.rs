//! Typed reading of rule values: scalars for matchers and whole messages for
//! response bodies, following the protobuf JSON mapping (field or JSON names,
//! enums by name or number, 64-bit integers as strings or numbers, bytes as
//! base64, well-known types in their JSON forms).
//!
//! Every mismatch becomes a diagnostic at the offending node; reading goes on
//! so that one run reports every problem.

use crate::diag::{suggest, Diagnostic, Diagnostics};
use crate::yaml::{plain_type, Node, NodeKind, PlainType};
use base64::Engine as _;
use prost_reflect::{DynamicMessage, EnumDescriptor, FieldDescriptor, Kind, MapKey, MessageDescriptor, Value};
use std::collections::HashMap;

/// Well-known types whose JSON form is not the plain field-by-field mapping;
/// they are read by prost-reflect's JSON support.
pub(crate) const SPECIAL_WKT: &[&str] = &[
    "google.protobuf.Any",
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
    "google.protobuf.FieldMask",
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
    "google.protobuf.DoubleValue",
    "google.protobuf.FloatValue",
    "google.protobuf.Int64Value",
    "google.protobuf.UInt64Value",
    "google.protobuf.Int32Value",
    "google.protobuf.UInt32Value",
    "google.protobuf.BoolValue",
    "google.protobuf.StringValue",
    "google.protobuf.BytesValue",
];

/// Well-known types whose JSON form is itself an object.
const JSON_OBJECTS: &[&str] = &["google.protobuf.Any", "google.protobuf.Struct", "google.protobuf.Value"];

/// A short name for a field's type, for messages.
pub fn kind_name(kind: &Kind) -> String {
    match kind {
        Kind::Double => "double".into(),
        Kind::Float => "float".into(),
        Kind::Int32 => "int32".into(),
        Kind::Int64 => "int64".into(),
        Kind::Uint32 => "uint32".into(),
        Kind::Uint64 => "uint64".into(),
        Kind::Sint32 => "sint32".into(),
        Kind::Sint64 => "sint64".into(),
        Kind::Fixed32 => "fixed32".into(),
        Kind::Fixed64 => "fixed64".into(),
        Kind::Sfixed32 => "sfixed32".into(),
        Kind::Sfixed64 => "sfixed64".into(),
        Kind::Bool => "bool".into(),
        Kind::String => "string".into(),
        Kind::Bytes => "bytes".into(),
        Kind::Message(m) => format!("message `{}`", m.full_name()),
        Kind::Enum(e) => format!("enum `{}`", e.full_name()),
    }
}

/// Finds a field by its proto name or its JSON name.
pub fn find_field(desc: &MessageDescriptor, name: &str) -> Option<FieldDescriptor> {
    desc.get_field_by_name(name).or_else(|| desc.get_field_by_json_name(name))
}

pub fn field_names(desc: &MessageDescriptor) -> Vec<String> {
    desc.fields().map(|f| f.name().to_string()).collect()
}

/// An error about a scalar, before it is given a location.
type Bad = String;

fn scalar_text<'a>(node: &'a Node, what: &str) -> Result<(&'a str, bool), Bad> {
    match &node.kind {
        NodeKind::Scalar { text, plain } => Ok((text, *plain)),
        _ => Err(format!("expected {what}, found {}", node.describe())),
    }
}

/// Reads an integer in `[min, max]`. Accepts numbers and numeric strings, as
/// the JSON mapping does (64-bit integers are usually written as strings).
pub fn read_int(node: &Node, min: i128, max: i128, type_name: &str) -> Result<i128, Bad> {
    let (text, _) = scalar_text(node, &format!("an integer ({type_name})"))?;
    let t = text.trim();
    let v = match t.parse::<i128>() {
        Ok(v) => v,
        Err(_) => match t.parse::<f64>() {
            Ok(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1.8e19 => f as i128,
            _ => return Err(format!("expected an integer ({type_name}), found `{text}`")),
        },
    };
    if v < min || v > max {
        return Err(format!("{v} is out of range for {type_name} ({min} to {max})"));
    }
    Ok(v)
}

pub fn read_float(node: &Node, type_name: &str) -> Result<f64, Bad> {
    let (text, _) = scalar_text(node, &format!("a number ({type_name})"))?;
    match text.trim() {
        "NaN" => Ok(f64::NAN),
        "Infinity" | "inf" | ".inf" => Ok(f64::INFINITY),
        "-Infinity" | "-inf" | "-.inf" => Ok(f64::NEG_INFINITY),
        t => t.parse::<f64>().map_err(|_| format!("expected a number ({type_name}), found `{text}`")),
    }
}

pub fn read_bool(node: &Node) -> Result<bool, Bad> {
    let (text, _) = scalar_text(node, "a boolean")?;
    match plain_type(text) {
        PlainType::Bool(b) => Ok(b),
        _ => Err(format!("expected a boolean (true or false), found `{text}`")),
    }
}

/// Reads base64, standard or URL-safe, padded or not.
pub fn read_bytes(node: &Node) -> Result<Vec<u8>, Bad> {
    let (text, _) = scalar_text(node, "base64 bytes")?;
    let t = text.trim().trim_end_matches('=');
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(t)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t))
        .map_err(|_| format!("expected base64 bytes, found `{text}`"))
}

/// Reads a string: any scalar, as written (a plain `18` is the string "18").
pub fn read_string(node: &Node) -> Result<String, Bad> {
    match &node.kind {
        NodeKind::Scalar { text, .. } => Ok(text.clone()),
        NodeKind::Null => Ok(String::new()),
        _ => Err(format!("expected a string, found {}", node.describe())),
    }
}

/// Reads an enum value by name or by number.
pub fn read_enum(node: &Node, desc: &EnumDescriptor) -> Result<i32, (Bad, Option<String>)> {
    let (text, _) = scalar_text(node, &format!("a value of enum `{}`", desc.full_name())).map_err(|e| (e, None))?;
    if let Some(v) = desc.get_value_by_name(text) {
        return Ok(v.number());
    }
    if let Ok(n) = text.trim().parse::<i32>() {
        return Ok(n);
    }
    let names: Vec<String> = desc.values().map(|v| v.name().to_string()).collect();
    Err((
        format!("`{text}` is not a value of enum `{}`", desc.full_name()),
        Some(suggest(text, names.iter().map(String::as_str))),
    ))
}

/// Reads a singular scalar (or enum) field value for a response body.
fn read_scalar(node: &Node, kind: &Kind) -> Result<Value, (Bad, Option<String>)> {
    let plain = |r: Result<Value, Bad>| r.map_err(|e| (e, None));
    match kind {
        Kind::Double => plain(read_float(node, "double").map(Value::F64)),
        Kind::Float => plain(read_float(node, "float").map(|f| Value::F32(f as f32))),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            plain(read_int(node, i32::MIN as i128, i32::MAX as i128, &kind_name(kind)).map(|v| Value::I32(v as i32)))
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            plain(read_int(node, i64::MIN as i128, i64::MAX as i128, &kind_name(kind)).map(|v| Value::I64(v as i64)))
        }
        Kind::Uint32 | Kind::Fixed32 => {
            plain(read_int(node, 0, u32::MAX as i128, &kind_name(kind)).map(|v| Value::U32(v as u32)))
        }
        Kind::Uint64 | Kind::Fixed64 => {
            plain(read_int(node, 0, u64::MAX as i128, &kind_name(kind)).map(|v| Value::U64(v as u64)))
        }
        Kind::Bool => plain(read_bool(node).map(Value::Bool)),
        Kind::String => plain(read_string(node).map(Value::String)),
        Kind::Bytes => plain(read_bytes(node).map(|b| Value::Bytes(b.into()))),
        Kind::Enum(e) => read_enum(node, e).map(Value::EnumNumber),
        Kind::Message(_) => unreachable!("messages are read by read_message"),
    }
}

/// Builds a message from a rule node, reporting every problem found.
/// Returns None if any problem was found.
pub fn read_message(node: &Node, desc: &MessageDescriptor, diags: &mut Diagnostics) -> Option<DynamicMessage> {
    let before = diags.error_count();
    let msg = build_message(node, desc, diags);
    (diags.error_count() == before).then_some(msg)
}

fn build_message(node: &Node, desc: &MessageDescriptor, diags: &mut Diagnostics) -> DynamicMessage {
    let mut msg = DynamicMessage::new(desc.clone());
    // Timestamp, Duration, FieldMask and the wrappers are strings or
    // scalars in the JSON mapping; written as a mapping (Wishmock writes
    // `{seconds, nanos}`), they are read field by field like any message.
    let object_form = matches!(node.kind, NodeKind::Map(_)) && !JSON_OBJECTS.contains(&desc.full_name());
    if SPECIAL_WKT.contains(&desc.full_name()) && !object_form {
        match DynamicMessage::deserialize(desc.clone(), node.to_json()) {
            Ok(m) => return m,
            Err(e) => {
                diags.error(Some(node.span.clone()), format!("invalid value for `{}`: {e}", desc.full_name()));
                return msg;
            }
        }
    }
    let entries = match &node.kind {
        NodeKind::Map(entries) => entries,
        NodeKind::Null => return msg,
        _ => {
            diags.push(Diagnostic::error(
                Some(node.span.clone()),
                format!("expected a mapping for message `{}`, found {}", desc.full_name(), node.describe()),
            ));
            return msg;
        }
    };
    let mut oneofs: HashMap<String, &Node> = HashMap::new();
    for (key, value) in entries {
        let name = key.scalar().unwrap_or_default();
        let Some(field) = find_field(desc, name) else {
            let names = field_names(desc);
            diags.push(
                Diagnostic::error(
                    Some(key.span.clone()),
                    format!("unknown field `{name}` in message `{}`", desc.full_name()),
                )
                .with_help(suggest(name, names.iter().map(String::as_str))),
            );
            continue;
        };
        if value.is_null() {
            continue;
        }
        if let Some(oneof) = field.containing_oneof().filter(|o| !o.is_synthetic()) {
            if let Some(first) = oneofs.insert(oneof.name().to_string(), key) {
                diags.push(
                    Diagnostic::error(
                        Some(key.span.clone()),
                        format!(
                            "field `{name}` and field `{}` are both in oneof `{}`; set only one",
                            first.scalar().unwrap_or_default(),
                            oneof.name()
                        ),
                    )
                    .with_help(format!("the other one is at line {}", first.span.line)),
                );
                continue;
            }
        }
        if let Some(v) = build_field(value, &field, diags) {
            msg.set_field(&field, v);
        }
    }
    msg
}

fn build_field(node: &Node, field: &FieldDescriptor, diags: &mut Diagnostics) -> Option<Value> {
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else { return None };
        let key_field = entry.map_entry_key_field();
        let value_field = entry.map_entry_value_field();
        let NodeKind::Map(entries) = &node.kind else {
            diags.error(
                Some(node.span.clone()),
                format!("expected a mapping for map field `{}`, found {}", field.name(), node.describe()),
            );
            return None;
        };
        let mut map = HashMap::new();
        for (k, v) in entries {
            let key = match read_scalar(k, &key_field.kind()) {
                Ok(Value::String(s)) => MapKey::String(s),
                Ok(Value::Bool(b)) => MapKey::Bool(b),
                Ok(Value::I32(i)) => MapKey::I32(i),
                Ok(Value::I64(i)) => MapKey::I64(i),
                Ok(Value::U32(i)) => MapKey::U32(i),
                Ok(Value::U64(i)) => MapKey::U64(i),
                Ok(_) => continue,
                Err((e, help)) => {
                    push(diags, k, format!("map key of `{}`: {e}", field.name()), help);
                    continue;
                }
            };
            if let Some(val) = build_single(v, &value_field, field.name(), diags) {
                map.insert(key, val);
            }
        }
        return Some(Value::Map(map));
    }
    if field.is_list() {
        let items = match &node.kind {
            NodeKind::Seq(items) => items,
            _ => {
                diags.error(
                    Some(node.span.clone()),
                    format!("expected a list for repeated field `{}`, found {}", field.name(), node.describe()),
                );
                return None;
            }
        };
        let values: Vec<Value> =
            items.iter().filter_map(|item| build_single(item, field, field.name(), diags)).collect();
        return Some(Value::List(values));
    }
    build_single(node, field, field.name(), diags)
}

/// Reads one value of `field`; `name` is what messages call it (the map
/// field's name for map values).
fn build_single(node: &Node, field: &FieldDescriptor, name: &str, diags: &mut Diagnostics) -> Option<Value> {
    match field.kind() {
        Kind::Message(m) => Some(Value::Message(build_message(node, &m, diags))),
        kind => match read_scalar(node, &kind) {
            Ok(v) => Some(v),
            Err((e, help)) => {
                push(diags, node, format!("field `{name}`: {e}"), help);
                None
            }
        },
    }
}

fn push(diags: &mut Diagnostics, node: &Node, message: String, help: Option<String>) {
    let mut d = Diagnostic::error(Some(node.span.clone()), message);
    d.help = help;
    diags.push(d);
}
