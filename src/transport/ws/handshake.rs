//! The WebSocket opening handshake of COMPAT.md section 3: `GET /ws?t=<URL-encoded JSON>`.
//!
//! Pure parsing and response building; no I/O, no callbacks. The caller decides what to do
//! with a parsed [`UpgradeRequest`] (check the token, claim the conn_id) and writes the
//! bytes this module builds.

use base64::Engine;
use percent_encoding::percent_decode;

use super::deflate::{self, Negotiation};
use crate::config::UpgradePolicy;
use crate::token::{ClientToken, token_from_json, token_from_parts};

/// Largest upgrade request accepted (request line + headers).
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Header fields accepted in an upgrade request. Browsers send 10 to 20 and proxies add
/// a few; 128 leaves room for both while a request must spend most of its 8 KiB to reach
/// the count. The slots (32 bytes each) live on the stack during one parse only.
const MAX_HEADERS: usize = 128;
/// How many bytes of a refused value are quoted back in an answer or a log line.
const QUOTED_BYTES: usize = 128;
/// The WebSocket version this server speaks (RFC 6455).
const VERSION: &[u8] = b"13";

/// A well-formed request on the client port: a WebSocket upgrade on `path`, or an event
/// stream on `sse_path`.
#[derive(Debug)]
pub enum Request {
    /// `GET <path>?t=...` with the upgrade headers.
    Upgrade(UpgradeRequest),
    /// `GET <sse_path>?t=...` (`transport/sse`).
    EventStream(EventStreamRequest),
}

/// A well-formed upgrade request.
#[derive(Debug)]
pub struct UpgradeRequest {
    /// `Sec-WebSocket-Key`, for the accept header.
    pub key: String,
    /// The decoded `t` parameter.
    pub token: ClientToken,
    /// What the client's `Sec-WebSocket-Extensions` offered.
    pub deflate: Negotiation,
}

/// A well-formed event-stream request.
#[derive(Debug)]
pub struct EventStreamRequest {
    /// The decoded `t` parameter.
    pub token: ClientToken,
    /// The request's `Origin`, already found allowed: echoed in
    /// `Access-Control-Allow-Origin` (escaped bytes never reach here: see
    /// [`check_stream_headers`]).
    pub origin: Option<String>,
}

impl UpgradePolicy {
    fn allows_origin(&self, origin: &[u8]) -> bool {
        self.allowed_origins.is_empty()
            || self
                .allowed_origins
                .iter()
                .any(|allowed| origin_matches(allowed, origin))
    }
}

/// Whether `origin` (the raw header value: any bytes) matches `allowed`, an exact origin
/// or one with a single `*` standing for a run of subdomain labels. ASCII letters match
/// regardless of case (origins are lowercase; some clients are not).
///
/// Works on bytes throughout: the header is untrusted and need not be ASCII or even
/// UTF-8, so nothing here may index it as a `str` (a multi-byte character across the
/// prefix's end once panicked the shard).
pub fn origin_matches(allowed: &str, origin: &[u8]) -> bool {
    let allowed = allowed.as_bytes();
    let Some(star) = allowed.iter().position(|&b| b == b'*') else {
        return allowed.eq_ignore_ascii_case(origin);
    };
    let (prefix, suffix) = (&allowed[..star], &allowed[star + 1..]);
    let Some((head, rest)) = origin.split_at_checked(prefix.len()) else {
        return false;
    };
    let Some(middle_len) = rest.len().checked_sub(suffix.len()) else {
        return false;
    };
    let (middle, tail) = rest.split_at(middle_len);
    head.eq_ignore_ascii_case(prefix) && tail.eq_ignore_ascii_case(suffix) && is_label_run(middle)
}

/// One or more DNS labels joined by dots (`a`, `eu.cdn`): what a browser can put where
/// the pattern has `*`. No empty label, nothing but letters, digits, `-` and `_` (a
/// browser sends international names as punycode), so no `/`, `:`, `@` or non-ASCII.
fn is_label_run(middle: &[u8]) -> bool {
    !middle.is_empty()
        && middle.split(|&b| b == b'.').all(|label| {
            !label.is_empty()
                && label
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        })
}

/// Why an upgrade request was refused; [`HandshakeError::status`] is the HTTP answer.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("request larger than {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    #[error("HTTP/1.1 or later required")]
    HttpVersion,
    #[error("method {0} not allowed, only GET")]
    Method(String),
    #[error("no WebSocket endpoint at {0}")]
    NotFound(String),
    #[error("missing Host header")]
    MissingHost,
    #[error("{0} header appears more than once")]
    DuplicateHeader(&'static str),
    #[error("origin {0} is not allowed")]
    Origin(String),
    #[error("not a WebSocket upgrade: {0}")]
    NotUpgrade(&'static str),
    #[error("unsupported WebSocket version {0}, only 13")]
    Version(String),
    #[error("Sec-WebSocket-Key must be the base64 of 16 bytes")]
    BadKey,
    #[error("bad token parameter: {0}")]
    BadToken(String),
}

impl HandshakeError {
    /// The HTTP status line for this refusal.
    pub fn status(&self) -> &'static str {
        match self {
            HandshakeError::TooLarge | HandshakeError::TooManyHeaders => {
                "431 Request Header Fields Too Large"
            }
            HandshakeError::Malformed(_)
            | HandshakeError::HttpVersion
            | HandshakeError::MissingHost
            | HandshakeError::DuplicateHeader(_)
            | HandshakeError::NotUpgrade(_)
            | HandshakeError::BadKey => "400 Bad Request",
            HandshakeError::Method(_) => "405 Method Not Allowed",
            HandshakeError::NotFound(_) => "404 Not Found",
            HandshakeError::Origin(_) => "403 Forbidden",
            HandshakeError::Version(_) => "426 Upgrade Required",
            HandshakeError::BadToken(_) => "401 Unauthorized",
        }
    }

    /// Header lines the refusal must carry: `Allow` with a 405 (RFC 9110 section
    /// 15.5.6), the version this server speaks with a 426 (RFC 6455 section 4.4).
    pub fn headers(&self) -> &'static str {
        match self {
            HandshakeError::Method(_) => "Allow: GET\r\n",
            HandshakeError::Version(_) => "Sec-WebSocket-Version: 13\r\n",
            _ => "",
        }
    }
}

/// Parses a request from the bytes read so far. `Ok(None)`: incomplete, read more.
pub fn parse_request(
    buf: &[u8],
    policy: &UpgradePolicy,
) -> Result<Option<Request>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len > MAX_REQUEST_BYTES => {
            return Err(HandshakeError::TooLarge);
        }
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST_BYTES => {
            return Err(HandshakeError::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooManyHeaders),
        Err(err) => return Err(HandshakeError::Malformed(err.to_string())),
    }
    let method = request.method.unwrap_or_default();
    if method != "GET" {
        return Err(HandshakeError::Method(quote(method.as_bytes())));
    }
    // httparse reads only 1.0 and 1.1; RFC 6455 section 4.1 needs 1.1 or later.
    if request.version != Some(1) {
        return Err(HandshakeError::HttpVersion);
    }
    // httparse hands back the target only when it is ASCII (else ""), so `str` methods
    // on it cannot split a character.
    let target = request.path.unwrap_or_default();
    let (request_path, query) = target.split_once('?').unwrap_or((target, ""));
    if request_path == policy.sse_path {
        let origin = check_stream_headers(request.headers, policy)?;
        let mut token = parse_token(query)?;
        // EventSource reconnects by itself with the last event's id: for a recovering
        // client that is where it stopped, unless its token object says otherwise.
        if token.recovery.recover
            && token.recovery.since.is_none()
            && let Some(last) = single(request.headers, "Last-Event-ID")?
        {
            token.recovery.since = crate::recovery::Since::from_last_event_id(last);
        }
        return Ok(Some(Request::EventStream(EventStreamRequest {
            token,
            origin,
        })));
    }
    if request_path != policy.path {
        return Err(HandshakeError::NotFound(quote(request_path.as_bytes())));
    }
    let key = check_headers(request.headers, policy)?;
    let token = parse_token(query)?;
    let deflate = deflate::negotiate(
        request
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("Sec-WebSocket-Extensions"))
            .map(|h| h.value),
    );
    Ok(Some(Request::Upgrade(UpgradeRequest {
        key,
        token,
        deflate,
    })))
}

/// The header rules of an event-stream request: a single Host, and an Origin (if any)
/// that the policy allows. Returns the Origin to echo in the CORS answer: only one made
/// of visible ASCII is echoed (a header line must not carry anything else).
pub fn check_stream_headers(
    headers: &[httparse::Header<'_>],
    policy: &UpgradePolicy,
) -> Result<Option<String>, HandshakeError> {
    if single(headers, "Host")?.is_none() {
        return Err(HandshakeError::MissingHost);
    }
    let Some(origin) = single(headers, "Origin")? else {
        return Ok(None);
    };
    if !policy.allows_origin(origin) {
        return Err(HandshakeError::Origin(quote(origin)));
    }
    Ok(origin
        .iter()
        .all(|b| b.is_ascii_graphic())
        .then(|| String::from_utf8_lossy(origin).into_owned()))
}

/// Every rule on the request's header fields (RFC 6455 section 4.2.1 and the origin
/// policy), on the raw values: whatever bytes a client sends, the answer is a refusal,
/// never a panic. Returns the `Sec-WebSocket-Key`.
pub fn check_headers(
    headers: &[httparse::Header<'_>],
    policy: &UpgradePolicy,
) -> Result<String, HandshakeError> {
    if single(headers, "Host")?.is_none() {
        return Err(HandshakeError::MissingHost);
    }
    if !has_token(headers, "Upgrade", b"websocket") {
        return Err(HandshakeError::NotUpgrade("missing `Upgrade: websocket`"));
    }
    if !has_token(headers, "Connection", b"upgrade") {
        return Err(HandshakeError::NotUpgrade("missing `Connection: Upgrade`"));
    }
    match single(headers, "Sec-WebSocket-Version")? {
        Some(version) if version == VERSION => {}
        Some(other) => return Err(HandshakeError::Version(quote(other))),
        None => return Err(HandshakeError::Version("(none)".into())),
    }
    let key = match single(headers, "Sec-WebSocket-Key")? {
        Some(key) => check_key(key)?,
        None => return Err(HandshakeError::NotUpgrade("missing Sec-WebSocket-Key")),
    };
    if let Some(origin) = single(headers, "Origin")?
        && !policy.allows_origin(origin)
    {
        return Err(HandshakeError::Origin(quote(origin)));
    }
    Ok(key)
}

/// The value of a header that may appear at most once (RFC 6455 section 11.3, RFC 9110
/// section 7.2 for Host), trimmed of optional whitespace.
fn single<'a>(
    headers: &[httparse::Header<'a>],
    name: &'static str,
) -> Result<Option<&'a [u8]>, HandshakeError> {
    let mut found = headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name));
    let first = found.next().map(|h| h.value.trim_ascii());
    if found.next().is_some() {
        return Err(HandshakeError::DuplicateHeader(name));
    }
    Ok(first)
}

/// Whether any `name` field lists `token` (comma-separated lists may be split over
/// several fields, RFC 9110 section 5.3).
fn has_token(headers: &[httparse::Header<'_>], name: &str, token: &[u8]) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

/// Section 4.2.1: the key is the base64 of a 16-byte nonce (24 characters, canonical).
fn check_key(key: &[u8]) -> Result<String, HandshakeError> {
    let mut nonce = [0u8; 18];
    match base64::engine::general_purpose::STANDARD.decode_slice(key, &mut nonce) {
        Ok(16) if key.len() == 24 => {
            // Base64 is ASCII, so this cannot fail.
            String::from_utf8(key.to_vec()).map_err(|_| HandshakeError::BadKey)
        }
        _ => Err(HandshakeError::BadKey),
    }
}

/// A client's bytes, fit to quote in an answer or a log: bounded, non-ASCII and
/// control bytes escaped.
fn quote(value: &[u8]) -> String {
    let shown = value.get(..QUOTED_BYTES).unwrap_or(value);
    let mut text = shown.escape_ascii().to_string();
    if shown.len() < value.len() {
        text.push_str("...");
    }
    text
}

/// Decodes the client's token from a query string (form-encoded: `+` is a space, as PHP
/// and Go write it): `t=<token object>`, or the original's second generation's
/// `c=<conn_id>&t=<token>&i=<info>`, told apart by `t` not being a JSON object.
pub fn parse_token(query: &str) -> Result<ClientToken, HandshakeError> {
    let t = query_param(query, "t")?
        .ok_or_else(|| HandshakeError::BadToken("missing `t` query parameter".into()))?;
    let bad = |err: crate::token::client::TokenObjectError| HandshakeError::BadToken(err.0);
    match query_param(query, "c")? {
        Some(conn_id) if !t.trim_start().starts_with('{') => {
            let info = query_param(query, "i")?.unwrap_or_default();
            token_from_parts(conn_id, t, info).map_err(bad)
        }
        _ => token_from_json(t.as_bytes()).map_err(bad),
    }
}

/// The first `name=` parameter of `query`, decoded.
fn query_param(query: &str, name: &str) -> Result<Option<String>, HandshakeError> {
    let Some(raw) = query.split('&').find_map(|pair| {
        pair.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
    }) else {
        return Ok(None);
    };
    let plus_decoded = raw.replace('+', " ");
    percent_decode(plus_decoded.as_bytes())
        .decode_utf8()
        .map(|text| Some(text.into_owned()))
        .map_err(|_| HandshakeError::BadToken(format!("`{name}` is not UTF-8 after URL-decoding")))
}

/// The `101 Switching Protocols` answer; `deflate`: permessage-deflate is accepted.
pub fn accept_response(key: &str, deflate: bool) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let extensions = if deflate {
        deflate::RESPONSE_HEADER
    } else {
        ""
    };
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n{extensions}\r\n"
    )
    .into_bytes()
}

/// A refusal: status line, the `headers` the status needs (each ending in CRLF, see
/// [`HandshakeError::headers`]), a one-line plain-text body naming the reason,
/// connection closed.
pub fn refusal_response(
    status: &str,
    headers: &str,
    reason: &str,
    retry_after_secs: Option<u32>,
) -> Vec<u8> {
    let retry = retry_after_secs
        .map(|s| format!("Retry-After: {s}\r\n"))
        .unwrap_or_default();
    let body = format!("{reason}\n");
    format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\n{retry}Connection: close\r\n\r\n{body}",
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
        let parsed = upgrade(&request(&format!("/ws?t={t}")));
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
            sse_path: "/sse".into(),
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
    fn second_generation_clients_give_the_token_in_parts() {
        let token = parse_token("c=u1&t=s3cr%2Bt&i=%7B%22room%22%3A7%7D").unwrap();
        assert_eq!(
            (
                token.conn_id.as_str(),
                token.token.as_str(),
                token.info.as_str()
            ),
            ("u1", "s3cr+t", "{\"room\":7}")
        );
        assert_eq!(parse_token("t=tok&c=u2").unwrap().info, "");
        // An object in `t` is the token whatever else is there.
        assert_eq!(
            parse_token("c=other&t={\"conn_id\":\"a\"}")
                .unwrap()
                .conn_id,
            "a"
        );
        assert!(parse_token("c=&t=tok").is_err(), "empty conn_id");
        assert!(parse_token("c=u3").is_err(), "no token");
        assert!(parse_token("t=tok").is_err(), "neither object nor parts");
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

    fn refused(text: &[u8], policy: &UpgradePolicy) -> HandshakeError {
        parse_request(text, policy).unwrap_err()
    }

    fn wildcard_policy() -> UpgradePolicy {
        UpgradePolicy {
            allowed_origins: vec!["https://*.example.com".into()],
            ..UpgradePolicy::default()
        }
    }

    #[test]
    fn a_multibyte_character_across_the_origin_prefix_is_refused_not_a_panic() {
        // The security review's input: `é` straddles byte 8, where the old code sliced.
        let text = request("/ws?t=%7B%22conn_id%22%3A%22u1%22%7D").replace(
            "Host: x\r\n",
            "Host: x\r\nOrigin: https:/\u{e9}x.example.com\r\n",
        );
        let err = refused(text.as_bytes(), &wildcard_policy());
        assert_eq!(err.status(), "403 Forbidden");
        assert_eq!(
            err.to_string(),
            "origin https:/\\xc3\\xa9x.example.com is not allowed"
        );
        assert!(!origin_matches(
            "https://*.example.com",
            "https:/éx.example.com".as_bytes()
        ));
        assert!(!origin_matches(
            "https://*.example.com",
            "https://é.example.com".as_bytes()
        ));
        assert!(!origin_matches(
            "https://*.example.com",
            b"https://\xff.example.com"
        ));
        // A character straddling where the suffix starts, and one cut in half.
        assert!(!origin_matches(
            "https://*.example.com",
            "https://aé.example.com".as_bytes()
        ));
        assert!(!origin_matches(
            "https://*.example.com",
            b"https://a\xc3.example.com"
        ));
    }

    #[test]
    fn wildcard_stands_for_subdomain_labels_only() {
        let allowed = "https://*.example.com";
        for good in [
            "https://a.example.com",
            "https://eu.cdn-1.example.com",
            "HTTPS://A.EXAMPLE.COM",
        ] {
            assert!(origin_matches(allowed, good.as_bytes()), "{good}");
        }
        for bad in [
            "https://example.com",
            "https://.example.com",
            "https://a..b.example.com",
            "https://evil.com/.example.com",
            "https://user@x.example.com",
            "https://x:1.example.com",
            "http://a.example.com",
            "https://a.example.com:8443",
            "https://a.example.com.evil.net",
            "https:/",
            "",
        ] {
            assert!(!origin_matches(allowed, bad.as_bytes()), "{bad}");
        }
        assert!(origin_matches(
            "https://app.example.com",
            b"https://APP.example.com"
        ));
        assert!(!origin_matches(
            "https://app.example.com",
            b"https://app.example.com.evil"
        ));
    }

    #[test]
    fn a_non_utf8_origin_is_checked_not_skipped() {
        // An Origin that is not UTF-8 is still an Origin: refused, not taken as absent.
        let mut text = request("/ws?t=%7B%22conn_id%22%3A%22u1%22%7D").into_bytes();
        let at = text.len() - 2;
        text.splice(
            at..at,
            b"Origin: https://\xff\xfe.example.com\r\n".iter().copied(),
        );
        assert_eq!(refused(&text, &wildcard_policy()).status(), "403 Forbidden");
    }

    #[test]
    fn a_version_other_than_13_gets_426_naming_13() {
        for version in ["8", "12", "14", "13, 8", ""] {
            let text = request("/ws?t=x").replace(
                "Sec-WebSocket-Version: 13",
                &format!("Sec-WebSocket-Version: {version}"),
            );
            let err = refused(text.as_bytes(), &UpgradePolicy::default());
            assert_eq!(err.status(), "426 Upgrade Required", "{version:?}");
            assert_eq!(err.headers(), "Sec-WebSocket-Version: 13\r\n");
        }
        let missing = request("/ws?t=x").replace("Sec-WebSocket-Version: 13\r\n", "");
        let err = refused(missing.as_bytes(), &UpgradePolicy::default());
        assert_eq!(err.status(), "426 Upgrade Required");
        let response = String::from_utf8(refusal_response(
            err.status(),
            err.headers(),
            &err.to_string(),
            None,
        ))
        .unwrap();
        assert!(
            response.starts_with("HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\n")
        );
    }

    #[test]
    fn a_405_says_allow_get() {
        let err = refused(
            b"PUT /ws HTTP/1.1\r\nHost: x\r\n\r\n",
            &UpgradePolicy::default(),
        );
        assert_eq!(err.status(), "405 Method Not Allowed");
        let response = String::from_utf8(refusal_response(
            err.status(),
            err.headers(),
            &err.to_string(),
            None,
        ))
        .unwrap();
        assert!(response.contains("\r\nAllow: GET\r\n"), "{response}");
    }

    #[test]
    fn the_key_must_be_base64_of_16_bytes() {
        for key in [
            "",
            "abc",
            "dGhlIHNhbXBsZSBub25jZQ",   // unpadded
            "dGhlIHNhbXBsZSBub25jZQ=",  // short padding
            "dGhlIHNhbXBsZSBub25jZR==", // non-canonical trailing bits
            "dGhlIHNhbXBsZSBub25jZSE=", // 17 bytes
            "dGhlIHNhbXBsZSBub25jZSEh", // 18 bytes
            "dGhlIHNhbXBsZSBub25jZQ==AAAA",
            "!!!!!!!!!!!!!!!!!!!!!!==",
            "dGhlIHNhbXBsZSBub25j\u{e9}Q==",
        ] {
            let text = request("/ws?t=x").replace(
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                &format!("Sec-WebSocket-Key: {key}"),
            );
            let err = refused(text.as_bytes(), &UpgradePolicy::default());
            assert_eq!(err, HandshakeError::BadKey, "{key:?}");
            assert_eq!(err.status(), "400 Bad Request");
        }
    }

    #[test]
    fn missing_host_and_http_1_0_are_400() {
        let no_host = request("/ws?t=x").replace("Host: x\r\n", "");
        assert_eq!(
            refused(no_host.as_bytes(), &UpgradePolicy::default()),
            HandshakeError::MissingHost
        );
        let old = request("/ws?t=x").replace("HTTP/1.1", "HTTP/1.0");
        let err = refused(old.as_bytes(), &UpgradePolicy::default());
        assert_eq!(err, HandshakeError::HttpVersion);
        assert_eq!(err.status(), "400 Bad Request");
    }

    #[test]
    fn headers_that_must_be_single_are() {
        for (name, value) in [
            ("Host", "y"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
            ("Origin", "https://a.example.com"),
        ] {
            let mut text = request("/ws?t=x").replace(
                "Host: x\r\n",
                "Host: x\r\nOrigin: https://b.example.com\r\n",
            );
            text.insert_str(text.len() - 2, &format!("{name}: {value}\r\n"));
            let err = refused(text.as_bytes(), &wildcard_policy());
            assert_eq!(err.status(), "400 Bad Request", "{name}");
        }
        // List headers may be split over several fields.
        let split = request("/ws?t=%7B%22conn_id%22%3A%22u1%22%7D").replace(
            "Connection: keep-alive, Upgrade\r\n",
            "Connection: keep-alive\r\nConnection: Upgrade\r\n",
        );
        assert!(
            parse_request(split.as_bytes(), &UpgradePolicy::default())
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn forty_small_headers_are_fine_and_too_many_get_431() {
        let t = "/ws?t=%7B%22conn_id%22%3A%22u1%22%7D";
        let with = |count: usize| {
            let extra: String = (0..count).map(|i| format!("X-H{i}: v\r\n")).collect();
            request(t).replace("Host: x\r\n", &format!("Host: x\r\n{extra}"))
        };
        let forty = with(40);
        assert!(forty.len() > 400 && forty.len() < MAX_REQUEST_BYTES);
        assert!(
            parse_request(forty.as_bytes(), &UpgradePolicy::default())
                .unwrap()
                .is_some()
        );
        assert!(
            parse_request(with(MAX_HEADERS - 5).as_bytes(), &UpgradePolicy::default())
                .unwrap()
                .is_some()
        );
        let many = with(MAX_HEADERS);
        assert!(many.len() < MAX_REQUEST_BYTES);
        let err = refused(many.as_bytes(), &UpgradePolicy::default());
        assert_eq!(err, HandshakeError::TooManyHeaders);
        assert_eq!(err.status(), "431 Request Header Fields Too Large");
    }

    #[test]
    fn a_complete_request_over_the_bound_is_431() {
        let padding = format!("X-Pad: {}\r\n", "p".repeat(MAX_REQUEST_BYTES));
        let big = request("/ws?t=x").replace("Host: x\r\n", &format!("Host: x\r\n{padding}"));
        assert_eq!(
            refused(big.as_bytes(), &UpgradePolicy::default()),
            HandshakeError::TooLarge
        );
    }

    #[test]
    fn a_token_that_is_not_an_object_is_refused() {
        for json in [
            r#"["id","tok","info"]"#,
            r#" ["id"]"#,
            r#""id""#,
            "42",
            "null",
            "",
        ] {
            let err = token_from_json(json.as_bytes()).unwrap_err();
            assert!(
                err.to_string().contains("not a token object"),
                "{json:?}: {err}"
            );
        }
        // The upgrade: `t` URL-encoded as an array.
        let t = "%5B%22id%22%2C%22tok%22%2C%22info%22%5D";
        let err = refused(
            request(&format!("/ws?t={t}")).as_bytes(),
            &UpgradePolicy::default(),
        );
        assert_eq!(err.status(), "401 Unauthorized");
        // Whitespace before the object is still an object.
        assert_eq!(
            token_from_json(b" \r\n\t{\"conn_id\":\"a\"}")
                .unwrap()
                .conn_id,
            "a"
        );
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        let response =
            String::from_utf8(accept_response("dGhlIHNhbXBsZSBub25jZQ==", false)).unwrap();
        assert!(response.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        assert!(!response.contains("Extensions"));
        let response =
            String::from_utf8(accept_response("dGhlIHNhbXBsZSBub25jZQ==", true)).unwrap();
        assert!(response.ends_with(
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
             client_no_context_takeover\r\n\r\n"
        ));
    }

    fn upgrade(text: &str) -> UpgradeRequest {
        match parse_request(text.as_bytes(), &UpgradePolicy::default()) {
            Ok(Some(Request::Upgrade(request))) => request,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn extension_offers_are_read_from_every_field() {
        let base = request("/ws?t=%7B%22conn_id%22%3A%22u1%22%7D");
        assert_eq!(upgrade(&base).deflate, Negotiation::NotOffered);
        let with = |fields: &str| base.replace("Host: x\r\n", &format!("Host: x\r\n{fields}"));
        let offered =
            with("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n");
        assert_eq!(upgrade(&offered).deflate, Negotiation::Accepted);
        let split = with(
            "sec-websocket-extensions: permessage-deflate; server_max_window_bits=10\r\n\
             Sec-WebSocket-Extensions: permessage-deflate\r\n",
        );
        assert_eq!(upgrade(&split).deflate, Negotiation::Accepted);
        let bad = with("Sec-WebSocket-Extensions: permessage-deflate; x=1\r\n");
        assert!(matches!(upgrade(&bad).deflate, Negotiation::Declined(_)));
    }

    #[test]
    fn the_event_stream_path_needs_no_upgrade_headers() {
        let policy = UpgradePolicy {
            allowed_origins: vec!["https://app.example.com".into()],
            ..UpgradePolicy::default()
        };
        let text = "GET /sse?t=%7B%22conn_id%22%3A%22u1%22%7D HTTP/1.1\r\nHost: x\r\n\
                    Origin: https://app.example.com\r\nAccept: text/event-stream\r\n\r\n";
        match parse_request(text.as_bytes(), &policy) {
            Ok(Some(Request::EventStream(stream))) => {
                assert_eq!(stream.token.conn_id, "u1");
                assert_eq!(stream.origin.as_deref(), Some("https://app.example.com"));
            }
            other => panic!("{other:?}"),
        }
        let evil = text.replace("app.example.com", "evil.example.com");
        assert_eq!(refused(evil.as_bytes(), &policy).status(), "403 Forbidden");
        let no_token = text.replace("?t=%7B%22conn_id%22%3A%22u1%22%7D", "");
        assert_eq!(
            refused(no_token.as_bytes(), &policy).status(),
            "401 Unauthorized"
        );
        let no_host = text.replace("Host: x\r\n", "");
        assert_eq!(
            refused(no_host.as_bytes(), &policy),
            HandshakeError::MissingHost
        );
        let post = text.replace("GET", "POST");
        assert_eq!(
            refused(post.as_bytes(), &policy).status(),
            "405 Method Not Allowed"
        );
    }
}
