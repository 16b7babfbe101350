//! Request validation (`engine run --validation on`): the checks the
//! compiler made of the input message's `buf.validate` rules, evaluated
//! on the wire by the matcher before a rule is chosen, and the answer to
//! an invalid request: INVALID_ARGUMENT with every violation, as
//! `google.rpc.BadRequest` field violations and `buf.validate.Violations`
//! in `grpc-status-details-bin` (which Connect and gRPC-Web carry as their
//! error details).
//!
//! Cost: nothing with validation off (the default), nor for methods whose
//! input has no rules; otherwise one matcher test per rule, on the values
//! the request's single pass already read.

use crate::call::matcher::{Broken, Request};
use crate::served::{Prepared, ServedMethod};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::RwLock;
use wirestub_plan::Check;

static ENABLED: AtomicBool = AtomicBool::new(false);
/// Services validated or not whatever [`ENABLED`] says
/// (`--validation-for`).
static SERVICES: RwLock<Vec<(Box<str>, bool)>> = RwLock::new(Vec::new());
/// Which annotations count (`--validation-source`): 0 auto, 1
/// protovalidate, 2 protoc-gen-validate.
static SOURCE: AtomicU8 = AtomicU8::new(0);

/// Turns validation on or off, process-wide (`--validation`), and per
/// service (`--validation-for`). Set before the first call: each method
/// decides once.
pub fn set_enabled(on: bool, services: &[(Box<str>, bool)]) {
    ENABLED.store(on, Ordering::Relaxed);
    if let Ok(mut s) = SERVICES.write() {
        s.clear();
        s.extend_from_slice(services);
    }
}

/// Whether calls to the method at `path` (`/package.Service/Method`) are
/// validated, by the settings.
pub fn enabled_for(path: &str) -> bool {
    let service = path.strip_prefix('/').and_then(|p| p.split_once('/')).map_or("", |(s, _)| s);
    let listed = SERVICES.read().ok().and_then(|s| s.iter().find(|(n, _)| &**n == service).map(|(_, on)| *on));
    listed.unwrap_or_else(|| ENABLED.load(Ordering::Relaxed))
}

/// The settings as the admin status shows them: on or off, the services
/// set apart, the stream mode and the annotations read.
pub fn settings_json() -> serde_json::Value {
    let services: serde_json::Map<String, serde_json::Value> = SERVICES
        .read()
        .map(|s| s.iter().map(|(n, on)| (n.to_string(), serde_json::Value::from(*on))).collect())
        .unwrap_or_default();
    let source = match SOURCE.load(Ordering::Relaxed) {
        1 => "protovalidate",
        2 => "pgv",
        _ => "auto",
    };
    serde_json::json!({
        "enabled": ENABLED.load(Ordering::Relaxed),
        "services": services,
        "mode": if per_message() { "per-message" } else { "aggregate" },
        "source": source,
    })
}

static PER_MESSAGE: AtomicBool = AtomicBool::new(false);

/// How client streams are answered when a message is invalid
/// (`--validation-mode`): at once (`per-message`), or once the stream ends
/// with every invalid message's violations (`aggregate`).
pub fn set_per_message(on: bool) {
    PER_MESSAGE.store(on, Ordering::Relaxed);
}

/// Whether a client stream ends at its first invalid message.
pub fn per_message() -> bool {
    PER_MESSAGE.load(Ordering::Relaxed)
}

/// The answer for a request that broke `failed`.
pub fn invalid<'m>(method: &'m ServedMethod, failed: Vec<Broken>) -> crate::call::Answer<'m> {
    let rendered = Some(Box::new(invalid_answer(method, &failed)));
    crate::call::Answer {
        rendered,
        violations: Some(failed.into_boxed_slice()),
        ..crate::call::Answer::of(&method.no_match)
    }
}

/// Where rules come from (`--validation-source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleSource {
    /// protovalidate's rules where a method has any, else
    /// protoc-gen-validate's.
    Auto,
    Protovalidate,
    Pgv,
}

/// Sets where rules come from, process-wide.
pub fn set_source(source: RuleSource) {
    SOURCE.store(source as u8, Ordering::Relaxed);
}

/// Whether CEL rules (protovalidate's only) count under the rule source.
pub fn cel_counts() -> bool {
    SOURCE.load(Ordering::Relaxed) != 2
}

/// Which checks of `method` count under the rule source: protoc-gen-
/// validate's (true) or protovalidate's (false).
pub fn counts_pgv(method: &ServedMethod) -> bool {
    match SOURCE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        // Auto: protovalidate's where the method has any.
        _ => method.plan.checks.iter().all(|c| c.pgv),
    }
}

/// Whether calls to `method` are validated.
pub fn applies(method: &ServedMethod) -> bool {
    (!method.plan.checks.is_empty() || !method.plan.cel_checks.is_empty())
        && *method.validated.get_or_init(|| enabled_for(&method.plan.path))
}

/// The checks a request fails, as indices into the method's checks, at
/// most [`MAX_VIOLATIONS`].
pub fn violations(request: &Request<'_>) -> Result<Vec<Broken>, crate::codec::wire::Malformed> {
    request.failed_checks(MAX_VIOLATIONS)
}

/// The checks one message of a client stream fails (validated as it
/// arrives, so that no message is kept for it); appended to `failed` up
/// to [`MAX_VIOLATIONS`] in all.
pub fn check_stream_message(
    method: &ServedMethod,
    message: &[u8],
    failed: &mut Vec<Broken>,
) -> Result<(), crate::codec::wire::Malformed> {
    if !applies(method) || failed.len() >= MAX_VIOLATIONS {
        return Ok(());
    }
    let one = [message];
    let view = crate::call::matcher::Messages::one(&one);
    let none: [Option<Box<[u8]>>; 0] = [];
    let request = Request::read(method, &view, &none[..])?;
    for b in request.failed_checks(MAX_VIOLATIONS - failed.len())? {
        if !failed.contains(&b) {
            failed.push(b);
        }
    }
    Ok(())
}

/// The most violations one answer lists.
pub const MAX_VIOLATIONS: usize = 100;

/// The step of a check's path that is a repeated field read element by
/// element (its pick), if any.
fn element_step(method: &ServedMethod, c: &Check) -> Option<usize> {
    let wirestub_plan::Source::Field(f) = c.source else { return None };
    let f = method.plan.fields.get(f as usize)?;
    f.picks.iter().find(|p| !matches!(p.elem, wirestub_plan::Elem::Index(_))).map(|p| p.step as usize)
}

/// A field path as BadRequest names it: `user.name`, `tags[2]`, the
/// oneof's name.
fn field_text(path: &[(u32, String, u8)], element: Option<(usize, Subscript)>) -> String {
    let mut out = String::new();
    for (i, (_, name, _)) in path.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push_str(name);
        if let Some((_, sub)) = element.as_ref().filter(|(s, _)| *s == i) {
            match sub {
                Subscript::Index(at) => out.push_str(&format!("[{at}]")),
                Subscript::Key(wirestub_plan::Value::Bytes(k), _) => out.push_str(&format!("[{:?}]", key_text(k))),
                Subscript::Key(wirestub_plan::Value::I64(k), _) => out.push_str(&format!("[{k}]")),
                Subscript::Key(wirestub_plan::Value::U64(k), _) => out.push_str(&format!("[{k}]")),
                Subscript::Key(wirestub_plan::Value::Bool(k), _) => out.push_str(&format!("[{k}]")),
                Subscript::Key(wirestub_plan::Value::F64(k), _) => out.push_str(&format!("[{k}]")),
            }
        }
    }
    out
}

/// A violation as the answer shows it: field path, element (path step,
/// position), rule path, rule id, message.
type Shown<'a> = (&'a [(u32, String, u8)], Option<(usize, Subscript)>, &'a [(u32, String, u8)], &'a str, &'a str, bool);

/// How a violation names one element of a repeated field or map.
#[derive(Clone)]
enum Subscript {
    Index(u32),
    /// A map key of this type (`ScalarKind` number).
    Key(wirestub_plan::Value, u8),
}

/// Each violation of `failed` as (field path, element, rule path, rule
/// id, message, whether it is about a map key).
fn shown<'a>(method: &'a ServedMethod, failed: &'a [Broken]) -> Vec<Shown<'a>> {
    failed
        .iter()
        .filter_map(|b| {
            let wire = method.plan.checks.len();
            match method.plan.checks.get(b.check as usize) {
                Some(c) => {
                    let step = element_step(method, c);
                    let element = match (&b.key, b.element, c.map_key) {
                        (Some(k), _, Some(kind)) => step.map(|s| (s, Subscript::Key(k.clone(), kind as u8))),
                        (_, Some(at), _) => step.map(|s| (s, Subscript::Index(at))),
                        _ => None,
                    };
                    Some((&c.path[..], element, &c.rule[..], c.rule_id.as_str(), c.message.as_str(), c.for_key))
                }
                None => {
                    let c = method.plan.cel_checks.get(b.check as usize - wire)?;
                    let text = b.message.as_deref().unwrap_or(c.message.as_str());
                    // Inside elements: the element, by position or key.
                    let element = match (&b.key, b.element, c.each) {
                        (Some(k), _, Some((step, kind))) => Some((step as usize, Subscript::Key(k.clone(), kind))),
                        (_, Some(at), Some((step, _))) => Some((step as usize, Subscript::Index(at))),
                        _ => None,
                    };
                    Some((&c.path[..], element, &[][..], c.rule_id.as_str(), text, false))
                }
            }
        })
        .collect()
}

/// Each violation of `failed` as (field path, rule id, message), as the
/// journal shows it.
pub fn described(method: &ServedMethod, failed: &[Broken]) -> Vec<(String, String, String)> {
    shown(method, failed)
        .into_iter()
        .map(|(path, element, _, id, text, _)| (field_text(path, element), id.to_string(), text.to_string()))
        .collect()
}

/// The answer to an invalid request.
pub fn invalid_answer(method: &ServedMethod, failed: &[Broken]) -> Prepared {
    let checks = shown(method, failed);
    let mut message = String::from("validation error:");
    for (path, element, _, id, text, _) in &checks {
        match field_text(path, element.clone()) {
            // A rule of the whole message.
            field if field.is_empty() => message.push_str(&format!(" {text}")),
            field => message.push_str(&format!(" {field}: {text}")),
        }
        // A rule without an id shows none.
        match id.is_empty() {
            true => message.push(';'),
            false => message.push_str(&format!(" [{id}];")),
        }
    }
    message.pop();
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str(" …");
    }
    // google.rpc.BadRequest { field_violations: [{ field, description }] }
    let mut bad_request = Vec::new();
    // buf.validate.Violations { violations: [{ field, rule, rule_id, message }] }
    let mut violations = Vec::new();
    for (path, element, rule, id, text, for_key) in &checks {
        let mut fv = Vec::new();
        put_str(&mut fv, 1, &field_text(path, element.clone()));
        put_str(&mut fv, 2, text);
        put_bytes(&mut bad_request, 1, &fv);
        let mut v = Vec::new();
        if !path.is_empty() {
            put_bytes(&mut v, 5, &field_path(path, element.clone()));
        }
        if *for_key {
            put_varint_field(&mut v, 4, 1);
        }
        if !rule.is_empty() {
            put_bytes(&mut v, 6, &field_path(rule, None));
        }
        put_str(&mut v, 2, id);
        put_str(&mut v, 3, text);
        put_bytes(&mut violations, 1, &v);
    }
    // google.rpc.Status { code, message, details: [Any...] }
    let mut status = Vec::new();
    put_varint_field(&mut status, 1, 3);
    put_str(&mut status, 2, &message);
    for (type_url, value) in [
        ("type.googleapis.com/google.rpc.BadRequest", &bad_request),
        ("type.googleapis.com/buf.validate.Violations", &violations),
    ] {
        let mut any = Vec::new();
        put_str(&mut any, 1, type_url);
        put_bytes(&mut any, 2, value);
        put_bytes(&mut status, 3, &any);
    }
    use base64::Engine as _;
    let details = base64::engine::general_purpose::STANDARD_NO_PAD.encode(&status);
    let trailers = [("grpc-status-details-bin".to_string(), details.into_bytes())];
    crate::served::prepare(
        3,
        &wirestub_plan::percent_encode_message(&message),
        bytes::Bytes::new(),
        &[],
        &trailers,
        std::time::Duration::ZERO,
    )
}

/// A `buf.validate.FieldPath` of (number, name, type) steps; a step
/// without a number is a oneof, named only.
fn field_path(steps: &[(u32, String, u8)], element: Option<(usize, Subscript)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, (number, name, kind)) in steps.iter().enumerate() {
        let mut e = Vec::new();
        if *number != 0 {
            put_varint_field(&mut e, 1, *number as u64);
        }
        put_str(&mut e, 2, name);
        if *kind != 0 {
            put_varint_field(&mut e, 3, *kind as u64);
        }
        if let Some((_, sub)) = element.as_ref().filter(|(s, _)| *s == i) {
            match sub {
                Subscript::Index(at) => put_varint_field(&mut e, 6, *at as u64),
                Subscript::Key(k, kind) => {
                    put_varint_field(&mut e, 4, *kind as u64);
                    match k {
                        wirestub_plan::Value::Bool(b) => put_varint_field(&mut e, 7, *b as u64),
                        wirestub_plan::Value::I64(i) => put_varint_field(&mut e, 8, *i as u64),
                        wirestub_plan::Value::U64(u) => put_varint_field(&mut e, 9, *u),
                        wirestub_plan::Value::Bytes(b) => put_str(&mut e, 10, &key_text(b)),
                        wirestub_plan::Value::F64(_) => {}
                    }
                }
            }
        }
        put_bytes(&mut out, 1, &e);
    }
    out
}

/// A map key as a violation names it: text (invalid UTF-8 replaced), at
/// most [`MAX_KEY_TEXT`] bytes, so that a client's long key cannot swell
/// the answer.
fn key_text(k: &[u8]) -> String {
    let mut text = String::from_utf8_lossy(&k[..k.len().min(MAX_KEY_TEXT)]).into_owned();
    if k.len() > MAX_KEY_TEXT {
        text.push('…');
    }
    text
}

/// The most bytes of a map key a violation shows.
const MAX_KEY_TEXT: usize = 64;

/// The longest `grpc-message` of an invalid answer (the details list every
/// violation).
const MAX_MESSAGE: usize = 4 << 10;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_varint_field(out: &mut Vec<u8>, number: u32, v: u64) {
    put_varint(out, (number as u64) << 3);
    put_varint(out, v);
}

fn put_bytes(out: &mut Vec<u8>, number: u32, b: &[u8]) {
    put_varint(out, ((number as u64) << 3) | 2);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn put_str(out: &mut Vec<u8>, number: u32, s: &str) {
    put_bytes(out, number, s.as_bytes());
}
