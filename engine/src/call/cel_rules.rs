//! The plan's rules written in CEL (protovalidate's `cel`, predefined
//! rules, the well-known types' rules), run on the decoded request:
//! where each rule's `this` is (a field, a message, or each element of a
//! list or value of a map on the way), the protobuf values as CEL values,
//! and the violations. Only methods with such rules decode a message.

use crate::call::cel_ext::CelRule;
use crate::served::ServedMethod;
use prost_reflect::{DynamicMessage, ReflectMessage, Value as P};
use wirestub_plan::CelCheck;

/// One CEL rule a request broke.
pub struct CelBroken {
    /// Index into the method's CEL checks.
    pub check: u32,
    /// For a rule inside a list's elements: which element.
    pub element: Option<u32>,
    /// For a rule inside a map's values: the entry's key.
    pub key: Option<wirestub_plan::Value>,
    pub message: String,
}

/// The CEL rules a request message breaks, at most `max`. The message is
/// decoded once, only for methods that have such rules; a rule inside
/// elements runs on each, at most `max` violations in all.
pub fn failures(method: &ServedMethod, message: &[u8], max: usize) -> Vec<CelBroken> {
    let mut out = Vec::new();
    let Some(codec) = method.json.as_ref().filter(|_| !method.cel.is_empty()) else { return out };
    let Ok(root) = DynamicMessage::decode(codec.input().clone(), message) else { return out };
    // One context for the message's rules; each sets its own `this`.
    let mut context = super::cel_ext::context();
    let mut targets = Vec::new();
    for (i, (check, prepared)) in method.plan.cel_checks.iter().zip(&method.cel).enumerate() {
        if out.len() >= max {
            break;
        }
        let Some(prepared) = prepared else { continue };
        targets.clear();
        // Down to the message holding what `this` is; an unset message on
        // the way means the rule does not apply.
        let steps = match check.field {
            true => &check.numbers[..check.numbers.len() - 1],
            false => &check.numbers[..],
        };
        collect(&root, check, steps, 0, None, &mut targets);
        for (element, key, this) in targets.drain(..) {
            if out.len() >= max {
                break;
            }
            if let Some(message) = evaluate(&mut context, check, prepared, this) {
                out.push(CelBroken { check: i as u32, element, key, message });
            }
        }
    }
    out
}

/// What `this` is for `check`, below `at` (reached through
/// `check.numbers[..done]`): the field (or the message) at the end of
/// `steps`, once per element where the path goes through the elements
/// of a list or the values of a map (`CelCheck::each`), with that
/// element's position or key.
type Target = (Option<u32>, Option<wirestub_plan::Value>, cel::Value);

fn collect(
    at: &DynamicMessage,
    check: &CelCheck,
    steps: &[u32],
    done: usize,
    sub: Option<(Option<u32>, Option<wirestub_plan::Value>)>,
    out: &mut Vec<Target>,
) {
    let (element, key) = sub.clone().unwrap_or((None, None));
    let Some((&n, rest)) = steps.split_first() else {
        // At the message holding `this`.
        let this = match check.field {
            true => {
                let Some(&n) = check.numbers.last() else { return };
                let Some(f) = at.descriptor().get_field(n) else { return };
                if f.supports_presence() && !f.is_list() && !f.is_map() && !at.has_field(&f) {
                    return;
                }
                // IGNORE_IF_ZERO_VALUE: a field at its zero value (or an
                // empty list or map) is not set.
                if check.skip_zero && !at.has_field(&f) {
                    return;
                }
                to_cel(&at.get_field(&f), 0)
            }
            false => message_to_cel(at, 0),
        };
        out.push((element, key, this));
        return;
    };
    let Some(f) = at.descriptor().get_field(n) else { return };
    if !at.has_field(&f) {
        return;
    }
    let value = at.get_field(&f);
    match (&*value, check.each) {
        (P::List(items), Some((step, _))) if step as usize == done => {
            for (i, item) in items.iter().enumerate() {
                if let P::Message(m) = item {
                    collect(m, check, rest, done + 1, Some((Some(i as u32), None)), out);
                }
            }
        }
        (P::Map(entries), Some((step, _))) if step as usize == done => {
            // The value's number (2) follows the map's in the path.
            let Some((_, rest)) = rest.split_first() else { return };
            for (k, v) in entries {
                if let P::Message(m) = v {
                    collect(m, check, rest, done + 2, Some((None, Some(map_key(k)))), out);
                }
            }
        }
        (P::Message(m), _) => collect(m, check, rest, done + 1, sub, out),
        _ => {}
    }
}

/// A map key as a plan value.
fn map_key(k: &prost_reflect::MapKey) -> wirestub_plan::Value {
    use prost_reflect::MapKey as K;
    use wirestub_plan::Value as V;
    match k {
        K::Bool(b) => V::Bool(*b),
        K::I32(i) => V::I64(*i as i64),
        K::I64(i) => V::I64(*i),
        K::U32(u) => V::U64(*u as u64),
        K::U64(u) => V::U64(*u),
        K::String(s) => V::Bytes(s.as_bytes().to_vec()),
    }
}

/// Runs one rule on `this`: the violation's message, if it breaks it.
fn evaluate(
    context: &mut cel::Context<'_, '_>,
    check: &CelCheck,
    prepared: &CelRule,
    this: cel::Value,
) -> Option<String> {
    context.add_variable_from_value("this", this);
    if let Some(rule) = &prepared.rule {
        context.add_variable_from_value("rule", rule.clone());
    }
    if let Some(rules) = &prepared.rules {
        context.add_variable_from_value("rules", rules.clone());
    }
    if prepared.now {
        context.add_variable_from_value("now", timestamp(std::time::SystemTime::now()));
    }
    let broken = match prepared.program.execute(context) {
        Ok(cel::Value::Bool(true)) => None,
        Ok(cel::Value::Bool(false)) => Some(check.message.clone()),
        Ok(cel::Value::String(s)) if s.is_empty() => None,
        Ok(cel::Value::String(s)) => Some(s.to_string()),
        Ok(other) => Some(format!("the rule gave {other:?}, not a bool or a string")),
        Err(e) => Some(format!("the rule could not be evaluated: {e}")),
    }?;
    Some(if broken.is_empty() { format!("`{}` failed", check.expression) } else { broken })
}

/// A protobuf value as CEL sees it.
fn to_cel(v: &prost_reflect::Value, depth: usize) -> cel::Value {
    use prost_reflect::Value as P;
    use std::sync::Arc;
    match v {
        P::Bool(b) => cel::Value::Bool(*b),
        P::I32(i) => cel::Value::Int(*i as i64),
        P::I64(i) => cel::Value::Int(*i),
        P::U32(u) => cel::Value::UInt(*u as u64),
        P::U64(u) => cel::Value::UInt(*u),
        P::F32(f) => cel::Value::Float(*f as f64),
        P::F64(f) => cel::Value::Float(*f),
        P::String(s) => cel::Value::String(Arc::new(s.clone())),
        P::Bytes(b) => cel::Value::Bytes(Arc::new(b.to_vec())),
        P::EnumNumber(n) => cel::Value::Int(*n as i64),
        P::Message(m) => message_to_cel(m, depth),
        P::List(l) => cel::Value::List(Arc::new(l.iter().map(|v| to_cel(v, depth)).collect())),
        P::Map(m) => {
            let map: std::collections::HashMap<cel::objects::Key, cel::Value> = m
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        prost_reflect::MapKey::Bool(b) => cel::objects::Key::Bool(*b),
                        prost_reflect::MapKey::I32(i) => cel::objects::Key::Int(*i as i64),
                        prost_reflect::MapKey::I64(i) => cel::objects::Key::Int(*i),
                        prost_reflect::MapKey::U32(u) => cel::objects::Key::Uint(*u as u64),
                        prost_reflect::MapKey::U64(u) => cel::objects::Key::Uint(*u),
                        prost_reflect::MapKey::String(s) => cel::objects::Key::String(Arc::new(s.clone())),
                    };
                    (key, to_cel(v, depth))
                })
                .collect();
            map.into()
        }
    }
}

/// A message as a CEL map of its fields: scalars and lists at their
/// values (unset: defaults), message fields only when set, so that the
/// conversion follows the request, never the schema (which may recurse),
/// and at most [`MAX_CEL_DEPTH`] messages deep (lists and maps count).
fn message_to_cel(m: &prost_reflect::DynamicMessage, depth: usize) -> cel::Value {
    // The well-known types CEL has types of its own for.
    let int = |name: &str| match m.get_field_by_name(name).as_deref() {
        Some(prost_reflect::Value::I64(n)) => *n,
        Some(prost_reflect::Value::I32(n)) => *n as i64,
        _ => 0,
    };
    match m.descriptor().full_name() {
        "google.protobuf.Timestamp" => {
            let (seconds, nanos) = (int("seconds"), int("nanos").clamp(0, 999_999_999) as u32);
            if let Some(t) = chrono::DateTime::from_timestamp(seconds, nanos) {
                return cel::Value::Timestamp(t.fixed_offset());
            }
        }
        "google.protobuf.Duration" => {
            let d = chrono::Duration::try_seconds(int("seconds"))
                .and_then(|s| s.checked_add(&chrono::Duration::nanoseconds(int("nanos"))));
            if let Some(d) = d {
                return cel::Value::Duration(d);
            }
        }
        // The wrappers are their value, as in protovalidate.
        "google.protobuf.DoubleValue"
        | "google.protobuf.FloatValue"
        | "google.protobuf.Int64Value"
        | "google.protobuf.UInt64Value"
        | "google.protobuf.Int32Value"
        | "google.protobuf.UInt32Value"
        | "google.protobuf.BoolValue"
        | "google.protobuf.StringValue"
        | "google.protobuf.BytesValue" => {
            if let Some(f) = m.descriptor().get_field(1) {
                return to_cel(&m.get_field(&f), depth);
            }
        }
        _ => {}
    }
    let mut map: std::collections::HashMap<String, cel::Value> = std::collections::HashMap::new();
    // The names of the fields set, as protovalidate has it (present, or
    // not empty, or not zero), under a key no field can have: what the
    // message `oneof` rule counts.
    let mut set = Vec::new();
    for f in m.descriptor().fields() {
        if m.has_field(&f) {
            set.push(cel::Value::String(std::sync::Arc::new(f.name().to_string())));
        }
        let nested = matches!(f.kind(), prost_reflect::Kind::Message(_)) && !f.is_list() && !f.is_map();
        if nested {
            if m.has_field(&f) && depth < MAX_CEL_DEPTH {
                if let prost_reflect::Value::Message(inner) = &*m.get_field(&f) {
                    map.insert(f.name().to_string(), message_to_cel(inner, depth + 1));
                }
            }
            continue;
        }
        map.insert(f.name().to_string(), to_cel(&m.get_field(&f), depth + 1));
    }
    map.insert(SET_FIELDS.to_string(), cel::Value::List(std::sync::Arc::new(set)));
    map.into()
}

/// The key of a message's CEL map listing the fields set.
pub const SET_FIELDS: &str = "@set";

/// A point in time as a CEL timestamp.
fn timestamp(t: std::time::SystemTime) -> cel::Value {
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let at = chrono::DateTime::from_timestamp(since.as_secs() as i64, since.subsec_nanos()).unwrap_or_default();
    cel::Value::Timestamp(at.fixed_offset())
}

/// How deep CEL sees nested messages.
const MAX_CEL_DEPTH: usize = 32;
