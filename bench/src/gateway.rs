//! The gateway under test: started from a built binary with a bench configuration (signed
//! tokens, so connects measure the gateway and not a message server), or an external
//! server given by address. Reads its CPU time and RSS from /proc.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::clock;
use crate::rpc::Wire;

/// The server being measured.
pub struct Gateway {
    child: Option<Child>,
    etcd: Option<Child>,
    /// Its process id, when known (CPU and memory are read from /proc).
    pub pid: Option<u32>,
    /// Client address.
    pub ws: SocketAddr,
    /// Push RPC address.
    pub rpc: SocketAddr,
    /// How push calls travel to it.
    pub wire: Wire,
}

/// A server of `comet-bench compare` other than Comet.
pub enum Peer<'a> {
    /// The floor (`comet-bench floor`, this executable).
    Floor,
    /// The Bun/uWebSockets peer: the `bun` executable and the server script.
    Bun { bun: &'a Path, script: &'a Path },
}

/// How to start a Comet node for a run.
pub struct Launch<'a> {
    /// The `comet` binary.
    pub binary: &'a Path,
    /// Shards.
    pub shards: usize,
    /// Signed-token secret.
    pub secret: &'a str,
    /// Scratch directory for the config and log.
    pub dir: &'a Path,
    /// Start a local etcd and register the gateway in it.
    pub etcd: bool,
    /// More configuration lines (`key=value\n`...), appended after the bench's own (a
    /// later key wins in Comet's config).
    pub extra: &'a str,
}

impl Gateway {
    /// Starts a node on free loopback ports and waits until it listens. A port found
    /// free can be taken before the node binds it (the load generator's clients use
    /// ephemeral ports too), so a few attempts are made.
    pub fn start(launch: &Launch<'_>) -> anyhow::Result<Gateway> {
        let mut last = None;
        for _ in 0..3 {
            match Gateway::start_once(launch) {
                Ok(gateway) => return Ok(gateway),
                Err(err) => last = Some(err),
            }
        }
        Err(last.expect("three attempts"))
    }

    fn start_once(launch: &Launch<'_>) -> anyhow::Result<Gateway> {
        let ws_port = free_port()?;
        let rpc_port = free_port()?;
        std::fs::create_dir_all(launch.dir)?;
        let (etcd, etcd_addr) = if launch.etcd {
            let (child, addr) = start_etcd(launch.dir)?;
            (Some(child), addr)
        } else {
            (None, String::new())
        };
        let config = launch.dir.join("bench.ini");
        let log = launch.dir.join("comet.log");
        std::fs::write(
            &config,
            format!(
                "max_proc={}\nwebsocket_port={ws_port}\nrpc_addr=127.0.0.1:{rpc_port}\n\
                 token_secret={}\nlog_level=warn\nping_interval=60s\nheartbeat_timeout=120s\n\
                 drain_window=0\netcd_addr={etcd_addr}\n{}",
                launch.shards, launch.secret, launch.extra
            ),
        )?;
        let mut command = Command::new(launch.binary);
        command.arg("-c").arg(&config);
        match spawn(command, ws_port, rpc_port, Wire::Lines, &log) {
            Ok(mut gateway) => {
                gateway.etcd = etcd;
                Ok(gateway)
            }
            Err(err) => {
                if let Some(mut etcd) = etcd {
                    let _ = etcd.kill();
                    let _ = etcd.wait();
                }
                Err(err)
            }
        }
    }

    /// Starts the floor or the Bun peer on free loopback ports with signed tokens under
    /// `secret` (a few attempts, as [`Gateway::start`]).
    pub fn start_peer(peer: &Peer<'_>, secret: &str, dir: &Path) -> anyhow::Result<Gateway> {
        std::fs::create_dir_all(dir)?;
        let mut last = None;
        for _ in 0..3 {
            let (ws_port, rpc_port) = (free_port()?, free_port()?);
            let started = match peer {
                Peer::Floor => {
                    let mut command = Command::new(std::env::current_exe()?);
                    command.args(["floor", "--ws-port", &ws_port.to_string()]);
                    command.args(["--rpc-port", &rpc_port.to_string(), "--secret", secret]);
                    spawn(
                        command,
                        ws_port,
                        rpc_port,
                        Wire::Lines,
                        &dir.join("floor.log"),
                    )
                }
                Peer::Bun { bun, script } => {
                    let mut command = Command::new(bun);
                    command.arg(script).env("SECRET", secret);
                    command.env("WS_PORT", ws_port.to_string());
                    command.env("RPC_PORT", rpc_port.to_string());
                    spawn(command, ws_port, rpc_port, Wire::Http, &dir.join("bun.log"))
                }
            };
            match started {
                Ok(gateway) => return Ok(gateway),
                Err(err) => last = Some(err),
            }
        }
        Err(last.expect("three attempts"))
    }

    /// A server somebody else started.
    pub fn external(ws: SocketAddr, rpc: SocketAddr, pid: Option<u32>) -> Gateway {
        Gateway {
            child: None,
            etcd: None,
            pid,
            ws,
            rpc,
            wire: Wire::Lines,
        }
    }

    /// (utime, stime) in seconds: user-space work, and the kernel's work on its behalf
    /// (on loopback that includes the receiving side of every packet it sends).
    pub fn cpu_split(&self) -> Option<(f64, f64)> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid?)).ok()?;
        let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
        let user: f64 = fields.get(11)?.parse().ok()?;
        let system: f64 = fields.get(12)?.parse().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Some((user / hz, system / hz))
    }

    /// Resident memory, bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid?)).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for mut child in [self.child.take(), self.etcd.take()].into_iter().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `command` (output to `log`) and waits until both ports listen.
fn spawn(
    mut command: Command,
    ws_port: u16,
    rpc_port: u16,
    wire: Wire,
    log: &Path,
) -> anyhow::Result<Gateway> {
    let child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log.with_extension("out"))?)
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("cannot start {command:?}"))?;
    let mut gateway = Gateway {
        pid: Some(child.id()),
        child: Some(child),
        etcd: None,
        ws: SocketAddr::from(([127, 0, 0, 1], ws_port)),
        rpc: SocketAddr::from(([127, 0, 0, 1], rpc_port)),
        wire,
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if gateway
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
        {
            break;
        }
        if TcpStream::connect(gateway.ws).is_ok() && TcpStream::connect(gateway.rpc).is_ok() {
            return Ok(gateway);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{command:?} did not start listening; see {}", log.display())
}

/// A single-member etcd (Debian's etcd-server) on free ports in `dir`.
fn start_etcd(dir: &Path) -> anyhow::Result<(Child, String)> {
    let (client, peer) = (free_port()?, free_port()?);
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.join("etcd"))
        .args([
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("bench={peer_url}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("etcd.log"))?)
        .spawn()
        .context("cannot start etcd (Debian package etcd-server)")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", client)).is_ok() {
            return Ok((child, format!("127.0.0.1:{client}")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("etcd did not start; see {}", dir.join("etcd.log").display())
}

/// Kernel memory held by all TCP sockets (from /proc/net/sockstat), bytes.
pub fn kernel_tcp_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let pages: u64 = text
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let at = fields.iter().position(|f| *f == "mem")?;
            fields.get(at + 1)?.parse().ok()
        })
        .unwrap_or(0);
    pages * 4096
}

/// A free port below the ephemeral range (32768 up by default), which the load
/// generator's tens of thousands of client sockets (and their TIME_WAIT) occupy.
fn free_port() -> anyhow::Result<u16> {
    let mut seed = clock::now_ns() | 1;
    for _ in 0..100 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let port = 20_000 + (seed % 12_000) as u16;
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port between 20000 and 32000")
}
