//! The Huffman code of HPACK string literals (RFC 7541 §5.2 and Appendix B).
//!
//! The code is canonical: codes of one length are consecutive, in symbol
//! order, and each length starts where the shorter ones end. So the only
//! transcribed fact is the bit length of each of the 257 symbols
//! ([`LENGTHS`]); the codes ([`CODES`]) and the decoding automaton
//! ([`MACHINE`]) are derived from them at compile time, and a compile-time
//! assertion checks that the lengths form a complete prefix code.
//!
//! Decoding reads four bits at a time. The automaton's states are the 256
//! internal nodes of the code tree (state 0 is the root); a step from a state
//! on a nibble gives the next state and at most one decoded byte (no code is
//! shorter than five bits), or a failure when the nibble completes EOS. A
//! string ends correctly only in a state reached from the root by at most
//! seven 1 bits: that is the RFC's padding (a prefix of EOS, at most seven
//! bits). Decoding costs two table look-ups per input byte; the tables take
//! 16 KiB and are built by `const` evaluation, so there is no run-time set-up.

use super::hpack::DecodeError;

/// The bit length of each symbol's code: bytes 0 to 255, then EOS (256).
#[rustfmt::skip]
const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, // 0..=15
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, // 16..=31
     6, 10, 10, 12, 13,  6,  8, 11, 10, 10,  8, 11,  8,  6,  6,  6, // 32..=47
     5,  5,  5,  6,  6,  6,  6,  6,  6,  6,  7,  8, 15,  6, 12, 10, // 48..=63
    13,  6,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7,  7, // 64..=79
     7,  7,  7,  7,  7,  7,  7,  7,  8,  7,  8, 13, 19, 13, 14,  6, // 80..=95
    15,  5,  6,  5,  6,  5,  6,  6,  6,  5,  7,  7,  6,  6,  6,  5, // 96..=111
     6,  7,  6,  5,  5,  6,  7,  7,  7,  7,  7, 15, 11, 14, 13, 28, // 112..=127
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, // 128..=143
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, // 144..=159
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, // 160..=175
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, // 176..=191
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, // 192..=207
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, // 208..=223
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, // 224..=239
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, // 240..=255
    30,                                                             // EOS
];

/// The EOS symbol, which must never appear in a string.
const EOS: usize = 256;

/// The longest code (EOS's).
const MAX_LENGTH: u8 = 30;

/// The code of each symbol, right-aligned, derived from [`LENGTHS`].
const CODES: [u32; 257] = canonical_codes();

/// Assigns canonical codes: by increasing length, then by symbol. Fails to
/// compile unless the lengths form a complete prefix code (the last code of
/// the longest length is all ones).
const fn canonical_codes() -> [u32; 257] {
    let mut codes = [0u32; 257];
    let mut code: u64 = 0;
    let mut len = 1;
    while len <= MAX_LENGTH {
        let mut sym = 0;
        while sym < 257 {
            if LENGTHS[sym] == len {
                assert!(code < 1 << len, "the code lengths over-fill the code space");
                codes[sym] = code as u32;
                code += 1;
            }
            sym += 1;
        }
        if len < MAX_LENGTH {
            code <<= 1;
        }
        len += 1;
    }
    assert!(code == 1 << MAX_LENGTH, "the code lengths leave part of the code space unused");
    codes
}

/// One step of the automaton, packed: bits 0-7 the next state, bits 8-15 the
/// decoded byte when [`EMIT`] is set.
const EMIT: u32 = 1 << 16;
/// The nibble completes EOS: the string is invalid.
const FAIL: u32 = 1 << 17;

/// How a string may end in a given state.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// At the root, or at most seven 1 bits into a code: valid padding.
    Ok,
    /// More than seven 1 bits since the last symbol.
    TooLong,
    /// Part of a code that is not all ones.
    NotOnes,
}

/// The decoding automaton: `steps[state][nibble]` and `ends[state]`.
struct Machine {
    steps: [[u32; 16]; 256],
    ends: [End; 256],
}

static MACHINE: Machine = machine();

/// A child in the code tree under construction: `LEAF | symbol`, or the
/// index of an internal node (never 0, the root).
const LEAF: u16 = 0x8000;

const fn machine() -> Machine {
    // The code tree: 257 leaves, hence 256 internal nodes.
    let mut children = [[0u16; 2]; 256];
    let mut depth = [0u8; 256];
    let mut all_ones = [false; 256];
    all_ones[0] = true;
    let mut nodes = 1;
    let mut sym = 0;
    while sym < 257 {
        let (code, len) = (CODES[sym], LENGTHS[sym]);
        let mut node = 0;
        let mut i = len;
        while i > 0 {
            i -= 1;
            let bit = ((code >> i) & 1) as usize;
            if i == 0 {
                assert!(children[node][bit] == 0, "a code is a prefix of another");
                children[node][bit] = LEAF | sym as u16;
            } else {
                if children[node][bit] == 0 {
                    assert!(nodes < 256, "more internal nodes than a complete code has");
                    children[node][bit] = nodes as u16;
                    depth[nodes] = depth[node] + 1;
                    all_ones[nodes] = all_ones[node] && bit == 1;
                    nodes += 1;
                }
                let next = children[node][bit];
                assert!(next & LEAF == 0, "a code is a prefix of another");
                node = next as usize;
            }
        }
        sym += 1;
    }
    assert!(nodes == 256, "the code tree is not complete");

    let mut steps = [[0u32; 16]; 256];
    let mut ends = [End::Ok; 256];
    let mut state = 0;
    while state < 256 {
        let mut nibble = 0;
        while nibble < 16 {
            let mut node = state;
            let mut step = 0u32;
            let mut i = 4;
            while i > 0 && step & FAIL == 0 {
                i -= 1;
                let child = children[node][(nibble >> i) & 1];
                if child & LEAF == 0 {
                    node = child as usize;
                } else if (child & !LEAF) as usize == EOS {
                    step |= FAIL;
                } else {
                    assert!(step & EMIT == 0, "two symbols in one nibble");
                    step |= EMIT | ((child & 0xff) as u32) << 8;
                    node = 0;
                }
            }
            steps[state][nibble] = step | node as u32;
            nibble += 1;
        }
        ends[state] = if !all_ones[state] {
            End::NotOnes
        } else if depth[state] > 7 {
            End::TooLong
        } else {
            End::Ok
        };
        state += 1;
    }
    Machine { steps, ends }
}

/// Appends the decoding of the Huffman-encoded `src` to `dst`.
///
/// Fails on EOS, on padding longer than seven bits, and on padding that is
/// not all ones (which includes a code cut short). On failure `dst` holds
/// what was decoded so far.
pub(crate) fn decode(src: &[u8], dst: &mut Vec<u8>) -> Result<(), DecodeError> {
    // The shortest code is five bits.
    dst.reserve(src.len() / 5 * 8 + 8);
    let steps = &MACHINE.steps;
    let mut state = 0usize;
    for &byte in src {
        for nibble in [byte >> 4, byte & 0x0f] {
            let step = steps[state][usize::from(nibble)];
            if step & FAIL != 0 {
                return Err(DecodeError("EOS in a Huffman-encoded string"));
            }
            if step & EMIT != 0 {
                dst.push((step >> 8) as u8);
            }
            state = (step & 0xff) as usize;
        }
    }
    match MACHINE.ends[state] {
        End::Ok => Ok(()),
        End::TooLong => Err(DecodeError("Huffman padding longer than 7 bits")),
        End::NotOnes => Err(DecodeError("Huffman padding not all ones")),
    }
}

/// Appends the Huffman encoding of `src` to `dst`, padded with 1 bits.
#[cfg(test)]
pub(crate) fn encode(src: &[u8], dst: &mut Vec<u8>) {
    let (mut bits, mut count) = (0u64, 0u32);
    for &byte in src {
        let len = u32::from(LENGTHS[usize::from(byte)]);
        bits = bits << len | u64::from(CODES[usize::from(byte)]);
        count += len;
        while count >= 8 {
            count -= 8;
            dst.push((bits >> count) as u8);
        }
    }
    if count > 0 {
        dst.push((bits << (8 - count)) as u8 | 0xff >> count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(src: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(src, &mut out);
        out
    }

    fn decoded(src: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::new();
        decode(src, &mut out).map(|()| out)
    }

    /// Codes from RFC 7541 Appendix B, spot-checked against the derived ones.
    #[test]
    fn derived_codes_match_the_rfc() {
        let rfc: [(usize, u32, u8); 13] = [
            (0, 0x1ff8, 13),
            (1, 0x7fffd8, 23),
            (10, 0x3ffffffc, 30),
            (b' ' as usize, 0x14, 6),
            (b'0' as usize, 0x0, 5),
            (b'X' as usize, 0xfc, 8),
            (b'\\' as usize, 0x7fff0, 19),
            (b'~' as usize, 0x1ffd, 13),
            (128, 0xfffe6, 20),
            (192, 0x3ffffe0, 26),
            (200, 0x3ffffe2, 26),
            (255, 0x3ffffee, 26),
            (EOS, 0x3fffffff, 30),
        ];
        for (sym, code, len) in rfc {
            assert_eq!((CODES[sym], LENGTHS[sym]), (code, len), "symbol {sym}");
        }
    }

    #[test]
    fn every_byte_round_trips() {
        for b in 0..=255u8 {
            assert_eq!(decoded(&encoded(&[b])).unwrap(), [b], "byte {b}");
            let run = [b; 7];
            assert_eq!(decoded(&encoded(&run)).unwrap(), run, "byte {b} seven times");
        }
        let all: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        assert_eq!(decoded(&encoded(&all)).unwrap(), all);
        assert_eq!(decoded(&[]).unwrap(), b"");
    }

    #[test]
    fn rfc_examples() {
        // RFC 7541 C.4.1 and C.6.1.
        assert_eq!(
            encoded(b"www.example.com"),
            [0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff]
        );
        assert_eq!(decoded(&[0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf]).unwrap(), b"no-cache");
        assert_eq!(decoded(&[0x64, 0x02]).unwrap(), b"302");
    }

    #[test]
    fn eos_is_rejected() {
        // EOS alone, padded: 30 ones then two ones.
        assert_eq!(decoded(&[0xff; 4]), Err(DecodeError("EOS in a Huffman-encoded string")));
        // After a symbol ('a' = 00011), EOS: 00011 + 30 ones + 5 ones of padding.
        assert_eq!(decoded(&[0x1f, 0xff, 0xff, 0xff, 0xff]), Err(DecodeError("EOS in a Huffman-encoded string")));
    }

    #[test]
    fn padding_rules() {
        // '0' is 00000: three 1 bits of padding.
        assert_eq!(decoded(&[0x07]).unwrap(), b"0");
        // Padding with a 0 bit.
        assert_eq!(decoded(&[0x06]), Err(DecodeError("Huffman padding not all ones")));
        // A whole byte of ones after a complete symbol: 8 bits of padding.
        assert_eq!(decoded(&[0x07, 0xff]), Err(DecodeError("Huffman padding longer than 7 bits")));
        assert_eq!(decoded(&[0xff]), Err(DecodeError("Huffman padding longer than 7 bits")));
        // A code cut short: the first 8 of 'X' (11111100) is complete, but
        // '\\' (19 bits, 1111111111111110000) cut after 16 bits is not.
        assert_eq!(decoded(&[0xff, 0xfe]), Err(DecodeError("Huffman padding not all ones")));
    }

    /// A bit-at-a-time decoder written straight from the RFC's rules, to
    /// check the automaton against.
    fn reference(src: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::new();
        let (mut code, mut len) = (0u32, 0u8);
        for i in 0..src.len() * 8 {
            code = code << 1 | u32::from(src[i / 8] >> (7 - i % 8) & 1);
            len += 1;
            if let Some(sym) = (0..257).find(|&s| LENGTHS[s] == len && CODES[s] == code) {
                if sym == EOS {
                    return Err(DecodeError("EOS in a Huffman-encoded string"));
                }
                out.push(sym as u8);
                (code, len) = (0, 0);
            }
        }
        if code != (1 << len) - 1 {
            Err(DecodeError("Huffman padding not all ones"))
        } else if len > 7 {
            Err(DecodeError("Huffman padding longer than 7 bits"))
        } else {
            Ok(out)
        }
    }

    /// Random strings, encoded then damaged (a flipped bit, a truncation, an
    /// extra byte), decode exactly as the reference decoder says.
    #[test]
    fn agrees_with_a_bitwise_decoder() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..3000 {
            let len = (next() % 24) as usize;
            // Mostly text, sometimes any byte (long codes).
            let src: Vec<u8> = (0..len)
                .map(|_| if round % 3 == 0 { next() as u8 } else { b"abc-/:0123 ELOxyz"[(next() % 17) as usize] })
                .collect();
            let mut enc = encoded(&src);
            assert_eq!(decoded(&enc).unwrap(), src);
            match next() % 4 {
                0 if !enc.is_empty() => {
                    let bit = (next() % (enc.len() as u64 * 8)) as usize;
                    enc[bit / 8] ^= 0x80 >> (bit % 8);
                }
                1 if !enc.is_empty() => enc.truncate((next() % enc.len() as u64) as usize),
                2 => enc.push(next() as u8),
                _ => {}
            }
            assert_eq!(decoded(&enc), reference(&enc), "input {enc:02x?}");
        }
        for b in 0..=255u8 {
            for c in [0x00, 0x7f, 0xfe, 0xff] {
                assert_eq!(decoded(&[b, c]), reference(&[b, c]), "input {b:02x} {c:02x}");
            }
        }
    }
}
