//! WebSocket upgrade requests (HTTP head and the `t` token object).
#![no_main]

use comet::transport::ws::handshake::parse_request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_request(data, "/ws");
});
