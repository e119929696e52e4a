//! Prometheus text exposition of the node's figures (`/metrics` on the admin listener).
//!
//! Rendering only: the figures are gathered by [`crate::control::Node`] on the control
//! thread (shards answer a `Stats` command), so scraping never touches a shard's state.

use std::collections::BTreeMap;
use std::fmt::{Display, Write};

use crate::callback::CallbackFigures;
use crate::control::load::LoadState;
use crate::control::process::ProcessFigures;
use crate::histogram::Snapshot;
use crate::link::ShardStats;

/// Everything one scrape shows.
pub(crate) struct Figures<'a> {
    /// The standard `process_*` figures.
    pub(crate) process: &'a ProcessFigures,
    /// Per-shard figures.
    pub(crate) shards: &'a [ShardStats],
    /// Push RPC counters: (name, help, value).
    pub(crate) pushes: &'a [(&'static str, &'static str, u64)],
    /// From a push call read to its answer.
    pub(crate) push_latency: &'a Snapshot,
    /// Callback figures.
    pub(crate) callbacks: &'a CallbackFigures,
    /// Whether the node's etcd key is in place (`None`: standalone).
    pub(crate) registered: Option<bool>,
    /// Times the key was put on a fresh lease.
    pub(crate) registrations: u64,
    /// The load self-check's verdict.
    pub(crate) load: LoadState,
    /// Seconds since start.
    pub(crate) uptime_secs: u64,
    /// Whether the node is shutting down.
    pub(crate) draining: bool,
    /// Presence callbacks queued, not yet delivered.
    pub(crate) presence_backlog: u64,
}

/// The exposition text.
pub(crate) fn render(figures: &Figures<'_>) -> String {
    let mut out = Exposition::default();
    shards(&mut out, figures.shards);
    for (name, help, value) in figures.pushes {
        out.family(name, "counter", help);
        out.sample(name, &[], value);
    }
    out.histogram(
        "comet_push_latency_seconds",
        "Push calls (SendToConnections, Broadcast, SendToGroup), from the request read to its answer.",
        &[],
        figures.push_latency,
    );
    callbacks(&mut out, figures.callbacks);
    node(&mut out, figures);
    process(&mut out, figures.process);
    out.0
}

/// The standard process collector's names, so stock dashboards and alerts work as is.
fn process(out: &mut Exposition, figures: &ProcessFigures) {
    let as_f64 = |v: Option<u64>| v.map(|v| v as f64);
    let families = [
        (
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, in seconds.",
            figures.cpu_seconds,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            as_f64(figures.resident_bytes),
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            as_f64(figures.virtual_bytes),
        ),
        (
            "process_open_fds",
            "gauge",
            "Open file descriptors (each client is one).",
            as_f64(figures.open_fds),
        ),
        (
            "process_max_fds",
            "gauge",
            "The soft limit on open file descriptors.",
            as_f64(figures.max_fds),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the epoch, in seconds.",
            figures.start_time_seconds,
        ),
    ];
    for (name, kind, help, value) in families {
        if let Some(value) = value {
            out.family(name, kind, help);
            out.sample(name, &[], value);
        }
    }
    out.family(
        "comet_build_info",
        "gauge",
        "Always 1; the labels say which build is running.",
    );
    out.sample(
        "comet_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
}

/// A per-shard gauge or counter: name, type, help, and how to read it.
type ShardFigure = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ShardStats) -> u64,
);
/// A per-shard counter split by reason: name, help, and where the reasons are.
type ShardReasons = (
    &'static str,
    &'static str,
    fn(&ShardStats) -> &BTreeMap<&'static str, u64>,
);

fn shards(out: &mut Exposition, shards: &[ShardStats]) {
    out.family(
        "comet_connections",
        "gauge",
        "Connected clients, by transport.",
    );
    for stats in shards {
        let shard = stats.shard.to_string();
        for (transport, count) in &stats.connections_by_transport {
            out.sample(
                "comet_connections",
                &[("shard", &shard), ("transport", transport)],
                count,
            );
        }
    }
    let per_shard: [ShardFigure; 11] = [
        (
            "comet_connection_panics_total",
            "counter",
            "Connection tasks that panicked; each closed only its own connection.",
            |s| s.connection_panics,
        ),
        (
            "comet_queued_messages",
            "gauge",
            "Messages waiting in outbound queues.",
            |s| s.queued_messages as u64,
        ),
        (
            "comet_queued_bytes",
            "gauge",
            "Bytes waiting in outbound queues (pushes and the node's own replies).",
            |s| s.queued_bytes as u64,
        ),
        (
            "comet_accepted_total",
            "counter",
            "TCP connections accepted.",
            |s| s.accepted,
        ),
        (
            "comet_handshakes_total",
            "counter",
            "Clients admitted (upgraded, or welcomed on raw TCP).",
            |s| s.upgraded,
        ),
        (
            "comet_accept_fd_exhausted_total",
            "counter",
            "Accepts deferred because descriptors ran out.",
            |s| s.accept_fd_exhausted,
        ),
        (
            "comet_accept_fd_reserve_total",
            "counter",
            "Acceptor pauses: descriptors within fd_reserve of the open-files limit.",
            |s| s.accept_fd_reserve,
        ),
        (
            "comet_recovery_buffers",
            "gauge",
            "Recovery buffers held, of connected clients and of clients away.",
            |s| s.recovery_buffers as u64,
        ),
        (
            "comet_recovery_messages",
            "gauge",
            "Messages kept in recovery buffers.",
            |s| s.recovery_messages as u64,
        ),
        (
            "comet_recovery_bytes",
            "gauge",
            "Bytes counted against recovery_total_bytes (messages and buffers).",
            |s| s.recovery_bytes as u64,
        ),
        (
            "comet_resp_authenticated_connections",
            "gauge",
            "RESP connections past AUTH, subscribed or not (at most 4 per conn_id per shard).",
            |s| s.resp_authenticated as u64,
        ),
    ];
    for (name, kind, help, value) in per_shard {
        out.family(name, kind, help);
        for stats in shards {
            let shard = stats.shard.to_string();
            out.sample(name, &[("shard", &shard)], value(stats));
        }
    }
    let by_reason: [ShardReasons; 3] = [
        (
            "comet_handshake_refusals_total",
            "Handshakes refused, by reason.",
            |s| &s.handshake_refusals,
        ),
        (
            "comet_delivery_failures_total",
            "Deliveries that failed on a shard, by reason.",
            |s| &s.delivery_failures,
        ),
        (
            "comet_disconnects_total",
            "Client sessions ended, by close reason.",
            |s| &s.disconnects,
        ),
    ];
    for (name, help, reasons) in by_reason {
        out.family(name, "counter", help);
        for stats in shards {
            let shard = stats.shard.to_string();
            for (reason, count) in reasons(stats) {
                out.sample(name, &[("shard", &shard), ("reason", reason)], count);
            }
        }
    }
}

fn callbacks(out: &mut Exposition, figures: &CallbackFigures) {
    for (name, help, value) in [
        (
            "comet_callbacks_total",
            "Callbacks made to the message server.",
            figures.calls,
        ),
        (
            "comet_callback_failures_total",
            "Callbacks that failed (unreachable, HTTP error).",
            figures.failures,
        ),
        (
            "comet_callback_refusals_total",
            "Callbacks answered with a non-zero code.",
            figures.refusals,
        ),
    ] {
        out.family(name, "counter", help);
        out.sample(name, &[], value);
    }
    method_latency(out, figures);
}

/// `comet_callback_latency_seconds{method}`: the latency of each callback method apart
/// (a slow `offline` must not hide behind fast `checkToken`s; `sum without (method)` is
/// the whole).
fn method_latency(out: &mut Exposition, figures: &CallbackFigures) {
    let name = "comet_callback_latency_seconds";
    out.family(
        name,
        "histogram",
        "Callback latency by method (checkToken, online, offline, other).",
    );
    for method in &figures.by_method {
        let mut cumulative = 0;
        for (bound_ms, count) in figures.latency_le_ms.iter().zip(&method.latency_counts) {
            cumulative += count;
            let le = format!("{}", *bound_ms as f64 / 1000.0);
            out.sample(
                "comet_callback_latency_seconds_bucket",
                &[("method", method.method), ("le", &le)],
                cumulative,
            );
        }
        let count: u64 = method.latency_counts.iter().sum();
        out.sample(
            "comet_callback_latency_seconds_bucket",
            &[("method", method.method), ("le", "+Inf")],
            count,
        );
        out.sample(
            "comet_callback_latency_seconds_sum",
            &[("method", method.method)],
            method.latency_sum_us as f64 / 1e6,
        );
        out.sample(
            "comet_callback_latency_seconds_count",
            &[("method", method.method)],
            count,
        );
    }
}

fn node(out: &mut Exposition, figures: &Figures<'_>) {
    let state = figures.load;
    let flag = |b: bool| u64::from(b);
    let gauges = [
        (
            "comet_etcd_registered",
            "1 when the node's etcd key is in place (absent when standalone).",
            figures.registered.map(flag),
        ),
        (
            "comet_overloaded",
            "1 while a soft load threshold is crossed.",
            Some(flag(state.overloaded)),
        ),
        (
            "comet_refusing_new_clients",
            "1 while a hard load threshold is crossed.",
            Some(flag(state.refusing)),
        ),
        (
            "comet_draining",
            "1 while shutting down.",
            Some(flag(figures.draining)),
        ),
        (
            "comet_uptime_seconds",
            "Seconds since start.",
            Some(figures.uptime_secs),
        ),
        (
            "comet_presence_backlog",
            "online/offline callbacks queued and not yet delivered.",
            Some(figures.presence_backlog),
        ),
    ];
    for (name, help, value) in gauges {
        if let Some(value) = value {
            out.family(name, "gauge", help);
            out.sample(name, &[], value);
        }
    }
    out.family(
        "comet_etcd_registrations_total",
        "counter",
        "Times the key was put on a fresh lease.",
    );
    out.sample("comet_etcd_registrations_total", &[], figures.registrations);
    out.family(
        "comet_log_lines_dropped_total",
        "counter",
        "Log lines dropped because the log reader (journald, a pipe) fell behind.",
    );
    out.sample(
        "comet_log_lines_dropped_total",
        &[],
        crate::logging::dropped_lines(),
    );
}

#[derive(Default)]
struct Exposition(String);

impl Exposition {
    /// A histogram family with one label set.
    fn histogram(&mut self, name: &str, help: &str, labels: &[(&str, &str)], snapshot: &Snapshot) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for (bound, count) in &snapshot.cumulative {
            let le = if bound.is_infinite() {
                "+Inf".to_owned()
            } else {
                bound.to_string()
            };
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, count);
        }
        self.sample(&format!("{name}_sum"), labels, snapshot.sum_seconds);
        self.sample(&format!("{name}_count"), labels, snapshot.count);
    }

    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (key, label)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let escaped = label
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.0, "{key}=\"{escaped}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_labels_are_escaped() {
        let callbacks = CallbackFigures {
            calls: 3,
            failures: 1,
            refusals: 0,
            latency_sum_us: 3_500,
            latency_le_ms: crate::callback::LATENCY_BUCKETS_MS,
            latency_counts: vec![1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            by_method: vec![crate::callback::MethodFigures {
                method: "offline",
                latency_sum_us: 12_000,
                latency_counts: vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            }],
        };
        let mut stats = ShardStats::default();
        stats.handshake_refusals.insert("to\"ken", 2);
        let process = ProcessFigures {
            open_fds: Some(12),
            ..ProcessFigures::default()
        };
        let latency = crate::histogram::Histogram::default();
        latency.observe(std::time::Duration::from_micros(300));
        let text = render(&Figures {
            push_latency: &latency.snapshot(),
            process: &process,
            shards: &[stats],
            pushes: &[("comet_push_calls_total", "Push calls.", 5)],
            callbacks: &callbacks,
            registered: None,
            registrations: 0,
            load: LoadState::default(),
            uptime_secs: 9,
            draining: false,
            presence_backlog: 0,
        });
        assert!(text.contains("reason=\"to\\\"ken\"} 2\n"));
        assert!(text.contains("comet_push_calls_total 5\n"));
        assert!(text.contains("process_open_fds 12\n"), "{text}");
        assert!(
            text.contains("comet_push_latency_seconds_bucket{le=\"0.00025\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("comet_push_latency_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("comet_push_latency_seconds_bucket{le=\"+Inf\"} 1\n"));
        assert!(text.contains("comet_push_latency_seconds_count 1\n"));
        assert!(
            !text.contains("process_max_fds"),
            "a figure /proc did not give is left out"
        );
        assert!(text.contains("comet_build_info{version=\""));
        assert!(text.contains(
            "comet_callback_latency_seconds_bucket{method=\"offline\",le=\"0.005\"} 0\n"
        ));
        assert!(
            text.contains(
                "comet_callback_latency_seconds_bucket{method=\"offline\",le=\"0.01\"} 1\n"
            )
        );
        assert!(text.contains("comet_callback_latency_seconds_count{method=\"offline\"} 2\n"));
        assert!(text.contains("comet_callback_latency_seconds_sum{method=\"offline\"} 0.012\n"));
        assert!(
            !text.contains("comet_etcd_registered "),
            "standalone nodes have no such gauge"
        );
    }
}
