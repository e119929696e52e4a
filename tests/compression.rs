//! permessage-deflate end to end against the real binary, with a hand-written client
//! that counts the bytes on the wire: negotiated only when `websocket_compression=on`,
//! a 2 KB JSON push arrives compressed (RSV1) and inflates to the message, one push to
//! many clients is the same compressed frame for all, small messages go plain, and the
//! client's own compressed messages are inflated with a bound (bomb: 1009) and RSV1 on a
//! control frame is 1002. Headless Chromium, through a relay that counts the bytes the
//! node sends it, shows a 2 KB push intact in fewer bytes than the message itself; so do
//! Python `websockets` and Node `ws` with their defaults (installed under
//! `target/ws-clients/` on first use, as `redis_clients.rs` does), and their own
//! compressed messages are taken. Idle clients that negotiated compression cost what
//! uncompressed ones do (no deflate context per connection).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::browser::{Browser, evaluate, poll_page};
use common::clients::{masked_frame, plain, upgrade_request};
use common::{Comet, MessageServer, wait_until};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::json;

const OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";

/// Upgrades with the deflate offer; returns the socket and the 101's head.
fn upgrade(comet: &Comet, conn_id: &str) -> (TcpStream, String) {
    let mut stream = plain(comet.ws_port);
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = upgrade_request("/ws", &json!({"conn_id": conn_id, "token": "t"}), OFFER);
    stream.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).unwrap(),
            1,
            "closed during the upgrade"
        );
        head.push(byte[0]);
    }
    (stream, String::from_utf8(head).unwrap())
}

/// One server frame: (first byte, payload).
fn read_frame(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).unwrap();
    let len = match head[1] & 0x7f {
        126 => {
            let mut ext = [0u8; 2];
            stream.read_exact(&mut ext).unwrap();
            u16::from_be_bytes(ext) as usize
        }
        127 => {
            let mut ext = [0u8; 8];
            stream.read_exact(&mut ext).unwrap();
            u64::from_be_bytes(ext) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).unwrap();
    (head[0], payload)
}

fn inflate(compressed: &[u8]) -> Vec<u8> {
    let mut input = compressed.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    Decompress::new(false)
        .decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    out
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    Compress::new(Compression::new(6), false)
        .compress_vec(data, &mut out, FlushCompress::Sync)
        .unwrap();
    out.truncate(out.len() - 4);
    out
}

/// A 2 KB JSON message like a typical push.
fn json_push() -> String {
    let items: Vec<_> = (0..52)
        .map(|i| json!({"symbol": format!("SYM{i}"), "bid": 100 + i, "ask": 101 + i}))
        .collect();
    let text = json!({"type": "prices", "items": items}).to_string();
    assert!(text.len() > 1900, "{}", text.len());
    text
}

fn start(extra: &str) -> Comet {
    Comet::start(
        None,
        &format!("ping_interval=30s\nheartbeat_timeout=60s\nmax_frame_size=65536\n{extra}"),
    )
}

#[test]
fn off_by_default_the_offer_is_not_answered() {
    let comet = start("");
    let (mut stream, head) = upgrade(&comet, "plain");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(!head.contains("Sec-WebSocket-Extensions"), "{head}");
    let message = json_push();
    let mut rpc = comet.rpc();
    rpc.push(&["plain"], &message, "");
    let (first, payload) = read_frame(&mut stream);
    assert_eq!(first, 0x81, "no RSV1");
    assert_eq!(payload, message.as_bytes());
    // RSV1 without negotiation is a protocol error.
    stream.write_all(&masked_frame(0xC1, b"x")).unwrap();
    let (first, payload) = read_frame(&mut stream);
    assert_eq!(first, 0x88);
    assert_eq!(&payload[..2], &1002u16.to_be_bytes());
}

#[test]
fn pushes_arrive_compressed_once_for_all_and_intact() {
    let comet = start("websocket_compression=on");
    let mut clients: Vec<TcpStream> = (0..5)
        .map(|i| {
            let (stream, head) = upgrade(&comet, &format!("c{i}"));
            assert!(
                head.contains(
                    "\r\nSec-WebSocket-Extensions: permessage-deflate; \
                     server_no_context_takeover; client_no_context_takeover\r\n"
                ),
                "{head}"
            );
            stream
        })
        .collect();
    let message = json_push();
    let mut rpc = comet.rpc();
    let ids: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    rpc.push(&ids, &message, "");
    let mut frames = Vec::new();
    for stream in &mut clients {
        let (first, payload) = read_frame(stream);
        assert_eq!(first, 0xC1, "FIN + RSV1 + Text");
        assert_eq!(inflate(&payload), message.as_bytes());
        frames.push(payload);
    }
    // Wire bytes: the compressed frame against the message.
    let wire = frames[0].len();
    println!(
        "2 KB JSON push: {} bytes of payload, {wire} on the wire compressed ({:.1}x)",
        message.len(),
        message.len() as f64 / wire as f64
    );
    assert!(wire * 3 < message.len(), "{wire} of {}", message.len());
    assert!(
        frames.iter().all(|f| f == &frames[0]),
        "one compressed frame for all"
    );
    // Under websocket_compression_min_size: plain.
    rpc.push(&["c0"], "{\"small\":true}", "");
    let (first, payload) = read_frame(&mut clients[0]);
    assert_eq!(first, 0x81);
    assert_eq!(payload, b"{\"small\":true}");
}

#[test]
fn client_messages_inflate_with_a_bound() {
    let comet = start("websocket_compression=on\nmax_frame_size=4096");
    // A compressed Text message within the bound, whole and in two fragments: the
    // connection stays (a ping after it is answered).
    let (mut stream, _) = upgrade(&comet, "talker");
    let text = deflate("hello ".repeat(500).as_bytes());
    stream.write_all(&masked_frame(0xC1, &text)).unwrap();
    let (head, tail) = text.split_at(text.len() / 2);
    stream.write_all(&masked_frame(0x41, head)).unwrap();
    stream.write_all(&masked_frame(0x80, tail)).unwrap();
    stream
        .write_all(&masked_frame(0x89, b"still here"))
        .unwrap();
    let (first, payload) = read_frame(&mut stream);
    assert_eq!((first, payload.as_slice()), (0x8A, &b"still here"[..]));
    // A bomb: 60 bytes that inflate to 1 MB. Closed with 1009 at the bound.
    let bomb = deflate(&vec![b'a'; 1 << 20]);
    assert!(bomb.len() < 2048, "{}", bomb.len());
    stream.write_all(&masked_frame(0xC1, &bomb)).unwrap();
    let (first, payload) = read_frame(&mut stream);
    assert_eq!(first, 0x88);
    assert_eq!(&payload[..2], &1009u16.to_be_bytes());
    // RSV1 on a control frame: 1002.
    let (mut stream, _) = upgrade(&comet, "pinger");
    stream.write_all(&masked_frame(0xC9, b"")).unwrap();
    let (first, payload) = read_frame(&mut stream);
    assert_eq!(first, 0x88);
    assert_eq!(&payload[..2], &1002u16.to_be_bytes());
    // Compressed bytes that inflate to invalid UTF-8 in a Text message: 1007.
    let (mut stream, _) = upgrade(&comet, "garbler");
    stream
        .write_all(&masked_frame(0xC1, &deflate(b"bad \xff text")))
        .unwrap();
    let (first, payload) = read_frame(&mut stream);
    assert_eq!(first, 0x88);
    assert_eq!(&payload[..2], &1007u16.to_be_bytes());
    assert!(wait_until(Duration::from_secs(5), || comet
        .log_text()
        .contains("closing client for a bad frame")));
}

/// A TCP relay in front of the node's port: returns its port and the count of bytes the
/// node has sent through it (the wire bytes a client receives).
fn counting_relay(target: u16) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let downstream = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&downstream);
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let node = TcpStream::connect(("127.0.0.1", target)).unwrap();
            let (mut client_in, mut node_out) =
                (client.try_clone().unwrap(), node.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut client_in, &mut node_out));
            let counted = Arc::clone(&counted);
            let (mut node_in, mut client_out) = (node, client);
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                while let Ok(n) = node_in.read(&mut buf) {
                    if n == 0 || client_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    counted.fetch_add(n, Ordering::Relaxed);
                }
            });
        }
    });
    (port, downstream)
}

#[test]
fn chromium_gets_compressed_pushes_intact_in_fewer_bytes() {
    let server = MessageServer::start();
    let node = Comet::start(Some(&server), "websocket_compression=on");
    let (relay, downstream) = counting_relay(node.ws_port);
    let page = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/browser/index.html");
    let url = format!(
        "file://{}?server=ws://127.0.0.1:{relay}/ws&conn_id=chromium-z&token=secret",
        page.display()
    );
    let browser = Browser::open(&url);
    assert!(
        wait_until(Duration::from_secs(20), || server
            .count("online", "chromium-z")
            == 1),
        "the page did not connect"
    );
    let mut devtools = browser.attach();
    let mut id = 0;
    let mut read = |expression: &str| evaluate(&mut devtools, &mut id, expression);
    assert!(poll_page(|| read(
        "document.getElementById('status').textContent"
    ) == "connected"));
    let before = downstream.load(Ordering::Relaxed);
    let message = json_push();
    let reply = node.rpc().push(&["chromium-z"], &message, "");
    assert_eq!(reply["result"], json!("ok"), "{reply}");
    let mut shown = String::new();
    poll_page(|| {
        shown = read("document.getElementById('messages').textContent");
        !shown.is_empty()
    });
    assert_eq!(shown, message, "the page shows the message intact");
    let wire = downstream.load(Ordering::Relaxed) - before;
    println!(
        "Chromium: a {}-byte push took {wire} bytes on the wire",
        message.len()
    );
    assert!(
        wire * 3 < message.len(),
        "{wire} bytes for {}",
        message.len()
    );
}

fn clients_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ws-clients")
}

/// Installs Node `ws` and Python `websockets` under `target/ws-clients` if missing.
fn install_clients() -> Result<(), String> {
    let root = clients_root();
    let run = |command: &mut Command| -> Result<(), String> {
        let output = command.output().map_err(|e| format!("{command:?}: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{command:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    };
    if !root.join("node/node_modules/ws/package.json").exists() {
        run(Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--no-save",
                "--prefix",
            ])
            .arg(root.join("node"))
            .arg("ws@8"))?;
    }
    if !root.join("python/websockets/__init__.py").exists() {
        run(Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(root.join("python"))
            .arg("websockets"))?;
    }
    Ok(())
}

/// Runs a client script against `url` and returns its output lines once it has
/// printed `lines` of them; pushes `message` twice once it has connected.
fn library_client(
    command: &mut Command,
    comet: &Comet,
    conn_id: &str,
    message: &str,
) -> Vec<String> {
    let mut child = command.stdout(Stdio::piped()).spawn().expect("client");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    lines.push(line.trim_end().to_owned());
    let mut rpc = comet.rpc();
    for _ in 0..2 {
        let reply = rpc.push(&[conn_id], message, "");
        assert_eq!(reply["result"], json!("ok"), "{reply}");
    }
    for _ in 0..2 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        lines.push(line.trim_end().to_owned());
    }
    let _ = child.kill();
    let _ = child.wait();
    lines
}

#[test]
fn python_websockets_and_node_ws_get_compressed_pushes_intact() {
    if let Err(why) = install_clients() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("cannot install the WebSocket client libraries: {why}");
        }
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED: cannot install ws / websockets: {why}\n"
        );
        return;
    }
    let comet = start("websocket_compression=on");
    let message = json_push();
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
    for (name, conn_id) in [("python", "py-z"), ("node", "node-z")] {
        let (relay, downstream) = counting_relay(comet.ws_port);
        let t = common::url_encode(&json!({"conn_id": conn_id, "token": "t"}).to_string());
        let url = format!("ws://127.0.0.1:{relay}/ws?t={t}");
        let mut command = if name == "python" {
            let mut command = Command::new("python3");
            command
                .env("PYTHONPATH", clients_root().join("python"))
                .arg(scripts.join("ws_deflate_client.py"));
            command
        } else {
            let mut command = Command::new("node");
            command
                .env("NODE_PATH", clients_root().join("node/node_modules"))
                .arg(scripts.join("ws_deflate_client.js"));
            command
        };
        command.arg(&url);
        let lines = library_client(&mut command, &comet, conn_id, &message);
        assert!(
            lines[0].starts_with("extensions permessage-deflate"),
            "{name}: {lines:?}"
        );
        let expected = format!("message {}", serde_json::to_string(&message).unwrap());
        assert_eq!(lines[1], expected, "{name}");
        assert_eq!(lines[2], expected, "{name}");
        // Two pushes and the 101: less than one uncompressed message.
        let wire = downstream.load(Ordering::Relaxed);
        println!(
            "{name}: two {}-byte pushes and the 101 took {wire} bytes",
            message.len()
        );
        assert!(wire < message.len(), "{name}: {wire} bytes");
    }
    // Their own compressed 2 KB messages were inflated and taken, not refused.
    assert!(!comet.log_text().contains("closing client for a bad frame"));
}

/// Resident memory per idle client of a node with `extra`, all clients offering deflate:
/// the growth from a warm node with no clients to `clients` clients, divided by
/// `clients`, so that what a node allocates once (its first handshakes, the compressor)
/// does not count.
fn idle_kib_per_client(extra: &str, clients: usize) -> f64 {
    let comet = start(extra);
    // A push first, so that the compressor each shard keeps exists before the baseline.
    let (_warm, _) = upgrade(&comet, "warm");
    comet.rpc().push(&["warm"], &json_push(), "");
    std::thread::sleep(Duration::from_millis(300));
    let before = comet.rss_kib();
    let held: Vec<(TcpStream, String)> = (0..clients)
        .map(|i| upgrade(&comet, &format!("idle{i}")))
        .collect();
    let negotiated = held
        .iter()
        .filter(|(_, head)| head.contains("permessage-deflate"))
        .count();
    assert_eq!(negotiated, if extra.is_empty() { 0 } else { clients });
    std::thread::sleep(Duration::from_millis(500));
    let after = comet.rss_kib();
    (after.saturating_sub(before)) as f64 / clients as f64
}

#[test]
fn idle_memory_with_compression_negotiated_matches_without() {
    common::raise_open_files_limit();
    let clients = 3000;
    // Three times each, alternating, and the lower of each: one node's RSS per idle client
    // moves by up to 0.9 KiB from run to run for the same binary and settings (seen with
    // 3,000 clients: 2.03-2.48 KiB off and 2.42-2.76 KiB on, in one minute), the way the
    // allocator happens to grow. The 5% bar is the bench's (bench/RESULTS.md), measured
    // on the release binary; this test catches what would break it by far: a deflate
    // context per connection costs tens of KiB (zlib: a 32 KiB window and ~7 KiB state).
    let mut off = f64::MAX;
    let mut on = f64::MAX;
    for _ in 0..3 {
        off = off.min(idle_kib_per_client("", clients));
        on = on.min(idle_kib_per_client("websocket_compression=on", clients));
    }
    println!("idle memory per client: {off:.2} KiB off, {on:.2} KiB with deflate negotiated");
    assert!(on <= off * 1.05 + 1.5, "{on:.2} KiB vs {off:.2} KiB");
}
