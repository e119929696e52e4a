//! The WebSocket opening handshake of COMPAT.md section 3: `GET /ws?t=<URL-encoded JSON>`.
//!
//! Pure parsing and response building; no I/O, no callbacks. The caller decides what to do
//! with a parsed [`UpgradeRequest`] (check the token, claim the conn_id) and writes the
//! bytes this module builds.

use percent_encoding::percent_decode;
use serde::Deserialize;

/// Largest upgrade request accepted (request line + headers).
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;

/// The identity a client presents in the `t` parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientToken {
    /// The id message servers push to.
    pub conn_id: String,
    /// The secret the message server verifies in `checkToken`.
    pub token: String,
    /// Opaque client data handed back on every callback.
    pub info: String,
}

/// A well-formed upgrade request.
#[derive(Debug)]
pub struct UpgradeRequest {
    /// `Sec-WebSocket-Key`, for the accept header.
    pub key: String,
    /// The decoded `t` parameter.
    pub token: ClientToken,
}

/// Which upgrade requests this node accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradePolicy {
    /// The one path clients upgrade on (`/ws` in COMPAT.md).
    pub path: String,
    /// Origins a browser may connect from (`https://app.example.com`, or
    /// `https://*.example.com` for any subdomain); empty: any. Requests without an
    /// `Origin` header (native clients; browsers always send one) are not checked.
    pub allowed_origins: Vec<String>,
}

impl Default for UpgradePolicy {
    fn default() -> UpgradePolicy {
        UpgradePolicy {
            path: "/ws".into(),
            allowed_origins: Vec::new(),
        }
    }
}

impl UpgradePolicy {
    fn allows_origin(&self, origin: &str) -> bool {
        self.allowed_origins.is_empty()
            || self
                .allowed_origins
                .iter()
                .any(|allowed| origin_matches(allowed, origin))
    }
}

/// `allowed` is an exact origin or has one `*` standing for a run of subdomain labels.
fn origin_matches(allowed: &str, origin: &str) -> bool {
    match allowed.split_once('*') {
        None => allowed.eq_ignore_ascii_case(origin),
        Some((prefix, suffix)) => {
            origin.len() > prefix.len() + suffix.len()
                && origin[..prefix.len()].eq_ignore_ascii_case(prefix)
                && origin[origin.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                && !origin[prefix.len()..origin.len() - suffix.len()].contains('/')
        }
    }
}

/// Why an upgrade request was refused; [`HandshakeError::status`] is the HTTP answer.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("request larger than {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    #[error("method {0} not allowed, only GET")]
    Method(String),
    #[error("no WebSocket endpoint at {0}")]
    NotFound(String),
    #[error("origin {0} is not allowed")]
    Origin(String),
    #[error("not a WebSocket upgrade: {0}")]
    NotUpgrade(&'static str),
    #[error("bad token parameter: {0}")]
    BadToken(String),
}

impl HandshakeError {
    /// The HTTP status line for this refusal.
    pub fn status(&self) -> &'static str {
        match self {
            HandshakeError::TooLarge => "431 Request Header Fields Too Large",
            HandshakeError::Malformed(_) | HandshakeError::NotUpgrade(_) => "400 Bad Request",
            HandshakeError::Method(_) => "405 Method Not Allowed",
            HandshakeError::NotFound(_) => "404 Not Found",
            HandshakeError::Origin(_) => "403 Forbidden",
            HandshakeError::BadToken(_) => "401 Unauthorized",
        }
    }
}

/// Parses an upgrade request from the bytes read so far. `Ok(None)`: incomplete, read more.
pub fn parse_request(
    buf: &[u8],
    policy: &UpgradePolicy,
) -> Result<Option<UpgradeRequest>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST_BYTES => {
            return Err(HandshakeError::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(err) => return Err(HandshakeError::Malformed(err.to_string())),
    }
    let method = request.method.unwrap_or_default();
    if method != "GET" {
        return Err(HandshakeError::Method(method.to_owned()));
    }
    let target = request.path.unwrap_or_default();
    let (request_path, query) = target.split_once('?').unwrap_or((target, ""));
    if request_path != policy.path {
        return Err(HandshakeError::NotFound(request_path.to_owned()));
    }
    let key = check_upgrade_headers(request.headers)?;
    if let Some(origin) = header(request.headers, "Origin")
        && !policy.allows_origin(origin.trim())
    {
        return Err(HandshakeError::Origin(origin.trim().to_owned()));
    }
    let token = parse_token(query)?;
    Ok(Some(UpgradeRequest { key, token }))
}

fn header<'a>(headers: &[httparse::Header<'a>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
}

fn check_upgrade_headers(headers: &[httparse::Header<'_>]) -> Result<String, HandshakeError> {
    let find = |name: &str| header(headers, name);
    let has_token = |name: &str, token: &str| {
        find(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("Upgrade", "websocket") {
        return Err(HandshakeError::NotUpgrade("missing `Upgrade: websocket`"));
    }
    if !has_token("Connection", "upgrade") {
        return Err(HandshakeError::NotUpgrade("missing `Connection: Upgrade`"));
    }
    if find("Sec-WebSocket-Version").map(str::trim) != Some("13") {
        return Err(HandshakeError::NotUpgrade(
            "Sec-WebSocket-Version must be 13",
        ));
    }
    match find("Sec-WebSocket-Key").map(str::trim) {
        Some(key) if !key.is_empty() => Ok(key.to_owned()),
        _ => Err(HandshakeError::NotUpgrade("missing Sec-WebSocket-Key")),
    }
}

#[derive(Deserialize)]
struct TokenJson {
    conn_id: serde_json::Value,
    #[serde(default)]
    token: serde_json::Value,
    #[serde(default)]
    info: serde_json::Value,
}

/// Decodes `t` from a query string: form-encoded (`+` is a space, as PHP and Go write it).
pub fn parse_token(query: &str) -> Result<ClientToken, HandshakeError> {
    let raw = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("t="))
        .ok_or_else(|| HandshakeError::BadToken("missing `t` query parameter".into()))?;
    let plus_decoded = raw.replace('+', " ");
    let json = percent_decode(plus_decoded.as_bytes())
        .decode_utf8()
        .map_err(|_| HandshakeError::BadToken("`t` is not UTF-8 after URL-decoding".into()))?;
    token_from_json(json.as_bytes())
}

/// Decodes the token object `{"conn_id": ..., "token": ..., "info": ...}`.
pub fn token_from_json(json: &[u8]) -> Result<ClientToken, HandshakeError> {
    let parsed: TokenJson = serde_json::from_slice(json)
        .map_err(|e| HandshakeError::BadToken(format!("`t` is not a token object: {e}")))?;
    let conn_id = scalar_text(parsed.conn_id);
    if conn_id.is_empty() {
        return Err(HandshakeError::BadToken("conn_id is empty".into()));
    }
    if conn_id.len() > 256 {
        return Err(HandshakeError::BadToken(
            "conn_id longer than 256 bytes".into(),
        ));
    }
    Ok(ClientToken {
        conn_id,
        token: scalar_text(parsed.token),
        info: scalar_text(parsed.info),
    })
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

/// The `101 Switching Protocols` answer.
pub fn accept_response(key: &str) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// A refusal: status line, a one-line plain-text body naming the reason, connection closed.
pub fn refusal_response(status: &str, reason: &str, retry_after_secs: Option<u32>) -> Vec<u8> {
    let retry = retry_after_secs
        .map(|s| format!("Retry-After: {s}\r\n"))
        .unwrap_or_default();
    let body = format!("{reason}\n");
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         {retry}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: &str) -> String {
        format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
    }

    #[test]
    fn good_request_yields_token() {
        let t = "%7B%22conn_id%22%3A%22u1%22%2C%22token%22%3A%22s3cret%22%2C%22info%22%3A%22%7B%7D%22%7D";
        let parsed = parse_request(
            request(&format!("/ws?t={t}")).as_bytes(),
            &UpgradePolicy::default(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(parsed.token.conn_id, "u1");
        assert_eq!(parsed.token.token, "s3cret");
        assert_eq!(parsed.token.info, "{}");
    }

    #[test]
    fn incomplete_request_asks_for_more() {
        assert!(
            parse_request(b"GET /ws?t=x HTTP/1.1\r\nHost:", &UpgradePolicy::default())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn origins_and_paths_follow_the_policy() {
        let policy = UpgradePolicy {
            path: "/push".into(),
            allowed_origins: vec![
                "https://app.example.com".into(),
                "https://*.example.org".into(),
            ],
        };
        let t = "t=%7B%22conn_id%22%3A%22u1%22%7D";
        let with_origin = |origin: &str| {
            request(&format!("/push?{t}"))
                .replace("Host: x\r\n", &format!("Host: x\r\nOrigin: {origin}\r\n"))
        };
        for allowed in [
            "https://app.example.com",
            "https://a.b.example.org",
            "HTTPS://APP.example.com",
        ] {
            assert!(
                parse_request(with_origin(allowed).as_bytes(), &policy).is_ok(),
                "{allowed}"
            );
        }
        for refused in [
            "https://evil.com",
            "https://example.org",
            "http://app.example.com",
            "https://x/.example.org",
        ] {
            let err = parse_request(with_origin(refused).as_bytes(), &policy).unwrap_err();
            assert_eq!(err.status(), "403 Forbidden", "{refused}");
        }
        let native = request(&format!("/push?{t}"));
        assert!(parse_request(native.as_bytes(), &policy).is_ok());
        let old_path = request(&format!("/ws?{t}"));
        assert_eq!(
            parse_request(old_path.as_bytes(), &policy)
                .unwrap_err()
                .status(),
            "404 Not Found"
        );
    }

    #[test]
    fn plus_is_a_space() {
        let token = parse_token("t={\"conn_id\":\"a\",\"info\":\"x+y\"}").unwrap();
        assert_eq!(token.info, "x y");
    }

    #[test]
    fn refusals_map_to_statuses() {
        let cases = [
            (request("/ws"), "401"),
            (request("/ws?t=notjson"), "401"),
            (request("/ws?t={\"conn_id\":\"\"}"), "401"),
            (request("/other?t=x"), "404"),
            ("POST /ws HTTP/1.1\r\n\r\n".to_owned(), "405"),
            ("GET /ws?t=x HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(), "400"),
            ("\x16\x03\x01garbage\r\n\r\n".to_owned(), "400"),
        ];
        for (text, status) in cases {
            let err = parse_request(text.as_bytes(), &UpgradePolicy::default()).unwrap_err();
            assert!(err.status().starts_with(status), "{text:?}: {err:?}");
        }
    }

    #[test]
    fn oversized_request_is_refused() {
        let big = format!("GET /ws?t={} HTTP/1.1\r\n", "a".repeat(MAX_REQUEST_BYTES));
        assert_eq!(
            parse_request(big.as_bytes(), &UpgradePolicy::default()).unwrap_err(),
            HandshakeError::TooLarge
        );
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        let response = String::from_utf8(accept_response("dGhlIHNhbXBsZSBub25jZQ==")).unwrap();
        assert!(response.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    }
}
