//! The examples of docs/PROTOCOL.md, run for real: the `nc` session transcripts replayed
//! byte for byte, the Python clients, the browser page in headless Chromium, and a check
//! that the document shows exactly the files these tests run.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::browser::open_connected;
use common::clients::{Reader, plain};
use common::{Comet, MessageServer, free_port, wait_until};
use serde_json::json;

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn node_with_tcp(server: &MessageServer) -> (Comet, u16) {
    let tcp_port = free_port();
    let node = Comet::start(Some(server), &format!("tcp_port={tcp_port}\n"));
    assert!(wait_until(Duration::from_secs(5), || common::port_open(
        tcp_port
    )));
    (node, tcp_port)
}

/// Replays a transcript: `>` lines are sent (with `eol`), `<` lines must arrive exactly,
/// `! push ID MSG` and `! kick ID` go through the push RPC.
fn replay(transcript: &str, node: &Comet, port: u16, eol: &str) {
    let mut client = Reader::new(plain(port));
    let mut rpc = node.rpc();
    for (number, line) in transcript.lines().enumerate() {
        let at = format!("transcript line {}: {line:?}", number + 1);
        if let Some(sent) = line.strip_prefix("> ") {
            client.send(format!("{sent}{eol}").as_bytes());
        } else if let Some(expected) = line.strip_prefix("< ").or(line.strip_prefix("<")) {
            assert_eq!(client.line().as_deref(), Some(expected), "{at}");
        } else if let Some(action) = line.strip_prefix("! ") {
            let words: Vec<&str> = action.splitn(3, ' ').collect();
            let reply = match words[..] {
                ["push", id, msg] => rpc.push(&[id], msg, ""),
                ["kick", id] => rpc.call("Server.KickConnections", json!({"connections": [id]})),
                _ => panic!("unknown action at {at}"),
            };
            assert_eq!(reply["result"], json!("ok"), "{at}: {reply}");
        } else {
            assert!(line.is_empty() || line.starts_with('#'), "{at}");
        }
    }
}

#[test]
fn json_lines_transcript_replays_byte_for_byte() {
    let server = MessageServer::start();
    let (node, port) = node_with_tcp(&server);
    let transcript =
        std::fs::read_to_string(repo_file("examples/sessions/json-lines.txt")).unwrap();
    replay(&transcript, &node, port, "\n");
    assert!(wait_until(Duration::from_secs(5), || server
        .count("offline", "demo-json")
        == 1));
}

#[test]
fn resp_transcript_replays_byte_for_byte() {
    let server = MessageServer::start();
    let (node, port) = node_with_tcp(&server);
    let transcript =
        std::fs::read_to_string(repo_file("examples/sessions/resp-inline.txt")).unwrap();
    replay(&transcript, &node, port, "\r\n");
    assert!(wait_until(Duration::from_secs(5), || server
        .count("offline", "demo-resp")
        == 1));
}

/// Kills a child process when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Debian's python3 (where python3-redis is installed), else whatever is on PATH.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Runs an example client against `port` and checks it prints every pushed message.
fn run_python_client(
    example: &str,
    ready_line: &str,
    port: u16,
    conn_id: &str,
    node: &Comet,
    server: &MessageServer,
) {
    let messages = ["first", "second with spaces", "{\"json\":true}"];
    let mut child = Killed(
        Command::new(python())
            .arg(repo_file(example))
            .args([
                "127.0.0.1",
                &port.to_string(),
                conn_id,
                "secret",
                &messages.len().to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {example}: {e}")),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), ready_line);
    assert!(wait_until(Duration::from_secs(5), || server
        .count("online", conn_id)
        == 1));
    let mut rpc = node.rpc();
    for msg in messages {
        assert_eq!(rpc.push(&[conn_id], msg, "")["result"], json!("ok"));
    }
    let printed: Vec<String> = lines.map(Result::unwrap).collect();
    assert_eq!(printed, messages);
    assert!(child.0.wait().unwrap().success());
    assert!(wait_until(Duration::from_secs(5), || server
        .count("offline", conn_id)
        == 1));
}

#[test]
fn python_json_lines_client_receives_pushes() {
    let server = MessageServer::start();
    let (node, port) = node_with_tcp(&server);
    run_python_client(
        "examples/tcp_json_client.py",
        "connected as py-json",
        port,
        "py-json",
        &node,
        &server,
    );
}

#[test]
fn redis_py_client_receives_pushes() {
    let server = MessageServer::start();
    let (node, port) = node_with_tcp(&server);
    run_python_client(
        "examples/redis_client.py",
        "subscribed",
        port,
        "py-redis",
        &node,
        &server,
    );
    let online = server.calls_of("online");
    assert_eq!(
        online[0].arg(1),
        "redis-py-example",
        "client_name is the info"
    );
}

#[test]
fn browser_page_shows_pushed_messages_in_headless_chromium() {
    let server = MessageServer::start();
    let node = Comet::start(Some(&server), "");
    let page = repo_file("examples/browser/index.html");
    let url = format!(
        "file://{}?server=ws://127.0.0.1:{}/ws&conn_id=browser-1&token=secret",
        page.display(),
        node.ws_port
    );
    let (browser, mut page) = open_connected(&url, &server, "browser-1");
    let reply = node.rpc().push(&["browser-1"], "hello, browser", "");
    assert_eq!(reply["result"], json!("ok"), "{reply}");
    let shown = page.text_containing("messages", "hello, browser");
    assert_eq!(shown, "hello, browser");
    drop((page, browser));
    assert!(wait_until(Duration::from_secs(10), || server
        .count("offline", "browser-1")
        == 1));
}

#[test]
fn php_signed_tokens_are_accepted_and_carry_their_info() {
    const SECRET: &str = "php-secret-0123456789";
    let server = MessageServer::start();
    let node = Comet::start(Some(&server), &format!("token_secret={SECRET}\n"));
    let sign = |conn_id: &str, ttl: &str| {
        let output = Command::new("php")
            .arg(repo_file("examples/sign_token.php"))
            .args([SECRET, conn_id, ttl, "{\"plan\":\"pro\"}"])
            .output()
            .expect("php (php-cli) runs the example signer");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    };
    let token = sign("php-1", "60");
    let _client = node
        .connect("php-1", &token, "")
        .expect("a PHP-signed token is accepted");
    assert!(wait_until(Duration::from_secs(5), || server
        .count("online", "php-1")
        == 1));
    assert_eq!(server.calls_of("online")[0].arg(1), "{\"plan\":\"pro\"}");
    assert!(
        server.calls_of("checkToken").is_empty(),
        "no checkToken round trip"
    );
    let expired = sign("php-2", "-60");
    assert_eq!(
        common::refusal_status(node.connect("php-2", &expired, "")),
        401
    );
}

#[test]
fn protocol_document_shows_exactly_the_tested_examples() {
    let doc = std::fs::read_to_string(repo_file("docs/PROTOCOL.md")).unwrap();
    let mut embedded = 0;
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(path) = line
            .strip_prefix("<!-- example: ")
            .and_then(|l| l.strip_suffix(" -->"))
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert!(
            fence.starts_with("```"),
            "a code block must follow the marker for {path}"
        );
        let block: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        let file =
            std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(
            block.join("\n").trim_end(),
            file.trim_end(),
            "docs/PROTOCOL.md's copy of {path} is stale"
        );
        embedded += 1;
    }
    for example in [
        "examples/browser/index.html",
        "examples/tcp_json_client.py",
        "examples/redis_client.py",
        "examples/sessions/json-lines.txt",
        "examples/sessions/resp-inline.txt",
        "examples/sign_token.py",
        "examples/sign_token.php",
    ] {
        assert!(
            doc.contains(&format!("<!-- example: {example} -->")),
            "{example} is not shown"
        );
    }
    assert!(embedded >= 6);
}
