//! The Grafana dashboard (`docs/dashboard/comet.json`) queries only metrics that a live
//! node exposes, and `docs/METRICS.md` lists every one it exposes: a renamed or new
//! metric breaks this test, not an operator's dashboard.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::etcd::Etcd;
use common::{Comet, free_port};

const DASHBOARD: &str = include_str!("../docs/dashboard/comet.json");
const METRICS_PAGE: &str = include_str!("../docs/METRICS.md");

/// The metric families a PromQL expression names (`comet_*`, `process_*`), with a
/// histogram's `_bucket`/`_sum`/`_count` series folded into its family.
fn families_in(expr: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let rest = &expr[i..];
        if starts_word && (rest.starts_with("comet_") || rest.starts_with("process_")) {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..len];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            found.insert(family.to_owned());
            i += len;
        } else {
            i += 1;
        }
    }
    found
}

fn queried_families() -> BTreeSet<String> {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).unwrap();
    let mut families = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title:?} queries nothing");
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            let named = families_in(expr);
            assert!(
                !named.is_empty(),
                "panel {title:?}: {expr:?} names no metric"
            );
            families.extend(named);
        }
    }
    families
}

#[test]
fn histogram_series_fold_into_their_family() {
    let named = families_in(
        "histogram_quantile(0.99, sum by (le) (rate(comet_push_latency_seconds_bucket[1m]))) \
         / process_max_fds",
    );
    assert_eq!(
        named.into_iter().collect::<Vec<_>>(),
        ["comet_push_latency_seconds", "process_max_fds"]
    );
}

/// Every family the dashboard queries is declared (`# TYPE`) by a live node, registered
/// in etcd, that has seen a connect, a push and a disconnect.
#[test]
fn every_metric_the_dashboard_queries_exists_in_a_live_node() {
    let server = common::MessageServer::start();
    let etcd = Etcd::start();
    let admin = free_port();
    let comet = Comet::start(
        Some(&server),
        &format!(
            "admin_addr=127.0.0.1:{admin}\nadmin_token=dashboard-token\netcd_addr={}\n\
             etcd_lease_ttl=5s",
            etcd.endpoint()
        ),
    );
    let client = comet.connect("dash", "t", "").unwrap();
    let mut rpc = comet.rpc();
    let _ = rpc.call(
        "Server.SendToConnections",
        serde_json::json!({"connIds": ["dash", "absent"], "msg": "hi"}),
    );
    drop(client);
    assert!(common::wait_until(Duration::from_secs(10), || {
        let text = scrape(admin);
        text.contains("comet_disconnects_total{") && text.contains("comet_etcd_registered 1")
    }));
    let exposition = scrape(admin);
    let declared: BTreeSet<&str> = exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    let missing: Vec<_> = queried_families()
        .into_iter()
        .filter(|family| !declared.contains(family.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "not in /metrics: {missing:?}\n{exposition}"
    );
    let undocumented: Vec<_> = declared
        .iter()
        .filter(|family| !METRICS_PAGE.contains(&format!("| `{family}` |")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "not in docs/METRICS.md: {undocumented:?}"
    );
}

fn scrape(admin: u16) -> String {
    ureq::get(&format!("http://127.0.0.1:{admin}/metrics"))
        .set("Authorization", "Bearer dashboard-token")
        .call()
        .expect("admin listener")
        .into_string()
        .unwrap()
}
