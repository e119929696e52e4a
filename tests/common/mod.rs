//! Test harness: the real `comet` binary, a real HTTP message server that records every
//! callback (and can refuse, stall or die), real WebSocket clients and a raw TCP
//! JSON-RPC client.
#![allow(dead_code)]

pub mod browser;
pub mod clients;
pub mod etcd;
pub mod message_server;
pub mod netns;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::protocol::WebSocket;

pub use message_server::MessageServer;

/// The `comet` executable under test: this build's, or `COMET_BIN` (the
/// LeakSanitizer build of `scripts/leak-check.sh`).
pub fn comet_binary() -> String {
    std::env::var("COMET_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_comet").to_owned())
}

/// Percent-encodes everything but RFC 3986's unreserved characters (for `t=`).
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A port nothing uses right now, below the kernel's ephemeral range (32768 up), so that
/// the outgoing connections of other tests running beside this one (thousands, in the
/// churn and flood tests) can never take it before the node binds it. Each test process
/// walks its own stretch of the range, starting where its pid points.
pub fn free_port() -> u16 {
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst) as u32;
        let port = (FIRST + (start + n * 7) % SPAN) as u16;
        let free = TcpListener::bind(("0.0.0.0", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free {
            return port;
        }
    }
}

/// A fresh directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("comet-test-{}-{tag}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Polls `check` every 10 ms until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running `comet` node. Stopped with SIGTERM (then SIGKILL) when dropped.
pub struct Comet {
    child: Option<Child>,
    pub ws_port: u16,
    pub rpc_port: u16,
    pub log: PathBuf,
}

/// The tests' own heartbeat and RPC first-call window: test clients read only when a
/// test reads them, so the defaults (a ping every 9 s, dropped after 10 s of silence)
/// dropped the first of 1,000 clients while a busy machine was still connecting the last;
/// and a test that opens its RPC connection before starting a Redis library's client
/// made its first call after the default 10 s on a loaded machine, and found it closed.
/// A test of either sets its own (a later line of the INI wins).
pub const TEST_TIMING: &str =
    "ping_interval=60s\nheartbeat_timeout=120s\nrpc_first_call_timeout=120s";

impl Comet {
    /// Starts a node on free ports with `rpc_api_url` pointing at `server` (if any) and
    /// the extra INI lines given.
    pub fn start(server: Option<&MessageServer>, extra: &str) -> Comet {
        Comet::try_start(server, extra).expect("comet did not start")
    }

    /// Like [`Comet::start`], with extra environment variables.
    pub fn start_with_env(
        server: Option<&MessageServer>,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Comet {
        let mut command = Command::new(comet_binary());
        command.envs(env.iter().copied());
        let (ini, ws_port, rpc_port) = Comet::ini(server, extra);
        Comet::spawn(command, &ini, ws_port, rpc_port).expect("comet did not start")
    }

    /// Like [`Comet::start`], but returns the log text when the node exits at start-up.
    pub fn try_start(server: Option<&MessageServer>, extra: &str) -> Result<Comet, String> {
        let (ini, ws_port, rpc_port) = Comet::ini(server, extra);
        Comet::spawn_with_ini(&ini, ws_port, rpc_port)
    }

    /// A node's INI on fresh ports, and those ports.
    fn ini(server: Option<&MessageServer>, extra: &str) -> (String, u16, u16) {
        let ws_port = free_port();
        let rpc_port = free_port();
        let url = server.map(|s| s.url()).unwrap_or_default();
        let ini = format!(
            "max_proc=2\ncomet_service_name=comet\netcd_addr=\nrpc_api_url={url}\n\
             rpc_user_agent=\"CtxImRpc 1.0\"\nsocket_protocol=websocket\nwebsocket_host=127.0.0.1\n\
             websocket_port=:{ws_port}\nrpc_addr=127.0.0.1:{rpc_port}\ndrain_window=0\n\
             {TEST_TIMING}\n{extra}\n"
        );
        (ini, ws_port, rpc_port)
    }

    /// Starts a node on a complete INI text.
    pub fn spawn_with_ini(ini: &str, ws_port: u16, rpc_port: u16) -> Result<Comet, String> {
        Comet::spawn(Command::new(comet_binary()), ini, ws_port, rpc_port)
    }

    /// Starts a node whose open-files hard limit is `nofile` (through util-linux `prlimit`,
    /// which execs the node, so the pid is the node's).
    pub fn spawn_with_ini_limited(
        ini: &str,
        ws_port: u16,
        rpc_port: u16,
        nofile: u32,
    ) -> Result<Comet, String> {
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg(comet_binary());
        Comet::spawn(command, ini, ws_port, rpc_port)
    }

    fn spawn(
        mut command: Command,
        ini: &str,
        ws_port: u16,
        rpc_port: u16,
    ) -> Result<Comet, String> {
        let dir = temp_dir("node");
        let config = dir.join("comet.ini");
        std::fs::write(&config, ini).unwrap();
        let log = dir.join("comet.log");
        let child = command
            .arg("-c")
            .arg(&config)
            // Per-client events are debug lines of the shards; tests read them.
            .env("RUST_LOG", "info,comet::shard=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut comet = Comet {
            child: Some(child),
            ws_port,
            rpc_port,
            log,
        };
        // Ready, not just bound: the ports accept (into their backlogs) before the
        // control thread runs, and a client's claim then waits for it. A loaded CI
        // machine once took over 5 s (`handshake_timeout`) from bind to ready.
        let up = wait_until(Duration::from_secs(30), || {
            comet.exited()
                || (comet.log_text().contains("comet ready")
                    && port_open(ws_port)
                    && port_open(rpc_port))
        });
        if !up || comet.exited() {
            let state = match comet.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => format!("exited: {status:?}"),
                _ => "still running, not ready after 30 s".to_owned(),
            };
            return Err(format!("{state}\n{}", comet.log_text()));
        }
        Ok(comet)
    }

    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().unwrap().is_some())
    }

    /// The node's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The highest resident memory so far in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// A `kB` field of `/proc/<pid>/status`, such as `VmRSS:`.
    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// utime + stime of the process, in clock ticks (100 per second).
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    /// An RPC client, closing WebSocket clients from `held` until a descriptor frees up
    /// (the RPC listener shares the node's descriptor budget).
    pub fn rpc_when_possible(&self, held: &mut Vec<Client>) -> Rpc {
        loop {
            let stream = TcpStream::connect(("127.0.0.1", self.rpc_port)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut probe = Rpc::from_stream(stream);
            if probe.try_call("Server.GetNode", json!({})).is_some() {
                return probe;
            }
            held.pop().expect("no client left to close");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILL: no goodbye to etcd or to clients.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The etcd key of this node.
    pub fn etcd_key(&self) -> String {
        format!("/comet/127.0.0.1:{}", self.rpc_port)
    }

    /// Sends SIGTERM and waits for the exit status (at most `limit`).
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        signal(child.id(), "TERM");
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// A WebSocket URL carrying the token object.
    pub fn ws_url(&self, conn_id: &str, token: &str, info: &str) -> String {
        let t = json!({"conn_id": conn_id, "token": token, "info": info}).to_string();
        format!("ws://127.0.0.1:{}/ws?t={}", self.ws_port, url_encode(&t))
    }

    /// Connects a WebSocket client.
    pub fn connect(
        &self,
        conn_id: &str,
        token: &str,
        info: &str,
    ) -> Result<Client, tungstenite::Error> {
        connect_url(&self.ws_url(conn_id, token, info), self.ws_port)
    }

    /// A push RPC client.
    pub fn rpc(&self) -> Rpc {
        Rpc::connect(self.rpc_port)
    }
}

impl Drop for Comet {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.terminate(Duration::from_secs(10));
        }
        remove_dir_unless_failing(&self.log);
    }
}

/// Removes the directory holding `file` (a node's config and log) when the test is
/// passing; a failing test keeps it for the post-mortem.
fn remove_dir_unless_failing(file: &std::path::Path) {
    if !std::thread::panicking()
        && let Some(dir) = file.parent()
    {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A running monitor (`comet -m`). Stopped with SIGTERM when dropped.
pub struct Monitor {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Monitor {
    /// Starts a monitor reporting to `server` about the nodes in `etcd_addr`.
    pub fn start(server: &MessageServer, etcd_addr: &str) -> Monitor {
        Monitor::start_with(server, etcd_addr, "callback_retries=20\n")
    }

    /// The same, with `extra` added to its comet.ini.
    pub fn start_with(server: &MessageServer, etcd_addr: &str, extra: &str) -> Monitor {
        let dir = temp_dir("monitor");
        let config = dir.join("comet.ini");
        let ini = format!(
            "comet_service_name=comet\netcd_addr={etcd_addr}\nrpc_api_url={}\n{extra}",
            server.url()
        );
        std::fs::write(&config, ini).unwrap();
        let log = dir.join("monitor.log");
        let child = Command::new(comet_binary())
            .arg("-m")
            .arg("-c")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Monitor {
            child: Some(child),
            log,
        }
    }

    /// SIGTERM and wait.
    /// The monitor's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM");
            let _ = child.wait();
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop();
        remove_dir_unless_failing(&self.log);
    }
}

/// Sends `signal` (e.g. "TERM") to a process with the kill command.
pub fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// Every conn_id's callbacks must read online, offline, online, offline, ... and end
/// offline. Returns the conn_ids seen and the sessions (online/offline pairs) counted.
pub fn check_presence_ledger(server: &MessageServer) -> (usize, usize) {
    let mut ledger: std::collections::HashMap<String, Vec<String>> =
        std::collections::HashMap::new();
    for call in server.calls() {
        if call.method == "online" || call.method == "offline" {
            ledger
                .entry(call.arg(0).to_owned())
                .or_default()
                .push(call.method.clone());
        }
    }
    let mut onlines = 0;
    for (conn_id, events) in &ledger {
        for (i, event) in events.iter().enumerate() {
            let expected = if i % 2 == 0 { "online" } else { "offline" };
            assert_eq!(event, expected, "{conn_id}: {events:?}");
        }
        assert_eq!(
            events.len() % 2,
            0,
            "{conn_id} never went offline: {events:?}"
        );
        onlines += events.len() / 2;
    }
    (ledger.len(), onlines)
}

/// Raises this test process's open-files soft limit to its hard limit (tests that hold
/// thousands of sockets).
pub fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

/// Whether something accepts TCP connections on this loopback port.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(100)).is_ok()
}

/// A connected WebSocket client.
pub type Client = WebSocket<TcpStream>;

/// Connects to a WebSocket URL on a loopback port, with a 5 s read timeout.
pub fn connect_url(url: &str, port: u16) -> Result<Client, tungstenite::Error> {
    let stream = TcpStream::connect(("127.0.0.1", port)).map_err(tungstenite::Error::Io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    match tungstenite::client::client(url, stream) {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::HandshakeError::Failure(err)) => Err(err),
        // The read timeout fired mid-handshake: the server never answered.
        Err(tungstenite::HandshakeError::Interrupted(_)) => {
            Err(tungstenite::Error::Io(std::io::ErrorKind::TimedOut.into()))
        }
    }
}

/// The HTTP status of a refused upgrade.
pub fn refusal_status(result: Result<Client, tungstenite::Error>) -> u16 {
    match result {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("expected an HTTP refusal, got {other:?}"),
        Ok(_) => panic!("expected an HTTP refusal, got an upgrade"),
    }
}

/// Reads the next text message (answering pings on the way); `None` on timeout/close.
pub fn next_text(client: &mut Client) -> Option<String> {
    loop {
        match client.read() {
            Ok(tungstenite::Message::Text(text)) => return Some(text.to_string()),
            Ok(tungstenite::Message::Close(_)) => return None,
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

/// Reads until the server's close frame; returns its code.
pub fn close_code(client: &mut Client) -> Option<u16> {
    loop {
        match client.read() {
            Ok(tungstenite::Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

/// A raw TCP JSON-RPC client writing one request per line, as the PHP clients do.
pub struct Rpc {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    next_id: u64,
}

impl Rpc {
    /// Connects to the push RPC port.
    pub fn connect(port: u16) -> Rpc {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Rpc::from_stream(stream)
    }

    /// Wraps a connected stream.
    pub fn from_stream(stream: TcpStream) -> Rpc {
        Rpc {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            next_id: 1,
        }
    }

    /// Calls `method` with one parameter; returns the whole reply object.
    pub fn call(&mut self, method: &str, param: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"method": method, "params": [param], "id": id});
        let reply = self.raw(&format!("{request}\n"));
        assert_eq!(reply["id"], json!(id), "reply id mismatch: {reply}");
        reply
    }

    /// Like [`Rpc::call`], but `None` when no reply arrives.
    pub fn try_call(&mut self, method: &str, param: Value) -> Option<Value> {
        let request = json!({"method": method, "params": [param], "id": 0});
        self.writer
            .write_all(format!("{request}\n").as_bytes())
            .ok()?;
        let mut line = String::new();
        self.reader.read_line(&mut line).ok()?;
        serde_json::from_str(&line).ok()
    }

    /// Writes raw bytes and reads one reply line.
    pub fn raw(&mut self, text: &str) -> Value {
        self.writer.write_all(text.as_bytes()).unwrap();
        self.read_reply()
    }

    /// Reads one reply line.
    pub fn read_reply(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply line {line:?}: {e}"))
    }

    /// Second-generation push; returns the reply.
    pub fn push(&mut self, ids: &[&str], msg: &str, token: &str) -> Value {
        self.call(
            "Server.SendToConnections",
            json!({"connections": ids, "msg": msg, "token": token}),
        )
    }
}
