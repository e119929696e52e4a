//! Server-Sent Events end to end: `curl -N` against the real binary. The stream's head
//! (status, content type, no-cache, CORS for an allowed origin, `retry:`), one event per
//! push with a `data:` line per message line, keep-alive comments every ping_interval,
//! `event: close` with the code on kick, presence through the message server exactly as
//! for WebSocket, refusals as HTTP statuses; and the EventSource example page in headless
//! Chromium.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use common::browser::{open_connected, poll_page};
use common::{Comet, MessageServer, url_encode, wait_until};
use serde_json::json;

/// `curl -N -i` on the stream of `conn_id`, its output read line by line.
struct Curl {
    child: Child,
    lines: BufReader<ChildStdout>,
}

impl Curl {
    fn open(comet: &Comet, conn_id: &str, origin: &str) -> Curl {
        let token = json!({"conn_id": conn_id, "token": "t"});
        Curl::open_with(comet, &token, &[&format!("Origin: {origin}")])
    }

    /// The stream of the token object `token`, with extra request headers.
    fn open_with(comet: &Comet, token: &serde_json::Value, headers: &[&str]) -> Curl {
        let t = url_encode(&token.to_string());
        let mut command = Command::new("curl");
        command.args(["-N", "-s", "-i", "--max-time", "60"]);
        for header in headers {
            command.arg("-H").arg(header);
        }
        let mut child = command
            .arg(format!("http://127.0.0.1:{}/sse?t={t}", comet.ws_port))
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl");
        let lines = BufReader::new(child.stdout.take().unwrap());
        Curl { child, lines }
    }

    fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.lines.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line),
        }
    }

    /// Lines up to and including the next blank one.
    fn block(&mut self) -> Vec<String> {
        let mut block = Vec::new();
        while let Some(line) = self.line() {
            let blank = line.trim_end_matches(['\r', '\n']).is_empty();
            block.push(line);
            if blank {
                break;
            }
        }
        block
    }
}

impl Drop for Curl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn curl_gets_the_head_events_comments_and_the_close_event() {
    let server = MessageServer::start();
    let admin = common::free_port();
    let comet = Comet::start(
        Some(&server),
        &format!(
            "ping_interval=1s\nheartbeat_timeout=5s\nsse_retry=3s\n\
             websocket_allowed_origins=https://app.example.com\n\
             admin_addr=127.0.0.1:{admin}\nadmin_token=sekrit"
        ),
    );
    let mut curl = Curl::open(&comet, "sse-1", "https://app.example.com");
    let head = curl.block().concat();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    for line in [
        "Content-Type: text/event-stream\r\n",
        "Cache-Control: no-cache\r\n",
        "Access-Control-Allow-Origin: https://app.example.com\r\n",
    ] {
        assert!(head.contains(line), "{line:?} in {head}");
    }
    assert_eq!(curl.block(), ["retry: 3000\n", "\n"]);
    assert!(wait_until(Duration::from_secs(10), || server
        .count("online", "sse-1")
        == 1));
    assert_eq!(sse_connections(admin), 1, "counted under transport=\"sse\"");
    let mut rpc = comet.rpc();
    rpc.push(&["sse-1"], "first line\nsecond line", "");
    // Comments may come before it: skip them.
    let event = loop {
        let block = curl.block();
        if block.first().is_some_and(|l| l.starts_with(':')) {
            continue;
        }
        break block;
    };
    assert_eq!(event, ["data: first line\n", "data: second line\n", "\n"]);
    // A keep-alive comment within a couple of ping intervals.
    assert_eq!(curl.block(), [": ping\n", "\n"]);
    rpc.call("Server.KickConnections", json!({"connections": ["sse-1"]}));
    let close = loop {
        let block = curl.block();
        if block.first().is_some_and(|l| l.starts_with(':')) {
            continue;
        }
        break block;
    };
    assert_eq!(close, ["event: close\n", "data: 1000\n", "\n"]);
    assert_eq!(curl.line(), None, "the stream ends after the close event");
    assert!(wait_until(Duration::from_secs(10), || server
        .count("offline", "sse-1")
        == 1));
}

/// `comet_connections{transport="sse"}` summed over the shards.
fn sse_connections(admin: u16) -> u64 {
    let body = ureq::get(&format!("http://127.0.0.1:{admin}/metrics?token=sekrit"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    body.lines()
        .filter(|l| l.starts_with("comet_connections{") && l.contains("transport=\"sse\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// The next block that is not a keep-alive comment.
fn next_event(curl: &mut Curl) -> Vec<String> {
    loop {
        let block = curl.block();
        if !block.first().is_some_and(|l| l.starts_with(':')) {
            return block;
        }
    }
}

#[test]
fn replace_and_shutdown_end_the_stream_with_their_codes() {
    let server = MessageServer::start();
    let mut comet = Comet::start(Some(&server), "duplicate_conn_id=replace");
    let mut first = Curl::open(&comet, "sse-r", "null");
    assert!(first.block()[0].starts_with("HTTP/1.1 200"));
    first.block();
    assert!(wait_until(Duration::from_secs(10), || server
        .count("online", "sse-r")
        == 1));
    let mut second = Curl::open(&comet, "sse-r", "null");
    assert!(second.block()[0].starts_with("HTTP/1.1 200"));
    second.block();
    assert_eq!(
        next_event(&mut first),
        ["event: close\n", "data: 1008\n", "\n"]
    );
    assert_eq!(first.line(), None);
    comet.terminate(Duration::from_secs(20));
    assert_eq!(
        next_event(&mut second),
        ["event: close\n", "data: 1001\n", "\n"]
    );
    assert_eq!(second.line(), None);
    assert_eq!(server.count("online", "sse-r"), 2);
    assert_eq!(server.count("offline", "sse-r"), 2);
}

#[test]
fn an_event_stream_runs_on_wss_port_under_tls() {
    let server = MessageServer::start();
    let cert = common::clients::TestCert::generate(&common::temp_dir("sse-tls"));
    let wss_port = common::free_port();
    let comet = Comet::start(
        Some(&server),
        &format!("wss_port={wss_port}\n{}", cert.ini()),
    );
    assert!(wait_until(Duration::from_secs(5), || common::port_open(
        wss_port
    )));
    let t = url_encode(&json!({"conn_id": "sse-tls", "token": "t"}).to_string());
    let mut tls = cert.connect(wss_port);
    write!(tls, "GET /sse?t={t} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut lines = BufReader::new(tls);
    let mut read_block = || {
        let mut block = String::new();
        loop {
            let mut line = String::new();
            if lines.read_line(&mut line).unwrap_or(0) == 0 {
                return block;
            }
            let blank = line.trim_end_matches(['\r', '\n']).is_empty();
            block.push_str(&line);
            if blank {
                return block;
            }
        }
    };
    assert!(read_block().starts_with("HTTP/1.1 200 OK\r\n"));
    assert_eq!(read_block(), "retry: 2000\n\n");
    assert!(wait_until(Duration::from_secs(10), || server
        .count("online", "sse-tls")
        == 1));
    comet.rpc().push(&["sse-tls"], "over tls", "");
    assert_eq!(read_block(), "data: over tls\n\n");
}

#[test]
fn refusals_are_http_statuses() {
    let comet = Comet::start(None, "websocket_allowed_origins=https://app.example.com");
    let mut evil = Curl::open(&comet, "sse-2", "https://evil.example.com");
    let status = evil.line().unwrap_or_default();
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
}

#[test]
fn the_event_source_page_shows_pushes_in_headless_chromium() {
    let server = MessageServer::start();
    let node = Comet::start(Some(&server), "");
    let page = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/browser/sse.html");
    let url = format!(
        "file://{}?server=http://127.0.0.1:{}/sse&conn_id=browser-sse&token=secret",
        page.display(),
        node.ws_port
    );
    let (_browser, mut page) = open_connected(&url, &server, "browser-sse");
    let reply = node.rpc().push(&["browser-sse"], "hello,\nEventSource", "");
    assert_eq!(reply["result"], json!("ok"), "{reply}");
    let shown = page.text_containing("messages", "EventSource");
    assert_eq!(shown, "hello,\nEventSource");
    node.rpc().call(
        "Server.KickConnections",
        json!({"connections": ["browser-sse"]}),
    );
    assert!(
        poll_page(|| page.read("document.getElementById('status').textContent") == "closed 1000"),
        "the page did not see the close event"
    );
    assert!(wait_until(Duration::from_secs(10), || server
        .count("offline", "browser-sse")
        == 1));
    // The page closed its EventSource on 1000: no reconnection.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(server.count("online", "browser-sse"), 1);
}

/// A recovering event stream (recovery, docs/PROTOCOL.md): each event's `id:` is
/// `<epoch>:<seq>`, and a reconnect that sends the last one back as `Last-Event-ID`, as
/// EventSource does by itself, gets `recovered:true` and then what it missed, in order.
#[test]
fn last_event_id_recovers_what_an_event_stream_missed() {
    let comet = Comet::start(None, "recovery_window=64");
    let token = json!({"conn_id": "r", "token": "t", "recover": true});
    let mut rpc = comet.rpc();
    let mut first = Curl::open_with(&comet, &token, &[]);
    assert!(first.block()[0].contains("200"), "the head");
    assert!(first.block()[0].starts_with("retry:"));
    for msg in ["m1", "m2"] {
        assert_eq!(rpc.push(&["r"], msg, "")["result"], json!("ok"));
    }
    let one = next_event(&mut first);
    let id = one[0]
        .trim_end()
        .strip_prefix("id: ")
        .expect("an id line")
        .to_owned();
    let (epoch, seq) = id.rsplit_once(':').unwrap();
    assert_eq!((seq, one[1].trim_end()), ("1", "data: m1"), "{one:?}");
    let two = next_event(&mut first);
    assert_eq!(two[0].trim_end(), format!("id: {epoch}:2"));
    assert_eq!(two[1].trim_end(), "data: m2");
    drop(first);
    // Until the node has seen the stream end, a push still goes to it (and is kept in
    // its ring all the same); then pushes are only buffered.
    let mut pushed = 0;
    assert!(wait_until(Duration::from_secs(10), || {
        pushed += 1;
        rpc.push(&["r"], &format!("m{}", pushed + 2), "")["result"]["buffered"] == json!(["r"])
    }));
    let mut again = Curl::open_with(&comet, &token, &[&format!("Last-Event-ID: {epoch}:2")]);
    assert!(again.block()[0].contains("200"));
    assert!(again.block()[0].starts_with("retry:"));
    let first_frame = next_event(&mut again);
    assert!(
        first_frame
            .iter()
            .any(|l| l.contains(r#""recovered":true"#)),
        "{first_frame:?}"
    );
    for n in 0..pushed {
        let event = next_event(&mut again);
        assert_eq!(
            event[0].trim_end(),
            format!("id: {epoch}:{}", n + 3),
            "{event:?}"
        );
        assert_eq!(event[1].trim_end(), format!("data: m{}", n + 3));
    }
}
