//! `comet-bench dashboard`: the panels of the Grafana dashboard (`docs/dashboard/comet.json`)
//! drawn as one SVG from a live node's `/metrics`, for where Grafana is not at hand (it is
//! neither in Debian nor on npm).
//!
//! Scrapes `/metrics` every `--every` seconds for `--secs`, then draws each panel with one
//! line per query. Only the query shapes the dashboard uses are understood: a family's
//! value (`comet_connections`), its `rate(...)`, and `histogram_quantile(q, rate(..._bucket))`;
//! every `by (...)` grouping is summed into one line (one node, one series).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use plotters::prelude::*;
use serde_json::Value;

/// One scrape: every sample, by family name (a histogram's `_bucket` samples keep their
/// `le` label as the key's suffix).
type Scrape = BTreeMap<String, f64>;

/// What one query line draws.
#[derive(Debug, Clone, PartialEq)]
enum Query {
    /// The sum of every sample of the family.
    Value(String),
    /// Its per-second rate between scrapes.
    Rate(String),
    /// The quantile of the family's histogram over the interval between scrapes.
    Quantile(f64, String),
}

impl Query {
    /// Reads one of the dashboard's PromQL expressions.
    fn parse(expr: &str) -> Option<Query> {
        let family = first_family(expr)?;
        if let Some(rest) = expr.strip_prefix("histogram_quantile(") {
            let q: f64 = rest.split(',').next()?.trim().parse().ok()?;
            return Some(Query::Quantile(
                q,
                family.trim_end_matches("_bucket").to_owned(),
            ));
        }
        if expr.contains("rate(") {
            return Some(Query::Rate(family));
        }
        Some(Query::Value(family))
    }

    fn label(&self) -> String {
        match self {
            Query::Value(f) => f.clone(),
            Query::Rate(f) => format!("rate({f})"),
            Query::Quantile(q, f) => format!("p{} {f}", q * 100.0),
        }
    }

    /// The line's value between scrape `a` and scrape `b`, `secs` apart.
    fn value(&self, a: &Scrape, b: &Scrape, secs: f64) -> Option<f64> {
        match self {
            Query::Value(f) => family_sum(b, f),
            Query::Rate(f) => Some((family_sum(b, f)? - family_sum(a, f).unwrap_or(0.0)) / secs),
            Query::Quantile(q, f) => quantile(*q, &bucket_deltas(a, b, f)),
        }
    }
}

/// The first `comet_*` or `process_*` name in `expr`.
fn first_family(expr: &str) -> Option<String> {
    let start = ["comet_", "process_"]
        .iter()
        .filter_map(|p| expr.find(p))
        .min()?;
    let rest = &expr[start..];
    let len = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    Some(rest[..len].to_owned())
}

fn family_sum(scrape: &Scrape, family: &str) -> Option<f64> {
    let prefix = format!("{family}{{");
    let values: Vec<f64> = scrape
        .iter()
        .filter(|(k, _)| *k == family || k.starts_with(&prefix))
        .map(|(_, v)| *v)
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Per `le`, how much the family's buckets (summed over their other labels) grew.
fn bucket_deltas(a: &Scrape, b: &Scrape, family: &str) -> Vec<(f64, f64)> {
    let per_le = |scrape: &Scrape| {
        let mut sums: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        let prefix = format!("{family}_bucket{{");
        for (key, value) in scrape.iter().filter(|(k, _)| k.starts_with(&prefix)) {
            let Some(le) = label(key, "le") else { continue };
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::NAN)
            };
            let entry = sums.entry(bound.to_bits()).or_insert((bound, 0.0));
            entry.1 += value;
        }
        sums
    };
    let (before, after) = (per_le(a), per_le(b));
    let mut deltas: Vec<(f64, f64)> = after
        .values()
        .map(|(bound, count)| {
            let old = before.get(&bound.to_bits()).map_or(0.0, |(_, c)| *c);
            (*bound, count - old)
        })
        .collect();
    deltas.sort_by(|x, y| x.0.total_cmp(&y.0));
    deltas
}

/// Prometheus's `histogram_quantile`: linear within the bucket the rank falls in.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let within = (rank - lower.1) / (count - lower.1).max(f64::MIN_POSITIVE);
            return Some(lower.0 + (bound - lower.0) * within);
        }
        lower = (bound, count);
    }
    None
}

/// The value of label `name` in a sample key `family{a="x",name="y"}`.
fn label<'a>(key: &'a str, name: &str) -> Option<&'a str> {
    let start = key.find(&format!("{name}=\""))? + name.len() + 2;
    let len = key[start..].find('"')?;
    Some(&key[start..start + len])
}

/// The exposition text's samples (comments and blank lines skipped).
fn parse_exposition(text: &str) -> Scrape {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn scrape(admin: SocketAddr, token: &str) -> anyhow::Result<Scrape> {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let auth = if token.is_empty() {
        String::new()
    } else {
        format!("Authorization: Bearer {token}\r\n")
    };
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: comet\r\n{auth}\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP body")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{head}"
    );
    Ok(parse_exposition(body))
}

/// Scrapes `admin` for `secs` and draws `dashboard`'s panels into `out`.
pub fn render(
    admin: SocketAddr,
    token: &str,
    dashboard: &Path,
    secs: u64,
    every: f64,
    out: &Path,
) -> anyhow::Result<()> {
    let board: Value = serde_json::from_str(&std::fs::read_to_string(dashboard)?)?;
    let panels: Vec<(String, Vec<Query>)> = board["panels"]
        .as_array()
        .context("no panels")?
        .iter()
        .map(|p| {
            let title = p["title"].as_str().unwrap_or("").to_owned();
            let queries = p["targets"]
                .as_array()
                .map(|t| {
                    t.iter()
                        .filter_map(|t| Query::parse(t["expr"].as_str()?))
                        .collect()
                })
                .unwrap_or_default();
            (title, queries)
        })
        .collect();
    let started = Instant::now();
    let mut scrapes: Vec<(f64, Scrape)> = Vec::new();
    while started.elapsed() < Duration::from_secs(secs) {
        let at = started.elapsed().as_secs_f64();
        scrapes.push((at, scrape(admin, token)?));
        std::thread::sleep(Duration::from_secs_f64(every));
    }
    eprintln!("dashboard: {} scrapes of {admin}", scrapes.len());
    draw(&panels, &scrapes, out)
}

fn draw(
    panels: &[(String, Vec<Query>)],
    scrapes: &[(f64, Scrape)],
    out: &Path,
) -> anyhow::Result<()> {
    let rows = panels.len().div_ceil(2);
    let root = SVGBackend::new(out, (1100, 260 * rows as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for ((title, queries), area) in panels.iter().zip(root.split_evenly((rows, 2))) {
        let lines: Vec<(String, Vec<(f64, f64)>)> = queries
            .iter()
            .map(|q| {
                let points = scrapes
                    .windows(2)
                    .filter_map(|w| {
                        let secs = (w[1].0 - w[0].0).max(1e-3);
                        Some((w[1].0, q.value(&w[0].1, &w[1].1, secs)?))
                    })
                    .collect();
                (q.label(), points)
            })
            .collect();
        let max_x = scrapes.last().map_or(1.0, |s| s.0).max(1.0);
        let max_y = lines
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
            .filter(|y| y.is_finite())
            .fold(1e-9, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..max_x, 0.0..max_y)?;
        chart.configure_mesh().x_desc("seconds").draw()?;
        for (i, (name, points)) in lines.into_iter().enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(points, color))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 11))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dashboards_query_shapes_are_read() {
        assert_eq!(
            Query::parse(r#"sum by (instance, shard) (comet_connections{instance=~"$instance"})"#),
            Some(Query::Value("comet_connections".into()))
        );
        assert_eq!(
            Query::parse("sum (rate(comet_handshakes_total{x=\"y\"}[$__rate_interval]))"),
            Some(Query::Rate("comet_handshakes_total".into()))
        );
        assert_eq!(
            Query::parse(
                "histogram_quantile(0.99, sum by (le) (rate(comet_push_latency_seconds_bucket[1m])))"
            ),
            Some(Query::Quantile(0.99, "comet_push_latency_seconds".into()))
        );
    }

    #[test]
    fn values_rates_and_quantiles_come_from_two_scrapes() {
        let a = parse_exposition(
            "# HELP x\ncomet_c{shard=\"0\"} 2\ncomet_c{shard=\"1\"} 3\ncomet_h_bucket{le=\"0.1\"} 0\ncomet_h_bucket{le=\"1\"} 0\ncomet_h_bucket{le=\"+Inf\"} 0\n",
        );
        let b = parse_exposition(
            "comet_c{shard=\"0\"} 12\ncomet_c{shard=\"1\"} 3\ncomet_h_bucket{le=\"0.1\"} 50\ncomet_h_bucket{le=\"1\"} 100\ncomet_h_bucket{le=\"+Inf\"} 100\n",
        );
        assert_eq!(
            Query::Value("comet_c".into()).value(&a, &b, 2.0),
            Some(15.0)
        );
        assert_eq!(Query::Rate("comet_c".into()).value(&a, &b, 2.0), Some(5.0));
        let p50 = Query::Quantile(0.5, "comet_h".into())
            .value(&a, &b, 2.0)
            .unwrap();
        assert!((p50 - 0.1).abs() < 1e-9, "{p50}");
        let p75 = Query::Quantile(0.75, "comet_h".into())
            .value(&a, &b, 2.0)
            .unwrap();
        assert!((p75 - 0.55).abs() < 1e-9, "{p75}");
        assert_eq!(
            Query::Quantile(0.5, "comet_h".into()).value(&b, &b, 1.0),
            None
        );
    }
}
