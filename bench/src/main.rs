//! `comet-bench`: the load generator and benchmark harness.
//!
//! `comet-bench run` starts a release build of the gateway (signed tokens, so connects
//! measure the gateway), worker processes holding the clients, and drives the scenarios:
//! connect, idle memory, broadcast (burst and spaced), unicast through the push RPC, and
//! churn. It writes a JSON result and re-renders `bench/RESULTS.md` with plots.
//!
//! `comet-bench compare` runs the same phases against Comet, the floor (`comet-bench
//! floor`, src/floor.rs) and the Bun/uWebSockets peer (bench/peers/bun-server.js), back to
//! back, and prints each figure with its ratio to the floor and to Bun.
//!
//! `comet-bench deflate` and `comet-bench recovery` (src/ab.rs) measure one gateway
//! feature off and on, each side on a fresh gateway, back to back, with on/off ratios.

mod ab;
mod clock;
mod compare;
mod dashboard;
mod floor;
mod gateway;
mod report;
mod rpc;
mod run;
mod token;
mod worker;
mod ws;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use argh::FromArgs;

/// Comet's benchmark harness.
#[derive(FromArgs)]
struct Args {
    #[argh(subcommand)]
    command: Sub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Sub {
    Run(RunArgs),
    Compare(CompareArgs),
    Deflate(DeflateArgs),
    Recovery(RecoveryArgs),
    Floor(FloorArgs),
    Render(RenderArgs),
    Dashboard(DashboardArgs),
    Worker(WorkerArgs),
}

/// Run the suite: connect, idle memory, broadcast, unicast, churn.
#[derive(FromArgs)]
#[argh(subcommand, name = "run")]
struct RunArgs {
    /// clients at full size (default 19000)
    #[argh(option, default = "19000")]
    n: usize,
    /// broadcasts per broadcast scenario (default 20)
    #[argh(option, default = "20")]
    broadcasts: usize,
    /// message payload bytes (default 64)
    #[argh(option, default = "64")]
    payload: usize,
    /// offered unicast rate, pushes/s (default 20000)
    #[argh(option, default = "20000")]
    unicast_rate: u64,
    /// seconds of each unicast phase (default 3)
    #[argh(option, default = "3")]
    unicast_secs: u64,
    /// connect/disconnect cycles in the churn phase (default 20000)
    #[argh(option, default = "20000")]
    churn: usize,
    /// handshakes in flight per worker (default 32)
    #[argh(option, default = "32")]
    concurrency: usize,
    /// connects per second across all workers (default 0: as fast as they go)
    #[argh(option, default = "0")]
    rate: u64,
    /// start a local etcd and register the gateway in it (measures with registration on)
    #[argh(switch)]
    etcd: bool,
    /// gateway shards (default 2)
    #[argh(option, default = "2")]
    shards: usize,
    /// the comet binary (default target/release/comet)
    #[argh(option, default = "PathBuf::from(\"target/release/comet\")")]
    binary: PathBuf,
    /// an already running server's client address instead of starting one (ip:port)
    #[argh(option)]
    ws: Option<SocketAddr>,
    /// its push RPC address (ip:port), with --ws
    #[argh(option)]
    rpc: Option<SocketAddr>,
    /// its pid, to measure its CPU and memory, with --ws
    #[argh(option)]
    pid: Option<u32>,
    /// its signed-token secret, with --ws
    #[argh(option, default = "String::from(\"bench-secret-0123456789\")")]
    secret: String,
    /// where results go (default bench/results)
    #[argh(option, default = "PathBuf::from(\"bench/results\")")]
    out: PathBuf,
    /// clients offer permessage-deflate and inflate compressed frames (the gateway
    /// compresses only with --set websocket_compression=on)
    #[argh(switch)]
    deflate: bool,
    /// clients opt in to recovery ("recover": true) and read the {"seq","epoch","msg"}
    /// wrapper (needs --set recovery_window=N)
    #[argh(switch)]
    recover: bool,
    /// messages are realistic JSON of about --payload bytes instead of dots
    #[argh(switch)]
    payload_json: bool,
    /// a configuration line for the started gateway, KEY=VALUE (repeatable)
    #[argh(option)]
    set: Vec<String>,
}

/// permessage-deflate off, then on: ~2 KB JSON broadcasts at N, each side on a fresh
/// gateway, every figure with its on/off ratio.
#[derive(FromArgs)]
#[argh(subcommand, name = "deflate")]
struct DeflateArgs {
    #[argh(option, default = "19000")]
    /// clients at full size (default 19000)
    n: usize,
    #[argh(option, default = "20")]
    /// broadcasts per broadcast phase (default 20)
    broadcasts: usize,
    #[argh(option, default = "2048")]
    /// bytes of the JSON message, about (default 2048)
    payload: usize,
    #[argh(option, default = "3")]
    /// seconds of the pipelined unicast phase, 0 for none (default 3)
    unicast_secs: u64,
    #[argh(option, default = "6")]
    /// websocket_compression_level of the "on" side (default 6)
    level: u32,
    #[argh(option, default = "256")]
    /// websocket_compression_min_size of the "on" side (default 256)
    min_size: usize,
    #[argh(option, default = "String::from(\"off,on\")")]
    /// the sides, in order (default off,on)
    sides: String,
    #[argh(option, default = "32")]
    /// handshakes in flight per worker (default 32)
    concurrency: usize,
    #[argh(option, default = "2")]
    /// gateway shards (default 2)
    shards: usize,
    #[argh(option, default = "PathBuf::from(\"target/release/comet\")")]
    /// the comet binary (default target/release/comet)
    binary: PathBuf,
    #[argh(option, default = "PathBuf::from(\"bench/results/ab\")")]
    /// where results go (default bench/results/ab)
    out: PathBuf,
}

/// Recovery off, then on (clients opting in): broadcasts and unicast at N, each side on
/// a fresh gateway, every figure with its on/off ratio.
#[derive(FromArgs)]
#[argh(subcommand, name = "recovery")]
struct RecoveryArgs {
    #[argh(option, default = "19000")]
    /// clients at full size (default 19000)
    n: usize,
    #[argh(option, default = "20")]
    /// broadcasts per broadcast phase (default 20)
    broadcasts: usize,
    #[argh(option, default = "64")]
    /// message payload bytes (default 64)
    payload: usize,
    #[argh(option, default = "3")]
    /// seconds of the pipelined unicast phase, 0 for none (default 3)
    unicast_secs: u64,
    #[argh(option, default = "32")]
    /// recovery_window of the "on" side (default 32)
    window: usize,
    #[argh(option, default = "String::from(\"off,on\")")]
    /// the sides, in order (default off,on)
    sides: String,
    #[argh(option, default = "32")]
    /// handshakes in flight per worker (default 32)
    concurrency: usize,
    #[argh(option, default = "2")]
    /// gateway shards (default 2)
    shards: usize,
    #[argh(option, default = "PathBuf::from(\"target/release/comet\")")]
    /// the comet binary (default target/release/comet)
    binary: PathBuf,
    #[argh(option, default = "PathBuf::from(\"bench/results/ab\")")]
    /// where results go (default bench/results/ab)
    out: PathBuf,
}

/// Comet, the floor and Bun/uWebSockets back to back: every figure with its ratio to the
/// floor and to Bun.
#[derive(FromArgs)]
#[argh(subcommand, name = "compare")]
struct CompareArgs {
    /// clients at full size (default 10000)
    #[argh(option, default = "10000")]
    n: usize,
    /// broadcasts in the burst (default 20)
    #[argh(option, default = "20")]
    broadcasts: usize,
    /// message payload bytes (default 64)
    #[argh(option, default = "64")]
    payload: usize,
    /// seconds of each unicast load (default 3)
    #[argh(option, default = "3")]
    unicast_secs: u64,
    /// handshakes in flight per worker (default 32)
    #[argh(option, default = "32")]
    concurrency: usize,
    /// comet shards (default 2)
    #[argh(option, default = "2")]
    shards: usize,
    /// the comet binary (default target/release/comet)
    #[argh(option, default = "PathBuf::from(\"target/release/comet\")")]
    binary: PathBuf,
    /// the bun executable (default target/bun/node_modules/bun/bin/bun.exe, as
    /// `npm install bun` in target/bun leaves it); skipped when it does not run
    #[argh(
        option,
        default = "PathBuf::from(\"target/bun/node_modules/bun/bin/bun.exe\")"
    )]
    bun: PathBuf,
    /// the Bun server script (default bench/peers/bun-server.js)
    #[argh(option, default = "PathBuf::from(\"bench/peers/bun-server.js\")")]
    bun_script: PathBuf,
    /// signed-token secret of all three servers
    #[argh(option, default = "String::from(\"bench-secret-0123456789\")")]
    secret: String,
    /// the servers to measure, in order (default comet,floor,bun)
    #[argh(option, default = "String::from(\"comet,floor,bun\")")]
    servers: String,
    /// where results go (default bench/results/compare)
    #[argh(option, default = "PathBuf::from(\"bench/results/compare\")")]
    out: PathBuf,
    /// the page whose latest-comparison block is rewritten (default bench/RESULTS.md)
    #[argh(option, default = "PathBuf::from(\"bench/RESULTS.md\")")]
    page: PathBuf,
}

/// (internal) the floor server: the least work on Comet's wire contract.
#[derive(FromArgs)]
#[argh(subcommand, name = "floor")]
struct FloorArgs {
    /// client (WebSocket) port on 127.0.0.1
    #[argh(option)]
    ws_port: u16,
    /// push RPC port on 127.0.0.1
    #[argh(option)]
    rpc_port: u16,
    /// signed-token secret
    #[argh(option)]
    secret: String,
}

/// Draw the Grafana dashboard's panels (docs/dashboard/comet.json) as one SVG from a live
/// node's /metrics, scraped while you run load against it.
#[derive(FromArgs)]
#[argh(subcommand, name = "dashboard")]
struct DashboardArgs {
    /// the node's admin address (admin_addr), ip:port
    #[argh(option)]
    admin: SocketAddr,
    /// its admin_token, if set
    #[argh(option, default = "String::new()")]
    token: String,
    /// the dashboard (default docs/dashboard/comet.json)
    #[argh(option, default = "PathBuf::from(\"docs/dashboard/comet.json\")")]
    dashboard: PathBuf,
    /// seconds to scrape (default 60)
    #[argh(option, default = "60")]
    secs: u64,
    /// seconds between scrapes (default 1)
    #[argh(option, default = "1.0")]
    every: f64,
    /// the SVG written (default bench/plots/dashboard.svg)
    #[argh(option, default = "PathBuf::from(\"bench/plots/dashboard.svg\")")]
    out: PathBuf,
}

/// Re-render bench/RESULTS.md from the stored results.
#[derive(FromArgs)]
#[argh(subcommand, name = "render")]
struct RenderArgs {
    /// results directory (default bench/results)
    #[argh(option, default = "PathBuf::from(\"bench/results\")")]
    results: PathBuf,
}

/// (internal) a load worker process.
#[derive(FromArgs)]
#[argh(subcommand, name = "worker")]
struct WorkerArgs {
    #[argh(option)]
    /// server address
    server: SocketAddr,
    #[argh(option)]
    /// source address
    source: IpAddr,
    #[argh(option)]
    /// conn_id prefix
    prefix: String,
    #[argh(option)]
    /// connections
    count: usize,
    #[argh(option)]
    /// handshakes in flight
    concurrency: usize,
    #[argh(option)]
    /// token secret
    secret: String,
    #[argh(option, default = "0")]
    /// connects per second
    rate: u64,
    #[argh(switch)]
    /// offer permessage-deflate
    deflate: bool,
    #[argh(switch)]
    /// opt in to recovery
    recover: bool,
}

fn main() -> anyhow::Result<()> {
    let args: Args = argh::from_env();
    match args.command {
        Sub::Worker(w) => worker::run(worker::WorkerPlan {
            server: w.server,
            source: w.source,
            prefix: w.prefix,
            count: w.count,
            concurrency: w.concurrency,
            rate: w.rate,
            secret: w.secret,
            deflate: w.deflate,
            recover: w.recover,
        }),
        Sub::Render(r) => report::render(&r.results, &results_page(&r.results)),
        Sub::Dashboard(d) => {
            dashboard::render(d.admin, &d.token, &d.dashboard, d.secs, d.every, &d.out)
        }
        Sub::Run(r) => run_suite(r),
        Sub::Compare(c) => run_compare(c),
        Sub::Deflate(d) => run_deflate(d),
        Sub::Recovery(r) => run_recovery(r),
        Sub::Floor(f) => floor::serve(
            std::net::TcpListener::bind(("127.0.0.1", f.ws_port))?,
            std::net::TcpListener::bind(("127.0.0.1", f.rpc_port))?,
            &f.secret,
        ),
    }
}

fn run_suite(args: RunArgs) -> anyhow::Result<()> {
    let scratch = std::env::temp_dir().join(format!("comet-bench-{}", std::process::id()));
    let extra: String = args.set.iter().map(|line| format!("{line}\n")).collect();
    let gateway = match (args.ws, args.rpc) {
        (Some(ws), Some(rpc)) => gateway::Gateway::external(ws, rpc, args.pid),
        (None, None) => gateway::Gateway::start(&gateway::Launch {
            binary: &args.binary,
            shards: args.shards,
            secret: &args.secret,
            dir: &scratch,
            etcd: args.etcd,
            extra: &extra,
        })?,
        _ => anyhow::bail!("--ws and --rpc go together"),
    };
    let plan = run::Plan {
        n: args.n,
        broadcasts: args.broadcasts,
        payload: args.payload.max(40),
        unicast_rate: args.unicast_rate,
        unicast_secs: args.unicast_secs,
        churn: args.churn,
        concurrency: args.concurrency,
        rate: args.rate,
        secret: args.secret,
        deflate: args.deflate,
        recover: args.recover,
        json_payload: args.payload_json,
    };
    eprintln!(
        "comet-bench: {} clients against {} (pid {:?})",
        plan.n, gateway.ws, gateway.pid
    );
    let mut results = run::suite(&gateway, &plan)?;
    results.gateway = if args.ws.is_some() {
        format!("external server at {}", gateway.ws)
    } else {
        format!("comet {} ({} shards)", args.binary.display(), args.shards)
    };
    std::fs::create_dir_all(&args.out)?;
    let stamp = results.date.replace([' ', ':'], "-");
    let path = args.out.join(format!("{stamp}-n{}.json", plan.n));
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    eprintln!("comet-bench: wrote {}", path.display());
    report::render(&args.out, &results_page(&args.out))?;
    Ok(())
}

fn run_compare(args: CompareArgs) -> anyhow::Result<()> {
    let scratch = std::env::temp_dir().join(format!("comet-bench-{}", std::process::id()));
    let plan = run::Plan {
        n: args.n,
        broadcasts: args.broadcasts,
        payload: args.payload.max(40),
        unicast_rate: 0,
        unicast_secs: args.unicast_secs,
        churn: 0,
        concurrency: args.concurrency,
        rate: 0,
        secret: args.secret.clone(),
        deflate: false,
        recover: false,
        json_payload: false,
    };
    let bun = runnable(&args.bun).then_some(args.bun.clone());
    if bun.is_none() {
        eprintln!(
            "compare: {} does not run; Bun is skipped (npm install bun in target/bun)",
            args.bun.display()
        );
    }
    let servers = compare::Servers {
        comet: gateway::Launch {
            binary: &args.binary,
            shards: args.shards,
            secret: &args.secret,
            dir: &scratch,
            etcd: false,
            extra: "",
        },
        bun,
        bun_script: &args.bun_script,
        only: args.servers.split(',').map(str::to_owned).collect(),
    };
    compare::compare(&servers, &plan, &args.out, &args.page)
}

/// What `deflate` and `recovery` share: the plan and the launch of each side's gateway.
struct Ab<'a> {
    n: usize,
    broadcasts: usize,
    payload: usize,
    unicast_secs: u64,
    concurrency: usize,
    shards: usize,
    binary: &'a std::path::Path,
    json_payload: bool,
}

fn run_ab(kind: &str, ab: Ab<'_>, sides: &[ab::Side], out: &std::path::Path) -> anyhow::Result<()> {
    let secret = String::from("bench-secret-0123456789");
    let scratch = std::env::temp_dir().join(format!("comet-bench-{}", std::process::id()));
    let plan = run::Plan {
        n: ab.n,
        broadcasts: ab.broadcasts,
        payload: ab.payload.max(40),
        unicast_rate: 0,
        unicast_secs: ab.unicast_secs,
        churn: 0,
        concurrency: ab.concurrency,
        rate: 0,
        secret: secret.clone(),
        deflate: false,
        recover: false,
        json_payload: ab.json_payload,
    };
    let launch = gateway::Launch {
        binary: ab.binary,
        shards: ab.shards,
        secret: &secret,
        dir: &scratch,
        etcd: false,
        extra: "",
    };
    ab::compare(kind, &launch, &plan, sides, out)
}

/// The sides named in `order` (comma-separated), from `off` and `on`.
fn pick(order: &str, off: ab::Side, on: ab::Side) -> anyhow::Result<Vec<ab::Side>> {
    let (mut off, mut on) = (Some(off), Some(on));
    order
        .split(',')
        .map(|name| match name.trim() {
            "off" => off.take(),
            "on" => on.take(),
            _ => None,
        })
        .map(|side| side.ok_or_else(|| anyhow::anyhow!("--sides: off and on, each once")))
        .collect()
}

fn run_deflate(args: DeflateArgs) -> anyhow::Result<()> {
    // Both sides' clients offer the extension, as browsers do; only "on" answers it.
    let sides = pick(
        &args.sides,
        ab::Side {
            name: "off".into(),
            config: "websocket_compression=off\n".into(),
            deflate: true,
            recover: false,
        },
        ab::Side {
            name: "on".into(),
            config: format!(
                "websocket_compression=on\nwebsocket_compression_level={}\n\
                 websocket_compression_min_size={}\n",
                args.level, args.min_size
            ),
            deflate: true,
            recover: false,
        },
    )?;
    let ab = Ab {
        n: args.n,
        broadcasts: args.broadcasts,
        payload: args.payload,
        unicast_secs: args.unicast_secs,
        concurrency: args.concurrency,
        shards: args.shards,
        binary: &args.binary,
        json_payload: true,
    };
    run_ab("deflate", ab, &sides, &args.out)
}

fn run_recovery(args: RecoveryArgs) -> anyhow::Result<()> {
    let sides = pick(
        &args.sides,
        ab::Side {
            name: "off".into(),
            config: "recovery_window=0\n".into(),
            deflate: false,
            recover: false,
        },
        ab::Side {
            name: "on".into(),
            config: format!("recovery_window={}\n", args.window),
            deflate: false,
            recover: true,
        },
    )?;
    let ab = Ab {
        n: args.n,
        broadcasts: args.broadcasts,
        payload: args.payload,
        unicast_secs: args.unicast_secs,
        concurrency: args.concurrency,
        shards: args.shards,
        binary: &args.binary,
        json_payload: false,
    };
    run_ab("recovery", ab, &sides, &args.out)
}

/// Whether `program --version` runs and succeeds.
fn runnable(program: &std::path::Path) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `RESULTS.md` beside the results directory (bench/results -> bench/RESULTS.md).
fn results_page(results: &std::path::Path) -> PathBuf {
    results
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join("RESULTS.md")
}
