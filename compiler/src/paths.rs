//! What a rule reads, typed: a checked condition (`Cond`: a source, a
//! field path or a metadata key, and a plan test) and the scalar typing
//! shared by conditions, templates and recordings (`scalar_kind`,
//! `to_plan_value`). The bottom of the compiler's rule layers: it imports
//! none of them.

use prost_reflect::Kind;
use wirestub_plan as plan;

/// A checked condition. `Op::Regex` indices refer to the list of regular
/// expressions checked beside the documents.
#[derive(Clone)]
pub struct Cond {
    pub source: CondSource,
    pub test: plan::Test,
}

#[derive(Clone)]
pub enum CondSource {
    Field(plan::FieldPath),
    Metadata(String),
}

/// The plan's scalar kind of a (non-message) field kind.
pub fn scalar_kind(kind: &Kind) -> plan::ScalarKind {
    use plan::ScalarKind as S;
    match kind {
        Kind::Double => S::Double,
        Kind::Float => S::Float,
        Kind::Int32 => S::Int32,
        Kind::Int64 => S::Int64,
        Kind::Uint32 => S::Uint32,
        Kind::Uint64 => S::Uint64,
        Kind::Sint32 => S::Sint32,
        Kind::Sint64 => S::Sint64,
        Kind::Fixed32 => S::Fixed32,
        Kind::Fixed64 => S::Fixed64,
        Kind::Sfixed32 => S::Sfixed32,
        Kind::Sfixed64 => S::Sfixed64,
        Kind::Bool => S::Bool,
        Kind::String => S::String,
        Kind::Bytes => S::Bytes,
        Kind::Enum(_) => S::Enum,
        Kind::Message(_) => unreachable!("message fields are rejected before"),
    }
}

pub(crate) fn to_plan_value(v: &prost_reflect::Value, kind: plan::ScalarKind) -> plan::Value {
    use prost_reflect::Value as V;
    match v {
        V::Bool(b) => plan::Value::Bool(*b),
        V::I32(i) => plan::Value::I64(*i as i64),
        V::I64(i) => plan::Value::I64(*i),
        V::U32(u) => plan::Value::U64(*u as u64),
        V::U64(u) => plan::Value::U64(*u),
        V::F32(f) => plan::Value::F64(*f as f64),
        V::F64(f) => plan::Value::F64(*f),
        V::String(s) => plan::Value::Bytes(s.as_bytes().to_vec()),
        V::Bytes(b) => plan::Value::Bytes(b.to_vec()),
        V::EnumNumber(n) => plan::Value::I64(*n as i64),
        _ => match kind.value_class() {
            plan::ValueClass::I64 => plan::Value::I64(0),
            plan::ValueClass::U64 => plan::Value::U64(0),
            plan::ValueClass::F64 => plan::Value::F64(0.0),
            plan::ValueClass::Bool => plan::Value::Bool(false),
            plan::ValueClass::Bytes => plan::Value::Bytes(Vec::new()),
        },
    }
}
