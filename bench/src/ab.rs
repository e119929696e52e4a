//! `comet-bench deflate` and `comet-bench recovery`: one gateway feature off, then on (or
//! in the order of `--sides`), each side on a freshly started Comet with the same clients
//! and messages, in one invocation, every figure printed with its on/off ratio.
//!
//! Per side: connect N/2 then N clients (signed tokens), idle RSS at 0, N/2 and N, a burst
//! of broadcasts, the same number spaced 50 ms apart, RSS after them (what recovery
//! keeps), then unicast pipelined (512 in flight) for `--unicast-secs`. Gateway CPU comes
//! from /proc/<pid>/stat around each phase; bytes on the wire are what the clients read
//! from their sockets (frame headers included).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::compare::load;
use crate::gateway::{self, Gateway};
use crate::report::{Connect, Delivery, per};
use crate::run::{self, Fleet, Plan, Stats};

/// One side of the comparison: the gateway's extra configuration and what the clients do.
pub struct Side {
    pub name: String,
    /// Configuration lines for this side's gateway.
    pub config: String,
    pub deflate: bool,
    pub recover: bool,
}

/// One side's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub side: String,
    pub config: String,
    pub clients: u64,
    pub connect_failed: u64,
    /// Connections on which permessage-deflate was negotiated.
    pub negotiated: u64,
    pub handshakes_per_cpu_sec: f64,
    pub rss_empty: u64,
    pub rss_half: u64,
    pub rss_full: u64,
    pub rss_after_broadcasts: u64,
    pub rss_after_unicast: u64,
    /// (RSS at N - RSS empty) / N.
    pub idle_bytes_per_connection: f64,
    /// (RSS at N - RSS at N/2) / (N - N/2).
    pub idle_slope_bytes: f64,
    /// (RSS after the broadcasts - RSS at N idle) / N.
    pub after_broadcasts_bytes_per_connection: f64,
    pub burst: Delivery,
    pub burst_stats: Stats,
    /// CPU-s of the worker processes (the clients) during the burst and its collection.
    pub burst_clients_cpu_secs: f64,
    /// Bytes the clients read per delivery of the burst.
    pub burst_wire_bytes_per_delivery: f64,
    pub spaced: Delivery,
    pub spaced_stats: Stats,
    pub unicast: Option<Delivery>,
    pub unicast_stats: Stats,
}

/// One invocation.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub kind: String,
    pub date: String,
    pub command: String,
    pub machine: String,
    pub load_before: String,
    pub load_after: String,
    pub n: usize,
    /// Bytes of one message as published (message 0 of the plan).
    pub message_bytes: usize,
    pub sides: Vec<Figures>,
}

/// Runs `sides` one after the other, each against a fresh gateway from `launch` with the
/// side's configuration added; writes JSON and Markdown to `out` and prints the table.
pub fn compare(
    kind: &str,
    launch: &gateway::Launch<'_>,
    plan: &Plan,
    sides: &[Side],
    out: &Path,
) -> anyhow::Result<()> {
    let mut comparison = Comparison {
        kind: kind.to_owned(),
        date: crate::report::today(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: crate::report::machine(),
        load_before: load(),
        load_after: String::new(),
        n: plan.n,
        message_bytes: plan.message(0).len(),
        sides: Vec::new(),
    };
    for side in sides {
        eprintln!(
            "{kind}: {} ({})",
            side.name,
            side.config.trim().replace('\n', ", ")
        );
        let config = format!("{}{}", launch.extra, side.config);
        let gateway = Gateway::start(&gateway::Launch {
            extra: &config,
            ..*launch
        })?;
        let side_plan = Plan {
            deflate: side.deflate,
            recover: side.recover,
            secret: plan.secret.clone(),
            ..*plan
        };
        let figures = measure(side, &gateway, &side_plan)?;
        comparison.sides.push(figures);
        drop(gateway);
        std::thread::sleep(Duration::from_secs(2));
    }
    comparison.load_after = load();
    std::fs::create_dir_all(out)?;
    let stamp = comparison.date.replace([' ', ':'], "-");
    let base = out.join(format!("{stamp}-{kind}-n{}", plan.n));
    std::fs::write(
        base.with_extension("json"),
        serde_json::to_string_pretty(&comparison)?,
    )?;
    let table = table(&comparison);
    std::fs::write(base.with_extension("md"), &table)?;
    println!("{table}");
    eprintln!("{kind}: wrote {}.json and .md", base.display());
    Ok(())
}

fn measure(side: &Side, gateway: &Gateway, plan: &Plan) -> anyhow::Result<Figures> {
    std::thread::sleep(Duration::from_secs(1));
    let rss_empty = gateway.rss_bytes().unwrap_or(0);
    let mut fleet = Fleet(Vec::new());
    let mut connects: Vec<Connect> = Vec::new();
    let mut rss = Vec::new();
    for target in [plan.n / 2, plan.n] {
        connects.push(run::grow(gateway, plan, &mut fleet, target)?);
        std::thread::sleep(Duration::from_secs(2));
        rss.push((fleet.clients() as u64, gateway.rss_bytes().unwrap_or(0)));
    }
    let clients: u64 = connects.iter().map(|c| c.clients).sum();
    let failed: u64 = connects.iter().map(|c| c.failed).sum();
    let cpu: f64 = connects.iter().map(|c| c.gateway_cpu_secs).sum();
    let negotiated = fleet.take_stats().negotiated;
    let (half, rss_half) = rss[0];
    let (_, rss_full) = rss[1];
    eprintln!(
        "  {}: {clients} connected ({negotiated} with permessage-deflate), {:.1} MiB RSS",
        side.name,
        rss_full as f64 / 1048576.0
    );
    let clients_cpu = fleet.cpu_secs();
    let burst = run::broadcast(gateway, plan, &mut fleet, clients, None)?;
    let burst_clients_cpu_secs = fleet.cpu_secs() - clients_cpu;
    let burst_stats = fleet.take_stats();
    let spaced = run::broadcast(
        gateway,
        plan,
        &mut fleet,
        clients,
        Some(Duration::from_millis(50)),
    )?;
    let spaced_stats = fleet.take_stats();
    std::thread::sleep(Duration::from_secs(2));
    let rss_after_broadcasts = gateway.rss_bytes().unwrap_or(0);
    eprintln!("  {}: broadcasts done", side.name);
    let unicast = if plan.unicast_secs > 0 {
        Some(run::unicast(gateway, plan, &mut fleet, None)?)
    } else {
        None
    };
    let unicast_stats = fleet.take_stats();
    std::thread::sleep(Duration::from_secs(1));
    let rss_after_unicast = gateway.rss_bytes().unwrap_or(0);
    eprintln!("  {}: unicast done", side.name);
    let signed = |a: u64, b: u64| a as f64 - b as f64;
    Ok(Figures {
        side: side.name.clone(),
        config: side.config.trim().replace('\n', ", "),
        clients,
        connect_failed: failed,
        negotiated,
        handshakes_per_cpu_sec: per(clients, cpu),
        rss_empty,
        rss_half,
        rss_full,
        rss_after_broadcasts,
        rss_after_unicast,
        idle_bytes_per_connection: signed(rss_full, rss_empty) / clients.max(1) as f64,
        idle_slope_bytes: signed(rss_full, rss_half) / clients.saturating_sub(half).max(1) as f64,
        after_broadcasts_bytes_per_connection: signed(rss_after_broadcasts, rss_full)
            / clients.max(1) as f64,
        burst_wire_bytes_per_delivery: burst_stats.wire_bytes as f64
            / burst.delivered.max(1) as f64,
        burst,
        burst_stats,
        burst_clients_cpu_secs,
        spaced,
        spaced_stats,
        unicast,
        unicast_stats,
    })
}

/// The Markdown table: a row per figure, a column per side, and the ratio of the last
/// side to the first.
fn table(c: &Comparison) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "**comet-bench {}**, {}, N = {}, message {} bytes. Machine: {}. \
         Load before: `{}`, after: `{}`. Command: `{}`.\n",
        c.kind, c.date, c.n, c.message_bytes, c.machine, c.load_before, c.load_after, c.command
    );
    let names: Vec<&str> = c.sides.iter().map(|s| s.side.as_str()).collect();
    let ratio_head = match (names.first(), names.last()) {
        (Some(a), Some(b)) if names.len() > 1 => format!(" {b} ÷ {a} |"),
        _ => String::new(),
    };
    let _ = writeln!(out, "| figure | {} |{ratio_head}", names.join(" | "));
    let _ = writeln!(
        out,
        "|---|{}{}",
        "---|".repeat(names.len()),
        if ratio_head.is_empty() { "" } else { "---|" }
    );
    type Get = fn(&Figures) -> Option<f64>;
    let rows: Vec<(&str, Get, usize)> = vec![
        ("clients connected", |f| Some(f.clients as f64), 0),
        (
            "with permessage-deflate negotiated",
            |f| Some(f.negotiated as f64),
            0,
        ),
        (
            "handshakes per gateway CPU-s",
            |f| Some(f.handshakes_per_cpu_sec),
            0,
        ),
        (
            "idle RSS per connection, from empty (B)",
            |f| Some(f.idle_bytes_per_connection),
            0,
        ),
        (
            "idle RSS slope N/2 -> N (B per connection)",
            |f| Some(f.idle_slope_bytes),
            0,
        ),
        (
            "RSS after the broadcasts - idle RSS (B per connection)",
            |f| Some(f.after_broadcasts_bytes_per_connection),
            0,
        ),
        (
            "gateway RSS after the broadcasts (MiB)",
            |f| Some(f.rss_after_broadcasts as f64 / 1048576.0),
            1,
        ),
        (
            "burst: deliveries per gateway CPU-s",
            |f| Some(f.burst.per_cpu_sec),
            0,
        ),
        (
            "burst: deliveries per gateway user CPU-s",
            |f| Some(f.burst.per_user_cpu_sec),
            0,
        ),
        (
            "burst: gateway CPU-s",
            |f| Some(f.burst.gateway_cpu_secs),
            2,
        ),
        (
            "burst: clients' (workers') CPU-s, same cores",
            |f| Some(f.burst_clients_cpu_secs),
            2,
        ),
        (
            "burst: bytes read by the clients per delivery",
            |f| Some(f.burst_wire_bytes_per_delivery),
            0,
        ),
        ("burst: delivered", |f| Some(f.burst.delivered as f64), 0),
        (
            "burst: latency p50 ms",
            |f| Some(f.burst.latency.p50_us as f64 / 1000.0),
            2,
        ),
        (
            "burst: latency p99 ms",
            |f| Some(f.burst.latency.p99_us as f64 / 1000.0),
            2,
        ),
        (
            "burst: publish -> last receipt p99 ms",
            |f| {
                f.burst
                    .last_receipt
                    .as_ref()
                    .map(|l| l.p99_us as f64 / 1000.0)
            },
            2,
        ),
        (
            "50 ms apart: deliveries per gateway CPU-s",
            |f| Some(f.spaced.per_cpu_sec),
            0,
        ),
        (
            "50 ms apart: latency p50 ms",
            |f| Some(f.spaced.latency.p50_us as f64 / 1000.0),
            2,
        ),
        (
            "50 ms apart: latency p99 ms",
            |f| Some(f.spaced.latency.p99_us as f64 / 1000.0),
            2,
        ),
        (
            "unicast pipelined: pushes per gateway CPU-s",
            |f| f.unicast.as_ref().map(|u| u.per_cpu_sec),
            0,
        ),
        (
            "unicast pipelined: pushes delivered",
            |f| f.unicast.as_ref().map(|u| u.delivered as f64),
            0,
        ),
        (
            "unicast pipelined: p50 ms",
            |f| f.unicast.as_ref().map(|u| u.latency.p50_us as f64 / 1000.0),
            2,
        ),
        (
            "unicast pipelined: p99 ms",
            |f| f.unicast.as_ref().map(|u| u.latency.p99_us as f64 / 1000.0),
            2,
        ),
        (
            "RSS after unicast - idle RSS (B per connection)",
            |f| Some((f.rss_after_unicast as f64 - f.rss_full as f64) / f.clients.max(1) as f64),
            0,
        ),
    ];
    for (label, get, digits) in rows {
        let values: Vec<Option<f64>> = c.sides.iter().map(get).collect();
        let cells: Vec<String> = values
            .iter()
            .map(|v| v.map_or("-".into(), |v| format!("{v:.digits$}")))
            .collect();
        // A difference of RSS (it can be negative) has no meaningful ratio: the
        // difference of the sides is given instead.
        let difference = label.contains(" - ");
        let ratio = match (values.first(), values.last()) {
            _ if ratio_head.is_empty() => String::new(),
            (Some(Some(a)), Some(Some(b))) if difference => {
                format!(" {:+.0} (difference) |", b - a)
            }
            (Some(Some(a)), Some(Some(b))) if *a != 0.0 => format!(" {:.2} |", b / a),
            _ => " - |".into(),
        };
        let _ = writeln!(out, "| {label} | {} |{ratio}", cells.join(" | "));
    }
    out.push('\n');
    for f in &c.sides {
        let all = [&f.burst_stats, &f.spaced_stats, &f.unicast_stats];
        let sum = |g: fn(&Stats) -> u64| all.iter().map(|s| g(s)).sum::<u64>();
        let errors: Vec<&String> = all.iter().flat_map(|s| &s.errors).take(3).collect();
        let _ = writeln!(
            out,
            "- {}: {} connect failures; {} readers stopped by an error {errors:?}; recovery \
             numbering: {} seqs skipped, {} repeated, {} messages without the wrapper, {} epoch \
             changes; latency samples {} / {} / {} of {} / {} / {} delivered.",
            f.side,
            f.connect_failed,
            sum(|s| s.read_errors),
            sum(|s| s.seq_gaps),
            sum(|s| s.seq_repeats),
            sum(|s| s.unwrap_errors),
            sum(|s| s.epoch_changes),
            f.burst.latency.samples,
            f.spaced.latency.samples,
            f.unicast.as_ref().map_or(0, |u| u.latency.samples),
            f.burst.delivered,
            f.spaced.delivered,
            f.unicast.as_ref().map_or(0, |u| u.delivered),
        );
    }
    out
}
