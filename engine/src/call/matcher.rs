//! Rule evaluation on the request path: reads the inputs the method's rules
//! test straight from the wire bytes and the metadata, and returns the first
//! rule (in plan order) whose conditions all hold.
//!
//! Singular fields are read in one pass up front; repeated fields, map
//! entries and oneof cases are read only when a rule being evaluated needs
//! them. When the method has an index (see [`crate::served::Index`]), only
//! the rules that can match the indexed value, plus the rules that do not
//! test it, are evaluated, so the cost does not grow with the number of
//! rules keyed on distinct values. No allocation for methods testing up to
//! 16 fields and 8 metadata keys.

use crate::call::picks::{self, Fold, Leaf};
use crate::codec::wire::{self, Malformed, PathSpec, Raw, ValueRef};
use crate::served::{IndexKey, ServedMethod};
use http::HeaderMap;

/// The rule that came closest to answering an unmatched call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closest {
    /// Index into the method's plan rules.
    pub rule: u32,
    /// Index of the first condition of that rule that failed.
    pub failed: u32,
    /// How many of its conditions held.
    pub held: u32,
}

/// Where a request's metadata comes from: an `http` header map (the h2
/// stack) or the values the native stack kept for the method's keys.
pub trait Metadata {
    /// The value of the method's `index`th metadata key, named `key`.
    fn value(&self, index: usize, key: &str) -> Option<&[u8]>;
}

impl Metadata for HeaderMap {
    fn value(&self, _: usize, key: &str) -> Option<&[u8]> {
        let value = self.get(key).or_else(|| match key {
            // GripMock's session header reads as wirestub's.
            wirestub_plan::SESSION_KEY => self.get(wirestub_plan::SESSION_ALIAS),
            _ => None,
        });
        value.map(|v| v.as_bytes())
    }
}

/// Values in the order of the method's metadata keys.
impl Metadata for [Option<Box<[u8]>>] {
    fn value(&self, index: usize, _: &str) -> Option<&[u8]> {
        self.get(index)?.as_deref()
    }
}
use regex_automata::dfa::Automaton;
use smallvec::SmallVec;
use std::cell::OnceCell;
use wirestub_plan::{Agg, Elem, FieldPath, MessageSel, Op, Shape, Source, Test, Value};

/// A value read on first use: the raw value if present, or why the message
/// could not be read.
type Lazy<'a> = OnceCell<Result<Option<Raw<'a>>, Malformed>>;

/// Everything read from one request, lazily where reading costs a scan;
/// rules and then templates read from it.
pub struct Request<'a> {
    method: &'a ServedMethod,
    /// The request messages the rules see.
    messages: &'a Messages<'a>,
    /// Last value of each singular field (None where absent or not singular).
    singular: SmallVec<[Option<Raw<'a>>; 16]>,
    /// Map values and oneof cases, read on first use.
    lazy: SmallVec<[Lazy<'a>; 16]>,
    metadata: SmallVec<[Option<&'a [u8]>; 8]>,
    /// For inputs with a literal automaton: which of its literals occur,
    /// found in one pass on first use.
    literal_hits: SmallVec<[OnceCell<Vec<bool>>; 16]>,
    /// When a recording answered a call that was not identical to it: how
    /// similar they were.
    similarity: std::cell::Cell<Option<f32>>,
    /// The request failed validation: only rules marked `validate: false`
    /// may answer it.
    invalid: std::cell::Cell<bool>,
    /// Rules limited by `times` are not claimed here but collected, for a
    /// claim in the shared store (see [`Request::defer_claims`]).
    defer: std::cell::Cell<bool>,
    deferred: std::cell::RefCell<SmallVec<[u32; 2]>>,
}

/// The request messages of a call as the rules see them: the one message of
/// a unary or server-streaming call (or of one step of a duplex call), or,
/// for a client stream, the messages rules can name (the first ones, up to
/// the highest `items.N` used), the last one, and how many came.
#[derive(Debug, Clone, Copy)]
pub struct Messages<'a> {
    pub head: &'a [&'a [u8]],
    pub last: Option<&'a [u8]>,
    pub count: usize,
    /// The aggregates of the paths that read every message of the stream,
    /// folded as the messages arrived, in the order of
    /// [`ServedMethod::each`]; `Err` if one of the messages was malformed.
    pub folds: &'a [Result<Fold, Malformed>],
    /// The validation checks the stream's messages failed as they came
    /// (see [`crate::call::validate::check_stream_message`]).
    pub violations: &'a [Broken],
}

/// A validation check a request broke, and for a check on every element
/// of a repeated field, which element (from 0). Checks past the method's
/// wire checks are its CEL rules (`check - checks.len()`), which say
/// their own message.
#[derive(Debug, Clone, PartialEq)]
pub struct Broken {
    pub check: u32,
    pub element: Option<u32>,
    /// For a rule on a map's keys or values: the entry's key.
    pub key: Option<Value>,
    pub message: Option<Box<str>>,
}

/// A value read from the wire, owned.
fn owned(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::I64(x) => Value::I64(x),
        ValueRef::U64(x) => Value::U64(x),
        ValueRef::F64(x) => Value::F64(x),
        ValueRef::Bool(x) => Value::Bool(x),
        ValueRef::Bytes(b) => Value::Bytes(b.to_vec()),
    }
}

impl<'a> Messages<'a> {
    /// The view of a call with exactly one request message.
    pub fn one(message: &'a [&'a [u8]; 1]) -> Self {
        Messages { head: message, last: None, count: 1, folds: &[], violations: &[] }
    }
}

/// Picks the response for a call: `Ok(Some(index))` into the method's
/// responses, `Ok(None)` if no rule matches, `Err` if a request message is
/// malformed where the rules had to read it.
pub fn select<'a>(
    method: &'a ServedMethod,
    messages: &'a Messages<'a>,
    headers: &'a (impl Metadata + ?Sized),
) -> Result<Option<u32>, Malformed> {
    Request::read(method, messages, headers)?.select()
}

impl<'a> Request<'a> {
    /// Reads the singular fields the method's rules and templates use, in
    /// one pass per message; everything else is read on first use.
    pub fn read(
        method: &'a ServedMethod,
        messages: &'a Messages<'a>,
        headers: &'a (impl Metadata + ?Sized),
    ) -> Result<Request<'a>, Malformed> {
        let plan = &method.plan;
        let mut singular: SmallVec<[Option<Raw<'_>>; 16]> = SmallVec::from_elem(None, plan.fields.len());
        let groups = match crate::call::validate::applies(method) {
            true => &method.singular,
            false => &method.singular_rules,
        };
        for (sel, fields) in groups {
            let Some(message) = message_of(messages, *sel) else { continue };
            let paths: SmallVec<[PathSpec<'_>; 16]> = fields
                .iter()
                .map(|&i| {
                    let f = &plan.fields[i as usize];
                    PathSpec { numbers: &f.numbers, wire_type: f.kind.wire_type() }
                })
                .collect();
            let mut found: SmallVec<[Option<Raw<'_>>; 16]> = SmallVec::from_elem(None, paths.len());
            wire::extract(message, &paths, &mut found)?;
            for (slot, &i) in found.into_iter().zip(fields) {
                singular[i as usize] = slot;
            }
        }
        Ok(Request {
            method,
            messages,
            singular,
            lazy: (0..plan.fields.len()).map(|_| OnceCell::new()).collect(),
            metadata: plan.metadata_keys.iter().enumerate().map(|(i, k)| headers.value(i, k)).collect(),
            literal_hits: (0..method.literals.len()).map(|_| OnceCell::new()).collect(),
            similarity: std::cell::Cell::new(None),
            invalid: std::cell::Cell::new(false),
            defer: std::cell::Cell::new(false),
            deferred: std::cell::RefCell::new(SmallVec::new()),
        })
    }

    /// The validation checks of the method the request fails (indices
    /// into its checks, at most `max`); from then on only rules marked
    /// `validate: false` may answer it.
    pub fn failed_checks(&self, max: usize) -> Result<Vec<Broken>, Malformed> {
        let mut failed = Vec::new();
        let pgv = crate::call::validate::counts_pgv(self.method);
        for (i, c) in self.method.plan.checks.iter().enumerate() {
            if c.pgv != pgv {
                continue;
            }
            let mut applies = true;
            for &g in &c.guards {
                if !self.scalar(Source::Field(g))?.1 {
                    applies = false;
                    break;
                }
            }
            if !applies || self.condition(c.source, &c.test)? {
                continue;
            }
            let check = i as u32;
            let f = match c.source {
                Source::Field(f) => &self.method.plan.fields[f as usize],
                Source::Metadata(_) => continue,
            };
            if f.quantifier().is_some() {
                // Every element that breaks it, by position.
                let message = message_of(self.messages, f.message).unwrap_or_default();
                let mut at = 0u32;
                let mut broken = Vec::new();
                picks::leaves(f, message, &mut |leaf| {
                    if !self.leaf(f, leaf, &c.test)? {
                        // A map entry is named by its key (absent: the default).
                        let key = match (c.map_key, leaf) {
                            (Some(kind), Leaf::Message(entry, _)) => {
                                let mut found = [None];
                                wire::extract(
                                    entry,
                                    &[PathSpec { numbers: &[1], wire_type: kind.wire_type() }],
                                    &mut found,
                                )?;
                                Some(match found[0] {
                                    Some(raw) => owned(wire::normalize(raw, kind)),
                                    None => default_key_of(kind),
                                })
                            }
                            _ => None,
                        };
                        let element = if key.is_some() { None } else { Some(at) };
                        broken.push(Broken { check, element, key, message: None });
                    }
                    at += 1;
                    Ok(failed.len() + broken.len() < max)
                })?;
                failed.extend(broken);
            } else {
                failed.push(Broken { check, element: None, key: None, message: None });
            }
            if failed.len() >= max {
                failed.truncate(max);
                break;
            }
        }
        // Rules written in CEL, on the decoded message.
        let plan = &self.method.plan;
        if failed.len() < max && !plan.cel_checks.is_empty() && crate::call::validate::cel_counts() {
            if let Some(message) = message_of(self.messages, MessageSel::Single) {
                let base = plan.checks.len() as u32;
                for b in crate::call::cel_rules::failures(self.method, message, max - failed.len()) {
                    let message = Some(b.message.into());
                    failed.push(Broken { check: base + b.check, element: b.element, key: b.key, message });
                }
            }
        }
        self.invalid.set(!failed.is_empty());
        Ok(failed)
    }

    /// Marks the request invalid (its messages failed validation as they
    /// came): only rules marked `validate: false` may answer it.
    pub fn mark_invalid(&self, invalid: bool) {
        self.invalid.set(invalid);
    }

    /// The first rule (in plan order) whose conditions all hold.
    pub fn select(&self) -> Result<Option<u32>, Malformed> {
        Ok(self.select_rule()?.map(|r| self.method.plan.rules[r as usize].response))
    }

    /// Like [`Request::select`], but the rule (index into the method's
    /// rules) rather than its response: the first typed rule that holds,
    /// else the recording (raw rule) that fits the call best.
    pub fn select_rule(&self) -> Result<Option<u32>, Malformed> {
        match self.select_typed()? {
            None if !self.method.raw.is_empty() => self.select_raw(),
            r => Ok(r),
        }
    }

    /// When a recording answered a call not identical to it: the
    /// similarity of the two (see [`crate::call::raw`]).
    pub fn similarity(&self) -> Option<f32> {
        self.similarity.get()
    }

    /// Claims one call of `response`: true unless it is limited by `times`
    /// and used up. The count is shared by every worker (per test session
    /// for a session's calls).
    fn claim(&self, response: u32) -> bool {
        self.method.claim_local(response, self.session())
    }

    /// Like [`Request::claim`], but while claims are deferred a rule whose
    /// response is limited by `times` is set aside (and does not answer
    /// here): the caller claims those in the shared store, in order.
    fn claim_or_defer(&self, rule: u32, response: u32) -> bool {
        if self.defer.get() && self.method.responses[response as usize].times > 0 {
            self.deferred.borrow_mut().push(rule);
            return false;
        }
        self.claim(response)
    }

    /// From now on, rules limited by `times` that hold are collected
    /// rather than claimed ([`Request::take_deferred`]).
    pub fn defer_claims(&self) {
        self.defer.set(true);
    }

    /// The rules limited by `times` that held, in evaluation order, before
    /// the rule selection returned (which then is the first unlimited rule
    /// that held, or none).
    pub fn take_deferred(&self) -> SmallVec<[u32; 2]> {
        self.deferred.take()
    }

    /// The call's test session (`x-wirestub-session`), when its method has
    /// responses limited by `times` and the call names one.
    pub fn session(&self) -> Option<&'a [u8]> {
        let slot = self.method.session_uses.slot?;
        self.metadata.get(slot).copied().flatten().filter(|s| !s.is_empty())
    }

    /// The recording for a call no typed rule answered: among those whose
    /// staged conditions hold, the first (in recorded order) with the
    /// call's very messages, else the most similar at or above the
    /// threshold; each answers as often as its `times` allows.
    fn select_raw(&self) -> Result<Option<u32>, Malformed> {
        let plan = &self.method.plan;
        let m = self.messages;
        let mut messages: SmallVec<[&[u8]; 4]> = m.head.iter().copied().collect();
        if let Some(last) = m.last.filter(|_| m.count > m.head.len()) {
            messages.push(last);
        }
        let complete = messages.len() == m.count;
        // First the recordings whose staged conditions hold, and among
        // them the identical ones; similarity only when none answers.
        let mut staged: SmallVec<[usize; 16]> = SmallVec::new();
        'recordings: for (i, rec) in self.method.raw.iter().enumerate() {
            let rule = &plan.rules[rec.rule as usize];
            let Some(recorded) = rule.raw.as_deref() else { continue };
            for c in &rule.conditions {
                if !self.condition(c.source, &c.test)? {
                    continue 'recordings;
                }
            }
            let identical = complete
                && recorded.messages.len() == messages.len()
                && recorded.messages.iter().zip(&messages).all(|(a, b)| a.as_slice() == *b);
            match identical {
                true if self.claim(rule.response) => return Ok(Some(rec.rule)),
                true => {}
                false => staged.push(i),
            }
        }
        let mut call = crate::call::raw::Call::new(&messages);
        let threshold = crate::call::raw::threshold();
        let mut near: SmallVec<[(f32, u32); 8]> = SmallVec::new();
        for i in staged {
            let rec = &self.method.raw[i];
            let score = call.similarity(rec);
            if score >= threshold {
                near.push((score, rec.rule));
            }
        }
        near.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for (score, r) in near {
            if self.claim(plan.rules[r as usize].response) {
                self.similarity.set(Some(score));
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// The first typed rule (in plan order) that holds.
    fn select_typed(&self) -> Result<Option<u32>, Malformed> {
        let request = self;
        let method = self.method;
        let plan = &method.plan;
        let holds = |r: u32| -> Result<bool, Malformed> {
            let rule = &plan.rules[r as usize];
            if rule.raw.is_some() || (request.invalid.get() && !rule.skip_validation) {
                return Ok(false);
            }
            for c in &rule.conditions {
                if !request.condition(c.source, &c.test)? {
                    return Ok(false);
                }
            }
            // A response limited by `times` answers only while calls remain.
            Ok(request.claim_or_defer(r, rule.response))
        };

        let Some(index) = &method.index else {
            for r in 0..plan.rules.len() as u32 {
                if holds(r)? {
                    return Ok(Some(r));
                }
            }
            return Ok(None);
        };
        // Candidates: rules keyed on the request's value, merged in rule order
        // with the rules that do not test the indexed input.
        let mut key = IndexKey::default();
        let keyed: &[u32] = match request.scalar(index.source)? {
            (value, _) if key.set(value) => index.keyed.get(key.as_slice()).map(|v| v.as_slice()).unwrap_or(&[]),
            _ => &[],
        };
        let rest = &index.rest[..];
        let (mut a, mut b) = (0, 0);
        while a < keyed.len() || b < rest.len() {
            let r = match (keyed.get(a), rest.get(b)) {
                (Some(&x), Some(&y)) if x < y => {
                    a += 1;
                    x
                }
                (Some(&x), None) => {
                    a += 1;
                    x
                }
                (_, Some(&y)) => {
                    b += 1;
                    y
                }
                (None, None) => break,
            };
            if holds(r)? {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// For a request no rule matched: the rule whose conditions held the
    /// most (the first such rule on ties), the first of its conditions
    /// that failed, and how many held. Off the fast path: only the journal
    /// asks, for unmatched calls.
    pub fn closest(&self) -> Option<Closest> {
        let mut best: Option<Closest> = None;
        for (r, rule) in self.method.plan.rules.iter().enumerate() {
            let mut held = 0u32;
            let mut failed = None;
            for (i, c) in rule.conditions.iter().enumerate() {
                match self.condition(c.source, &c.test) {
                    Ok(true) => held += 1,
                    _ => {
                        failed.get_or_insert(i as u32);
                    }
                }
            }
            // A rule whose conditions all hold lost to `times`: its
            // response is used up.
            let failed = failed.unwrap_or(rule.conditions.len() as u32);
            if best.is_none_or(|b| held > b.held) {
                best = Some(Closest { rule: r as u32, failed, held });
            }
        }
        best
    }

    /// The single value a non-repeated source reads as, and whether it was
    /// present.
    pub fn scalar(&self, source: Source) -> Result<(ValueRef<'a>, bool), Malformed> {
        let plan = &self.method.plan;
        match source {
            Source::Metadata(i) => Ok(match self.metadata[i as usize] {
                Some(v) => (ValueRef::Bytes(v), true),
                None => (ValueRef::Bytes(b""), false),
            }),
            Source::Field(i) => {
                let f = &plan.fields[i as usize];
                if f.message == MessageSel::Count {
                    return Ok((ValueRef::U64(self.messages.count as u64), true));
                }
                let raw = match &f.shape {
                    _ if !f.picks.is_empty() => self.lazy[i as usize].get_or_init(|| self.read_lazy(i)).clone()?,
                    Shape::Singular => self.singular[i as usize],
                    Shape::Repeated => None,
                    Shape::MapValue { .. } | Shape::OneofCase { .. } => {
                        self.lazy[i as usize].get_or_init(|| self.read_lazy(i)).clone()?
                    }
                };
                Ok(match raw {
                    Some(r) => (wire::normalize(r, f.kind), true),
                    None => (wire::as_ref(&f.default), false),
                })
            }
        }
    }

    /// Reads a map value or a oneof case.
    fn read_lazy(&self, i: u32) -> Result<Option<Raw<'a>>, Malformed> {
        let f = &self.method.plan.fields[i as usize];
        let Some(message) = message_of(self.messages, f.message) else { return Ok(None) };
        if !f.picks.is_empty() {
            // A path with indices only: the one leaf it reaches, if any.
            let mut value = None;
            picks::leaves(f, message, &mut |leaf| {
                value = picks::leaf_value(f, leaf)?;
                Ok(false)
            })?;
            return Ok(value);
        }
        match &f.shape {
            Shape::MapValue { key_kind, key } => {
                let (prefix, number) = f.numbers.split_at(f.numbers.len() - 1);
                let mut found = None;
                let mut failed = None;
                let absent_key = default_key(key);
                wire::for_each(message, prefix, number, &mut |_, entry| {
                    let Raw::Len(entry) = entry else {
                        return true;
                    };
                    match wire::map_entry(entry) {
                        Ok((k, v)) => {
                            let k = match k {
                                Some(k) => wire::normalize(k, *key_kind),
                                None => wire::as_ref(&absent_key),
                            };
                            if wire::value_eq(k, key) {
                                // An entry without a value holds the default.
                                found = Some(v);
                            }
                            true
                        }
                        Err(e) => {
                            failed = Some(e);
                            false
                        }
                    }
                })?;
                if let Some(e) = failed {
                    return Err(e);
                }
                Ok(found.flatten())
            }
            Shape::OneofCase { members } => {
                let mut last = None;
                wire::for_each(message, &f.numbers, members, &mut |number, _| {
                    last = Some(number);
                    true
                })?;
                Ok(last.map(|n| Raw::Varint(n as u64)))
            }
            Shape::Singular | Shape::Repeated => Ok(None),
        }
    }

    fn condition(&self, source: Source, test: &Test) -> Result<bool, Malformed> {
        if let Source::Field(i) = source {
            let f = &self.method.plan.fields[i as usize];
            if !f.picks.is_empty() {
                return self.picked(f, test);
            }
            if f.shape == Shape::Repeated {
                let message = message_of(self.messages, f.message).unwrap_or_default();
                return self.repeated(f, message, &f.numbers, test);
            }
        }
        let (value, present) = self.scalar(source)?;
        Ok(self.eval(test, value, present, Some(source)))
    }

    /// Whether `needle` occurs in `hay`, through the input's literal
    /// automaton when it has one.
    fn contains(&self, source: Option<Source>, hay: &[u8], needle: &[u8]) -> bool {
        let slot = source.map(|s| crate::served::literal_slot(&self.method.plan, s));
        if let Some(literals) = slot.and_then(|i| self.method.literals[i].as_ref()) {
            if let Some(&id) = literals.ids.get(needle) {
                let hits = self.literal_hits[slot.unwrap()].get_or_init(|| {
                    let mut hits = vec![false; literals.ids.len()];
                    for m in literals.automaton.find_overlapping_iter(hay) {
                        hits[m.pattern().as_usize()] = true;
                    }
                    hits
                });
                return hits[id];
            }
        }
        memchr::memmem::find(hay, needle).is_some()
    }

    /// Evaluates a test on one value read from `source` (None for a
    /// derived value, such as a length).
    fn eval(&self, test: &Test, value: ValueRef<'_>, present: bool, source: Option<Source>) -> bool {
        match test {
            Test::Not(t) => !self.eval(t, value, present, source),
            Test::Any(list) => list.iter().any(|t| self.eval(t, value, present, source)),
            Test::All(list) => list.iter().all(|t| self.eval(t, value, present, source)),
            Test::Op(op) => match op {
                Op::Eq(v) => wire::value_eq(value, v),
                Op::In(vs) => vs.iter().any(|v| wire::value_eq(value, v)),
                Op::Gt(b) => order(value, b).is_some_and(|o| o.is_gt()),
                Op::Gte(b) => order(value, b).is_some_and(|o| o.is_ge()),
                Op::Lt(b) => order(value, b).is_some_and(|o| o.is_lt()),
                Op::Lte(b) => order(value, b).is_some_and(|o| o.is_le()),
                Op::Exists => present,
                Op::Contains(Value::Bytes(needle)) => {
                    matches!(value, ValueRef::Bytes(h) if self.contains(source, h, needle))
                }
                Op::Contains(_) => false,
                Op::Prefix(p) => matches!(value, ValueRef::Bytes(h) if h.starts_with(p)),
                Op::Suffix(p) => matches!(value, ValueRef::Bytes(h) if h.ends_with(p)),
                Op::Regex(i) => match value {
                    ValueRef::Bytes(h) => {
                        let dfa = &self.method.regexes[*i as usize];
                        matches!(dfa.try_search_fwd(&regex_automata::Input::new(h).earliest(true)), Ok(Some(_)))
                    }
                    _ => false,
                },
                Op::Len(t) => match value {
                    ValueRef::Bytes(h) => self.eval(t, ValueRef::U64(h.len() as u64), true, None),
                    _ => false,
                },
                Op::Format(f) => matches!(value, ValueRef::Bytes(h) if crate::call::formats::is_format(*f, h)),
                // Only repeated fields are unique or not (the loader admits
                // it nowhere else).
                Op::Unique => false,
                Op::Chars(t) => match value {
                    // Code points: every byte but UTF-8 continuation bytes.
                    ValueRef::Bytes(h) => {
                        let n = h.iter().filter(|&&b| (b as i8) >= -0x40).count();
                        self.eval(t, ValueRef::U64(n as u64), true, None)
                    }
                    _ => false,
                },
            },
        }
    }

    /// Evaluates a test on a path through repeated fields: on the one
    /// element its indices reach (absent if none), or on each element its
    /// quantifier reaches, holding for any or for all of them.
    fn picked(&self, f: &FieldPath, test: &Test) -> Result<bool, Malformed> {
        let message = message_of(self.messages, f.message).unwrap_or_default();
        let all = f.quantifier() == Some(Elem::All);
        let (mut seen, mut result) = (false, all);
        picks::leaves(f, message, &mut |leaf| {
            seen = true;
            let holds = self.leaf(f, leaf, test)?;
            result = holds;
            // `all` goes on while tests hold, `any` (and an index) until one does.
            Ok(holds == all)
        })?;
        if !seen && f.quantifier().is_none() {
            // No such element: its fields read as absent.
            let from = f.picks.last().map_or(0, |p| p.step as usize + 1);
            return self.leaf(f, Leaf::Message(b"", from), test);
        }
        Ok(result)
    }

    /// Evaluates a test on one leaf of a picked path.
    fn leaf(&self, f: &FieldPath, leaf: Leaf<'_>, test: &Test) -> Result<bool, Malformed> {
        if let (Leaf::Message(m, from), Shape::Repeated) = (leaf, &f.shape) {
            return self.repeated(f, m, &f.numbers[from..], test);
        }
        Ok(match picks::leaf_value(f, leaf)? {
            Some(raw) => self.eval(test, wire::normalize(raw, f.kind), true, None),
            None => self.eval(test, wire::as_ref(&f.default), false, None),
        })
    }

    /// An aggregate of the values a multi-valued path reads; None where it
    /// has none (the least of no values).
    pub fn aggregate(&self, i: u32, agg: Agg) -> Result<Option<f64>, Malformed> {
        let f = &self.method.plan.fields[i as usize];
        if f.message == MessageSel::Each {
            let at = self.method.each.iter().position(|&e| e == i);
            return match at.and_then(|at| self.messages.folds.get(at)) {
                Some(Ok(fold)) => Ok(fold.get(agg)),
                Some(Err(e)) => Err(e.clone()),
                None => Ok(Fold::default().get(agg)),
            };
        }
        let mut fold = Fold::default();
        if let Some(message) = message_of(self.messages, f.message) {
            fold.add_message(f, message)?;
        }
        Ok(fold.get(agg))
    }

    /// Evaluates a test on a repeated field: `contains` looks for an equal
    /// element, `len` counts, `exists` means at least one element.
    /// `numbers` is the path from `message` to the repeated field.
    fn repeated<'m>(&self, f: &FieldPath, message: &'m [u8], numbers: &[u32], test: &Test) -> Result<bool, Malformed> {
        let (prefix, number) = numbers.split_at(numbers.len() - 1);
        let each = |stop_when: &mut dyn FnMut(ValueRef<'m>) -> bool| -> Result<(), Malformed> {
            wire::for_each_element(message, prefix, number[0], f.kind.wire_type(), &mut |raw| {
                !stop_when(wire::normalize(raw, f.kind))
            })
        };
        Ok(match test {
            Test::Not(t) => !self.repeated(f, message, numbers, t)?,
            Test::Any(list) => {
                for t in list {
                    if self.repeated(f, message, numbers, t)? {
                        return Ok(true);
                    }
                }
                false
            }
            Test::All(list) => {
                for t in list {
                    if !self.repeated(f, message, numbers, t)? {
                        return Ok(false);
                    }
                }
                true
            }
            Test::Op(Op::Contains(v)) => {
                let mut found = false;
                each(&mut |e| {
                    found = wire::value_eq(e, v);
                    found
                })?;
                found
            }
            Test::Op(Op::Exists) => {
                let mut any = false;
                each(&mut |_| {
                    any = true;
                    true
                })?;
                any
            }
            Test::Op(Op::Unique) => {
                // Elements as their values compare (floats by bits, as
                // equal numbers have equal bits but for 0 and -0); bytes
                // borrowed from the message, nothing copied.
                #[derive(PartialEq, Eq, Hash)]
                enum Key<'b> {
                    I64(i64),
                    U64(u64),
                    F64(u64),
                    Bool(bool),
                    Bytes(&'b [u8]),
                }
                let mut seen = std::collections::HashSet::new();
                let mut unique = true;
                each(&mut |e| {
                    let key = match e {
                        ValueRef::I64(x) => Key::I64(x),
                        ValueRef::U64(x) => Key::U64(x),
                        ValueRef::F64(x) => Key::F64(if x == 0.0 { 0 } else { x.to_bits() }),
                        ValueRef::Bool(x) => Key::Bool(x),
                        ValueRef::Bytes(b) => Key::Bytes(b),
                    };
                    unique = seen.insert(key);
                    !unique
                })?;
                unique
            }
            Test::Op(Op::Len(t)) => {
                let mut n = 0u64;
                each(&mut |_| {
                    n += 1;
                    false
                })?;
                self.eval(t, ValueRef::U64(n), true, None)
            }
            // The plan loader admits no other operator on repeated fields.
            Test::Op(_) => false,
        })
    }
}

/// The message a selector reads, if the call has it.
fn message_of<'a>(messages: &Messages<'a>, sel: MessageSel) -> Option<&'a [u8]> {
    match sel {
        MessageSel::Single | MessageSel::First => messages.head.first().copied(),
        MessageSel::Last => messages.last.or_else(|| messages.head.last().copied()),
        MessageSel::Nth(n) => messages.head.get(n as usize).copied(),
        MessageSel::Count | MessageSel::Each => None,
    }
}

/// The key of a map entry that has none: its type's zero.
fn default_key_of(kind: wirestub_plan::ScalarKind) -> Value {
    match kind.value_class() {
        wirestub_plan::ValueClass::I64 => Value::I64(0),
        wirestub_plan::ValueClass::U64 => Value::U64(0),
        wirestub_plan::ValueClass::F64 => Value::F64(0.0),
        wirestub_plan::ValueClass::Bool => Value::Bool(false),
        wirestub_plan::ValueClass::Bytes => Value::Bytes(Vec::new()),
    }
}

/// A map key given as the default value (a key absent from the entry reads
/// as its type's zero, which has the same class as the rule's key).
fn default_key(key: &Value) -> Value {
    match key {
        Value::I64(_) => Value::I64(0),
        Value::U64(_) => Value::U64(0),
        Value::F64(_) => Value::F64(0.0),
        Value::Bool(_) => Value::Bool(false),
        Value::Bytes(_) => Value::Bytes(Vec::new()),
    }
}

/// Orders a value against a bound. Numbers compare within their class;
/// strings and metadata are parsed as numbers when the bound is a float
/// (never ordered when unparsable, like NaN).
fn order(value: ValueRef<'_>, bound: &Value) -> Option<std::cmp::Ordering> {
    match (value, bound) {
        (ValueRef::I64(a), Value::I64(b)) => Some(a.cmp(b)),
        (ValueRef::U64(a), Value::U64(b)) => Some(a.cmp(b)),
        (ValueRef::F64(a), Value::F64(b)) => a.partial_cmp(b),
        (ValueRef::Bytes(a), Value::F64(b)) => {
            let n: f64 = std::str::from_utf8(a).ok()?.trim().parse().ok()?;
            n.partial_cmp(b)
        }
        _ => None,
    }
}
