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
//! Field paths and metadata keys are interned per method so the engine reads
//! each input once, however many rules test it.

use crate::rules::{Cond, CondSource, RuleDoc};
use prost_reflect::DescriptorPool;
use std::collections::HashMap;
use wirestub_plan as plan;

pub fn lower(pool: &DescriptorPool, descriptors: Vec<u8>, docs: Vec<RuleDoc>) -> plan::Plan {
    let mut by_method: HashMap<String, Vec<RuleDoc>> = HashMap::new();
    for doc in docs {
        by_method.entry(doc.method.full_name().to_string()).or_default().push(doc);
    }
    let mut methods = Vec::new();
    for service in pool.services() {
        for m in service.methods() {
            let docs = by_method.remove(m.full_name()).unwrap_or_default();
            methods.push(lower_method(&service, &m, docs));
        }
    }
    methods.sort_by(|a, b| a.path.cmp(&b.path));
    methods.dedup_by(|a, b| a.path == b.path);
    plan::Plan { descriptors, methods }
}

struct Entry {
    tier: u8,
    priority: i64,
    order: usize,
    conditions: Vec<plan::Condition>,
    response: u32,
    origin: String,
}

fn lower_method(
    service: &prost_reflect::ServiceDescriptor,
    m: &prost_reflect::MethodDescriptor,
    docs: Vec<RuleDoc>,
) -> plan::Method {
    let mut method = plan::Method {
        path: format!("/{}/{}", service.full_name(), m.name()),
        kind: plan::MethodKind::from_streaming(m.is_client_streaming(), m.is_server_streaming()),
        input_type: m.input().full_name().to_string(),
        output_type: m.output().full_name().to_string(),
        fields: Vec::new(),
        metadata_keys: Vec::new(),
        responses: Vec::new(),
        rules: Vec::new(),
    };
    let mut entries = Vec::new();
    let mut order = 0;
    for doc in docs {
        let gate: Vec<plan::Condition> = doc.gate.iter().map(|c| intern(&mut method, c)).collect();
        for r in doc.responses {
            order += 1;
            let response = method.responses.len() as u32;
            method.responses.push(r.response);
            match &r.when {
                Some(when) => {
                    let mut conditions = gate.clone();
                    conditions.extend(when.iter().map(|c| intern(&mut method, c)));
                    entries.push(Entry {
                        tier: 1,
                        priority: r.priority,
                        order,
                        conditions,
                        response,
                        origin: r.origin,
                    });
                }
                None => {
                    if !gate.is_empty() {
                        entries.push(Entry {
                            tier: 3,
                            priority: r.priority,
                            order,
                            conditions: Vec::new(),
                            response,
                            origin: r.origin.clone(),
                        });
                    }
                    entries.push(Entry {
                        tier: 2,
                        priority: r.priority,
                        order,
                        conditions: gate.clone(),
                        response,
                        origin: r.origin,
                    });
                }
            }
        }
    }
    entries.sort_by(|a, b| a.tier.cmp(&b.tier).then(b.priority.cmp(&a.priority)).then(a.order.cmp(&b.order)));
    method.rules = entries
        .into_iter()
        .map(|e| plan::Rule { conditions: e.conditions, response: e.response, priority: e.priority, origin: e.origin })
        .collect();
    method
}

fn intern(method: &mut plan::Method, c: &Cond) -> plan::Condition {
    let source = match &c.source {
        CondSource::Field(path) => {
            let i = match method.fields.iter().position(|f| f.numbers == path.numbers) {
                Some(i) => i,
                None => {
                    method.fields.push(path.clone());
                    method.fields.len() - 1
                }
            };
            plan::Source::Field(i as u32)
        }
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
    plan::Condition { source, op: plan::Op::Eq(c.value.clone()) }
}
