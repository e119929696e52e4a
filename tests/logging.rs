//! A log reader that stops reading (journald or a container log driver falling behind)
//! never stalls a shard: lines past the bounded queue are dropped and counted.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Comet, Rpc, connect_url, free_port, next_text, port_open, url_encode, wait_until};
use serde_json::json;

/// Kills the node if the test fails before stopping it.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        common::signal(self.0, "KILL");
    }
}

#[test]
fn a_log_pipe_nobody_reads_never_stalls_handshakes_or_pushes() {
    let (ws_port, rpc_port, admin_port) = (free_port(), free_port(), free_port());
    let dir = common::temp_dir("stalled-log");
    let config = dir.join("comet.ini");
    std::fs::write(
        &config,
        format!(
            "max_proc=2\nwebsocket_port=:{ws_port}\nrpc_addr=127.0.0.1:{rpc_port}\n\
             admin_addr=127.0.0.1:{admin_port}\ndrain_window=0\nlog_queue_bytes=65536\n"
        ),
    )
    .unwrap();
    // stderr is a pipe this test never reads: after its 64 KiB, every write would block.
    let mut child = Command::new(common::comet_binary())
        .arg("-c")
        .arg(&config)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(child.id());
    assert!(wait_until(Duration::from_secs(10), || port_open(ws_port)
        && port_open(rpc_port)));
    let url = |id: &str| {
        let t = json!({"conn_id": id, "token": "t", "info": "x".repeat(200)}).to_string();
        format!("ws://127.0.0.1:{ws_port}/ws?t={}", url_encode(&t))
    };
    // Each connect and disconnect logs a few debug lines: 600 churned clients are far
    // more than the pipe holds.
    for i in 0..600 {
        let mut client = connect_url(&url(&format!("churn{i}")), ws_port).expect("connects");
        let _ = client.close(None);
    }
    let started = Instant::now();
    let mut clients: Vec<_> = (0..10)
        .map(|i| connect_url(&url(&format!("c{i}")), ws_port).expect("connects"))
        .collect();
    let ids: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut rpc = Rpc::connect(rpc_port);
    let reply = rpc.push(&ids, "through", "");
    assert_eq!(reply["result"], json!("ok"), "{reply}");
    for client in &mut clients {
        assert_eq!(next_text(client).as_deref(), Some("through"));
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "10 connects and a push took {took:?}"
    );
    let metrics = ureq::get(&format!("http://127.0.0.1:{admin_port}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("comet_log_lines_dropped_total "))
        .expect("the counter is exported")
        .parse()
        .unwrap();
    assert!(dropped > 0, "lines were dropped, and counted");
    // The reader comes back: the writer says how many it dropped, and the node stops.
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    drop(clients);
    common::signal(child.id(), "TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let text = reader.join().unwrap();
    assert!(text.contains("log lines dropped"), "the drop is reported");
    let _ = std::fs::remove_dir_all(dir);
}

/// `log_format=json`: every line is one JSON object with the level, target and message
/// at the top level, and a conn_id with control characters stays one line.
#[test]
fn json_log_lines_are_one_object_each() {
    let comet = Comet::start(None, "log_format=json\nlog_summary_interval=1s");
    let _client = comet.connect("j\u{1b}[31m\nforged", "t", "").unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || comet
            .log_text()
            .contains("summary")),
        "{}",
        comet.log_text()
    );
    let text = comet.log_text();
    let mut levels = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line:?}"));
        assert!(event["timestamp"].is_string(), "{line}");
        assert!(
            event["target"].as_str().unwrap().starts_with("comet"),
            "{line}"
        );
        assert!(event["message"].is_string(), "{line}");
        levels.push(event["level"].as_str().unwrap().to_owned());
    }
    assert!(levels.iter().any(|l| l == "INFO"), "{text}");
    assert!(
        text.contains("forged"),
        "the client's online is logged: {text}"
    );
}

/// Per-client events are debug lines; at INFO the node writes one summary per interval.
#[test]
fn info_logs_a_summary_per_interval_not_a_line_per_client() {
    let comet = Comet::start(None, "log_summary_interval=1s\nlog_level=info");
    let _clients: Vec<_> = (0..3)
        .map(|i| comet.connect(&format!("s{i}"), "t", "").unwrap())
        .collect();
    assert!(
        wait_until(Duration::from_secs(5), || comet
            .log_text()
            .lines()
            .any(|l| l.contains("summary") && l.contains("connections=3"))),
        "{}",
        comet.log_text()
    );
    let summary = comet
        .log_text()
        .lines()
        .find(|l| l.contains("summary") && l.contains("connections=3"))
        .unwrap()
        .to_owned();
    assert!(summary.contains(" INFO "), "{summary}");
}
