//! Rule evaluation on the request path: reads the fields the method's rules
//! test straight from the wire bytes, reads the metadata they test, and
//! returns the first rule whose conditions all hold.
//!
//! The plan's rule order already encodes priorities and tiers, so this is a
//! first-match scan. It allocates nothing for methods testing up to 16
//! fields and 8 metadata keys.

use crate::served::ServedMethod;
use crate::wire::{self, Malformed, PathSpec, Raw, ValueRef};
use http::HeaderMap;
use smallvec::SmallVec;
use wirestub_plan::{Op, Source};

/// Picks the response for a request: `Ok(Some(index))` into the method's
/// responses, `Ok(None)` if no rule matches, `Err` if the request message
/// is malformed where the scan had to read it.
pub fn select(method: &ServedMethod, message: &[u8], headers: &HeaderMap) -> Result<Option<u32>, Malformed> {
    let plan = &method.plan;
    let mut raw: SmallVec<[Option<Raw<'_>>; 16]> = SmallVec::from_elem(None, plan.fields.len());
    if !plan.fields.is_empty() {
        let paths: SmallVec<[PathSpec<'_>; 16]> =
            plan.fields.iter().map(|f| PathSpec { numbers: &f.numbers, wire_type: f.kind.wire_type() }).collect();
        wire::extract(message, &paths, &mut raw)?;
    }
    let metadata: SmallVec<[&[u8]; 8]> =
        plan.metadata_keys.iter().map(|k| headers.get(k.as_str()).map(|v| v.as_bytes()).unwrap_or(b"")).collect();

    for rule in &plan.rules {
        let holds = rule.conditions.iter().all(|c| {
            let Op::Eq(expected) = &c.op;
            match c.source {
                Source::Field(i) => {
                    let field = &plan.fields[i as usize];
                    let actual = match raw[i as usize] {
                        Some(r) => wire::normalize(r, field.kind),
                        None => wire::as_ref(&field.default),
                    };
                    wire::value_eq(actual, expected)
                }
                Source::Metadata(i) => wire::value_eq(ValueRef::Bytes(metadata[i as usize]), expected),
            }
        });
        if holds {
            return Ok(Some(rule.response));
        }
    }
    Ok(None)
}
