//! The push RPC's handling of bad input: wrong tokens, malformed JSON, unknown methods,
//! wrong shapes. Each gets a precise error and the connection stays usable.

mod common;

use std::io::{BufRead, BufReader, Write};

use common::Comet;
use serde_json::json;

#[test]
fn wrong_token_is_refused_in_every_generation() {
    let comet = Comet::start(None, "comet_rpc_token=right");
    let mut client = comet.connect("c", "t", "").unwrap();
    let mut rpc = comet.rpc();

    let reply = rpc.push(&["c"], "nope", "wrong");
    let error: serde_json::Value = serde_json::from_str(reply["error"].as_str().unwrap()).unwrap();
    assert_eq!(error, json!({"ids": [], "msg": "token error."}));

    let param = json!({"to": ["c"], "msg": "nope"}).to_string();
    let reply = rpc.call("Server.SendToConnections", json!(param));
    assert!(
        reply["error"].as_str().unwrap().contains("token error"),
        "{reply}"
    );

    let reply = rpc.call(
        "Server.KickConnections",
        json!({"connections": ["c"], "token": "bad"}),
    );
    assert!(
        reply["error"].as_str().unwrap().contains("token error"),
        "{reply}"
    );

    let reply = rpc.call("Server.GetNode", json!({"token": "bad"}));
    assert_eq!(reply["result"]["code"], json!(40100));

    // Nothing was delivered or kicked; the right token works.
    assert_eq!(rpc.push(&["c"], "yes", "right")["result"], json!("ok"));
    assert_eq!(common::next_text(&mut client).as_deref(), Some("yes"));
}

#[test]
fn malformed_json_gets_an_error_reply_and_the_connection_stays_usable() {
    let comet = Comet::start(None, "");
    let mut client = comet.connect("c", "t", "").unwrap();
    let mut rpc = comet.rpc();

    // An object left open on one line and broken on the next: one error, then resync.
    let reply =
        rpc.raw("{\"method\": \"Server.SendToConnections\", \"params\": [\nthis is not json\n");
    assert!(
        reply["error"].as_str().unwrap().contains("invalid JSON"),
        "{reply}"
    );
    assert!(reply["id"].is_null());

    let reply = rpc.raw("[1,2,3]\n");
    assert!(
        reply["error"].as_str().unwrap().contains("JSON object"),
        "{reply}"
    );

    let reply = rpc.call("Server.NoSuchMethod", json!({}));
    assert_eq!(
        reply["error"],
        json!("rpc: can't find method Server.NoSuchMethod")
    );

    let reply = rpc.call("Server.SendToConnections", json!(42));
    assert!(
        reply["error"].as_str().unwrap().contains("a number"),
        "{reply}"
    );

    let reply = rpc.raw("{\"method\":\"Server.GetNode\",\"params\":[{},{}],\"id\":9}\n");
    assert_eq!(reply["id"], json!(9));
    assert!(
        reply["error"].as_str().unwrap().contains("exactly one"),
        "{reply}"
    );

    assert_eq!(rpc.push(&["c"], "still works", "")["result"], json!("ok"));
    assert_eq!(
        common::next_text(&mut client).as_deref(),
        Some("still works")
    );
}

#[test]
fn calls_written_back_to_back_are_answered_in_order() {
    let comet = Comet::start(None, "");
    let _client = comet.connect("c", "t", "").unwrap();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", comet.rpc_port)).unwrap();
    let mut batch = String::new();
    for id in 0..50 {
        batch.push_str(&json!({"method": "Server.CheckConnectionsOnline", "params": [{"connections": ["c"]}], "id": id}).to_string());
    }
    stream.write_all(batch.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    for id in 0..50 {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(reply["id"], json!(id));
        assert_eq!(reply["result"]["data"], json!(["c"]));
    }
}

/// Whether the node closes `stream` (end of stream or reset) within 5 s, with nothing
/// sent on it first.
fn closed_by_the_node(stream: &mut std::net::TcpStream) -> bool {
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    match std::io::Read::read_to_end(stream, &mut rest) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// A message server that dials ahead (Go's `net/rpc` at start or at `addCometServer`)
/// and makes its first call later keeps its connection, as with the original: the
/// first-call timeout counts from the first byte. One that starts a call and stops is
/// closed by it.
#[test]
fn a_connection_dialed_ahead_keeps_its_place_until_its_first_call() {
    let comet = Comet::start(None, "rpc_first_call_timeout=1s\n");
    let _client = comet.connect("c", "t", "").unwrap();
    let ahead = std::net::TcpStream::connect(("127.0.0.1", comet.rpc_port)).unwrap();
    let mut stalled = std::net::TcpStream::connect(("127.0.0.1", comet.rpc_port)).unwrap();
    stalled.write_all(b"{\"method\": \"Server.Get").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let mut rpc = common::Rpc::from_stream(ahead);
    let reply = rpc.call(
        "Server.CheckConnectionsOnline",
        json!({"connections": ["c"]}),
    );
    assert_eq!(reply["result"]["data"], json!(["c"]), "{reply}");
    assert!(
        closed_by_the_node(&mut stalled),
        "the half-sent call was closed"
    );
    assert!(
        comet.log_text().contains("of its first byte"),
        "{}",
        comet.log_text()
    );
}

/// Silent connections hold slots only while they are free: with every slot taken, a new
/// connection closes the oldest one that never sent a byte, so strangers cannot shut the
/// message server out by connecting and saying nothing. One that has spoken keeps its
/// slot.
#[test]
fn a_silent_connection_gives_its_slot_to_a_new_one_when_all_are_taken() {
    let comet = Comet::start(None, "rpc_max_connections=3\n");
    let _client = comet.connect("c", "t", "").unwrap();
    let rpc_port = comet.rpc_port;
    let mut spoken = common::Rpc::connect(rpc_port);
    let online = json!({"connections": ["c"]});
    assert_eq!(
        spoken.call("Server.CheckConnectionsOnline", online.clone())["result"]["data"],
        json!(["c"])
    );
    let open = || {
        let stream = std::net::TcpStream::connect(("127.0.0.1", rpc_port)).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        stream
    };
    let mut oldest = open();
    let _younger = open();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut newcomer = common::Rpc::from_stream(open());
    let reply = newcomer.call("Server.CheckConnectionsOnline", online.clone());
    assert_eq!(reply["result"]["data"], json!(["c"]), "{reply}");
    assert!(
        closed_by_the_node(&mut oldest),
        "the oldest silent connection was closed for it"
    );
    assert_eq!(
        spoken.call("Server.CheckConnectionsOnline", online)["result"]["data"],
        json!(["c"]),
        "the one that spoke kept its slot"
    );
    assert!(
        comet.log_text().contains("its slot was needed"),
        "{}",
        comet.log_text()
    );
}

/// A message cut inside an emoji by a JavaScript message server (`JSON.stringify` writes
/// the lone half as `\ud83d`) is pushed with U+FFFD in its place, as the Go original did,
/// in both generations: not refused.
#[test]
fn an_unpaired_surrogate_escape_is_pushed_as_the_replacement_character() {
    let comet = Comet::start(None, "");
    let mut client = comet.connect("c", "t", "").unwrap();
    let mut rpc = comet.rpc();
    let reply = rpc.raw(
        r#"{"method":"Server.SendToConnections","params":[{"connections":["c"],"msg":"cut \ud83d"}],"id":1}
"#,
    );
    assert_eq!(reply["result"], json!("ok"), "{reply}");
    assert_eq!(
        common::next_text(&mut client).as_deref(),
        Some("cut \u{FFFD}")
    );
    let reply = rpc.raw(
        r#"{"method":"Server.SendToConnections","params":["{\"to\":[\"c\"],\"msg\":\"old \\udc00 gen\"}"],"id":2}
"#,
    );
    assert!(reply["error"].is_null(), "{reply}");
    assert_eq!(
        common::next_text(&mut client).as_deref(),
        Some("old \u{FFFD} gen")
    );
}
