//! Signed client tokens: local verification of HMAC-SHA256 JSON Web Tokens (HS256), so a
//! node can admit a client without the `checkToken` round trip.
//!
//! The token (the `token` field of the `t` parameter) is a compact JWT whose claims are
//! `sub` (the conn_id; must equal `conn_id` in `t`), `exp` (required), optional `iat` /
//! `nbf`, and an optional `info` string that, being signed, replaces `t`'s `info`. Two
//! secrets may be configured so that keys rotate without refusing anyone. Pure: no I/O,
//! the caller passes the current time.

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
    #[error("unsupported algorithm {0:?} (only HS256)")]
    Algorithm(String),
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
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    info: Option<String>,
}

/// What a valid token says beyond the conn_id.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    /// The signed `info`, when the token carries one.
    pub info: Option<String>,
}

/// Verifies tokens against the current secret and, during a rotation, the previous one.
#[derive(Clone)]
pub struct TokenVerifier {
    secrets: Vec<Vec<u8>>,
    leeway_secs: u64,
}

impl TokenVerifier {
    /// `secrets` in order of preference (current first); `leeway_secs` of clock skew are
    /// tolerated on every time claim.
    pub fn new(secrets: Vec<Vec<u8>>, leeway_secs: u64) -> TokenVerifier {
        TokenVerifier {
            secrets,
            leeway_secs,
        }
    }

    /// Checks `token` for `conn_id` at unix time `now`.
    pub fn verify(&self, token: &str, conn_id: &str, now: u64) -> Result<Verified, TokenError> {
        let malformed = TokenError::Malformed("expected header.payload.signature");
        let (signed, signature) = token.rsplit_once('.').ok_or(malformed.clone())?;
        let (header, payload) = signed.split_once('.').ok_or(malformed.clone())?;
        if payload.contains('.') {
            return Err(malformed);
        }
        let header: Header = decode_json(header)?;
        if header.alg != "HS256" {
            return Err(TokenError::Algorithm(header.alg));
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
        if !self.signature_matches(signed.as_bytes(), &signature) {
            return Err(TokenError::Signature);
        }
        let claims: Claims = decode_json(payload)?;
        self.check_claims(&claims, conn_id, now)?;
        Ok(Verified { info: claims.info })
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
        if claims.exp.saturating_add(leeway) <= now {
            return Err(TokenError::Expired {
                exp: claims.exp,
                now,
            });
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

fn decode_json<T: for<'de> Deserialize<'de>>(part: &str) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed("a part is not base64url"))?;
    serde_json::from_slice(&bytes)
        .map_err(|_| TokenError::Malformed("a part is not the expected JSON"))
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
}
