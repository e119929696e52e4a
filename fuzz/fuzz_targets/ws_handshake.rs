//! WebSocket upgrade requests (HTTP head and the `t` token object): never panics, and
//! every refusal can be written as an HTTP answer.
#![no_main]

use comet::config::UpgradePolicy;
use comet::transport::ws::handshake::{Request, parse_request, refusal_response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let policy = UpgradePolicy {
        path: "/ws".into(),
        sse_path: "/sse".into(),
        allowed_origins: vec![
            "https://*.example.com".into(),
            "https://app.example.org".into(),
        ],
    };
    match parse_request(data, &policy) {
        Ok(Some(Request::Upgrade(request))) => {
            assert_eq!(request.key.len(), 24);
            assert!(!request.token.conn_id.is_empty() && request.token.conn_id.len() <= 256);
        }
        Ok(Some(Request::EventStream(request))) => {
            assert!(!request.token.conn_id.is_empty() && request.token.conn_id.len() <= 256);
            // An echoed Origin goes into a header line: visible ASCII only.
            assert!(request.origin.is_none_or(|o| o.bytes().all(|b| b.is_ascii_graphic())));
        }
        Ok(None) => {}
        Err(err) => {
            let response = refusal_response(err.status(), err.headers(), &err.to_string(), None);
            assert!(response.starts_with(b"HTTP/1.1 4"));
        }
    }
});
