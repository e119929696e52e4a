//! `Sec-WebSocket-Extensions` values, arbitrary bytes split into header fields at `\n`:
//! never panics, and an accepted negotiation always has a `permessage-deflate` offer
//! somewhere in the input.
#![no_main]

use comet::transport::ws::deflate::{Negotiation, negotiate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let outcome = negotiate(data.split(|&b| b == b'\n'));
    if outcome == Negotiation::Accepted {
        assert!(data.windows(18).any(|w| w == b"permessage-deflate"));
    }
});
