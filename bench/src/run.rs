//! The orchestrator: starts the gateway and the worker processes, drives the scenarios,
//! measures the gateway's CPU time and memory around each, and returns the figures.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::Deserializer;
use serde_json::{Value, json};

use crate::clock;
use crate::gateway::{self, Gateway};
use crate::report::{Churn, Connect, Delivery, Idle, Latency, Results, per};
use crate::rpc::{self, Rpc};

/// Connections one worker process holds at most (descriptor limit 20,000 here).
pub const PER_WORKER: usize = 9_500;

/// What to run.
pub struct Plan {
    /// Clients at full size.
    pub n: usize,
    /// Broadcasts per broadcast scenario.
    pub broadcasts: usize,
    /// Payload bytes.
    pub payload: usize,
    /// Offered unicast rate (pushes per second).
    pub unicast_rate: u64,
    /// Unicast duration.
    pub unicast_secs: u64,
    /// Connect/disconnect cycles.
    pub churn: usize,
    /// Handshakes in flight per worker.
    pub concurrency: usize,
    /// Connects per second, all workers together (0: as fast as they go).
    pub rate: u64,
    /// Signed-token secret the gateway was started with.
    pub secret: String,
    /// Clients offer permessage-deflate (`comet-bench deflate`).
    pub deflate: bool,
    /// Clients opt in to recovery (`comet-bench recovery`).
    pub recover: bool,
    /// Messages are realistic JSON of about `payload` bytes ([`clock::stamped_json`])
    /// instead of `t=..;s=..;` padded with dots.
    pub json_payload: bool,
}

impl Plan {
    /// The stamped message number `seq` of this plan.
    pub fn message(&self, seq: u64) -> String {
        if self.json_payload {
            clock::stamped_json(self.payload, seq)
        } else {
            clock::stamped(self.payload, seq)
        }
    }
}

/// What the workers saw besides latency, summed since the last [`Fleet::take_stats`].
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    /// Bytes the clients read from their sockets.
    pub wire_bytes: u64,
    /// Connections on which permessage-deflate was negotiated (at connect time).
    pub negotiated: u64,
    /// Readers stopped by an error, and the first few errors.
    pub read_errors: u64,
    pub errors: Vec<String>,
    /// Recovery numbering: seqs skipped, seen again, messages without the wrapper,
    /// epoch changes within a connection.
    pub seq_gaps: u64,
    pub seq_repeats: u64,
    pub unwrap_errors: u64,
    pub epoch_changes: u64,
}

impl Stats {
    fn add(&mut self, report: &Value) {
        let n = |key: &str| report[key].as_u64().unwrap_or(0);
        self.wire_bytes += n("wire_bytes");
        self.read_errors += n("read_errors");
        self.seq_gaps += n("seq_gaps");
        self.seq_repeats += n("seq_repeats");
        self.unwrap_errors += n("unwrap_errors");
        self.epoch_changes += n("epoch_changes");
        for e in report["errors"].as_array().into_iter().flatten() {
            if self.errors.len() < 5
                && let Some(e) = e.as_str()
            {
                self.errors.push(e.to_owned());
            }
        }
    }
}

pub(crate) struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Its clients are `prefix` + 0..count.
    prefix: String,
    count: usize,
    /// What its reports said besides latency, since the last take.
    stats: Stats,
}

impl Worker {
    /// Worker `index` connects from 127.0.0.(2 + index): each source address has its own
    /// ephemeral port range.
    fn spawn(
        index: usize,
        server: SocketAddr,
        count: usize,
        plan: &Plan,
    ) -> anyhow::Result<Worker> {
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + index as u8));
        let prefix = format!("w{index}-");
        let mut child = Command::new(std::env::current_exe()?)
            .args([
                "worker",
                "--server",
                &server.to_string(),
                "--source",
                &source.to_string(),
            ])
            .args(["--prefix", &prefix, "--count", &count.to_string()])
            .args(["--rate", &(plan.rate / workers_at_once(plan)).to_string()])
            .args([
                "--concurrency",
                &plan.concurrency.to_string(),
                "--secret",
                &plan.secret,
            ])
            .args(plan.deflate.then_some("--deflate"))
            .args(plan.recover.then_some("--recover"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start a worker")?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Worker {
            child,
            stdin,
            stdout,
            prefix,
            count,
            stats: Stats::default(),
        })
    }

    fn send(&mut self, command: Value) -> anyhow::Result<()> {
        writeln!(self.stdin, "{command}")?;
        Ok(())
    }

    fn expect(&mut self, event: &str) -> anyhow::Result<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.stdout.read_line(&mut line)? == 0 {
                bail!("a worker exited while waiting for {event}");
            }
            let value: Value = serde_json::from_str(&line)?;
            if value["event"] == event {
                return Ok(value);
            }
            if value["event"] == "progress" {
                eprint!(
                    "\r  {}: {:>6} / {} connected ",
                    self.prefix, value["done"], value["of"]
                );
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.send(json!({"cmd": "quit"}));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Workers that connect at the same time (one connect phase adds at most this many).
fn workers_at_once(plan: &Plan) -> u64 {
    (plan.n / 2).div_ceil(PER_WORKER).max(1) as u64
}

/// The workers of a run, together.
pub(crate) struct Fleet(pub(crate) Vec<Worker>);

impl Fleet {
    pub(crate) fn clients(&self) -> usize {
        self.0.iter().map(|w| w.count).sum()
    }

    /// CPU time (user + system) of all worker processes so far, seconds: what the clients
    /// cost (reading, inflating, parsing), on the same cores as the gateway here.
    pub(crate) fn cpu_secs(&self) -> f64 {
        self.0
            .iter()
            .filter_map(|w| {
                let stat = std::fs::read_to_string(format!("/proc/{}/stat", w.child.id())).ok()?;
                let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
                let user: f64 = fields.get(11)?.parse().ok()?;
                let system: f64 = fields.get(12)?.parse().ok()?;
                Some(user + system)
            })
            .sum::<f64>()
            // SAFETY: sysconf has no preconditions.
            / unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
    }

    /// The workers' counters since the last take (`negotiated` is not reset: it is the
    /// connections' state).
    pub(crate) fn take_stats(&mut self) -> Stats {
        let mut total = Stats::default();
        for worker in &mut self.0 {
            let stats = std::mem::take(&mut worker.stats);
            worker.stats.negotiated = stats.negotiated;
            total.wire_bytes += stats.wire_bytes;
            total.negotiated += stats.negotiated;
            total.read_errors += stats.read_errors;
            total.seq_gaps += stats.seq_gaps;
            total.seq_repeats += stats.seq_repeats;
            total.unwrap_errors += stats.unwrap_errors;
            total.epoch_changes += stats.epoch_changes;
            for e in stats.errors {
                if total.errors.len() < 5 {
                    total.errors.push(e);
                }
            }
        }
        total
    }

    pub(crate) fn ids(&self) -> Vec<String> {
        self.0
            .iter()
            .flat_map(|w| (0..w.count).map(move |i| format!("{}{i}", w.prefix)))
            .collect()
    }

    fn each(&mut self, command: Value, event: &str) -> anyhow::Result<Vec<Value>> {
        for worker in &mut self.0 {
            worker.send(command.clone())?;
        }
        self.0.iter_mut().map(|w| w.expect(event)).collect()
    }

    fn connected(&mut self) -> anyhow::Result<(u64, u64, Vec<String>)> {
        let mut ok = 0;
        let mut failed = 0;
        let mut errors = Vec::new();
        for worker in &mut self.0 {
            let v = worker.expect("connected")?;
            worker.stats.negotiated = v["negotiated"].as_u64().unwrap_or(0);
            ok += v["ok"].as_u64().unwrap_or(0);
            failed += v["failed"].as_u64().unwrap_or(0);
            errors.extend(
                v["errors"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.as_str().map(str::to_owned)),
            );
        }
        Ok((ok, failed, errors))
    }

    /// Polls reports until `expected` messages arrived (or `limit` passes); merges them.
    pub(crate) fn collect(
        &mut self,
        expected: u64,
        limit: Duration,
    ) -> anyhow::Result<(u64, Histogram<u64>, Vec<u64>)> {
        let deadline = Instant::now() + limit;
        let mut messages = 0;
        let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut last: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        loop {
            for worker in &mut self.0 {
                worker.send(json!({"cmd": "report"}))?;
            }
            for worker in &mut self.0 {
                let report = worker.expect("report")?;
                worker.stats.add(&report);
                messages += report["messages"].as_u64().unwrap_or(0);
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(report["latency_hist"].as_str().unwrap_or(""))?;
                if !bytes.is_empty() {
                    let h: Histogram<u64> =
                        Deserializer::new().deserialize(&mut bytes.as_slice())?;
                    latency.add(h)?;
                }
                if let Some(map) = report["last_receipt_us"].as_object() {
                    for (seq, us) in map {
                        let slot = last.entry(seq.parse()?).or_default();
                        *slot = (*slot).max(us.as_u64().unwrap_or(0));
                    }
                }
            }
            if messages >= expected || Instant::now() >= deadline {
                return Ok((messages, latency, last.into_values().collect()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Gateway CPU time so far: (user + system, user), seconds.
pub(crate) fn cpu(gateway: &Gateway) -> (f64, f64) {
    gateway
        .cpu_split()
        .map_or((f64::NAN, f64::NAN), |(user, system)| (user + system, user))
}

/// CPU used since `before`: (total, user).
pub(crate) fn cpu_since(gateway: &Gateway, before: (f64, f64)) -> (f64, f64) {
    let now = cpu(gateway);
    (now.0 - before.0, now.1 - before.1)
}

/// Runs the whole suite against `gateway`.
pub fn suite(gateway: &Gateway, plan: &Plan) -> anyhow::Result<Results> {
    let mut results = Results::new(plan.n);
    results.idle.push(Idle::sample(gateway, 0));
    let half = plan.n / 2;
    let mut fleet = Fleet(Vec::new());
    for target in [half, plan.n] {
        let connect = grow(gateway, plan, &mut fleet, target)?;
        eprintln!(
            "  {target} clients connected ({:.0} handshakes/s)",
            connect.per_sec
        );
        results.connect.push(connect);
        std::thread::sleep(Duration::from_secs(2));
        let clients = fleet.clients() as u64;
        results.idle.push(Idle::sample(gateway, clients));
        results
            .broadcast_burst
            .push(broadcast(gateway, plan, &mut fleet, clients, None)?);
        eprintln!("  burst broadcast to {clients}: done");
    }
    results.broadcast_spaced = Some(broadcast(
        gateway,
        plan,
        &mut fleet,
        plan.n as u64,
        Some(Duration::from_millis(50)),
    )?);
    results.rss_after_broadcasts = gateway.rss_bytes();
    eprintln!("  spaced broadcast: done");
    results.unicast = Some(unicast(gateway, plan, &mut fleet, Some(plan.unicast_rate))?);
    results.unicast_max = Some(unicast(gateway, plan, &mut fleet, None)?);
    eprintln!("  unicast: done");
    fleet.each(json!({"cmd": "close"}), "closed")?;
    std::thread::sleep(Duration::from_secs(2));
    results.churn = Some(churn(gateway, plan, &mut fleet)?);
    eprintln!("  churn: done");
    Ok(results)
}

/// Adds workers until `target` clients are connected; returns the connect figures.
pub(crate) fn grow(
    gateway: &Gateway,
    plan: &Plan,
    fleet: &mut Fleet,
    target: usize,
) -> anyhow::Result<Connect> {
    let cpu_before = cpu(gateway);
    let started = Instant::now();
    let mut added = Fleet(Vec::new());
    let mut remaining = target.saturating_sub(fleet.clients());
    while remaining > 0 {
        let count = remaining.min(PER_WORKER);
        let index = fleet.0.len() + added.0.len();
        added.0.push(Worker::spawn(index, gateway.ws, count, plan)?);
        remaining -= count;
    }
    let (ok, failed, errors) = added.connected()?;
    eprintln!();
    let secs = started.elapsed().as_secs_f64();
    let (cpu_secs, user_secs) = cpu_since(gateway, cpu_before);
    fleet.0.append(&mut added.0);
    if failed > 0 {
        eprintln!("  {failed} connects failed, e.g. {errors:?}");
    }
    Ok(Connect {
        clients: ok,
        failed,
        secs,
        per_sec: per(ok, secs),
        gateway_cpu_secs: cpu_secs,
        per_cpu_sec: per(ok, cpu_secs),
        per_user_cpu_sec: per(ok, user_secs),
    })
}

pub(crate) fn broadcast(
    gateway: &Gateway,
    plan: &Plan,
    fleet: &mut Fleet,
    clients: u64,
    spacing: Option<Duration>,
) -> anyhow::Result<Delivery> {
    fleet.collect(0, Duration::ZERO)?;
    let mut rpc = Rpc::connect(gateway.rpc, gateway.wire)?;
    let cpu_before = cpu(gateway);
    let started = Instant::now();
    for seq in 0..plan.broadcasts as u64 {
        let reply = rpc.call("Server.Broadcast", json!({"msg": plan.message(seq)}))?;
        if reply["result"]["code"] != json!(20000) {
            bail!("broadcast failed: {reply}");
        }
        if let Some(spacing) = spacing {
            std::thread::sleep(spacing);
        }
    }
    let expected = clients * plan.broadcasts as u64;
    let (messages, latency, last) = fleet.collect(expected, Duration::from_secs(60))?;
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_since(gateway, cpu_before);
    Ok(Delivery::new(
        messages,
        expected,
        secs,
        cpu,
        &latency,
        Some(last),
        spacing.is_some(),
    ))
}

/// Pushes to one random client at a time through one pipelined RPC connection, at
/// `rate` pushes per second (or as fast as replies come back with 512 in flight).
pub(crate) fn unicast(
    gateway: &Gateway,
    plan: &Plan,
    fleet: &mut Fleet,
    rate: Option<u64>,
) -> anyhow::Result<Delivery> {
    fleet.collect(0, Duration::ZERO)?;
    let stream = TcpStream::connect(gateway.rpc)?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let closer = stream.try_clone()?;
    let mut writer = std::io::BufWriter::new(stream);
    let answered = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let wire = gateway.wire;
    let reading = {
        let (answered, failed) = (answered.clone(), failed.clone());
        std::thread::spawn(move || {
            while let Ok(Some(reply)) = rpc::read_reply(&mut reader, wire) {
                if !rpc::is_ok(&reply) {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                answered.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let ids = fleet.ids();
    let cpu_before = cpu(gateway);
    let started = Instant::now();
    let duration = Duration::from_secs(plan.unicast_secs);
    let mut seq = 0u64;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    while started.elapsed() < duration {
        if let Some(rate) = rate {
            let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            if seq >= due {
                writer.flush()?;
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
        } else if seq.saturating_sub(answered.load(Ordering::Relaxed)) >= 512 {
            writer.flush()?;
            std::thread::yield_now();
            continue;
        }
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let to = &ids[(state % ids.len() as u64) as usize];
        let param = json!({"connections": [to], "msg": plan.message(u64::MAX)});
        writer.write_all(&rpc::encode(wire, "Server.SendToConnections", &param, seq))?;
        seq += 1;
    }
    writer.flush()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while answered.load(Ordering::SeqCst) < seq && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_since(gateway, cpu_before);
    drop(writer);
    let _ = closer.shutdown(std::net::Shutdown::Both);
    let (messages, latency, _) =
        fleet.collect(seq - failed.load(Ordering::SeqCst), Duration::from_secs(30))?;
    let _ = reading.join();
    let mut delivery = Delivery::new(messages, seq, secs, cpu, &latency, None, rate.is_some());
    delivery.offered_rate = rate;
    delivery.rpc_failures = failed.load(Ordering::SeqCst);
    Ok(delivery)
}

fn churn(gateway: &Gateway, plan: &Plan, fleet: &mut Fleet) -> anyhow::Result<Churn> {
    let rss_before = gateway.rss_bytes().unwrap_or(0);
    let per_worker = plan.churn / fleet.0.len().max(1);
    let cpu_before = cpu(gateway);
    let started = Instant::now();
    let reports = fleet.each(json!({"cmd": "churn", "cycles": per_worker}), "churned")?;
    let secs = started.elapsed().as_secs_f64();
    let (cpu_secs, _) = cpu_since(gateway, cpu_before);
    let failed: u64 = reports
        .iter()
        .map(|r| r["failed"].as_u64().unwrap_or(0))
        .sum();
    let cycles = (per_worker * fleet.0.len()) as u64;
    std::thread::sleep(Duration::from_secs(2));
    Ok(Churn {
        cycles,
        failed,
        secs,
        per_sec: per(cycles, secs),
        per_cpu_sec: per(cycles, cpu_secs),
        rss_before,
        rss_after: gateway.rss_bytes().unwrap_or(0),
        kernel_tcp_bytes: gateway::kernel_tcp_bytes(),
    })
}

impl Latency {
    /// Percentiles of a histogram in microseconds.
    pub fn of(h: &Histogram<u64>) -> Latency {
        Latency {
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            samples: h.len(),
        }
    }
}
