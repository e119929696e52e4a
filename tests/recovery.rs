//! Recovery of missed pushes across a reconnect (docs/PROTOCOL.md, "Recovery"), against
//! the real binary with real WebSocket and JSON-lines clients: exactly once and in order
//! across clean, abrupt and killed-process disconnects; pushes while away reported
//! buffered; window exceeded and other epochs reported lost; kicked clients not
//! recovered; memory bounded under a flood; clients that did not opt in unchanged.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::clients::{Reader, plain};
use common::message_server::MessageServer;
use common::{Client, Comet, check_presence_ledger, connect_url, free_port, next_text, url_encode};
use serde_json::{Value, json};

/// Recovery on, with a TTL far beyond any wait here on a busy machine.
const RECOVERY: &str = "recovery_window=10000\nrecovery_ttl=60s";

/// Where a client stopped: the epoch and seq of the last message it got.
#[derive(Clone, Debug)]
struct Position {
    epoch: String,
    seq: u64,
}

fn url(conn_id: &str, since: Option<&Position>) -> String {
    let mut token = json!({"conn_id": conn_id, "token": "t", "info": "", "recover": true});
    if let Some(p) = since {
        token["since"] = json!({"epoch": p.epoch, "seq": p.seq});
    }
    format!("/ws?t={}", url_encode(&token.to_string()))
}

/// Connects a recovering client, retrying while its previous connection, dropped
/// abruptly, still holds the conn_id (400) on a busy machine.
fn connect(comet: &Comet, conn_id: &str, since: Option<&Position>) -> Client {
    let full = format!("ws://127.0.0.1:{}{}", comet.ws_port, url(conn_id, since));
    for _ in 0..200 {
        match connect_url(&full, comet.ws_port) {
            Ok(client) => return client,
            Err(tungstenite::Error::Http(r)) if r.status() == 400 => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(other) => panic!("{conn_id} did not connect: {other:?}"),
        }
    }
    panic!("{conn_id} still held after 10 s");
}

/// A client process (tests/clients/ws_reader.py) printing every frame it gets; its
/// first line already read (retrying while the conn_id is still held).
fn spawn_reader(
    comet: &Comet,
    conn_id: &str,
    since: Option<&Position>,
) -> (
    std::process::Child,
    std::io::Lines<BufReader<std::process::ChildStdout>>,
    Value,
) {
    for _ in 0..200 {
        let mut child = Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/clients/ws_reader.py"
            ))
            .arg(comet.ws_port.to_string())
            .arg(url(conn_id, since))
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        if let Some(Ok(first)) = lines.next() {
            return (child, lines, parse(&first));
        }
        child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the client process never upgraded");
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON: {text:?}: {e}"))
}

/// The client side of the contract: checks that seqs follow on from the last one got,
/// within one epoch, and records the messages.
#[derive(Default)]
struct Checker {
    position: Option<Position>,
    got: Vec<String>,
}

impl Checker {
    /// Takes one numbered message frame.
    fn take(&mut self, frame: &Value) {
        let seq = frame["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("no seq: {frame}"));
        let epoch = frame["epoch"].as_str().expect("epoch").to_owned();
        if let Some(p) = &self.position {
            assert_eq!(p.epoch, epoch, "epoch changed within one node's life");
            assert_eq!(seq, p.seq + 1, "seq out of order after {p:?}: {frame}");
        }
        self.got
            .push(frame["msg"].as_str().expect("msg").to_owned());
        self.position = Some(Position { epoch, seq });
    }

    /// Checks a reconnect's first frame: complete, and at the last seq the node gave.
    fn header(&self, frame: &Value, last_pushed_seq: u64) {
        assert_eq!(frame["recovered"], json!(true), "{frame}");
        assert_eq!(frame["seq"], json!(last_pushed_seq), "{frame}");
        let p = self.position.as_ref().expect("a position");
        assert_eq!(frame["epoch"], json!(p.epoch));
    }
}

fn push(rpc: &mut common::Rpc, ids: &[&str], msg: &str) -> Value {
    rpc.push(ids, msg, "")["result"].clone()
}

/// Pushes `m{from}..m{to}` (inclusive) to `id`, one call each.
fn push_range(rpc: &mut common::Rpc, id: &str, from: u64, to: u64) -> Vec<Value> {
    (from..=to)
        .map(|i| push(rpc, &[id], &format!("m{i}")))
        .collect()
}

fn read_messages(client: &mut Client, checker: &mut Checker, n: usize) {
    for _ in 0..n {
        let text = next_text(client).expect("a message");
        checker.take(&parse(&text));
    }
}

/// Waits until the node reports `id` only buffered (its session is gone) for a probe
/// message, which then counts as pushed.
fn wait_parked(rpc: &mut common::Rpc, id: &str, seq: &mut u64) {
    for _ in 0..200 {
        *seq += 1;
        let result = push(rpc, &[id], &format!("m{seq}"));
        if result == json!({"buffered": [id]}) {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{id} never parked");
}

#[test]
fn exactly_once_in_order_across_clean_abrupt_and_killed_reconnects() {
    let server = MessageServer::start();
    let comet = Comet::start(Some(&server), RECOVERY);
    let mut rpc = comet.rpc();
    let id = "r1";
    let mut checker = Checker::default();
    let mut pushed = 0;
    let mut client = connect(&comet, id, None);
    for round in 0..6 {
        // Live pushes, of which the client reads half before it goes.
        push_range(&mut rpc, id, pushed + 1, pushed + 20);
        pushed += 20;
        read_messages(&mut client, &mut checker, 10);
        match round % 3 {
            0 => {
                // A clean close: the node parks the buffer, pushes are reported buffered.
                client.close(None).unwrap();
                while next_text(&mut client).is_some() {}
                drop(client);
                wait_parked(&mut rpc, id, &mut pushed);
            }
            // Dropped without a close frame, unread messages in the socket: a reset.
            1 => drop(client),
            _ => {
                drop(client);
                // A client process killed while it holds unread messages.
                let (mut child, mut lines, header) =
                    spawn_reader(&comet, id, checker.position.as_ref());
                checker.header(&header, pushed);
                let missed = pushed - checker.position.as_ref().unwrap().seq;
                push_range(&mut rpc, id, pushed + 1, pushed + 30);
                pushed += 30;
                // Everything missed so far, then 5 of the new ones; then it is killed.
                for _ in 0..missed + 5 {
                    checker.take(&parse(&lines.next().unwrap().unwrap()));
                }
                child.kill().unwrap();
                child.wait().unwrap();
            }
        }
        // While it is away.
        push_range(&mut rpc, id, pushed + 1, pushed + 10);
        pushed += 10;
        client = connect(&comet, id, checker.position.as_ref());
        let header = parse(&next_text(&mut client).expect("first frame"));
        checker.header(&header, pushed);
    }
    let left = pushed - checker.position.as_ref().unwrap().seq;
    read_messages(&mut client, &mut checker, left as usize);
    let expected: Vec<String> = (1..=pushed).map(|i| format!("m{i}")).collect();
    assert_eq!(checker.got, expected, "every message once, in order");
    client.close(None).unwrap();
    drop(client);
    drop(comet);
    // online/offline as without recovery: one pair per session.
    let (ids, sessions) = check_presence_ledger(&server);
    assert_eq!((ids, sessions), (1, 9));
}

#[test]
fn exactly_once_in_order_while_pushes_race_the_reconnects() {
    // Pushes keep coming while the client drops and reconnects, so some land while its
    // conn_id is claimed on one shard and its buffer is still on the other.
    let comet = Comet::start(None, RECOVERY);
    let total = 2000;
    let mut client = connect(&comet, "race", None);
    let pusher = {
        let mut rpc = comet.rpc();
        std::thread::spawn(move || {
            for i in 1..=total {
                let result = push(&mut rpc, &["race"], &format!("m{i}"));
                assert!(
                    result == json!("ok") || result["buffered"] == json!(["race"]),
                    "{result}"
                );
            }
        })
    };
    let mut checker = Checker::default();
    while checker.got.len() < total {
        // Up to 150 messages per connection, then dropped without a close frame.
        for _ in 0..150 {
            match next_text(&mut client) {
                Some(text) => checker.take(&parse(&text)),
                None => break,
            }
            if checker.got.len() == total {
                break;
            }
        }
        drop(client);
        client = connect(&comet, "race", checker.position.as_ref());
        let header = parse(&next_text(&mut client).expect("first frame"));
        assert_eq!(header["recovered"], json!(true), "{header}");
    }
    pusher.join().unwrap();
    let expected: Vec<String> = (1..=total).map(|i| format!("m{i}")).collect();
    assert_eq!(checker.got, expected);
}

#[test]
fn pushes_while_away_are_reported_buffered_and_the_first_generation_is_unchanged() {
    let comet = Comet::start(None, RECOVERY);
    let mut rpc = comet.rpc();
    let mut client = connect(&comet, "away", None);
    assert_eq!(push(&mut rpc, &["away"], "m1"), json!("ok"));
    let mut checker = Checker::default();
    read_messages(&mut client, &mut checker, 1);
    client.close(None).unwrap();
    while next_text(&mut client).is_some() {}
    let mut seq = 1;
    wait_parked(&mut rpc, "away", &mut seq);
    // Buffered and failed ids side by side.
    let reply = rpc.push(&["away", "nobody"], "mixed", "");
    let error: Value = serde_json::from_str(reply["error"].as_str().unwrap()).unwrap();
    assert_eq!(error["ids"], json!(["nobody"]));
    assert_eq!(error["buffered"], json!(["away"]));
    seq += 1;
    // The first generation reports only failures, as before: buffered is not failed.
    let inner = json!({"to": ["away"], "msg": "gen1", "token": ""}).to_string();
    let reply = rpc.call("Server.SendToConnections", json!(inner));
    assert_eq!(reply["result"], json!("ok"), "{reply}");
    seq += 1;
    let mut client = connect(&comet, "away", checker.position.as_ref());
    let header = parse(&next_text(&mut client).unwrap());
    checker.header(&header, seq);
    read_messages(&mut client, &mut checker, (seq - 1) as usize);
    assert_eq!(checker.got.last().map(String::as_str), Some("gen1"));
    assert_eq!(checker.got[checker.got.len() - 2], "mixed");
}

#[test]
fn a_window_exceeded_or_another_epoch_is_reported_lost() {
    let comet = Comet::start(None, "recovery_window=3\nrecovery_ttl=60s");
    let mut rpc = comet.rpc();
    let mut client = connect(&comet, "w", None);
    push(&mut rpc, &["w"], "m1");
    let first = parse(&next_text(&mut client).unwrap());
    let epoch = first["epoch"].as_str().unwrap().to_owned();
    client.close(None).unwrap();
    while next_text(&mut client).is_some() {}
    let mut seq = 1;
    wait_parked(&mut rpc, "w", &mut seq);
    push_range(&mut rpc, "w", seq + 1, seq + 5);
    seq += 5;
    let since = Position {
        epoch: epoch.clone(),
        seq: 1,
    };
    let mut client = connect(&comet, "w", Some(&since));
    let header = parse(&next_text(&mut client).unwrap());
    assert_eq!(
        header,
        json!({"recovered": false, "epoch": epoch, "seq": seq, "reason": "window_exceeded",
               "lost": [2, seq - 3]})
    );
    // What is still kept follows, in order.
    for expected in seq - 2..=seq {
        assert_eq!(
            parse(&next_text(&mut client).unwrap())["seq"],
            json!(expected)
        );
    }
    drop(client);
    let other = Position {
        epoch: "another-node".into(),
        seq: 7,
    };
    let mut client = connect(&comet, "w2", Some(&other));
    let header = parse(&next_text(&mut client).unwrap());
    assert_eq!(header["recovered"], json!(false));
    assert_eq!(header["reason"], json!("epoch"));
    assert_eq!(header["lost"], Value::Null);
}

#[test]
fn a_kicked_client_gets_no_recovery() {
    let comet = Comet::start(None, RECOVERY);
    let mut rpc = comet.rpc();
    let mut client = connect(&comet, "k", None);
    push(&mut rpc, &["k"], "m1");
    let mut checker = Checker::default();
    read_messages(&mut client, &mut checker, 1);
    rpc.call(
        "Server.KickConnections",
        json!({"connections": ["k"], "token": ""}),
    );
    assert_eq!(common::close_code(&mut client), Some(1000));
    let reply = rpc.push(&["k"], "after", "");
    let error: Value = serde_json::from_str(reply["error"].as_str().unwrap()).unwrap();
    assert_eq!(error["ids"], json!(["k"]), "failed, not buffered: {reply}");
    assert!(error.get("buffered").is_none());
    let mut client = connect(&comet, "k", checker.position.as_ref());
    let header = parse(&next_text(&mut client).unwrap());
    assert_eq!(header["recovered"], json!(false));
    assert_eq!(header["reason"], json!("expired"));
    // Kicked while away: the buffer goes, and with it the `buffered` answers.
    let mut away = connect(&comet, "k2", None);
    away.close(None).unwrap();
    while next_text(&mut away).is_some() {}
    let mut seq = 0;
    wait_parked(&mut rpc, "k2", &mut seq);
    rpc.call(
        "Server.KickConnections",
        json!({"connections": ["k2"], "token": ""}),
    );
    let reply = rpc.push(&["k2"], "after kick", "");
    let error: Value = serde_json::from_str(reply["error"].as_str().unwrap()).unwrap();
    assert_eq!(error["ids"], json!(["k2"]), "{reply}");
}

#[test]
fn a_replaced_connection_hands_its_buffer_to_the_new_one() {
    let comet = Comet::start(None, &format!("{RECOVERY}\nduplicate_conn_id=replace"));
    let mut rpc = comet.rpc();
    let mut old = connect(&comet, "rep", None);
    push_range(&mut rpc, "rep", 1, 5);
    let mut checker = Checker::default();
    read_messages(&mut old, &mut checker, 2);
    // The new connection takes over while the old one still holds 3 unread messages.
    let mut new = connect(&comet, "rep", checker.position.as_ref());
    assert_eq!(common::close_code(&mut old), Some(1008), "replaced");
    let header = parse(&next_text(&mut new).unwrap());
    checker.header(&header, 5);
    push_range(&mut rpc, "rep", 6, 7);
    read_messages(&mut new, &mut checker, 5);
    let expected: Vec<String> = (1..=7).map(|i| format!("m{i}")).collect();
    assert_eq!(checker.got, expected);
}

#[test]
fn a_flood_to_absent_recovering_clients_stays_within_the_total_bound() {
    // 8 MiB for the node (4 MiB per shard); unbounded, the flood below would keep 80 MB.
    let comet = Comet::start(
        None,
        "recovery_window=100000\nrecovery_bytes=1073741824\nrecovery_total_bytes=8388608\n\
         recovery_ttl=600s",
    );
    let mut rpc = comet.rpc();
    let ids: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
    let mut epoch = String::new();
    for id in &ids {
        let mut client = connect(&comet, id, None);
        push(&mut rpc, &[id], "first");
        epoch = parse(&next_text(&mut client).unwrap())["epoch"]
            .as_str()
            .unwrap()
            .to_owned();
        client.close(None).unwrap();
        while next_text(&mut client).is_some() {}
    }
    let mut probes = 1;
    wait_parked(&mut rpc, "f19", &mut probes);
    let before = comet.rss_kib();
    // Each message distinct (a shared one would cost its bytes once whatever the count).
    for i in 0..400 {
        for id in &ids {
            let result = push(&mut rpc, &[id], &format!("{i:05}{}", "x".repeat(10_000)));
            assert_eq!(result, json!({"buffered": [id]}));
        }
    }
    let grown_mib = comet.rss_kib().saturating_sub(before) / 1024;
    assert!(
        grown_mib < 40,
        "RSS grew {grown_mib} MiB for an 8 MiB bound (80 MB pushed)"
    );
    // The oldest went first: a reconnect is told what it lost, and gets the newest.
    let since = Position { epoch, seq: 1 };
    let mut client = connect(&comet, "f0", Some(&since));
    let header = parse(&next_text(&mut client).unwrap());
    assert_eq!(header["reason"], json!("window_exceeded"), "{header}");
    assert_eq!(header["lost"][0], json!(2));
    let last = header["seq"].as_u64().unwrap();
    let kept = last - header["lost"][1].as_u64().unwrap();
    assert!(kept > 0 && kept < 400, "{header}");
    let mut seq = 0;
    for _ in 0..kept {
        seq = parse(&next_text(&mut client).unwrap())["seq"]
            .as_u64()
            .unwrap();
    }
    assert_eq!(seq, last);
}

#[test]
fn clients_that_did_not_opt_in_get_plain_frames_and_json_lines_carry_seq() {
    let tcp_port = free_port();
    let comet = Comet::start(None, &format!("{RECOVERY}\ntcp_port={tcp_port}"));
    let mut rpc = comet.rpc();
    let mut plain_ws = comet.connect("plain", "t", "").unwrap();
    let mut lines = Reader::new(plain(tcp_port));
    lines.send(b"{\"conn_id\":\"lines\",\"token\":\"t\",\"recover\":true}\n");
    assert_eq!(lines.json().unwrap()["type"], json!("ok"));
    assert_eq!(push(&mut rpc, &["plain", "lines"], "hello"), json!("ok"));
    assert_eq!(next_text(&mut plain_ws).as_deref(), Some("hello"));
    let line = lines.json().unwrap();
    assert_eq!(line["type"], json!("message"));
    assert_eq!(line["data"], json!("hello"));
    assert_eq!(line["seq"], json!(1));
    let epoch = line["epoch"].as_str().unwrap().to_owned();
    // A JSON-lines reconnect: the `ok` line, the first frame as a line, then the missed.
    drop(lines);
    let result = push(&mut rpc, &["lines"], "again");
    assert!(
        result == json!("ok") || result == json!({"buffered": ["lines"]}),
        "{result}"
    );
    let token = json!({"conn_id": "lines", "token": "t", "recover": true,
                       "since": {"epoch": epoch, "seq": 1}});
    let mut lines = Reader::new(plain(tcp_port));
    let answer = loop {
        lines.send(format!("{token}\n").as_bytes());
        let answer = lines.json().unwrap();
        if answer["type"] == json!("ok") {
            break answer;
        }
        // Its first connection may still hold the conn_id for a moment.
        std::thread::sleep(Duration::from_millis(50));
        lines = Reader::new(plain(tcp_port));
    };
    assert_eq!(answer["type"], json!("ok"));
    assert_eq!(
        lines.json().unwrap(),
        json!({"recovered": true, "epoch": epoch, "seq": 2})
    );
    assert_eq!(
        lines.json().unwrap(),
        json!({"type": "message", "data": "again", "seq": 2, "epoch": epoch})
    );
    // Gone, a client that did not opt in has nothing kept: its pushes fail as before.
    plain_ws.close(None).unwrap();
    while next_text(&mut plain_ws).is_some() {}
    assert!(common::wait_until(Duration::from_secs(10), || {
        rpc.push(&["plain"], "after", "")["error"].is_string()
    }));
}

/// The epoch docs/PROTOCOL.md §6 shows in its examples.
const DOC_EPOCH: &str = "1880a3f2c2a1b9e4";

/// A live node's frames, with its epoch written as the doc's, must appear in the doc
/// byte for byte.
fn assert_documented(doc: &str, epoch: &str, frame: &str) {
    let shown = frame.replace(epoch, DOC_EPOCH);
    assert!(
        doc.lines().any(|line| line == shown),
        "docs/PROTOCOL.md §6 does not show {shown}"
    );
}

#[test]
fn the_protocol_doc_shows_the_frames_byte_for_byte() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md")).unwrap();
    let section = &doc[doc.find("## 6. Recovery").expect("a Recovery section")..];
    for (window, reason) in [(3, "recovered"), (2, "window_exceeded")] {
        let tcp_port = free_port();
        let comet = Comet::start(
            None,
            &format!("recovery_window={window}\nrecovery_ttl=60s\ntcp_port={tcp_port}"),
        );
        let mut rpc = comet.rpc();
        let mut client = connect(&comet, "u1", None);
        push(&mut rpc, &["u1"], "hello");
        let first = next_text(&mut client).unwrap();
        let epoch = parse(&first)["epoch"].as_str().unwrap().to_owned();
        assert_documented(section, &epoch, &first);
        client.close(None).unwrap();
        while next_text(&mut client).is_some() {}
        let mut seq = 1;
        wait_parked(&mut rpc, "u1", &mut seq);
        push_range(&mut rpc, "u1", seq + 1, 44);
        let since = Position {
            epoch: epoch.clone(),
            seq: 41,
        };
        let mut client = connect(&comet, "u1", Some(&since));
        assert_documented(section, &epoch, &next_text(&mut client).unwrap());
        if reason == "recovered" {
            let mut fresh = connect(&comet, "u2", Some(&since));
            assert_documented(section, &epoch, &next_text(&mut fresh).unwrap());
            let mut lines = Reader::new(plain(tcp_port));
            lines.send(b"{\"conn_id\":\"u3\",\"token\":\"t\",\"recover\":true}\n");
            lines.line().unwrap();
            push(&mut rpc, &["u3"], "hello");
            assert_documented(section, &epoch, &lines.line().unwrap());
        }
    }
}

#[test]
fn a_malformed_recover_or_since_is_a_malformed_token() {
    let comet = Comet::start(None, RECOVERY);
    for token in [
        json!({"conn_id": "m", "token": "t", "recover": "yes"}),
        json!({"conn_id": "m", "token": "t", "recover": true, "since": {"epoch": "e", "seq": -1}}),
        json!({"conn_id": "m", "token": "t", "recover": true, "since": "e:1"}),
    ] {
        let url = format!(
            "ws://127.0.0.1:{}/ws?t={}",
            comet.ws_port,
            url_encode(&token.to_string())
        );
        assert_eq!(
            common::refusal_status(connect_url(&url, comet.ws_port)),
            401,
            "{token}"
        );
    }
}
