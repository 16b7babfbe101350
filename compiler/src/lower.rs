//! Lowering: checked rule documents become the flat, ordered rule lists of
//! the plan.
//!
//! Selection follows Wishmock's documented order. Per method, the plan holds
//! one list evaluated first-match-wins, built in three tiers:
//!
//! 1. entries with `when`, of documents whose `match` gate holds: conditions
//!    are gate and `when` together, ordered by priority (highest first), ties
//!    to the earlier entry (files in path order, entries in file order);
//! 2. fallbacks (entries without `when`) of documents whose gate holds;
//! 3. fallbacks of documents whose gate does not hold, unconditionally: as in
//!    Wishmock, a failed gate still answers with the document's fallback.
//!
//! Field paths, metadata keys and regular expressions are interned per
//! method so the engine reads each input once, however many rules test it.
//!
//! Lowering also finds rules that can never answer because an earlier rule
//! in the order tests a subset of their conditions, and warns about them.

use crate::diag::{Diagnostic, Diagnostics, Span};
use crate::paths::{Cond, CondSource};
use crate::raw::RawDoc;
use crate::rules::{RuleDoc, SESSION_KEY};
use prost_reflect::DescriptorPool;
use std::collections::{HashMap, HashSet};
use wirestub_plan as plan;

/// `regexes` are the compiled DFAs of the expressions the documents'
/// conditions refer to (all compiled: lowering runs only without errors).
pub fn lower(
    pool: &DescriptorPool,
    descriptors: Vec<u8>,
    docs: Vec<RuleDoc>,
    raw: Vec<RawDoc>,
    regexes: &[Vec<u8>],
    files: &std::collections::BTreeMap<String, crate::protos::Text>,
    diags: &mut Diagnostics,
) -> plan::Plan {
    let mut by_method: HashMap<String, Vec<RuleDoc>> = HashMap::new();
    for doc in docs {
        by_method.entry(doc.method.full_name().to_string()).or_default().push(doc);
    }
    let mut raw_by_path: HashMap<String, Vec<RawDoc>> = HashMap::new();
    for doc in raw {
        match doc.typed() {
            // Described by the protos: a rule document like any, ordered
            // and checked for shadowing with the method's other rules.
            Some(typed) => by_method.entry(typed.method.full_name().to_string()).or_default().push(typed),
            None => raw_by_path.entry(doc.path.clone()).or_default().push(doc),
        }
    }
    let mut methods = Vec::new();
    let mut unenforced = crate::validation::Unenforced::default();
    for service in pool.services() {
        for m in service.methods() {
            let docs = by_method.remove(m.full_name()).unwrap_or_default();
            let mut method = lower_method(&service, &m, docs, regexes, diags);
            crate::validation::add_checks(&mut method, &m.input(), files, &mut unenforced, diags);
            if let Some(raw) = raw_by_path.remove(&method.path) {
                add_raw(&mut method, raw);
            }
            methods.push(method);
        }
    }
    unenforced.report(diags);
    // Methods only recordings describe: served from their bytes, untyped.
    let mut untyped: Vec<(String, Vec<RawDoc>)> = raw_by_path.into_iter().collect();
    untyped.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, docs) in untyped {
        // Recordings see counts, not the shape: the method streams on each
        // side any of them saw streaming.
        let (client, server) =
            docs.iter().map(|d| crate::raw::streaming(d.kind)).fold((false, false), |a, b| (a.0 || b.0, a.1 || b.1));
        let kind = plan::MethodKind::from_streaming(client, server);
        let mut method = empty_method(path, kind, String::new(), String::new());
        add_raw(&mut method, docs);
        methods.push(method);
    }
    methods.sort_by(|a, b| a.path.cmp(&b.path));
    methods.dedup_by(|a, b| a.path == b.path);
    plan::Plan { descriptors, methods }
}

struct Entry {
    /// Written for a test session.
    scoped: bool,
    tier: u8,
    priority: i64,
    order: usize,
    conditions: Vec<plan::Condition>,
    response: u32,
    origin: String,
    span: Span,
    skip_validation: bool,
}

fn lower_method(
    service: &prost_reflect::ServiceDescriptor,
    m: &prost_reflect::MethodDescriptor,
    docs: Vec<RuleDoc>,
    regexes: &[Vec<u8>],
    diags: &mut Diagnostics,
) -> plan::Method {
    let mut method = empty_method(
        format!("/{}/{}", service.full_name(), m.name()),
        plan::MethodKind::from_streaming(m.is_client_streaming(), m.is_server_streaming()),
        m.input().full_name().to_string(),
        m.output().full_name().to_string(),
    );
    method.duplex = docs.iter().any(|d| d.duplex);
    if let Some(aggregate) = docs.iter().find(|d| !d.duplex).filter(|_| method.duplex) {
        let span = aggregate.responses.first().map(|r| r.span.clone());
        diags.push(
            Diagnostic::error(span, format!("rule documents for {} disagree on `mode`", m.full_name()))
                .with_help("a bidirectional method is either duplex or aggregate; give every document the same `mode`"),
        );
    }
    let mut regex_index = HashMap::new();
    let mut entries = Vec::new();
    let mut order = 0;
    for doc in docs {
        let mut intern = |method: &mut plan::Method, c: &Cond| intern(method, &mut regex_index, regexes, c);
        let gate: Vec<plan::Condition> = doc.gate.iter().map(|c| intern(&mut method, c)).collect();
        // A session's rules all need the call to name it, fallbacks too.
        let session: Vec<plan::Condition> = doc
            .session
            .iter()
            .map(|s| {
                let test = plan::Test::Op(plan::Op::Eq(plan::Value::Bytes(s.as_bytes().to_vec())));
                intern(&mut method, &Cond { source: CondSource::Metadata(SESSION_KEY.to_string()), test })
            })
            .collect();
        let scoped = !session.is_empty();
        let with_session = |mut conditions: Vec<plan::Condition>| {
            conditions.splice(0..0, session.iter().cloned());
            conditions
        };
        for mut r in doc.responses {
            order += 1;
            let response = method.responses.len() as u32;
            // Template expressions read through the method's interned inputs.
            let refs: Vec<plan::Source> = r
                .template_refs
                .iter()
                .map(|source| {
                    intern(&mut method, &Cond { source: source.clone(), test: plan::Test::Op(plan::Op::Exists) }).source
                })
                .collect();
            for (_, t) in &mut r.response.templates {
                remap_template(&mut t.pieces, &refs);
            }
            for t in &mut r.response.metadata_templates {
                let mut piece = [plan::Piece::Text { key: Vec::new(), parts: std::mem::take(&mut t.parts) }];
                remap_template(&mut piece, &refs);
                let [plan::Piece::Text { parts, .. }] = piece else { unreachable!("one text piece") };
                t.parts = parts;
            }
            method.responses.push(r.response);
            match &r.when {
                Some(when) => {
                    let mut conditions = gate.clone();
                    conditions.extend(when.iter().map(|c| intern(&mut method, c)));
                    entries.push(Entry {
                        scoped,
                        tier: 1,
                        priority: r.priority,
                        order,
                        conditions: with_session(conditions),
                        response,
                        origin: r.origin,
                        span: r.span,
                        skip_validation: r.skip_validation,
                    });
                }
                None => {
                    if !gate.is_empty() {
                        entries.push(Entry {
                            scoped,
                            tier: 3,
                            priority: r.priority,
                            order,
                            conditions: with_session(Vec::new()),
                            response,
                            origin: r.origin.clone(),
                            span: r.span.clone(),
                            skip_validation: r.skip_validation,
                        });
                    }
                    entries.push(Entry {
                        scoped,
                        tier: 2,
                        priority: r.priority,
                        order,
                        conditions: with_session(gate.clone()),
                        response,
                        origin: r.origin,
                        span: r.span,
                        skip_validation: r.skip_validation,
                    });
                }
            }
        }
    }
    // A session's rules first (they answer only its calls), then by tier,
    // priority and the order written.
    // `times` is counted per test session: the engine reads the call's.
    if method.responses.iter().any(|r| r.times > 0) && !method.metadata_keys.iter().any(|k| k == SESSION_KEY) {
        method.metadata_keys.push(SESSION_KEY.to_string());
    }
    entries.sort_by(|a, b| {
        (b.scoped.cmp(&a.scoped))
            .then(a.tier.cmp(&b.tier))
            .then(b.priority.cmp(&a.priority))
            .then(a.order.cmp(&b.order))
    });
    warn_shadowed(&method, &entries, diags);
    method.rules = entries
        .into_iter()
        .map(|e| plan::Rule {
            conditions: e.conditions,
            response: e.response,
            priority: e.priority,
            origin: e.origin,
            raw: None,
            skip_validation: e.skip_validation,
        })
        .collect();
    method
}

/// Appends the recordings of a method the protos do not describe as raw
/// rules (those of described methods are typed rule documents, see
/// `RawDoc::typed`). Each raw rule's
/// conditions are the staged match: the call's test session, then, over
/// the metadata names any recording of the method carried, exactly the
/// recorded ones present; the recorded content type (protocol); the
/// recorded compression, when one was. The engine then compares messages.
fn add_raw(method: &mut plan::Method, mut docs: Vec<RawDoc>) {
    // A session's recordings first, as for typed rules.
    docs.sort_by_key(|d| d.session.is_none());
    let mut names: Vec<String> =
        docs.iter().flat_map(|d| d.entries.iter().flat_map(|e| e.request.metadata_keys.iter().cloned())).collect();
    names.sort();
    names.dedup();
    let mut regex_index = HashMap::new();
    let op = |op: plan::Op| plan::Test::Op(op);
    let bytes = |s: &str| plan::Value::Bytes(s.as_bytes().to_vec());
    for doc in docs {
        for e in doc.entries {
            let mut conds = Vec::new();
            if let Some(s) = &doc.session {
                conds.push(Cond { source: CondSource::Metadata(SESSION_KEY.into()), test: op(plan::Op::Eq(bytes(s))) });
            }
            for name in &names {
                let test = match e.request.metadata_keys.binary_search(name) {
                    Ok(_) => op(plan::Op::Exists),
                    Err(_) => plan::Test::Not(Box::new(op(plan::Op::Exists))),
                };
                conds.push(Cond { source: CondSource::Metadata(name.clone()), test });
            }
            let types = crate::raw::content_type_aliases(&e.request.content_type);
            conds.push(Cond {
                source: CondSource::Metadata("content-type".into()),
                test: op(plan::Op::In(types.iter().map(|t| bytes(t)).collect())),
            });
            if !e.request.encoding.is_empty() {
                conds.push(Cond {
                    source: CondSource::Metadata("grpc-encoding".into()),
                    test: op(plan::Op::Eq(bytes(&e.request.encoding))),
                });
            }
            let conditions = conds.iter().map(|c| intern(method, &mut regex_index, &[], c)).collect();
            let response = method.responses.len() as u32;
            method.responses.push(e.response);
            method.rules.push(plan::Rule {
                conditions,
                response,
                priority: 0,
                origin: e.origin,
                raw: Some(Box::new(e.request)),
                skip_validation: false,
            });
        }
    }
    if method.responses.iter().any(|r| r.times > 0) && !method.metadata_keys.iter().any(|k| k == SESSION_KEY) {
        method.metadata_keys.push(SESSION_KEY.to_string());
    }
}

/// A method with no rules yet.
fn empty_method(path: String, kind: plan::MethodKind, input_type: String, output_type: String) -> plan::Method {
    plan::Method {
        path,
        kind,
        input_type,
        output_type,
        fields: Vec::new(),
        metadata_keys: Vec::new(),
        responses: Vec::new(),
        rules: Vec::new(),
        regexes: Vec::new(),
        duplex: false,
        checks: Vec::new(),
        cel_checks: Vec::new(),
    }
}

fn intern(
    method: &mut plan::Method,
    regex_index: &mut HashMap<u32, u32>,
    regexes: &[Vec<u8>],
    c: &Cond,
) -> plan::Condition {
    let source = match &c.source {
        CondSource::Field(path) => plan::Source::Field(method.intern_field(path)),
        CondSource::Metadata(key) => {
            let i = match method.metadata_keys.iter().position(|k| k == key) {
                Some(i) => i,
                None => {
                    method.metadata_keys.push(key.clone());
                    method.metadata_keys.len() - 1
                }
            };
            plan::Source::Metadata(i as u32)
        }
    };
    let mut test = c.test.clone();
    remap_regexes(&mut test, &mut |global| {
        *regex_index.entry(global).or_insert_with(|| {
            method.regexes.push(regexes[global as usize].clone());
            method.regexes.len() as u32 - 1
        })
    });
    plan::Condition { source, test }
}

/// Points template expressions at the method's interned fields and keys.
fn remap_template(pieces: &mut [plan::Piece], refs: &[plan::Source]) {
    fn expr(e: &mut plan::Expr, refs: &[plan::Source]) {
        match e {
            plan::Expr::Field(i) => {
                *e = match refs[*i as usize] {
                    plan::Source::Field(f) => plan::Expr::Field(f),
                    plan::Source::Metadata(k) => plan::Expr::Metadata(k),
                }
            }
            plan::Expr::EnumName(i, _) | plan::Expr::Aggregate(i, _) => {
                if let plan::Source::Field(f) = refs[*i as usize] {
                    *i = f;
                }
            }
            plan::Expr::Format(_, args) => args.iter_mut().for_each(|a| expr(a, refs)),
            plan::Expr::Arith(l, _, r) => {
                expr(l, refs);
                expr(r, refs);
            }
            plan::Expr::Fill(n, _) => expr(n, refs),
            _ => {}
        }
    }
    for p in pieces {
        match p {
            plan::Piece::Bytes(_) => {}
            plan::Piece::Nested { pieces, .. } => remap_template(pieces, refs),
            plan::Piece::Text { parts, .. } | plan::Piece::Number { parts, .. } => {
                for part in parts {
                    if let plan::Part::Expr(e) = part {
                        expr(e, refs);
                    }
                }
            }
        }
    }
}

/// Rewrites compiler-wide regex indices into per-method ones.
fn remap_regexes(test: &mut plan::Test, map: &mut dyn FnMut(u32) -> u32) {
    match test {
        plan::Test::Op(plan::Op::Regex(i)) => *i = map(*i),
        plan::Test::Op(plan::Op::Len(t) | plan::Op::Chars(t)) | plan::Test::Not(t) => remap_regexes(t, map),
        plan::Test::Any(list) | plan::Test::All(list) => list.iter_mut().for_each(|t| remap_regexes(t, map)),
        plan::Test::Op(_) => {}
    }
}

/// Warns about entries that can never answer: an earlier entry tests a
/// subset of their conditions, so it always holds first. Subsets are checked
/// exhaustively for up to 8 conditions (enough for any hand-written rule),
/// so the cost stays linear in the number of rules.
fn warn_shadowed(method: &plan::Method, entries: &[Entry], diags: &mut Diagnostics) {
    // A condition's identity: its source (interned, so equal sources have
    // equal indices) and a hash of its test. Hashing rather than rendering
    // keeps this cheap for methods with thousands of rules.
    let key = |c: &plan::Condition| -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        c.source.hash(&mut h);
        hash_test(&c.test, &mut h);
        h.finish()
    };
    let mut seen: HashMap<Vec<u64>, usize> = HashMap::new();
    let mut warned = HashSet::new();
    for (i, e) in entries.iter().enumerate() {
        // A response limited by `times` stops answering, so it shadows
        // nothing for good.
        let limited = method.responses[e.response as usize].times > 0;
        let mut keys: Vec<u64> = e.conditions.iter().map(key).collect();
        keys.sort_unstable();
        keys.dedup();
        if keys.len() <= 8 {
            let shadow = (0u32..1 << keys.len()).find_map(|mask| {
                let subset: Vec<u64> =
                    keys.iter().enumerate().filter(|(b, _)| mask & (1 << b) != 0).map(|(_, k)| *k).collect();
                seen.get(&subset).copied()
            });
            if let Some(j) = shadow {
                let first = &entries[j];
                // Tier-3 copies of a document's own fallbacks are expected.
                if first.origin != e.origin && warned.insert(e.origin.clone()) {
                    diags.push(
                        Diagnostic::warning(
                            Some(e.span.clone()),
                            format!("this response can never be chosen for {}", &method.path[1..]),
                        )
                        .with_help(format!(
                            "the rule at {} tests a subset of its conditions and comes first (higher priority or earlier)",
                            first.origin
                        )),
                    );
                }
            }
        }
        if !limited {
            seen.entry(keys).or_insert(i);
        }
    }
}

/// Feeds a test into a hasher (floats by their bits).
fn hash_test(t: &plan::Test, h: &mut impl std::hash::Hasher) {
    use std::hash::Hash;
    fn value(v: &plan::Value, h: &mut impl std::hash::Hasher) {
        match v {
            plan::Value::I64(x) => (0u8, *x).hash(h),
            plan::Value::U64(x) => (1u8, *x).hash(h),
            plan::Value::F64(x) => (2u8, x.to_bits()).hash(h),
            plan::Value::Bool(x) => (3u8, *x).hash(h),
            plan::Value::Bytes(x) => (4u8, x).hash(h),
        }
    }
    match t {
        plan::Test::Op(op) => {
            0u8.hash(h);
            op.name().hash(h);
            match op {
                plan::Op::Eq(v) | plan::Op::Gt(v) | plan::Op::Gte(v) | plan::Op::Lt(v) | plan::Op::Lte(v) => {
                    value(v, h)
                }
                plan::Op::Contains(v) => value(v, h),
                plan::Op::In(vs) => vs.iter().for_each(|v| value(v, h)),
                plan::Op::Prefix(b) | plan::Op::Suffix(b) => b.hash(h),
                plan::Op::Regex(i) => i.hash(h),
                plan::Op::Len(inner) | plan::Op::Chars(inner) => hash_test(inner, h),
                plan::Op::Format(f) => (*f as u8).hash(h),
                plan::Op::Unique => {}
                plan::Op::Exists => {}
            }
        }
        plan::Test::Not(inner) => {
            1u8.hash(h);
            hash_test(inner, h);
        }
        plan::Test::Any(list) => {
            2u8.hash(h);
            list.len().hash(h);
            list.iter().for_each(|t| hash_test(t, h));
        }
        plan::Test::All(list) => {
            3u8.hash(h);
            list.len().hash(h);
            list.iter().for_each(|t| hash_test(t, h));
        }
    }
}
