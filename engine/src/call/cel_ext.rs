//! protovalidate's CEL functions, beyond standard CEL, for the rules
//! written in CEL (`call::validate::cel_failures`): `isEmail()`,
//! `isHostname()`, `isIp([version])`, `isIpPrefix([version], [strict])`,
//! `isUri()`, `isUriRef()`, `isHostAndPort(port_required)`, `unique()`,
//! `isNan()`, `isInf([sign])` and `getField(message, name)`. The formats
//! are the ones the wire checks use (`call::formats`).

use crate::call::formats;
use cel::extractors::{Arguments, This};
use cel::{ExecutionError, Value};
use std::collections::HashSet;
use std::sync::Arc;

/// A CEL rule of the plan, parsed at plan load.
pub struct CelRule {
    pub program: cel::Program,
    /// A predefined rule's value, which the expression reads as `rule`.
    pub rule: Option<Value>,
    /// The field's rules message (a map), read as `rules`.
    pub rules: Option<Value>,
    /// The expression reads `now`.
    pub now: bool,
}

impl CelRule {
    /// Parses `check`'s expression and its rule's value; None when either
    /// does not evaluate (the compiler leaves such rules out, said).
    pub fn prepare(check: &wirestub_plan::CelCheck) -> Option<CelRule> {
        let program = cel::Program::compile(&check.expression).ok()?;
        let literal = |text: &str| match text.is_empty() {
            true => Some(None),
            false => Some(Some(cel::Program::compile(text).ok()?.execute(&context()).ok()?)),
        };
        let (rule, rules) = (literal(&check.rule)?, literal(&check.rules)?);
        let now = program.references().variables().contains(&"now");
        Some(CelRule { program, rule, rules, now })
    }
}

/// Standard CEL and its strings extension (`format()`, `lowerAscii()`,
/// ...), as protovalidate has them; built once.
fn env() -> Arc<cel::Env> {
    static ENV: std::sync::OnceLock<Arc<cel::Env>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = cel::Env::stdlib();
        // Fails only on a name declared twice, which the tests would show.
        let _ = env.add_extension(cel::extensions::strings);
        Arc::new(env)
    })
    .clone()
}

/// A context for CEL rules: standard CEL, the strings extension and
/// protovalidate's functions.
pub fn context() -> cel::Context<'static, 'static> {
    let mut context = cel::Context::with_env(env());
    let string_test = |test: fn(&str) -> bool| move |This(this): This<Arc<String>>| test(&this);
    // Each name is added once, to a fresh context: these cannot clash.
    let _ = context.add_function("isEmail", string_test(formats::is_email));
    let _ = context.add_function("isHostname", string_test(formats::is_hostname));
    let _ = context.add_function("isUri", string_test(|s| formats::is_uri(s, false)));
    let _ = context.add_function("isUriRef", string_test(|s| formats::is_uri(s, true)));
    let _ = context.add_function("isIp", is_ip);
    let _ = context.add_function("isIpPrefix", is_ip_prefix);
    let _ = context.add_function("isHostAndPort", is_host_and_port);
    let _ = context.add_function("unique", unique);
    let _ = context.add_function("isNan", |This(x): This<f64>| x.is_nan());
    let _ = context.add_function("isInf", is_inf);
    let _ = context.add_function("getField", get_field);
    context
}

/// `s.isIp()`, `s.isIp(4)`, `s.isIp(6)`.
fn is_ip(This(this): This<Arc<String>>, Arguments(args): Arguments) -> Result<bool, ExecutionError> {
    let version = match args.first() {
        None => 0,
        Some(Value::Int(v)) => *v,
        Some(other) => return Err(ExecutionError::function_error("isIp", format!("version {other:?}"))),
    };
    Ok(formats::is_ip(&this, version))
}

/// `s.isIpPrefix()`, `(version)`, `(strict)`, `(version, strict)`.
fn is_ip_prefix(This(this): This<Arc<String>>, Arguments(args): Arguments) -> Result<bool, ExecutionError> {
    let (version, strict) = match &args[..] {
        [] => (0, false),
        [Value::Int(v)] => (*v, false),
        [Value::Bool(s)] => (0, *s),
        [Value::Int(v), Value::Bool(s)] => (*v, *s),
        _ => return Err(ExecutionError::function_error("isIpPrefix", "takes (int, bool)")),
    };
    Ok(formats::is_ip_prefix(&this, version, strict))
}

/// `s.isHostAndPort(port_required)`.
fn is_host_and_port(This(this): This<Arc<String>>, Arguments(args): Arguments) -> Result<bool, ExecutionError> {
    match &args[..] {
        [Value::Bool(required)] => Ok(formats::is_host_and_port(&this, *required)),
        _ => Err(ExecutionError::function_error("isHostAndPort", "takes a bool")),
    }
}

/// `list.unique()`: no two elements equal. Elements are compared by their
/// scalar value (lists of messages are not unique-checked by protovalidate
/// either).
fn unique(This(this): This<Value>) -> Result<bool, ExecutionError> {
    let Value::List(items) = this else {
        return Err(ExecutionError::function_error("unique", "needs a list"));
    };
    #[derive(PartialEq, Eq, Hash)]
    enum Key<'a> {
        Int(i64),
        UInt(u64),
        Float(u64),
        Bool(bool),
        Text(&'a str),
        Bytes(&'a [u8]),
    }
    let mut seen = HashSet::with_capacity(items.len());
    for item in items.iter() {
        let key = match item {
            Value::Int(i) => Key::Int(*i),
            Value::UInt(u) => Key::UInt(*u),
            // -0.0 equals 0.0; NaN equals nothing (each is unique).
            Value::Float(f) if f.is_nan() => continue,
            Value::Float(f) => Key::Float(if *f == 0.0 { 0 } else { f.to_bits() }),
            Value::Bool(b) => Key::Bool(*b),
            Value::String(s) => Key::Text(s.as_str()),
            Value::Bytes(b) => Key::Bytes(b.as_slice()),
            _ => return Err(ExecutionError::function_error("unique", "needs a list of scalars")),
        };
        if !seen.insert(key) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `x.isInf()`, `x.isInf(1)` (positive), `x.isInf(-1)` (negative).
fn is_inf(This(x): This<f64>, Arguments(args): Arguments) -> Result<bool, ExecutionError> {
    let sign = match args.first() {
        None => 0,
        Some(Value::Int(s)) => *s,
        Some(_) => return Err(ExecutionError::function_error("isInf", "takes an int")),
    };
    Ok(x.is_infinite() && (sign == 0 || (sign > 0) == x.is_sign_positive()))
}

/// `getField(message, "name")`: a field of a message (a map of its
/// fields here), by name.
fn get_field(Arguments(args): Arguments) -> Result<Value, ExecutionError> {
    match &args[..] {
        [Value::Map(m), Value::String(name)] => m
            .get(&cel::objects::Key::String(name.clone()))
            .cloned()
            .ok_or_else(|| ExecutionError::function_error("getField", format!("no field {name}"))),
        _ => Err(ExecutionError::function_error("getField", "takes a message and a field name")),
    }
}

#[cfg(test)]
mod tests {
    fn eval(expression: &str, this: cel::Value) -> cel::Value {
        let mut context = super::context();
        context.add_variable_from_value("this", this);
        cel::Program::compile(expression).expect("parses").execute(&context).expect("evaluates")
    }

    #[test]
    fn the_functions_answer() {
        let s = |t: &str| cel::Value::String(std::sync::Arc::new(t.to_string()));
        let t = cel::Value::Bool(true);
        let f = cel::Value::Bool(false);
        assert_eq!(eval("this.isEmail()", s("a@b.com")), t);
        assert_eq!(eval("this.isEmail()", s("a@b@c")), f);
        assert_eq!(eval("this.isHostname()", s("example.com")), t);
        assert_eq!(eval("this.isIp()", s("::1")), t);
        assert_eq!(eval("this.isIp(4)", s("::1")), f);
        assert_eq!(eval("this.isIpPrefix(4, true)", s("10.0.0.0/8")), t);
        assert_eq!(eval("this.isIpPrefix(true)", s("10.0.0.1/8")), f);
        assert_eq!(eval("this.isIpPrefix()", s("10.0.0.1/8")), t);
        assert_eq!(eval("this.isUri()", s("https://example.com/a?b#c")), t);
        assert_eq!(eval("this.isUriRef()", s("../a")), t);
        assert_eq!(eval("this.isHostAndPort(true)", s("example.com:80")), t);
        assert_eq!(eval("this.isHostAndPort(true)", s("example.com")), f);
        assert_eq!(eval("this.unique()", cel::Value::List(std::sync::Arc::new(vec![s("a"), s("b")]))), t);
        assert_eq!(eval("this.unique()", cel::Value::List(std::sync::Arc::new(vec![s("a"), s("a")]))), f);
        assert_eq!(eval("this.isNan()", cel::Value::Float(f64::NAN)), t);
        assert_eq!(eval("this.isInf(-1)", cel::Value::Float(f64::INFINITY)), f);
        assert_eq!(eval("this.isInf()", cel::Value::Float(f64::NEG_INFINITY)), t);
        let mut m = std::collections::HashMap::new();
        m.insert("name".to_string(), s("x"));
        assert_eq!(eval("getField(this, 'name') == 'x'", m.into()), t);
        assert_eq!(eval("'%s-%d'.format([this, 2]) == 'a-2'", s("a")), t);
        // Durations as the compiler writes them: exact to the nanosecond.
        assert_eq!(eval("duration('0s62998929ns') == duration('62998929ns')", s("")), t);
        assert_eq!(eval("duration('-1s500000000ns') < duration('-1s')", s("")), t);
        assert_eq!(eval("duration('0s62998929ns') > duration('0s62998928ns')", s("")), t);
    }
}
