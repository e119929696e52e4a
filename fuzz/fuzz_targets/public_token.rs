//! Public-key client tokens (untrusted JWT text) against a PEM set of RSA, P-256 and
//! Ed25519 keys: header, kid choice, the signature check and the claim rules.
#![no_main]

use std::sync::{Arc, OnceLock};

use comet::token::keys::KeyStore;
use comet::token::{ClaimRules, TokenVerifier};
use libfuzzer_sys::fuzz_target;

const KEYS: &str = concat!(
    "kid: rsa-1\n",
    include_str!("../../src/token/testdata/rsa.pub"),
    "kid: ec-1\n",
    include_str!("../../src/token/testdata/ec.pub"),
    include_str!("../../src/token/testdata/ed.pub"),
);

fn verifier() -> &'static TokenVerifier {
    static VERIFIER: OnceLock<TokenVerifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("comet-fuzz-keys-{}", std::process::id()));
        std::fs::write(&path, KEYS).unwrap();
        let store = KeyStore::open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        TokenVerifier::new(vec![b"fuzzing-secret-0123".to_vec()], 30)
            .with_public_keys(Arc::new(store))
            .with_rules(ClaimRules {
                audience: Some("comet".into()),
                issuer: Some("auth".into()),
                max_age_secs: Some(3600),
            })
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = verifier().verify(text, "u1", 1_800_000_000);
});
