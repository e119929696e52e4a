//! Zero-downtime restart: SIGUSR2 hands the listeners and the etcd key to a successor
//! while the old process drains, under a steady connect load.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::etcd::{self, Etcd};
use common::{Comet, MessageServer, Monitor, close_code, next_text, wait_until};
use serde_json::json;

/// Stops a process we did not start ourselves (the successor) when dropped.
struct Reap(u32);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.0.to_string())
            .status();
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
    let _ = std::process::Command::new("kill")
        .args(["-USR2", &old.pid().to_string()])
        .status();
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

/// For a conn_id whose client is closed by the draining predecessor and reconnects at
/// once to the successor, the message server gets the old `offline` before the new
/// `online`, even when offlines are slow (10 ms each) and onlines fast.
#[test]
fn presence_stays_in_order_for_clients_that_move_to_the_successor() {
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
    let _ = std::process::Command::new("kill")
        .args(["-USR2", &old.pid().to_string()])
        .status();
    let status = old
        .wait_exit(Duration::from_secs(30))
        .expect("the old process exits");
    assert!(status.success(), "{status:?}");
    let _reap = Reap(successor_pid(&old.log_text()).expect("the log names the successor"));
    let _held: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    // Every client is connected to the successor: each conn_id's events alternate,
    // starting and ending with online.
    let sequence = |calls: &[common::message_server::Callback], id: &str| -> Vec<String> {
        calls
            .iter()
            .filter(|c| (c.method == "online" || c.method == "offline") && c.arg(0) == id)
            .map(|c| c.method.clone())
            .collect()
    };
    let in_order = |seen: &[String]| {
        seen.len() >= 3
            && seen.len() % 2 == 1
            && seen
                .iter()
                .enumerate()
                .all(|(n, m)| m == if n % 2 == 0 { "online" } else { "offline" })
    };
    let settled = || {
        let calls = server.calls();
        (0..CLIENTS).all(|i| in_order(&sequence(&calls, &format!("m{i}"))))
    };
    let ordered = wait_until(Duration::from_secs(30), settled);
    let calls = server.calls();
    let out_of_order: Vec<String> = (0..CLIENTS)
        .map(|i| format!("m{i}"))
        .filter(|id| !in_order(&sequence(&calls, id)))
        .map(|id| format!("{id}: {:?}", sequence(&calls, &id)))
        .collect();
    assert!(
        ordered,
        "{} of {CLIENTS} out of order: {out_of_order:?}",
        out_of_order.len()
    );
}
