//! Reliability invariants under mixed events: exactly one `offline` per `online`, in
//! order, never an `online` for a refused handshake; and every push delivered exactly
//! once and in order to a client that keeps reading.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Client, Comet, MessageServer, wait_until};
use serde_json::json;

/// A small deterministic generator (xorshift), so a failure can be replayed.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, sides: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % sides
    }
}

#[test]
fn presence_ledger_holds_across_every_kind_of_ending() {
    let server = MessageServer::start();
    server.refuse_token("refused");
    let mut comet = Comet::start(
        Some(&server),
        "ping_interval=1s\nheartbeat_timeout=2s\noutbound_queue_size=4\ncallback_retries=30",
    );
    let mut rpc = comet.rpc();
    let mut dice = Dice(0x5eed_1234_abcd_0001);
    let mut live: Vec<(String, Client)> = Vec::new();
    let mut silent: Vec<Client> = Vec::new();
    let mut refused = 0;
    let started = Instant::now();
    let mut round = 0;
    // A fixed number of events (bounded in time too), so that a slow machine runs the
    // same mix as a fast one.
    while round < 250 && started.elapsed() < Duration::from_secs(60) {
        round += 1;
        let id = format!("c{}", dice.roll(60));
        match dice.roll(10) {
            0..=2 => {
                if let Ok(client) = comet.connect(&id, "t", "") {
                    live.push((id, client));
                }
            }
            3 if !live.is_empty() => {
                let (_, mut client) = live.swap_remove(dice.roll(live.len() as u64) as usize);
                let _ = client.close(None);
            }
            4 if !live.is_empty() => {
                // A reset: the socket goes away without a close frame or FIN handshake.
                let (_, client) = live.swap_remove(dice.roll(live.len() as u64) as usize);
                let stream: &TcpStream = client.get_ref();
                let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
                drop(client);
            }
            5 if !live.is_empty() => {
                let (id, _) = &live[dice.roll(live.len() as u64) as usize];
                rpc.call("Server.KickConnections", json!({"connections": [id]}));
            }
            6 if !live.is_empty() => {
                // Heartbeat loss: keep the socket, never read again.
                let (_, client) = live.swap_remove(dice.roll(live.len() as u64) as usize);
                silent.push(client);
            }
            7 if !live.is_empty() => {
                // Slow consumer: a client that stops reading while pushes pile up.
                let (id, client) = live.swap_remove(dice.roll(live.len() as u64) as usize);
                let big = "x".repeat(256 * 1024);
                for _ in 0..64 {
                    rpc.push(&[id.as_str()], &big, "");
                }
                silent.push(client);
            }
            8 => {
                if comet.connect(&format!("r{round}"), "refused", "").is_err() {
                    refused += 1;
                }
            }
            9 if round % 7 == 0 => {
                // The message server blips; presence callbacks must survive it.
                server.die();
                std::thread::sleep(Duration::from_millis(150));
                server.revive();
            }
            _ => {
                let ids: Vec<&str> = live.iter().map(|(id, _)| id.as_str()).collect();
                if !ids.is_empty() {
                    rpc.push(&ids, "tick", "");
                }
            }
        }
        for (_, client) in &mut live {
            client.get_mut().set_nonblocking(true).unwrap();
            while client.read().is_ok() {}
            client.get_mut().set_nonblocking(false).unwrap();
        }
    }
    assert!(refused > 0, "the mix included refused handshakes");
    // Sessions that are open when the node stops, whatever the mix left: on a loaded
    // machine the heartbeat may have ended every earlier one (a round can outlast the
    // 2 s timeout), and then no session would end by shutdown.
    for n in 0..3 {
        if let Ok(client) = comet.connect(&format!("last{n}"), "t", "") {
            live.push((format!("last{n}"), client));
        }
    }
    let status = comet.terminate(Duration::from_secs(20)).expect("shutdown");
    assert!(status.success());
    drop(live);
    drop(silent);
    let settled = || {
        let calls = server.calls();
        let on = calls.iter().filter(|c| c.method == "online").count();
        let off = calls.iter().filter(|c| c.method == "offline").count();
        on == off
    };
    assert!(
        wait_until(Duration::from_secs(10), settled),
        "every online gets its offline"
    );
    let (conn_ids, sessions) = common::check_presence_ledger(&server);
    assert!(
        sessions > 20,
        "the mix exercised enough sessions ({sessions} on {conn_ids} ids)"
    );
    assert!(
        server
            .calls_of("online")
            .iter()
            .all(|c| !c.arg(0).starts_with('r')),
        "no online for a refused handshake"
    );
    let log = comet.log_text();
    for reason in [
        "client_closed",
        "client_gone",
        "kicked",
        "heartbeat_timeout",
        "slow_consumer",
        "shutdown",
    ] {
        assert!(
            log.contains(&format!("reason=\"{reason}\"")),
            "the mix never ended a session by {reason}"
        );
    }
}

#[test]
fn a_million_deliveries_arrive_exactly_once_and_in_order() {
    const CLIENTS: usize = 200;
    const PUSHES: usize = 10_000;
    const FAN_OUT: usize = 100;
    let comet = Comet::start(
        None,
        "outbound_queue_size=100000\noutbound_queue_bytes=268435456",
    );
    let readers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mut client = comet.connect(&format!("q{i}"), "t", "").unwrap();
            client
                .get_mut()
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            std::thread::spawn(move || {
                let mut expected = 0u64;
                while expected < (PUSHES * FAN_OUT / CLIENTS) as u64 {
                    let text = common::next_text(&mut client).expect("a message");
                    let seq: u64 = text.split(':').nth(1).unwrap().parse().unwrap();
                    assert_eq!(seq, expected, "client q{i}: out of order or duplicated");
                    expected += 1;
                }
                client
                    .get_mut()
                    .set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                assert_eq!(
                    common::next_text(&mut client),
                    None,
                    "q{i} got more than it was sent"
                );
                expected
            })
        })
        .collect();
    // Push p goes to FAN_OUT consecutive clients; each client's messages carry its own
    // sequence number. Requests are pipelined on one connection, replies read after.
    let mut stream = TcpStream::connect(("127.0.0.1", comet.rpc_port)).unwrap();
    let mut next_seq = vec![0u64; CLIENTS];
    let mut batch = String::new();
    for p in 0..PUSHES {
        let targets: Vec<usize> = (0..FAN_OUT).map(|k| (p * FAN_OUT + k) % CLIENTS).collect();
        // One message per push, so all its recipients must expect the same number.
        let seq = next_seq[targets[0]];
        assert!(targets.iter().all(|t| next_seq[*t] == seq));
        for t in &targets {
            next_seq[*t] += 1;
        }
        let ids: Vec<String> = targets.iter().map(|t| format!("q{t}")).collect();
        let request = json!({"method": "Server.SendToConnections", "params": [{"connections": ids, "msg": format!("m:{seq}")}], "id": p});
        batch.push_str(&request.to_string());
        batch.push('\n');
        if p % 200 == 199 {
            stream.write_all(batch.as_bytes()).unwrap();
            batch.clear();
        }
    }
    stream.write_all(batch.as_bytes()).unwrap();
    let mut reader = std::io::BufReader::new(stream);
    for _ in 0..PUSHES {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(reply["result"], json!("ok"), "{reply}");
    }
    let delivered: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert_eq!(delivered, (PUSHES * FAN_OUT) as u64);
    assert!(delivered >= 1_000_000);
}

/// Clients that vanish without a FIN or a reset (a phone off the network, a NAT that
/// forgot them) go offline within their keepalive bound on the transports that rely on
/// TCP keepalive: SSE (written a `: ping` every interval) and RESP (after a push). Linux
/// sends no keepalive probe while sent data is unacknowledged, so before
/// `TCP_USER_TIMEOUT` they stayed online through ~15 minutes of retransmissions and their
/// user's reconnect was refused as a duplicate. The node runs on one namespace host,
/// the clients on another, cut off from it by taking their switch port down.
#[test]
fn sse_and_resp_clients_that_vanish_without_a_fin_go_offline_within_the_keepalive_bound() {
    let Some(net) = common::netns::Net::create(2) else {
        return;
    };
    let server = MessageServer::start();
    let rpc_api_url = net.expose_url(&server.url());
    let gateway = net.host(0).addr;
    let dir = common::temp_dir("vanish");
    let ini = dir.join("comet.ini");
    std::fs::write(
        &ini,
        format!(
            "max_proc=1\nrpc_api_url={rpc_api_url}\nwebsocket_port=:8000\ntcp_port=8001\n\
             rpc_addr={gateway}:7000\nping_interval=1s\nheartbeat_timeout=2s\ndrain_window=0\n"
        ),
    )
    .unwrap();
    let mut node = net
        .command(0, &common::comet_binary())
        .arg("-c")
        .arg(&ini)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("comet.log")).unwrap())
        .spawn()
        .unwrap();
    let rpc_port = std::net::SocketAddr::from((gateway, 7000));
    assert!(wait_until(Duration::from_secs(30), || {
        common::netns::connect(rpc_port, Duration::from_secs(1)).is_ok()
    }));
    let t = common::url_encode(&json!({"conn_id": "sse-gone", "token": "t"}).to_string());
    let sse = format!("GET /sse?t={t} HTTP/1.1\r\nHost: x\r\n\r\n");
    let resp = "*3\r\n$4\r\nAUTH\r\n$9\r\nresp-gone\r\n$1\r\nt\r\n*2\r\n$9\r\nSUBSCRIBE\r\n$5\r\ninbox\r\n";
    // Each client reads forever from host 1 (never closing: it is the network that goes).
    let clients: Vec<_> = [(8000, sse.as_str()), (8001, resp)]
        .iter()
        .map(|(port, request)| {
            let script = format!(
                "import socket\ns = socket.create_connection(('{gateway}', {port}))\n\
                 s.sendall({request:?}.encode())\nwhile s.recv(65536): pass\n"
            );
            net.command(1, "python3")
                .args(["-c", &script])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(15), || server
            .count("online", "sse-gone")
            == 1
            && server.count("online", "resp-gone") == 1),
        "{:?}",
        server.calls()
    );
    net.cut(1);
    // Data in flight to each: the SSE pings, and a push to the RESP client.
    let stream = common::netns::connect(rpc_port, Duration::from_secs(2)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rpc = common::Rpc::from_stream(stream);
    rpc.push(&["resp-gone", "sse-gone"], "into the void", "");
    // Unacknowledged data is given up on after heartbeat_timeout + 2 ping intervals, 4 s
    // here, keepalive after 1 s idle and three probes 1 s apart: 20 s leaves room for a
    // loaded machine.
    let gone = wait_until(Duration::from_secs(20), || {
        server.count("offline", "sse-gone") == 1 && server.count("offline", "resp-gone") == 1
    });
    net.heal(1);
    for mut client in clients {
        let _ = client.kill();
        let _ = client.wait();
    }
    common::signal(node.id(), "TERM");
    let _ = node.wait();
    assert!(gone, "still online: {:?}", server.calls());
}
