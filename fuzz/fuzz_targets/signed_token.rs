//! Signed client tokens (untrusted JWT text).
#![no_main]

use comet::token::TokenVerifier;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let verifier = TokenVerifier::new(vec![b"fuzzing-secret-0123".to_vec()], 30);
    let _ = verifier.verify(text, "u1", 1_800_000_000);
});
