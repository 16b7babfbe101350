//! Paths through repeated fields and paths that read many values: walking
//! `items[0].size`, `items[-1]`, `items[*].size` and `items[all].size` on
//! the wire, element by element, without collecting the elements; and the
//! aggregates (`count`, `sum`, `min`, `max`) templates compute over the
//! values of such a path, of a repeated field, or of every message of a
//! client stream (folded as the messages arrive, so nothing is kept).
//!
//! Cost: one pass over the repeated field per pick (two for a negative
//! index, which first counts); a quantifier stops at the first element that
//! decides. Nesting is bounded by [`wirestub_plan::MAX_PICKS`].

use crate::codec::wire::{self, Malformed, PathSpec, Raw, ValueRef};
use wirestub_plan::{Agg, Elem, FieldPath, Pick, Shape};

/// What a path with picks reaches: a message its last steps are read in,
/// or an element picked at its last step.
#[derive(Clone, Copy)]
pub enum Leaf<'a> {
    /// A message and the position in the path's numbers its remaining
    /// steps start at (the path's length when none remain).
    Message(&'a [u8], usize),
    /// The element itself.
    Element(Raw<'a>),
}

/// Visits the leaves `f` reaches in `message`, in wire order; `each`
/// returns false to stop. Returns false if it was stopped.
pub fn leaves<'a>(
    f: &FieldPath,
    message: &'a [u8],
    each: &mut dyn FnMut(Leaf<'a>) -> Result<bool, Malformed>,
) -> Result<bool, Malformed> {
    walk(f, &f.picks, 0, message, each)
}

fn walk<'a>(
    f: &FieldPath,
    picks: &[Pick],
    from: usize,
    message: &'a [u8],
    each: &mut dyn FnMut(Leaf<'a>) -> Result<bool, Malformed>,
) -> Result<bool, Malformed> {
    let Some((pick, rest)) = picks.split_first() else {
        return each(Leaf::Message(message, from));
    };
    let step = pick.step as usize;
    let last = step + 1 == f.numbers.len();
    // Elements before the last step are messages.
    let wire_type = if last { f.kind.wire_type() } else { 2 };
    let (prefix, number) = (&f.numbers[from..step], f.numbers[step]);
    let target = match pick.elem {
        Elem::Index(i) if i >= 0 => Some(i as u64),
        Elem::Index(i) => {
            let mut n = 0u64;
            wire::for_each_element(message, prefix, number, wire_type, &mut |_| {
                n += 1;
                true
            })?;
            match n.checked_sub(i.unsigned_abs() as u64) {
                Some(t) => Some(t),
                None => return Ok(true),
            }
        }
        Elem::Any | Elem::All => None,
    };
    let (mut at, mut failed, mut go_on) = (0u64, None, true);
    wire::for_each_element(message, prefix, number, wire_type, &mut |raw| {
        let this = at;
        at += 1;
        if target.is_some_and(|t| t != this) {
            return true;
        }
        let visited = match (last, raw) {
            (true, raw) => each(Leaf::Element(raw)),
            (false, Raw::Len(inner)) => walk(f, rest, step + 1, inner, each),
            (false, _) => Ok(true),
        };
        match visited {
            Ok(c) => {
                go_on = c;
                c && target.is_none()
            }
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    })?;
    match failed {
        Some(e) => Err(e),
        None => Ok(go_on),
    }
}

/// The single value a leaf of a path with a singular end holds: the
/// element, or the last occurrence of the remaining steps (None when
/// absent).
pub fn leaf_value<'a>(f: &FieldPath, leaf: Leaf<'a>) -> Result<Option<Raw<'a>>, Malformed> {
    match leaf {
        Leaf::Element(raw) => Ok(Some(raw)),
        Leaf::Message(_, from) if from >= f.numbers.len() => Ok(None),
        Leaf::Message(m, from) => {
            let mut found = [None];
            wire::extract(m, &[PathSpec { numbers: &f.numbers[from..], wire_type: f.kind.wire_type() }], &mut found)?;
            Ok(found[0])
        }
    }
}

/// Calls `each` with every value a multi-valued path (or any path) reads
/// in `message`: each element a quantifier reaches, each element of a
/// repeated end, the default for an absent singular end. `each` returns
/// false to stop.
pub fn for_each_value<'a>(
    f: &FieldPath,
    message: &'a [u8],
    each: &mut dyn FnMut(ValueRef<'_>) -> bool,
) -> Result<(), Malformed> {
    let default = wire::as_ref(&f.default);
    let mut leaf_values = |leaf: Leaf<'a>| -> Result<bool, Malformed> {
        match (leaf, &f.shape) {
            (Leaf::Message(m, from), Shape::Repeated) if from < f.numbers.len() => {
                let (prefix, number) = f.numbers[from..].split_at(f.numbers.len() - from - 1);
                let mut go_on = true;
                wire::for_each_element(m, prefix, number[0], f.kind.wire_type(), &mut |raw| {
                    go_on = each(wire::normalize(raw, f.kind));
                    go_on
                })?;
                Ok(go_on)
            }
            (leaf, _) => Ok(match leaf_value(f, leaf)? {
                Some(raw) => each(wire::normalize(raw, f.kind)),
                None => each(default),
            }),
        }
    };
    leaves(f, message, &mut leaf_values).map(|_| ())
}

/// A running aggregate of values: how many, their sum, least and
/// greatest (numbers as f64; text that reads as a number counts as one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fold {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// How many values were numbers (min and max are over those).
    pub numbers: u64,
}

impl Default for Fold {
    fn default() -> Self {
        Fold { count: 0, sum: 0.0, min: f64::INFINITY, max: f64::NEG_INFINITY, numbers: 0 }
    }
}

impl Fold {
    pub fn add(&mut self, v: ValueRef<'_>) {
        self.count += 1;
        let n = match v {
            ValueRef::I64(x) => x as f64,
            ValueRef::U64(x) => x as f64,
            ValueRef::F64(x) => x,
            ValueRef::Bool(b) => b as u8 as f64,
            ValueRef::Bytes(_) => return,
        };
        if n.is_nan() {
            return;
        }
        self.numbers += 1;
        self.sum += n;
        self.min = self.min.min(n);
        self.max = self.max.max(n);
    }

    /// Folds every value `f` reads in `message`.
    pub fn add_message(&mut self, f: &FieldPath, message: &[u8]) -> Result<(), Malformed> {
        for_each_value(f, message, &mut |v| {
            self.add(v);
            true
        })
    }

    /// The aggregate, or None where it has no value (min or max of none).
    pub fn get(&self, agg: Agg) -> Option<f64> {
        match agg {
            Agg::Count => Some(self.count as f64),
            Agg::Sum => Some(self.sum),
            Agg::Min => (self.numbers > 0).then_some(self.min),
            Agg::Max => (self.numbers > 0).then_some(self.max),
        }
    }
}
