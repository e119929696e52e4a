//! Public-key client tokens end to end: keys made by `openssl genpkey`, tokens signed by
//! `openssl` (an independent implementation of RS256, ES256 and EdDSA), checked by the
//! real binary; the JWKS form, and the SIGHUP reload (a broken file keeps the old keys).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Comet, MessageServer, temp_dir, wait_until};
use serde_json::{Value, json};

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A private key made by `openssl genpkey` and its public PEM.
struct Key {
    private: PathBuf,
    public_pem: String,
    kind: &'static str,
}

impl Key {
    fn new(dir: &Path, name: &str, kind: &'static str) -> Key {
        let private = dir.join(format!("{name}.pem"));
        let p = private.to_str().unwrap();
        let options: &[&str] = match kind {
            "RS256" => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            "ES256" => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            _ => &["-algorithm", "ed25519"],
        };
        openssl(&[&["genpkey", "-out", p][..], options].concat());
        let public_pem = String::from_utf8(openssl(&["pkey", "-in", p, "-pubout"])).unwrap();
        Key {
            private,
            public_pem,
            kind,
        }
    }

    /// The Ed25519 public key as a JWK (the last 32 bytes of its DER form).
    fn ed_jwk(&self, kid: &str) -> Value {
        let der = openssl(&[
            "pkey",
            "-in",
            self.private.to_str().unwrap(),
            "-pubout",
            "-outform",
            "DER",
        ]);
        json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": URL_SAFE_NO_PAD.encode(&der[der.len() - 32..])})
    }

    /// A compact JWS of `header` and `claims`, signed by openssl with this key.
    fn sign(&self, header: Value, claims: Value) -> String {
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let input = self.private.with_extension("input");
        std::fs::write(&input, &signed).unwrap();
        let (key, input) = (self.private.to_str().unwrap(), input.to_str().unwrap());
        let signature = match self.kind {
            "RS256" => openssl(&["dgst", "-sha256", "-sign", key, input]),
            "ES256" => der_to_raw_ecdsa(&openssl(&["dgst", "-sha256", "-sign", key, input])),
            _ => openssl(&["pkeyutl", "-sign", "-inkey", key, "-rawin", "-in", input]),
        };
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
}

/// openssl writes ECDSA signatures as DER `SEQUENCE { INTEGER r, INTEGER s }`; JWS wants
/// r and s as 32 bytes each (RFC 7518 section 3.4).
fn der_to_raw_ecdsa(der: &[u8]) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut at = 2;
    for _ in 0..2 {
        assert_eq!(der[at], 0x02, "INTEGER");
        let len = der[at + 1] as usize;
        let int = &der[at + 2..at + 2 + len];
        let int = &int[int.len().saturating_sub(32)..];
        raw.extend(std::iter::repeat_n(0, 32 - int.len()));
        raw.extend_from_slice(int);
        at += 2 + len;
    }
    raw
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "iat": now(), "exp": now() + 600, "aud": "comet", "iss": "auth"})
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn refused(node: &Comet, conn_id: &str, token: &str, reason: &str) {
    assert_eq!(
        common::refusal_status(node.connect(conn_id, token, "")),
        401,
        "{conn_id}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || node.log_text().contains(reason)),
        "{conn_id}: no log line with {reason:?}"
    );
}

#[test]
fn rs256_es256_and_eddsa_tokens_are_verified_and_each_refusal_says_why() {
    let dir = temp_dir("tokens");
    let rsa = Key::new(&dir, "rsa", "RS256");
    let ec = Key::new(&dir, "ec", "ES256");
    let ed = Key::new(&dir, "ed", "EdDSA");
    let stranger = Key::new(&dir, "stranger", "EdDSA");
    let keys = dir.join("keys.pem");
    std::fs::write(
        &keys,
        format!(
            "kid: rsa-1\n{}kid: ec-1\n{}kid: ed-1\n{}",
            rsa.public_pem, ec.public_pem, ed.public_pem
        ),
    )
    .unwrap();
    let server = MessageServer::start();
    let node = Comet::start(
        Some(&server),
        &format!(
            "token_public_keys={}\ntoken_audience=comet\ntoken_issuer=auth\ntoken_max_age=3600s\ntoken_leeway=5s",
            keys.display()
        ),
    );
    let mut held = Vec::new();
    for (key, kid, conn_id) in [
        (&rsa, "rsa-1", "r1"),
        (&ec, "ec-1", "e1"),
        (&ed, "ed-1", "d1"),
    ] {
        let token = key.sign(json!({"alg": key.kind, "kid": kid}), claims(conn_id));
        held.push(
            node.connect(conn_id, &token, "")
                .unwrap_or_else(|e| panic!("{conn_id}: {e}")),
        );
    }
    assert!(wait_until(Duration::from_secs(10), || server
        .calls_of("online")
        .len()
        == 3));
    assert!(server.calls_of("checkToken").is_empty());

    let ed_header = json!({"alg": "EdDSA", "kid": "ed-1"});
    refused(
        &node,
        "x1",
        &stranger.sign(ed_header.clone(), claims("x1")),
        "bad signature",
    );
    let es_as_rsa = ec.sign(json!({"alg": "ES256", "kid": "rsa-1"}), claims("x2"));
    refused(&node, "x2", &es_as_rsa, "alg ES256 does not match key");
    let expired = with(
        with(claims("x3"), "exp", json!(now() - 60)),
        "iat",
        json!(now() - 120),
    );
    refused(
        &node,
        "x3",
        &ed.sign(ed_header.clone(), expired),
        "expired at",
    );
    let aud = with(claims("x4"), "aud", json!("elsewhere"));
    refused(
        &node,
        "x4",
        &ed.sign(ed_header.clone(), aud),
        "does not include",
    );
    let iss = with(claims("x5"), "iss", json!("mallory"));
    refused(&node, "x5", &ed.sign(ed_header.clone(), iss), "mallory");
    let long = with(claims("x6"), "exp", json!(now() + 7200));
    refused(
        &node,
        "x6",
        &ed.sign(ed_header.clone(), long),
        "longer than token_max_age",
    );
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
        URL_SAFE_NO_PAD.encode(claims("x7").to_string())
    );
    refused(&node, "x7", &none, "unsupported algorithm");
    assert_eq!(
        server.calls_of("online").len(),
        3,
        "no refused client went online"
    );
}

#[test]
fn a_jwks_with_two_kids_reloads_on_sighup_and_a_broken_file_keeps_the_old_keys() {
    let dir = temp_dir("jwks");
    let first = Key::new(&dir, "first", "EdDSA");
    let second = Key::new(&dir, "second", "EdDSA");
    let keys = dir.join("keys.jwks");
    let write = |jwks: Value| std::fs::write(&keys, jwks.to_string()).unwrap();
    write(json!({"keys": [first.ed_jwk("a")]}));
    let server = MessageServer::start();
    let node = Comet::start(
        Some(&server),
        &format!("token_public_keys={}", keys.display()),
    );
    let token = |key: &Key, kid: &str, sub: &str| {
        key.sign(json!({"alg": "EdDSA", "kid": kid}), claims(sub))
    };
    let _a = node.connect("a1", &token(&first, "a", "a1"), "").unwrap();
    refused(&node, "b1", &token(&second, "b", "b1"), "no key with kid");

    write(json!({"keys": [first.ed_jwk("a"), second.ed_jwk("b")]}));
    let hangup = |count: usize, line: &str| {
        common::signal(node.pid(), "HUP");
        assert!(
            wait_until(Duration::from_secs(10), || node
                .log_text()
                .matches(line)
                .count()
                == count),
            "{line}"
        );
    };
    hangup(1, "SIGHUP: token_public_keys reloaded");
    let _b = node.connect("b2", &token(&second, "b", "b2"), "").unwrap();
    let _a = node.connect("a2", &token(&first, "a", "a2"), "").unwrap();

    std::fs::write(&keys, "{\"keys\": [").unwrap();
    hangup(
        1,
        "SIGHUP: token_public_keys not reloaded; the old keys stay",
    );
    let _b = node.connect("b3", &token(&second, "b", "b3"), "").unwrap();
    assert!(wait_until(Duration::from_secs(10), || server
        .calls_of("online")
        .len()
        == 4));
}

#[test]
fn the_documented_openssl_signer_makes_tokens_the_node_accepts() {
    let dir = temp_dir("doc-signer");
    let issuer = Key::new(&dir, "issuer", "EdDSA");
    let keys = dir.join("keys.pem");
    std::fs::write(&keys, format!("kid: issuer-1\n{}", issuer.public_pem)).unwrap();
    let server = MessageServer::start();
    let node = Comet::start(
        Some(&server),
        &format!("token_public_keys={}\ntoken_max_age=3600s", keys.display()),
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/sign_token_eddsa.sh");
    let sign = |conn_id: &str, ttl: &str| {
        let out = Command::new("sh")
            .arg(&script)
            .args([issuer.private.to_str().unwrap(), "issuer-1", conn_id, ttl])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let _client = node.connect("doc-1", &sign("doc-1", "60"), "").unwrap();
    refused(
        &node,
        "doc-2",
        &sign("doc-2", "7200"),
        "longer than token_max_age",
    );
    assert!(wait_until(Duration::from_secs(10), || server
        .calls_of("online")
        .len()
        == 1));
}
