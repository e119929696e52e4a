//! A bounded soak: mixed connects, disconnects, kicks, unicast pushes and broadcasts over
//! WebSocket and JSON-lines clients for `COMET_SOAK_SECS` seconds (300 by default, as CI
//! runs it; set it higher for a longer soak). Asserts flat RSS, a clean presence ledger
//! and no lost, duplicated or reordered delivery, and prints the figures.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::clients::{Reader, plain};
use common::{Comet, MessageServer, free_port, next_text, wait_until};
use serde_json::json;

const STABLE_WS: usize = 40;
const STABLE_JSON: usize = 20;
const CHURNERS: usize = 4;

/// What a stable client saw: unicast and broadcast sequence numbers, each checked to be
/// consecutive from 0 as they arrive.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    unicast: u64,
    broadcast: u64,
}

impl Seen {
    /// Records one message; false once the `end` message arrives.
    fn record(&mut self, who: &str, text: &str) -> bool {
        let (kind, number) = text.split_once(':').unwrap_or((text, ""));
        let counter = match kind {
            "u" => &mut self.unicast,
            "b" => &mut self.broadcast,
            "end" => return false,
            other => panic!("{who}: unexpected message {other:?}"),
        };
        let n: u64 = number.parse().unwrap();
        assert_eq!(
            n, *counter,
            "{who}: {kind} message out of order, lost or duplicated"
        );
        *counter += 1;
        true
    }
}

fn stable_ws(comet: &Comet, id: String) -> JoinHandle<Seen> {
    let mut client = comet.connect(&id, "t", "").unwrap();
    client
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    std::thread::spawn(move || {
        let mut seen = Seen::default();
        while seen.record(
            &id,
            &next_text(&mut client).expect("stable client kept its connection"),
        ) {}
        seen
    })
}

fn stable_json(port: u16, id: String) -> JoinHandle<Seen> {
    let mut client = Reader::new(plain(port));
    client
        .stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    client.send(format!("{}\n", json!({"conn_id": id, "token": "t"})).as_bytes());
    assert_eq!(client.json().unwrap()["type"], "ok");
    std::thread::spawn(move || {
        let mut seen = Seen::default();
        loop {
            let line = client.json().expect("stable client kept its connection");
            match line["type"].as_str() {
                Some("ping") => client.send(b"{\"type\":\"pong\"}\n"),
                Some("message") => {
                    if !seen.record(&id, line["data"].as_str().unwrap()) {
                        return seen;
                    }
                }
                _ => panic!("{id}: unexpected line {line}"),
            }
        }
    })
}

/// Connects and ends clients until `stop`: graceful closes, abrupt drops, kicks.
fn churner(
    comet_ws: u16,
    rpc_port: u16,
    worker: usize,
    stop: Arc<AtomicBool>,
    connects: Arc<AtomicU64>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut rpc = common::Rpc::connect(rpc_port);
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let id = format!("churn{worker}-{}", n % 50);
            let url = format!(
                "ws://127.0.0.1:{comet_ws}/ws?t={}",
                common::url_encode(&json!({"conn_id": id, "token": "t"}).to_string())
            );
            let Ok(mut client) = common::connect_url(&url, comet_ws) else {
                continue;
            };
            connects.fetch_add(1, Ordering::Relaxed);
            match n % 3 {
                0 => {
                    let _ = client.close(None);
                    while client.read().is_ok() {}
                }
                1 => drop(client),
                _ => {
                    let reply = rpc.call("Server.KickConnections", json!({"connections": [id]}));
                    assert_eq!(reply["result"], json!("ok"), "{reply}");
                    while client.read().is_ok() {}
                }
            }
            n += 1;
        }
    })
}

#[test]
fn soak_keeps_memory_flat_presence_exact_and_deliveries_whole() {
    let seconds: u64 = std::env::var("COMET_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let server = MessageServer::start();
    let tcp_port = free_port();
    let comet = Comet::start(
        Some(&server),
        &format!(
            "tcp_port={tcp_port}\noutbound_queue_size=100000\noutbound_queue_bytes=268435456\nping_interval=2s\nheartbeat_timeout=5s\n"
        ),
    );
    assert!(wait_until(Duration::from_secs(5), || common::port_open(
        tcp_port
    )));
    let mut ids: Vec<String> = (0..STABLE_WS).map(|i| format!("ws{i}")).collect();
    ids.extend((0..STABLE_JSON).map(|i| format!("json{i}")));
    let readers: Vec<JoinHandle<Seen>> = ids
        .iter()
        .map(|id| match id.starts_with("ws") {
            true => stable_ws(&comet, id.clone()),
            false => stable_json(tcp_port, id.clone()),
        })
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let connects = Arc::new(AtomicU64::new(0));
    let churners: Vec<_> = (0..CHURNERS)
        .map(|w| {
            churner(
                comet.ws_port,
                comet.rpc_port,
                w,
                Arc::clone(&stop),
                Arc::clone(&connects),
            )
        })
        .collect();

    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut rpc = TcpStream::connect(("127.0.0.1", comet.rpc_port)).unwrap();
    let mut replies = std::io::BufReader::new(rpc.try_clone().unwrap());
    let mut unicast_sent = vec![0u64; ids.len()];
    let mut broadcasts = 0u64;
    let mut pushes = 0u64;
    let mut rss = Vec::new();
    let mut next_sample = started;
    let mut round = 0usize;
    while Instant::now() < deadline {
        // A pipelined batch of unicasts, one recipient each, then one broadcast.
        let mut batch = String::new();
        for k in 0..100 {
            let who = (round * 100 + k) % ids.len();
            let request = json!({"method": "Server.SendToConnections", "id": k,
                "params": [{"connections": [ids[who]], "msg": format!("u:{}", unicast_sent[who])}]});
            unicast_sent[who] += 1;
            batch.push_str(&format!("{request}\n"));
        }
        rpc.write_all(batch.as_bytes()).unwrap();
        for _ in 0..100 {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut replies, &mut line).unwrap();
            let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(
                reply["result"],
                json!("ok"),
                "a unicast to a stable client failed: {reply}"
            );
        }
        pushes += 100;
        let request = json!({"method": "Server.Broadcast", "id": 0, "params": [{"msg": format!("b:{broadcasts}")}]});
        rpc.write_all(format!("{request}\n").as_bytes()).unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut replies, &mut line).unwrap();
        let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
        let failed = reply["result"]["data"]["failed"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            failed
                .iter()
                .all(|id| id.as_str().unwrap().starts_with("churn")),
            "{reply}"
        );
        broadcasts += 1;
        if Instant::now() >= next_sample {
            rss.push(comet.rss_kib());
            next_sample += Duration::from_secs((seconds / 20).max(1));
        }
        round += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    for churner in churners {
        churner.join().unwrap();
    }
    let end_ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(
        common::Rpc::connect(comet.rpc_port).push(&end_ids, "end", "")["result"],
        json!("ok")
    );
    for (reader, id) in readers.into_iter().zip(&ids) {
        let seen = reader.join().unwrap();
        let who = ids.iter().position(|i| i == id).unwrap();
        assert_eq!(seen.unicast, unicast_sent[who], "{id}: unicasts");
        assert_eq!(seen.broadcast, broadcasts, "{id}: broadcasts");
    }
    // The readers are gone: every session ends, and the ledger must balance.
    assert!(wait_until(Duration::from_secs(20), || {
        server.calls_of("offline").len() == server.calls_of("online").len()
    }));
    let (conn_ids, sessions) = common::check_presence_ledger(&server);
    let warm = rss[rss.len().min(2) - 1];
    let last = *rss.last().unwrap();
    let deliveries: u64 = pushes + broadcasts * ids.len() as u64;
    println!(
        "soak {seconds} s: {} churn connects, {sessions} sessions over {conn_ids} conn_ids, {pushes} unicasts, \
         {broadcasts} broadcasts, {deliveries}+ checked deliveries, RSS {warm} KiB warm -> {last} KiB at the end \
         (samples {rss:?}), 0 accounting errors, 0 lost",
        connects.load(Ordering::Relaxed)
    );
    assert!(
        last as f64 <= warm as f64 * 1.10,
        "RSS grew from {warm} KiB to {last} KiB"
    );
}
