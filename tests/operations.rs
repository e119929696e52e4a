//! Operations: graceful drain spread over a window, groups.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Comet, MessageServer, close_code, next_text, wait_until};
use serde_json::json;

fn connect_many(comet: &Comet, prefix: &str, n: usize) -> Vec<(String, Client)> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}{i}");
            (id.clone(), comet.connect(&id, "t", "").unwrap())
        })
        .collect()
}

#[test]
fn drain_spreads_closes_over_the_window_and_delivers_every_offline() {
    let server = MessageServer::start();
    let mut comet = Comet::start(Some(&server), "drain_window=2s");
    let clients = connect_many(&comet, "drain", 40);
    assert!(wait_until(Duration::from_secs(5), || server
        .calls_of("online")
        .len()
        == 40));
    let readers: Vec<_> = clients
        .into_iter()
        .map(|(_, mut client)| {
            client
                .get_mut()
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            std::thread::spawn(move || {
                let code = close_code(&mut client);
                (code, Instant::now())
            })
        })
        .collect();
    let signalled = Instant::now();
    let status = comet
        .terminate(Duration::from_secs(15))
        .expect("exits after the drain");
    assert!(status.success(), "{status:?}");
    let mut closes: Vec<Duration> = Vec::new();
    for reader in readers {
        let (code, at) = reader.join().unwrap();
        assert_eq!(code, Some(1001), "going away");
        closes.push(at.duration_since(signalled));
    }
    closes.sort();
    assert!(
        closes[0] < Duration::from_millis(600),
        "first close at {:?}",
        closes[0]
    );
    assert!(
        closes[39] > Duration::from_millis(1400),
        "last close at {:?}",
        closes[39]
    );
    assert!(
        closes[19] > Duration::from_millis(600),
        "closes are spread: median {:?}",
        closes[19]
    );
    assert_eq!(server.calls_of("offline").len(), 40);
}

#[test]
fn group_push_reaches_a_thousand_members_across_shards_once() {
    let comet = Comet::start(None, "comet_rpc_token=k");
    let mut rpc = comet.rpc();
    let mut members = connect_many(&comet, "g", 1000);
    let mut outsider = comet.connect("outsider", "t", "").unwrap();
    let node = rpc.call("Server.GetNode", json!({"token": "k"}));
    let per_shard = node["result"]["data"]["connections_per_shard"].clone();
    assert!(
        per_shard
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n.as_u64().unwrap() > 100),
        "{per_shard}"
    );

    let ids: Vec<String> = members.iter().map(|(id, _)| id.clone()).collect();
    let reply = rpc.call(
        "Server.JoinGroup",
        json!({"group": "room", "connections": ids, "token": "k"}),
    );
    assert_eq!(reply["result"]["code"], json!(20000), "{reply}");
    let reply = rpc.call(
        "Server.SendToGroup",
        json!({"group": "room", "msg": "to the room", "token": "k"}),
    );
    assert_eq!(reply["result"]["data"]["delivered"], json!(1000), "{reply}");
    for (id, client) in members.iter_mut() {
        assert_eq!(next_text(client).as_deref(), Some("to the room"), "{id}");
    }
    outsider
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert_eq!(next_text(&mut outsider), None, "non-members get nothing");

    // Leaving: explicitly, and by disconnecting (membership is cleaned with the session).
    let leavers = &ids[..10];
    let reply = rpc.call(
        "Server.LeaveGroup",
        json!({"group": "room", "connections": leavers, "token": "k"}),
    );
    assert_eq!(reply["result"]["code"], json!(20000), "{reply}");
    let (_, gone) = members.pop().unwrap();
    drop(gone);
    assert!(wait_until(Duration::from_secs(5), || {
        let online = comet.rpc().call(
            "Server.CheckConnectionsOnline",
            json!({"connections": ["g999"], "token": "k"}),
        );
        online["result"]["data"] == json!([])
    }));
    let reply = rpc.call(
        "Server.SendToGroup",
        json!({"group": "room", "msg": "second", "token": "k"}),
    );
    assert_eq!(reply["result"]["code"], json!(20000), "{reply}");
    assert_eq!(reply["result"]["data"]["delivered"], json!(989));
    for (i, (id, client)) in members.iter_mut().enumerate().skip(10) {
        assert_eq!(next_text(client).as_deref(), Some("second"), "{id} ({i})");
    }

    let reply = rpc.call(
        "Server.JoinGroup",
        json!({"group": "room", "connections": ["nobody"], "token": "k"}),
    );
    assert_eq!(reply["result"]["code"], json!(50001));
    assert_eq!(reply["result"]["data"]["not_found"], json!(["nobody"]));
    let reply = rpc.call(
        "Server.SendToGroup",
        json!({"group": "", "msg": "x", "token": "k"}),
    );
    assert_eq!(reply["result"]["code"], json!(40000));
}

/// Signs a token with the documented Python example signer.
fn python_token(secret: &str, conn_id: &str, ttl: i64, info: &str, now: Option<u64>) -> String {
    let signer = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/sign_token.py");
    let mut command = std::process::Command::new("python3");
    command.args([signer, secret, conn_id, &ttl.to_string(), info]);
    if let Some(now) = now {
        command.arg(now.to_string());
    }
    let output = command.output().expect("python3 runs the example signer");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[test]
fn signed_tokens_are_verified_locally_with_key_rotation() {
    const CURRENT: &str = "current-secret-0123456789";
    const PREVIOUS: &str = "previous-secret-0123456789";
    let server = MessageServer::start();
    let comet = Comet::start(
        Some(&server),
        &format!("token_secret={CURRENT}\ntoken_secret_previous={PREVIOUS}\ntoken_leeway=5s"),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();

    let valid = python_token(CURRENT, "alice", 60, "{\"vip\":true}", None);
    let _alice = comet
        .connect("alice", &valid, "unsigned info is ignored")
        .unwrap();
    let rotated = python_token(PREVIOUS, "bob", 60, "", None);
    let _bob = comet.connect("bob", &rotated, "plain").unwrap();
    assert!(wait_until(Duration::from_secs(5), || server
        .calls_of("online")
        .len()
        == 2));
    let alice_online = server
        .calls_of("online")
        .into_iter()
        .find(|c| c.arg(0) == "alice")
        .unwrap();
    assert_eq!(
        alice_online.arg(1),
        "{\"vip\":true}",
        "the signed info wins"
    );
    assert!(
        server.calls_of("checkToken").is_empty(),
        "no checkToken round trip"
    );

    let expired = python_token(CURRENT, "carol", -60, "", None);
    assert_eq!(
        common::refusal_status(comet.connect("carol", &expired, "")),
        401
    );
    let future = python_token(CURRENT, "dave", 60, "", Some(now + 3600));
    assert_eq!(
        common::refusal_status(comet.connect("dave", &future, "")),
        401
    );
    let mut tampered = python_token(CURRENT, "erin", 60, "", None).into_bytes();
    let at = tampered.iter().position(|b| *b == b'.').unwrap() + 5;
    tampered[at] = if tampered[at] == b'x' { b'y' } else { b'x' };
    let tampered = String::from_utf8(tampered).unwrap();
    assert_eq!(
        common::refusal_status(comet.connect("erin", &tampered, "")),
        401
    );
    let stolen = python_token(CURRENT, "alice", 60, "", None);
    assert_eq!(
        common::refusal_status(comet.connect("mallory", &stolen, "")),
        401
    );
    let foreign = python_token("some-other-secret-0123", "frank", 60, "", None);
    assert_eq!(
        common::refusal_status(comet.connect("frank", &foreign, "")),
        401
    );

    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        server.calls_of("online").len(),
        2,
        "no refused client came online"
    );
    // Log lines are written by the node's log thread, a moment after the event.
    let reasons = [
        "expired at",
        "issued in the future",
        "bad signature",
        "is for conn_id",
    ];
    wait_until(Duration::from_secs(5), || {
        let log = comet.log_text();
        reasons.iter().all(|reason| log.contains(reason))
    });
    let log = comet.log_text();
    for reason in reasons {
        assert!(log.contains(reason), "log names the reason {reason:?}");
    }
}

fn http_get(port: u16, path: &str, bearer: Option<&str>) -> (u16, String) {
    let mut request = ureq::get(&format!("http://127.0.0.1:{port}{path}"));
    if let Some(token) = bearer {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    match request.call() {
        Ok(response) => (response.status(), response.into_string().unwrap()),
        Err(ureq::Error::Status(code, response)) => (code, response.into_string().unwrap()),
        Err(err) => panic!("admin listener unreachable: {err}"),
    }
}

/// The value of a metric line (`name{labels} value`), summed over every label set.
fn metric(text: &str, name: &str, label_filter: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(label_filter))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[test]
fn admin_listener_serves_health_status_and_metrics_that_move() {
    let server = MessageServer::start();
    server.refuse_token("bad");
    let admin = common::free_port();
    let comet = Comet::start(
        Some(&server),
        &format!(
            "admin_addr=127.0.0.1:{admin}\nadmin_token=sekrit\noverload_hard_connections=3\nload_check_interval=50ms"
        ),
    );
    assert_eq!(http_get(admin, "/healthz", None), (200, "ok\n".into()));
    assert_eq!(http_get(admin, "/readyz", None).0, 200);
    assert_eq!(http_get(admin, "/metrics", None).0, 401, "token required");
    assert_eq!(http_get(admin, "/metrics?token=wrong", None).0, 401);

    let (_, before) = http_get(admin, "/metrics", Some("sekrit"));
    assert_eq!(metric(&before, "comet_connections", ""), 0.0);
    assert_eq!(metric(&before, "comet_push_calls_total", ""), 0.0);

    let mut client = comet.connect("m1", "good", "").unwrap();
    assert_eq!(common::refusal_status(comet.connect("m2", "bad", "")), 401);
    let reply = comet.rpc().push(&["m1", "ghost"], "hello", "");
    assert!(
        reply["error"].as_str().unwrap().contains("ghost"),
        "{reply}"
    );
    assert_eq!(next_text(&mut client).as_deref(), Some("hello"));
    assert!(wait_until(Duration::from_secs(5), || server
        .calls_of("online")
        .len()
        == 1));

    let (status, after) = http_get(admin, "/metrics?token=sekrit", None);
    assert_eq!(status, 200);
    assert_eq!(
        metric(&after, "comet_connections", "transport=\"websocket\""),
        1.0
    );
    assert_eq!(metric(&after, "comet_push_calls_total", ""), 1.0);
    assert_eq!(metric(&after, "comet_deliveries_total", ""), 1.0);
    assert_eq!(metric(&after, "comet_push_not_on_node_total", ""), 1.0);
    assert_eq!(
        metric(&after, "comet_handshake_refusals_total", "reason=\"token\""),
        1.0
    );
    assert!(
        metric(&after, "comet_callbacks_total", "") >= 3.0,
        "checkToken x2 + online"
    );
    assert!(
        metric(
            &after,
            "comet_callback_latency_seconds_bucket",
            "le=\"+Inf\""
        ) >= 3.0
    );
    assert_eq!(metric(&after, "comet_overloaded", ""), 0.0);

    let (status, body) = http_get(admin, "/status", Some("sekrit"));
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["pushes"]["calls"], serde_json::json!(1));
    assert_eq!(json["node"]["connections"], serde_json::json!(1));

    // Past the hard threshold the node is not ready.
    let _more: Vec<_> = (0..2)
        .map(|i| comet.connect(&format!("x{i}"), "good", "").unwrap())
        .collect();
    assert!(wait_until(Duration::from_secs(5), || http_get(
        admin, "/readyz", None
    )
    .0 == 503));
    let (_, overloaded) = http_get(admin, "/metrics", Some("sekrit"));
    assert_eq!(metric(&overloaded, "comet_refusing_new_clients", ""), 1.0);
}

#[test]
fn tuning_check_reads_the_machine_and_changes_nothing() {
    let watched = [
        "fs/nr_open",
        "net/core/somaxconn",
        "net/ipv4/tcp_mem",
        "net/ipv4/tcp_rmem",
    ];
    let read = || -> Vec<String> {
        watched
            .iter()
            .map(|p| std::fs::read_to_string(format!("/proc/sys/{p}")).unwrap_or_default())
            .collect()
    };
    let before = read();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning/check.sh");
    let output = std::process::Command::new("bash")
        .args([script, "--target", "5000000"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("connections here, limited by"), "{text}");
    assert!(
        text.contains("fs.nr_open") && text.contains("net.core.somaxconn"),
        "{text}"
    );
    assert!(
        text.contains("To reach 5000000, change:"),
        "five million is out of reach here: {text}"
    );
    assert_eq!(read(), before, "the check changed kernel settings");
}

#[test]
fn systemd_is_told_when_the_node_is_ready() {
    let dir = common::temp_dir("notify");
    let path = dir.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let comet = Comet::start_with_env(None, "", &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).unwrap();
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert_eq!(message, format!("READY=1\nMAINPID={}", comet.pid()));
}
