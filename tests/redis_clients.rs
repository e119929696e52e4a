//! The major Redis client libraries as Comet clients, each with its default settings:
//! ioredis 5 and 6, node-redis 5 and 6, redis-py 4 (Debian's) and the newest redis-py
//! (sync and asyncio), and coredis (RESP3 only since 6); over RESP2 and RESP3, plain and TLS. Each one
//! connects (PING, then idles longer than `heartbeat_timeout` as a pooled connection
//! does), subscribes, gets a push, is kicked and comes back by its own reconnect and
//! resubscribe, leaves its last channel and stays connected without a reconnect loop,
//! subscribes again, and quits; presence stays one `offline` per `online`, in order.
//!
//! The libraries are installed on first use under `target/redis-clients/` (npm and pip,
//! by package name). Where that is impossible the test fails under `CI=true` and says
//! so loudly everywhere else.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use common::clients::{Reader, Resp, TestCert, command, plain};
use common::{Comet, MessageServer, Rpc, free_port, temp_dir, wait_until};
use serde_json::{Value, json};

/// The node's timing: short, so that an idle pool connection and the quiet period after
/// an UNSUBSCRIBE both outlast `heartbeat_timeout` within the test's budget, and
/// `resp_idle_timeout` long enough not to end either.
const TIMING: &str =
    "ping_interval=1s\nheartbeat_timeout=2s\nhandshake_timeout=10s\nresp_idle_timeout=60s\n";
/// How long a library's connection sits idle between its PING and its SUBSCRIBE.
const IDLE: Duration = Duration::from_millis(3_000);
/// How long an unsubscribed connection is watched for reconnects.
const QUIET: Duration = Duration::from_millis(3_000);
/// The most one step (a reconnect, a message) may take on a busy machine.
const STEP: Duration = Duration::from_secs(20);

/// Where the libraries live once installed.
struct Libraries {
    /// `--prefix` folders of npm installs: ioredis 5 + node-redis 5, and the 6s.
    node5: PathBuf,
    node6: PathBuf,
    /// A `pip --target` folder with the newest redis-py and coredis (for PYTHONPATH).
    python: PathBuf,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/redis-clients")
}

/// Debian's python3 (with python3-redis 4), else the one on PATH.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn run(command: &mut Command) -> Result<(), String> {
    let output = command.output().map_err(|e| format!("{command:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn npm_install(dir: &Path, packages: &[&str]) -> Result<(), String> {
    if packages.iter().all(|p| {
        dir.join("node_modules")
            .join(p.split('@').next().unwrap())
            .join("package.json")
            .exists()
    }) {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    run(Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--no-save",
            "--prefix",
        ])
        .arg(dir)
        .args(packages))
}

fn pip_install(dir: &Path) -> Result<(), String> {
    if dir.join("redis/__init__.py").exists() && dir.join("coredis/__init__.py").exists() {
        return Ok(());
    }
    run(Command::new(python())
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(dir)
        .args(["redis", "coredis"]))
}

/// Installs what is missing; `None` (after saying why) when it cannot, outside CI.
fn libraries() -> Option<Libraries> {
    let libraries = Libraries {
        node5: root().join("node5"),
        node6: root().join("node6"),
        python: root().join("python"),
    };
    let installed = npm_install(&libraries.node5, &["ioredis@5", "redis@5"])
        .and_then(|()| npm_install(&libraries.node6, &["ioredis@6", "redis@6"]))
        .and_then(|()| pip_install(&libraries.python))
        .and_then(|()| {
            run(Command::new(python()).args(["-c", "import redis"])).map_err(|e| {
                format!("Debian's python3-redis is missing ({e}); run scripts/install-deps.sh")
            })
        });
    match installed {
        Ok(()) => Some(libraries),
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("cannot install the Redis client libraries: {why}")
        }
        Err(why) => {
            // Straight to stderr: the harness swallows eprintln! output of a passing test.
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPED: cannot install the Redis client libraries (CI=true fails here): {why}\n"
            );
            None
        }
    }
}

/// One library in one configuration.
#[derive(Clone)]
struct Case {
    name: &'static str,
    /// `node` with an npm prefix, or `python` with an optional PYTHONPATH.
    runner: Runner,
    lib: &'static str,
    protocol: Option<u8>,
    auth: &'static str,
    tls: bool,
}

#[derive(Clone)]
enum Runner {
    Node(PathBuf),
    Python(Option<PathBuf>),
}

fn cases(libs: &Libraries) -> Vec<Case> {
    let node5 = Runner::Node(libs.node5.clone());
    let node6 = Runner::Node(libs.node6.clone());
    let debian = Runner::Python(None);
    let newest = Runner::Python(Some(libs.python.clone()));
    let case = |name, runner: &Runner, lib, protocol, auth, tls| Case {
        name,
        runner: runner.clone(),
        lib,
        protocol,
        auth,
        tls,
    };
    // Defaults: RESP2 in ioredis 5, node-redis 5 and redis-py 4; RESP3 in ioredis 6,
    // node-redis 6, redis-py 8 and coredis 6.
    vec![
        case("ioredis5", &node5, "ioredis", None, "user", false),
        case("ioredis5-object", &node5, "ioredis", None, "object", false),
        case("ioredis6", &node6, "ioredis", None, "object", false),
        case("ioredis6-resp2", &node6, "ioredis", Some(2), "user", false),
        case("ioredis6-tls", &node6, "ioredis", None, "user", true),
        case("node-redis5", &node5, "redis", None, "object", false),
        case("node-redis6", &node6, "redis", None, "object", false),
        case("node-redis6-resp2", &node6, "redis", Some(2), "user", false),
        case("node-redis6-tls", &node6, "redis", None, "object", true),
        case("redis-py4", &debian, "redis", None, "user", false),
        case("redis-py", &newest, "redis", None, "object", false),
        case("redis-py-resp2", &newest, "redis", Some(2), "object", false),
        case(
            "redis-py-asyncio",
            &newest,
            "redis-asyncio",
            None,
            "user",
            false,
        ),
        case(
            "redis-py-asyncio-resp2",
            &newest,
            "redis-asyncio",
            Some(2),
            "object",
            false,
        ),
        case("redis-py-tls", &newest, "redis", None, "user", true),
        case("coredis", &newest, "coredis", None, "object", false),
        // coredis 6 speaks RESP3 only.
        case("coredis-user", &newest, "coredis", None, "user", false),
    ]
}

/// A running library client: its stdin for commands, its event lines.
struct Driven {
    name: String,
    child: Child,
    stdin: ChildStdin,
    events: Receiver<String>,
    seen: Vec<String>,
}

impl Driven {
    fn start(case: &Case, port: u16, ca: Option<&Path>) -> Driven {
        let config = json!({
            "lib": case.lib,
            "modules": match &case.runner { Runner::Node(dir) => json!(dir), Runner::Python(_) => Value::Null },
            "port": port,
            "conn_id": case.name,
            "token": "t",
            "auth": case.auth,
            "protocol": case.protocol,
            "ca": ca,
            "idle_ms": IDLE.as_millis() as u64,
        });
        let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
        let mut command = match &case.runner {
            Runner::Node(_) => {
                let mut command = Command::new("node");
                command.arg(scripts.join("node_client.js"));
                command
            }
            Runner::Python(path) => {
                let mut command = Command::new(python());
                command.arg(scripts.join("py_client.py"));
                if let Some(path) = path {
                    command.env("PYTHONPATH", path);
                }
                command
            }
        };
        let mut child = command
            .arg(config.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: cannot start: {e}", case.name));
        let stdin = child.stdin.take().unwrap();
        let (send, events) = channel();
        for output in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let send = send.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(output).lines().map_while(Result::ok) {
                    let _ = send.send(line);
                }
            });
        }
        Driven {
            name: case.name.to_owned(),
            child,
            stdin,
            events,
            seen: Vec::new(),
        }
    }

    /// Waits for an event line starting with `wanted`; panics with everything seen.
    fn expect(&mut self, wanted: &str) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(wanted) {
                        return line;
                    }
                    assert!(
                        !line.starts_with("fatal"),
                        "{}: {line}\nseen: {:#?}",
                        self.name,
                        self.seen
                    );
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => panic!(
                    "{}: no {wanted:?} within {STEP:?}; seen: {:#?}",
                    self.name, self.seen
                ),
            }
        }
    }

    fn tell(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn delivered(rpc: &mut Rpc, conn_id: &str, msg: &str) -> bool {
    rpc.push(&[conn_id], msg, "")["result"] == json!("ok")
}

/// The whole life of one library's client against `node`.
fn exercise(case: &Case, server: &MessageServer, node: &Comet, port: u16, ca: Option<&Path>) {
    let id = case.name;
    let count = |method| server.count(method, id);
    let mut rpc = node.rpc();
    let mut client = Driven::start(case, port, ca);
    // Connected and PINGed, then idle past heartbeat_timeout: a pooled connection.
    client.expect("pong");
    client.expect("subscribed");
    assert!(wait_until(STEP, || count("online") == 1), "{id}: online");
    assert!(delivered(&mut rpc, id, "m1"), "{id}: push m1");
    assert_eq!(client.expect("message"), "message m1");

    // Kicked: the library reconnects and resubscribes by itself (online again only once
    // it has subscribed).
    let kick = rpc.call("KickConnections", json!({"connections": [id]}));
    assert_eq!(kick["result"], json!("ok"), "{id}: {kick}");
    assert!(
        wait_until(STEP, || count("offline") == 1 && count("online") == 2),
        "{id}: no resubscribe after the kick; seen {:?}",
        client.seen
    );
    assert!(
        wait_until(STEP, || delivered(&mut rpc, id, "m2")),
        "{id}: push m2"
    );
    assert_eq!(client.expect("message"), "message m2");

    // The last channel left: offline, but the connection stays and is usable.
    client.tell("unsubscribe");
    client.expect("pong-after-unsubscribe");
    assert!(wait_until(STEP, || count("offline") == 2), "{id}: offline");
    let checks = count("checkToken");
    std::thread::sleep(QUIET);
    assert_eq!(
        (count("checkToken"), count("online")),
        (checks, 2),
        "{id}: reconnected after leaving its last channel"
    );
    assert!(!delivered(&mut rpc, id, "nobody"), "{id}: not online");

    // Subscribing again is a new session.
    client.tell("subscribe");
    client.expect("subscribed");
    assert!(
        wait_until(STEP, || count("online") == 3),
        "{id}: online again"
    );
    assert!(delivered(&mut rpc, id, "m3"), "{id}: push m3");
    assert_eq!(client.expect("message"), "message m3");
    client.tell("quit");
    client.expect("done");
    assert!(
        wait_until(STEP, || count("offline") == 3),
        "{id}: last offline"
    );
}

#[test]
fn redis_libraries_with_default_settings_connect_subscribe_and_recover() {
    let Some(libs) = libraries() else { return };
    let server = MessageServer::start();
    let cert = TestCert::generate(&temp_dir("redis-clients"));
    let plain_port = free_port();
    let tls_port = free_port();
    let plain_node = Comet::start(Some(&server), &format!("tcp_port={plain_port}\n{TIMING}"));
    let tls_node = Comet::start(
        Some(&server),
        &format!("tcp_port={tls_port}\ntcp_tls=true\n{}{TIMING}", cert.ini()),
    );
    assert!(wait_until(Duration::from_secs(5), || common::port_open(
        plain_port
    )
        && common::port_open(tls_port)));
    let started = Instant::now();
    std::thread::scope(|scope| {
        let runs: Vec<_> = cases(&libs)
            .into_iter()
            .map(|case| {
                let (server, plain_node, tls_node, cert) = (&server, &plain_node, &tls_node, &cert);
                scope.spawn(move || {
                    if case.tls {
                        exercise(&case, server, tls_node, tls_port, Some(&cert.cert_pem));
                    } else {
                        exercise(&case, server, plain_node, plain_port, None);
                    }
                    case.name
                })
            })
            .collect();
        let mut failed = Vec::new();
        for run in runs {
            if let Err(panic) = run.join() {
                failed.push(
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .unwrap_or_else(|| "panicked".into()),
                );
            }
        }
        assert!(
            failed.is_empty(),
            "{} failed:\n{}",
            failed.len(),
            failed.join("\n\n")
        );
    });
    eprintln!("all libraries done in {:?}", started.elapsed());
    let (conn_ids, sessions) = common::check_presence_ledger(&server);
    assert_eq!(
        (conn_ids, sessions),
        (cases(&libs).len(), 3 * cases(&libs).len())
    );
}

/// The bound on an authenticated connection that never subscribes: it outlives
/// `heartbeat_timeout` (pools keep connections idle), and is closed without a reply
/// after `resp_idle_timeout`. Raw RESP, so no library needed.
#[test]
fn an_idle_authenticated_connection_is_bounded_by_resp_idle_timeout() {
    let server = MessageServer::start();
    let port = free_port();
    let node = Comet::start(
        Some(&server),
        &format!(
            "tcp_port={port}\nping_interval=1s\nheartbeat_timeout=2s\nhandshake_timeout=10s\nresp_idle_timeout=4s\n"
        ),
    );
    assert!(wait_until(Duration::from_secs(5), || common::port_open(
        port
    )));
    let stream = plain(port);
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut client = Reader::new(stream);
    client.send(&command(&["AUTH", "idler", "t"]));
    assert_eq!(client.resp(), Some(Resp::Simple("OK".into())));
    std::thread::sleep(Duration::from_secs(3));
    client.send(&command(&["PING"]));
    assert_eq!(
        client.resp(),
        Some(Resp::Simple("PONG".into())),
        "past heartbeat_timeout"
    );
    assert_eq!(
        server.count("online", "idler"),
        0,
        "authenticated is not online"
    );
    let quiet_from = Instant::now();
    assert_eq!(client.resp(), None, "closed without a reply");
    let idle = quiet_from.elapsed();
    assert!(
        idle >= Duration::from_millis(3_500) && idle < Duration::from_secs(12),
        "closed after {idle:?}"
    );
    drop(node);
}

/// The security review's flood: 150,000 channel names (1.9 MB) subscribed on one
/// connection. The first 1,024 are taken, every command past the cap gets an error
/// reply (the connection stays), the whole is answered in a moment, and a bystander on
/// the same node is served meanwhile.
#[test]
fn a_subscribe_flood_is_capped_answered_quickly_and_contained() {
    const NAMES: usize = 150_000;
    const PER_COMMAND: usize = 100;
    let port = free_port();
    let node = Comet::start(None, &format!("max_proc=1\ntcp_port={port}\n{TIMING}"));
    assert!(wait_until(Duration::from_secs(5), || common::port_open(
        port
    )));
    let mut bystander = Reader::new(plain(port));
    bystander.send(&command(&["AUTH", "bystander", "t"]));
    assert_eq!(bystander.resp(), Some(Resp::Simple("OK".into())));
    bystander.send(&command(&["SUBSCRIBE", "inbox"]));
    assert_eq!(
        bystander.resp().unwrap().words(),
        ["subscribe", "inbox", "1"]
    );

    let stream = plain(port);
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut flooder = Reader::new(stream);
    flooder.send(&command(&["AUTH", "flooder", "t"]));
    assert_eq!(flooder.resp(), Some(Resp::Simple("OK".into())));
    let mut wire = Vec::new();
    for chunk in (0..NAMES).collect::<Vec<_>>().chunks(PER_COMMAND) {
        let names: Vec<String> = chunk.iter().map(|n| format!("channel-{n:06}")).collect();
        let mut words = vec!["SUBSCRIBE"];
        words.extend(names.iter().map(String::as_str));
        wire.extend(command(&words));
    }
    let started = Instant::now();
    let bytes = wire.len();
    let sending = std::thread::spawn(move || writer.write_all(&wire).is_ok());
    let (mut confirmed, mut refused) = (0, 0);
    while confirmed + refused < NAMES / PER_COMMAND {
        match flooder.resp() {
            Some(Resp::Array(_)) => {
                // The rest of this command's confirmations.
                for _ in 1..PER_COMMAND {
                    assert!(matches!(flooder.resp(), Some(Resp::Array(_))));
                }
                confirmed += 1;
            }
            Some(Resp::Error(e)) => {
                assert!(e.starts_with("ERR too many channels"), "{e}");
                refused += 1;
            }
            other => panic!("after {confirmed} + {refused} commands: {other:?}"),
        }
    }
    let took = started.elapsed();
    assert!(sending.join().unwrap());
    assert_eq!(
        (confirmed, refused),
        (1024 / PER_COMMAND, NAMES / PER_COMMAND - 10)
    );
    eprintln!("{NAMES} names in {bytes} bytes answered in {took:?}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    // Both still served: the flooder's connection and the bystander's.
    flooder.send(&command(&["PING"]));
    assert_eq!(flooder.resp().unwrap().words(), ["pong", ""]);
    let reply = node.rpc().push(&["bystander"], "still here", "");
    assert_eq!(reply["result"], json!("ok"), "{reply}");
    assert_eq!(
        bystander.resp().unwrap().words(),
        ["message", "inbox", "still here"]
    );
}

/// A subscribed client that pipelines commands and never reads the replies: its queued
/// replies count against `outbound_queue_bytes` (1 MiB), past which it is not read, and
/// after a heartbeat timeout over it, closed as a slow consumer with its `offline`; the
/// node's other clients do not notice.
#[test]
fn a_client_that_never_reads_its_replies_is_closed_not_buffered() {
    let server = MessageServer::start();
    let port = free_port();
    let node = Comet::start(
        Some(&server),
        &format!("max_proc=1\ntcp_port={port}\n{TIMING}"),
    );
    assert!(wait_until(Duration::from_secs(5), || common::port_open(
        port
    )));
    let mut bystander = Reader::new(plain(port));
    bystander.send(&command(&["AUTH", "bystander", "t"]));
    assert_eq!(bystander.resp(), Some(Resp::Simple("OK".into())));
    bystander.send(&command(&["SUBSCRIBE", "inbox"]));
    assert_eq!(
        bystander.resp().unwrap().words(),
        ["subscribe", "inbox", "1"]
    );

    let mut deaf = Reader::new(plain(port));
    deaf.send(&command(&["AUTH", "deaf", "t"]));
    assert_eq!(deaf.resp(), Some(Resp::Simple("OK".into())));
    deaf.send(&command(&["SUBSCRIBE", "inbox"]));
    assert_eq!(deaf.resp().unwrap().words(), ["subscribe", "inbox", "1"]);
    assert!(wait_until(STEP, || server.count("online", "deaf") == 1));
    let text = "p".repeat(8 * 1024);
    let ping = command(&["PING", &text]);
    let mut writer = deaf.stream.try_clone().unwrap();
    let started = Instant::now();
    // 256 MiB of replies asked for: far more than the kernel's buffers and the bound.
    let written = std::thread::spawn(move || {
        let mut sent = 0usize;
        while sent < 256 << 20 && writer.write_all(&ping).is_ok() {
            sent += ping.len();
        }
        sent
    });
    assert!(
        wait_until(Duration::from_secs(60), || server.count("offline", "deaf")
            == 1),
        "still online after {:?}",
        started.elapsed()
    );
    let sent = written.join().unwrap();
    assert!(sent < 256 << 20, "all {sent} bytes taken");
    eprintln!(
        "closed after {sent} bytes of commands, {:?}",
        started.elapsed()
    );
    assert!(wait_until(Duration::from_secs(5), || node
        .log_text()
        .contains("reason=\"slow_consumer\"")));
    let reply = node.rpc().push(&["bystander"], "unaffected", "");
    assert_eq!(reply["result"], json!("ok"), "{reply}");
    assert_eq!(
        bystander.resp().unwrap().words(),
        ["message", "inbox", "unaffected"]
    );
}

/// One credential may hold four connections past AUTH at once on a shard (a subscriber
/// and a few pooled ones): the fifth AUTH is refused with an error and the connection
/// stays usable, closing one frees a place, and the gauge counts them. Before, one
/// credential opened ~20,000 such connections, invisible to `comet_connections`, until
/// the node had no descriptors left for new clients.
#[test]
fn one_conn_id_holds_at_most_four_authenticated_connections_per_shard() {
    let server = MessageServer::start();
    let port = free_port();
    let admin = free_port();
    let _node = Comet::start(
        Some(&server),
        &format!("max_proc=1\ntcp_port={port}\nadmin_addr=127.0.0.1:{admin}\n"),
    );
    assert!(wait_until(Duration::from_secs(5), || common::port_open(
        port
    )));
    let auth = |id: &str| {
        let stream = plain(port);
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut client = Reader::new(stream);
        client.send(&command(&["AUTH", id, "t"]));
        let answer = client.resp();
        (client, answer)
    };
    let mut held: Vec<_> = (0..4)
        .map(|_| {
            let (client, answer) = auth("pooled");
            assert_eq!(answer, Some(Resp::Simple("OK".into())));
            client
        })
        .collect();
    let (mut fifth, answer) = auth("pooled");
    let Some(Resp::Error(text)) = answer else {
        panic!("the fifth AUTH: {answer:?}");
    };
    assert!(text.contains("4 authenticated connections"), "{text}");
    // Still usable, and another conn_id is not affected.
    fifth.send(&command(&["PING"]));
    assert_eq!(fifth.resp(), Some(Resp::Simple("PONG".into())));
    assert_eq!(auth("other").1, Some(Resp::Simple("OK".into())));
    let gauge = || {
        ureq::get(&format!("http://127.0.0.1:{admin}/metrics"))
            .call()
            .unwrap()
            .into_string()
            .unwrap()
            .lines()
            .find(|l| l.starts_with("comet_resp_authenticated_connections{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
    };
    // Four held: 'other' closed at once.
    assert!(wait_until(Duration::from_secs(5), || gauge() == 4));
    held.pop();
    assert!(wait_until(Duration::from_secs(5), || gauge() == 3));
    fifth.send(&command(&["AUTH", "pooled", "t"]));
    assert_eq!(fifth.resp(), Some(Resp::Simple("OK".into())));
    assert_eq!(gauge(), 4);
}
