//! CEL text the compiler writes and reads: protobuf values (a rule's
//! value, a whole rules message) as CEL literals the engine evaluates at
//! plan load, and the variables an expression's macros bind.

use prost_reflect::{ReflectMessage, Value as PValue};

/// A rule's value as a CEL literal (`5`, `5u`, `2.5`, `"text"`,
/// `b"\x01"`, `[1, 2]`); None for messages and maps.
pub fn cel_literal(v: &PValue) -> Option<String> {
    let bytes = |s: &[u8]| {
        let mut out = String::from("b\"");
        for &b in s {
            match b {
                b'"' | b'\\' => out.extend(['\\', b as char]),
                0x20..=0x7e => out.push(b as char),
                _ => out.push_str(&format!("\\x{b:02x}")),
            }
        }
        out.push('"');
        out
    };
    Some(match v {
        PValue::Bool(b) => b.to_string(),
        PValue::I32(n) => n.to_string(),
        PValue::I64(n) => n.to_string(),
        PValue::EnumNumber(n) => n.to_string(),
        PValue::U32(n) => format!("{n}u"),
        PValue::U64(n) => format!("{n}u"),
        PValue::F32(f) => float_literal(*f as f64),
        PValue::F64(f) => float_literal(*f),
        // In a string literal `\x` is a code point, not a byte: the text
        // goes as it is, but for quotes, backslashes and control characters.
        PValue::String(s) => {
            let mut out = String::from("\"");
            for c in s.chars() {
                match c {
                    '"' | '\\' => out.extend(['\\', c]),
                    c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        }
        PValue::Bytes(b) => bytes(b),
        PValue::List(items) => {
            let items: Option<Vec<String>> = items.iter().map(cel_literal).collect();
            format!("[{}]", items?.join(", "))
        }
        PValue::Message(m) => match m.descriptor().full_name() {
            "google.protobuf.Timestamp" | "google.protobuf.Duration" => {
                let int = |name: &str| match m.get_field_by_name(name).as_deref() {
                    Some(PValue::I64(n)) => *n,
                    Some(PValue::I32(n)) => *n as i64,
                    _ => 0,
                };
                let (seconds, nanos) = (int("seconds"), int("nanos"));
                if m.descriptor().full_name() == "google.protobuf.Duration" {
                    // `1s500000000ns`: each part exact (a decimal is read as
                    // a float); a negative duration has both parts negative.
                    let sign = if seconds < 0 || nanos < 0 { "-" } else { "" };
                    format!("duration(\"{sign}{}s{}ns\")", seconds.unsigned_abs(), nanos.unsigned_abs())
                } else {
                    let t = chrono::DateTime::from_timestamp(seconds, nanos.clamp(0, 999_999_999) as u32)?;
                    format!("timestamp(\"{}\")", t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
                }
            }
            // A message as the engine shows one to CEL: every field at its
            // value (zero, empty), but messages only when set.
            _ => {
                let mut fields = Vec::new();
                for f in m.descriptor().fields() {
                    // Unset fields with presence are left out, so that
                    // `has(rules.strict)` is false for an unset one.
                    let presence = f.supports_presence() && !f.is_list() && !f.is_map();
                    if presence && !m.has_field(&f) {
                        continue;
                    }
                    fields.push(format!("'{}': {}", f.name(), cel_literal(&m.get_field(&f))?));
                }
                format!("{{{}}}", fields.join(", "))
            }
        },
        PValue::Map(entries) => {
            let mut pairs = Vec::new();
            for (k, v) in entries {
                let key = match k {
                    prost_reflect::MapKey::Bool(b) => b.to_string(),
                    prost_reflect::MapKey::I32(n) => n.to_string(),
                    prost_reflect::MapKey::I64(n) => n.to_string(),
                    prost_reflect::MapKey::U32(n) => format!("{n}u"),
                    prost_reflect::MapKey::U64(n) => format!("{n}u"),
                    prost_reflect::MapKey::String(s) => cel_literal(&PValue::String(s.clone()))?,
                };
                pairs.push(format!("{key}: {}", cel_literal(v)?));
            }
            format!("{{{}}}", pairs.join(", "))
        }
    })
}

/// The variables an expression's macros bind: `x` in `list.all(x, ...)`,
/// `exists`, `exists_one`, `map`, `filter` (and `cel.bind`).
pub fn macro_binders(expression: &str) -> Vec<String> {
    let mut out = Vec::new();
    for name in ["all(", "exists(", "exists_one(", "map(", "filter(", "bind("] {
        let mut rest = expression;
        while let Some(i) = rest.find(name) {
            let after = &rest[i + name.len()..];
            let ident: String = after.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !ident.is_empty() && after.trim_start()[ident.len()..].trim_start().starts_with(',') {
                out.push(ident);
            }
            rest = after;
        }
    }
    out
}

/// Whether a CEL literal the compiler wrote evaluates (a duration past
/// CEL's range of about 292 years does not).
pub fn literal_evaluates(literal: &str) -> bool {
    literal.is_empty() || cel::Program::compile(literal).is_ok_and(|p| p.execute(&cel::Context::default()).is_ok())
}

/// A double as a CEL literal (`2.0`, `double("inf")`).
fn float_literal(f: f64) -> String {
    match f {
        f if f.is_nan() => "double(\"NaN\")".into(),
        f if f.is_infinite() => format!("double(\"{}\")", if f > 0.0 { "Infinity" } else { "-Infinity" }),
        f => format!("{f:?}"),
    }
}

/// `has(this.f)` as protobuf has it: whether the request set `f`
/// (present, or not empty, or not zero), which the engine lists under
/// `@set` in the map it makes of a message; CEL's own `has()` on that map
/// would hold for every field of the message. Only this exact form is
/// rewritten (outside string literals); others keep CEL's meaning.
pub fn presence_tests(expression: &str) -> String {
    let mut out = String::with_capacity(expression.len());
    let b = expression.as_bytes();
    let mut i = 0;
    let mut quote: Option<u8> = None;
    while i < b.len() {
        let c = b[i];
        let ch = expression[i..].chars().next().unwrap_or(' ');
        if let Some(q) = quote {
            // Inside a string literal: copied as it is, escapes included.
            out.push(ch);
            i += ch.len_utf8();
            if c == b'\\' {
                if let Some(next) = expression[i..].chars().next() {
                    out.push(next);
                    i += next.len_utf8();
                }
            } else if c == q {
                quote = None;
            }
            continue;
        }
        if c == b'"' || c == b'\'' {
            quote = Some(c);
            out.push(c as char);
            i += 1;
            continue;
        }
        let word_start = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b'.');
        if word_start && expression[i..].starts_with("has(") {
            let rest = &expression[i + 4..];
            let trimmed = rest.trim_start();
            if let Some(after) = trimmed.strip_prefix("this.") {
                let ident: String = after.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                let tail = after[ident.len()..].trim_start();
                if !ident.is_empty() && tail.starts_with(')') {
                    out.push_str(&format!("('{ident}' in this['@set'])"));
                    i = expression.len() - tail.len() + 1;
                    continue;
                }
            }
        }
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// protovalidate's CEL functions, which the engine provides: stand-ins
/// here, so that a probe knows them.
const PROTOVALIDATE_FUNCTIONS: [&str; 11] = [
    "isEmail",
    "isHostname",
    "isIp",
    "isIpPrefix",
    "isUri",
    "isUriRef",
    "isHostAndPort",
    "unique",
    "isNan",
    "isInf",
    "getField",
];

/// A field's zero value as CEL, for a probe: scalars, enums, lists and
/// maps (None for messages, whose CEL form is the engine's).
pub fn zero(field: &prost_reflect::FieldDescriptor) -> Option<cel::Value> {
    use prost_reflect::Kind;
    use std::sync::Arc;
    if field.is_list() {
        return Some(cel::Value::List(Arc::new(Vec::new())));
    }
    if field.is_map() {
        return Some(std::collections::HashMap::<String, cel::Value>::new().into());
    }
    Some(match field.kind() {
        Kind::Double | Kind::Float => cel::Value::Float(0.0),
        Kind::Int32 | Kind::Int64 | Kind::Sint32 | Kind::Sint64 | Kind::Sfixed32 | Kind::Sfixed64 | Kind::Enum(_) => {
            cel::Value::Int(0)
        }
        Kind::Uint32 | Kind::Uint64 | Kind::Fixed32 | Kind::Fixed64 => cel::Value::UInt(0),
        Kind::Bool => cel::Value::Bool(false),
        Kind::String => cel::Value::String(Arc::new(String::new())),
        Kind::Bytes => cel::Value::Bytes(Arc::new(Vec::new())),
        Kind::Message(_) => return None,
    })
}

/// Runs `program` with `this` at `zero` (and its bound `rule` and `rules`
/// literals): what is wrong with it whatever the value, if anything (a
/// function that does not exist, operands of the wrong types, a result
/// that is neither a bool nor a string). Errors that depend on the value
/// (a missing key, a division by zero) do not count.
pub fn probe(program: &cel::Program, zero: &cel::Value, rule: &str, rules: &str) -> Result<(), String> {
    use cel::ExecutionError as E;
    let mut context = cel::Context::default();
    // The strings extension (`format()`, ...) as the engine has it.
    let mut env = cel::Env::stdlib();
    if env.add_extension(cel::extensions::strings).is_ok() {
        context = cel::Context::with_env(std::sync::Arc::new(env));
    }
    for name in PROTOVALIDATE_FUNCTIONS {
        let _ = context.add_function(name, |cel::extractors::Arguments(_): cel::extractors::Arguments| false);
    }
    context.add_variable_from_value("this", zero.clone());
    let now = chrono::DateTime::from_timestamp(0, 0).unwrap_or_default().fixed_offset();
    context.add_variable_from_value("now", cel::Value::Timestamp(now));
    for (name, literal) in [("rule", rule), ("rules", rules)] {
        if let Some(v) = cel::Program::compile(literal).ok().and_then(|p| p.execute(&cel::Context::default()).ok()) {
            context.add_variable_from_value(name, v);
        }
    }
    match program.execute(&context) {
        Ok(cel::Value::Bool(_) | cel::Value::String(_)) => Ok(()),
        Ok(other) => Err(format!("gives {other:?}, not a bool or a string")),
        Err(
            e @ (E::UndeclaredReference(_)
            | E::NoSuchOverload(_)
            | E::UnsupportedBinaryOperator(..)
            | E::ValuesNotComparable(..)
            | E::NotSupportedAsMethod { .. }
            | E::InvalidArgumentCount { .. }),
        ) => Err(format!("cannot run: {e}")),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn eval(v: &PValue) -> cel::Value {
        let literal = cel_literal(v).expect("a literal");
        cel::Program::compile(&literal)
            .unwrap_or_else(|e| panic!("{literal}: {e}"))
            .execute(&cel::Context::default())
            .unwrap_or_else(|e| panic!("{literal}: {e}"))
    }

    #[test]
    fn literals_evaluate_to_their_values() {
        let text = "a\"b\\c\né\u{1}'";
        assert_eq!(eval(&PValue::String(text.into())), cel::Value::String(Arc::new(text.into())));
        let bytes = vec![0u8, 255, b'"', b'\\', b'a'];
        assert_eq!(eval(&PValue::Bytes(bytes.clone().into())), cel::Value::Bytes(Arc::new(bytes)));
        assert_eq!(eval(&PValue::I64(i64::MIN)), cel::Value::Int(i64::MIN));
        assert_eq!(eval(&PValue::U64(u64::MAX)), cel::Value::UInt(u64::MAX));
        assert_eq!(eval(&PValue::F64(2.5)), cel::Value::Float(2.5));
        assert_eq!(eval(&PValue::F64(f64::INFINITY)), cel::Value::Float(f64::INFINITY));
        assert!(matches!(eval(&PValue::F64(f64::NAN)), cel::Value::Float(f) if f.is_nan()));
        let list = PValue::List(vec![PValue::I32(1), PValue::I32(-2)]);
        assert_eq!(eval(&list), cel::Value::List(Arc::new(vec![cel::Value::Int(1), cel::Value::Int(-2)])));
    }

    #[test]
    fn presence_tests_are_rewritten() {
        assert_eq!(
            presence_tests("!has(this.a) || has( this.b_c ) && 'has(this.x)' != \"é\""),
            "!('a' in this['@set']) || ('b_c' in this['@set']) && 'has(this.x)' != \"é\""
        );
        assert_eq!(presence_tests("has(this.a.b) || rehas(this.a)"), "has(this.a.b) || rehas(this.a)");
    }

    #[test]
    fn macro_binders_are_found() {
        assert_eq!(macro_binders("this.all(x, x > 0) && this.exists( y ,y < 3)"), vec!["x", "y"]);
        assert!(macro_binders("size(this) > 0").is_empty());
    }
}
