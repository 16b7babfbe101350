//! A readable, stable text rendering of a plan, used by `compiler dump` and by
//! golden tests (which compare this text rather than raw bytes).

use crate::*;
use std::fmt::Write;

pub(crate) fn escape_bytes(bytes: &[u8]) -> String {
    let mut s = String::from("b\"");
    for &b in bytes {
        match b {
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(b as char),
            _ => {
                let _ = write!(s, "\\x{b:02x}");
            }
        }
    }
    s.push('"');
    s
}

fn value(v: &Value) -> String {
    match v {
        Value::I64(x) => x.to_string(),
        Value::U64(x) => format!("{x}u"),
        Value::F64(x) => format!("{x:?}"),
        Value::Bool(x) => x.to_string(),
        Value::Bytes(x) => escape_bytes(x),
    }
}

fn test(t: &Test) -> String {
    let list = |l: &[Test], sep: &str| l.iter().map(|t| format!("({})", test(t))).collect::<Vec<_>>().join(sep);
    match t {
        Test::Op(op) => match op {
            Op::Eq(v) => format!("== {}", value(v)),
            Op::In(vs) => format!("in [{}]", vs.iter().map(value).collect::<Vec<_>>().join(", ")),
            Op::Gt(v) => format!("> {}", value(v)),
            Op::Gte(v) => format!(">= {}", value(v)),
            Op::Lt(v) => format!("< {}", value(v)),
            Op::Lte(v) => format!("<= {}", value(v)),
            Op::Exists => "exists".to_string(),
            Op::Contains(v) => format!("contains {}", value(v)),
            Op::Prefix(b) => format!("prefix {}", escape_bytes(b)),
            Op::Suffix(b) => format!("suffix {}", escape_bytes(b)),
            Op::Regex(i) => format!("matches regex#{i}"),
            Op::Len(t) => format!("len {}", test(t)),
            Op::Chars(t) => format!("chars {}", test(t)),
            Op::Format(f) => format!("is {f:?}"),
            Op::Unique => "unique".to_string(),
        },
        Test::Not(t) => format!("not ({})", test(t)),
        Test::Any(l) => format!("any of {}", list(l, " | ")),
        Test::All(l) => format!("all of {}", list(l, " & ")),
    }
}

pub(crate) fn dump(plan: &Plan, body: &dyn Fn(&Method, &[u8]) -> String) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "descriptors: {} bytes", plan.descriptors.len());
    let _ = writeln!(s, "methods: {}", plan.methods.len());
    for m in &plan.methods {
        let duplex = if m.duplex { ", duplex" } else { "" };
        let _ = writeln!(s, "\nmethod {} ({}{duplex}) {} -> {}", m.path, m.kind.name(), m.input_type, m.output_type);
        for (i, f) in m.fields.iter().enumerate() {
            let nums: Vec<String> = f.numbers.iter().map(|n| n.to_string()).collect();
            let shape = match &f.shape {
                Shape::Singular => String::new(),
                Shape::Repeated => " repeated".to_string(),
                Shape::MapValue { key, .. } => format!(" map value at key {}", value(key)),
                Shape::OneofCase { members } => format!(" oneof case of {members:?}"),
            };
            let shape = match f.message {
                MessageSel::Single => shape,
                MessageSel::First => format!("{shape} of the first message"),
                MessageSel::Last => format!("{shape} of the last message"),
                MessageSel::Nth(n) => format!("{shape} of message {n}"),
                MessageSel::Count => " (number of messages)".to_string(),
                MessageSel::Each => format!("{shape} of every message"),
            };
            let _ = writeln!(
                s,
                "  field#{i} {} = [{}] {}{shape} (default {})",
                f.name,
                nums.join("."),
                f.kind.name(),
                value(&f.default)
            );
        }
        for (i, k) in m.metadata_keys.iter().enumerate() {
            let _ = writeln!(s, "  metadata#{i} {k}");
        }
        for (i, r) in m.rules.iter().enumerate() {
            let _ = writeln!(s, "  rule#{i} priority {} from {} -> response#{}", r.priority, r.origin, r.response);
            for c in &r.conditions {
                let src = match c.source {
                    Source::Field(i) => format!("request.{}", m.fields[i as usize].name),
                    Source::Metadata(i) => format!("metadata.{}", m.metadata_keys[i as usize]),
                };
                let _ = writeln!(s, "    {src} {}", test(&c.test));
            }
            if r.skip_validation {
                let _ = writeln!(s, "    answers invalid requests too (validate: false)");
            }
            if let Some(raw) = &r.raw {
                let messages: Vec<String> = raw.messages.iter().map(|m| escape_bytes(m)).collect();
                let _ = writeln!(
                    s,
                    "    recorded {} metadata [{}] content-type {:?} encoding {:?} messages [{}]",
                    raw.messages.len(),
                    raw.metadata_keys.join(", "),
                    raw.content_type,
                    raw.encoding,
                    messages.join(", ")
                );
            }
        }
        for (i, c) in m.checks.iter().enumerate() {
            let src = match c.source {
                Source::Field(f) => format!("request.{}", m.fields[f as usize].name),
                Source::Metadata(k) => format!("metadata.{}", m.metadata_keys[k as usize]),
            };
            let guards: Vec<String> =
                c.guards.iter().map(|g| format!("request.{}", m.fields[*g as usize].name)).collect();
            let when = if guards.is_empty() { String::new() } else { format!(" when {} set", guards.join(", ")) };
            let _ = writeln!(s, "  check#{i} {} [{}]{when}: {src} {}", c.message, c.rule_id, test(&c.test));
        }
        for (i, r) in m.regexes.iter().enumerate() {
            let _ = writeln!(s, "  regex#{i} ({} bytes of DFA)", r.len());
        }
        for (i, r) in m.responses.iter().enumerate() {
            let _ = write!(s, "  response#{i} status {} ({})", r.status, STATUS_NAMES[r.status as usize]);
            if !r.message.is_empty() {
                let _ = write!(s, " message {:?}", r.message);
            }
            match r.latency {
                Latency::Fixed if r.delay_ms > 0 => {
                    let _ = write!(s, " delay {}ms", r.delay_ms);
                }
                Latency::Fixed => {}
                Latency::Uniform { min, max } => {
                    let _ = write!(s, " delay uniform {min}..{max}ms");
                }
                Latency::Normal { mean, stddev } => {
                    let _ = write!(s, " delay normal mean {mean}ms stddev {stddev}ms");
                }
                Latency::LogNormal { median, p99 } => {
                    let _ = write!(s, " delay log-normal median {median}ms p99 {p99}ms");
                }
            }
            if r.times > 0 {
                let _ = write!(s, " at most {} times", r.times);
            }
            if let Some(f) = &r.fault {
                let what = if f.drop { "reset".to_string() } else { STATUS_NAMES[f.status as usize].to_string() };
                let _ = write!(s, " fault {what} at rate {}", f.rate);
            }
            let _ = writeln!(s);
            if !r.body.is_empty() {
                let _ = writeln!(s, "    body ({} bytes framed) {}", r.body.len(), body(m, &r.body[5..]));
            }
            if !r.stream.is_empty() {
                let repeat = match r.stream_repeat {
                    0 => "until cancelled".to_string(),
                    1 => "once".to_string(),
                    n => format!("{n} times"),
                };
                let order = if r.stream_random_order { ", shuffled" } else { "" };
                let _ = writeln!(
                    s,
                    "    stream of {} every {}ms, {repeat}{order}{}",
                    r.stream.len(),
                    r.stream_delay_ms,
                    if r.error_after > 0 { format!(", error after {}", r.error_after) } else { String::new() }
                );
                for item in &r.stream {
                    let _ = writeln!(s, "      item {}", body(m, &item[5..]));
                }
            }
            for (k, v) in &r.headers {
                let _ = writeln!(s, "    header {k}: {}", String::from_utf8_lossy(v));
            }
            for (k, v) in &r.trailers {
                let _ = writeln!(s, "    trailer {k}: {}", String::from_utf8_lossy(v));
            }
        }
    }
    s
}
