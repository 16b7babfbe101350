//! The string formats protovalidate defines (host names, IP addresses and
//! prefixes, URIs, e-mail addresses, host and port pairs), checked by hand
//! on the text: one definition for the wire checks of the standard rules
//! (`Op::Format`) and for protovalidate's CEL functions (`isUri()`, ...).
//! Each is linear in the text and allocates nothing but the decoded
//! escapes of a URI's host.

use std::net::{Ipv4Addr, Ipv6Addr};
use wirestub_plan::Format;

/// Whether `text` is a well-formed value of `format`.
pub fn is_format(format: Format, text: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(text) else { return false };
    match format {
        Format::Hostname => is_hostname(s),
        Format::Ip => is_ip(s, 0),
        Format::Ipv4 => is_ip(s, 4),
        Format::Ipv6 => is_ip(s, 6),
        Format::Uri => is_uri(s, false),
        Format::UriRef => is_uri(s, true),
        Format::Address => is_hostname(s) || is_ip(s, 0),
        Format::HostAndPort => is_host_and_port(s, true),
        Format::IpPrefix => is_ip_prefix(s, 0, true),
        Format::Ipv4Prefix => is_ip_prefix(s, 4, true),
        Format::Ipv6Prefix => is_ip_prefix(s, 6, true),
        Format::IpWithPrefixlen => is_ip_prefix(s, 0, false),
        Format::Ipv4WithPrefixlen => is_ip_prefix(s, 4, false),
        Format::Ipv6WithPrefixlen => is_ip_prefix(s, 6, false),
        Format::Email => is_email(s),
    }
}

/// An IP address of `version` (0: either): IPv4 in dotted decimal, IPv6
/// with a zone (`fe80::1%eth0`) or without.
pub fn is_ip(s: &str, version: i64) -> bool {
    let v4 = || s.parse::<Ipv4Addr>().is_ok();
    // A zone follows a plain IPv6 address, not one ending in IPv4 form.
    let v6 = || match s.split_once('%') {
        Some((addr, zone)) => !zone.is_empty() && !addr.contains('.') && addr.parse::<Ipv6Addr>().is_ok(),
        None => s.parse::<Ipv6Addr>().is_ok(),
    };
    match version {
        0 => v4() || v6(),
        4 => v4(),
        6 => v6(),
        _ => false,
    }
}

/// An address and a prefix length (`10.0.0.0/8`) of `version` (0:
/// either); `strict`: the address has no bits set past the prefix.
pub fn is_ip_prefix(s: &str, version: i64, strict: bool) -> bool {
    if !matches!(version, 0 | 4 | 6) {
        return false;
    }
    let Some((addr, len)) = s.split_once('/') else { return false };
    let digits = !len.is_empty() && len.len() <= 3 && len.bytes().all(|b| b.is_ascii_digit());
    if !digits || (len.len() > 1 && len.starts_with('0')) {
        return false;
    }
    let Ok(len) = len.parse::<u32>() else { return false };
    let bits: Option<(u128, u32)> = match (addr.parse::<Ipv4Addr>(), addr.parse::<Ipv6Addr>()) {
        (Ok(a), _) if version != 6 => Some((u32::from(a) as u128, 32)),
        (_, Ok(a)) if version != 4 => Some((u128::from(a), 128)),
        _ => None,
    };
    let Some((value, width)) = bits else { return false };
    if len > width {
        return false;
    }
    // The host bits: `width - len` of them, from 0 to 128.
    let host = u128::MAX.checked_shr(128 - (width - len)).unwrap_or(0);
    !strict || value & host == 0
}

/// RFC 1034 host names: at most 253 characters (a trailing dot aside),
/// labels of 1 to 63 letters, digits and hyphens, not starting or ending
/// with a hyphen, the last label not all digits.
pub fn is_hostname(s: &str) -> bool {
    if s.len() > 253 {
        return false;
    }
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() {
        return false;
    }
    let mut last_all_digits = false;
    for label in s.split('.') {
        if !is_label(label.as_bytes()) {
            return false;
        }
        last_all_digits = label.bytes().all(|c| c.is_ascii_digit());
    }
    !last_all_digits
}

/// A DNS label: 1 to 63 letters, digits and hyphens, not starting or
/// ending with a hyphen.
fn is_label(b: &[u8]) -> bool {
    !b.is_empty()
        && b.len() <= 63
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

/// An e-mail address as the HTML standard defines a valid one: a local
/// part of letters, digits and ``.!#$%&'*+/=?^_`{|}~-``, `@`, and a
/// domain of DNS labels.
pub fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else { return false };
    let local_ok =
        !local.is_empty() && local.bytes().all(|c| c.is_ascii_alphanumeric() || b".!#$%&'*+/=?^_`{|}~-".contains(&c));
    local_ok && !domain.is_empty() && domain.split('.').all(|l| is_label(l.as_bytes()))
}

/// A host (a host name, an IPv4 address or a bracketed IPv6 address) and
/// a port from 0 to 65535: `example.com:443`, `[::1]:80`; the port may be
/// left out unless `port_required`.
pub fn is_host_and_port(s: &str, port_required: bool) -> bool {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else { return false };
        if !is_ip(v6, 6) {
            return false;
        }
        match after {
            "" => return !port_required,
            _ => match after.strip_prefix(':') {
                Some(p) => (None, Some(p)),
                None => return false,
            },
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(s), None),
        }
    };
    if let Some(h) = host {
        if !(is_hostname(h) || is_ip(h, 4)) {
            return false;
        }
    }
    match port {
        None => !port_required,
        Some(p) => {
            let digits = !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
            digits && (p == "0" || !p.starts_with('0')) && p.parse::<u32>().is_ok_and(|n| n <= 65535)
        }
    }
}

/// RFC 3986 `unreserved`.
fn unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-._~".contains(&c)
}

/// RFC 3986 `sub-delims`.
fn sub_delim(c: u8) -> bool {
    b"!$&'()*+,;=".contains(&c)
}

/// Whether `s` is made of characters `ok` accepts and `%XX` escapes.
fn escaped(s: &[u8], ok: impl Fn(u8) -> bool) -> bool {
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = |j: usize| s.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return false;
            }
            i += 3;
        } else if ok(s[i]) {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

/// RFC 3986 `pchar` (without the escapes).
fn pchar(c: u8) -> bool {
    unreserved(c) || sub_delim(c) || c == b':' || c == b'@'
}

/// A URI (RFC 3986 `URI`), or with `reference` a URI reference (`URI` or
/// `relative-ref`, which may be empty).
pub fn is_uri(s: &str, reference: bool) -> bool {
    let b = s.as_bytes();
    let (rest, fragment) = match b.iter().position(|&c| c == b'#') {
        Some(i) => (&b[..i], Some(&b[i + 1..])),
        None => (b, None),
    };
    let (rest, query) = match rest.iter().position(|&c| c == b'?') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let tail_ok = |part: Option<&[u8]>| part.is_none_or(|p| escaped(p, |c| pchar(c) || c == b'/' || c == b'?'));
    if !tail_ok(fragment) || !tail_ok(query) {
        return false;
    }
    // A scheme: a letter, then letters, digits, `+`, `-` and `.`, up to
    // the first `:`, before any `/`.
    let colon = rest.iter().position(|&c| c == b':');
    let slash = rest.iter().position(|&c| c == b'/');
    let scheme = colon.filter(|&i| slash.is_none_or(|s| i < s)).map(|i| &rest[..i]);
    let hier = match scheme {
        Some(sc) => {
            let valid = sc.first().is_some_and(u8::is_ascii_alphabetic)
                && sc.iter().all(|&c| c.is_ascii_alphanumeric() || b"+-.".contains(&c));
            if !valid {
                return false;
            }
            &rest[sc.len() + 1..]
        }
        None if !reference => return false,
        // `path-noscheme`: a first segment without `:` (checked above: no
        // `:` before the first `/`).
        None => rest,
    };
    match hier.strip_prefix(b"//") {
        Some(after) => {
            let end = after.iter().position(|&c| c == b'/').unwrap_or(after.len());
            is_authority(&after[..end]) && path_ok(&after[end..])
        }
        None => path_ok(hier),
    }
}

/// Path segments: `pchar`s separated by `/`.
fn path_ok(p: &[u8]) -> bool {
    escaped(p, |c| pchar(c) || c == b'/')
}

/// RFC 3986 `authority`: `[userinfo@]host[:port]`.
fn is_authority(a: &[u8]) -> bool {
    let (userinfo, hostport) = match a.iter().rposition(|&c| c == b'@') {
        Some(i) => (Some(&a[..i]), &a[i + 1..]),
        None => (None, a),
    };
    if userinfo.is_some_and(|u| !escaped(u, |c| unreserved(c) || sub_delim(c) || c == b':')) {
        return false;
    }
    let (host, port) = if hostport.first() == Some(&b'[') {
        let Some(close) = hostport.iter().position(|&c| c == b']') else { return false };
        let literal = &hostport[1..close];
        if !is_ip_literal(literal) {
            return false;
        }
        match &hostport[close + 1..] {
            [] => (None, None),
            [b':', port @ ..] => (None, Some(port)),
            _ => return false,
        }
    } else {
        match hostport.iter().rposition(|&c| c == b':') {
            Some(i) => (Some(&hostport[..i]), Some(&hostport[i + 1..])),
            None => (Some(hostport), None),
        }
    };
    // A registered name's escapes must decode to UTF-8.
    let host_ok = host.is_none_or(|h| {
        escaped(h, |c| unreserved(c) || sub_delim(c))
            && std::str::from_utf8(h)
                .is_ok_and(|t| std::str::from_utf8(&crate::codec::percent::decode_bytes(t, false)).is_ok())
    });
    host_ok && port.is_none_or(|p| p.iter().all(u8::is_ascii_digit))
}

/// What RFC 3986 (and RFC 6874's zones, `%25` escaped) allows between
/// brackets: an IPv6 address, or `vX.` and a future format.
fn is_ip_literal(l: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(l) else { return false };
    if let Some(future) = s.strip_prefix('v').or_else(|| s.strip_prefix('V')) {
        let Some((version, rest)) = future.split_once('.') else { return false };
        return !version.is_empty()
            && version.bytes().all(|c| c.is_ascii_hexdigit())
            && !rest.is_empty()
            && rest.bytes().all(|c| unreserved(c) || sub_delim(c) || c == b':');
    }
    match s.split_once("%25") {
        Some((addr, zone)) => {
            addr.parse::<Ipv6Addr>().is_ok() && !zone.is_empty() && escaped(zone.as_bytes(), unreserved)
        }
        None => s.parse::<Ipv6Addr>().is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        for ok in [
            "https://example.com",
            "https://user:pw@example.com:8080/a/b?q=1#top",
            "mailto:someone@example.com",
            "urn:isbn:0451450523",
            "http://[::1]:80/",
            "http://[fe80::1%25eth0]/",
            "http://[v1.fe]/",
            "file:///etc/hosts",
            "http://example.com/%20",
        ] {
            assert!(is_uri(ok, false), "{ok}");
        }
        for bad in [
            "",
            "example.com",
            "/a/b",
            "1http://x",
            "http://exa mple.com",
            "http://[::1/",
            "http://x/%zz",
            "http://x:8a/",
            "http://%ff/",
        ] {
            assert!(!is_uri(bad, false), "{bad}");
        }
        for ok in ["", "/a/b", "a/b", "?q", "#f", "//host/p", "../x", "https://example.com"] {
            assert!(is_uri(ok, true), "{ok}");
        }
        for bad in ["a:b:c d", "%", "/a b"] {
            assert!(!is_uri(bad, true), "{bad}");
        }
    }

    #[test]
    fn prefixes_hosts_and_emails() {
        assert!(is_ip_prefix("10.0.0.0/8", 0, true));
        assert!(!is_ip_prefix("10.0.0.1/8", 0, true));
        assert!(is_ip_prefix("10.0.0.1/8", 4, false));
        assert!(!is_ip_prefix("10.0.0.1/33", 4, false));
        assert!(!is_ip_prefix("10.0.0.1/08", 4, false));
        assert!(is_ip_prefix("2001:db8::/32", 6, true));
        assert!(!is_ip_prefix("2001:db8::/32", 4, true));
        assert!(is_ip_prefix("::/0", 0, true));
        assert!(!is_ip_prefix("10.0.0.0/8", 5, false));
        assert!(!is_ip("::ffff:1.2.3.4%eth0", 6));
        assert!(is_ip("fe80::1%eth0", 6));
        assert!(!is_hostname(&format!("{}.", "a".repeat(253))));
        assert!(is_uri("http://%C3%A9.example/", false));
        assert!(is_host_and_port("example.com:443", true));
        assert!(is_host_and_port("[::1]:80", true));
        assert!(is_host_and_port("127.0.0.1:0", true));
        assert!(!is_host_and_port("example.com", true));
        assert!(is_host_and_port("example.com", false));
        assert!(!is_host_and_port("example.com:65536", true));
        assert!(!is_host_and_port("example.com:080", true));
        assert!(!is_host_and_port("::1:80", true));
        assert!(is_email("a.b+c@example.co"));
        assert!(!is_email("a@b@c"));
        assert!(!is_email("a@-b.com"));
        assert!(!is_email("@b.com"));
        assert!(!is_email("a b@c.com"));
    }
}
