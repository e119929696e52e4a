//! RFC 6455 conformance, Autobahn style: the real binary driven over raw sockets with
//! hand-built requests and frames, one case per rule, each asserting the exact HTTP
//! status or close code. Every node also serves a bystander, which must keep receiving
//! pushes whatever the hostile clients beside it did.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::clients::{self, Reader, Resp, command, plain};
use common::{Client, Comet, MessageServer, free_port, next_text, url_encode, wait_until};
use serde_json::json;

const KEY: &str = clients::UPGRADE_KEY;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
const FIN: u8 = 0x80;

fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    clients::masked_frame(first, payload)
}

fn close_frame(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    frame(FIN | OP_CLOSE, &payload)
}

/// The upgrade request for `conn_id`, with `extra` header lines before the blank line.
fn upgrade_request(conn_id: &str, extra: &str) -> String {
    clients::upgrade_request("/ws", &json!({"conn_id": conn_id, "token": "t"}), extra)
}

/// An HTTP answer: status code and head.
struct Answer {
    status: u16,
    head: String,
}

impl Answer {
    fn has_header(&self, line: &str) -> bool {
        self.head
            .split("\r\n")
            .any(|l| l.eq_ignore_ascii_case(line))
    }
}

/// A raw WebSocket connection to the node.
struct Raw {
    stream: TcpStream,
    buffered: Vec<u8>,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        Raw {
            stream: plain(port),
            buffered: Vec::new(),
        }
    }

    /// Sends a request and reads the answer's head (what follows it stays buffered).
    fn request(port: u16, request: &[u8]) -> (Raw, Answer) {
        let mut raw = Raw::connect(port);
        raw.send(request);
        let answer = raw.answer();
        (raw, answer)
    }

    /// Upgrades as `conn_id`; panics unless the answer is 101.
    fn upgraded(port: u16, conn_id: &str) -> Raw {
        let (raw, answer) = Raw::request(port, upgrade_request(conn_id, "").as_bytes());
        assert_eq!(answer.status, 101, "{}", answer.head);
        raw
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buffered.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    fn answer(&mut self) -> Answer {
        loop {
            if let Some(end) = self.buffered.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buffered.drain(..end + 4).collect();
                let head = String::from_utf8_lossy(&head).into_owned();
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("no status in {head:?}"));
                return Answer { status, head };
            }
            assert!(self.fill(), "no HTTP answer: {:?}", self.buffered);
        }
    }

    fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buffered.len() < n {
            if !self.fill() {
                return None;
            }
        }
        Some(self.buffered.drain(..n).collect())
    }

    /// The next server frame, as opcode and payload (servers do not mask).
    fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let head = self.take(2)?;
        let len = match head[1] & 0x7f {
            126 => u16::from_be_bytes(self.take(2)?.try_into().unwrap()) as usize,
            127 => u64::from_be_bytes(self.take(8)?.try_into().unwrap()) as usize,
            n => n as usize,
        };
        Some((head[0] & 0x0f, self.take(len)?))
    }

    /// Frames up to and including the server's Close (its heartbeat pings skipped);
    /// returns the other frames and the close code. Panics if no Close comes.
    fn until_close(&mut self) -> (Vec<(u8, Vec<u8>)>, u16) {
        let mut others = Vec::new();
        loop {
            match self.frame() {
                Some((OP_CLOSE, payload)) => {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    return (others, code);
                }
                Some((OP_PING, _)) => {}
                Some(other) => others.push(other),
                None => panic!("connection ended without a close frame; got {others:?}"),
            }
        }
    }

    /// The server's close code; the connection must end right after it.
    fn close_code(&mut self) -> u16 {
        let (others, code) = self.until_close();
        assert!(others.is_empty(), "frames before the close: {others:?}");
        assert!(
            self.frame().is_none(),
            "the server closes after its close frame"
        );
        code
    }
}

/// A node with a bystander client that every test checks at the end.
struct Node {
    server: MessageServer,
    comet: Comet,
    bystander: Client,
}

impl Node {
    fn start(extra: &str) -> Node {
        let server = MessageServer::start();
        let comet = Comet::start(Some(&server), extra);
        let bystander = comet.connect("bystander", "t", "").unwrap();
        Node {
            server,
            comet,
            bystander,
        }
    }

    fn port(&self) -> u16 {
        self.comet.ws_port
    }

    /// A fresh conn_id upgraded, then sent `bytes`; returns the server's close code.
    fn close_code_for(&self, conn_id: &str, bytes: &[u8]) -> u16 {
        let mut raw = Raw::upgraded(self.port(), conn_id);
        raw.send(bytes);
        raw.close_code()
    }

    fn status_for(&self, request: &[u8]) -> Answer {
        Raw::request(self.port(), request).1
    }

    /// The bystander still gets pushes, and the node was never restarted.
    fn bystander_unaffected(mut self) {
        let reply = self.comet.rpc().push(&["bystander"], "still here", "");
        assert_eq!(reply["result"], "ok", "{reply}");
        assert_eq!(
            next_text(&mut self.bystander).as_deref(),
            Some("still here")
        );
        // Presence callbacks are delivered off the shards: on a loaded machine the
        // `online` may still be on its way.
        wait_until(Duration::from_secs(10), || {
            self.server.count("online", "bystander") >= 1
        });
        assert_eq!(self.server.count("online", "bystander"), 1);
        assert!(!self.comet.log_text().contains("panicked"));
    }
}

#[test]
fn handshake_rules_get_the_exact_http_status() {
    let node = Node::start("");
    let good = upgrade_request("h-good", "");

    // Section 4.4: any version but 13 is 426 naming the one spoken.
    for version in ["8", "12", "14"] {
        let request = good.replace(
            "Sec-WebSocket-Version: 13",
            &format!("Sec-WebSocket-Version: {version}"),
        );
        let answer = node.status_for(request.as_bytes());
        assert_eq!(answer.status, 426, "version {version}: {}", answer.head);
        assert!(
            answer.has_header("Sec-WebSocket-Version: 13"),
            "{}",
            answer.head
        );
    }

    // Not GET: 405 with Allow.
    let answer = node.status_for(good.replacen("GET", "POST", 1).as_bytes());
    assert_eq!(answer.status, 405);
    assert!(answer.has_header("Allow: GET"), "{}", answer.head);

    // The key must be the base64 of 16 bytes.
    for key in [
        "abc",
        "dGhlIHNhbXBsZSBub25jZQ",
        "dGhlIHNhbXBsZSBub25jZSEh",
        "!!!!!!!!!!!!!!!!!!!!!!==",
    ] {
        let request = good.replace(KEY, key);
        assert_eq!(
            node.status_for(request.as_bytes()).status,
            400,
            "key {key:?}"
        );
    }

    // No Host, or HTTP/1.0.
    let no_host = good.replace("Host: 127.0.0.1\r\n", "");
    assert_eq!(node.status_for(no_host.as_bytes()).status, 400);
    let http10 = good.replacen("HTTP/1.1", "HTTP/1.0", 1);
    assert_eq!(node.status_for(http10.as_bytes()).status, 400);

    // 40 small headers (1.5 KiB) upgrade; too many header fields, or too many bytes, 431.
    let headers = |n: usize| {
        (0..n)
            .map(|i| format!("X-Custom-Header-{i:02}: value-{i:02}-padding\r\n"))
            .collect::<String>()
    };
    let forty = upgrade_request("h-forty", &headers(40));
    assert!(forty.len() > 1500 && forty.len() < 2500);
    assert_eq!(node.status_for(forty.as_bytes()).status, 101);
    let many = upgrade_request(
        "h-many",
        &(0..200).map(|i| format!("X{i}: v\r\n")).collect::<String>(),
    );
    assert!(many.len() < 8 * 1024);
    assert_eq!(node.status_for(many.as_bytes()).status, 431);
    // Exactly 8 KiB and still no blank line: the server reads it all before refusing, so
    // no unread input turns its close into a reset that could hide the answer.
    let mut huge = upgrade_request("h-huge", "");
    huge.truncate(huge.len() - 2);
    let pad = 8 * 1024 - huge.len() - "X-Pad: \r\n".len();
    huge.push_str(&format!("X-Pad: {}\r\n", "p".repeat(pad)));
    assert_eq!(huge.len(), 8 * 1024);
    assert_eq!(node.status_for(huge.as_bytes()).status, 431);

    // And the plain request still works after all that.
    assert_eq!(node.status_for(good.as_bytes()).status, 101);
    node.bystander_unaffected();
}

#[test]
fn a_hostile_origin_is_refused_and_the_shard_keeps_serving() {
    let node = Node::start("websocket_allowed_origins=https://*.example.com\n");
    // The security review's input: `é` straddles byte 8 of the value. Sent on several
    // connections so that both shards see it.
    for i in 0..8 {
        let mut request = upgrade_request(&format!("evil-{i}"), "").into_bytes();
        let at = request.len() - 2;
        request.splice(
            at..at,
            b"Origin: https:/\xC3\xA9x.example.com\r\n".iter().copied(),
        );
        let answer = node.status_for(&request);
        assert_eq!(answer.status, 403, "{}", answer.head);
    }
    let mut request = upgrade_request("evil-bytes", "").into_bytes();
    let at = request.len() - 2;
    request.splice(
        at..at,
        b"Origin: https://\xff\xfe.example.com\r\n".iter().copied(),
    );
    assert_eq!(node.status_for(&request).status, 403);
    let allowed = upgrade_request("friend", "Origin: https://app.example.com\r\n");
    assert_eq!(node.status_for(allowed.as_bytes()).status, 101);
    assert_eq!(node.server.count("checkToken", "evil-0"), 0);
    node.bystander_unaffected();
}

#[test]
fn a_token_that_is_a_json_array_is_refused_on_every_transport() {
    let array = r#"["arr","tok","info"]"#;

    // WebSocket `t` and the JSON-lines first line.
    let tcp_port = free_port();
    let node = Node::start(&format!("tcp_port={tcp_port}\ntcp_protocol=json\n"));
    let request = format!(
        "GET /ws?t={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n",
        url_encode(array)
    );
    let answer = node.status_for(request.as_bytes());
    assert_eq!(answer.status, 401, "{}", answer.head);
    assert!(wait_until(Duration::from_secs(5), || common::port_open(
        tcp_port
    )));
    let mut lines = Reader::new(plain(tcp_port));
    lines.send(format!("{array}\n").as_bytes());
    let refusal = lines.json().unwrap();
    assert_eq!(refusal["type"], "error");
    assert!(
        refusal["error"]
            .as_str()
            .unwrap()
            .contains("not a token object"),
        "{refusal}"
    );
    assert!(lines.line().is_none(), "closed after the refusal");

    // RESP `AUTH <token object>`.
    let resp_port = free_port();
    let resp_node = Comet::start(
        Some(&node.server),
        &format!("tcp_port={resp_port}\ntcp_protocol=resp\n"),
    );
    assert!(wait_until(Duration::from_secs(5), || common::port_open(
        resp_port
    )));
    let mut resp = Reader::new(plain(resp_port));
    resp.send(&command(&["AUTH", array]));
    assert!(matches!(resp.resp(), Some(Resp::Error(e)) if e.starts_with("ERR AUTH needs")));

    assert!(
        node.server
            .calls_of("checkToken")
            .iter()
            .all(|c| c.arg(0) != "arr")
    );
    assert_eq!(node.server.count("online", "arr"), 0);
    drop(resp_node);
    node.bystander_unaffected();
}

#[test]
fn text_must_be_utf8_or_the_client_gets_1007() {
    let node = Node::start("");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("invalid byte", frame(FIN | OP_TEXT, b"caf\xff")),
        ("surrogate", frame(FIN | OP_TEXT, b"\xed\xa0\x80")),
        ("invalid bytes split across fragments", {
            let mut bytes = frame(OP_TEXT, b"ok \xf0\x9f");
            bytes.extend(frame(FIN | OP_CONTINUATION, b"(not a continuation"));
            bytes
        }),
        ("message ending mid-character", {
            let mut bytes = frame(OP_TEXT, b"price: ");
            bytes.extend(frame(FIN | OP_CONTINUATION, b"\xe2\x82"));
            bytes
        }),
        // Fail fast: the message is never finished, the first fragment is enough.
        (
            "first fragment invalid",
            frame(OP_TEXT, b"\xc0\xaf and more to come"),
        ),
        ("invalid close reason", close_frame(1000, b"bye \xff")),
    ];
    for (i, (case, bytes)) in cases.iter().enumerate() {
        assert_eq!(node.close_code_for(&format!("u{i}"), bytes), 1007, "{case}");
    }

    // A valid character split across fragments, a ping between them: fine.
    let mut raw = Raw::upgraded(node.port(), "u-ok");
    let mut bytes = frame(OP_TEXT, b"\xce");
    bytes.extend(frame(FIN | OP_PING, b"mid"));
    bytes.extend(frame(OP_CONTINUATION, b"\xba\xe1\xbd"));
    bytes.extend(frame(
        FIN | OP_CONTINUATION,
        b"\xb9\xcf\x83\xce\xbc\xce\xb5",
    ));
    bytes.extend(frame(FIN | OP_BINARY, b"\xff\xfe binary is not text"));
    bytes.extend(close_frame(1000, "adiós".as_bytes()));
    raw.send(&bytes);
    let (others, code) = raw.until_close();
    assert_eq!(others, vec![(OP_PONG, b"mid".to_vec())]);
    assert_eq!(code, 1000);
    node.bystander_unaffected();
}

#[test]
fn close_codes_are_validated() {
    let node = Node::start("");
    for code in [
        0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        assert_eq!(
            node.close_code_for(&format!("bad-{code}"), &close_frame(code, b"")),
            1002,
            "code {code}"
        );
    }
    for code in [1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999] {
        assert_eq!(
            node.close_code_for(&format!("ok-{code}"), &close_frame(code, b"ok")),
            1000,
            "code {code}"
        );
    }
    assert_eq!(
        node.close_code_for("no-code", &frame(FIN | OP_CLOSE, b"")),
        1000
    );
    assert_eq!(
        node.close_code_for("one-byte", &frame(FIN | OP_CLOSE, &[0x03])),
        1002
    );
    node.bystander_unaffected();
}

#[test]
fn framing_violations_get_1002() {
    let node = Node::start("");
    let top_bit_length = {
        let mut bytes = vec![FIN | OP_BINARY, 0x80 | 127];
        bytes.extend_from_slice(&(1u64 << 63).to_be_bytes());
        bytes.extend_from_slice(&clients::FRAME_MASK);
        bytes
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("64-bit length with the top bit set", top_bit_length),
        (
            "RSV1 without an extension",
            frame(FIN | 0x40 | OP_TEXT, b"x"),
        ),
        (
            "RSV2 without an extension",
            frame(FIN | 0x20 | OP_TEXT, b"x"),
        ),
        (
            "RSV3 without an extension",
            frame(FIN | 0x10 | OP_PING, b""),
        ),
        ("ping over 125 bytes", frame(FIN | OP_PING, &[b'p'; 126])),
        ("close over 125 bytes", close_frame(1000, &[b'r'; 124])),
        ("fragmented ping", frame(OP_PING, b"")),
        (
            "continuation without a start",
            frame(FIN | OP_CONTINUATION, b"x"),
        ),
        ("new message during a fragmented one", {
            let mut bytes = frame(OP_TEXT, b"first");
            bytes.extend(frame(FIN | OP_TEXT, b"second"));
            bytes
        }),
        ("unmasked client frame", vec![FIN | OP_TEXT, 0x01, b'x']),
        ("reserved data opcode 3", frame(FIN | 0x3, b"")),
        ("reserved control opcode 0xB", frame(FIN | 0xB, b"")),
    ];
    for (i, (case, bytes)) in cases.iter().enumerate() {
        assert_eq!(node.close_code_for(&format!("f{i}"), bytes), 1002, "{case}");
    }
    // Still a size matter, not a framing one.
    assert_eq!(
        node.close_code_for("big", &frame(FIN | OP_BINARY, &[0; 600])),
        1009
    );
    node.bystander_unaffected();
}

#[test]
fn nothing_after_the_clients_close_is_processed() {
    let node = Node::start("");
    // A ping in the same write after the close gets no pong.
    let mut raw = Raw::upgraded(node.port(), "c-ping");
    let mut bytes = close_frame(1000, b"");
    bytes.extend(frame(FIN | OP_PING, b"late"));
    raw.send(&bytes);
    assert_eq!(raw.close_code(), 1000);

    // A bad frame after the close does not replace it with 1002.
    let mut bytes = close_frame(1001, b"going");
    bytes.extend(vec![FIN | OP_TEXT, 0x01, b'x']);
    bytes.extend(frame(FIN | OP_TEXT, b"\xff"));
    assert_eq!(node.close_code_for("c-bad", &bytes), 1000);

    // A ping before the close is answered, then the close.
    let mut raw = Raw::upgraded(node.port(), "c-before");
    let mut bytes = frame(FIN | OP_PING, b"early");
    bytes.extend(close_frame(1000, b""));
    raw.send(&bytes);
    let (others, code) = raw.until_close();
    assert_eq!((others, code), (vec![(OP_PONG, b"early".to_vec())], 1000));

    assert!(wait_until(Duration::from_secs(5), || node
        .server
        .count("offline", "c-bad")
        == 1));
    node.bystander_unaffected();
}
