//! Hostile and faulty peers against the real binary: push RPC connections that hoard
//! memory, go silent, flood the listener or feed a huge request a little at a time; and
//! a message server that is slow, answers huge bodies, or whose URL holds credentials.
//! Each test states its bound and asserts it, with its own timing configuration (they
//! must pass on a busy 2-core machine), and ends with a clean SIGTERM exit.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Comet, MessageServer, wait_until};
use serde_json::json;

fn rpc_stream(comet: &Comet) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", comet.rpc_port)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Reads until EOF or reset; `Some(elapsed)` when that happened within `limit`.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut sink = [0u8; 4096];
    loop {
        let left = limit.checked_sub(started.elapsed())?;
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match stream.read(&mut sink) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None;
            }
            Err(_) => return Some(started.elapsed()),
        }
    }
}

/// A WebSocket upgrade request carrying a token object.
fn upgrade_request(conn_id: &str, token: &str) -> String {
    let t = json!({"conn_id": conn_id, "token": token, "info": ""});
    common::clients::upgrade_request("/ws", &t, "")
}

/// Sends an upgrade request on a fresh socket.
fn send_upgrade(comet: &Comet, conn_id: &str, token: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", comet.ws_port)).unwrap();
    stream
        .write_all(upgrade_request(conn_id, token).as_bytes())
        .unwrap();
    stream
}

/// The HTTP response head and body (as much as arrives within `limit`).
fn read_response(stream: &mut TcpStream, limit: Duration) -> String {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
        }
        let text = String::from_utf8_lossy(&bytes);
        if text.starts_with("HTTP/1.1 101") && text.contains("\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Resident memory once the node has settled: its threads and allocator arenas grow it
/// by ~40 MB in the first second (debug build), which is not what the tests measure.
fn settled_rss_kib(comet: &Comet) -> u64 {
    let mut last = comet.rss_kib();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(250));
        let now = comet.rss_kib();
        if now.abs_diff(last) < 256 {
            return now;
        }
        last = now;
    }
    last
}

fn exits_cleanly(mut comet: Comet) {
    let status = comet.terminate(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM exit: {status:?}\n{}",
        comet.log_text()
    );
}

/// 40 connections that never authenticate each try to send 1 MB with no newline: each is
/// cut at its 64 KiB allowance plus what the 1 MiB pre-auth pool lends, so together they
/// hold at most 40 x 256 KiB + 1 MiB + 12 MiB of allocator slack, 23 MiB (the old node
/// held all 40 MB, in buffers doubled to 2 MB each). Silent ones
/// are closed by the 6 s first-call timeout. A legitimate 200 KiB first call still passes
/// on the pool.
#[test]
fn unauthenticated_connections_hold_at_most_their_allowance_and_time_out() {
    const HOARDERS: usize = 40;
    let comet = Comet::start(
        None,
        "comet_rpc_token=right-token\nrpc_preauth_request_size=65536\n\
         rpc_preauth_pool_size=1048576\nrpc_first_call_timeout=6s\n",
    );
    let mut warm = comet.rpc();
    let reply = warm.call("Server.GetNode", json!({"token": "right-token"}));
    assert_eq!(reply["result"]["code"], json!(20000), "{reply}");
    drop(warm);
    let baseline = settled_rss_kib(&comet);
    let started = Instant::now();
    let mut hoarders: Vec<TcpStream> = (0..HOARDERS)
        .map(|_| {
            let mut stream = rpc_stream(&comet);
            stream
                .set_write_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let _ = stream.write_all(br#"{"method":"Server.Status","params":[{"pad":""#);
            let pad = vec![b'x'; 64 * 1024];
            for _ in 0..16 {
                if stream.write_all(&pad).is_err() {
                    break;
                }
            }
            stream
        })
        .collect();
    let mut silent: Vec<TcpStream> = (0..5)
        .map(|_| {
            let mut stream = rpc_stream(&comet);
            stream.write_all(br#"{"method":"Server.Status","#).unwrap();
            stream
        })
        .collect();
    // The peak while the node reads what they sent (the old node took seconds to).
    let mut peak = comet.rss_kib();
    while started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(comet.rss_kib());
    }
    let grown = peak.saturating_sub(baseline);
    // Each: 64 KiB allowance + a 16 KiB read + the buffer's doubling; then the 1 MiB pool;
    // then 12 MiB for the allocator and transparent huge pages (RSS moves in 2 MiB steps).
    let bound = (HOARDERS as u64 * 256) + 1024 + 12 * 1024;
    println!("{HOARDERS} hoarders of 1 MB: peak RSS +{grown} KiB (bound {bound} KiB)");
    assert!(grown <= bound, "RSS grew {grown} KiB, bound {bound} KiB");

    // Every one of them is closed by the first-call timeout at the latest.
    for stream in hoarders.iter_mut().chain(silent.iter_mut()) {
        let limit = Duration::from_secs(12).saturating_sub(started.elapsed());
        assert!(
            closed_within(stream, limit).is_some(),
            "an unauthenticated connection outlived rpc_first_call_timeout=6s"
        );
    }
    let silent_closed_after = started.elapsed();
    assert!(
        silent_closed_after >= Duration::from_millis(5500),
        "silent ones closed by the timeout, not before ({silent_closed_after:?})"
    );

    // A first call above the allowance with the right token draws on the pool.
    let mut rpc = comet.rpc();
    let big = "b".repeat(200 * 1024);
    let reply = rpc.push(&["nobody"], &big, "right-token");
    let error: serde_json::Value = serde_json::from_str(reply["error"].as_str().unwrap()).unwrap();
    assert_eq!(error["ids"], json!(["nobody"]), "{error}");
    let reply = rpc.call("Server.GetNode", json!({"token": "right-token"}));
    assert_eq!(reply["result"]["code"], json!(20000), "{reply}");
    exits_cleanly(comet);
}

/// At most 4 connections at once: a 5th to 14th are closed at once after accept, and
/// logged once (not once each). Idle authenticated connections are closed after 2 s,
/// which frees their slots.
#[test]
fn the_connection_cap_holds_and_idle_connections_are_closed() {
    let comet = Comet::start(None, "rpc_max_connections=4\nrpc_idle_timeout=2s\n");
    // The start-up probe's connection may still be counted for a moment.
    std::thread::sleep(Duration::from_millis(200));
    let mut held: Vec<common::Rpc> = (0..4).map(|_| comet.rpc()).collect();
    for rpc in &mut held {
        let reply = rpc.call("Server.GetNode", json!({}));
        assert_eq!(reply["result"]["code"], json!(20000), "{reply}");
    }
    let idle_since = Instant::now();
    for _ in 0..10 {
        let mut extra = rpc_stream(&comet);
        let _ = extra.write_all(b"{\"method\":\"Server.GetNode\",\"params\":[{}],\"id\":1}\n");
        let closed = closed_within(&mut extra, Duration::from_secs(2));
        assert!(closed.is_some(), "a connection over the cap was served");
    }
    // Log lines are written by the node's log thread, a moment after the event.
    wait_until(Duration::from_secs(5), || {
        comet.log_text().contains("over rpc_max_connections")
    });
    let log = comet.log_text();
    let warnings = log.matches("over rpc_max_connections").count();
    assert_eq!(
        warnings, 1,
        "one warning per 10 s, not per connection:\n{log}"
    );
    assert!(log.contains("refused=1"), "{log}");

    // Left idle, the held ones are closed after rpc_idle_timeout; then a newcomer is served.
    assert!(
        wait_until(Duration::from_secs(8), || {
            let fresh = rpc_stream(&comet);
            fresh
                .set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            common::Rpc::from_stream(fresh)
                .try_call("Server.GetNode", json!({}))
                .is_some()
        }),
        "slots freed by the idle timeout"
    );
    let waited = idle_since.elapsed();
    assert!(
        waited >= Duration::from_millis(1800),
        "idle connections closed after rpc_idle_timeout=2s, not before ({waited:?})"
    );
    drop(held);
    exits_cleanly(comet);
}

/// Connect-to-101 latencies. A refused connect counts as a handshake_timeout stall (the
/// claim it waited for on the control thread timed out, which reads as a duplicate).
fn connect_latency(comet: &Comet, tag: &str, samples: usize) -> Vec<Duration> {
    (0..samples)
        .map(|i| {
            let started = Instant::now();
            match comet.connect(&format!("{tag}-{i}"), "t", "") {
                Ok(client) => {
                    let took = started.elapsed();
                    drop(client);
                    took
                }
                Err(err) => {
                    println!("{tag}-{i} refused after {:?}: {err}", started.elapsed());
                    Duration::from_secs(5)
                }
            }
        })
        .collect()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// A 4.5 MB call (350,000 recipients) fed 4 KiB at a time: framing is linear (the old
/// decoder re-parsed the buffered request on each of ~1,100 reads), the parse and the
/// reply's encoding run off the control thread and the fan-out is sliced, so handshakes,
/// which wait for their conn_id claim on that thread, stay fast while it runs: connect
/// p50 within 10x (+250 ms) of a quiet node's, and none over 2.5 s.
#[test]
fn a_chunk_fed_huge_request_costs_linear_time_and_handshakes_stay_fast() {
    const RECIPIENTS: usize = 350_000;
    let comet = Comet::start(None, "rpc_first_call_timeout=30s\n");
    let quiet = median(connect_latency(&comet, "quiet", 15));

    let ids: Vec<String> = (0..RECIPIENTS).map(|i| format!("id-{i:07}")).collect();
    let request = json!({"method": "Server.SendToConnections",
        "params": [{"connections": ids, "msg": "m", "token": ""}], "id": 7});
    let mut bytes = serde_json::to_vec(&request).unwrap();
    bytes.push(b'\n');
    let size = bytes.len();
    let ticks_before = comet.cpu_ticks();
    let rpc_port = comet.rpc_port;
    let feeder = std::thread::spawn(move || {
        let stream = TcpStream::connect(("127.0.0.1", rpc_port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut rpc = common::Rpc::from_stream(stream.try_clone().unwrap());
        assert_eq!(
            rpc.call("Server.GetNode", json!({}))["result"]["code"],
            20000
        );
        let started = Instant::now();
        let mut writer = stream;
        for chunk in bytes.chunks(4096) {
            writer.write_all(chunk).unwrap();
        }
        let reply = rpc.read_reply();
        (started.elapsed(), reply)
    });
    let mut busy = Vec::new();
    while !feeder.is_finished() {
        busy.extend(connect_latency(&comet, &format!("busy{}", busy.len()), 1));
    }
    let (took, reply) = feeder.join().unwrap();
    let cpu = Duration::from_millis((comet.cpu_ticks() - ticks_before) * 10);
    assert_eq!(reply["id"], json!(7));
    let error: serde_json::Value = serde_json::from_str(reply["error"].as_str().unwrap()).unwrap();
    assert_eq!(error["ids"].as_array().unwrap().len(), RECIPIENTS);
    let busy_samples = busy.len();
    let busy_median = median(busy.clone());
    let busy_max = busy.iter().max().copied().unwrap_or_default();
    println!(
        "{size} bytes in 4 KiB writes: answered in {took:?}, node CPU {cpu:?}; connect p50 \
         {quiet:?} quiet, {busy_median:?} during ({busy_samples} samples, max {busy_max:?})"
    );
    // Linear: a debug build frames, parses and fans out 4 MB in a few CPU-seconds; the
    // quadratic decoder needed ~2 GB of re-parsing for this.
    assert!(
        cpu < Duration::from_secs(20),
        "node CPU {cpu:?} for one call"
    );
    assert!(took < Duration::from_secs(30), "answered in {took:?}");
    let allowed = quiet * 10 + Duration::from_millis(250);
    assert!(
        busy_median <= allowed,
        "connect p50 {busy_median:?} during the call, {quiet:?} quiet (allowed {allowed:?})"
    );
    // The push is fanned out in slices: no handshake waits for all of it (in one piece,
    // claims waited > 5 s and timed out; sliced, the worst seen was 0.15 s on an idle
    // machine, 0.73 s with two test binaries and a build beside it). Half the 5 s
    // handshake_timeout a claim may wait.
    assert!(
        busy_max < Duration::from_millis(2500),
        "a handshake waited {busy_max:?} during the call"
    );
    exits_cleanly(comet);
}

/// A slow message server (1.5 s per checkToken), one callback thread and a queue of 3
/// per shard (2 shards): of 24 live handshakes at once at most 6 get a place, the others
/// get 503 + Retry-After at once; once they hang up, the queued jobs of the gone clients
/// are dropped, so at most 6 checkToken calls are made (the old node made 24).
#[test]
fn a_full_check_token_queue_answers_503_at_once() {
    const HANDSHAKES: usize = 24;
    let server = MessageServer::start();
    server.stall("checkToken", Duration::from_millis(1500));
    let comet = Comet::start(
        Some(&server),
        "callback_threads=1\ncallback_queue_size=3\nhandshake_timeout=10s\n",
    );
    let answers: Vec<_> = (0..HANDSHAKES)
        .map(|i| {
            let mut stream = send_upgrade(&comet, &format!("q{i}"), "t");
            std::thread::spawn(move || {
                let started = Instant::now();
                let response = read_response(&mut stream, Duration::from_secs(1));
                (response, started.elapsed())
            })
        })
        .collect();
    let answers: Vec<(String, Duration)> = answers.into_iter().map(|t| t.join().unwrap()).collect();
    let refused: Vec<_> = answers
        .iter()
        .filter(|(r, _)| r.starts_with("HTTP/1.1 503"))
        .collect();
    assert!(
        refused.len() >= HANDSHAKES - 6,
        "{} of {HANDSHAKES} refused: {answers:?}",
        refused.len()
    );
    for (response, took) in &refused {
        assert!(response.contains("Retry-After: 1\r\n"), "{response}");
        assert!(*took < Duration::from_secs(1), "503 after {took:?}");
    }
    // Their sockets are closed now (the threads dropped them).
    std::thread::sleep(Duration::from_millis(4000));
    let calls = server.calls_of("checkToken").len();
    assert!(
        (1..=6).contains(&calls),
        "{calls} checkToken calls for a queue of 2 x 3"
    );
    exits_cleanly(comet);
}

/// 80 handshakes that hang up right after their request, behind a 1 s message server:
/// their queued checkToken jobs are dropped when a callback thread reaches them, so a
/// legitimate client connecting next waits about one call, not 80 / 4 of them, and the
/// message server sees at most the calls already running.
#[test]
fn check_token_jobs_of_gone_clients_are_dropped() {
    const GONE: usize = 80;
    let server = MessageServer::start();
    server.stall("checkToken", Duration::from_secs(1));
    let comet = Comet::start(
        Some(&server),
        "callback_threads=2\ncallback_queue_size=256\nhandshake_timeout=10s\n",
    );
    for i in 0..GONE {
        drop(send_upgrade(&comet, &format!("gone{i}"), "t"));
    }
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let client = comet.connect("legit", "t", "");
    let waited = started.elapsed();
    assert!(client.is_ok(), "legit client: {client:?}");
    println!("legit client upgraded after {waited:?} behind {GONE} gone handshakes");
    assert!(
        waited < Duration::from_millis(3500),
        "legit client waited {waited:?}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let gone_calls = server
        .calls_of("checkToken")
        .iter()
        .filter(|c| c.arg(0).starts_with("gone"))
        .count();
    // 2 shards x 2 threads were busy with the first ones; a few more may have been
    // taken before their client's FIN arrived.
    assert!(
        gone_calls <= 8,
        "{gone_calls} checkToken calls for {GONE} gone clients"
    );
    drop(client);
    exits_cleanly(comet);
}

/// checkToken answered with a 200 MB body: read no further than 64 KiB, the call fails
/// (503), and the node's memory does not grow with the body (it grew +400 MB for a
/// 400 MB answer before).
#[test]
fn a_huge_callback_answer_is_refused_without_rss_growth() {
    let server = MessageServer::start();
    let comet = Comet::start(Some(&server), "callback_timeout=5s\ncallback_threads=1\n");
    // Warm: the callback threads and their allocator heaps exist before the baseline.
    for i in 0..6 {
        drop(comet.connect(&format!("warm{i}"), "t", "").unwrap());
    }
    let baseline = settled_rss_kib(&comet);
    server.answer_huge("checkToken", 200 << 20);
    for i in 0..3 {
        let mut stream = send_upgrade(&comet, &format!("h{i}"), "t");
        let response = read_response(&mut stream, Duration::from_secs(8));
        assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    }
    let grown = comet.rss_kib().saturating_sub(baseline);
    println!("3 checkToken answers of 200 MB: RSS +{grown} KiB");
    // 16 MiB: allocator and huge-page slack; one answer read whole would be 200 MB.
    assert!(grown < 16 * 1024, "RSS grew {grown} KiB");
    assert!(
        wait_until(Duration::from_secs(5), || comet
            .log_text()
            .contains("answer larger than 65536 bytes")),
        "the log says why"
    );
    exits_cleanly(comet);
}

/// The client is told fixed texts; the callback URL's credentials and query key, and the
/// message server's answer, stay out of what it gets. The log names the URL without them,
/// and a conn_id with a newline cannot forge a log line.
#[test]
fn refusals_carry_no_url_credentials_or_message_server_text() {
    let server = MessageServer::start();
    server.refuse_token("bad");
    let url = server
        .url()
        .replace("http://", "http://callback-user:s3cret-pass@")
        + "?key=s3cret-key";
    let comet = Comet::start(Some(&server), &format!("rpc_api_url={url}\n"));

    let mut stream = send_upgrade(&comet, "evil\nFORGED log line", "bad");
    let refused = read_response(&mut stream, Duration::from_secs(5));
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    assert!(refused.ends_with("\r\n\r\ntoken refused\n"), "{refused}");
    assert!(!refused.contains("token invalid"), "{refused}");

    server.die();
    let mut stream = send_upgrade(&comet, "c1", "t");
    let unavailable = read_response(&mut stream, Duration::from_secs(8));
    assert!(unavailable.starts_with("HTTP/1.1 503"), "{unavailable}");
    assert!(unavailable.contains("Retry-After: 1\r\n"), "{unavailable}");
    for secret in ["s3cret", "callback-user", "key=", "127.0.0.1", "http://"] {
        let body = unavailable.split("\r\n\r\n").nth(1).unwrap_or("");
        assert!(!body.contains(secret), "{secret:?} in {unavailable:?}");
    }

    let redacted = server.url();
    // Log lines are written by the node's log thread, a moment after the event.
    wait_until(Duration::from_secs(5), || {
        comet.log_text().contains(&redacted)
    });
    let log = comet.log_text();
    assert!(log.contains(&redacted), "the log names {redacted}:\n{log}");
    assert!(!log.contains("s3cret"), "credentials in the log:\n{log}");
    assert!(
        !log.lines().any(|line| line.starts_with("FORGED")),
        "a conn_id forged a log line:\n{log}"
    );
    assert!(
        log.contains(r#"evil\nFORGED"#),
        "the conn_id is logged escaped"
    );
    exits_cleanly(comet);
}

/// 800 `GetAllConnections` pipelined in one write, on a node of 400 clients with 250-byte
/// conn_ids (each reply ~100 KB, 82 MB in all): the listing calls are answered one at a
/// time and written out every 256 KiB, so the node's peak RSS grows by a few MiB, not by
/// every reply at once (an attacker's review: +391 MiB for 1,110 such calls at 2,000
/// clients, the first reply after 1.09 s).
#[test]
fn pipelined_listings_are_written_as_they_are_answered_not_held_together() {
    let comet = Comet::start(None, "");
    let clients: Vec<_> = (0..400)
        .map(|i| comet.connect(&format!("{i:0>250}"), "t", "").unwrap())
        .collect();
    let before = comet.peak_rss_kib();
    let mut stream = rpc_stream(&comet);
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let calls: String = (0..800)
        .map(|id| {
            format!(
                "{}\n",
                json!({"method": "Server.GetAllConnections", "params": [{"token": ""}], "id": id})
            )
        })
        .collect();
    let started = Instant::now();
    stream.write_all(calls.as_bytes()).unwrap();
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    let mut first = None;
    for id in 0..800 {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(reply["id"], json!(id));
        assert_eq!(reply["result"]["data"].as_array().map(Vec::len), Some(400));
        first.get_or_insert(started.elapsed());
    }
    let grown = comet.peak_rss_kib().saturating_sub(before);
    println!(
        "800 pipelined listings of 400 ids: peak RSS +{grown} KiB, first reply after {:?}, all after {:?}",
        first.unwrap(),
        started.elapsed()
    );
    assert!(grown < 32 * 1024, "peak RSS grew by {grown} KiB");
    drop(clients);
    exits_cleanly(comet);
}
