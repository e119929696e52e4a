//! `comet-bench compare`: the same phases against Comet, the floor and the Bun peer,
//! back to back in one invocation, each figure printed with its ratio to the floor and
//! to Bun (issue 12). The floor is the least work a gateway can do on this wire
//! contract (src/floor.rs); Bun runs uWebSockets (bench/peers/bun-server.js).
//!
//! Per server: connect N/2 then N clients (signed tokens), idle RSS from the empty
//! process, a burst of broadcasts, then three unicast loads: (a) 16 callers over 4
//! persistent push connections, one call in flight per caller; (b) PHP-style, a new TCP
//! connection per call, 16 at a time; (c) the pipelined one of `run` (512 in flight).
//! Server CPU comes from /proc/<pid>/stat around each phase. No churn phase: the floor
//! never reads its clients, so it would not see them go.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::clock;
use crate::gateway::{self, Gateway, Peer};
use crate::report::{Connect, Delivery, per};
use crate::rpc::{self, Wire};
use crate::run::{self, Fleet, Plan};

/// Callers of unicast loads (a) and (b).
const CALLERS: usize = 16;
/// Push connections the callers of load (a) share.
const PERSISTENT_CONNECTIONS: usize = 4;

/// The three servers and what they need.
pub struct Servers<'a> {
    pub comet: gateway::Launch<'a>,
    /// The `bun` executable, when it runs here.
    pub bun: Option<PathBuf>,
    pub bun_script: &'a Path,
    /// Which of them to measure, in this order.
    pub only: Vec<String>,
}

/// One server's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub server: String,
    pub clients: u64,
    pub connect_failed: u64,
    pub handshakes_per_cpu_sec: f64,
    pub handshakes_per_sec: f64,
    pub rss_empty: u64,
    pub rss_full: u64,
    pub idle_bytes_per_connection: f64,
    pub broadcast: Delivery,
    /// (a) 16 callers over 4 persistent connections.
    pub unicast_persistent: Delivery,
    /// (b) a new connection per call, 16 at a time.
    pub unicast_per_call: Delivery,
    /// (c) pipelined, 512 in flight on one connection.
    pub unicast_pipelined: Delivery,
}

/// One `compare` run.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub date: String,
    pub command: String,
    pub machine: String,
    pub load_before: String,
    pub load_after: String,
    pub n: usize,
    pub servers: Vec<Figures>,
    /// Why a server was not measured.
    pub skipped: Vec<String>,
}

/// Runs the phases against Comet, the floor and Bun; writes JSON and a Markdown table
/// into `out`, prints the table and puts it into `page` (RESULTS.md) between its markers.
pub fn compare(servers: &Servers<'_>, plan: &Plan, out: &Path, page: &Path) -> anyhow::Result<()> {
    let mut comparison = Comparison {
        date: crate::report::today(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: crate::report::machine(),
        load_before: load(),
        load_after: String::new(),
        n: plan.n,
        servers: Vec::new(),
        skipped: Vec::new(),
    };
    let dir = servers.comet.dir;
    for name in &servers.only {
        eprintln!("compare: {name}");
        let server = match name.as_str() {
            "comet" => Gateway::start(&servers.comet)?,
            "floor" => Gateway::start_peer(&Peer::Floor, &plan.secret, dir)?,
            "bun" => match &servers.bun {
                Some(bun) => {
                    let peer = Peer::Bun {
                        bun,
                        script: servers.bun_script,
                    };
                    Gateway::start_peer(&peer, &plan.secret, dir)?
                }
                None => {
                    comparison
                        .skipped
                        .push("bun: no runnable bun (see --bun); `make bench` installs it".into());
                    continue;
                }
            },
            other => anyhow::bail!("unknown server {other:?} (comet, floor, bun)"),
        };
        eprintln!("  {name}: pid {:?}", server.pid);
        comparison.servers.push(measure(name, &server, plan)?);
    }
    comparison.load_after = load();
    std::fs::create_dir_all(out)?;
    let stamp = comparison.date.replace([' ', ':'], "-");
    let base = out.join(format!("{stamp}-compare-n{}", plan.n));
    std::fs::write(
        base.with_extension("json"),
        serde_json::to_string_pretty(&comparison)?,
    )?;
    let table = table(&comparison);
    std::fs::write(base.with_extension("md"), &table)?;
    println!("{table}");
    eprintln!("compare: wrote {}.json and .md", base.display());
    if let Err(err) = write_latest(page, &table) {
        eprintln!("compare: {} not updated: {err}", page.display());
    }
    Ok(())
}

/// Between these markers `RESULTS.md` shows the latest comparison (inside the part that
/// `comet-bench render` keeps).
const LATEST_BEGIN: &str = "<!-- compare: latest run, written by comet-bench compare -->";
const LATEST_END: &str = "<!-- compare: end -->";

/// Replaces the latest comparison in `page` with `table`.
fn write_latest(page: &Path, table: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(page)?;
    let start = text
        .find(LATEST_BEGIN)
        .ok_or_else(|| anyhow::anyhow!("no {LATEST_BEGIN:?} marker"))?
        + LATEST_BEGIN.len();
    let end = start
        + text[start..]
            .find(LATEST_END)
            .ok_or_else(|| anyhow::anyhow!("no {LATEST_END:?} marker"))?;
    let updated = format!("{}\n{table}\n{}", &text[..start], &text[end..]);
    std::fs::write(page, updated)?;
    Ok(())
}

/// The machine's load average (1, 5, 15 minutes) and runnable/total tasks.
pub(crate) fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn measure(name: &str, server: &Gateway, plan: &Plan) -> anyhow::Result<Figures> {
    std::thread::sleep(Duration::from_secs(1));
    let rss_empty = server.rss_bytes().unwrap_or(0);
    let mut fleet = Fleet(Vec::new());
    let mut connects: Vec<Connect> = Vec::new();
    for target in [plan.n / 2, plan.n] {
        connects.push(run::grow(server, plan, &mut fleet, target)?);
    }
    let clients: u64 = connects.iter().map(|c| c.clients).sum();
    let failed: u64 = connects.iter().map(|c| c.failed).sum();
    let cpu: f64 = connects.iter().map(|c| c.gateway_cpu_secs).sum();
    let wall: f64 = connects.iter().map(|c| c.secs).sum();
    std::thread::sleep(Duration::from_secs(2));
    let rss_full = server.rss_bytes().unwrap_or(0);
    eprintln!("  {name}: {clients} connected, {rss_full} B RSS");
    let broadcast = run::broadcast(server, plan, &mut fleet, clients, None)?;
    eprintln!("  {name}: broadcast done");
    let unicast_persistent = calls(server, plan, &mut fleet, Load::Persistent)?;
    eprintln!("  {name}: unicast (a) done");
    let unicast_per_call = calls(server, plan, &mut fleet, Load::PerCall)?;
    eprintln!("  {name}: unicast (b) done");
    let unicast_pipelined = run::unicast(server, plan, &mut fleet, None)?;
    eprintln!("  {name}: unicast (c) done");
    Ok(Figures {
        server: name.to_owned(),
        clients,
        connect_failed: failed,
        handshakes_per_cpu_sec: per(clients, cpu),
        handshakes_per_sec: per(clients, wall),
        rss_empty,
        rss_full,
        idle_bytes_per_connection: rss_full.saturating_sub(rss_empty) as f64
            / clients.max(1) as f64,
        broadcast,
        unicast_persistent,
        unicast_per_call,
        unicast_pipelined,
    })
}

#[derive(Clone, Copy)]
enum Load {
    /// (a) the callers share 4 persistent connections.
    Persistent,
    /// (b) connect, one call, read the reply, close.
    PerCall,
}

/// A push connection shared by callers: each queues where its reply goes, then writes its
/// call; the reader hands replies out in order.
struct Shared {
    writer: Mutex<(TcpStream, VecDeque<SyncSender<bool>>)>,
}

impl Shared {
    fn call(&self, bytes: &[u8], reply: &SyncSender<bool>) -> std::io::Result<()> {
        let mut guard = self.writer.lock().expect("no caller panics");
        guard.1.push_back(reply.clone());
        guard.0.write_all(bytes)
    }

    fn read_replies(&self, mut reader: BufReader<TcpStream>, wire: Wire) {
        while let Ok(Some(reply)) = rpc::read_reply(&mut reader, wire) {
            let waiting = self.writer.lock().expect("no caller panics").1.pop_front();
            if let Some(waiting) = waiting {
                let _ = waiting.send(rpc::is_ok(&reply));
            }
        }
    }
}

/// 16 callers, one call in flight each, for `plan.unicast_secs`.
fn calls(server: &Gateway, plan: &Plan, fleet: &mut Fleet, load: Load) -> anyhow::Result<Delivery> {
    fleet.collect(0, Duration::ZERO)?;
    let ids = fleet.ids();
    let (addr, wire) = (server.rpc, server.wire);
    let mut shared = Vec::new();
    let mut readers = Vec::new();
    if let Load::Persistent = load {
        for _ in 0..PERSISTENT_CONNECTIONS {
            let stream = TcpStream::connect(addr)?;
            stream.set_nodelay(true)?;
            readers.push(BufReader::new(stream.try_clone()?));
            shared.push(Shared {
                writer: Mutex::new((stream, VecDeque::new())),
            });
        }
    }
    let (done, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let cpu_before = run::cpu(server);
    let started = Instant::now();
    let until = started + Duration::from_secs(plan.unicast_secs);
    std::thread::scope(|scope| {
        for (conn, reader) in shared.iter().zip(readers) {
            scope.spawn(move || conn.read_replies(reader, wire));
        }
        let callers: Vec<_> = (0..CALLERS)
            .map(|caller| {
                let (ids, shared, done, failed) = (&ids, &shared, &done, &failed);
                scope.spawn(move || {
                    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (caller as u64 + 1) << 17;
                    let (tx, rx) = sync_channel(1);
                    let mut seq = 0u64;
                    while Instant::now() < until {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        let to = &ids[(state % ids.len() as u64) as usize];
                        let param = json!({"connections": [to], "msg": clock::stamped(plan.payload, u64::MAX)});
                        seq += 1;
                        let ok = match load {
                            Load::Persistent => {
                                let conn = &shared[caller % shared.len()];
                                let bytes = rpc::encode(wire, "Server.SendToConnections", &param, seq);
                                conn.call(&bytes, &tx).is_ok() && rx.recv().unwrap_or(false)
                            }
                            Load::PerCall => call_once(addr, wire, &param, seq),
                        };
                        done.fetch_add(1, Ordering::Relaxed);
                        if !ok {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for caller in callers {
            let _ = caller.join();
        }
        for conn in &shared {
            let _ = conn
                .writer
                .lock()
                .expect("no caller panics")
                .0
                .shutdown(Shutdown::Both);
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let cpu = run::cpu_since(server, cpu_before);
    let (calls, failed) = (done.into_inner(), failed.into_inner());
    let (messages, latency, _) = fleet.collect(calls - failed, Duration::from_secs(30))?;
    let mut delivery = Delivery::new(messages, calls, secs, cpu, &latency, None, false);
    delivery.rpc_failures = failed;
    Ok(delivery)
}

/// PHP-style: connect, one call, read the reply, close.
fn call_once(addr: SocketAddr, wire: Wire, param: &serde_json::Value, id: u64) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.write_all(&rpc::encode(wire, "Server.SendToConnections", param, id))?;
        let mut reader = BufReader::new(stream);
        Ok(rpc::read_reply(&mut reader, wire)?.is_some_and(|r| rpc::is_ok(&r)))
    };
    attempt().unwrap_or(false)
}

/// The Markdown table: each figure with its ratio to the floor and to Bun.
pub fn table(c: &Comparison) -> String {
    let find = |name: &str| c.servers.iter().find(|f| f.server == name);
    let (comet, floor, bun) = (find("comet"), find("floor"), find("bun"));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} | N = {} | {} | load {} -> {}\n",
        c.date, c.n, c.machine, c.load_before, c.load_after
    );
    let _ = writeln!(
        out,
        "| figure | Comet ÷ floor | Comet ÷ Bun | Comet | floor | Bun |\n|---|---|---|---|---|---|"
    );
    type Pick = fn(&Figures) -> f64;
    let rows: Vec<(&str, Pick)> = vec![
        (
            "unicast (a) 4 persistent conns: pushes per server CPU-s",
            |f| f.unicast_persistent.per_cpu_sec,
        ),
        ("unicast (a): pushes/s", |f| f.unicast_persistent.per_sec),
        ("unicast (a): p50 ms", |f| {
            ms(f.unicast_persistent.latency.p50_us)
        }),
        ("unicast (a): p99 ms", |f| {
            ms(f.unicast_persistent.latency.p99_us)
        }),
        ("unicast (a): p99.9 ms", |f| {
            ms(f.unicast_persistent.latency.p999_us)
        }),
        ("unicast (b) conn per call: pushes per server CPU-s", |f| {
            f.unicast_per_call.per_cpu_sec
        }),
        ("unicast (b): pushes/s", |f| f.unicast_per_call.per_sec),
        ("unicast (b): p50 ms", |f| {
            ms(f.unicast_per_call.latency.p50_us)
        }),
        ("unicast (b): p99 ms", |f| {
            ms(f.unicast_per_call.latency.p99_us)
        }),
        ("unicast (b): p99.9 ms", |f| {
            ms(f.unicast_per_call.latency.p999_us)
        }),
        ("unicast (c) pipelined: pushes per server CPU-s", |f| {
            f.unicast_pipelined.per_cpu_sec
        }),
        ("unicast (c): pushes/s", |f| f.unicast_pipelined.per_sec),
        ("unicast (c): p50 ms", |f| {
            ms(f.unicast_pipelined.latency.p50_us)
        }),
        ("unicast (c): p99 ms", |f| {
            ms(f.unicast_pipelined.latency.p99_us)
        }),
        ("unicast (c): p99.9 ms", |f| {
            ms(f.unicast_pipelined.latency.p999_us)
        }),
        ("broadcast burst: deliveries per server CPU-s", |f| {
            f.broadcast.per_cpu_sec
        }),
        ("broadcast burst: p50 ms", |f| {
            ms(f.broadcast.latency.p50_us)
        }),
        ("handshakes per server CPU-s (signed tokens)", |f| {
            f.handshakes_per_cpu_sec
        }),
        ("handshakes/s", |f| f.handshakes_per_sec),
        ("idle RSS per connection from the empty process, B", |f| {
            f.idle_bytes_per_connection
        }),
    ];
    for (label, pick) in rows {
        let value = |f: Option<&Figures>| f.map(pick);
        let ratio = |to: Option<f64>| match (value(comet), to) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "| {label} | **{}** | **{}** | {} | {} | {} |",
            ratio(value(floor)),
            ratio(value(bun)),
            shown(value(comet)),
            shown(value(floor)),
            shown(value(bun)),
        );
    }
    let failures: Vec<String> = c
        .servers
        .iter()
        .map(|f| {
            format!(
                "{}: {} connects failed, rpc failures a/b/c {}/{}/{}, broadcast {}/{} delivered",
                f.server,
                f.connect_failed,
                f.unicast_persistent.rpc_failures,
                f.unicast_per_call.rpc_failures,
                f.unicast_pipelined.rpc_failures,
                f.broadcast.delivered,
                f.broadcast.expected
            )
        })
        .chain(c.skipped.iter().cloned())
        .collect();
    let _ = writeln!(out, "\n{}", failures.join("; "));
    out
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn shown(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.2}"),
        None => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_table_replaces_only_what_lies_between_the_markers() {
        let page = std::env::temp_dir().join(format!("compare-page-{}.md", std::process::id()));
        let text = format!("before\n{LATEST_BEGIN}\nold table\n{LATEST_END}\nafter\n");
        std::fs::write(&page, text).expect("scratch file");
        write_latest(&page, "new table").expect("markers present");
        let updated = std::fs::read_to_string(&page).expect("written");
        let _ = std::fs::remove_file(&page);
        assert_eq!(
            updated,
            format!("before\n{LATEST_BEGIN}\nnew table\n{LATEST_END}\nafter\n")
        );
    }
}
