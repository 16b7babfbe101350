//! Replaying recordings made without descriptors (raw rules): after the
//! staged match the plan's conditions already did (test session, metadata
//! names, content type, compression), a call is compared with each
//! recording's messages: identical messages win, in recorded order; else
//! the most similar recording at or above the threshold
//! (`--raw-threshold`) answers, and the journal keeps its score.
//!
//! Similarity is computed on the call's messages joined, against each
//! recording's: the normalised Levenshtein similarity (1 − distance ÷ the
//! longer length) when both are printable text of at most
//! [`LEVENSHTEIN_MAX`] bytes, else the Jaccard index of their sets of
//! 3-byte shingles, which the recording's side prepares at plan load. Only
//! the first [`COMPARE_MAX`] bytes of each side are compared, so the cost
//! per unmatched call is at most one pass of that size per recording
//! (plus one sort of the call's shingles); it is paid only for calls to
//! methods with recordings that no typed rule answered.

use std::sync::atomic::{AtomicU32, Ordering};
use wirestub_plan::Method;

/// Bytes of each side compared for similarity: the first 64 KiB of the
/// messages joined, so a large call costs a bounded pass per recording.
pub const COMPARE_MAX: usize = 64 << 10;

/// The default `--raw-threshold`.
pub const DEFAULT_THRESHOLD: f32 = 0.8;
/// Longest text compared by edit distance (its cost is the product of the
/// lengths); longer bodies use shingles.
pub const LEVENSHTEIN_MAX: usize = 512;

static THRESHOLD: AtomicU32 = AtomicU32::new(0x3f4c_cccd); // 0.8f32

/// Sets the lowest similarity a recording needs to answer a call that is
/// not identical to it (process-wide, like the random seed).
pub fn set_threshold(t: f32) {
    THRESHOLD.store(t.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
}

pub fn threshold() -> f32 {
    f32::from_bits(THRESHOLD.load(Ordering::Relaxed))
}

/// A recording prepared for comparison.
#[derive(Debug, Clone)]
pub struct Recording {
    /// Index into the method's plan rules.
    pub rule: u32,
    /// How many request messages it holds.
    pub messages: usize,
    /// Its messages joined.
    pub joined: Box<[u8]>,
    /// Its distinct 3-byte shingles, sorted.
    pub shingles: Box<[u32]>,
    /// Whether `joined` is printable text short enough for edit distance.
    pub text: bool,
}

/// The method's raw rules, prepared.
pub fn prepare(method: &Method) -> Vec<Recording> {
    method
        .rules
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some(recording(i as u32, &r.raw.as_deref()?.messages)))
        .collect()
}

/// Request messages prepared for comparison, as the recording of rule
/// `rule`.
pub fn recording(rule: u32, messages: &[Vec<u8>]) -> Recording {
    let joined = join(messages.iter().map(Vec::as_slice));
    Recording {
        rule,
        messages: messages.len(),
        text: is_text(&joined),
        shingles: shingles(&joined).into(),
        joined: joined.into(),
    }
}

/// A call's messages, joined once for all the comparisons.
pub struct Call {
    joined: Vec<u8>,
    shingles: Option<Vec<u32>>,
    text: bool,
}

impl Call {
    pub fn new(messages: &[&[u8]]) -> Self {
        let joined = join(messages.iter().copied());
        Call { text: is_text(&joined), joined, shingles: None }
    }

    /// Similarity to the recording, from 0 to 1.
    pub fn similarity(&mut self, r: &Recording) -> f32 {
        if self.joined.as_slice() == &*r.joined {
            return 1.0;
        }
        if self.text && r.text && self.joined.len() <= LEVENSHTEIN_MAX {
            let longer = self.joined.len().max(r.joined.len());
            return 1.0 - levenshtein(&self.joined, &r.joined) as f32 / longer as f32;
        }
        let mine = self.shingles.get_or_insert_with(|| shingles(&self.joined));
        jaccard(mine, &r.shingles)
    }
}

/// The messages joined, at most [`COMPARE_MAX`] bytes of them.
fn join<'b>(messages: impl Iterator<Item = &'b [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        let room = COMPARE_MAX - out.len();
        out.extend_from_slice(&m[..m.len().min(room)]);
        if out.len() == COMPARE_MAX {
            break;
        }
    }
    out
}

/// Printable ASCII text (and whitespace), at most [`LEVENSHTEIN_MAX`] bytes.
fn is_text(b: &[u8]) -> bool {
    b.len() <= LEVENSHTEIN_MAX && b.iter().all(|&c| (0x20..0x7f).contains(&c) || matches!(c, b'\t' | b'\n' | b'\r'))
}

/// The distinct 3-byte windows, sorted; a body shorter than 3 bytes is
/// its one shingle.
fn shingles(b: &[u8]) -> Vec<u32> {
    let mut out: Vec<u32> = if b.len() < 3 {
        if b.is_empty() {
            Vec::new()
        } else {
            vec![b.iter().fold(0x0100_0000, |a, &c| (a << 8) | c as u32)]
        }
    } else {
        b.windows(3).map(|w| (w[0] as u32) << 16 | (w[1] as u32) << 8 | w[2] as u32).collect()
    };
    out.sort_unstable();
    out.dedup();
    out
}

/// |A ∩ B| ÷ |A ∪ B| of two sorted sets; two empty sets are identical.
fn jaccard(a: &[u32], b: &[u32]) -> f32 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let (mut i, mut j, mut both) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                both += 1;
                i += 1;
                j += 1;
            }
        }
    }
    both as f32 / (a.len() + b.len() - both) as f32
}

/// Edit distance (insertions, deletions, substitutions), one row of memory.
fn levenshtein(a: &[u8], b: &[u8]) -> usize {
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, &x) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &y) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + (x != y) as usize);
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levenshtein_counts_edits() {
        assert_eq!(levenshtein(b"kitten", b"sitting"), 3);
        assert_eq!(levenshtein(b"", b"abc"), 3);
        assert_eq!(levenshtein(b"same", b"same"), 0);
    }

    #[test]
    fn jaccard_of_shingles() {
        assert_eq!(jaccard(&shingles(b"abcd"), &shingles(b"abcd")), 1.0);
        assert_eq!(jaccard(&shingles(b"abcd"), &shingles(b"wxyz")), 0.0);
        // abc bcd vs abc bce: one of three distinct shared.
        assert!((jaccard(&shingles(b"abcd"), &shingles(b"abce")) - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(jaccard(&[], &[]), 1.0);
    }

    #[test]
    fn text_uses_edit_distance_and_binary_uses_shingles() {
        let r = recording(0, &[b"hello world".to_vec()]);
        assert!(r.text);
        let s = Call::new(&[b"hello worle"]).similarity(&r);
        assert!((s - (1.0 - 1.0 / 11.0)).abs() < 1e-6, "{s}");
        let r = recording(0, &[b"\x0a\x05hello\x10\x01".to_vec()]);
        assert!(!r.text);
        assert_eq!(Call::new(&[b"\x0a\x05hello\x10\x01"]).similarity(&r), 1.0);
        let s = Call::new(&[b"\x0a\x05hellp\x10\x01"]).similarity(&r);
        assert!(s > 0.3 && s < 1.0, "{s}");
    }
}
