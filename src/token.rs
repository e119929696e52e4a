//! Signed client tokens: local verification of HMAC-SHA256 JSON Web Tokens (HS256), so a
//! node can admit a client without the `checkToken` round trip.
//!
//! The token (the `token` field of the `t` parameter) is a compact JWT whose claims are
//! `sub` (the conn_id; must equal `conn_id` in `t`), `exp` (required), optional `iat` /
//! `nbf`, and an optional `info` string that, being signed, replaces `t`'s `info`. Two
//! secrets may be configured so that keys rotate without refusing anyone. Pure: no I/O,
//! the caller passes the current time.
//!
//! Public-key tokens (RS256, ES256, EdDSA) are checked against `token_public_keys`
//! ([`keys`]). The algorithm is bound to the key: HS256 only ever uses the secrets,
//! RS256 only RSA keys, ES256 only P-256 keys, EdDSA only Ed25519 keys; `none` and every
//! other `alg` are refused. The signature check itself is the `jsonwebtoken` crate's; the
//! header and claims are parsed here so that every refusal has its own reason.

pub mod client;
pub mod keys;

pub use client::{ClientToken, token_from_json, token_from_parts};

use std::sync::Arc;

use keys::{KeyStore, KeyType, Pick};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a signed token was refused. The text is what the log says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// A part decodes but is not what a token holds: serde's words name the field (a
    /// missing `sub`, an `exp` that is text; a quoted value comes escaped), cut short.
    #[error("malformed token: the {part} is not the expected JSON: {why}")]
    Shape { part: &'static str, why: String },
    #[error("unsupported algorithm {0:?} (HS256, RS256, ES256 or EdDSA)")]
    Algorithm(String),
    #[error("{alg} token, but no {wanted} is configured")]
    NoKeyFor {
        alg: &'static str,
        wanted: &'static str,
    },
    #[error("no key with kid {0:?}")]
    UnknownKid(String),
    #[error("token without kid, and {found} {key_type} keys are loaded (exactly one needed)")]
    AmbiguousKey {
        key_type: &'static str,
        found: usize,
    },
    #[error("alg {alg} does not match key {kid:?}, a {key_type} key")]
    AlgorithmMismatch {
        alg: &'static str,
        kid: Option<String>,
        key_type: &'static str,
    },
    #[error("crit header {0:?} is not understood")]
    Critical(String),
    #[error("no exp claim")]
    MissingExp,
    #[error("lifetime {lifetime} s is longer than token_max_age {max} s")]
    TooLong { lifetime: u64, max: u64 },
    #[error("audience {got:?} does not include {expected:?}")]
    Audience { expected: String, got: Vec<String> },
    #[error("issuer {got:?} is not {expected:?}")]
    Issuer {
        expected: String,
        got: Option<String>,
    },
    #[error("bad signature (tampered, or signed with another secret)")]
    Signature,
    #[error("expired at {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
    #[error("not valid before {nbf} (now {now})")]
    NotYetValid { nbf: u64, now: u64 },
    #[error("issued in the future at {iat} (now {now})")]
    FutureDated { iat: u64, now: u64 },
    #[error("token is for conn_id {signed:?}, not {claimed:?}")]
    WrongConnId { signed: String, claimed: String },
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

/// `aud`: one string or an array of them (RFC 7519 section 4.1.3).
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default, deserialize_with = "numeric_date")]
    exp: Option<u64>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    iss: Option<String>,
    #[serde(default, deserialize_with = "numeric_date")]
    nbf: Option<u64>,
    #[serde(default, deserialize_with = "numeric_date")]
    iat: Option<u64>,
    #[serde(default)]
    info: Option<String>,
}

/// A NumericDate (RFC 7519 section 2): seconds since the epoch, where a fraction is
/// allowed (PyJWT passes `time.time() + 60` through as it is); kept as whole seconds,
/// the fraction dropped. Negative or not a number: the claim is malformed.
fn numeric_date<'de, D: serde::Deserializer<'de>>(date: D) -> Result<Option<u64>, D::Error> {
    let number = serde_json::Number::deserialize(date)?;
    if let Some(whole) = number.as_u64() {
        return Ok(Some(whole));
    }
    match number.as_f64() {
        Some(seconds) if (0.0..1.8e19).contains(&seconds) => Ok(Some(seconds as u64)),
        _ => Err(serde::de::Error::custom(format!(
            "a NumericDate is a non-negative number of seconds, not {number}"
        ))),
    }
}

/// What a valid token says beyond the conn_id.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    /// The signed `info`, when the token carries one.
    pub info: Option<String>,
}

/// What every token's claims must also satisfy (`token_audience`, `token_issuer`,
/// `token_max_age`); the default requires nothing more.
#[derive(Debug, Clone, Default)]
pub struct ClaimRules {
    /// `aud` must be (or include) this.
    pub audience: Option<String>,
    /// `iss` must be this.
    pub issuer: Option<String>,
    /// The longest lifetime accepted, seconds: `exp - iat`, or `exp - now` without `iat`.
    pub max_age_secs: Option<u64>,
}

/// Verifies tokens against the current secret and, during a rotation, the previous one,
/// and public-key tokens against the loaded key set.
#[derive(Clone)]
pub struct TokenVerifier {
    secrets: Vec<Vec<u8>>,
    leeway_secs: u64,
    public_keys: Option<Arc<KeyStore>>,
    rules: ClaimRules,
}

impl TokenVerifier {
    /// `secrets` in order of preference (current first); `leeway_secs` of clock skew are
    /// tolerated on every time claim.
    pub fn new(secrets: Vec<Vec<u8>>, leeway_secs: u64) -> TokenVerifier {
        TokenVerifier {
            secrets,
            leeway_secs,
            public_keys: None,
            rules: ClaimRules::default(),
        }
    }

    /// Also verifies RS256, ES256 and EdDSA tokens with `keys`.
    pub fn with_public_keys(mut self, keys: Arc<KeyStore>) -> TokenVerifier {
        self.public_keys = Some(keys);
        self
    }

    /// Adds the audience, issuer and lifetime rules.
    pub fn with_rules(mut self, rules: ClaimRules) -> TokenVerifier {
        self.rules = rules;
        self
    }

    /// The reloadable key set, if public keys are configured.
    pub fn public_keys(&self) -> Option<&Arc<KeyStore>> {
        self.public_keys.as_ref()
    }

    /// Checks `token` for `conn_id` at unix time `now`.
    pub fn verify(&self, token: &str, conn_id: &str, now: u64) -> Result<Verified, TokenError> {
        let malformed = TokenError::Malformed("expected header.payload.signature");
        let (signed, signature) = token.rsplit_once('.').ok_or(malformed.clone())?;
        let (header, payload) = signed.split_once('.').ok_or(malformed.clone())?;
        if payload.contains('.') {
            return Err(malformed);
        }
        let header: Header = decode_json(header, "header")?;
        if let Some(crit) = header.crit {
            return Err(TokenError::Critical(crit.to_string()));
        }
        let signature_bytes = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
        if header.alg == "HS256" {
            if self.secrets.is_empty() {
                return Err(TokenError::NoKeyFor {
                    alg: "HS256",
                    wanted: "token_secret",
                });
            }
            if !self.signature_matches(signed.as_bytes(), &signature_bytes) {
                return Err(TokenError::Signature);
            }
        } else {
            self.check_public_signature(&header, signed, signature)?;
        }
        let claims: Claims = decode_json(payload, "payload")?;
        self.check_claims(&claims, conn_id, now)?;
        Ok(Verified { info: claims.info })
    }

    /// RS256, ES256, EdDSA: the key `kid` picks, of the type `alg` needs, only.
    fn check_public_signature(
        &self,
        header: &Header,
        signed: &str,
        signature: &str,
    ) -> Result<(), TokenError> {
        let Some(wanted) = KeyType::for_alg(&header.alg) else {
            return Err(TokenError::Algorithm(header.alg.clone()));
        };
        let alg = wanted.algorithm_name();
        let Some(store) = &self.public_keys else {
            return Err(TokenError::NoKeyFor {
                alg,
                wanted: "token_public_keys",
            });
        };
        let set = store.current();
        let key = set
            .pick(header.kid.as_deref(), wanted)
            .map_err(|pick| match pick {
                Pick::UnknownKid => TokenError::UnknownKid(header.kid.clone().unwrap_or_default()),
                Pick::Ambiguous(found) => TokenError::AmbiguousKey {
                    key_type: wanted.name(),
                    found,
                },
            })?;
        if key.key_type != wanted {
            return Err(TokenError::AlgorithmMismatch {
                alg,
                kid: key.kid.clone(),
                key_type: key.key_type.name(),
            });
        }
        match jsonwebtoken::crypto::verify(
            signature,
            signed.as_bytes(),
            &key.decoding,
            wanted.algorithm(),
        ) {
            Ok(true) => Ok(()),
            // A signature of the wrong length for the key is a bad signature too.
            Ok(false) | Err(_) => Err(TokenError::Signature),
        }
    }

    fn signature_matches(&self, signed: &[u8], signature: &[u8]) -> bool {
        self.secrets.iter().any(|secret| {
            let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
            mac.update(signed);
            // Constant-time comparison.
            mac.verify_slice(signature).is_ok()
        })
    }

    fn check_claims(&self, claims: &Claims, conn_id: &str, now: u64) -> Result<(), TokenError> {
        let leeway = self.leeway_secs;
        let exp = claims.exp.ok_or(TokenError::MissingExp)?;
        if exp.saturating_add(leeway) <= now {
            return Err(TokenError::Expired { exp, now });
        }
        if let Some(nbf) = claims.nbf.filter(|nbf| *nbf > now.saturating_add(leeway)) {
            return Err(TokenError::NotYetValid { nbf, now });
        }
        if let Some(iat) = claims.iat.filter(|iat| *iat > now.saturating_add(leeway)) {
            return Err(TokenError::FutureDated { iat, now });
        }
        if claims.sub != conn_id {
            return Err(TokenError::WrongConnId {
                signed: claims.sub.clone(),
                claimed: conn_id.to_owned(),
            });
        }
        self.check_rules(claims, exp, now)
    }

    fn check_rules(&self, claims: &Claims, exp: u64, now: u64) -> Result<(), TokenError> {
        if let Some(max) = self.rules.max_age_secs {
            let lifetime = exp.saturating_sub(claims.iat.unwrap_or(now));
            if lifetime > max {
                return Err(TokenError::TooLong { lifetime, max });
            }
        }
        if let Some(expected) = &self.rules.audience {
            let got = match &claims.aud {
                None => Vec::new(),
                Some(Audience::One(one)) => vec![one.clone()],
                Some(Audience::Many(many)) => many.clone(),
            };
            if !got.contains(expected) {
                return Err(TokenError::Audience {
                    expected: expected.clone(),
                    got,
                });
            }
        }
        if let Some(expected) = &self.rules.issuer
            && claims.iss.as_ref() != Some(expected)
        {
            return Err(TokenError::Issuer {
                expected: expected.clone(),
                got: claims.iss.clone(),
            });
        }
        Ok(())
    }
}

/// What [`sign`] puts in a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant<'a> {
    /// The conn_id the token is for (`sub`).
    pub conn_id: &'a str,
    /// Signed client data (`info`), if any.
    pub info: Option<&'a str>,
    /// Issue time, Unix seconds (`iat`).
    pub now: u64,
    /// Seconds until it expires (`exp` = `now` + this).
    pub ttl_secs: u64,
}

/// Signs a client token (HS256), the form [`TokenVerifier::verify`] accepts: what
/// `comet token` prints, for tests and for message servers without a JWT library.
pub fn sign(secret: &[u8], grant: &Grant<'_>) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let mut claims = serde_json::json!({
        "sub": grant.conn_id,
        "iat": grant.now,
        "exp": grant.now.saturating_add(grant.ttl_secs),
    });
    if let Some(info) = grant.info {
        claims["info"] = serde_json::Value::from(info);
    }
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{payload}");
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(signed.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signed}.{signature}")
}

/// The longest serde explanation kept in a [`TokenError::Shape`] (it may quote a claim).
const SHAPE_WHY_CHARS: usize = 160;

fn decode_json<T: for<'de> Deserialize<'de>>(
    encoded: &str,
    part: &'static str,
) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| TokenError::Malformed("a part is not base64url"))?;
    // serde would take the array form of a struct too (`["RS256"]` as a header).
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(TokenError::Malformed("a part is not a JSON object"));
    }
    serde_json::from_slice(&bytes).map_err(|err| TokenError::Shape {
        part,
        why: err.to_string().chars().take(SHAPE_WHY_CHARS).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_token_verifies_and_expires() {
        let secret = b"0123456789abcdef0123";
        let grant = Grant {
            conn_id: "alice",
            info: Some("vip"),
            now: 1_000,
            ttl_secs: 60,
        };
        let token = super::sign(secret, &grant);
        let verifier = TokenVerifier::new(vec![secret.to_vec()], 0);
        assert_eq!(
            verifier.verify(&token, "alice", 1_030),
            Ok(Verified {
                info: Some("vip".into())
            })
        );
        assert!(matches!(
            verifier.verify(&token, "alice", 1_060),
            Err(TokenError::Expired { .. })
        ));
        assert!(matches!(
            verifier.verify(&token, "bob", 1_030),
            Err(TokenError::WrongConnId { .. })
        ));
    }

    fn sign(secret: &[u8], claims: serde_json::Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let mut mac = HmacSha256::new_from_slice(secret).unwrap();
        mac.update(format!("{header}.{payload}").as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{header}.{payload}.{signature}")
    }

    fn verifier() -> TokenVerifier {
        TokenVerifier::new(vec![b"current".to_vec(), b"previous".to_vec()], 30)
    }

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn valid_token_with_either_secret() {
        for secret in [&b"current"[..], b"previous"] {
            let token = sign(
                secret,
                serde_json::json!({"sub": "u1", "exp": NOW + 60, "info": "vip"}),
            );
            let verified = verifier().verify(&token, "u1", NOW).unwrap();
            assert_eq!(verified.info.as_deref(), Some("vip"));
        }
    }

    #[test]
    fn numeric_dates_may_have_fractions_but_not_signs() {
        let exp = NOW as f64 + 60.25;
        let token = sign(
            b"current",
            serde_json::json!({"sub": "u1", "exp": exp, "iat": NOW as f64 - 0.5}),
        );
        assert!(verifier().verify(&token, "u1", NOW).is_ok());
        assert!(matches!(
            verifier().verify(&token, "u1", NOW + 61 + 30),
            Err(TokenError::Expired { .. })
        ));
        for bad in [serde_json::json!(-1), serde_json::json!("1800000060")] {
            let token = sign(b"current", serde_json::json!({"sub": "u1", "exp": bad}));
            assert!(verifier().verify(&token, "u1", NOW).is_err(), "{bad}");
        }
    }

    #[test]
    fn refusals_say_why() {
        let v = verifier();
        let expired = sign(
            b"current",
            serde_json::json!({"sub": "u1", "exp": NOW - 31}),
        );
        assert!(matches!(
            v.verify(&expired, "u1", NOW),
            Err(TokenError::Expired { .. })
        ));
        let future = sign(
            b"current",
            serde_json::json!({"sub": "u1", "exp": NOW + 600, "iat": NOW + 300}),
        );
        assert!(matches!(
            v.verify(&future, "u1", NOW),
            Err(TokenError::FutureDated { .. })
        ));
        let early = sign(
            b"current",
            serde_json::json!({"sub": "u1", "exp": NOW + 600, "nbf": NOW + 300}),
        );
        assert!(matches!(
            v.verify(&early, "u1", NOW),
            Err(TokenError::NotYetValid { .. })
        ));
        let other = sign(
            b"stranger",
            serde_json::json!({"sub": "u1", "exp": NOW + 60}),
        );
        assert_eq!(v.verify(&other, "u1", NOW), Err(TokenError::Signature));
        let good = sign(
            b"current",
            serde_json::json!({"sub": "u1", "exp": NOW + 60}),
        );
        assert!(matches!(
            v.verify(&good, "u2", NOW),
            Err(TokenError::WrongConnId { .. })
        ));
        let mut tampered = good.clone().into_bytes();
        let middle = good.find('.').unwrap() + 3;
        tampered[middle] = if tampered[middle] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(v.verify(&tampered, "u1", NOW).is_err());
        assert!(matches!(
            v.verify("a.b", "u1", NOW),
            Err(TokenError::Malformed(_))
        ));
        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(br#"{"sub":"u1","exp":9999999999}"#)
        );
        assert!(matches!(
            v.verify(&none_alg, "u1", NOW),
            Err(TokenError::Algorithm(_))
        ));
    }

    #[test]
    fn a_header_or_payload_that_is_not_an_object_is_malformed() {
        let v = TokenVerifier::new(vec![b"0123456789abcdef".to_vec()], 0);
        let array_header = format!(
            "{}.{}.AAAA",
            URL_SAFE_NO_PAD.encode(br#"["HS256"]"#),
            URL_SAFE_NO_PAD.encode(br#"{"sub":"u1"}"#)
        );
        assert_eq!(
            v.verify(&array_header, "u1", NOW),
            Err(TokenError::Malformed("a part is not a JSON object"))
        );
    }

    #[test]
    fn a_claim_of_the_wrong_shape_is_named() {
        let v = TokenVerifier::new(vec![b"0123456789abcdef".to_vec()], 0);
        let no_sub = sign(b"0123456789abcdef", serde_json::json!({"exp": NOW + 60}));
        let err = v.verify(&no_sub, "u1", NOW).unwrap_err().to_string();
        assert!(err.contains("payload") && err.contains("`sub`"), "{err}");
        let numeric_sub = sign(
            b"0123456789abcdef",
            serde_json::json!({"sub": 7, "exp": NOW + 60}),
        );
        let err = v.verify(&numeric_sub, "u1", NOW).unwrap_err().to_string();
        assert!(err.contains("integer `7`"), "{err}");
    }
}

/// Public-key tokens. The keys are fixtures made by `openssl genpkey` (test only: their
/// private halves sign here with `jsonwebtoken`; the end-to-end test uses tokens made
/// by an independent tool).
#[cfg(test)]
mod public_key_tests {
    use std::io::Write;
    use std::sync::Arc;

    use jsonwebtoken::{Algorithm, EncodingKey, Header};

    use super::keys::KeyStore;
    use super::*;

    const NOW: u64 = 1_800_000_000;
    const PEMS: &str = concat!(
        "kid: rsa-1\n",
        include_str!("token/testdata/rsa.pub"),
        "kid: ec-1\n",
        include_str!("token/testdata/ec.pub"),
        "kid: ed-1\n",
        include_str!("token/testdata/ed.pub"),
    );

    fn key_file(text: &str) -> tempfile_path::TempPath {
        tempfile_path::TempPath::with(text)
    }

    /// A file under the target directory, removed at the end of the test.
    mod tempfile_path {
        pub(super) struct TempPath(pub(super) std::path::PathBuf);
        impl TempPath {
            pub(super) fn with(text: &str) -> TempPath {
                use std::sync::atomic::{AtomicU32, Ordering};
                static NEXT: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "comet-token-keys-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&path, text).unwrap();
                TempPath(path)
            }
            pub(super) fn write(&self, text: &str) {
                let mut file = std::fs::File::create(&self.0).unwrap();
                super::Write::write_all(&mut file, text.as_bytes()).unwrap();
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn verifier_for(text: &str, rules: ClaimRules) -> (TokenVerifier, tempfile_path::TempPath) {
        let file = key_file(text);
        let store = KeyStore::open(&file.0).unwrap();
        let verifier = TokenVerifier::new(vec![b"0123456789abcdef".to_vec()], 0)
            .with_public_keys(Arc::new(store))
            .with_rules(rules);
        (verifier, file)
    }

    fn token(alg: Algorithm, kid: Option<&str>, claims: serde_json::Value) -> String {
        let (pem, sign): (&str, fn(&[u8]) -> EncodingKey) = match alg {
            Algorithm::RS256 => (include_str!("token/testdata/rsa.pem"), |p| {
                EncodingKey::from_rsa_pem(p).unwrap()
            }),
            Algorithm::ES256 => (include_str!("token/testdata/ec.pem"), |p| {
                EncodingKey::from_ec_pem(p).unwrap()
            }),
            _ => (include_str!("token/testdata/ed.pem"), |p| {
                EncodingKey::from_ed_pem(p).unwrap()
            }),
        };
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, &claims, &sign(pem.as_bytes())).unwrap()
    }

    fn claims() -> serde_json::Value {
        serde_json::json!({"sub": "u1", "iat": NOW, "exp": NOW + 60, "info": "vip"})
    }

    #[test]
    fn each_algorithm_verifies_with_its_key() {
        let (v, _file) = verifier_for(PEMS, ClaimRules::default());
        for (alg, kid) in [
            (Algorithm::RS256, "rsa-1"),
            (Algorithm::ES256, "ec-1"),
            (Algorithm::EdDSA, "ed-1"),
        ] {
            let verified = v.verify(&token(alg, Some(kid), claims()), "u1", NOW);
            assert_eq!(verified.unwrap().info.as_deref(), Some("vip"), "{alg:?}");
            // Without kid: the only key of the type.
            assert!(v.verify(&token(alg, None, claims()), "u1", NOW).is_ok());
        }
    }

    #[test]
    fn a_jwks_file_names_its_keys() {
        let jwks = include_str!("token/testdata/keys.jwks");
        let (v, _file) = verifier_for(jwks, ClaimRules::default());
        let ed = token(Algorithm::EdDSA, Some("ed-1"), claims());
        let ec = token(Algorithm::ES256, Some("ec-1"), claims());
        assert!(v.verify(&ed, "u1", NOW).is_ok());
        assert!(v.verify(&ec, "u1", NOW).is_ok());
        let unknown = token(Algorithm::EdDSA, Some("ed-9"), claims());
        assert_eq!(
            v.verify(&unknown, "u1", NOW),
            Err(TokenError::UnknownKid("ed-9".into()))
        );
    }

    #[test]
    fn the_algorithm_is_bound_to_the_key_type() {
        let (v, _file) = verifier_for(PEMS, ClaimRules::default());
        // An ES256 token naming the RSA key.
        let mismatch = token(Algorithm::ES256, Some("rsa-1"), claims());
        assert!(matches!(
            v.verify(&mismatch, "u1", NOW),
            Err(TokenError::AlgorithmMismatch { alg: "ES256", .. })
        ));
        // HS256 with the RSA public key's PEM text as the HMAC secret: HS256 uses the
        // secrets only, so this is a bad signature, never a pass.
        let rsa_pub = include_str!("token/testdata/rsa.pub");
        let confused = super::sign(
            rsa_pub.as_bytes(),
            &Grant {
                conn_id: "u1",
                info: None,
                now: NOW,
                ttl_secs: 60,
            },
        );
        assert_eq!(v.verify(&confused, "u1", NOW), Err(TokenError::Signature));
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"rsa-1"}"#),
            URL_SAFE_NO_PAD.encode(claims().to_string())
        );
        assert_eq!(
            v.verify(&none, "u1", NOW),
            Err(TokenError::Algorithm("none".into()))
        );
        let other = token(Algorithm::RS256, Some("rsa-1"), claims()).replacen(
            &URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"RS256","kid":"rsa-1"}"#),
            &URL_SAFE_NO_PAD.encode(br#"{"alg":"RS512","kid":"rsa-1"}"#),
            1,
        );
        assert!(matches!(
            v.verify(&other, "u1", NOW),
            Err(TokenError::Algorithm(_))
        ));
    }

    #[test]
    fn a_wrong_key_or_a_tampered_token_is_a_bad_signature() {
        let ed2 = format!("kid: ed-1\n{}", include_str!("token/testdata/ed2.pub"));
        let (v, _file) = verifier_for(&ed2, ClaimRules::default());
        let ed = token(Algorithm::EdDSA, Some("ed-1"), claims());
        assert_eq!(v.verify(&ed, "u1", NOW), Err(TokenError::Signature));
        let (v, _file) = verifier_for(PEMS, ClaimRules::default());
        let rsa = token(Algorithm::RS256, Some("rsa-1"), claims());
        let (header, rest) = rsa.split_once('.').unwrap();
        let signature = rest.split_once('.').unwrap().1;
        let other_claims =
            URL_SAFE_NO_PAD.encode(serde_json::json!({"sub": "u1", "exp": NOW + 600}).to_string());
        let tampered = format!("{header}.{other_claims}.{signature}");
        assert_eq!(v.verify(&tampered, "u1", NOW), Err(TokenError::Signature));
        let short = format!(
            "{header}.{}.{}",
            rest.split_once('.').unwrap().0,
            &signature[..8]
        );
        assert_eq!(v.verify(&short, "u1", NOW), Err(TokenError::Signature));
    }

    #[test]
    fn without_kid_several_keys_of_the_type_are_ambiguous() {
        let two_ed = format!(
            "kid: a\n{}kid: b\n{}",
            include_str!("token/testdata/ed.pub"),
            include_str!("token/testdata/ed2.pub")
        );
        let (v, _file) = verifier_for(&two_ed, ClaimRules::default());
        assert!(matches!(
            v.verify(&token(Algorithm::EdDSA, None, claims()), "u1", NOW),
            Err(TokenError::AmbiguousKey { found: 2, .. })
        ));
        assert!(matches!(
            v.verify(&token(Algorithm::RS256, None, claims()), "u1", NOW),
            Err(TokenError::AmbiguousKey { found: 0, .. })
        ));
        // One unnamed key serves any kid.
        let (v, _file) = verifier_for(include_str!("token/testdata/ed.pub"), ClaimRules::default());
        assert!(
            v.verify(&token(Algorithm::EdDSA, Some("x"), claims()), "u1", NOW)
                .is_ok()
        );
    }

    #[test]
    fn audience_issuer_and_lifetime_rules() {
        let rules = ClaimRules {
            audience: Some("comet".into()),
            issuer: Some("auth".into()),
            max_age_secs: Some(120),
        };
        let (v, _file) = verifier_for(PEMS, rules);
        let with = |extra: serde_json::Value| {
            let mut c = serde_json::json!({"sub": "u1", "iat": NOW, "exp": NOW + 60, "aud": "comet", "iss": "auth"});
            for (k, value) in extra.as_object().unwrap() {
                if value.is_null() {
                    c.as_object_mut().unwrap().remove(k);
                } else {
                    c[k] = value.clone();
                }
            }
            v.verify(&token(Algorithm::EdDSA, Some("ed-1"), c), "u1", NOW)
        };
        assert!(with(serde_json::json!({})).is_ok());
        assert!(with(serde_json::json!({"aud": ["other", "comet"]})).is_ok());
        assert!(matches!(
            with(serde_json::json!({"aud": "other"})),
            Err(TokenError::Audience { .. })
        ));
        assert!(matches!(
            with(serde_json::json!({"aud": null})),
            Err(TokenError::Audience { .. })
        ));
        assert!(matches!(
            with(serde_json::json!({"iss": "evil"})),
            Err(TokenError::Issuer { .. })
        ));
        assert!(matches!(
            with(serde_json::json!({"iss": null})),
            Err(TokenError::Issuer { .. })
        ));
        assert_eq!(
            with(serde_json::json!({"exp": NOW + 121})),
            Err(TokenError::TooLong {
                lifetime: 121,
                max: 120
            })
        );
        // Without iat the lifetime counts from now.
        assert!(matches!(
            with(serde_json::json!({"iat": null, "exp": NOW + 500})),
            Err(TokenError::TooLong { lifetime: 500, .. })
        ));
        assert_eq!(
            with(serde_json::json!({"exp": null})),
            Err(TokenError::MissingExp)
        );
        assert!(matches!(
            with(serde_json::json!({"exp": NOW - 1})),
            Err(TokenError::Expired { .. })
        ));
        // A time claim of the wrong type is malformed, never "absent".
        let Err(TokenError::Shape { part, why }) = with(serde_json::json!({"exp": "never"})) else {
            panic!("a text exp is malformed");
        };
        assert_eq!(part, "payload");
        assert!(why.contains("\"never\""), "{why}");
    }

    #[test]
    fn crit_headers_and_missing_public_keys_are_refused() {
        let (v, _file) = verifier_for(PEMS, ClaimRules::default());
        let crit = format!(
            "{}.{}.AAAA",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"EdDSA","crit":["b64"]}"#),
            URL_SAFE_NO_PAD.encode(claims().to_string())
        );
        assert!(matches!(
            v.verify(&crit, "u1", NOW),
            Err(TokenError::Critical(_))
        ));
        let hs_only = TokenVerifier::new(vec![b"0123456789abcdef".to_vec()], 0);
        assert!(matches!(
            hs_only.verify(&token(Algorithm::EdDSA, None, claims()), "u1", NOW),
            Err(TokenError::NoKeyFor { alg: "EdDSA", .. })
        ));
    }

    #[test]
    fn a_broken_reload_keeps_the_old_keys() {
        let file = key_file(include_str!("token/testdata/ed.pub"));
        let store = Arc::new(KeyStore::open(&file.0).unwrap());
        let v = TokenVerifier::new(Vec::new(), 0).with_public_keys(Arc::clone(&store));
        let ed = token(Algorithm::EdDSA, None, claims());
        assert!(v.verify(&ed, "u1", NOW).is_ok());
        file.write("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n");
        assert!(store.reload().is_err());
        assert!(v.verify(&ed, "u1", NOW).is_ok());
        file.write(include_str!("token/testdata/ed2.pub"));
        assert_eq!(store.reload().unwrap(), 1);
        assert_eq!(v.verify(&ed, "u1", NOW), Err(TokenError::Signature));
    }

    #[test]
    fn key_files_are_checked_whole() {
        let bad = |text: &str| {
            let file = key_file(text);
            KeyStore::open(&file.0)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(bad(include_str!("token/testdata/ed.pem")).contains("private key"));
        assert!(bad("").contains("no public key"));
        assert!(bad(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).contains("unsupported key type"));
        assert!(
            bad(r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"AA","d":"AA"}]}"#)
                .contains("private")
        );
        let ed_as_es = include_str!("token/testdata/keys.jwks")
            .replace("\"ec-1\"", "\"ec-1\", \"use\": \"enc\"");
        assert!(bad(&ed_as_es).contains("use"));
        let twice = format!(
            "kid: a\n{}kid: a\n{}",
            include_str!("token/testdata/ed.pub"),
            include_str!("token/testdata/ed2.pub")
        );
        assert!(bad(&twice).contains("used twice"));
        assert!(bad("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n").contains("END"));
    }
}
