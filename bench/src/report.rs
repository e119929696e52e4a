//! Results: the figures of one run (written as JSON), and `bench/RESULTS.md` rendered
//! from every stored run, with SVG plots.

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::gateway::{self, Gateway};

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub samples: u64,
}

/// `count / secs`, or 0 when no time was measured (CPU time comes in 10 ms ticks, so a
/// short phase can show none); JSON has no infinity.
pub fn per(count: u64, secs: f64) -> f64 {
    if secs > 0.0 && secs.is_finite() {
        count as f64 / secs
    } else {
        0.0
    }
}

/// Memory with `clients` idle clients connected.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Idle {
    pub clients: u64,
    pub rss_bytes: u64,
    pub kernel_tcp_bytes: u64,
}

impl Idle {
    /// Samples the gateway's RSS and the kernel's TCP memory now.
    pub fn sample(gateway: &Gateway, clients: u64) -> Idle {
        Idle {
            clients,
            rss_bytes: gateway.rss_bytes().unwrap_or(0),
            kernel_tcp_bytes: gateway::kernel_tcp_bytes(),
        }
    }
}

/// A connect phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Connect {
    pub clients: u64,
    pub failed: u64,
    pub secs: f64,
    pub per_sec: f64,
    pub gateway_cpu_secs: f64,
    pub per_cpu_sec: f64,
    /// Per second of the gateway's user-space CPU (its own code, without the kernel).
    pub per_user_cpu_sec: f64,
}

/// A delivery phase (broadcast or unicast).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    pub delivered: u64,
    pub expected: u64,
    pub secs: f64,
    pub per_sec: f64,
    pub gateway_cpu_secs: f64,
    pub per_cpu_sec: f64,
    /// Per second of the gateway's user-space CPU (its own code, without the kernel).
    pub per_user_cpu_sec: f64,
    pub spaced: bool,
    pub latency: Latency,
    /// Per broadcast: time until its last recipient had it.
    pub last_receipt: Option<Latency>,
    /// Latency CDF points: (microseconds, fraction).
    pub cdf: Vec<(u64, f64)>,
    pub offered_rate: Option<u64>,
    pub rpc_failures: u64,
}

impl Delivery {
    /// Figures from counts, times and the merged histograms.
    pub fn new(
        delivered: u64,
        expected: u64,
        secs: f64,
        (gateway_cpu_secs, user_cpu_secs): (f64, f64),
        latency: &Histogram<u64>,
        last_receipt_us: Option<Vec<u64>>,
        spaced: bool,
    ) -> Delivery {
        let last_receipt = last_receipt_us.filter(|v| !v.is_empty()).map(|values| {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            for v in values {
                let _ = h.record(v.max(1));
            }
            Latency::of(&h)
        });
        let cdf = [
            0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 1.0,
        ]
        .iter()
        .map(|q| (latency.value_at_quantile(*q), *q))
        .collect();
        Delivery {
            delivered,
            expected,
            secs,
            per_sec: per(delivered, secs),
            gateway_cpu_secs,
            per_cpu_sec: per(delivered, gateway_cpu_secs),
            per_user_cpu_sec: per(delivered, user_cpu_secs),
            spaced,
            latency: Latency::of(latency),
            last_receipt,
            cdf,
            offered_rate: None,
            rpc_failures: 0,
        }
    }
}

/// Connect/disconnect cycles.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Churn {
    pub cycles: u64,
    pub failed: u64,
    pub secs: f64,
    pub per_sec: f64,
    pub per_cpu_sec: f64,
    pub rss_before: u64,
    pub rss_after: u64,
    pub kernel_tcp_bytes: u64,
}

/// One run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub date: String,
    pub command: String,
    pub machine: String,
    pub gateway: String,
    pub n: usize,
    pub idle: Vec<Idle>,
    pub connect: Vec<Connect>,
    pub broadcast_burst: Vec<Delivery>,
    pub broadcast_spaced: Option<Delivery>,
    pub rss_after_broadcasts: Option<u64>,
    pub unicast: Option<Delivery>,
    pub unicast_max: Option<Delivery>,
    pub churn: Option<Churn>,
}

impl Results {
    /// An empty result for a run at `n` clients.
    pub fn new(n: usize) -> Results {
        Results {
            date: today(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            machine: machine(),
            gateway: String::new(),
            n,
            idle: Vec::new(),
            connect: Vec::new(),
            broadcast_burst: Vec::new(),
            broadcast_spaced: None,
            rss_after_broadcasts: None,
            unicast: None,
            unicast_max: None,
            churn: None,
        }
    }

    /// Idle bytes per connection: the slope between the two largest samples.
    pub fn bytes_per_connection(&self) -> Option<(f64, f64)> {
        let [.., a, b] = self.idle.as_slice() else {
            return None;
        };
        let clients = b.clients.checked_sub(a.clients).filter(|c| *c > 0)? as f64;
        Some((
            (b.rss_bytes as f64 - a.rss_bytes as f64) / clients,
            (b.kernel_tcp_bytes as f64 - a.kernel_tcp_bytes as f64) / clients,
        ))
    }
}

pub(crate) fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

pub(crate) fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024 / 1024);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} cores ({model}), {mem_gib} GiB, Linux {}",
        kernel.trim()
    )
}

/// The bars of the performance issue, to print beside the figures.
const BARS: &str = "\
| figure | bar | reference (same machine, N = 10,000) |
|---|---|---|
| idle gateway RSS per connection (slope) | <= 1,500 B | Go comet 40 KB, nchan 10.5 KB, Node `ws` 6.6 KB |
| broadcast deliveries per gateway CPU-second | >= 1,000,000 | nchan 96k-119k, Go comet 59k-72k, Node `ws` 75k-100k |
| broadcast publish -> last receipt, p99 | <= 30 ms | |
| unicast pushes per gateway CPU-second | >= 300,000 | nchan 33.6k, Go comet 16.3k |
| unicast push -> receive p99 at 20,000/s offered | <= 2 ms | |
| handshakes per gateway CPU-second (signed tokens) | >= 30,000 | nchan 20.6k/s, Go comet 5.0k/s (wall) |
| churn: RSS after 100,000 cycles | within 10% of baseline | |
";

/// Renders `RESULTS.md` and the plots from every JSON in `dir`.
pub fn render(dir: &Path, out: &Path) -> anyhow::Result<()> {
    let mut runs: Vec<Results> = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
    {
        runs.push(serde_json::from_str(&std::fs::read_to_string(path)?)?);
    }
    let Some(latest) = runs.last() else {
        anyhow::bail!("no results in {}", dir.display());
    };
    let plots = out.parent().unwrap_or(Path::new(".")).join("plots");
    std::fs::create_dir_all(&plots)?;
    plot_memory(latest, &plots.join("memory.svg"))?;
    plot_cdf(latest, &plots.join("latency-cdf.svg"))?;
    plot_throughput(latest, &plots.join("deliveries.svg"))?;
    let kept = std::fs::read_to_string(out)
        .ok()
        .and_then(|page| kept_block(&page).map(str::to_owned));
    std::fs::write(out, markdown(latest, &runs, kept.as_deref()))?;
    Ok(())
}

/// Where the hand-written part of `RESULTS.md` starts and ends; `render` writes it back
/// as it found it (the comparisons with the floor and their profiles live there).
pub(crate) const KEPT_BEGIN: &str = "<!-- kept: comet-bench render leaves this part as it is -->";
pub(crate) const KEPT_END: &str = "<!-- end of the kept part -->";

/// The kept part of a page, markers included.
fn kept_block(page: &str) -> Option<&str> {
    let start = page.find(KEPT_BEGIN)?;
    let end = start + page[start..].find(KEPT_END)? + KEPT_END.len();
    Some(&page[start..end])
}

fn kb(bytes: f64) -> String {
    format!("{:.0}", bytes)
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn markdown(latest: &Results, runs: &[Results], kept: Option<&str>) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmark results\n");
    let _ = writeln!(
        md,
        "Latest run: **{}** on {}.  ",
        latest.date, latest.machine
    );
    let _ = writeln!(
        md,
        "Gateway: {}. Command: `{}`.\n",
        latest.gateway, latest.command
    );
    let _ = writeln!(
        md,
        "The load generator (`bench/`, several processes, one loopback source address each) runs on the same 2 cores as the gateway, so rates per wall-second understate the gateway; figures *per gateway CPU-second* (its utime+stime during the phase) are the ones to compare. These machines are shared and noisy: compare ratios within one run.\n"
    );
    let _ = writeln!(
        md,
        "![bytes per connection](plots/memory.svg) ![latency CDF](plots/latency-cdf.svg) ![deliveries](plots/deliveries.svg)\n"
    );
    if let Some(kept) = kept {
        let _ = writeln!(md, "{kept}\n");
    }
    let _ = writeln!(
        md,
        "## Memory (idle clients)\n\n| clients | gateway RSS | kernel TCP memory |\n|---|---|---|"
    );
    for idle in &latest.idle {
        let _ = writeln!(
            md,
            "| {} | {:.1} MiB | {:.1} MiB |",
            idle.clients,
            idle.rss_bytes as f64 / 1048576.0,
            idle.kernel_tcp_bytes as f64 / 1048576.0
        );
    }
    if let Some((rss, kernel)) = latest.bytes_per_connection() {
        let _ = writeln!(
            md,
            "\nSlope between the two largest samples: **{} bytes of gateway RSS per connection**, {} bytes of kernel TCP memory per connection (server and client sockets both count: the load generator is on the same host).",
            kb(rss),
            kb(kernel)
        );
    }
    if let (Some(empty), Some(full)) = (latest.idle.first(), latest.idle.last()) {
        let average = (full.rss_bytes as f64 - empty.rss_bytes as f64) / full.clients.max(1) as f64;
        let _ = writeln!(
            md,
            "Average from the empty node to {} clients: **{} bytes per connection** (includes the allocator's warm-up and memory the handshakes used and freed; the slope is the cost of one more idle client).",
            full.clients,
            kb(average)
        );
    }
    if let (Some(after), Some(last)) = (latest.rss_after_broadcasts, latest.idle.last()) {
        let _ = writeln!(
            md,
            "After the broadcasts: {:.1} MiB ({:+.1} MiB from before them).",
            after as f64 / 1048576.0,
            (after as f64 - last.rss_bytes as f64) / 1048576.0
        );
    }
    let _ = writeln!(
        md,
        "\n## Connects (signed tokens)\n\n| clients | wall s | handshakes/s | gateway CPU s | handshakes per gateway CPU-second | per user CPU-second | failed |\n|---|---|---|---|---|---|---|"
    );
    for c in &latest.connect {
        let _ = writeln!(
            md,
            "| {} | {:.2} | {:.0} | {:.2} | **{:.0}** | {:.0} | {} |",
            c.clients,
            c.secs,
            c.per_sec,
            c.gateway_cpu_secs,
            c.per_cpu_sec,
            c.per_user_cpu_sec,
            c.failed
        );
    }
    let _ = writeln!(
        md,
        "\n## Deliveries\n\n| scenario | delivered / expected | deliveries/s | per gateway CPU-second | per user CPU-second | p50 ms | p99 ms | p99.9 ms | max ms | last receipt p99 ms |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut rows: Vec<(String, &Delivery)> = latest
        .broadcast_burst
        .iter()
        .zip(&latest.idle[1..])
        .map(|(d, i)| (format!("broadcast burst, {} clients", i.clients), d))
        .collect();
    if let Some(d) = &latest.broadcast_spaced {
        rows.push((format!("broadcast every 50 ms, {} clients", latest.n), d));
    }
    if let Some(d) = &latest.unicast {
        rows.push((
            format!("unicast at {}/s offered", d.offered_rate.unwrap_or(0)),
            d,
        ));
    }
    if let Some(d) = &latest.unicast_max {
        rows.push((
            "unicast, as fast as replies return (512 in flight)".into(),
            d,
        ));
    }
    for (name, d) in rows {
        let last = d.last_receipt.as_ref().map_or("-".into(), |l| ms(l.p99_us));
        let _ = writeln!(
            md,
            "| {name} | {} / {} | {:.0} | **{:.0}** | {:.0} | {} | {} | {} | {} | {} |",
            d.delivered,
            d.expected,
            d.per_sec,
            d.per_cpu_sec,
            d.per_user_cpu_sec,
            ms(d.latency.p50_us),
            ms(d.latency.p99_us),
            ms(d.latency.p999_us),
            ms(d.latency.max_us),
            last
        );
    }
    if let Some(c) = &latest.churn {
        let _ = writeln!(
            md,
            "\n## Churn\n\n{} connect/disconnect cycles ({} failed) in {:.1} s: {:.0} cycles/s, {:.0} per gateway CPU-second. RSS {:.1} MiB before, {:.1} MiB after ({:+.1}%).",
            c.cycles,
            c.failed,
            c.secs,
            c.per_sec,
            c.per_cpu_sec,
            c.rss_before as f64 / 1048576.0,
            c.rss_after as f64 / 1048576.0,
            (c.rss_after as f64 / c.rss_before.max(1) as f64 - 1.0) * 100.0
        );
    }
    let _ = writeln!(md, "\n## The bar\n\n{BARS}");
    let _ = writeln!(
        md,
        "What limits each figure, with the profile behind it: [bench/README.md](README.md).\n"
    );
    let _ = writeln!(
        md,
        "## History\n\n| date | N | bytes/conn | broadcast per CPU-s | unicast per CPU-s | handshakes per CPU-s |\n|---|---|---|---|---|---|"
    );
    for run in runs {
        let bytes = run
            .bytes_per_connection()
            .map_or("-".into(), |(r, _)| kb(r));
        let burst = run
            .broadcast_burst
            .last()
            .map_or("-".into(), |d| format!("{:.0}", d.per_cpu_sec));
        let unicast = run
            .unicast_max
            .as_ref()
            .map_or("-".into(), |d| format!("{:.0}", d.per_cpu_sec));
        let connect = run
            .connect
            .last()
            .map_or("-".into(), |c| format!("{:.0}", c.per_cpu_sec));
        let _ = writeln!(
            md,
            "| {} | {} | {bytes} | {burst} | {unicast} | {connect} |",
            run.date, run.n
        );
    }
    md
}

fn plot_memory(run: &Results, path: &Path) -> anyhow::Result<()> {
    let points: Vec<(f64, f64)> = run
        .idle
        .iter()
        .filter(|i| i.clients > 0)
        .map(|i| {
            let base = run.idle[0].rss_bytes as f64;
            (
                i.clients as f64,
                (i.rss_bytes as f64 - base) / i.clients as f64,
            )
        })
        .collect();
    let root = SVGBackend::new(path, (560, 360)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_x = points.iter().map(|p| p.0).fold(1.0, f64::max) * 1.1;
    let max_y = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.3;
    let mut chart = ChartBuilder::on(&root)
        .caption("Gateway RSS per idle connection", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..max_x, 0.0..max_y)?;
    chart
        .configure_mesh()
        .x_desc("clients")
        .y_desc("bytes / connection (above empty)")
        .draw()?;
    chart.draw_series(LineSeries::new(points.clone(), &BLUE))?;
    chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, BLUE.filled())))?;
    chart
        .draw_series(LineSeries::new(vec![(0.0, 1500.0), (max_x, 1500.0)], &RED))?
        .label("bar: 1,500 B")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    chart.configure_series_labels().border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

fn plot_cdf(run: &Results, path: &Path) -> anyhow::Result<()> {
    let mut series: Vec<(String, &Delivery, RGBColor)> = Vec::new();
    if let Some(d) = run.broadcast_burst.last() {
        series.push(("broadcast burst".into(), d, BLUE));
    }
    if let Some(d) = &run.broadcast_spaced {
        series.push(("broadcast spaced".into(), d, GREEN));
    }
    if let Some(d) = &run.unicast {
        series.push(("unicast".into(), d, RED));
    }
    let max_ms = series
        .iter()
        .flat_map(|(_, d, _)| d.cdf.iter().map(|p| p.0 as f64 / 1000.0))
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (560, 360)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Publish -> receive latency (CDF)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d((0.01f64..max_ms * 1.2).log_scale(), 0.0..1.0f64)?;
    chart
        .configure_mesh()
        .x_desc("milliseconds (log)")
        .y_desc("fraction received")
        .draw()?;
    for (name, d, color) in series {
        let points: Vec<(f64, f64)> = d
            .cdf
            .iter()
            .map(|(us, q)| ((*us as f64 / 1000.0).max(0.01), *q))
            .collect();
        chart
            .draw_series(LineSeries::new(points, &color))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn plot_throughput(run: &Results, path: &Path) -> anyhow::Result<()> {
    let points: Vec<(f64, f64)> = run
        .broadcast_burst
        .iter()
        .zip(&run.idle[1..])
        .map(|(d, i)| (i.clients as f64, d.per_cpu_sec))
        .collect();
    let root = SVGBackend::new(path, (560, 360)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_x = points.iter().map(|p| p.0).fold(1.0, f64::max) * 1.1;
    let max_y = points.iter().map(|p| p.1).fold(1_000_000.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Broadcast deliveries per gateway CPU-second",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..max_x, 0.0..max_y)?;
    chart
        .configure_mesh()
        .x_desc("clients")
        .y_desc("deliveries / CPU-s")
        .draw()?;
    chart.draw_series(LineSeries::new(points.clone(), &BLUE))?;
    chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, BLUE.filled())))?;
    chart
        .draw_series(LineSeries::new(vec![(0.0, 1e6), (max_x, 1e6)], &RED))?
        .label("bar: 1M")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
    chart.configure_series_labels().border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_part_is_found_with_its_markers() {
        let page = format!("# R\nrendered\n{KEPT_BEGIN}\nmine\n{KEPT_END}\nrendered\n");
        assert_eq!(
            kept_block(&page),
            Some(&*format!("{KEPT_BEGIN}\nmine\n{KEPT_END}"))
        );
        assert_eq!(kept_block("# R\nrendered only\n"), None);
    }
}
