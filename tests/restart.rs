//! Zero-downtime restart: SIGUSR2 hands the listeners and the etcd key to a successor
//! while the old process drains, under a steady connect load.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::etcd::{self, Etcd};
use common::{Comet, MessageServer, Monitor, close_code, next_text, wait_until};
use serde_json::json;

/// The 2,000-client test runs alone: beside it the timing of the others (pushes per
/// second, callbacks per second) measures the machine, not the node.
static LOAD: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn beside_others() -> std::sync::RwLockReadGuard<'static, ()> {
    LOAD.read().unwrap_or_else(|e| e.into_inner())
}

fn alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    LOAD.write().unwrap_or_else(|e| e.into_inner())
}

/// Stops a process we did not start ourselves (the successor) when dropped.
struct Reap(u32);

impl Drop for Reap {
    fn drop(&mut self) {
        common::signal(self.0, "TERM");
        wait_until(Duration::from_secs(10), || {
            !std::path::Path::new(&format!("/proc/{}", self.0)).exists()
        });
    }
}

fn successor_pid(log: &str) -> Option<u32> {
    let line = log.lines().find(|l| l.contains("successor started"))?;
    let digits: String = line
        .split("successor=")
        .nth(1)?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[test]
fn sigusr2_restart_refuses_no_connection_and_every_old_client_gets_close_and_offline() {
    let _load = beside_others();
    let etcd = Etcd::start();
    let server = MessageServer::start();
    let _monitor = Monitor::start(&server, &etcd.endpoint());
    let mut old = Comet::start(
        Some(&server),
        &format!(
            "etcd_addr={}\netcd_lease_ttl=3\ndrain_window=1s",
            etcd.endpoint()
        ),
    );
    let key = old.etcd_key();
    assert!(wait_until(Duration::from_secs(10), || server
        .calls_of("addCometServer")
        .len()
        == 1));

    let old_clients: Vec<_> = (0..20)
        .map(|i| comet_client(&old, &format!("old{i}")))
        .collect();
    assert!(wait_until(Duration::from_secs(5), || server
        .calls_of("online")
        .len()
        == 20));
    let closes: Vec<_> = old_clients
        .into_iter()
        .map(|mut client| std::thread::spawn(move || close_code(&mut client)))
        .collect();

    // A steady connect load through the whole restart.
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let url_base = old.ws_url("X", "t", "");
    let port = old.ws_port;
    let load = {
        let (stop, attempts, failures) = (stop.clone(), attempts.clone(), failures.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            let mut errors = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let url = url_base.replace("%22X%22", &format!("%22load{n}%22"));
                attempts.fetch_add(1, Ordering::SeqCst);
                match common::connect_url(&url, port) {
                    Ok(client) => drop(client),
                    Err(err) => {
                        failures.fetch_add(1, Ordering::SeqCst);
                        errors.push(err.to_string());
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            errors
        })
    };

    std::thread::sleep(Duration::from_millis(300));
    common::signal(old.pid(), "USR2");
    let status = old
        .wait_exit(Duration::from_secs(20))
        .expect("the old process drains and exits");
    assert!(status.success(), "{status:?}");
    let successor = successor_pid(&old.log_text()).expect("the log names the successor");
    let _reap = Reap(successor);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let errors = load.join().unwrap();

    assert!(
        attempts.load(Ordering::SeqCst) > 50,
        "the load kept connecting"
    );
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "refused or failed connects: {errors:?}"
    );
    for close in closes {
        assert_eq!(close.join().unwrap(), Some(1001));
    }
    for i in 0..20 {
        assert_eq!(server.count("offline", &format!("old{i}")), 1, "old{i}");
    }

    // The successor serves on the same ports and holds the same etcd key throughout.
    let mut fresh = comet_client(&old, "fresh");
    let mut rpc = old.rpc();
    assert_eq!(
        rpc.push(&["fresh"], "after restart", "")["result"],
        json!("ok")
    );
    assert_eq!(next_text(&mut fresh).as_deref(), Some("after restart"));
    let entry = etcd::key(&[etcd.endpoint()], &key).expect("key still registered");
    assert!(entry.value.contains("RpcAddr"));
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        etcd::key(&[etcd.endpoint()], &key).is_some(),
        "the successor keeps it alive"
    );
    assert!(
        server.calls_of("removeCometServer").is_empty(),
        "routers never saw the node leave"
    );
}

fn comet_client(comet: &Comet, id: &str) -> common::Client {
    let mut client = comet.connect(id, "t", "").unwrap();
    client
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client
}

/// `id`'s presence callbacks, in the order the message server got them.
fn presence_of(calls: &[common::message_server::Callback], id: &str) -> Vec<String> {
    calls
        .iter()
        .filter(|c| (c.method == "online" || c.method == "offline") && c.arg(0) == id)
        .map(|c| c.method.clone())
        .collect()
}

/// Whether `seen` alternates online / offline, beginning and ending with online, with at
/// least `hand_overs` offline / online pairs after the first online.
fn alternates(seen: &[String], hand_overs: usize) -> bool {
    seen.len() > 2 * hand_overs
        && seen.len() % 2 == 1
        && seen
            .iter()
            .enumerate()
            .all(|(n, m)| m == if n % 2 == 0 { "online" } else { "offline" })
}

/// For a conn_id whose client is closed by the draining predecessor and reconnects at
/// once to the successor, the message server gets the old `offline` before the new
/// `online`, even when offlines are slow (10 ms each) and onlines fast.
#[test]
fn presence_stays_in_order_for_clients_that_move_to_the_successor() {
    let _load = beside_others();
    const CLIENTS: usize = 200;
    let server = MessageServer::start();
    server.stall("offline", Duration::from_millis(10));
    let old = Comet::start(
        Some(&server),
        "drain_window=1s\nping_interval=5s\nheartbeat_timeout=30s",
    );
    let port = old.ws_port;
    let urls: Vec<String> = (0..CLIENTS)
        .map(|i| old.ws_url(&format!("m{i}"), "t", ""))
        .collect();
    let clients: Vec<_> = urls
        .into_iter()
        .map(|url| {
            let mut client = common::connect_url(&url, port).unwrap();
            client
                .get_mut()
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            // Closed by the old process (1001): reconnect at once, until connected to
            // one that keeps the connection (a reconnect may still reach the old one).
            std::thread::spawn(move || {
                assert_eq!(close_code(&mut client), Some(1001));
                for _ in 0..50 {
                    if let Ok(mut again) = common::connect_url(&url, port) {
                        again
                            .get_mut()
                            .set_read_timeout(Some(Duration::from_millis(1500)))
                            .unwrap();
                        match again.read() {
                            Err(tungstenite::Error::Io(_)) => return again,
                            _ => continue,
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                panic!("could not reconnect");
            })
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || server
        .calls_of("online")
        .len()
        == CLIENTS));
    let mut old = old;
    common::signal(old.pid(), "USR2");
    let status = old
        .wait_exit(Duration::from_secs(30))
        .expect("the old process exits");
    assert!(status.success(), "{status:?}");
    let _reap = Reap(successor_pid(&old.log_text()).expect("the log names the successor"));
    let _held: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    // Every client is connected to the successor: each conn_id's events alternate,
    // starting and ending with online.
    let in_order = |seen: &[String]| alternates(seen, 1);
    let settled = || {
        let calls = server.calls();
        (0..CLIENTS).all(|i| in_order(&presence_of(&calls, &format!("m{i}"))))
    };
    let ordered = wait_until(Duration::from_secs(30), settled);
    let calls = server.calls();
    let out_of_order: Vec<String> = (0..CLIENTS)
        .map(|i| format!("m{i}"))
        .filter(|id| !in_order(&presence_of(&calls, id)))
        .map(|id| format!("{id}: {:?}", presence_of(&calls, &id)))
        .collect();
    assert!(
        ordered,
        "{} of {CLIENTS} out of order: {out_of_order:?}",
        out_of_order.len()
    );
}

/// A client whose upgrade the predecessor accepted before the hand-over and finished only
/// after it: the predecessor closes it with 1001 and never announces it. The successor
/// did not hold that conn_id (it was not connected when the list was taken), so an
/// `online` and `offline` from the predecessor could reach the message server after the
/// successor's own `online`, leaving the client looking offline while connected.
#[test]
fn a_handshake_the_predecessor_finishes_after_the_hand_over_is_not_announced() {
    use std::io::{Read, Write};
    let _load = beside_others();
    let server = MessageServer::start();
    server.stall("offline", Duration::from_millis(200));
    let mut old = Comet::start(
        Some(&server),
        "drain_window=1s\nhandshake_timeout=20s\nping_interval=5s\nheartbeat_timeout=30s",
    );
    let url = old.ws_url("late", "t", "");
    let path = &url[url.find("/ws").unwrap()..];
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", old.ws_port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Everything but the blank line that ends the request: the predecessor's shard has
    // it in its handshake when the successor takes over.
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    common::signal(old.pid(), "USR2");
    assert!(
        wait_until(Duration::from_secs(20), || old
            .log_text()
            .contains("predecessor's presence list received")),
        "no hand-over: {}",
        old.log_text()
    );
    stream.write_all(b"\r\n").unwrap();
    let mut response = Vec::new();
    let mut byte = [0u8];
    while !response.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "{response:?}");
        response.push(byte[0]);
    }
    assert!(response.starts_with(b"HTTP/1.1 101"), "{response:?}");
    let mut late =
        tungstenite::WebSocket::from_raw_socket(stream, tungstenite::protocol::Role::Client, None);
    assert_eq!(close_code(&mut late), Some(1001));
    // Reconnects until a process keeps it (one may still reach the draining predecessor).
    let _moved = (0..50)
        .find_map(|_| {
            let mut again = common::connect_url(&url, old.ws_port).ok()?;
            again
                .get_mut()
                .set_read_timeout(Some(Duration::from_millis(1500)))
                .unwrap();
            match again.read() {
                Err(tungstenite::Error::Io(_)) => Some(again),
                _ => None,
            }
        })
        .expect("the successor keeps the client");
    let status = old
        .wait_exit(Duration::from_secs(30))
        .expect("the old process exits");
    assert!(status.success(), "{status:?}");
    let _reap = Reap(successor_pid(&old.log_text()).expect("the log names the successor"));
    assert!(wait_until(Duration::from_secs(10), || !server
        .calls_of("online")
        .is_empty()));
    // Past the 200 ms an offline takes: one from the predecessor would be in by now.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(presence_of(&server.calls(), "late"), vec!["online"]);
}

/// Every pid the log names as a successor, in order.
fn successor_pids(log: &str) -> Vec<u32> {
    log.lines()
        .filter(|l| l.contains("successor started"))
        .filter_map(successor_pid)
        .collect()
}

/// Issue 18's case at its size: 2,000 clients, a message server answering every
/// callback in 10 ms, three SIGUSR2 hand-overs in a row (each successor hands over to the
/// next). Each client reconnects at once whenever it is closed with 1001. At the end
/// every conn_id's callbacks alternate online / offline, beginning and ending with online,
/// one pair per hand-over at least: no `online` ever overtook the `offline` before it.
#[test]
fn presence_stays_in_order_through_three_hand_overs_of_2000_clients() {
    let _load = alone();
    const CLIENTS: usize = 2000;
    const HAND_OVERS: usize = 3;
    let server = MessageServer::start();
    server.stall("*", Duration::from_millis(10));
    let old = Comet::start(
        Some(&server),
        "drain_window=2s\nping_interval=10s\nheartbeat_timeout=60s\npresence_workers=32",
    );
    let port = old.ws_port;
    let stop = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let url = old.ws_url(&format!("h{i}"), "t", "");
            let (stop, connected) = (Arc::clone(&stop), Arc::clone(&connected));
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    let mut reconnects = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let Ok(mut client) = common::connect_url(&url, port) else {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        };
                        client
                            .get_mut()
                            .set_read_timeout(Some(Duration::from_millis(200)))
                            .unwrap();
                        connected.fetch_add(1, Ordering::SeqCst);
                        let closed = loop {
                            match client.read() {
                                Ok(tungstenite::Message::Close(_)) => break true,
                                Ok(_) => {}
                                Err(tungstenite::Error::Io(e))
                                    if e.kind() == std::io::ErrorKind::WouldBlock
                                        || e.kind() == std::io::ErrorKind::TimedOut =>
                                {
                                    if stop.load(Ordering::SeqCst) {
                                        break false;
                                    }
                                }
                                Err(_) => break true,
                            }
                        };
                        connected.fetch_sub(1, Ordering::SeqCst);
                        if !closed {
                            return reconnects;
                        }
                        reconnects += 1;
                    }
                    reconnects
                })
                .unwrap()
        })
        .collect();
    let all_online = |n: usize| {
        wait_until(Duration::from_secs(60), || {
            connected.load(Ordering::SeqCst) == CLIENTS && server.calls_of("online").len() >= n
        })
    };
    assert!(
        all_online(CLIENTS),
        "{} connected",
        connected.load(Ordering::SeqCst)
    );
    let mut old = old;
    let mut current = old.pid();
    let started = std::time::Instant::now();
    for round in 1..=HAND_OVERS {
        common::signal(current, "USR2");
        let next = wait_until(Duration::from_secs(30), || {
            successor_pids(&old.log_text()).len() == round
        });
        assert!(next, "hand-over {round}: no successor: {}", old.log_text());
        let previous = current;
        current = successor_pids(&old.log_text())[round - 1];
        assert!(
            wait_until(Duration::from_secs(60), || !std::path::Path::new(&format!(
                "/proc/{previous}/stat"
            ))
            .exists()
                || std::fs::read_to_string(format!("/proc/{previous}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))),
            "hand-over {round}: the old process {previous} did not exit"
        );
        if round == 1 {
            let status = old
                .wait_exit(Duration::from_secs(5))
                .expect("the first process exits");
            assert!(status.success(), "{status:?}");
        }
        assert!(
            all_online(CLIENTS * (round + 1)),
            "hand-over {round}: {} connected, {} onlines",
            connected.load(Ordering::SeqCst),
            server.calls_of("online").len()
        );
    }
    let _reap = Reap(current);
    let elapsed = started.elapsed();
    let in_order = |seen: &[String]| alternates(seen, HAND_OVERS);
    let settled = wait_until(Duration::from_secs(60), || {
        let calls = server.calls();
        (0..CLIENTS).all(|i| in_order(&presence_of(&calls, &format!("h{i}"))))
    });
    let calls = server.calls();
    let out_of_order: Vec<String> = (0..CLIENTS)
        .map(|i| format!("h{i}"))
        .filter(|id| !in_order(&presence_of(&calls, id)))
        .take(10)
        .map(|id| format!("{id}: {:?}", presence_of(&calls, &id)))
        .collect();
    stop.store(true, Ordering::SeqCst);
    let reconnects: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    println!(
        "{HAND_OVERS} hand-overs of {CLIENTS} clients (10 ms callbacks) in {elapsed:?}: \
         {} callbacks, {reconnects} reconnects, {} conn_ids out of order",
        calls.len(),
        out_of_order.len()
    );
    assert!(settled, "out of order (first 10): {out_of_order:?}");
}

/// One client's time without a connection to either process, as the client saw it: from
/// the old process's close to the handshake of the connection that stayed.
type Gap = (std::time::Instant, std::time::Instant);

/// Closed with 1001 by the draining process: reconnects at once until a connection
/// stays (a reconnect may still reach the old one); returns the gap and the connection.
fn reconnect_after_close(
    mut client: common::Client,
    url: &str,
    port: u16,
) -> (Gap, common::Client) {
    assert_eq!(close_code(&mut client), Some(1001));
    let closed = std::time::Instant::now();
    for _ in 0..50 {
        if let Ok(mut again) = common::connect_url(url, port) {
            let connected = std::time::Instant::now();
            again
                .get_mut()
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            // A connection that stays gets only pushes (text) for 1.5 s, no close.
            let stays_until = connected + Duration::from_millis(1500);
            let stayed = loop {
                match again.read() {
                    Ok(tungstenite::Message::Text(_)) | Err(tungstenite::Error::Io(_))
                        if std::time::Instant::now() >= stays_until =>
                    {
                        break true;
                    }
                    Ok(tungstenite::Message::Text(_)) | Err(tungstenite::Error::Io(_)) => {}
                    _ => break false,
                }
            };
            if stayed {
                return ((closed, connected), again);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("could not reconnect");
}

/// One push call as the pusher saw it: sent, answered, the ids answered failed.
struct PushRecord {
    sent: std::time::Instant,
    answered: std::time::Instant,
    failed: Vec<String>,
}

/// A message server pushing over one persistent RPC connection, or over a new one per
/// call (as a PHP message server does). A connection closed with no reply to the call
/// just written means the call was not executed (the node closes only idle
/// connections), so it reconnects and sends that call again.
struct Pusher {
    port: u16,
    persistent: bool,
    stream: Option<(std::io::BufReader<std::net::TcpStream>, std::net::TcpStream)>,
    reconnects: usize,
}

impl Pusher {
    fn call(&mut self, ids: &[String], n: u64) -> Vec<String> {
        use std::io::{BufRead, Write};
        let request = json!({"method": "Server.SendToConnections",
            "params": [{"connections": ids, "msg": format!("m{n}"), "token": ""}], "id": n});
        let request = format!("{request}\n");
        loop {
            if self.stream.is_none() {
                let stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                let reader = std::io::BufReader::new(stream.try_clone().unwrap());
                self.stream = Some((reader, stream));
            }
            let (reader, writer) = self.stream.as_mut().unwrap();
            let mut line = String::new();
            let answered = writer.write_all(request.as_bytes()).is_ok()
                && matches!(reader.read_line(&mut line), Ok(n) if n > 0);
            if !answered {
                self.stream = None;
                self.reconnects += 1;
                continue;
            }
            if !self.persistent {
                self.stream = None;
            }
            let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(reply["id"], json!(n), "{reply}");
            if reply["result"] == json!("ok") {
                return Vec::new();
            }
            let error: serde_json::Value =
                serde_json::from_str(reply["error"].as_str().unwrap()).unwrap();
            return error["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|id| id.as_str().unwrap().to_owned())
                .collect();
        }
    }
}

/// Pushes at a steady rate on one persistent RPC connection through a hand-over, while
/// the draining process's clients reconnect to the successor: the draining process
/// forwards pushes for ids it no longer holds to the successor, then closes the idle RPC
/// connection so the pusher moves. A push is answered failed only for an id truly between
/// connections (closed by the old process, not yet reconnected; 200 ms of slack either
/// side for the clocks of client and node). Before forwarding, 6,678 of 14,570 recipients
/// failed, 6,045 of them connected on either process; with it 3 to 81 of ~14,000, all between
/// connections.
#[test]
fn pushes_during_a_restart_fail_only_for_clients_between_connections() {
    let _load = beside_others();
    pushes_through_a_restart(true);
}

/// The same with a new RPC connection per push: those made during the drain reach the
/// successor, which forwards the pushes for clients still on the old process back to it.
/// Without that, 3,003 of 14,330 recipients failed, 2,424 of them connected; with it 10
/// of 11,050, all between connections.
#[test]
fn pushes_on_new_rpc_connections_during_a_restart_reach_clients_still_draining() {
    let _load = beside_others();
    pushes_through_a_restart(false);
}

fn pushes_through_a_restart(persistent: bool) {
    const CLIENTS: usize = 100;
    const PER_PUSH: usize = 10;
    let server = MessageServer::start();
    let mut old = Comet::start(
        Some(&server),
        "drain_window=2s\nping_interval=5s\nheartbeat_timeout=30s",
    );
    let port = old.ws_port;
    let ids: Vec<String> = (0..CLIENTS).map(|i| format!("p{i}")).collect();
    let clients: Vec<_> = ids
        .iter()
        .map(|id| {
            let url = old.ws_url(id, "t", "");
            let mut client = common::connect_url(&url, port).unwrap();
            client
                .get_mut()
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            std::thread::spawn(move || reconnect_after_close(client, &url, port))
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || server
        .calls_of("online")
        .len()
        == CLIENTS));

    let stop = Arc::new(AtomicBool::new(false));
    let pusher = {
        let (stop, ids, rpc_port) = (stop.clone(), ids.clone(), old.rpc_port);
        std::thread::spawn(move || {
            let mut pusher = Pusher {
                port: rpc_port,
                persistent,
                stream: None,
                reconnects: 0,
            };
            let mut records = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let start = (n as usize * PER_PUSH) % CLIENTS;
                let batch = ids[start..start + PER_PUSH].to_vec();
                let sent = std::time::Instant::now();
                let failed = pusher.call(&batch, n);
                records.push(PushRecord {
                    sent,
                    answered: std::time::Instant::now(),
                    failed,
                });
                n += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (records, pusher.reconnects)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let drain_started = std::time::Instant::now();
    common::signal(old.pid(), "USR2");
    let status = old
        .wait_exit(Duration::from_secs(40))
        .expect("the old process exits");
    assert!(status.success(), "{status:?}");
    let _reap = Reap(successor_pid(&old.log_text()).expect("the log names the successor"));
    let moved: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let (records, reconnects) = pusher.join().unwrap();

    let slack = Duration::from_millis(200);
    let gaps: std::collections::HashMap<&str, Gap> = ids
        .iter()
        .map(String::as_str)
        .zip(moved.iter().map(|(gap, _)| *gap))
        .collect();
    let between_connections = |id: &str, record: &PushRecord| {
        let (closed, connected) = gaps[id];
        record.answered + slack >= closed && record.sent <= connected + slack
    };
    let failed: usize = records.iter().map(|r| r.failed.len()).sum();
    let failed_while_connected: Vec<String> = records
        .iter()
        .flat_map(|r| {
            r.failed
                .iter()
                .filter(|id| !between_connections(id, r))
                .cloned()
        })
        .collect();
    let log = old.log_text();
    println!(
        "{} pushes ({} recipients) through a restart: {failed} recipients answered failed, \
         {} of them while connected on either process; the pusher reconnected {reconnects} time(s)",
        records.len(),
        records.len() * PER_PUSH,
        failed_while_connected.len()
    );
    // About 1,100 pushes on an idle machine; 312 were seen with the leak checker's
    // slower build beside the 2,000-client test: what matters is that pushes went on
    // through the whole drain.
    let drain_pushes = records.iter().filter(|r| r.sent >= drain_started).count();
    assert!(
        records.len() > 100 && drain_pushes > 20,
        "the pusher kept pushing: {} pushes, {drain_pushes} after the SIGUSR2",
        records.len()
    );
    assert!(
        failed_while_connected.is_empty(),
        "{} pushes failed for connected ids, first: {:?}",
        failed_while_connected.len(),
        &failed_while_connected[..failed_while_connected.len().min(20)]
    );
    if persistent {
        assert!(
            reconnects >= 1,
            "the draining process closed the idle RPC connection, and the pusher moved"
        );
        assert!(
            log.contains("pushes for clients not held here go to the successor"),
            "{log}"
        );
    } else {
        assert!(
            log.contains("pushes for clients not held here go to the draining predecessor"),
            "{log}"
        );
    }
}

/// What one client of the draining process saw: whether the broadcast reached it, and
/// its close code and when the close came.
struct Seen {
    broadcast: bool,
    close: Option<u16>,
    closed_at: std::time::Instant,
}

/// A broadcast and a kick made on new RPC connections while the old process drains (so
/// they reach the successor) still reach the clients the old process holds: the
/// successor forwards them back. Every client still on the old process when the
/// broadcast is answered has it, and every one still there when the kick is answered
/// is kicked (close 1000), not left connected until the drain closes it (1001).
#[test]
fn a_broadcast_and_a_kick_during_a_drain_reach_clients_still_on_the_old_process() {
    let _load = beside_others();
    const CLIENTS: usize = 12;
    let old = Comet::start(
        None,
        "drain_window=30s\nping_interval=5s\nheartbeat_timeout=60s",
    );
    let readers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mut client = comet_client(&old, &format!("d{i}"));
            client
                .get_mut()
                .set_read_timeout(Some(Duration::from_secs(40)))
                .unwrap();
            std::thread::spawn(move || {
                let mut broadcast = false;
                loop {
                    match client.read() {
                        Ok(tungstenite::Message::Text(text)) => {
                            broadcast |= text.as_str() == "to all"
                        }
                        Ok(tungstenite::Message::Close(frame)) => {
                            return Seen {
                                broadcast,
                                close: frame.map(|f| u16::from(f.code)),
                                closed_at: std::time::Instant::now(),
                            };
                        }
                        Ok(_) => {}
                        Err(_) => {
                            return Seen {
                                broadcast,
                                close: None,
                                closed_at: std::time::Instant::now(),
                            };
                        }
                    }
                }
            })
        })
        .collect();
    common::signal(old.pid(), "USR2");
    assert!(wait_until(Duration::from_secs(20), || old
        .log_text()
        .contains("successor serving")));
    let _reap = Reap(successor_pid(&old.log_text()).expect("the log names the successor"));
    // New connections: the old process no longer accepts, so these reach the successor.
    let mut rpc = old.rpc();
    let reply = rpc.call("Server.Broadcast", json!({"msg": "to all", "token": ""}));
    let broadcast_answered = std::time::Instant::now();
    let reply_text = reply.to_string();
    // 20000, or 50001 naming clients the drain was closing at that moment (between
    // connections: reported failed, as they must be), checked below.
    let code = &reply["result"]["code"];
    assert!(*code == json!(20000) || *code == json!(50001), "{reply}");
    let broadcast_failed: Vec<String> = reply["result"]["data"]["failed"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .map(|id| id.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default();
    let delivered = reply["result"]["data"]["delivered"].as_u64().unwrap();
    let ids: Vec<String> = (0..CLIENTS).map(|i| format!("d{i}")).collect();
    let mut rpc = old.rpc();
    let reply = rpc.call(
        "Server.KickConnections",
        json!({"connections": ids, "token": ""}),
    );
    let kick_answered = std::time::Instant::now();
    assert_eq!(reply["result"], json!("ok"), "{reply}");
    let seen: Vec<Seen> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let log = old.log_text();
    // The drain closes one client in 2.5 s: a second of slack for a loaded machine still
    // tells a forwarded kick from the drain's close.
    let slack = Duration::from_secs(1);
    for (i, seen) in seen.iter().enumerate() {
        if seen.closed_at > broadcast_answered + slack {
            assert!(
                seen.broadcast,
                "d{i} was still connected but missed the broadcast"
            );
            assert!(
                !broadcast_failed.contains(&format!("d{i}")),
                "d{i} was still connected but reported failed: {reply_text}"
            );
        }
        if seen.closed_at > kick_answered + slack {
            panic!(
                "d{i} was still connected {:?} after the kick",
                seen.closed_at - kick_answered
            );
        }
    }
    let kicked = seen.iter().filter(|s| s.close == Some(1000)).count();
    println!(
        "during a drain: broadcast delivered to {delivered} of {CLIENTS} on the old process, \
         {kicked} kicked there"
    );
    assert!(
        delivered as usize >= CLIENTS / 2 && kicked >= CLIENTS / 2,
        "a 30 s drain closes about one client in 2.5 s: {delivered} delivered, {kicked} kicked: {log}"
    );
    assert!(
        log.contains("go to the draining predecessor"),
        "the successor forwarded back: {log}"
    );
}

/// A SIGUSR2 with a broken comet.ini: the successor fails at start, the node goes on
/// serving, and the failed successor is reaped (it was left a zombie before).
#[test]
fn a_restart_with_a_broken_config_keeps_serving_and_leaves_no_zombie() {
    let _load = beside_others();
    let old = Comet::start(None, "");
    let config = old.log.parent().unwrap().join("comet.ini");
    // SIGUSR2 is watched once the control thread runs, a moment after the ports open.
    assert!(wait_until(Duration::from_secs(10), || old
        .log_text()
        .contains("comet ready")));
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&config, "max_proc=banana\n").unwrap();
    common::signal(old.pid(), "USR2");
    assert!(
        wait_until(Duration::from_secs(20), || old
            .log_text()
            .contains("restart aborted, still serving")),
        "{}",
        old.log_text()
    );
    let children_of = |pid: u32| -> Vec<String> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("stat")).ok())
            .filter(|stat| {
                // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
                let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
                after.split_whitespace().nth(1) == Some(&pid.to_string())
            })
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(5), || children_of(old.pid()).is_empty()),
        "children left: {:?}",
        children_of(old.pid())
    );
    let mut client = comet_client(&old, "still");
    let mut rpc = old.rpc();
    assert_eq!(rpc.push(&["still"], "served", "")["result"], json!("ok"));
    assert_eq!(next_text(&mut client).as_deref(), Some("served"));
}

/// Presence callbacks per second at the default `presence_workers` (16) against a message
/// server answering each `offline` in 1 ms and in 10 ms: how fast a drain is reported.
/// Prints the figures (`cargo test --test restart callback_throughput -- --show-output`);
/// asserts only a floor far below them, for a busy machine.
#[test]
fn callback_throughput_at_1ms_and_10ms() {
    let _load = beside_others();
    const CLIENTS: usize = 600;
    common::raise_open_files_limit();
    for latency_ms in [1, 10] {
        let server = MessageServer::start();
        let comet = Comet::start(Some(&server), "ping_interval=30s\nheartbeat_timeout=60s");
        let clients: Vec<_> = (0..CLIENTS)
            .map(|i| comet.connect(&format!("t{i}"), "t", "").unwrap())
            .collect();
        assert!(wait_until(Duration::from_secs(30), || server
            .calls_of("online")
            .len()
            == CLIENTS));
        server.stall("offline", Duration::from_millis(latency_ms));
        drop(clients);
        assert!(wait_until(Duration::from_secs(60), || server
            .calls_of("offline")
            .len()
            == CLIENTS));
        let offlines = server.calls_of("offline");
        let first = offlines.iter().map(|c| c.at).min().unwrap();
        let last = offlines.iter().map(|c| c.at).max().unwrap();
        let per_second = (CLIENTS - 1) as f64 / (last - first).as_secs_f64();
        println!(
            "presence_workers=16, message server answering in {latency_ms} ms: \
             {per_second:.0} offline callbacks/s ({CLIENTS} in {:?}); 100k clients would take {:.0} s",
            last - first,
            100_000.0 / per_second
        );
        assert!(per_second > 100.0, "{per_second:.0}/s");
    }
}

/// A `/readyz` probe the old process accepted just before the hand-over is answered by
/// it, ready (the address serves, by the successor), not "503 draining" or dropped.
#[test]
fn a_readyz_probe_accepted_before_the_hand_over_is_answered_ready() {
    let _load = beside_others();
    use std::io::{Read, Write};
    let admin_port = common::free_port();
    let mut old = Comet::start(
        None,
        &format!("admin_addr=127.0.0.1:{admin_port}\ndrain_window=2s"),
    );
    assert!(wait_until(Duration::from_secs(10), || old
        .log_text()
        .contains("comet ready")));
    // The control thread watches SIGUSR2 a moment after it logs ready.
    std::thread::sleep(Duration::from_millis(500));
    let mut probe = std::net::TcpStream::connect(("127.0.0.1", admin_port)).unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Accepted by the old process (its task now waits for the request).
    std::thread::sleep(Duration::from_millis(300));
    common::signal(old.pid(), "USR2");
    assert!(
        wait_until(Duration::from_secs(4), || old
            .log_text()
            .contains("successor serving: draining")),
        "{}",
        old.log_text()
    );
    let _reap = Reap(successor_pid(&old.log_text()).expect("the log names the successor"));
    probe
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = probe.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.ends_with("ready\n"), "{answer:?}");
    let status = old
        .wait_exit(Duration::from_secs(30))
        .expect("the old process exits");
    assert!(status.success(), "{status:?}");
}

/// systemd as `tuning/comet-reload.sh` sees it, for the tests: a notify socket that
/// keeps the last `MAINPID=` and `STATUS=` the node (or its successor, NotifyAccess=all)
/// sent, and a `systemctl` on PATH that answers `show -p MainPID|StatusText --value`.
struct FakeSystemd {
    dir: std::path::PathBuf,
    socket: std::path::PathBuf,
}

impl FakeSystemd {
    fn start() -> FakeSystemd {
        let dir = common::temp_dir("fake-systemd");
        let socket = dir.join("notify.sock");
        let listener = std::os::unix::net::UnixDatagram::bind(&socket).unwrap();
        let main_pid = dir.join("mainpid");
        std::fs::write(&main_pid, "0\n").unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = listener.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if let Some(pid) = text.lines().find_map(|l| l.strip_prefix("MAINPID=")) {
                    std::fs::write(&main_pid, format!("{pid}\n")).unwrap();
                }
                if let Some(status) = text.lines().find_map(|l| l.strip_prefix("STATUS=")) {
                    std::fs::write(main_pid.with_file_name("status"), format!("{status}\n"))
                        .unwrap();
                }
            }
        });
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let systemctl = bin.join("systemctl");
        // `systemctl show -p MainPID|StatusText --value UNIT`
        std::fs::write(
            &systemctl,
            format!(
                "#!/bin/sh\ncase \"$3\" in MainPID) cat '{0}/mainpid';; StatusText) cat '{0}/status' 2>/dev/null;; esac\n",
                dir.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&systemctl, std::fs::Permissions::from_mode(0o755)).unwrap();
        FakeSystemd { dir, socket }
    }

    /// Runs the reload script against `pid`: its exit status and its output.
    fn reload(&self, pid: u32) -> (bool, String) {
        let path = format!(
            "{}:{}",
            self.dir.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning/comet-reload.sh");
        let out = std::process::Command::new("bash")
            .arg(script)
            .arg(pid.to_string())
            .env("PATH", path)
            .env("COMET_RELOAD_TIMEOUT", "40")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

/// `tuning/comet-reload.sh` (the unit's ExecReload) waits for the outcome of a SIGUSR2:
/// it exits 0 only once the successor has told systemd it is the MAINPID, and 1 when the
/// successor fails (a broken comet.ini) while the node goes on serving.
#[test]
fn the_reload_script_reports_a_served_successor_and_a_failed_one() {
    let _load = beside_others();
    let systemd = FakeSystemd::start();
    let mut old = Comet::start_with_env(
        None,
        "drain_window=0",
        &[("NOTIFY_SOCKET", systemd.socket.to_str().unwrap())],
    );
    assert!(wait_until(Duration::from_secs(10), || old
        .log_text()
        .contains("comet ready")));
    std::thread::sleep(Duration::from_millis(500));
    let (ok, said) = systemd.reload(old.pid());
    assert!(ok, "{said}\n{}", old.log_text());
    let successor = successor_pid(&old.log_text()).expect("the log names the successor");
    assert!(
        said.contains(&format!("successor {successor} serving")),
        "{said}"
    );
    let _reap = Reap(successor);
    assert!(
        old.wait_exit(Duration::from_secs(20)).is_some(),
        "the old process drains and exits"
    );

    // The successor's comet.ini is the same file: break it, and reload again.
    let config = old.log.parent().unwrap().join("comet.ini");
    std::fs::write(&config, "max_proc=banana\n").unwrap();
    let asked = std::time::Instant::now();
    let (ok, said) = systemd.reload(successor);
    assert!(!ok, "a failed successor must fail the reload: {said}");
    // A successor that fails within 100 ms was missed by the child watch, and the
    // reload failed only at its 35 s timeout.
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}: {said}",
        asked.elapsed()
    );
    assert!(said.contains("the successor failed"), "{said}");
    assert!(
        said.contains("restart failed at"),
        "seen through the unit's status: {said}"
    );
    assert!(
        std::path::Path::new(&format!("/proc/{successor}")).exists(),
        "the node goes on serving"
    );
    let mut rpc = old.rpc();
    assert_eq!(
        rpc.call("Server.GetNode", json!({"token": ""}))["result"]["code"],
        json!(20000)
    );
}

/// A SIGUSR2 to a successor while its predecessor still drains is refused (a third
/// process would know only the second, and the clients still on the first would lose
/// their forwarding and their presence order: an attacker's review saw 200 of 200 pushes
/// to them fail and 24 of 100 conn_ids get online, online, offline, offline). Once the
/// predecessor has exited, the next SIGUSR2 hands over as usual.
#[test]
fn a_restart_while_the_previous_one_drains_is_refused_until_it_has_exited() {
    let _load = beside_others();
    let mut old = Comet::start(
        None,
        "drain_window=4s\nping_interval=5s\nheartbeat_timeout=30s",
    );
    let clients: Vec<_> = (0..4)
        .map(|i| comet_client(&old, &format!("k{i}")))
        .collect();
    assert!(wait_until(Duration::from_secs(10), || old
        .log_text()
        .contains("comet ready")));
    std::thread::sleep(Duration::from_millis(300));
    common::signal(old.pid(), "USR2");
    assert!(wait_until(Duration::from_secs(20), || old
        .log_text()
        .contains("successor serving")));
    let first = successor_pid(&old.log_text()).expect("the log names the successor");
    let _reap_first = Reap(first);
    // The old process drains its four clients over 4 s: the successor refuses now.
    std::thread::sleep(Duration::from_millis(500));
    common::signal(first, "USR2");
    assert!(
        wait_until(Duration::from_secs(10), || old
            .log_text()
            .contains("the previous restart is still draining")),
        "{}",
        old.log_text()
    );
    assert_eq!(successor_pids(&old.log_text()).len(), 1, "no third process");
    drop(clients);
    assert!(
        old.wait_exit(Duration::from_secs(30)).is_some(),
        "the old process exits"
    );
    // Reparented now: the next restart goes ahead.
    std::thread::sleep(Duration::from_millis(300));
    common::signal(first, "USR2");
    assert!(
        wait_until(Duration::from_secs(20), || successor_pids(&old.log_text())
            .len()
            == 2),
        "{}",
        old.log_text()
    );
    let _reap_second = Reap(successor_pids(&old.log_text())[1]);
}
