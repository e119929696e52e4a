//! Every way in: WebSocket, wss, raw TCP with JSON-lines and with RESP (plain and TLS),
//! stock Redis clients (redis-cli, redis-py), origin and path checks, and bad input on
//! each protocol. Real binary, real message server, real clients.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::clients::{Reader, Resp, TestCert, command, plain};
use common::{Comet, MessageServer, free_port, next_text, temp_dir, wait_until};
use serde_json::json;

/// A node with raw TCP on a port of its own, once that port takes connections.
fn node_with_tcp(server: &MessageServer, extra: &str) -> (Comet, u16) {
    let tcp_port = free_port();
    let node = Comet::start(Some(server), &format!("tcp_port={tcp_port}\n{extra}"));
    assert!(wait_until(Duration::from_secs(5), || common::port_open(
        tcp_port
    )));
    (node, tcp_port)
}

/// A node serving plain WebSocket on its client port, raw TCP on `tcp_port` and wss on
/// `wss_port`, all with the same certificate.
fn multi_protocol_node(server: &MessageServer, cert: &TestCert, extra: &str) -> (Comet, u16, u16) {
    let tcp_port = free_port();
    let wss_port = free_port();
    let node = Comet::start(
        Some(server),
        &format!(
            "tcp_port={tcp_port}\nwss_port={wss_port}\n{}{extra}",
            cert.ini()
        ),
    );
    assert!(wait_until(Duration::from_secs(5), || common::port_open(
        tcp_port
    )
        && common::port_open(wss_port)));
    (node, tcp_port, wss_port)
}

/// The conn_ids a second-generation push reply names as not delivered.
fn undelivered(reply: &serde_json::Value) -> serde_json::Value {
    if reply["result"] == json!("ok") {
        return json!([]);
    }
    let error: serde_json::Value = serde_json::from_str(reply["error"].as_str().unwrap()).unwrap();
    error["ids"].clone()
}

fn json_client<S: common::clients::Wire>(stream: S, conn_id: &str) -> Reader<S> {
    let mut client = Reader::new(stream);
    let token = json!({"conn_id": conn_id, "token": "t", "info": "from-json"});
    client.send(format!("{token}\n").as_bytes());
    let welcome = client.json().expect("welcome line");
    assert_eq!(welcome, json!({"type": "ok", "conn_id": conn_id}));
    client
}

fn resp_client<S: common::clients::Wire>(stream: S, conn_id: &str) -> Reader<S> {
    let mut client = Reader::new(stream);
    client.send(&command(&["AUTH", conn_id, "t"]));
    assert_eq!(client.resp(), Some(Resp::Simple("OK".into())));
    client.send(&command(&["SUBSCRIBE", "inbox"]));
    assert_eq!(client.resp().unwrap().words(), ["subscribe", "inbox", "1"]);
    client
}

fn wss_client(
    cert: &TestCert,
    port: u16,
    conn_id: &str,
) -> tungstenite::WebSocket<impl std::io::Read + std::io::Write> {
    let t = json!({"conn_id": conn_id, "token": "t", "info": ""}).to_string();
    let url = format!("wss://localhost:{port}/ws?t={}", common::url_encode(&t));
    let (socket, _) = tungstenite::client::client(url, cert.connect(port)).expect("wss upgrade");
    socket
}

#[test]
fn one_push_reaches_websocket_wss_json_and_resp_clients_alike() {
    let server = MessageServer::start();
    let dir = temp_dir("protocols");
    let cert = TestCert::generate(&dir);
    let (node, tcp_port, wss_port) = multi_protocol_node(&server, &cert, "");
    let mut ws = node.connect("c-ws", "t", "").unwrap();
    let mut wss = wss_client(&cert, wss_port, "c-wss");
    let mut json_plain = json_client(plain(tcp_port), "c-json");
    let mut resp_plain = resp_client(plain(tcp_port), "c-resp");
    let ids = ["c-ws", "c-wss", "c-json", "c-resp", "c-nobody"];
    let mut rpc = node.rpc();
    for n in 0..3 {
        let msg = format!("hello {n} \"quoted\"\nsecond line");
        let reply = rpc.push(&ids, &msg, "");
        assert_eq!(undelivered(&reply), json!(["c-nobody"]), "{reply}");
        assert_eq!(next_text(&mut ws).as_deref(), Some(msg.as_str()));
        let wss_text = loop {
            match wss.read().unwrap() {
                tungstenite::Message::Text(text) => break text.to_string(),
                _ => continue,
            }
        };
        assert_eq!(wss_text, msg);
        assert_eq!(
            json_plain.json_skipping_pings().unwrap(),
            json!({"type": "message", "data": msg})
        );
        assert_eq!(
            resp_plain.resp().unwrap().words(),
            ["message", "inbox", msg.as_str()]
        );
    }
    for id in &ids[..4] {
        assert!(
            wait_until(Duration::from_secs(5), || server.count("online", id) == 1),
            "{id}"
        );
    }
    drop((ws, wss, json_plain, resp_plain));
    for id in &ids[..4] {
        assert!(
            wait_until(Duration::from_secs(5), || server.count("offline", id) == 1),
            "offline {id}"
        );
    }
    assert_eq!(
        server
            .calls_of("online")
            .iter()
            .find(|c| c.arg(0) == "c-json")
            .unwrap()
            .arg(1),
        "from-json"
    );
}

#[test]
fn tls_on_the_tcp_port_carries_json_and_resp() {
    let server = MessageServer::start();
    let dir = temp_dir("tcp-tls");
    let cert = TestCert::generate(&dir);
    let tcp_port = free_port();
    let node = Comet::start(
        Some(&server),
        &format!("tcp_port={tcp_port}\ntcp_tls=true\n{}", cert.ini()),
    );
    assert!(wait_until(Duration::from_secs(5), || common::port_open(
        tcp_port
    )));
    let mut json_tls = json_client(cert.connect(tcp_port), "t-json");
    let mut resp_tls = resp_client(cert.connect(tcp_port), "t-resp");
    let reply = node.rpc().push(&["t-json", "t-resp"], "over tls", "");
    assert_eq!(undelivered(&reply), json!([]), "{reply}");
    assert_eq!(json_tls.json_skipping_pings().unwrap()["data"], "over tls");
    assert_eq!(
        resp_tls.resp().unwrap().words(),
        ["message", "inbox", "over tls"]
    );
    // A plain-text client on a TLS port is refused without disturbing the others.
    let mut wrong = Reader::new(plain(tcp_port));
    wrong.send(b"{\"conn_id\":\"x\"}\n");
    assert!(wrong.line().is_none());
    assert_eq!(
        undelivered(&node.rpc().push(&["t-json"], "still here", "")),
        json!([])
    );
    assert_eq!(
        json_tls.json_skipping_pings().unwrap()["data"],
        "still here"
    );
}

#[test]
fn json_lines_session_heartbeat_ping_and_bad_lines() {
    let server = MessageServer::start();
    let tcp_port = free_port();
    let node = Comet::start(
        Some(&server),
        &format!(
            "tcp_port={tcp_port}\nping_interval=300ms\nheartbeat_timeout=1200ms\nmax_frame_size=64\n"
        ),
    );
    assert!(wait_until(Duration::from_secs(5), || common::port_open(
        tcp_port
    )));
    let mut client = json_client(plain(tcp_port), "j1");
    // The server pings a quiet client; answering keeps it alive past the timeout.
    for _ in 0..5 {
        assert_eq!(client.json().unwrap(), json!({"type": "ping"}));
        client.send(b"{\"type\":\"pong\"}\n");
    }
    client.send(b"{\"type\":\"ping\"}\n");
    assert_eq!(
        client.json_skipping_pings().unwrap(),
        json!({"type": "pong"})
    );
    client.send(b"not json\n");
    let error = client.json_skipping_pings().unwrap();
    assert_eq!(error["type"], "error");
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains("not a JSON object"),
        "{error}"
    );
    assert_eq!(
        undelivered(&node.rpc().push(&["j1"], "after the bad line", "")),
        json!([])
    );
    assert_eq!(
        client.json_skipping_pings().unwrap()["data"],
        "after the bad line"
    );
    // A line over max_frame_size closes with 1009, as a WebSocket frame would.
    client.send(&[b'x'; 100]);
    let close = client.json_skipping_pings().unwrap();
    assert_eq!(close["type"], "close");
    assert_eq!(close["code"], 1009);
    assert!(client.line().is_none());
    assert!(wait_until(Duration::from_secs(5), || server
        .count("offline", "j1")
        == 1));

    // A client that stops answering is closed by the heartbeat with 1008.
    let mut silent = json_client(plain(tcp_port), "j2");
    let mut last = None;
    while let Some(line) = silent.json() {
        last = Some(line);
    }
    let last = last.unwrap();
    assert_eq!(
        (last["type"].as_str(), last["code"].as_u64()),
        (Some("close"), Some(1008)),
        "{last}"
    );
    assert!(wait_until(Duration::from_secs(5), || server
        .count("offline", "j2")
        == 1));
}

#[test]
fn json_lines_refusals_say_why() {
    let server = MessageServer::start();
    server.refuse_token("bad");
    let (_node, tcp_port) = node_with_tcp(&server, "");
    let cases: [(&[u8], &str); 3] = [
        (b"{\"conn_id\":\"r1\",\"token\":\"bad\"}\n", "token refused"),
        (b"{\"token\":\"x\"}\n", "not a token object"),
        (b"{\"conn_id\":\"\"}\n", "conn_id is empty"),
    ];
    for (line, why) in cases {
        let mut client = Reader::new(plain(tcp_port));
        client.send(line);
        let answer = client.json().unwrap();
        assert_eq!(answer["type"], "error");
        assert!(answer["error"].as_str().unwrap().contains(why), "{answer}");
        assert!(client.line().is_none(), "closed after the refusal");
    }
    let _held = json_client(plain(tcp_port), "dup");
    let mut second = Reader::new(plain(tcp_port));
    second.send(b"{\"conn_id\":\"dup\",\"token\":\"t\"}\n");
    assert!(
        second.json().unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("already connected")
    );
    assert_eq!(server.count("online", "r1"), 0);
}

#[test]
fn resp_connection_is_closed_after_three_refused_tokens() {
    let server = MessageServer::start();
    server.refuse_token("bad");
    let (_node, tcp_port) = node_with_tcp(&server, "");
    let mut client = Reader::new(plain(tcp_port));
    for _ in 0..3 {
        client.send(&command(&["AUTH", "r1", "bad"]));
        assert!(matches!(client.resp(), Some(Resp::Error(e)) if e.starts_with("WRONGPASS")));
    }
    let asked = Instant::now();
    client.send(&command(&["PING"]));
    assert_eq!(client.resp(), None);
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "closed, not left silent until the read timeout"
    );
}

#[test]
fn resp_handshake_commands_errors_and_push_mode() {
    let server = MessageServer::start();
    server.refuse_token("bad");
    let (node, tcp_port) = node_with_tcp(&server, "");
    let mut client = Reader::new(plain(tcp_port));
    client.send(&command(&["PING"]));
    assert_eq!(client.resp(), Some(Resp::Simple("PONG".into())));
    client.send(&command(&["SUBSCRIBE", "x"]));
    assert!(matches!(client.resp(), Some(Resp::Error(e)) if e.starts_with("NOAUTH")));
    client.send(&command(&["GET", "k"]));
    assert!(matches!(client.resp(), Some(Resp::Error(e)) if e.contains("unknown command 'GET'")));
    client.send(&command(&["AUTH", "r1", "bad"]));
    assert!(matches!(client.resp(), Some(Resp::Error(e)) if e.starts_with("WRONGPASS")));
    client.send(&command(&[
        "HELLO", "3", "AUTH", "r1", "good", "SETNAME", "dev-info",
    ]));
    let hello = client.resp().unwrap();
    let Resp::Array(fields) = &hello else {
        panic!("{hello:?}")
    };
    assert_eq!(fields[0], Resp::Bulk("server".into()));
    assert!(fields.contains(&Resp::Int(3)), "{hello:?}");
    client.send(&command(&["CLIENT", "SETINFO", "lib-name", "test"]));
    assert_eq!(client.resp(), Some(Resp::Simple("OK".into())));
    client.send(&command(&["SELECT", "0"]));
    assert_eq!(client.resp(), Some(Resp::Simple("OK".into())));
    client.send(&command(&["SELECT", "1"]));
    assert!(matches!(client.resp(), Some(Resp::Error(_))));
    // Pushes before SUBSCRIBE find nobody: the client is not online yet.
    assert_eq!(
        undelivered(&node.rpc().push(&["r1"], "early", "")),
        json!(["r1"])
    );
    // Inline commands work too (what a person types into nc).
    client.send(b"subscribe news more\r\n");
    assert_eq!(
        client.resp().unwrap(),
        Resp::Push(vec![
            Resp::Bulk("subscribe".into()),
            Resp::Bulk("news".into()),
            Resp::Int(1)
        ])
    );
    assert_eq!(client.resp().unwrap().words(), ["subscribe", "more", "2"]);
    assert!(wait_until(Duration::from_secs(5), || server
        .count("online", "r1")
        == 1));
    assert_eq!(server.calls_of("online")[0].arg(1), "dev-info");
    assert_eq!(
        undelivered(&node.rpc().push(&["r1"], "first", "")),
        json!([])
    );
    assert_eq!(
        client.resp().unwrap(),
        Resp::Push(vec![
            Resp::Bulk("message".into()),
            Resp::Bulk("news".into()),
            Resp::Bulk("first".into())
        ])
    );
    client.send(&command(&["PING"]));
    assert_eq!(client.resp(), Some(Resp::Simple("PONG".into())));
    // RESP3 lifts Redis's subscribed-mode restriction: answered as before SUBSCRIBE.
    client.send(&command(&["GET", "k"]));
    assert!(matches!(client.resp(), Some(Resp::Error(e)) if e.contains("unknown command 'GET'")));
    client.send(&command(&["UNSUBSCRIBE"]));
    assert_eq!(client.resp().unwrap().words(), ["unsubscribe", "news", "1"]);
    assert_eq!(client.resp().unwrap().words(), ["unsubscribe", "more", "0"]);
    // Leaving every channel ends the session, not the connection.
    assert!(wait_until(Duration::from_secs(5), || server
        .count("offline", "r1")
        == 1));
    client.send(&command(&["PING"]));
    assert_eq!(client.resp(), Some(Resp::Simple("PONG".into())));
    assert_eq!(
        undelivered(&node.rpc().push(&["r1"], "between", "")),
        json!(["r1"])
    );
    client.send(&command(&["SUBSCRIBE", "again"]));
    assert_eq!(client.resp().unwrap().words(), ["subscribe", "again", "1"]);
    assert!(wait_until(Duration::from_secs(5), || server
        .count("online", "r1")
        == 2));
    client.send(&command(&["QUIT"]));
    assert_eq!(client.resp(), Some(Resp::Simple("OK".into())));
    assert!(client.resp().is_none(), "QUIT closes the connection");
    assert!(wait_until(Duration::from_secs(5), || server
        .count("offline", "r1")
        == 2));
    assert_eq!(common::check_presence_ledger(&server), (1, 2));
}

#[test]
fn hostile_bytes_on_every_protocol_are_answered_and_contained() {
    let server = MessageServer::start();
    let (node, tcp_port) = node_with_tcp(&server, "handshake_timeout=1s\n");
    let mut bystander = node.connect("bystander", "t", "").unwrap();
    let mut resp_bystander = resp_client(plain(tcp_port), "resp-bystander");

    let mut huge_array = Reader::new(plain(tcp_port));
    huge_array.send(b"*99999999\r\n");
    assert_eq!(
        huge_array.resp(),
        Some(Resp::Error(
            "ERR Protocol error: invalid multibulk length".into()
        ))
    );
    assert!(huge_array.resp().is_none());

    let mut huge_bulk = Reader::new(plain(tcp_port));
    huge_bulk.send(b"*1\r\n$2147483648\r\n");
    assert_eq!(
        huge_bulk.resp(),
        Some(Resp::Error(
            "ERR Protocol error: invalid bulk length".into()
        ))
    );

    let mut endless_line = Reader::new(plain(tcp_port));
    endless_line.send(&vec![b'a'; 64 * 1024]);
    assert!(matches!(endless_line.resp(), Some(Resp::Error(e)) if e.contains("larger than")));

    let mut binary = Reader::new(plain(tcp_port));
    binary.send(&[0xff, 0x00, 0x13, 0x37, b'\n']);
    assert!(matches!(binary.resp(), Some(Resp::Error(e)) if e.contains("unknown command")));

    let mut bad_ws = Reader::new(plain(node.ws_port));
    bad_ws.send(b"\x16\x03\x01garbage\r\n\r\n");
    assert!(bad_ws.line().unwrap().starts_with("HTTP/1.1 400"));

    // Half-open: connects, sends nothing; shed by the handshake timeout.
    let mut silent = Reader::new(plain(tcp_port));
    let started = std::time::Instant::now();
    assert!(silent.line().is_none());
    assert!(started.elapsed() < Duration::from_secs(4));

    // A subscribed client that turns hostile is closed; the others never notice.
    resp_bystander.send(b"*99999999\r\n");
    assert!(
        matches!(resp_bystander.resp(), Some(Resp::Error(e)) if e.contains("invalid multibulk length"))
    );
    assert!(resp_bystander.resp().is_none());
    assert_eq!(
        undelivered(&node.rpc().push(&["bystander"], "unaffected", "")),
        json!([])
    );
    assert_eq!(next_text(&mut bystander).as_deref(), Some("unaffected"));
    assert!(wait_until(Duration::from_secs(5), || server
        .count("offline", "resp-bystander")
        == 1));
    assert_eq!(server.count("online", "resp-bystander"), 1);
}

#[test]
fn websocket_path_and_origin_checks() {
    let server = MessageServer::start();
    let node = Comet::start(
        Some(&server),
        "websocket_path=/push\nwebsocket_allowed_origins=https://app.example.com, https://*.example.org\n",
    );
    let upgrade = |path: &str, origin: Option<&str>| {
        let mut client = Reader::new(plain(node.ws_port));
        let t = json!({"conn_id": format!("o{}", free_port()), "token": "t"});
        let origin = origin
            .map(|o| format!("Origin: {o}\r\n"))
            .unwrap_or_default();
        client.send(common::clients::upgrade_request(path, &t, &origin).as_bytes());
        client.line().unwrap()
    };
    assert!(upgrade("/push", Some("https://app.example.com")).contains(" 101 "));
    assert!(upgrade("/push", Some("https://eu.cdn.example.org")).contains(" 101 "));
    assert!(
        upgrade("/push", None).contains(" 101 "),
        "native clients send no Origin"
    );
    assert!(upgrade("/push", Some("https://evil.example.com")).contains(" 403 "));
    assert!(upgrade("/ws", Some("https://app.example.com")).contains(" 404 "));
}

/// Reads a child's stdout lines on a thread, so a test can wait for one with a timeout.
fn stdout_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_for_line(lines: &std::sync::mpsc::Receiver<String>, wanted: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) => {
                let done = line == wanted;
                seen.push(line);
                if done {
                    return seen;
                }
            }
            Err(_) => break,
        }
    }
    panic!("no line {wanted:?}; saw {seen:?}");
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn redis_cli_receives_pushes_in_resp2_and_resp3() {
    let server = MessageServer::start();
    let (node, tcp_port) = node_with_tcp(&server, "");
    for (conn_id, extra) in [("cli-2", None), ("cli-3", Some("-3"))] {
        let mut cli = Command::new("redis-cli");
        cli.args([
            "-h",
            "127.0.0.1",
            "-p",
            &tcp_port.to_string(),
            "--user",
            conn_id,
            "--pass",
            "t",
            "--no-auth-warning",
        ]);
        cli.args(extra);
        cli.args(["SUBSCRIBE", "alerts"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = Killed(cli.spawn().expect("redis-cli (redis-tools) is installed"));
        let lines = stdout_lines(&mut child.0);
        wait_for_line(&lines, "alerts");
        assert!(wait_until(Duration::from_secs(5), || server
            .count("online", conn_id)
            == 1));
        let reply = node.rpc().push(&[conn_id], &format!("to {conn_id}"), "");
        assert_eq!(undelivered(&reply), json!([]), "{reply}");
        wait_for_line(&lines, &format!("to {conn_id}"));
        drop(child);
        assert!(wait_until(Duration::from_secs(5), || server
            .count("offline", conn_id)
            == 1));
    }
}

#[test]
fn coalescing_is_for_websocket_only_json_lines_keep_one_message_per_line() {
    const MESSAGES: usize = 6_000;
    let tcp_port = free_port();
    let node = Comet::start(
        None,
        &format!(
            "tcp_port={tcp_port}\ncoalesce_messages=true\noutbound_queue_size=100000\noutbound_queue_bytes=16777216\n"
        ),
    );
    assert!(wait_until(Duration::from_secs(5), || common::port_open(
        tcp_port
    )));
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket
        .connect(&std::net::SocketAddr::from(([127, 0, 0, 1], tcp_port)).into())
        .unwrap();
    let stream: std::net::TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut client = json_client(stream, "slow-json");
    // Pushed while the client reads nothing: more than the kernel buffers hold, so most
    // of them wait in the session's queue, where a WebSocket client's would be joined.
    let body = "x".repeat(1000);
    let mut batch = String::new();
    for n in 0..MESSAGES {
        let request = json!({"method": "Server.SendToConnections", "id": n,
            "params": [{"connections": ["slow-json"], "msg": format!("{n}:{body}")}]});
        batch.push_str(&format!("{request}\n"));
    }
    let mut rpc = std::net::TcpStream::connect(("127.0.0.1", node.rpc_port)).unwrap();
    std::io::Write::write_all(&mut rpc, batch.as_bytes()).unwrap();
    let mut replies = BufReader::new(rpc);
    for _ in 0..MESSAGES {
        let mut line = String::new();
        replies.read_line(&mut line).unwrap();
        assert!(line.contains("\"result\":\"ok\""), "{line}");
    }
    for n in 0..MESSAGES {
        let line = client.json_skipping_pings().unwrap();
        assert_eq!(
            line["data"],
            format!("{n}:{body}"),
            "message {n} arrives alone"
        );
    }
}
