//! The checks of the `wire_scan` fuzz target (input layout and invariants:
//! `fuzz_targets/wire_scan.rs`), shared with `tests/fuzz_regressions.rs`,
//! which replays the seed corpus and every past crash through them.

use wirestub_engine::codec::wire::{as_ref, extract, normalize, value_eq, PathSpec, Raw, ValueRef};
use wirestub_plan::{ScalarKind, Value};

const MAX_PATHS: usize = 20;
const MAX_DEPTH: usize = 4;

const KINDS: [ScalarKind; 16] = {
    use ScalarKind::*;
    [
        Double, Float, Int64, Uint64, Int32, Fixed64, Fixed32, Bool, String, Bytes, Uint32, Enum, Sfixed32, Sfixed64,
        Sint32, Sint64,
    ]
};

/// Runs the checks on one input.
pub fn check(data: &[u8]) {
    let Some((&count, mut rest)) = data.split_first() else { return };
    let count = usize::from(count) % (MAX_PATHS + 1);
    let mut numbers = [[0u32; MAX_DEPTH]; MAX_PATHS];
    let mut shapes = [(0usize, 0u8); MAX_PATHS];
    for (slot, shape) in numbers.iter_mut().zip(&mut shapes).take(count) {
        let Some((&byte, tail)) = rest.split_first() else { return };
        let depth = usize::from(byte & 3) + 1;
        if tail.len() < depth {
            return;
        }
        for (n, &b) in slot.iter_mut().zip(&tail[..depth]) {
            *n = u32::from(b);
        }
        *shape = (depth, (byte >> 2) & 7);
        rest = &tail[depth..];
    }
    let msg = rest;
    let paths: Vec<PathSpec<'_>> = numbers
        .iter()
        .zip(&shapes)
        .take(count)
        .map(|(n, &(depth, wire_type))| PathSpec { numbers: &n[..depth], wire_type })
        .collect();

    let mut out = vec![None; count];
    if let Err(e) = extract(msg, &paths, &mut out) {
        assert!(e.offset() <= msg.len(), "error offset {} past a {}-byte message: {e}", e.offset(), msg.len());
        assert!(!e.to_string().is_empty());
        return;
    }

    for raw in out.iter().flatten() {
        for kind in KINDS {
            check_value(normalize(*raw, kind), kind);
        }
    }

    for (i, path) in paths.iter().enumerate() {
        let mut one: [Option<Raw<'_>>; 1] = [None];
        extract(msg, std::slice::from_ref(path), &mut one).expect("a path alone fails where all paths succeed");
        assert_eq!(one[0], out[i], "path {i} alone gives another value");
    }
}

fn check_value(v: ValueRef<'_>, kind: ScalarKind) {
    assert_eq!(v.class(), kind.value_class(), "{} normalises to {v:?}", kind.name());
    let owned = match v {
        ValueRef::I64(x) => Value::I64(x),
        ValueRef::U64(x) => Value::U64(x),
        ValueRef::F64(x) => Value::F64(x),
        ValueRef::Bool(x) => Value::Bool(x),
        ValueRef::Bytes(x) => Value::Bytes(x.to_vec()),
    };
    // NaN is the one value never equal to itself.
    let nan = matches!(v, ValueRef::F64(x) if x.is_nan());
    assert_eq!(value_eq(v, &owned), !nan, "{v:?} against itself");
    assert_eq!(value_eq(as_ref(&owned), &owned), !nan);
}
