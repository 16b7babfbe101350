//! The checks of the `string_formats` fuzz target (input layout and
//! invariants: `fuzz_targets/string_formats.rs`), shared with
//! `tests/fuzz_regressions.rs`.

use wirestub_engine::call::formats::is_format;
use wirestub_plan::Format as F;

/// Every format, by its plan number.
const ALL: [F; 15] = [
    F::Hostname,
    F::Ip,
    F::Ipv4,
    F::Ipv6,
    F::Uri,
    F::UriRef,
    F::Address,
    F::HostAndPort,
    F::IpPrefix,
    F::Ipv4Prefix,
    F::Ipv6Prefix,
    F::IpWithPrefixlen,
    F::Ipv4WithPrefixlen,
    F::Ipv6WithPrefixlen,
    F::Email,
];

/// Runs the checks on one input.
pub fn check(data: &[u8]) {
    let is = |f: F| is_format(f, data);
    let got: Vec<bool> = ALL.iter().map(|&f| is(f)).collect();
    let Ok(text) = std::str::from_utf8(data) else {
        assert!(got.iter().all(|g| !g), "{data:?} is not UTF-8");
        return;
    };
    assert_eq!(is(F::Ipv4), text.parse::<std::net::Ipv4Addr>().is_ok(), "{text:?}");
    assert_eq!(is(F::Ip), is(F::Ipv4) || is(F::Ipv6), "{text:?}");
    assert_eq!(is(F::Address), is(F::Hostname) || is(F::Ip), "{text:?}");
    assert!(!is(F::Uri) || is(F::UriRef), "{text:?}");
    for (strict, loose) in [
        (F::IpPrefix, F::IpWithPrefixlen),
        (F::Ipv4Prefix, F::Ipv4WithPrefixlen),
        (F::Ipv6Prefix, F::Ipv6WithPrefixlen),
        (F::Ipv4Prefix, F::IpPrefix),
        (F::Ipv6Prefix, F::IpPrefix),
        (F::Ipv4WithPrefixlen, F::IpWithPrefixlen),
        (F::Ipv6WithPrefixlen, F::IpWithPrefixlen),
    ] {
        assert!(!is(strict) || is(loose), "{text:?}: {strict:?} but not {loose:?}");
    }
    assert_eq!(is(F::IpWithPrefixlen), is(F::Ipv4WithPrefixlen) || is(F::Ipv6WithPrefixlen), "{text:?}");
}
