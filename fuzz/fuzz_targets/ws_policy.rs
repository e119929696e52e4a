//! The upgrade's policy checks on header fields of arbitrary bytes (past what httparse
//! would let through: any name, any value, NUL, CR, LF, invalid UTF-8), and the origin
//! matcher against arbitrary patterns: never panics, and a match really matches.
//!
//! Input: a length-prefixed allowed-origin pattern, then a length-prefixed origin, then a
//! flags byte (bit i: start with a well-formed field i of `VALID`, so that the fuzzer
//! reaches the accepting path and mutates from there), then header fields as (name
//! selector, length-prefixed value) until the input ends.
#![no_main]

use base64::Engine;
use comet::config::UpgradePolicy;
use comet::transport::ws::handshake::{check_headers, origin_matches};
use libfuzzer_sys::fuzz_target;

/// The names the policy reads, so that the fuzzer reaches every check; a selector past
/// them takes the name from the input.
const NAMES: [&str; 7] = [
    "Host",
    "Upgrade",
    "Connection",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Key",
    "Origin",
    "origin",
];

/// A field list that passes every check (the `Origin` is matched against the origin
/// taken from the input).
const VALID: [(&str, &[u8]); 5] = [
    ("Host", b"127.0.0.1"),
    ("Upgrade", b"websocket"),
    ("Connection", b"keep-alive, Upgrade"),
    ("Sec-WebSocket-Version", b"13"),
    ("Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
];

fn take<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let Some((&len, rest)) = data.split_first() else {
        return &[];
    };
    let (field, rest) = rest.split_at(usize::from(len).min(rest.len()));
    *data = rest;
    field
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let pattern = String::from_utf8_lossy(take(&mut data)).into_owned();
    let origin = take(&mut data);
    check_origin_match(&pattern, origin);

    let mut names = Vec::new();
    let mut values = Vec::new();
    let flags = data.split_first().map_or(0, |(&flags, rest)| {
        data = rest;
        flags
    });
    for (i, (name, value)) in VALID.iter().enumerate() {
        if flags & (1 << i) != 0 {
            names.push((*name).to_owned());
            values.push(*value);
        }
    }
    if flags & (1 << 5) != 0 {
        names.push("Origin".to_owned());
        values.push(origin);
    }
    while let Some((&selector, rest)) = data.split_first() {
        data = rest;
        let name = match NAMES.get(usize::from(selector)) {
            Some(name) => (*name).to_owned(),
            None => String::from_utf8_lossy(take(&mut data)).into_owned(),
        };
        names.push(name);
        values.push(take(&mut data));
    }
    let headers: Vec<httparse::Header<'_>> = names
        .iter()
        .zip(&values)
        .map(|(name, value)| httparse::Header { name, value })
        .collect();
    let policy = UpgradePolicy {
        path: "/ws".into(),
        sse_path: "/sse".into(),
        allowed_origins: vec![pattern],
    };
    if let Ok(key) = check_headers(&headers, &policy) {
        let nonce = base64::engine::general_purpose::STANDARD.decode(&key);
        assert_eq!(nonce.map(|n| n.len()).ok(), Some(16), "{key:?}");
    }
});

/// A match is an exact (ASCII case-insensitive) match, or for a `*` pattern: the prefix,
/// then one or more non-empty ASCII labels, then the suffix.
fn check_origin_match(pattern: &str, origin: &[u8]) {
    let matched = origin_matches(pattern, origin);
    match pattern.split_once('*') {
        None => assert_eq!(matched, pattern.as_bytes().eq_ignore_ascii_case(origin)),
        Some((prefix, suffix)) if matched => {
            assert!(origin.len() > prefix.len() + suffix.len());
            assert!(origin[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes()));
            assert!(origin[origin.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes()));
            let middle = &origin[prefix.len()..origin.len() - suffix.len()];
            assert!(middle.is_ascii() && !middle.contains(&b'/'));
        }
        Some(_) => {}
    }
}
