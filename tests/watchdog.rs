//! The systemd watchdog against the real binary: a test stands in for systemd's notify
//! socket (`NOTIFY_SOCKET`, `WATCHDOG_USEC`) and reads what the node sends.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::Comet;

/// Every datagram that arrives within `window`.
fn datagrams_within(socket: &UnixDatagram, window: Duration) -> Vec<String> {
    let deadline = Instant::now() + window;
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => seen.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    seen
}

fn pings(datagrams: &[String]) -> usize {
    datagrams
        .iter()
        .filter(|d| d.as_str() == "WATCHDOG=1")
        .count()
}

/// `WatchdogSec=` of 0.6 s (a ping every 0.3 s): pings flow while both shards answer,
/// and stop within a probe period once one shard is stuck, so systemd would restart the
/// node, and the node says why in its log.
#[test]
fn watchdog_pings_only_while_every_shard_answers() {
    let dir = common::temp_dir("watchdog");
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let mut comet = Comet::start_with_env(
        None,
        "handshake_timeout=30s",
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "600000"),
            ("COMET_FAULT_STALL_REGISTER", "stuck"),
        ],
    );
    let healthy = datagrams_within(&socket, Duration::from_secs(3));
    assert!(
        healthy.iter().any(|d| d.starts_with("READY=1")),
        "{healthy:?}"
    );
    // 3 s at one ping per 0.3 s is 10; a busy machine may delay a few.
    assert!(pings(&healthy) >= 4, "{healthy:?}");

    let ws_url = comet.ws_url("stuck", "t", "");
    let ws_port = comet.ws_port;
    // The handshake never completes: the shard stalls while registering it.
    std::thread::spawn(move || {
        let _ = common::connect_url(&ws_url, ws_port);
    });
    assert!(
        common::wait_until(Duration::from_secs(10), || comet
            .log_text()
            .contains("watchdog pings withheld")),
        "{}",
        comet.log_text()
    );
    // Allow one ping already on its way when the shard stalled.
    let stuck = datagrams_within(&socket, Duration::from_secs(2));
    assert!(
        pings(&stuck) <= 1,
        "pings went on with a stuck shard: {stuck:?}"
    );
    comet.kill();
    let _ = std::fs::remove_dir_all(dir);
}
