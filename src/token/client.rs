//! The token object a client presents on every transport (`{"conn_id":..,"token":..,
//! "info":..}`: WebSocket's and SSE's `t`, the JSON-lines first line, RESP's `AUTH`),
//! decoded from untrusted bytes. Knows nothing of the transports that carry it.

use serde::Deserialize;

/// Why bytes are not a token object; the text is what the client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad token parameter: {0}")]
pub struct TokenObjectError(pub String);

/// The identity a client presents in the `t` parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientToken {
    /// The id message servers push to.
    pub conn_id: String,
    /// The secret the message server verifies in `checkToken`.
    pub token: String,
    /// Opaque client data handed back on every callback.
    pub info: String,
    /// `recover` and `since` (docs/PROTOCOL.md, "Recovery").
    pub recovery: crate::recovery::Request,
}

#[derive(Deserialize)]
struct TokenJson {
    conn_id: serde_json::Value,
    #[serde(default)]
    token: serde_json::Value,
    #[serde(default)]
    info: serde_json::Value,
    #[serde(default)]
    recover: serde_json::Value,
    #[serde(default)]
    since: serde_json::Value,
}

/// Decodes the token object `{"conn_id": ..., "token": ..., "info": ...}`. Shared by
/// every transport: WebSocket's `t`, the JSON-lines first line, RESP's `AUTH <object>`.
pub fn token_from_json(json: &[u8]) -> Result<ClientToken, TokenObjectError> {
    // serde's derived Deserialize also takes a struct written as an array
    // (`["id","tok","info"]`), which the original service (Go's json.Unmarshal into a
    // struct) refuses. serde_json picks object or array by the first byte after JSON
    // whitespace, so requiring `{` there admits exactly the objects.
    let first = json
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first != Some(&b'{') {
        return Err(TokenObjectError(
            "`t` is not a token object: expected a JSON object".into(),
        ));
    }
    let parsed: TokenJson = serde_json::from_slice(json)
        .map_err(|e| TokenObjectError(format!("`t` is not a token object: {e}")))?;
    let conn_id = scalar_text(parsed.conn_id);
    check_conn_id(&conn_id)?;
    let recovery = crate::recovery::Request::from_token(&parsed.recover, &parsed.since)
        .map_err(TokenObjectError)?;
    Ok(ClientToken {
        conn_id,
        token: scalar_text(parsed.token),
        info: scalar_text(parsed.info),
        recovery,
    })
}

/// A token given as its parts (the original's second-generation clients connected with
/// `?c=<conn_id>&t=<token>&i=<info>`), held to the same rules as the object; no recovery.
pub fn token_from_parts(
    conn_id: String,
    token: String,
    info: String,
) -> Result<ClientToken, TokenObjectError> {
    check_conn_id(&conn_id)?;
    Ok(ClientToken {
        conn_id,
        token,
        info,
        recovery: crate::recovery::Request::default(),
    })
}

fn check_conn_id(conn_id: &str) -> Result<(), TokenObjectError> {
    if conn_id.is_empty() {
        return Err(TokenObjectError("conn_id is empty".into()));
    }
    if conn_id.len() > 256 {
        return Err(TokenObjectError("conn_id longer than 256 bytes".into()));
    }
    Ok(())
}

/// Strings are taken as they are; numbers and objects (some clients send `info` as an
/// object or `conn_id` as a number) as their JSON text; null as empty.
fn scalar_text(value: serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}
