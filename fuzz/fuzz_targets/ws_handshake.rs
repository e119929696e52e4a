//! WebSocket upgrade requests (HTTP head and the `t` token object).
#![no_main]

use comet::transport::ws::handshake::{UpgradePolicy, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let policy = UpgradePolicy {
        path: "/ws".into(),
        allowed_origins: vec!["https://*.example.com".into()],
    };
    let _ = parse_request(data, &policy);
});
