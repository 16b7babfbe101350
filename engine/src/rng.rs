//! A small per-thread pseudo-random source (SplitMix64) for shuffled
//! streams, latency distributions, fault injection and template utilities. Each worker thread has its own state, so drawing takes
//! no lock and shares nothing.

use std::cell::Cell;

thread_local! {
    static STATE: Cell<u64> = Cell::new(clock_seed());
}

fn clock_seed() -> u64 {
    let time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64);
    // The address of a thread-local differs per thread, so threads started
    // at the same instant still get different sequences.
    let local = 0u8;
    time.unwrap_or(0) ^ (&local as *const u8 as u64).rotate_left(32)
}

/// The next 64 random bits.
pub fn next_u64() -> u64 {
    STATE.with(|s| {
        let x = s.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        s.set(x);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

/// Seeds this thread's source, for reproducible runs (`--seed`).
pub fn seed(seed: u64) {
    STATE.with(|s| s.set(seed));
}

/// A standard normal draw (Box-Muller).
pub fn normal() -> f64 {
    let u1 = unit().max(f64::MIN_POSITIVE);
    let u2 = unit();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A uniformly random number in [0, 1).
pub fn unit() -> f64 {
    (next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// A random (version 4) UUID in its text form.
pub fn uuid() -> String {
    let (a, b) = (next_u64(), next_u64());
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&a.to_be_bytes());
    bytes[8..].copy_from_slice(&b.to_be_bytes());
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// Shuffles in place (Fisher-Yates).
pub fn shuffle<T>(items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let j = (next_u64() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// 16 hex digits no other process or call is likely to draw: for names
/// (a replica's id, a nonce, a private directory), never from the seeded
/// sequence (replicas run with the same `--seed`).
pub fn unique_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<u32> = (0..100).collect();
        super::shuffle(&mut v);
        let mut sorted = v.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(v, sorted, "100 items shuffled into the identity order is a broken shuffle");
    }
}
