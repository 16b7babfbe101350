//! Fuzzes the string formats validation checks natively,
//! `wirestub_engine::call::formats` (host names, IP addresses and
//! prefixes, URIs, e-mail addresses, host and port pairs).
//!
//! Input layout: the text (any bytes, UTF-8 or not).
//!
//! Invariants: no check panics. The formats agree with each other and with
//! the standard library: an IP is an IPv4 or an IPv6 address (IPv4 exactly
//! what `Ipv4Addr` parses); an address is a host name or an IP; a strict
//! prefix is also a prefix with a length; a URI is a URI reference; a
//! version-specific prefix is a prefix of either version; bytes that are
//! not UTF-8 are of no format.
#![no_main]

#[path = "../checks/string_formats.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
