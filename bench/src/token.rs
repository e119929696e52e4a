//! Signed client tokens (HS256 JWT) for the bench's clients, so that connects measure the
//! gateway, not a message server.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A token for `conn_id`, valid for a day.
pub fn sign(secret: &str, conn_id: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = format!(
        r#"{{"sub":"{conn_id}","iat":{now},"exp":{}}}"#,
        now + 86_400
    );
    let input = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims));
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(input.as_bytes());
    format!(
        "{input}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

/// The upgrade path with the token object in `t`; `recover` opts in to recovery
/// (`"recover": true`: every message comes numbered, `{"seq","epoch","msg"}`).
pub fn ws_path(conn_id: &str, token: &str, recover: bool) -> String {
    let recover = if recover { r#","recover":true"# } else { "" };
    let t = format!(r#"{{"conn_id":"{conn_id}","token":"{token}","info":""{recover}}}"#);
    let mut encoded = String::with_capacity(t.len() * 3);
    for b in t.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("/ws?t={encoded}")
}
