//! Clusters: registration in a real etcd (Debian's etcd-server), the monitor, faults
//! (SIGKILL, etcd restarts, a three-member cluster losing a member), identity conflicts
//! and the load self-check, all against the real binaries.

mod common;

use std::time::{Duration, Instant};

use common::etcd::{self, Etcd, HeldKey};
use common::{Comet, MessageServer, Monitor, wait_until};
use serde_json::{Value, json};

fn node_config(endpoints: &str) -> String {
    format!("etcd_addr={endpoints}\netcd_lease_ttl=3\netcd_keepalive_interval=1s\n")
}

fn removals(server: &MessageServer, key: &str) -> usize {
    server
        .calls_of("removeCometServer")
        .iter()
        .filter(|c| c.arg(0) == key)
        .count()
}

fn additions(server: &MessageServer, key: &str) -> Vec<Value> {
    server
        .calls_of("addCometServer")
        .iter()
        .filter(|c| c.arg(0) == key)
        .map(|c| serde_json::from_str(c.arg(1)).unwrap())
        .collect()
}

#[test]
fn node_registers_with_key_value_and_lease() {
    let etcd = Etcd::start();
    let endpoints = vec![etcd.endpoint()];
    let comet = Comet::start(None, &node_config(&etcd.endpoint()));
    let key = comet.etcd_key();
    assert!(wait_until(Duration::from_secs(5), || etcd::key(
        &endpoints, &key
    )
    .is_some()));
    let entry = etcd::key(&endpoints, &key).unwrap();
    let value: Value = serde_json::from_str(&entry.value).unwrap();
    assert_eq!(value["Protocol"], json!("ws"));
    assert_eq!(
        value["RpcAddr"],
        json!(format!("127.0.0.1:{}", comet.rpc_port))
    );
    assert_eq!(
        value["CometAddr"],
        json!(format!("ws://127.0.0.1:{}", comet.ws_port))
    );
    assert_eq!(value["shards"], json!(2));
    assert_eq!(value["overloaded"], json!(false));
    assert!(
        value["connections"].is_u64()
            && value["version"].is_string()
            && value["start_time"].is_u64()
    );
    assert_ne!(entry.lease, 0, "the key lives on a lease");
    let (remaining, granted) = etcd::lease_ttl(&endpoints, entry.lease);
    assert_eq!(granted, 3);
    assert!((1..=3).contains(&remaining), "kept alive: {remaining}");

    let status = comet.rpc().call("Server.Status", json!({}));
    assert_eq!(
        status["result"]["data"]["registration"]["state"],
        json!("registered"),
        "{status}"
    );
}

#[test]
fn sigkilled_node_disappears_and_the_monitor_removes_it_within_ttl_plus_one_second() {
    let etcd = Etcd::start();
    let server = MessageServer::start();
    let _monitor = Monitor::start(&server, &etcd.endpoint());
    let mut comet = Comet::start(None, &node_config(&etcd.endpoint()));
    let key = comet.etcd_key();
    assert!(wait_until(Duration::from_secs(10), || !additions(
        &server, &key
    )
    .is_empty()));
    let killed = Instant::now();
    comet.kill();
    assert!(wait_until(Duration::from_secs(8), || removals(
        &server, &key
    ) == 1));
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_secs(4),
        "removeCometServer after {took:?}"
    );
    let removal = server.calls_of("removeCometServer").pop().unwrap();
    assert!(
        removal.args[1].as_i64().unwrap() > 0,
        "revision is given: {:?}",
        removal.args
    );
    assert!(etcd::key(&[etcd.endpoint()], &key).is_none());
}

#[test]
fn a_removal_made_while_the_message_server_was_down_is_retried_while_the_watch_stays_open() {
    let etcd = Etcd::start();
    let server = MessageServer::start();
    // No retries of its own: the first refused call is given up.
    let monitor = Monitor::start_with(
        &server,
        &etcd.endpoint(),
        "callback_retries=0\ncallback_timeout=2s\n",
    );
    let mut comet = Comet::start(None, &node_config(&etcd.endpoint()));
    let key = comet.etcd_key();
    assert!(wait_until(Duration::from_secs(10), || !additions(
        &server, &key
    )
    .is_empty()));
    server.die();
    comet.kill();
    // The key expires within its 3 s lease, and its removal finds nobody listening.
    assert!(
        wait_until(Duration::from_secs(15), || monitor
            .log_text()
            .contains("could not be reached for removeCometServer")),
        "{}",
        monitor.log_text()
    );
    server.revive();
    // etcd stayed up and the watch healthy: only the monitor's own retry (a re-list, at
    // most 10 s after the last) can bring the removal now.
    assert!(
        wait_until(Duration::from_secs(25), || removals(&server, &key) == 1),
        "{}",
        monitor.log_text()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(removals(&server, &key), 1, "announced once");
}

#[test]
fn sigterm_deregisters_at_once() {
    let etcd = Etcd::start();
    let endpoints = vec![etcd.endpoint()];
    let mut comet = Comet::start(None, &node_config(&etcd.endpoint()));
    let key = comet.etcd_key();
    assert!(wait_until(Duration::from_secs(5), || etcd::key(
        &endpoints, &key
    )
    .is_some()));
    comet.terminate(Duration::from_secs(10)).unwrap();
    assert!(
        etcd::key(&endpoints, &key).is_none(),
        "key revoked before exit"
    );
}

/// A stop with clients still draining must leave etcd once and for good: the revoked
/// lease's keepalive failing is not a lost lease to re-register.
#[test]
fn sigterm_with_clients_draining_removes_the_node_once_and_never_re_registers() {
    let etcd = Etcd::start();
    let endpoints = vec![etcd.endpoint()];
    let server = MessageServer::start();
    let _monitor = Monitor::start(&server, &etcd.endpoint());
    // The drain outlasts several keepalive intervals and a lease TTL, the window in
    // which the old registration task put the key back.
    let config = format!(
        "{}drain_window=5s
",
        node_config(&etcd.endpoint())
    );
    let mut comet = Comet::start(None, &config);
    let key = comet.etcd_key();
    let clients: Vec<_> = (0..20)
        .map(|i| comet.connect(&format!("d{i}"), "t", "").unwrap())
        .collect();
    assert!(wait_until(Duration::from_secs(10), || additions(
        &server, &key
    )
    .len()
        == 1));
    let signalled = Instant::now();
    common::signal(comet.pid(), "TERM");
    assert!(
        wait_until(Duration::from_secs(3), || removals(&server, &key) == 1),
        "the monitor reports the removal at once"
    );
    let removed_after = signalled.elapsed();
    // Watch etcd for the whole drain: the key must never come back.
    while comet.wait_exit(Duration::from_millis(200)).is_none() {
        assert!(
            etcd::key(&endpoints, &key).is_none(),
            "key put back {:?} after SIGTERM",
            signalled.elapsed()
        );
        assert!(
            signalled.elapsed() < Duration::from_secs(20),
            "node did not exit"
        );
    }
    drop(clients);
    std::thread::sleep(Duration::from_secs(4));
    assert!(etcd::key(&endpoints, &key).is_none());
    assert_eq!(additions(&server, &key).len(), 1, "never announced again");
    assert_eq!(removals(&server, &key), 1, "exactly one removal");
    assert!(
        removed_after <= Duration::from_secs(3),
        "removal after {removed_after:?}"
    );
}

/// A default-configured etcd (`--grpc-keepalive-min-time=5s`) answers pings more often
/// than that with GOAWAY: the monitor's idle watch stream must not be one of those.
#[test]
fn the_monitors_watch_stays_open_on_a_quiet_cluster() {
    const QUIET: Duration = Duration::from_secs(25);
    let etcd = Etcd::start();
    let server = MessageServer::start();
    let monitor = Monitor::start(&server, &etcd.endpoint());
    let comet = Comet::start(None, &node_config(&etcd.endpoint()));
    let key = comet.etcd_key();
    assert!(wait_until(Duration::from_secs(10), || additions(
        &server, &key
    )
    .len()
        == 1));
    std::thread::sleep(QUIET);
    let log = monitor.log_text();
    assert_eq!(
        log.matches("watch interrupted").count(),
        0,
        "the watch broke during {QUIET:?} of quiet: {log}"
    );
    assert_eq!(
        additions(&server, &key).len(),
        1,
        "no re-listing announced it again"
    );
    assert_eq!(removals(&server, &key), 0);
}

#[test]
fn key_is_back_within_one_ttl_after_etcd_restarts() {
    let mut etcd = Etcd::start();
    let endpoints = vec![etcd.endpoint()];
    let comet = Comet::start(None, &node_config(&etcd.endpoint()));
    let key = comet.etcd_key();
    assert!(wait_until(Duration::from_secs(5), || etcd::key(
        &endpoints, &key
    )
    .is_some()));
    etcd.kill();
    std::thread::sleep(Duration::from_secs(4));
    // Clients are still served while etcd is gone.
    let _client = comet.connect("during-outage", "t", "").unwrap();
    etcd.restart();
    let back = Instant::now();
    assert!(wait_until(Duration::from_secs(10), || etcd::key(
        &endpoints, &key
    )
    .is_some()));
    assert!(
        back.elapsed() <= Duration::from_secs(3),
        "key back after {:?}",
        back.elapsed()
    );
    // And it stays (a live lease, not a leftover).
    std::thread::sleep(Duration::from_secs(4));
    assert!(etcd::key(&endpoints, &key).is_some());
}

#[test]
fn etcd_down_at_start_registers_as_soon_as_it_answers() {
    let port = common::free_port();
    let comet = Comet::start(None, &node_config(&format!("127.0.0.1:{port}")));
    let _client = comet.connect("early", "t", "").unwrap();
    let status = comet.rpc().call("Server.Status", json!({}));
    assert_ne!(
        status["result"]["data"]["registration"]["state"],
        json!("registered")
    );
    let etcd = Etcd::started_on(port);
    let key = comet.etcd_key();
    assert!(wait_until(Duration::from_secs(5), || etcd::key(
        &[etcd.endpoint()],
        &key
    )
    .is_some()));
}

#[test]
fn a_key_held_by_another_process_is_a_clear_startup_error() {
    let etcd = Etcd::start();
    let rpc_port = common::free_port();
    let key = format!("/comet/127.0.0.1:{rpc_port}");
    let _held = HeldKey::hold(&[etcd.endpoint()], &key);
    let ws_port = common::free_port();
    let ini = format!(
        "{}websocket_port={ws_port}\nrpc_addr=127.0.0.1:{rpc_port}\n",
        node_config(&etcd.endpoint())
    );
    let started = Instant::now();
    let mut comet = Comet::spawn_with_ini(&ini, ws_port, rpc_port).unwrap();
    let status = comet
        .wait_exit(Duration::from_secs(15))
        .expect("the node must give up");
    assert!(!status.success());
    assert!(started.elapsed() < Duration::from_secs(10));
    let log = comet.log_text();
    assert!(log.contains("held by another process"), "{log}");
    assert!(
        etcd::key(&[etcd.endpoint()], &key)
            .unwrap()
            .value
            .contains("by a test")
    );
}

#[test]
fn monitor_restarted_while_a_node_left_still_reports_the_removal() {
    let etcd = Etcd::start();
    let server = MessageServer::start();
    let mut monitor = Monitor::start(&server, &etcd.endpoint());
    let mut leaving = Comet::start(None, &node_config(&etcd.endpoint()));
    let staying = Comet::start(None, &node_config(&etcd.endpoint()));
    let (gone, kept) = (leaving.etcd_key(), staying.etcd_key());
    assert!(wait_until(Duration::from_secs(10), || {
        !additions(&server, &gone).is_empty() && !additions(&server, &kept).is_empty()
    }));
    monitor.stop();
    leaving.terminate(Duration::from_secs(10)).unwrap();
    assert_eq!(removals(&server, &gone), 0, "nobody was watching");
    let _monitor = Monitor::start(&server, &etcd.endpoint());
    assert!(wait_until(Duration::from_secs(10), || removals(
        &server, &gone
    ) == 1));
    assert_eq!(removals(&server, &kept), 0);
    assert!(
        wait_until(Duration::from_secs(5), || additions(&server, &kept).len()
            >= 2),
        "re-announced"
    );
}

#[test]
fn three_nodes_and_one_monitor_give_three_additions() {
    let etcd = Etcd::start();
    let server = MessageServer::start();
    let _monitor = Monitor::start(&server, &etcd.endpoint());
    let nodes: Vec<Comet> = (0..3)
        .map(|_| Comet::start(None, &node_config(&etcd.endpoint())))
        .collect();
    for node in &nodes {
        let key = node.etcd_key();
        assert!(
            wait_until(Duration::from_secs(10), || additions(&server, &key).len()
                == 1),
            "{key}"
        );
        let value = &additions(&server, &key)[0];
        assert_eq!(
            value["RpcAddr"],
            json!(format!("127.0.0.1:{}", node.rpc_port))
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(server.calls_of("addCometServer").len(), 3);
}

#[test]
fn registration_and_monitor_survive_losing_one_of_three_etcd_members() {
    let mut members = Etcd::cluster(3);
    let all: Vec<String> = members.iter().map(Etcd::endpoint).collect();
    let endpoints = all.join(",");
    let server = MessageServer::start();
    let monitor = Monitor::start(&server, &endpoints);
    let mut first = Comet::start(None, &node_config(&endpoints));
    let first_key = first.etcd_key();
    assert!(wait_until(Duration::from_secs(10), || additions(
        &server, &first_key
    )
    .len()
        == 1));

    members[0].kill();
    let survivors = all[1..].to_vec();
    // The node keeps its lease alive through the other members for several TTLs.
    std::thread::sleep(Duration::from_secs(7));
    assert!(
        etcd::key(&survivors, &first_key).is_some(),
        "registration lost with one member down"
    );
    // The monitor still sees nodes come and go.
    let second = Comet::start(None, &node_config(&endpoints));
    let second_key = second.etcd_key();
    assert!(wait_until(Duration::from_secs(10), || additions(
        &server,
        &second_key
    )
    .len()
        == 1));
    first.kill();
    assert!(wait_until(Duration::from_secs(10), || removals(
        &server, &first_key
    ) == 1));
    assert_eq!(
        additions(&server, &first_key).len(),
        1,
        "fail-over must not re-announce nodes"
    );
    // The monitor watched the killed member (the first listed): its watch resumed on
    // another member from the last revision seen instead of listing again.
    let log = monitor.log_text();
    assert!(log.contains("resuming"), "{log}");
    assert!(!log.contains("re-listing"), "{log}");
}

#[test]
fn overload_thresholds_flip_the_flag_and_the_503() {
    let etcd = Etcd::start();
    let endpoints = vec![etcd.endpoint()];
    let server = MessageServer::start();
    let _monitor = Monitor::start(&server, &etcd.endpoint());
    let extra = format!(
        "{}overload_soft_connections=3\noverload_hard_connections=5\nload_check_interval=100ms\n",
        node_config(&etcd.endpoint())
    );
    let comet = Comet::start(None, &extra);
    let key = comet.etcd_key();
    let overloaded = |flag: bool| {
        etcd::key(&endpoints, &key)
            .and_then(|e| serde_json::from_str::<Value>(&e.value).ok())
            .is_some_and(|v| v["overloaded"] == json!(flag))
    };
    assert!(wait_until(Duration::from_secs(5), || overloaded(false)));

    let mut clients: Vec<_> = (0..3)
        .map(|i| comet.connect(&format!("o{i}"), "t", "").unwrap())
        .collect();
    assert!(
        wait_until(Duration::from_secs(5), || overloaded(true)),
        "soft threshold advertised"
    );
    assert!(
        wait_until(Duration::from_secs(5), || additions(&server, &key)
            .iter()
            .any(|v| v["overloaded"] == json!(true))),
        "the monitor forwards the PUT"
    );
    clients.extend((3..5).map(|i| comet.connect(&format!("o{i}"), "t", "").unwrap()));
    assert!(wait_until(Duration::from_secs(5), || {
        matches!(comet.connect("extra", "t", ""), Err(tungstenite::Error::Http(r)) if r.status() == 503
            && r.headers().contains_key("retry-after"))
    }));
    // Existing clients keep working.
    assert_eq!(
        comet.rpc().push(&["o0"], "still served", "")["result"],
        json!("ok")
    );
    assert_eq!(
        common::next_text(&mut clients[0]).as_deref(),
        Some("still served")
    );

    clients.truncate(2);
    assert!(
        wait_until(Duration::from_secs(5), || comet
            .connect("back", "t", "")
            .is_ok()),
        "hard state clears"
    );
    assert!(
        wait_until(Duration::from_secs(5), || overloaded(false)),
        "soft state clears"
    );
}
