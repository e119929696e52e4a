//! Client connections end to end: upgrade, token refusal, duplicates, heartbeats,
//! oversized frames, kicks and shard spreading, against the real binary.

mod common;

use std::time::{Duration, Instant};

use common::{Comet, MessageServer, close_code, refusal_status, wait_until};
use serde_json::json;

#[test]
fn good_token_calls_check_token_then_online_with_the_right_args() {
    let server = MessageServer::start();
    let comet = Comet::start(Some(&server), "");
    let _client = comet.connect("u1", "secret", "{\"room\":7}").unwrap();
    let rpc_addr = format!("127.0.0.1:{}", comet.rpc_port);

    assert!(wait_until(Duration::from_secs(5), || server
        .count("online", "u1")
        == 1));
    let calls = server.calls();
    assert_eq!(calls[0].method, "checkToken");
    assert_eq!(
        calls[0].args,
        vec![
            json!("u1"),
            json!("secret"),
            json!("{\"room\":7}"),
            json!(rpc_addr)
        ]
    );
    assert_eq!(calls[0].user_agent, "CtxImRpc 1.0");
    let online = &server.calls_of("online")[0];
    assert_eq!(
        online.args,
        vec![json!("u1"), json!("{\"room\":7}"), json!(rpc_addr)]
    );
    assert!(online.at >= calls[0].at, "online must follow checkToken");
}

/// The original's second-generation clients: `?c=<conn_id>&t=<token>&i=<info>`.
#[test]
fn a_second_generation_client_gives_its_token_in_parts() {
    let server = MessageServer::start();
    let comet = Comet::start(Some(&server), "");
    let url = format!(
        "ws://127.0.0.1:{}/ws?c=u9&t=s3cret&i=%7B%22room%22%3A7%7D",
        comet.ws_port
    );
    let _client = common::connect_url(&url, comet.ws_port).unwrap();
    assert!(wait_until(Duration::from_secs(5), || server
        .count("online", "u9")
        == 1));
    let check = &server.calls_of("checkToken")[0];
    assert_eq!(
        check.args[..3],
        [json!("u9"), json!("s3cret"), json!("{\"room\":7}")]
    );
}

#[test]
fn refused_or_malformed_token_gets_401_and_no_online() {
    let server = MessageServer::start();
    server.refuse_token("bad");
    let comet = Comet::start(Some(&server), "");
    assert_eq!(refusal_status(comet.connect("u2", "bad", "")), 401);
    let no_t = format!("ws://127.0.0.1:{}/ws", comet.ws_port);
    assert_eq!(
        refusal_status(common::connect_url(&no_t, comet.ws_port)),
        401
    );
    let not_json = format!("ws://127.0.0.1:{}/ws?t=%7Bnope", comet.ws_port);
    assert_eq!(
        refusal_status(common::connect_url(&not_json, comet.ws_port)),
        401
    );

    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        server.calls_of("checkToken").len(),
        1,
        "malformed tokens never reach checkToken"
    );
    assert!(server.calls_of("online").is_empty());
    // The node still serves others.
    let _ok = comet.connect("u3", "fine", "").unwrap();
}

#[test]
fn duplicate_conn_id_gets_400_and_the_first_stays() {
    let server = MessageServer::start();
    let comet = Comet::start(Some(&server), "");
    let mut first = comet.connect("dup", "t", "").unwrap();
    // Across both shards: try several times so that both listeners are hit.
    for _ in 0..6 {
        assert_eq!(refusal_status(comet.connect("dup", "t", "")), 400);
    }
    let reply = comet.rpc().push(&["dup"], "still here", "");
    assert_eq!(reply["result"], json!("ok"), "{reply}");
    assert_eq!(common::next_text(&mut first).as_deref(), Some("still here"));
    // `online` is posted by a worker after the upgrade, so it may trail the push.
    assert!(wait_until(Duration::from_secs(5), || server
        .count("online", "dup")
        == 1));
}

#[test]
fn replace_policy_closes_the_old_connection_first() {
    let server = MessageServer::start();
    let comet = Comet::start(Some(&server), "duplicate_conn_id=replace");
    let mut old = comet.connect("same", "t", "").unwrap();
    let mut new = comet.connect("same", "t", "").unwrap();
    assert_eq!(close_code(&mut old), Some(1008));
    assert!(wait_until(Duration::from_secs(5), || server
        .count("online", "same")
        == 2));
    let order: Vec<String> = server
        .calls()
        .into_iter()
        .filter(|c| c.method != "checkToken")
        .map(|c| c.method)
        .collect();
    assert_eq!(order, vec!["online", "offline", "online"]);
    let reply = comet.rpc().push(&["same"], "to the new one", "");
    assert_eq!(reply["result"], json!("ok"), "{reply}");
    assert_eq!(
        common::next_text(&mut new).as_deref(),
        Some("to the new one")
    );
}

#[test]
fn silent_client_is_dropped_within_the_heartbeat_window() {
    let server = MessageServer::start();
    let comet = Comet::start(
        Some(&server),
        "ping_interval=200ms\nheartbeat_timeout=600ms",
    );
    // A client that never reads never answers pings.
    let _silent = comet.connect("quiet", "t", "").unwrap();
    let mut lively = comet.connect("lively", "t", "").unwrap();
    assert!(wait_until(Duration::from_secs(5), || server
        .count("online", "quiet")
        == 1));
    let connected = Instant::now();
    // The lively client answers pings (tungstenite replies while reading).
    let lively_reader = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < deadline {
            let _ = lively.read();
        }
        lively
    });
    assert!(wait_until(Duration::from_secs(3), || server
        .count("offline", "quiet")
        == 1));
    let dropped_after = connected.elapsed();
    assert!(
        dropped_after < Duration::from_millis(1200),
        "dropped after {dropped_after:?}"
    );
    let _lively = lively_reader.join().unwrap();
    assert_eq!(
        server.count("offline", "lively"),
        0,
        "a client answering pings stays"
    );
}

#[test]
fn oversized_frame_closes_with_1009_and_offline() {
    let server = MessageServer::start();
    let comet = Comet::start(Some(&server), "");
    let mut client = comet.connect("big", "t", "").unwrap();
    client
        .send(tungstenite::Message::text("x".repeat(600)))
        .unwrap();
    assert_eq!(close_code(&mut client), Some(1009));
    assert!(wait_until(Duration::from_secs(5), || server
        .count("offline", "big")
        == 1));
    // A message within the limit is fine.
    let mut small = comet.connect("small", "t", "").unwrap();
    small
        .send(tungstenite::Message::text("x".repeat(500)))
        .unwrap();
    let reply = comet.rpc().push(&["small"], "after", "");
    assert_eq!(reply["result"], json!("ok"));
    assert_eq!(common::next_text(&mut small).as_deref(), Some("after"));
}

#[test]
fn kick_closes_the_client_and_reports_offline() {
    let server = MessageServer::start();
    let comet = Comet::start(Some(&server), "");
    let mut client = comet.connect("kicked", "t", "").unwrap();
    let reply = comet.rpc().call(
        "Server.KickConnections",
        json!({"connections": ["kicked"], "token": ""}),
    );
    assert_eq!(reply["result"], json!("ok"), "{reply}");
    assert_eq!(close_code(&mut client), Some(1000));
    assert!(wait_until(Duration::from_secs(5), || server
        .count("offline", "kicked")
        == 1));
    let reply = comet.rpc().push(&["kicked"], "gone?", "");
    assert!(
        reply["error"].as_str().unwrap().contains("kicked"),
        "{reply}"
    );
}

#[test]
fn clients_spread_over_both_shards() {
    let comet = Comet::start(None, "max_proc=2");
    let clients: Vec<_> = (0..40)
        .map(|i| comet.connect(&format!("s{i}"), "t", "").unwrap())
        .collect();
    let node = comet.rpc().call("Server.GetNode", json!({"token": ""}));
    assert_eq!(node["result"]["code"], json!(20000), "{node}");
    let per_shard = node["result"]["data"]["connections_per_shard"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(per_shard.len(), 2);
    assert!(
        per_shard.iter().all(|n| n.as_u64().unwrap() > 0),
        "{per_shard:?}"
    );
    assert_eq!(node["result"]["data"]["connections"], json!(clients.len()));
}

#[test]
fn client_close_reports_offline_exactly_once() {
    let server = MessageServer::start();
    let comet = Comet::start(Some(&server), "");
    let mut client = comet.connect("leaver", "t", "").unwrap();
    client.close(None).unwrap();
    while client.read().is_ok() {}
    drop(client);
    let abrupt = comet.connect("dropper", "t", "").unwrap();
    drop(abrupt);
    assert!(wait_until(Duration::from_secs(5), || {
        server.count("offline", "leaver") == 1 && server.count("offline", "dropper") == 1
    }));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.count("offline", "leaver"), 1);
    assert_eq!(server.count("offline", "dropper"), 1);
}

#[test]
fn sigterm_closes_clients_with_1001_and_delivers_every_offline() {
    let server = MessageServer::start();
    let mut comet = Comet::start(Some(&server), "");
    let mut clients: Vec<_> = (0..20)
        .map(|i| comet.connect(&format!("d{i}"), "t", "").unwrap())
        .collect();
    assert!(wait_until(Duration::from_secs(5), || server
        .calls_of("online")
        .len()
        == 20));
    let status = comet
        .terminate(Duration::from_secs(10))
        .expect("comet exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    for client in &mut clients {
        assert_eq!(close_code(client), Some(1001));
    }
    assert_eq!(server.calls_of("offline").len(), 20);
}

#[test]
fn slowloris_handshake_is_dropped() {
    use std::io::{Read, Write};
    let comet = Comet::start(None, "handshake_timeout=300ms");
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", comet.ws_port)).unwrap();
    stream.write_all(b"GET /ws?t=").unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the server closes without answering");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn bad_config_stops_startup_naming_the_key() {
    let err = Comet::try_start(None, "websocket_port=70000")
        .err()
        .expect("must not start");
    assert!(err.contains("websocket_port"), "{err}");
    let err = Comet::try_start(None, "socket_protocol=pigeon")
        .err()
        .expect("must not start");
    assert!(err.contains("socket_protocol"), "{err}");
    let missing = std::process::Command::new(common::comet_binary())
        .args(["-c", "/nonexistent/comet.ini"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/comet.ini"));
}

#[test]
fn presence_survives_a_briefly_dead_message_server() {
    let server = MessageServer::start();
    let comet = Comet::start(Some(&server), "");
    let client = comet.connect("blip", "t", "").unwrap();
    assert!(wait_until(Duration::from_secs(5), || server
        .count("online", "blip")
        == 1));
    server.die();
    // While it is down, new clients cannot be verified: 503, not 401.
    assert_eq!(refusal_status(comet.connect("newcomer", "t", "")), 503);
    drop(client);
    std::thread::sleep(Duration::from_millis(700));
    server.revive();
    assert!(
        wait_until(Duration::from_secs(10), || server.count("offline", "blip")
            == 1),
        "offline retried until the message server came back"
    );
    assert!(
        server
            .calls_of("online")
            .iter()
            .all(|c| c.arg(0) != "newcomer")
    );
}

#[test]
fn accept_backs_off_without_spinning_when_descriptors_run_out() {
    // A hard limit of 64 descriptors: the node raises its soft limit to it and no further.
    // No reserve (`fd_reserve=0`): the clients take every descriptor, as they do when
    // something else has used up the reserve (tests/limits.rs covers the reserve itself).
    let ws_port = common::free_port();
    let rpc_port = common::free_port();
    let ini = format!(
        "max_proc=1\nwebsocket_port={ws_port}\nrpc_addr=127.0.0.1:{rpc_port}\nrpc_api_url=\n\
         fd_reserve=0\n"
    );
    let comet = Comet::spawn_with_ini_limited(&ini, ws_port, rpc_port, 64).unwrap();
    let mut held = Vec::new();
    for i in 0..80 {
        match comet.connect(&format!("fd{i}"), "t", "") {
            Ok(client) => held.push(client),
            Err(_) => break,
        }
    }
    // Pile up connections the node cannot accept.
    let pending: Vec<_> = (0..20)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", ws_port)).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let cpu_before = comet.cpu_ticks();
    std::thread::sleep(Duration::from_secs(1));
    let cpu_used = comet.cpu_ticks() - cpu_before;
    assert!(
        cpu_used < 20,
        "node used {cpu_used} ticks (of 100/s) while out of descriptors"
    );
    let node = comet
        .rpc_when_possible(&mut held)
        .call("Server.GetNode", json!({}));
    let exhausted = node["result"]["data"]["shard_stats"][0]["accept_fd_exhausted"]
        .as_u64()
        .unwrap();
    assert!(exhausted > 0, "{node}");
    drop(pending);
    held.clear();
    assert!(wait_until(Duration::from_secs(5), || comet
        .connect("after", "t", "")
        .is_ok()));
}

/// Whether `pid` blocks SIGTERM or has a handler for it (`/proc/<pid>/status`).
fn sigterm_held_or_caught(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let mask = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let sigterm = 1 << (15 - 1);
    (mask("SigBlk:") | mask("SigCgt:")) & sigterm != 0
}

/// A SIGTERM that arrives while the node is still starting (its shards not yet up) stops
/// it gracefully: exit 0, not death by the signal's default action.
#[test]
fn a_sigterm_during_start_up_still_stops_the_node_gracefully() {
    let dir = common::temp_dir("early-sigterm");
    let ini = dir.join("comet.ini");
    std::fs::write(
        &ini,
        format!(
            "max_proc=2\nwebsocket_port=:{}\nrpc_addr=127.0.0.1:{}\ndrain_window=0\n",
            common::free_port(),
            common::free_port()
        ),
    )
    .unwrap();
    for delay_ms in [20, 60, 120] {
        let mut child = std::process::Command::new(common::comet_binary())
            .arg("-c")
            .arg(&ini)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Counted from `main`'s first line, where SIGTERM is held: before it (exec, the
        // dynamic loader) the default action still applies, and on a loaded machine
        // that took over 20 ms once.
        assert!(
            common::wait_until(Duration::from_secs(10), || sigterm_held_or_caught(
                child.id()
            )),
            "SIGTERM never held"
        );
        std::thread::sleep(Duration::from_millis(delay_ms));
        common::signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit {delay_ms} ms after start"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "SIGTERM {delay_ms} ms after start: {status:?}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
